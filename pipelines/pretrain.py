"""Ray Train pretraining entry point.

Runs from the DVC `pretrain` stage (starting a local Ray runtime) and on a cluster:
    ray job submit --working-dir . -- python pipelines/pretrain.py --params params.yaml ...
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (DVC, ray job submit): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlock.cli import run_stage  # noqa: E402

PATHS = {"data": "root of the extracted datasets", "out": "classifier output directory (final + best)",
         "metrics": "DVC metrics JSON", "plots": "DVC plots directory"}


def main(argv=None) -> int:
    return run_stage("pretrain", PATHS, "overlock.training.pretrain:run_pretrain", argv, resume_key="overlock.training.pretrain:resume_key")


if __name__ == "__main__":
    sys.exit(main())
