"""The ``extract`` stage: safe extraction of tar/zip archives, then the standard layouts.

Safe extraction checks every member before anything is written: absolute paths, ``..`` components, links
that point outside the target and device/FIFO members are rejected with an error naming the archive and the
member. Tar extraction then also runs with Python's ``data`` filter as a second line of defence.

The stage builds the layouts (:mod:`overlock.data.layouts`) in a state directory (resumable: finished
classes and archives are not extracted again after a kill), writes the splits and the integrity report,
and moves the finished tree to ``out`` in one rename, so ``out`` never holds a partial dataset that looks
valid. The tree's ``MANIFEST.json`` (:mod:`overlock.data.manifest`) is what DVC tracks as the output. A re-run
on unchanged archives and params does no work unless the tree no longer matches its manifest.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from overlock.data.manifest import MANIFEST, DatasetChangedError, check_tree
from overlock.state import read_json, replace_dir_atomic, stage_state_dir, write_json_atomic

log = logging.getLogger(__name__)
COMPLETE = ".complete.json"


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the target (or is a device file); nothing was extracted."""


class ArchiveError(ValueError):
    """An archive is missing, unreadable or does not hold what its dataset needs."""


# ------------------------------------------------------------------------------------ member checks
def _check_name(name: str, archive: str) -> None:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract the "
                                 f"archive (nothing was written). Use an archive with relative member paths.")
    if ".." in PurePosixPath(norm).parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..' and would be written outside the "
                                 f"target; refusing to extract the archive (nothing was written).")


def _inside(target: Path, path: str) -> bool:
    root = os.path.normpath(os.path.abspath(target))
    full = os.path.normpath(os.path.join(root, path))
    return full == root or full.startswith(root + os.sep)


def _check_link(name: str, link: str, target: Path, archive: str, relative_to_member: bool) -> None:
    dest = os.path.join(os.path.dirname(name), link) if relative_to_member else link
    if os.path.isabs(link) or not _inside(target, dest):
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a link to {link!r}, outside the target; "
                                 f"refusing to extract the archive (nothing was written).")


def check_tar_members(tar: tarfile.TarFile, target: Path, archive: str) -> list[tarfile.TarInfo]:
    """Validate every member of ``tar`` for extraction into ``target``; return the members."""
    members = tar.getmembers()
    for m in members:
        _check_name(m.name, archive)
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO file; refusing to "
                                     f"extract the archive (nothing was written).")
        if m.issym():
            _check_link(m.name, m.linkname, target, archive, relative_to_member=True)
        elif m.islnk():
            _check_link(m.name, m.linkname, target, archive, relative_to_member=False)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} has an unsupported type; refusing to extract.")
    return members


def check_zip_members(zf: zipfile.ZipFile, target: Path, archive: str) -> list[zipfile.ZipInfo]:
    """Validate every member of ``zf`` (names and symlink entries) for extraction into ``target``."""
    infos = zf.infolist()
    for info in infos:
        _check_name(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            _check_link(info.filename, zf.read(info).decode("utf-8", "replace"), target, archive, True)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device or FIFO file; refusing "
                                     f"to extract the archive (nothing was written).")
    return infos


def safe_extract_tar(tar: tarfile.TarFile, target: Path, archive: str = "archive") -> list[str]:
    """Check all members of an open tar, then extract it into ``target`` (``data`` filter); return names."""
    target = Path(target)
    members = check_tar_members(tar, target, archive)
    target.mkdir(parents=True, exist_ok=True)
    tar.extractall(target, members=members, filter="data")
    return [m.name for m in members if m.isfile()]


