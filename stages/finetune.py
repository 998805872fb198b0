"""DVC stage `finetune`: MMDetection fine-tuning (Mask R-CNN / Faster R-CNN) of the pretrained backbone."""
import sys

from overlock.pipeline.runner import run_stage


def main(argv=None) -> int:
    return run_stage("finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
