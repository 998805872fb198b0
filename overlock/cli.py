"""Command line: ``overlock <stage> ...`` / ``python -m stages.<stage>``, and ``overlock predict``.

Every stage entry point is thin: parse its paths, load and validate params.yaml, configure compute, open
the stage's MLflow child run and call the library function ``fn(params, run, **paths)``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

STAGES = {
    "download": "fetch and verify the dataset archives (URLs, file:// or local paths; demo data is generated)",
    "extract": "safely extract archives into the standard layouts and write the integrity report",
    "pretrain": "ImageNet-style pretraining with Ray Train (also: ray job submit -- python pipelines/pretrain.py)",
    "finetune": "MMDetection COCO fine-tuning (Mask R-CNN / Faster R-CNN) or evaluation of a detector",
    "calibrate": "temperature scaling on the held-out split; detector score calibration",
    "evaluate": "accuracy, COCO AP, params/FLOPs, throughput, ERF, Grad-CAM and the report",
}
STAGE_MODULES = {name: f"stages.{name}" for name in STAGES}
STAGE_MODULES["pretrain"] = "pipelines.pretrain"


class StageArgs(argparse.Namespace):
    params: str


def stage_parser(stage: str, paths: dict[str, str]) -> argparse.ArgumentParser:
    """Parser of a stage: ``--params`` plus one option per path (with its help text)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=STAGES[stage])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--model-size", default=None,
                        help="must equal model.size in the params file (dvc.yaml passes ${model.size}: DVC's run "
                             "cache ignores params named 'size', so the command itself carries it)")
    for name, help_text in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, help=help_text)
    return parser


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_stage(stage: str, paths: dict[str, str], fn: str, argv: Sequence[str] | None = None,
              resume_key: str | None = None) -> int:
    """Parse ``argv``, validate params (exit 2 naming the problem), run ``fn`` inside the stage's MLflow run.

    ``fn``/``resume_key`` are ``"module:function"`` strings, imported only after ``--help`` and validation.
    """
    from overlock.compute import configure
    from overlock.params import ParamsError, load_params
    from overlock.tracking import stage_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = stage_parser(stage, paths).parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.model_size is not None and args.model_size != params.model.size:
        print(f"error: --model-size {args.model_size!r} does not match model.size {params.model.size!r} in "
              f"{args.params}; run the stage through `dvc repro` or pass the same value", file=sys.stderr)
        return 2
    configure(params.compute, params.seed)
    kwargs = {name: Path(getattr(args, name)) for name in paths}
    key = _resolve(resume_key)(params, **kwargs) if resume_key else None
    with stage_run(stage, params, resume_key=key) as run:
        _resolve(fn)(params, run, **kwargs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``overlock`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="overlock", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="overlock-pipeline: OverLoCK from raw data to a calibrated, evaluated model.",
        epilog="stages (run all with `dvc repro`):\n" + "\n".join(f"  {k:<10} {v}" for k, v in STAGES.items())
        + "\n\nother commands:\n  predict    print calibrated top-k classes for images\n\n"
          "`overlock <stage> --help` shows a stage's options.")
    parser.add_argument("command", choices=[*STAGES, "predict"], help="stage or command")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "predict":
        from overlock.evaluation.predict import main as predict_main
        return predict_main(rest)
    if command not in STAGES:
        parser.error(f"unknown command {command!r}; choose from {', '.join([*STAGES, 'predict'])}")
    module = importlib.import_module(STAGE_MODULES[command])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
