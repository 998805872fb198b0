"""extract stage: miniature ImageNet / ImageNet-100 / CIFAR-10 / COCO archives -> the exact layouts."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from overlock.data import ClassificationDataset, coco_split_files, layouts
from overlock.data.demo import demo_coco_split, write_cifar10_archive, write_coco_archives, write_imagenet_archives
from overlock.data.download import MANIFEST
from overlock.data.extract import run_extract
from overlock.data.sources import imagenet100_classes, published_archives
from overlock.params import parse_params
from overlock.tracking import start_stage

WNIDS = ["n01440764", "n01443537", "n01484850"]
COLOURS = {WNIDS[0]: (220, 30, 30), WNIDS[1]: (30, 200, 40), WNIDS[2]: (40, 40, 230)}


def _jpeg(colour, size=16, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 5, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _manifest(archives: Path, dataset: str) -> None:
    """The download stage's MANIFEST.json for the archives of ``dataset`` present in ``archives``."""
    roles = {e["file"]: role for role, e in published_archives()[dataset].items()}
    old = json.loads((archives / MANIFEST).read_text()) if (archives / MANIFEST).exists() else {}
    old.update({f: {"dataset": dataset, "role": roles[f], "algo": "sha256", "size": (archives / f).stat().st_size,
                    "digest": hashlib.sha256((archives / f).read_bytes()).hexdigest(), "source": "test"}
                for f in roles if (archives / f).exists()})
    (archives / MANIFEST).write_text(json.dumps(old))


def _imagenet_files() -> dict[str, str]:
    return {role: e["file"] for role, e in published_archives()["imagenet1k"].items()}


