"""DVC stage `calibrate`: temperature scaling on the held-out split and detector score calibration."""
import sys

from overlock.pipeline.runner import run_stage


def main(argv=None) -> int:
    return run_stage("calibrate", argv)


if __name__ == "__main__":
    sys.exit(main())
