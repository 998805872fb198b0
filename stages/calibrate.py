"""DVC stage `calibrate`: temperature scaling on the held-out split and detector score calibration."""
import sys

from overlock.cli import run_stage

PATHS = {"data": "root of the extracted datasets", "classifier": "pretrain stage output",
         "detector": "finetune stage output", "out": "calibration output directory",
         "metrics": "DVC metrics JSON", "plots": "DVC plots directory"}


def main(argv=None) -> int:
    return run_stage("calibrate", PATHS, "overlock.calibration.stage:run_calibrate", argv)


if __name__ == "__main__":
    sys.exit(main())
