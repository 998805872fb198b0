"""Safe extraction: crafted tar/zip archives with unsafe members are rejected before anything is written."""
from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from overlock.data.extract import ArchiveError, UnsafeArchiveError, safe_extract


def _tar(path: Path, members: list[tuple[str, str, bytes | str]]) -> Path:
    """members: (kind, name, data-or-link) with kind in file/symlink/hardlink/chr/fifo."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tar.addfile(info)
    return path


def _zip(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


UNSAFE_TARS = {
    "dotdot": ([("file", "ok.txt", b"ok"), ("file", "sub/../../evil.txt", b"x")], "sub/../../evil.txt"),
    "absolute": ([("file", "ok.txt", b"ok"), ("file", "/tmp/overlock-evil.txt", b"x")], "/tmp/overlock-evil.txt"),
    "symlink_out": ([("symlink", "link", "../../outside"), ("file", "link/evil.txt", b"x")], "link"),
    "symlink_abs": ([("file", "ok.txt", b"ok"), ("symlink", "etc", "/etc")], "etc"),
    "hardlink_out": ([("hardlink", "hl", "../outside.txt")], "hl"),
    "device": ([("file", "ok.txt", b"ok"), ("chr", "dev/null", b"")], "dev/null"),
    "fifo": ([("fifo", "pipe", b"")], "pipe"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TARS))
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_unsafe_tar_rejected_and_nothing_written(tmp_path, case, suffix):
    members, bad = UNSAFE_TARS[case]
    archive = _tar(tmp_path / f"crafted{suffix}", members)
    before = sorted(tmp_path.rglob("*"))
    target = tmp_path / "a" / "b" / "target"
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, target)
    assert repr(bad) in str(err.value) and archive.name in str(err.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the target directory
    assert not Path("/tmp/overlock-evil.txt").exists()


UNSAFE_ZIPS = {
    "dotdot": ([("ok.txt", b"ok", 0o100644), ("../evil.txt", b"x", 0o100644)], "../evil.txt"),
    "absolute": ([("/tmp/overlock-evil.txt", b"x", 0o100644)], "/tmp/overlock-evil.txt"),
    "symlink_out": ([("ok.txt", b"ok", 0o100644), ("link", b"../../outside", stat.S_IFLNK | 0o777)], "link"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ZIPS))
def test_unsafe_zip_rejected_and_nothing_written(tmp_path, case):
    members, bad = UNSAFE_ZIPS[case]
    archive = _zip(tmp_path / "crafted.zip", members)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match=f"member {bad!r}"):
        safe_extract(archive, tmp_path / "target")
    assert sorted(tmp_path.rglob("*")) == before


def test_safe_archives_extract_including_inner_links(tmp_path):
    tar = _tar(tmp_path / "good.tar.gz", [("file", "d/a.txt", b"alpha"), ("symlink", "d/link", "a.txt"),
                                          ("hardlink", "d/hard", "d/a.txt")])
    names = safe_extract(tar, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "link").read_bytes() == b"alpha"
    assert (tmp_path / "t" / "d" / "hard").read_bytes() == b"alpha"
    assert "d/a.txt" in names
    zf = _zip(tmp_path / "good.zip", [("x/y.json", b"{}", 0o100644)])
    assert safe_extract(zf, tmp_path / "z") == ["x/y.json"]
    assert (tmp_path / "z" / "x" / "y.json").read_text() == "{}"


def test_damaged_archive_names_the_fix(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ArchiveError, match="run the download stage again"):
        safe_extract(bad, tmp_path / "t")