def safe_extract(archive: Path, target: Path, members: list[str] | None = None) -> list[str]:
    """Safely extract a tar, tar.gz or zip archive into ``target``; return the extracted file names.

    ``members``: only these names (zip) / the whole archive when None. Raises :class:`UnsafeArchiveError`
    before anything is written when any member is unsafe, :class:`ArchiveError` when unreadable.
    """
    archive, target = Path(archive), Path(target)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = check_zip_members(zf, target, archive.name)
                wanted = [i for i in infos if members is None or i.filename in members]
                target.mkdir(parents=True, exist_ok=True)
                for info in wanted:
                    zf.extract(info, target)
                return [i.filename for i in wanted if not i.is_dir()]
        with tarfile.open(archive) as tar:
            return safe_extract_tar(tar, target, archive.name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise ArchiveError(f"{archive} is not a readable tar or zip archive ({type(err).__name__}: {err}); "
                           f"delete it and run the download stage again.") from None


# ------------------------------------------------------------------------- archives of archives, in parallel
class _MemberFile(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``offset`` of a file (an uncompressed tar member)."""

    def __init__(self, path: Path, offset: int, size: int):
        super().__init__()
        self._fh, self._offset, self._size, self._pos = open(path, "rb"), offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        self._fh.seek(self._offset + self._pos)
        got = self._fh.readinto(memoryview(buf)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()
        super().close()


def _extract_inner_tar(job: tuple[str, str, int, int, str, str]) -> int:
    """Extract one inner tar (by its byte range in the outer tar) into ``final`` via a temp dir; file count."""
    outer, name, offset, size, final, label = job
    final_dir = Path(final)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _MemberFile(Path(outer), offset, size) as fh, tarfile.open(fileobj=fh, mode="r:") as inner:
        count = len(safe_extract_tar(inner, tmp, f"{label}:{name}"))
    os.replace(tmp, final_dir)
    return count


def extract_inner_tars(outer: Path, members: list[tarfile.TarInfo], finals: list[Path],
                       workers: int | None = None) -> int:
    """Extract the uncompressed inner tars ``members`` of the tar ``outer`` (e.g. ImageNet's per-class tars),
    member ``k`` into directory ``finals[k]``, in parallel over ``workers`` processes (default: every CPU).

    Each process reads its member's byte range of ``outer`` directly (no copy of the member), extracts it safely
    into a temporary sibling directory and renames that into place, so a finished directory is complete; ones
    that already exist (an earlier, killed run) are skipped. Returns the number of files extracted.
    """
    try:  # the byte ranges are only meaningful in an uncompressed outer tar
        tarfile.open(outer, "r:").close()
    except tarfile.ReadError:
        raise ArchiveError(f"{Path(outer).name} is a compressed tar; an archive of per-class tars (like "
                           f"ILSVRC2012_img_train.tar) must be an uncompressed tar") from None
    jobs = [(str(outer), m.name, m.offset_data, m.size, str(f), Path(outer).name)
            for m, f in zip(members, finals) if not Path(f).is_dir()]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(jobs)))
    progress = tqdm(total=len(jobs), desc="extract inner tars", unit="tar", disable=None)
    total = 0
    try:
        if workers == 1:
            for job in jobs:
                total += _extract_inner_tar(job)
                progress.update(1)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for count in pool.map(_extract_inner_tar, jobs):
                    total += count
                    progress.update(1)
    finally:
        progress.close()
    return total


# ---------------------------------------------------------------------------------------- the stage
def _move_dir(staging: Path, out: Path) -> None:
    try:
        replace_dir_atomic(staging, out)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        near = out.with_name(f".{out.name}.incoming")
        shutil.rmtree(near, ignore_errors=True)
        shutil.move(str(staging), near)  # other file system: copy next to out, then rename
        replace_dir_atomic(near, out)


def _fingerprint(params, manifest: dict) -> str:
    blob = json.dumps({"archives": {f: m["digest"] for f, m in sorted(manifest.items())},
                       "seed": params.seed, "data": params.data.model_dump(mode="json", exclude={"sources"})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(archives: Path) -> dict:
    """The download stage's ``MANIFEST.json`` with each listed archive checked to be present."""
    from overlock.data.download import MANIFEST
    manifest = read_json(Path(archives) / MANIFEST)
    if manifest is None:
        raise ArchiveError(f"{Path(archives) / MANIFEST} not found: run the download stage first "
                           f"(python -m stages.download --params params.yaml --out {archives}).")
    for file, entry in manifest.items():
        path = Path(archives) / file
        if entry.get("kind") == "directory":  # own data: a tree of links (DVC hashes what they point at)
            changed = not path.is_dir()
        else:
            changed = not path.exists() or path.stat().st_size != entry["size"]
        if changed:
            raise ArchiveError(f"archive {path} is missing or changed since it was verified; run the download "
                               f"stage again.")
    return manifest


def _manifest_intact(out: Path, state: Path) -> bool:
    """True when ``out`` matches its manifest (restored from the state directory when DVC removed it)."""
    if not (out / MANIFEST).exists() and (state / MANIFEST).exists():
        shutil.copy2(state / MANIFEST, out / MANIFEST)  # keeps its time: files edited since still show
    try:
        return check_tree(out) > 0
    except DatasetChangedError as err:
        log.warning("extract: rebuilding %s: %s", out, err)
        return False


def run_extract(params, run, archives: Path, out: Path, metrics: Path) -> dict:
    """Stage ``extract``: build the selected datasets' layouts from ``archives`` into ``out``.

    Writes ``out/classification`` and/or ``out/detection`` (with ``splits.json`` / ``splits/*.json``),
    ``out/integrity_report.json``, the DVC metrics JSON ``metrics`` and logs counts plus the report (and a
    per-class chart) to ``run``. Returns the integrity report (``"skipped": True`` when nothing changed).
    """
    from overlock.data import layouts
    from overlock.data.own_sources import own_datasets
    from overlock.tracking import flatten, write_metrics_file
    archives, out = Path(archives), Path(out)
    manifest = read_manifest(archives)
    key = _fingerprint(params, manifest)
    done = read_json(out / COMPLETE)
    state = stage_state_dir("extract", params, ("data",), extra=key)
    skipped = bool(done) and done.get("fingerprint") == key and (out / layouts.REPORT).exists() \
        and _manifest_intact(out, state)
    if skipped:
        log.info("extract: %s is up to date with the archives; nothing to do", out)
    else:
        if out.exists():  # a dataset of other archives or params: gone before the rebuild, so a failed
            log.info("extract: removing the out-of-date %s", out)  # rebuild leaves nothing that looks valid
            shutil.rmtree(out)
        staging = state / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            layouts.build_all(params, archives, manifest, staging)
        except Exception:
            if own_datasets(params.data):  # nothing to resume (links are cheap): leave no partial tree behind
                shutil.rmtree(staging.parent, ignore_errors=True)
            raise
        write_json_atomic(staging / COMPLETE, {"fingerprint": key})
        shutil.copy2(staging / MANIFEST, state / MANIFEST)  # DVC deletes the out before a re-run: kept here
        _move_dir(staging, out)
    report = read_json(out / layouts.REPORT)
    flat = layouts.report_metrics(report)
    write_metrics_file(metrics, flat)
    run.log_summary({k.replace("/", "."): float(v) for k, v in flatten(flat).items()
                     if isinstance(v, (int, float))})
    run.log_artifact(out / layouts.REPORT, "extract")
    for png in sorted(out.glob("integrity_*.png")):
        run.log_artifact(png, "extract")
    run.set_tags({"extract.skipped": str(skipped).lower()})
    print(f"extract: {json.dumps(flat)}", file=sys.stderr)
    return {**report, "skipped": skipped}

