"""Your own data as sources of the download stage: a directory or an archive named in ``data.sources``.

``data.sources.folder`` (``data.dataset: folder``) and ``data.sources.coco_folder``
(``data.detection_dataset: coco_folder``) are a local directory, a local tar/tar.gz/zip archive, a ``file://``
URL, or an http(s) URL of an archive (which then needs a ``sha256``/``md5``). The value is a string, or
``{path: ..., sha256: ...}`` to pin the data: for an archive the checksum of the file, for a directory the
sha256 of its tree listing (the ``digest`` that ``data/archives/MANIFEST.json`` shows after a first run).

The download stage places each source at ``data/archives/<key>``: an archive as a symlink to it, a directory as
a tree of per-file symlinks (hidden files and folders left out). DVC follows file symlinks when it hashes
``data/archives``, so a changed or replaced image or archive shows up in ``dvc status`` and ``dvc repro``
re-runs download, extract and everything after. DVC cannot see a file added to a source directory through the
links, and stops on a deleted one: after adding or deleting files there, run ``dvc repro -f download``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from overlock.params import OWN_DATASETS
from overlock.state import file_digest, read_json, write_json_atomic

__all__ = ["OWN_DATASETS", "own_datasets", "tree_files", "tree_digest", "place_own_source", "OwnDataError"]


class OwnDataError(RuntimeError):
    """Your own data source is missing, unreadable or does not match its pinned checksum."""


def own_datasets(data) -> list[str]:
    """The own-data datasets (``folder``, ``coco_folder``) a ``data`` params section selects."""
    return [d for d in (data.dataset, data.detection_dataset) if d in OWN_DATASETS]


def tree_files(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under ``root`` (directory symlinks followed, no loops)."""
    root = Path(root)
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if not f.startswith(".") and Path(dirpath, f).is_file()]
    return sorted(out)


class _DigestMemo:
    """sha256 of files remembered by (real path, size, mtime), so a re-run does not re-read unchanged data."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict = read_json(self.path, {})
        self.dirty = False

    def sha256(self, file: Path) -> str:
        real = os.path.realpath(file)
        st = os.stat(real)
        rec = self.records.get(real)
        if rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
            return rec[2]
        digest = file_digest(Path(real), "sha256")
        self.records[real] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            write_json_atomic(self.path, self.records)


def tree_digest(root: Path, files: list[str], memo: _DigestMemo | None = None) -> tuple[str, int]:
    """(sha256 of the ``path size sha256`` listing of ``files`` under ``root``, total bytes)."""
    h, total = hashlib.sha256(), 0
    for rel in files:
        full = Path(root) / rel
        size = full.stat().st_size
        digest = memo.sha256(full) if memo else file_digest(full, "sha256")
        h.update(f"{rel}\t{size}\t{digest}\n".encode())
        total += size
    return h.hexdigest(), total


def _replace(tmp: Path, dest: Path) -> None:
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _check_pin(key: str, what: str, algo: str, expected: str | None, actual: str) -> None:
    if expected and expected.lower() != actual:
        raise OwnDataError(f"data.sources.{key}: {what} does not match its pinned {algo} {expected} (it is "
                           f"{actual}). The data changed: if on purpose, set data.sources.{key}.{algo} to {actual} "
                           f"(or drop it); otherwise restore the data.")


def place_own_source(key: str, spec, out: Path, state: Path, retries: int = 5) -> dict:
    """Verify own-data source ``spec`` (:class:`~overlock.params.SourceParams`) and place it at ``out/key``.

    Returns the manifest entry (dataset, role, kind, algo, digest, size, files, source).
    """
    from overlock.data.download import _local_path, fetch_archive

    dest = Path(out) / key
    algo = "md5" if spec.md5 and not spec.sha256 else "sha256"
    pinned = spec.sha256 or spec.md5
    entry = {"dataset": key, "role": "data", "source": spec.path, "algo": algo}
    local = _local_path(spec.path)
    if local is None:  # http(s): an archive, fetched and verified like a published one
        if not pinned:
            raise OwnDataError(f"data.sources.{key} is a URL ({spec.path}) without a checksum; give one so a "
                               f"changed file is noticed: data.sources.{key}: {{path: {spec.path}, sha256: ...}} "
                               f"(or download it and give the local path)")
        fetch_archive(spec.path, dest, algo, pinned, retries, cache_dir=state / "archives")
        return {**entry, "kind": "archive", "digest": pinned.lower(), "size": dest.stat().st_size, "files": 1}
    local = local.absolute()
    if not local.exists():
        raise OwnDataError(f"data.sources.{key}: {local} does not exist. Set data.sources.{key} in params.yaml to "
                           f"the directory or tar/tar.gz/zip archive of your data.")
    memo = _DigestMemo(state / "own_data_sha256.json")
    tmp = dest.with_name(f".{key}.tmp{os.getpid()}")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    if local.is_dir():
        files = tree_files(local)
        if not files:
            raise OwnDataError(f"data.sources.{key}: {local} holds no files. Point it at the folder that holds "
                               f"train/ and val/.")
        if algo != "sha256":
            raise OwnDataError(f"data.sources.{key}: a directory is pinned by the sha256 of its tree listing; "
                               f"use sha256, not md5")
        digest, total = tree_digest(local, files, memo)
        memo.save()
        _check_pin(key, f"the directory {local}", algo, pinned, digest)
        for rel in files:
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(local / rel, link)
        _replace(tmp, dest)
        return {**entry, "kind": "directory", "digest": digest, "size": total, "files": len(files)}
    digest = memo.sha256(local) if algo == "sha256" else file_digest(local, "md5")
    memo.save()
    _check_pin(key, f"the archive {local}", algo, pinned, digest)
    os.symlink(local, tmp)
    _replace(tmp, dest)
    return {**entry, "kind": "archive", "digest": digest, "size": local.stat().st_size, "files": 1}
