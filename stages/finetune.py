"""DVC stage `finetune`: MMDetection fine-tuning (Mask R-CNN / Faster R-CNN) of the pretrained backbone."""
import sys

from overlock.cli import run_stage

PATHS = {"data": "root of the extracted datasets", "classifier": "pretrain stage output",
         "out": "detector output directory", "metrics": "DVC metrics JSON", "plots": "DVC plots directory"}


def main(argv=None) -> int:
    return run_stage("finetune", PATHS, "overlock.detection.finetune:run_finetune", argv, resume_key="overlock.detection.finetune:resume_key")


if __name__ == "__main__":
    sys.exit(main())
