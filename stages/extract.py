"""DVC stage `extract`: safe extraction into the standard dataset layouts plus an integrity report."""
import sys

from overlock.pipeline.runner import run_stage


def main(argv=None) -> int:
    return run_stage("extract", argv)


if __name__ == "__main__":
    sys.exit(main())
