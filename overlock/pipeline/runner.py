"""Command line of one stage, built from its description: ``--params``, ``--model-size`` and its paths.

Used by the entry points (``python -m stages.<name>``, ``python pipelines/pretrain.py``) and by the
``overlock <stage>`` console script; imports the stage's code only after ``--help`` and validation.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from overlock.pipeline.spec import STAGES, StageSpec


def stage_parser(spec: StageSpec, prog: str | None = None) -> argparse.ArgumentParser:
    """Parser of a stage: ``--params``, ``--model-size`` and one required option per path."""
    parser = argparse.ArgumentParser(prog=prog or spec.entry_command, description=spec.help)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--model-size", default=None,
                        help="must equal model.size in the params file (dvc.yaml passes ${model.size}: DVC's run "
                             "cache ignores params named 'size', so the command itself carries it)")
    for option in spec.paths:
        parser.add_argument(option.flag, dest=option.name, required=not option.optional,
                            help=f"{option.help} ({option.dvc}{'; optional' if option.optional else ''})")
    return parser


def run_stage(stage: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv``, validate params (exit 2 naming the problem), run the stage in its context."""
    spec = STAGES[stage]
    args = stage_parser(spec, prog).parse_args(argv)  # --help stops here, before any heavy import
    from overlock.params import ParamsError, load_params
    from overlock.pipeline.context import open_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.model_size is not None and args.model_size != params.model.size:
        print(f"error: --model-size {args.model_size!r} does not match model.size {params.model.size!r} in "
              f"{args.params}; run the stage through `dvc repro` or pass the same value", file=sys.stderr)
        return 2
    paths = {option.name: Path(getattr(args, option.name)) for option in spec.paths
             if getattr(args, option.name) is not None}
    if not _inputs_match_manifests(spec, paths):
        return 1
    with open_stage(spec, params, **paths) as ctx:
        ctx.call()
    return 0


def _inputs_match_manifests(spec: StageSpec, paths: dict[str, Path]) -> bool:
    """Check each input tree that DVC tracks through a manifest (data/datasets) against it: DVC does not see
    a file changed by hand inside it. Prints the problem and the fix; False when one differs."""
    from overlock.data.manifest import DatasetChangedError, check_tree

    for option in spec.by_role("in"):
        if option.manifest:
            try:
                check_tree(paths[option.name])
            except DatasetChangedError as err:
                print(f"error: {err}", file=sys.stderr)
                return False
    return True
