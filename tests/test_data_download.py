"""download stage: HTTP (Range resume, retries, 404), checksums, local sources, demo archives, re-runs."""
from __future__ import annotations

import hashlib
import json
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest

from overlock.data import demo, download
from overlock.data.download import ChecksumError, DownloadError, fetch_archive, run_download
from overlock.params import parse_params
from overlock.tracking import start_stage

SMALL_DEMO = {"num_classes": 3, "train_per_class": 7, "val_per_class": 2, "image_size": 32,
              "coco_train_images": 4, "coco_val_images": 2, "coco_image_size": 64}


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes) with HTTP Range; ``cut[name]`` transfers are cut half-way."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.server.requests.append((name, rng))
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.server.cut.get(name, 0) > 0:
            self.server.cut[name] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = RangeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.01)


def _params(mlflow_db: Path, **data):
    return parse_params({"seed": 3, "data": {"demo": SMALL_DEMO, **data},
                         "tracking": {"uri": f"sqlite:///{mlflow_db}"}})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cut_transfer_resumes_with_range_and_verifies(server, tmp_path):
    payload = bytes(range(256)) * 4000
    server.files["a.tar"] = payload
    server.cut["a.tar"] = 1
    dest = tmp_path / "out" / "a.tar"
    action = fetch_archive(server.url("a.tar"), dest, "sha256", _sha256(payload), retries=3,
                           cache_dir=tmp_path / "cache")
    assert action == "downloaded"
    assert dest.read_bytes() == payload
    assert server.requests[0] == ("a.tar", None)
    assert server.requests[1] == ("a.tar", f"bytes={len(payload) // 2}-")  # resumed, not restarted
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_partial_left_by_killed_run_is_resumed(server, tmp_path):
    payload = b"0123456789" * 5000
    digest = _sha256(payload)
    server.files["b.zip"] = payload
    partial = tmp_path / "cache" / digest[:16] / "b.zip.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(payload[:12345])
    dest = tmp_path / "out" / "b.zip"
    assert fetch_archive(server.url("b.zip"), dest, "sha256", digest, cache_dir=tmp_path / "cache") == "resumed"
    assert server.requests == [("b.zip", "bytes=12345-")]
    assert dest.read_bytes() == payload


def test_wrong_checksum_fails_and_leaves_no_file(server, tmp_path):
    server.files["c.tar"] = b"not the archive you are looking for" * 100
    dest = tmp_path / "out" / "c.tar"
    with pytest.raises(ChecksumError, match=r"checksum mismatch for c\.tar.*expected md5 0{32}"):
        fetch_archive(server.url("c.tar"), dest, "md5", "0" * 32, cache_dir=tmp_path / "cache")
    assert not dest.exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != "verified.json"]


def test_404_fails_clearly_without_retrying(server, tmp_path):
    dest = tmp_path / "out" / "missing.tar"
    with pytest.raises(DownloadError, match=r"HTTP 404.*data\.sources\.missing\.tar"):
        fetch_archive(server.url("missing.tar"), dest, "md5", "0" * 32, retries=3, cache_dir=tmp_path / "c")
    assert len(server.requests) == 1
    assert not dest.exists()


def test_gives_up_after_retries_and_keeps_partial(server, tmp_path):
    payload = b"x" * 100_000
    server.files["d.tar"] = payload
    server.cut["d.tar"] = 99
    with pytest.raises(DownloadError, match="after 3 attempts"):
        fetch_archive(server.url("d.tar"), tmp_path / "out" / "d.tar", "sha256", _sha256(payload), retries=2,
                      cache_dir=tmp_path / "cache")
    assert len(server.requests) == 3
    partial = next((tmp_path / "cache").rglob("d.tar.partial"))
    assert 0 < partial.stat().st_size < len(payload)
    assert not (tmp_path / "out" / "d.tar").exists()


def test_local_source_with_bad_checksum_is_rejected(tmp_path):
    src = tmp_path / "ILSVRC2012_img_val.tar"
    src.write_bytes(b"fake")
    dest = tmp_path / "out" / src.name
    with pytest.raises(ChecksumError, match="does not match the md5 checksum"):
        fetch_archive(str(src), dest, "md5", "29b22e2961454d5413ddabcf34fc5622", cache_dir=tmp_path / "cache")
    assert not dest.exists()
    with pytest.raises(DownloadError, match="not found"):
        fetch_archive(str(tmp_path / "nope.tar"), dest, "md5", "0" * 32, cache_dir=tmp_path / "cache")


