"""The ``download`` stage: fetch each archive of the selected datasets and verify its checksum.

Sources (``data.sources`` or the built-in URLs): ``http(s)://`` URLs (resumed with HTTP Range, retried
with exponential backoff), ``file://`` URLs and local paths (verified in place, then hard-linked or
symlinked, never copied). Transfers go to a ``.partial`` name in the state directory
(``.overlock/state/download/``) and are renamed only once their md5/sha256 matches, so a partial download
survives DVC deleting ``data/archives`` and a wrong file never lands at the final name. Verified files are
remembered by (path, size, mtime), so a re-run does no work. The demo archives are generated into the state
directory with their sha256 and then "downloaded" from ``file://`` like any other archive. Your own data
(``data.dataset: folder``, ``data.detection_dataset: coco_folder``) is placed by
:mod:`overlock.data.own_sources`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from overlock.data import demo
from overlock.data.own_sources import OWN_DATASETS, own_datasets, place_own_source
from overlock.data.sources import (DEMO_ARCHIVES, LOGIN_REQUIRED, ArchiveSpec, published_archives,
                                   published_specs, selected_datasets)
from overlock.state import STATE_ROOT, file_digest, read_json, write_json_atomic

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"
BACKOFF_SECONDS = 0.5
BACKOFF_MAX = 30.0
CHUNK = 1 << 20
HTTP_TIMEOUT = 60


class DownloadError(RuntimeError):
    """An archive could not be fetched; the message names the archive, the source and the fix."""


class ChecksumError(DownloadError):
    """A fetched archive does not match its published checksum (the file was deleted)."""


class _Retryable(Exception):
    pass


# ------------------------------------------------------------------------------------------ checksums
class VerifiedFiles:
    """Remembers files whose checksum matched, keyed by real path, size and mtime (re-hashing 140 GB is slow)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict = read_json(self.path, {})

    @staticmethod
    def _stat(path: Path) -> dict:
        st = Path(path).resolve().stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def is_verified(self, path: Path, algo: str, digest: str) -> bool:
        rec = self.records.get(str(Path(path).resolve()))
        return bool(rec) and rec.get(algo) == digest and Path(path).exists() and \
            {k: rec[k] for k in ("size", "mtime_ns")} == self._stat(path)

    def verify(self, path: Path, algo: str, digest: str) -> bool:
        """True when ``path`` matches (hashing only when not remembered); records a match."""
        if self.is_verified(path, algo, digest):
            return True
        if file_digest(path, algo) != digest.lower():
            return False
        self.records[str(Path(path).resolve())] = {**self._stat(path), algo: digest.lower()}
        write_json_atomic(self.path, self.records)
        return True

    def record(self, path: Path, algo: str, digest: str) -> None:
        """Remember ``path`` as verified without hashing (a link to a file that was just verified)."""
        self.records[str(Path(path).resolve())] = {**self._stat(path), algo: digest.lower()}
        write_json_atomic(self.path, self.records)


# ------------------------------------------------------------------------------------------ transfers
def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_SECONDS * 2 ** attempt)


