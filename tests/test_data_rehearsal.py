"""ILSVRC2012-format archives of generated real-size images through the real download and extract stages:
archives that cannot match the published checksums are refused unless ``data.unverified_archives`` lists them
(then hashed, marked and logged), and the per-class tars are extracted in parallel."""
from __future__ import annotations

import logging

import pytest

from overlock.data.download import MANIFEST, ChecksumError, DownloadError, read_json, run_download
from overlock.data.extract import run_extract
from overlock.data.synthetic_images import write_ilsvrc2012_archives
from overlock.params import parse_params
from overlock.tracking import stage_run

NAMES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


@pytest.fixture(scope="module")
def ilsvrc_archives(tmp_path_factory):
    return write_ilsvrc2012_archives(tmp_path_factory.mktemp("ilsvrc"), num_classes=3, train_per_class=4,
                                     val_images=6, seed=0)


def _params(mlflow_db, archives, **data):
    return parse_params({"data": {"dataset": "imagenet1k", "detection_dataset": "none", "calibration_per_class": 1,
                                  "sources": {p.name: str(p) for p in archives.values()}, **data},
                         "tracking": {"uri": f"sqlite:///{mlflow_db}"}})


def test_generated_ilsvrc_archives_need_an_explicit_unverified_list(repo, mlflow_db, ilsvrc_archives, caplog):
    out = repo / "data" / "archives"
    with pytest.raises(ChecksumError, match="does not match the md5 checksum"):
        run_download(_params(mlflow_db, ilsvrc_archives), None, out)
    assert not (out / MANIFEST).exists()
    with pytest.raises(DownloadError, match="unverified_archives names .*cifar"):
        run_download(_params(mlflow_db, ilsvrc_archives, unverified_archives=["cifar-10-python.tar.gz"]), None, out)

    params = _params(mlflow_db, ilsvrc_archives, unverified_archives=list(NAMES))
    with caplog.at_level(logging.WARNING, logger="overlock.data.download"), stage_run("download", params) as run:
        run_download(params, run, out)
    assert caplog.text.count("UNVERIFIED ARCHIVE") == 3
    manifest = read_json(out / MANIFEST)
    assert all(manifest[n]["unverified"] and manifest[n]["algo"] == "sha256" for n in NAMES)

    with stage_run("extract", params) as run:
        report = run_extract(params, run, out, repo / "data" / "datasets", repo / "metrics" / "data.json")
    cls = report["classification"]
    assert cls["images"] == {"train": 12, "val": 6} and cls["classes"] == 3 and cls["excluded"] == 0
    assert cls["matches_expected"] is False  # the published counts are reported, not faked
    train = repo / "data" / "datasets" / "classification" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["n90000000", "n90000001", "n90000002"]
    assert not list(train.glob(".*.tmp"))  # every class finished its atomic rename
