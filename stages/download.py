"""DVC stage `download`: fetch and verify the selected dataset archives (the demo archives are generated)."""
import sys

from overlock.cli import run_stage

PATHS = {"out": "directory the verified archives are written to"}


def main(argv=None) -> int:
    return run_stage("download", PATHS, "overlock.data.download:run_download", argv)


if __name__ == "__main__":
    sys.exit(main())
