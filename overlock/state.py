"""Resumable state outside DVC outs: ``.overlock/state/<stage>/<hash of the stage's params and deps>/``.

DVC deletes a stage's outs before it runs, so checkpoints a killed run resumes from live here. The hash
covers the params the stage reads, so a changed param (say ``model.size``) never resumes another
configuration's checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from overlock.compute import repo_root
from overlock.params import Params

STATE_ROOT = ".overlock/state"


def stage_state_dir(stage: str, params: Params, sections: tuple[str, ...], extra: str = "",
                    root: Path | None = None) -> Path:
    """Create and return the state directory of ``stage`` for this configuration."""
    key = params.section_hash("seed", *sections)
    if extra:  # e.g. the hash of the stage's input data
        key = hashlib.sha256((key + extra).encode()).hexdigest()[:16]
    path = (root or repo_root()) / STATE_ROOT / stage / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: Path, algo: str = "md5") -> str:
    """Hex digest (``md5``, ``sha256``, ...) of a file, read in chunks, with a progress bar for large files."""
    chunk_size = 8 << 20
    h = hashlib.new(algo)
    size = Path(path).stat().st_size
    with Path(path).open("rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"{algo} {Path(path).name}",
                                           disable=None if size > 32 * chunk_size else True, leave=False) as bar:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so a kill never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_csv_atomic(path: Path, rows: list[dict], columns: Sequence[str]) -> Path:
    """Write ``rows`` (only ``columns``) as CSV through a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def read_json(path: Path, default: Any = None) -> Any:
    """Read JSON, or return ``default`` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def replace_dir_atomic(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory to ``final`` (replacing it), never leaving a partial out."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``final``; it replaces ``final`` only when the block ends
    without an error, so a failed or killed stage never leaves a partial output that looks valid."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging"  # a fixed name: what a killed run left is cleared here
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        replace_dir_atomic(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
