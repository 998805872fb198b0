"""What a stage's MLflow run records beyond params and metrics: its own log, its datasets, its dvc.lock hashes.

:func:`stage_records` wraps the stage body inside :func:`overlock.pipeline.context.open_stage`:

- the stage's log: everything written to file descriptors 1 and 2 (prints, logging, tqdm, Ray's forwarded
  worker output, torchrun children) is copied into ``<state dir>/logs/<run id>/<stage>.log`` while still shown,
  and logged as the artifact ``logs/<stage>.log`` at the end, after a failure too (with the traceback). A
  resumed run appends to the same file, so the artifact holds every attempt.
- datasets: the splits the stage reads (``StageSpec.datasets``) as MLflow dataset inputs (name, digest, source,
  sizes; see :func:`overlock.data.datasets.split_records`); the extract stage logs the splits it produced.
- dvc.lock hashes: the md5 of each dep of the stage, computed by DVC itself (``dvc.output.Output``, .dvcignore
  honoured) when the stage ends: the same computation, on the same files, that DVC writes into dvc.lock right
  after the stage exits. (The dvc.lock that exists while a stage runs holds the previous run's hashes, which
  are stale exactly when the stage re-runs.) Tags ``input.<path>`` and the artifact ``dvc/deps.json``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from overlock.compute import repo_root

if TYPE_CHECKING:
    from overlock.pipeline.context import StageContext

log = logging.getLogger(__name__)


class StageLog:
    """Tee of this process's stdout and stderr (the file descriptors, so child processes count) into a file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._lock = threading.Lock()
        self._pumps: list[tuple[int, int, threading.Thread]] = []  # (fd, saved copy, pump thread)

    def start(self) -> "StageLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        _flush_std()
        for fd in (1, 2):
            saved = os.dup(fd)
            read, write = _terminal_like(fd) if os.isatty(fd) else os.pipe()
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._pump, args=(read, saved), daemon=True, name=f"stage-log-{fd}")
            thread.start()
            self._pumps.append((fd, saved, thread))
        return self

    def _pump(self, read: int, saved: int) -> None:
        """Show what arrives at once; log it a whole line at a time, so that a line of stdout written in two
        pieces (``print`` writes the text, then the newline) is not split by a line of stderr in the file."""
        pending = b""
        try:
            while data := _read(read):
                with contextlib.suppress(OSError):
                    _write_all(saved, data)
                pending += data
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
                if cut == 0 and len(pending) > 1 << 16:  # a very long line: no reason to hold it further
                    cut = len(pending)
                if cut:
                    self._log(pending[:cut])
                    pending = pending[cut:]
        finally:
            self._log(pending)
            os.close(read)

    def _log(self, data: bytes) -> None:
        with self._lock:
            if data and self._file is not None:
                self._file.write(data)
                self._file.flush()

    def write(self, text: str) -> None:
        """Append ``text`` to the log file only (e.g. the traceback of a failed stage)."""
        self._log(text.encode())

    def stop(self) -> None:
        """Restore stdout/stderr; returns at once (a child process still holding the pipe keeps being shown,
        no longer logged)."""
        _flush_std()
        for fd, saved, _ in self._pumps:
            os.dup2(saved, fd)  # the pipe's last write end in this process goes: the pump sees EOF
        for _, saved, thread in self._pumps:
            thread.join(timeout=1.0)
            if not thread.is_alive():
                os.close(saved)
        self._pumps = []
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _terminal_like(fd: int) -> tuple[int, int]:
    """A pseudo-terminal (read end, write end) standing in for terminal ``fd``: what the stage writes still
    sees a terminal (progress bars, colours), with the terminal's size and no newline translation."""
    import fcntl
    import pty
    import termios
    master, slave = pty.openpty()
    with contextlib.suppress(OSError):
        fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # keep "\n" as written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # a pseudo-terminal whose last writer closed reads EIO: the end, as a pipe's b""
        return b""


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def dvc_dep_hashes(stage: str, root: Path | None = None) -> dict[str, dict]:
    """``{dep path: {"md5", "size", "nfiles"}}`` of ``stage`` as DVC computes them for dvc.lock ({} when the
    directory is no DVC repository or the stage is not in its dvc.yaml)."""
    root = Path(root or repo_root())
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return {}
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    hashes: dict[str, dict] = {}
    with Repo(str(root)) as repo:
        try:
            (dvc_stage,) = repo.stage.collect(stage)
        except Exception as err:  # not in dvc.yaml (a stage run by hand in another layout)
            log.warning("no dvc.lock hashes recorded: stage %s not found in %s: %s", stage, root, err)
            return {}
        for dep in dvc_stage.deps:
            if isinstance(dep, ParamsDependency) or not dep.exists:
                continue
            meta, info = dep._get_hash_meta()
            entry = {"md5": info.value, "size": meta.size}
            if meta.nfiles is not None:
                entry["nfiles"] = meta.nfiles
            hashes[dep.def_path] = entry
    return hashes


def _datasets_dir(ctx: "StageContext") -> tuple[Path, bool] | None:
    """(datasets root, produced by this stage) for a stage that declares ``datasets``."""
    spec = ctx.spec
    if not spec.datasets:
        return None
    option = spec.path(spec.datasets_path)
    return ctx.paths[option.name], option.role == "out"


def _log_datasets(ctx: "StageContext", root: Path, produced: bool) -> None:
    from overlock.data.datasets import split_records
    names = {"classification": ctx.params.data.dataset, "detection": ctx.params.data.detection_dataset}
    records = split_records(root, ctx.spec.datasets, names)
    if records:
        ctx.run.log_datasets(records, produced=produced)


def _safely(what: str, fn, *args) -> None:
    """Run a recording step; a failure is a warning, never the stage's failure."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - records must not fail a stage that did its work
        log.warning("%s not recorded: %s: %s", what, type(err).__name__, err)


def _log_dvc_deps(ctx: "StageContext") -> None:
    ctx.run.log_dvc_deps(dvc_dep_hashes(ctx.name))


@contextlib.contextmanager
def stage_records(ctx: "StageContext") -> Iterator[None]:
    """Record the stage's log, datasets and dvc.lock hashes into ``ctx.run`` (see the module docstring)."""
    path = ctx.state_dir / "logs" / ctx.run.run_id / f"{ctx.name}.log"
    stage_log = StageLog(path).start()
    datasets = _datasets_dir(ctx)
    try:
        if datasets and not datasets[1] and datasets[0].exists():
            _safely("datasets", _log_datasets, ctx, *datasets)
        yield
        if datasets and datasets[1]:
            _safely("datasets", _log_datasets, ctx, *datasets)
    except BaseException:
        stage_log.write(traceback.format_exc())
        raise
    finally:
        _safely("dvc.lock hashes", _log_dvc_deps, ctx)
        stage_log.stop()
        _safely("stage log", ctx.run.log_artifact, path, "logs")


__all__ = ["StageLog", "dvc_dep_hashes", "stage_records"]
