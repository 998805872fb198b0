"""The stage protocol, written once: state directory, atomic outputs, the MLflow child run, compute.

:func:`open_stage` is what every stage runs in (the command line through :mod:`overlock.pipeline.runner`,
tests and notebooks directly)::

    with open_stage("pretrain", params, data=..., out=..., metrics=..., plots=...) as ctx:
        run_pretrain(ctx)

It configures compute (threads, ContMix backend, seed), computes the state directory once
(``.overlock/state/<stage>/<hash of the result params, the code deps and the input fingerprint>/``), opens the
stage's MLflow child run (resuming the unfinished one of the same state directory) with its system metrics,
log, datasets and dvc.lock hashes (:mod:`overlock.pipeline.records`) and ends it FINISHED or FAILED. Stage functions publish their outputs through :meth:`StageContext.publish`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch

from overlock.backends import contmix_backend, set_contmix_backend
from overlock.catalog import load_object
from overlock.compute import configure, repo_root
from overlock.params import Params
from overlock.pipeline.records import stage_records
from overlock.pipeline.spec import KERNEL_CODE, STAGES, StageSpec, result_values
from overlock.state import STATE_ROOT, staged_dir, write_csv_atomic
from overlock.tracking import StageRun, stage_run

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding overlock/ (and stages/, pipelines/)


def code_digest(paths: tuple[str, ...], root: Path = SOURCE_ROOT) -> str:
    """sha256 over the contents of the given files/directories (missing ones count by name only)."""
    h = hashlib.sha256()
    for rel in sorted(set(paths)):
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes() if f.is_file() else b"(missing)")
    return h.hexdigest()


class StageContext:
    """One run of one stage: its description, validated params, paths, MLflow run and state directory."""

    def __init__(self, spec: StageSpec, params: Params, paths: dict[str, Path], run: StageRun | None = None,
                 device: torch.device | None = None):
        unknown = sorted(set(paths) - {p.name for p in spec.paths})
        missing = sorted({p.name for p in spec.paths if not p.optional} - set(paths))
        if unknown or missing:
            raise TypeError(f"stage {spec.name}: unknown path(s) {unknown}, missing path(s) {missing}; "
                            f"its paths are {', '.join(p.name for p in spec.paths)}")
        self.spec, self.params, self.run = spec, params, run
        self.paths = {name: Path(value) for name, value in paths.items()}
        self.device = device if device is not None else torch.device("cpu")

    @property
    def name(self) -> str:
        return self.spec.name

    def __getitem__(self, name: str) -> Path:
        """``ctx["data"]``: the path given for option ``--data``."""
        return self.paths[name]

    # -- state -------------------------------------------------------------------------------------
    def state_key(self) -> dict[str, Any]:
        """What the state directory hashes: result params, code deps and the fingerprint of the inputs."""
        spec = self.spec
        key: dict[str, Any] = {"params": result_values(spec, self.params.model_dump(mode="json")),
                               "code": code_digest((spec.entry, *KERNEL_CODE, *spec.code))}
        if spec.resume_inputs:
            key["inputs"] = load_object(spec.resume_inputs)(self.params, **self.paths)
        return key

    @cached_property
    def state_dir(self) -> Path:
        """``<repo>/.overlock/state/<stage>/<hash>/`` (created; computed once per context)."""
        blob = json.dumps(self.state_key(), sort_keys=True, default=str)
        path = repo_root() / STATE_ROOT / self.name / hashlib.sha256(blob.encode()).hexdigest()[:16]
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resume_key(self) -> str | None:
        """The MLflow resume key of a resumable stage (its state directory's name)."""
        return self.state_dir.name if self.spec.resume_inputs else None

    # -- outputs -----------------------------------------------------------------------------------
    def publish(self, name: str = "out") -> contextlib.AbstractContextManager[Path]:
        """``with ctx.publish() as staging:`` write the output directory ``--<name>`` into ``staging``; it
        replaces the output only when the block succeeds (a failed stage leaves no partial output)."""
        return staged_dir(self.paths[name])

    def write_plot(self, rows: list[dict], columns: list[str], name: str = "plots") -> Path:
        """Write the stage's DVC plot CSV (``plot_file`` of path option ``name``) atomically."""
        option = self.spec.path(name)
        return write_csv_atomic(self.paths[name] / option.plot_file, rows, columns)

    def call(self) -> Any:
        """Run the stage's function on this context."""
        fn = load_object(self.spec.function)
        if self.spec.takes_context:
            return fn(self)
        return fn(self.params, self.run, **self.paths)


@contextlib.contextmanager
def open_stage(stage: str | StageSpec, params: Params, track: bool = True, **paths: Path) -> Iterator[StageContext]:
    """Configure compute, compute the state directory, open the MLflow child run (``track``): see the module
    docstring. The ContMix backend of the process is restored afterwards (stages run in-process in tests)."""
    spec = STAGES[stage] if isinstance(stage, str) else stage
    backend = contmix_backend()
    try:
        device = configure(params.compute, params.seed)
        ctx = StageContext(spec, params, paths, device=device)
        if not track:
            yield ctx
            return
        with stage_run(spec.name, params, resume_key=ctx.resume_key) as run:
            ctx.run = run
            with stage_records(ctx):  # the stage's log, datasets and dvc.lock hashes (records.py)
                yield ctx
    finally:
        set_contmix_backend(backend)
