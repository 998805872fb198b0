"""DVC stage `extract`: safe extraction into the standard dataset layouts plus an integrity report."""
import sys

from overlock.cli import run_stage

PATHS = {"archives": "directory of verified archives (download stage output)",
         "out": "root of the extracted datasets",
         "metrics": "integrity report (DVC metrics JSON)"}


def main(argv=None) -> int:
    return run_stage("extract", PATHS, "overlock.data.extract:run_extract", argv)


if __name__ == "__main__":
    sys.exit(main())
