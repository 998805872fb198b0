"""Ray Train pretraining entry point.

Runs from the DVC `pretrain` stage (starting a local Ray runtime) and on a cluster:
    ray job submit --working-dir . -- python pipelines/pretrain.py --params params.yaml ...
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (DVC, ray job submit): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlock.pipeline.runner import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