def _mini_imagenet(archives: Path, wnids: list[str], train_per_class: int, val_per_class: int,
                   corrupt: str | None = None) -> None:
    classes = [{"id": w, "name": f"class {w}"} for w in wnids]
    train = {w: [_jpeg(COLOURS.get(w, (128, 128, 128)), seed=j) for j in range(train_per_class)] for w in wnids}
    if corrupt:
        train[corrupt][2] = train[corrupt][2][: len(train[corrupt][2]) // 2]  # truncated JPEG
    val = [(w, _jpeg(COLOURS.get(w, (128, 128, 128)), seed=100 + j)) for j in range(val_per_class) for w in wnids]
    val = [val[i] for i in np.random.default_rng(1).permutation(len(val))]
    write_imagenet_archives(archives, classes, train, val, _imagenet_files())
    _manifest(archives, "imagenet1k")


def _params(mlflow_db, **data):
    return parse_params({"seed": 7, "data": data, "tracking": {"uri": f"sqlite:///{mlflow_db}"}})


def test_imagenet_layout_corrupt_image_excluded_and_rerun_skips(repo, mlflow_db):
    archives, out, metrics = repo / "archives", repo / "datasets", repo / "metrics" / "data.json"
    _mini_imagenet(archives, WNIDS, train_per_class=6, val_per_class=2, corrupt=WNIDS[0])
    params = _params(mlflow_db, dataset="imagenet1k", detection_dataset="none", calibration_per_class=2)
    run = start_stage("extract", params, root=repo)
    report = run_extract(params, run, archives=archives, out=out, metrics=metrics)
    root = out / "classification"
    assert json.loads((root / "classes.json").read_text()) == [{"id": w, "name": f"class {w}"} for w in WNIDS]
    for w in WNIDS:
        assert len(list((root / "train" / w).glob("*.JPEG"))) == 6
        val = sorted((root / "val" / w).glob("ILSVRC2012_val_*.JPEG"))
        assert len(val) == 2
        for p in val:  # each val image went to the class of its ground-truth label
            mean = np.asarray(Image.open(p)).reshape(-1, 3).mean(0)
            assert np.abs(mean - COLOURS[w]).max() < 20, (p, mean)
    splits = json.loads((root / "splits.json").read_text())
    bad = f"train/{WNIDS[0]}/{WNIDS[0]}_2.JPEG"
    assert splits["excluded"] == [bad]
    assert len(splits["calibration"]) == 6 and bad not in splits["calibration"]
    assert all(sum(p.startswith(f"train/{w}/") for p in splits["calibration"]) == 2 for w in WNIDS)
    assert report["classification"]["excluded_files"][bad].startswith("OSError")

    dvc_metrics = json.loads(metrics.read_text())
    assert dvc_metrics["classification"] == {
        "classes": 3, "train_images": 18, "val_images": 6, "train_split": 11, "calibration_split": 6,
        "val_split": 6, "excluded": 1, "expected_train": 1281167, "expected_val": 50000, "matches_expected": 0}
    logged = run.client.get_run(run.run_id).data.metrics
    assert logged["classification.excluded"] == 1 and logged["classification.train_split"] == 11
    assert "extract/integrity_report.json" in [a.path for a in run.client.list_artifacts(run.run_id, "extract")]

    train = ClassificationDataset(out, "train")
    assert len(train) == 11 and bad not in {p for p, _ in train.samples}
    assert len(ClassificationDataset(out, "calibration")) == 6
    val = ClassificationDataset(out, "val")
    assert sorted(val.targets) == [0, 0, 1, 1, 2, 2] and val[0][0].size == (16, 16)

    stamp = (root / "classes.json").stat().st_mtime_ns
    again = run_extract(params, run, archives=archives, out=out, metrics=metrics)
    assert again["skipped"] and (root / "classes.json").stat().st_mtime_ns == stamp

    # MANIFEST.json (what DVC tracks instead of the tree): every file, its size and md5 (images: from the
    # verification's read); a file edited inside the tree is found by a stat and named with the fix
    from overlock.data.manifest import MANIFEST, DatasetChangedError, check_tree
    from overlock.state import file_digest
    manifest = json.loads((out / MANIFEST).read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in
                   (MANIFEST, ".complete.json"))
    assert sorted(manifest["entries"]) == files and manifest["files"] == len(files)
    for rel in (next(f for f in files if f.endswith(".JPEG")), "classification/splits.json"):
        assert manifest["entries"][rel] == [(out / rel).stat().st_size, file_digest(out / rel)], rel
    assert check_tree(out) == len(files)
    edited = root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    edited.write_bytes(edited.read_bytes() + b"x")
    with pytest.raises(DatasetChangedError, match=r"1 changed \(e\.g\. classification/train/.*dvc repro -f extract"):
        check_tree(out)
    (out / MANIFEST).unlink()  # as `dvc repro` removes the out before running extract: rebuilt, not skipped
    rebuilt = run_extract(params, run, archives=archives, out=out, metrics=metrics)
    assert not rebuilt["skipped"] and check_tree(out) == len(files)
    run.finish()

    # the calibration split is a function of the seed only
    first = splits["calibration"]
    layouts.classification_splits(root, json.loads((root / "classes.json").read_text()), 7, 2, "header")
    assert json.loads((root / "splits.json").read_text())["calibration"] == first
    layouts.classification_splits(root, json.loads((root / "classes.json").read_text()), 8, 2, "header")
    assert json.loads((root / "splits.json").read_text())["calibration"] != first


def test_imagenet_extraction_resumes_finished_classes(tmp_path):
    _mini_imagenet(tmp_path, WNIDS, train_per_class=3, val_per_class=1)
    files = _imagenet_files()
    args = [tmp_path / files[r] for r in ("train", "val", "devkit")]
    root = tmp_path / "in1k"
    layouts.build_imagenet(*args, root)
    sentinel = root / "train" / WNIDS[0] / "kept.txt"
    sentinel.write_text("finished before the kill")
    shutil.rmtree(root / "train" / WNIDS[1])  # the class a killed run did not finish
    classes = layouts.build_imagenet(*args, root)
    assert sentinel.exists() and len(list((root / "train" / WNIDS[1]).glob("*.JPEG"))) == 3
    assert [c["id"] for c in classes] == WNIDS


def test_imagenet100_is_linked_into_imagenet1k(tmp_path):
    wnids = sorted(imagenet100_classes())
    assert len(wnids) == 100
    archives = tmp_path / "archives"
    _mini_imagenet(archives, wnids + ["n15075141"], train_per_class=3, val_per_class=1)
    params = parse_params({"data": {"dataset": "imagenet100", "detection_dataset": "none",
                                    "calibration_per_class": 1, "verify_images": "header"}})
    manifest = json.loads((archives / MANIFEST).read_text())
    report = layouts.build_all(params, archives, manifest, tmp_path / "out")
    root = tmp_path / "out" / "classification"
    assert [c["id"] for c in json.loads((root / "classes.json").read_text())] == wnids
    link = root / "train" / wnids[5]
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert link.resolve() == (tmp_path / "out" / "imagenet1k" / "train" / wnids[5]).resolve()
    assert not (root / "train" / "n15075141").exists()
    assert report["classification"]["images"] == {"train": 300, "val": 100}
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "out", moved)  # relative links survive moving the out
    assert len(ClassificationDataset(moved, "train")) == 200


