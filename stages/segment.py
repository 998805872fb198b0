"""DVC stage `segment`: UperNet semantic segmentation (mmseg) on the OverLoCK backbone, then pixel-wise calibration."""
import sys

from overlock.pipeline.runner import run_stage


def main(argv=None) -> int:
    return run_stage("segment", argv)


if __name__ == "__main__":
    sys.exit(main())
