"""DVC stage `evaluate`: accuracy, COCO AP, params/FLOPs, throughput, ERF, Grad-CAM and the report."""
import sys

from overlock.pipeline.runner import run_stage


def main(argv=None) -> int:
    return run_stage("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
