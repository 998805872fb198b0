"""``data/datasets/MANIFEST.json``: what the extract stage wrote, file by file; DVC tracks it instead of the tree.

DVC hashes every file of a directory it tracks (even with ``cache: false``), which at ImageNet size (1.33 M
files) makes a no-op ``dvc status`` take minutes. The extract stage therefore declares this one file as its
output and the training stages depend on it; the tree itself is not a DVC out (and is in ``.dvcignore``).
The manifest lists every file with its size and md5 (the md5 of an image comes from the same read as its
verification; an image that is never read by training, e.g. the ImageNet-1K images outside ImageNet-100,
has ``null``), so the manifest, and with it every downstream stage, changes when the extracted data does.

What DVC no longer sees is a file changed by hand inside the tree: :func:`check_tree` finds it instead
(sizes, file list and modification times against the manifest: a ``stat`` per file, no reading), and the
stage entry points run it before a stage reads the data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from overlock.state import file_digest, write_json_atomic

__all__ = ["MANIFEST", "write_manifest", "read_manifest", "check_tree", "DatasetChangedError"]

MANIFEST = "MANIFEST.json"
_NOT_LISTED = {MANIFEST, ".complete.json"}  # the manifest itself; extract's completion marker (written after)
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DatasetChangedError(ValueError):
    """The extracted tree differs from its manifest (edited, added or removed by hand)."""


def _walk(root: Path):
    """(relative posix path, absolute path, stat) of every file under ``root`` (symlinked folders followed)."""
    root = Path(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        rel_folder = os.path.relpath(folder, root)
        for name in sorted(files):
            if rel_folder == "." and name in _NOT_LISTED:
                continue
            path = os.path.join(folder, name)
            rel = name if rel_folder == "." else f"{rel_folder}/{name}".replace(os.sep, "/")
            yield rel, path, os.stat(path)


def write_manifest(root: Path, digests: dict[str, str] | None = None) -> dict:
    """Write ``<root>/MANIFEST.json`` ({relative path: [size, md5 or null]}); ``digests``: {real path: md5}
    already computed (verified images). Other files are hashed here, except images nobody verified."""
    digests = digests or {}
    entries, total = {}, 0
    for rel, path, st in _walk(root):
        digest = digests.get(os.path.realpath(path))
        if digest is None and not rel.lower().endswith(_IMAGE_SUFFIXES):
            digest = file_digest(Path(path))
        entries[rel] = [st.st_size, digest]
        total += st.st_size
    manifest = {"format": 1, "files": len(entries), "bytes": total, "entries": entries}
    write_json_atomic(Path(root) / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path) -> dict | None:
    """The manifest of ``root`` (None when there is none)."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_tree(root: Path, shown: int = 5) -> int:
    """Check ``root`` against its manifest: the same files, the same sizes, none modified after the manifest
    was written. Returns the number of files checked (0 when there is no manifest: a tree not written by the
    extract stage is not checked); raises :class:`DatasetChangedError` naming the files and the fix."""
    root = Path(root)
    manifest_path = root / MANIFEST
    manifest = read_manifest(root)
    if manifest is None:
        return 0
    written = manifest_path.stat().st_mtime_ns
    expected = manifest["entries"]
    changed, added, seen = [], [], set()
    for rel, _, st in _walk(root):
        entry = expected.get(rel)
        if entry is None:
            added.append(rel)
            continue
        seen.add(rel)
        if st.st_size != entry[0] or st.st_mtime_ns > written:
            changed.append(rel)
    removed = [rel for rel in expected if rel not in seen]
    if changed or added or removed:
        parts = [f"{len(files)} {what} (e.g. {', '.join(files[:shown])})"
                 for what, files in (("changed", changed), ("added", added), ("removed", removed)) if files]
        raise DatasetChangedError(
            f"{root} differs from {manifest_path}, which the extract stage wrote: {'; '.join(parts)}. DVC tracks "
            f"the manifest, not the files, so it does not see such edits: rebuild the tree with "
            f"`dvc repro -f extract` (or restore the files). To use changed data, change the source instead "
            f"(data.sources / your own data folder) and run `dvc repro`.")
    return len(expected)
