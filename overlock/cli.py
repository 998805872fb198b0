"""The ``overlock`` console script: ``overlock <stage> ...`` (any stage of :mod:`overlock.pipeline.spec`) and
``overlock predict``. Works from any directory: it dispatches to the library's stage descriptions, never to
the repository's ``stages/`` or ``pipelines/`` entry points (which do the same for DVC).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from overlock.pipeline.spec import STAGES


def main(argv: Sequence[str] | None = None) -> int:
    """``overlock`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="overlock", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="overlock-pipeline: OverLoCK from raw data to a calibrated, evaluated model.",
        epilog="stages (run all with `dvc repro`):\n" + "\n".join(f"  {k:<10} {v.help}" for k, v in STAGES.items())
        + "\n\nother commands:\n"
          "  predict    calibrated top-k classes (--task detect: detections) of image files, dirs, globs\n"
          "  export     export the deploy form of a trained classifier (--format onnx), checked with ONNX Runtime\n\n"
          "`overlock <stage> --help` shows a stage's options.")
    commands = {"predict": "overlock.evaluation.predict:main", "export": "overlock.onnx_export:main"}
    parser.add_argument("command", choices=[*STAGES, *commands], help="stage or command")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command in commands:
        from overlock.catalog import load_object
        return load_object(commands[command])(rest)
    if command not in STAGES:
        parser.error(f"unknown command {command!r}; choose from {', '.join([*STAGES, *commands])}")
    from overlock.pipeline.runner import run_stage
    return run_stage(command, rest, prog=f"overlock {command}")


if __name__ == "__main__":
    sys.exit(main())