def test_cifar10_and_coco_layouts(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = (rng.integers(0, 255, (30, 32, 32, 3), dtype=np.uint8), [i % 10 for i in range(30)])
    test = (rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), list(range(10)))
    write_cifar10_archive(archives / "cifar-10-python.tar.gz", train, test, names)
    _manifest(archives, "cifar10")
    splits = {"train2017": demo_coco_split(8, 64, 0, 0), "val2017": demo_coco_split(3, 64, 0, 1, first_id=1000)}
    name, data = splits["train2017"][0][1]
    splits["train2017"][0][1] = (name, data[:200])  # a truncated training image
    write_coco_archives(archives, splits, {r: e["file"] for r, e in published_archives()["coco2017"].items()})
    _manifest(archives, "coco2017")

    params = parse_params({"seed": 1, "data": {"dataset": "cifar10", "detection_dataset": "coco2017",
                                               "calibration_per_class": 1}})
    report = layouts.build_all(params, archives, json.loads((archives / MANIFEST).read_text()), tmp_path / "out")

    cls = tmp_path / "out" / "classification"
    assert [c["id"] for c in json.loads((cls / "classes.json").read_text())] == names
    assert len(list((cls / "train" / "cat").glob("*.png"))) == 3 and len(list(cls.glob("val/*/*.png"))) == 10
    # the first training image (label 0) kept its pixels and channel order
    assert np.array_equal(np.asarray(Image.open(cls / "train" / "airplane" / "00000.png")), train[0][0])
    assert report["classification"]["matches_expected"] is False

    det = tmp_path / "out" / "detection"
    files = coco_split_files(det)
    from pycocotools.coco import COCO
    tr, cal, val = (COCO(files[k][0]) for k in ("train", "calibration", "val"))
    all_train = json.loads((det / "annotations" / "instances_train2017.json").read_text())
    bad_id = next(i["id"] for i in all_train["images"] if i["file_name"] == name)
    assert set(tr.getImgIds()).isdisjoint(cal.getImgIds())
    assert set(tr.getImgIds()) | set(cal.getImgIds()) | {bad_id} == {i["id"] for i in all_train["images"]}
    assert bad_id not in tr.getImgIds() and f"train2017/{name}" in report["detection"]["excluded_files"]
    assert {a["category_id"] for a in cal.loadAnns(cal.getAnnIds())} == {1, 2, 3}  # every category held out
    assert len(val.getImgIds()) == 3 and Path(files["val"][1], val.loadImgs(1000)[0]["file_name"]).exists()
    assert report["detection"]["expected"] == {"train": 118287, "val": 5000}
