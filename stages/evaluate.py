"""DVC stage `evaluate`: accuracy, COCO AP, params/FLOPs, throughput, ERF, Grad-CAM and the report."""
import sys

from overlock.cli import run_stage

PATHS = {"data": "root of the extracted datasets", "classifier": "pretrain stage output",
         "detector": "finetune stage output", "calibration": "calibrate stage output",
         "out": "report directory", "metrics": "DVC metrics JSON", "plots": "DVC plots directory"}


def main(argv=None) -> int:
    return run_stage("evaluate", PATHS, "overlock.evaluation.stage:run_evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
