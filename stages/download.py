"""DVC stage `download`: fetch and verify the selected dataset archives (the demo archives are generated)."""
import sys

from overlock.pipeline.runner import run_stage


def main(argv=None) -> int:
    return run_stage("download", argv)


if __name__ == "__main__":
    sys.exit(main())