def test_run_download_over_http_resumes_skips_and_survives_deleted_out(server, repo, mlflow_db, tmp_path):
    served = tmp_path / "served"
    sums = demo.write_demo_archives("demo", parse_params({"data": {"demo": SMALL_DEMO}}).data.demo, 3, served)
    for name in sums:
        server.files[name] = (served / name).read_bytes()
    server.cut["demo_img_train.tar"] = 1
    params = _params(mlflow_db, detection_dataset="none",
                     sources={name: server.url(name) for name in sums})
    out = repo / "data" / "archives"
    run = start_stage("download", params, root=repo)
    first = run_download(params, run, out)
    assert set(first["archives"].values()) == {"downloaded"}
    assert ("demo_img_train.tar", None) in server.requests
    assert any(name == "demo_img_train.tar" and rng for name, rng in server.requests)  # resumed after the cut
    for name, digest in sums.items():  # identical to the served archives (the generator is deterministic)
        assert _sha256((out / name).read_bytes()) == digest
    logged = run.client.get_run(run.run_id).data.metrics
    assert logged["archives"] == 3 and logged["archives_downloaded"] == 3
    manifest = download.read_json(out / download.MANIFEST)
    assert {m["role"] for m in manifest.values()} == {"train", "val", "devkit"}

    n_requests = len(server.requests)
    (out / "cifar-10-python.tar.gz").write_bytes(b"left from another configuration")
    assert set(run_download(params, run, out)["archives"].values()) == {"skipped"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*sums, download.MANIFEST])
    shutil.rmtree(out)  # DVC deletes the out before re-running the stage
    assert set(run_download(params, run, out)["archives"].values()) == {"linked"}
    assert len(server.requests) == n_requests  # no network work on either re-run
    assert (out / "demo_img_val.tar").stat().st_nlink >= 2  # hard link to the state copy, not a copy
    run.finish()


def test_demo_stages_from_the_command_line(repo, mlflow_db, tmp_path, monkeypatch):
    """`python -m stages.download` then `stages.extract` on the demo: file:// archives, layouts, no rework."""
    import yaml
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from stages import download as download_stage
    from stages import extract as extract_stage
    params_file = repo / "params.yaml"
    params_file.write_text(yaml.safe_dump({"seed": 3, "data": {"demo": SMALL_DEMO, "calibration_per_class": 2,
                                                                    "segmentation_dataset": "demo_ade"},
                                           "tracking": {"uri": f"sqlite:///{mlflow_db}"}}))
    out, datasets, metrics = repo / "data" / "archives", repo / "data" / "datasets", repo / "metrics" / "data.json"
    assert download_stage.main(["--params", str(params_file), "--out", str(out)]) == 0
    manifest = download.read_json(out / download.MANIFEST)
    assert len(manifest) == 7  # ImageNet-format 3, COCO-format 3, ADE20K-format 1
    assert all(m["source"].startswith("file://") and m["algo"] == "sha256" for m in manifest.values())
    params = parse_params(yaml.safe_load(params_file.read_text()))
    again = demo.write_demo_archives("demo_coco", params.data.demo, params.seed, tmp_path / "again")
    assert {f: manifest[f]["digest"] for f in again} == again  # byte-identical for the same seed
    other_seed = demo.write_demo_archives("demo_coco", params.data.demo, params.seed + 1, tmp_path / "other")
    assert other_seed["demo_coco_train2017.zip"] != again["demo_coco_train2017.zip"]

    argv = ["--params", str(params_file), "--archives", str(out), "--out", str(datasets), "--metrics", str(metrics)]
    assert extract_stage.main(argv) == 0
    from overlock.data import ClassificationDataset, coco_split_files
    assert len(ClassificationDataset(datasets, "train")) == 3 * (7 - 2)
    assert len(ClassificationDataset(datasets, "val")) == 3 * 2
    assert json.loads(metrics.read_text())["detection"]["train_images"] == 4
    assert set(coco_split_files(datasets / "detection")) == {"train", "calibration", "val"}
    stamp = (datasets / "classification" / "splits.json").stat().st_mtime_ns
    assert extract_stage.main(argv) == 0  # unchanged inputs: nothing rebuilt
    assert (datasets / "classification" / "splits.json").stat().st_mtime_ns == stamp


def test_missing_and_unknown_sources_fail_before_any_work(repo, mlflow_db):
    params = _params(mlflow_db, dataset="imagenet100", detection_dataset="none")
    with pytest.raises(DownloadError, match=r"(?s)image-net\.org.*sources:\n.*ILSVRC2012_img_train\.tar"):
        run_download(params, None, repo / "out")
    params = _params(mlflow_db, sources={"ILSVRC2012_img_trian.tar": "/x"})
    with pytest.raises(DownloadError, match="unknown archive"):
        run_download(params, None, repo / "out")
    assert not (repo / "out").exists()