def _http_once(url: str, partial: Path, name: str) -> None:
    """One HTTP attempt: resume ``partial`` with a Range request; raise _Retryable on transient errors."""
    have = partial.stat().st_size if partial.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "overlock-pipeline", **(
        {"Range": f"bytes={have}-"} if have else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch: the partial file is complete
            return
        if err.code in (408, 425, 429) or err.code >= 500:
            raise _Retryable(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"downloading {name} from {url} failed: HTTP {err.code} {err.reason}. Check the "
                            f"URL (set data.sources.{name} to a working URL or a local path).") from None
    except (urllib.error.URLError, OSError, HTTPException) as err:
        raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
    with resp:
        if resp.status == 206:
            start = int(resp.headers.get("Content-Range", f"bytes {have}-").split()[1].split("-")[0])
            if start != have:
                raise _Retryable(f"server resumed at byte {start}, expected {have}")
            mode, total = "ab", have + int(resp.headers.get("Content-Length", 0) or 0)
        else:  # 200: the server ignores Range (or there was nothing to resume): start over
            have, mode = 0, "wb"
            total = int(resp.headers.get("Content-Length", 0) or 0)
        with partial.open(mode) as fh, tqdm(total=total or None, initial=have, unit="B", unit_scale=True,
                                            desc=name, disable=None, leave=False) as bar:
            try:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except (OSError, HTTPException) as err:
                raise _Retryable(f"transfer cut: {type(err).__name__}") from None
        if total and partial.stat().st_size < total:
            raise _Retryable(f"transfer cut at {partial.stat().st_size} of {total} bytes")


def http_download(url: str, partial: Path, name: str, retries: int) -> int:
    """Fetch ``url`` into ``partial`` (resuming it), retrying transient failures; return attempts used."""
    for attempt in range(retries + 1):
        try:
            _http_once(url, partial, name)
            return attempt + 1
        except _Retryable as err:
            if attempt == retries:
                raise DownloadError(f"downloading {name} from {url} failed after {retries + 1} attempts "
                                    f"({err}); the partial file {partial} is kept and the next run resumes it. "
                                    f"Raise data.download_retries or check the network.") from None
            wait = _backoff(attempt)
            log.warning("%s: %s; retrying in %.1fs (%d/%d)", name, err, wait, attempt + 1, retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _local_path(source: str) -> Path | None:
    if source.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
    if "://" not in source:
        return Path(source).expanduser()
    return None


def _link(src: Path, dest: Path) -> str:
    """Place ``src`` at ``dest`` by hard link, else symlink (other file system); atomic via a temp name."""
    tmp = dest.with_name(f".{dest.name}.link{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        how = "hardlink"
    except OSError:
        os.symlink(src.resolve(), tmp)
        how = "symlink"
    os.replace(tmp, dest)
    return how


def fetch_archive(source: str, dest: Path, algo: str, digest: str, retries: int = 5,
                  cache_dir: Path | None = None, verified: VerifiedFiles | None = None) -> str:
    """Make ``dest`` a verified copy of ``source``; return what was done.

    ``source``: http(s) URL, ``file://`` URL or local path. HTTP downloads go to ``cache_dir`` (a state
    directory that outlives ``dest``'s directory) as ``<name>.partial``, are verified and renamed, then
    linked to ``dest``. Local files are verified in place and linked. Returns ``"skipped"`` (already there
    and verified), ``"linked"`` (from a verified cached or local file), ``"downloaded"`` or ``"resumed"``.
    Raises :class:`ChecksumError` (nothing left at ``dest``) or :class:`DownloadError`.
    """
    dest = Path(dest)
    name = dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else dest.parent / ".partial"
    verified = verified or VerifiedFiles(cache_dir / "verified.json")
    if dest.exists() and verified.is_verified(dest, algo, digest):
        return "skipped"
    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"source of {name} not found: {local}. Set data.sources.{name} in params.yaml "
                                f"to the path of the archive (or a URL).")
        if not verified.verify(local, algo, digest):
            raise ChecksumError(f"{local} does not match the {algo} checksum of {name} ({digest}): it is not the "
                                f"expected archive or it is damaged. Replace it with the official file.")
        _link(local, dest)
        verified.record(dest, algo, digest)
        return "linked"
    if not source.startswith(("http://", "https://")):
        raise DownloadError(f"unsupported source for {name}: {source!r}; use http(s)://, file:// or a local path")
    cached = cache_dir / digest[:16] / name
    cached.parent.mkdir(parents=True, exist_ok=True)
    action = "linked"
    if not (cached.exists() and verified.verify(cached, algo, digest)):
        partial = cached.with_name(name + ".partial")
        action = "resumed" if partial.exists() and partial.stat().st_size else "downloaded"
        http_download(source, partial, name, retries)
        actual = file_digest(partial, algo)
        if actual != digest.lower():
            partial.unlink(missing_ok=True)
            raise ChecksumError(f"checksum mismatch for {name} from {source}: expected {algo} {digest}, got "
                                f"{actual}. The download was deleted; check data.sources.{name} points at the "
                                f"official archive and run the stage again.")
        os.replace(partial, cached)
        verified.verify(cached, algo, digest)
    _link(cached, dest)
    verified.record(dest, algo, digest)
    return action


# ------------------------------------------------------------------------------------------ the stage
def download_state_dir() -> Path:
    """``<repo>/.overlock/state/download`` (archives, partial transfers, generated demo data)."""
    from overlock.compute import repo_root
    path = repo_root() / STATE_ROOT / "download"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_archive_specs(name: str, params, state: Path) -> list[ArchiveSpec]:
    """Generate (once per seed, demo params and generator version) the demo archives; return their specs."""
    key_blob = json.dumps({"name": name, "seed": params.seed, "demo": params.data.demo.model_dump(),
                           "generator": hashlib.sha256(Path(demo.__file__).read_bytes()).hexdigest()},
                          sort_keys=True)
    gen_dir = state / f"{name}-{hashlib.sha256(key_blob.encode()).hexdigest()[:16]}"
    sums = read_json(gen_dir / "sha256.json")
    if sums is None:
        tmp = gen_dir.with_name(gen_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating the %s archives (seed %d)", name, params.seed)
        sums = demo.write_demo_archives(name, params.data.demo, params.seed, tmp)
        write_json_atomic(tmp / "sha256.json", sums)
        shutil.rmtree(gen_dir, ignore_errors=True)
        os.replace(tmp, gen_dir)
    return [ArchiveSpec(dataset=name, role=role, file=file, url=(gen_dir / file).resolve().as_uri(),
                        sha256=sums[file]) for role, file in DEMO_ARCHIVES[name].items()]


def archive_specs(params, state: Path) -> list[ArchiveSpec]:
    """The archives of the selected datasets (demo archives are generated into ``state``)."""
    specs: list[ArchiveSpec] = []
    for name in selected_datasets(params.data):
        if name in OWN_DATASETS:  # placed by own_sources.place_own_source
            continue
        specs += demo_archive_specs(name, params, state) if name in DEMO_ARCHIVES else published_specs(name)
    return specs


def _check_sources(params, specs: list[ArchiveSpec]) -> None:
    known = {e["file"] for k, d in published_archives().items() if not k.startswith("_") for e in d.values()}
    known |= {f for d in DEMO_ARCHIVES.values() for f in d.values()} | set(OWN_DATASETS)
    stray = sorted(set(params.data.unverified_archives) - {s.file for s in specs})
    if stray:
        raise DownloadError(f"data.unverified_archives names {stray}, which the selected datasets do not use; "
                            f"valid: {', '.join(s.file for s in specs)}")
    unknown = sorted(set(params.data.sources) - known)
    if unknown:
        raise DownloadError(f"data.sources names unknown archive(s) {unknown}; the keys are archive file names, "
                            f"e.g. {', '.join(s.file for s in specs) or 'ILSVRC2012_img_val.tar'}, or "
                            f"{' / '.join(OWN_DATASETS)} for your own data")
    for s in specs:
        given = params.data.source(s.file)
        if given is not None and (given.sha256 or given.md5):
            algo, digest = s.checksum
            mine = given.sha256 if algo == "sha256" else given.md5
            if (mine or "").lower() != digest.lower():
                raise DownloadError(f"data.sources.{s.file} gives a checksum, but {s.file} is a published archive "
                                    f"checked against its published {algo} {digest}; drop the checksum")
    missing = [s for s in specs if not (params.data.sources.get(s.file) or s.url)]
    if missing:
        lines = "\n".join(f"  {s.file}: /path/to/{s.file}" for s in missing)
        login = " (ImageNet needs a login at image-net.org: download the archives yourself)" \
            if any(s.dataset in LOGIN_REQUIRED for s in missing) else ""
        raise DownloadError(f"no source for {', '.join(s.file for s in missing)}{login}. Add to params.yaml:\n"
                            f"data:\n  sources:\n{lines}")


def unverified_checksum(params, file: str, source: str) -> tuple[str, str] | None:
    """("sha256", digest of the local ``source``) when ``file`` is in ``data.unverified_archives``, else None.

    The archive is then accepted without its published checksum: a rehearsal with generated archives
    (``benchmarks/scale_rehearsal.py``). Only a local file can be accepted so; it is logged as a warning.
    """
    if file not in params.data.unverified_archives:
        return None
    local = _local_path(source)
    if local is None or not local.is_file():
        raise DownloadError(f"data.unverified_archives lists {file}, but its source {source!r} is not a local file; "
                            f"only local archives can be accepted without the published checksum")
    digest = file_digest(local, "sha256")
    log.warning("UNVERIFIED ARCHIVE: %s (%s) is accepted WITHOUT its published checksum because "
                "data.unverified_archives lists it (sha256 %s). Remove it from data.unverified_archives for real "
                "data.", file, local, digest)
    return "sha256", digest


def run_download(params, run, out: Path) -> dict:
    """Stage ``download``: fetch and verify every archive of the selected datasets into ``out``.

    Writes ``out/MANIFEST.json`` (file -> dataset, role, checksum, size, source) last, logs counts and the
    manifest to ``run``, and returns ``{"archives": {file: action}, "bytes": total size}``.
    """
    out = Path(out)
    state = download_state_dir()
    specs = archive_specs(params, state)
    _check_sources(params, specs)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # present only when every archive is verified
    verified = VerifiedFiles(state / "verified.json")
    actions, manifest = {}, {}
    for spec in tqdm(specs, desc="archives", unit="archive", disable=None):
        given = params.data.source(spec.file)
        source = given.path if given else spec.url
        algo, digest = unverified_checksum(params, spec.file, source) or spec.checksum
        actions[spec.file] = fetch_archive(source, out / spec.file, algo, digest, params.data.download_retries,
                                           cache_dir=state / "archives", verified=verified)
        log.info("%s: %s", spec.file, actions[spec.file])
        manifest[spec.file] = {"dataset": spec.dataset, "role": spec.role, "algo": algo, "digest": digest,
                               "size": (out / spec.file).stat().st_size, "source": source}
        if spec.file in params.data.unverified_archives:
            manifest[spec.file]["unverified"] = True
    for key in tqdm(own_datasets(params.data), desc="your own data", unit="source", disable=None):
        manifest[key] = place_own_source(key, params.data.source(key), out, state, params.data.download_retries)
        actions[key] = "linked"
        log.info("%s: %s %s (%d files, sha256 %s)", key, manifest[key]["kind"], manifest[key]["source"],
                 manifest[key]["files"], manifest[key]["digest"])
    for stale in out.iterdir():  # archives of another configuration (links; the state copies are kept)
        if stale.name not in manifest and stale.name != MANIFEST and (stale.is_file() or stale.is_symlink()):
            stale.unlink()
        elif stale.name not in manifest and stale.name in OWN_DATASETS and stale.is_dir():
            shutil.rmtree(stale)  # an own-data link tree of another configuration
    write_json_atomic(out / MANIFEST, manifest)
    total = sum(m["size"] for m in manifest.values())
    counts = {a: sum(v == a for v in actions.values()) for a in ("downloaded", "resumed", "linked", "skipped")}
    run.log_summary({"archives": len(manifest), "archive_bytes": total,
                     **{f"archives_{k}": v for k, v in counts.items()}})
    run.log_dict(manifest, "download/manifest.json")
    if params.data.unverified_archives:
        run.set_tags({"download.unverified_archives": ",".join(params.data.unverified_archives)})
    print(f"download: {len(manifest)} archives verified ({total / 1e6:.1f} MB): "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if v), file=sys.stderr)
    return {"archives": actions, "bytes": total}
