"""Your own data (issue 18): class folders and COCO-format detection sets, as directories or archives.

Small real trees (JPEG/PNG/WebP of several sizes, a grayscale one, a PNG with alpha, a stray text file) and COCO
JSON files (non-contiguous category ids listed out of order, a crowd annotation, an image without annotations)
go through the real download + extract stages (`dvc repro extract` in a temporary git repository), then load
as the classifier's and the detector's datasets. Every bad case of the issue raises in the extract stage with
a message naming the file and the fix, and leaves no output behind.
"""
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from overlock.data.datasets import ClassificationDataset, coco_categories, coco_split_files, load_classes
from overlock.data.download import MANIFEST
from overlock.data.extract import ArchiveError, run_extract
from overlock.data.own_sources import OwnDataError, place_own_source
from overlock.params import ParamsError, SourceParams, parse_params

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = ("bird", "cat", "dog")
# category ids not contiguous and not in id order in the file: the detector's classes follow the ids
CATEGORIES = [{"id": 7, "name": "person", "supercategory": "x"}, {"id": 3, "name": "car", "supercategory": "x"},
              {"id": 12, "name": "dog", "supercategory": "x"}]


# ------------------------------------------------------------------------------------------ real images
def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image: a smooth gradient, a few blobs, sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([rng.uniform(40, 200) + rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy for _ in range(3)], -1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, max(w, h) / 3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] += rng.uniform(-80, 80, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))


def make_class_tree(root: Path, n_train: int = 3, n_val: int = 2, classes=CLASSES) -> Path:
    """``train/<class>/`` + ``val/<class>/``: JPEGs of several sizes, a grayscale JPEG, an RGBA PNG, a WebP."""
    seed = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for k, cls in enumerate(classes):
            for i in range(n):
                seed += 1
                img = _photo(seed, (40 + 8 * i, 32 + 4 * k))
                if split == "train" and i == 0 and k == 0:
                    _save(img.convert("L"), root / split / cls / f"gray_{i}.jpg", "JPEG")
                elif split == "train" and i == 1 and k == 1:
                    rgba = img.convert("RGBA")
                    rgba.putalpha(Image.fromarray(np.full((img.height, img.width), 128, np.uint8)))
                    _save(rgba, root / split / cls / f"alpha_{i}.png", "PNG")
                elif split == "val" and i == 0 and k == 2:
                    _save(img, root / split / cls / f"img_{i}.webp", "WEBP")
                else:
                    _save(img, root / split / cls / f"img_{i}.JPEG", "JPEG")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def make_coco(n_images: int, first_id: int, split: str) -> tuple[dict, list[tuple[str, Image.Image]]]:
    """A COCO instances dict (polygons, one crowd RLE annotation on train, the last image unannotated)."""
    images, annotations, files = [], [], []
    for i in range(n_images):
        image_id = first_id + i
        w, h = 64 + 8 * i, 48
        name = f"sub/{split}_{i}.jpg" if i == 1 else f"{split}_{i}.jpg"
        files.append((name, _photo(100 * first_id + i, (w, h))))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        if i == n_images - 1:
            continue  # an image without annotations
        for j, cat in enumerate(CATEGORIES):
            x, y, bw, bh = 4 + 10 * j, 6 + 4 * j, 14, 12
            annotations.append({"id": 1000 * first_id + 10 * i + j, "image_id": image_id, "category_id": cat["id"],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    if split == "train":
        annotations.append({"id": 999999, "image_id": first_id, "category_id": 12, "bbox": [40, 20, 16, 16],
                            "area": 256, "iscrowd": 1,
                            "segmentation": {"size": [48, 64], "counts": [48 * 40 + 20, 16, 48 * 16 - 16]}})
    return {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}, files


def make_coco_tree(root: Path, edit=None) -> Path:
    """``train/``, ``val/`` images and ``annotations/instances_{train,val}.json``; ``edit(split, coco)`` breaks it."""
    for split, n, first in (("train", 5, 1), ("val", 3, 50)):
        coco, files = make_coco(n, first, split)
        for name, img in files:
            _save(img, root / split / name, "JPEG")
        if edit:
            coco = edit(split, coco) or coco
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return root


def _pack(folder: Path, archive: Path, top: str | None = None) -> Path:
    """Pack ``folder`` as a tar.gz or zip (optionally inside one top-level folder ``top``; a zip as macOS
    writes it, with a ``__MACOSX/`` folder beside it)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    arc = lambda p: (f"{top}/" if top else "") + p.relative_to(folder).as_posix()
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, arc(p))
            zf.writestr(f"__MACOSX/{top or 'x'}/._train", b"\x00\x05\x16\x07")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, arc(p))
    return archive


# ------------------------------------------------------------------------------- through `dvc repro`
def _run(cmd, cwd, check=True):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    for var in ("OVERLOCK_REPO", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "RAY_ADDRESS", "PYTHONPATH"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def own_repo(tmp_path_factory):
    """A copy of the repo in a fresh git repo whose params point at a class-folder directory and a COCO zip."""
    base = tmp_path_factory.mktemp("own")
    root = base / "repo"
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("tests/", "benchmarks/")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    classes = make_class_tree(base / "my_classes")
    coco_tree = make_coco_tree(base / "my_coco")
    coco_zip = _pack(coco_tree, base / "my_coco.zip", top="my_coco")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"].update(dataset="folder", detection_dataset="coco_folder", calibration_per_class=1,
                       sources={"folder": str(classes), "coco_folder": {"path": str(coco_zip)}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    first = _run(["dvc", "repro", "extract"], root)
    return {"root": root, "classes": classes, "coco_zip": coco_zip, "coco_tree": coco_tree, "first": first}


def test_repro_extract_builds_both_datasets_with_their_classes(own_repo):
    root = own_repo["root"]
    data = root / "data" / "datasets"
    assert [c["id"] for c in load_classes(data)] == list(CLASSES)
    train, cal, val = (ClassificationDataset(data, s) for s in ("train", "calibration", "val"))
    assert train.class_names == list(CLASSES)
    assert (len(train), len(cal), len(val)) == (6, 3, 6)  # 3 train per class, 1 held out; 2 val per class
    assert sorted(cal.targets) == [0, 1, 2]
    assert not {p for p, _ in cal.samples} & {p for p, _ in train.samples}
    for ds in (train, val):  # grayscale, alpha and WebP images load as RGB with the label of their folder
        for path, label in ds.samples:
            img, y = ds[ds.samples.index((path, label))]
            assert img.mode == "RGB" and y == CLASSES.index(Path(path).parent.name)
    report = json.loads((data / "integrity_report.json").read_text())
    cls = report["classification"]
    assert cls["dataset"] == "folder" and cls["classes"] == 3 and cls["excluded"] == 0
    assert cls["skipped_files"] == 1 and cls["skipped_examples"] == ["train/bird/notes.txt"]
    assert cls["source"]["path"] == str(own_repo["classes"]) and cls["source"]["kind"] == "directory"
    assert len(cls["source"]["sha256"]) == 64 and cls["source"]["files"] == 16
    det = report["detection"]
    assert det["category_names"] == ["car", "person", "dog"]  # id order 3, 7, 12
    assert det["crowd_annotations"] == {"train": 1, "val": 0}
    assert det["images_without_annotations"] == {"train": 1, "val": 1}
    assert det["images"] == {"train": 5, "val": 3} and det["source"]["kind"] == "archive"
    metrics = json.loads((root / "metrics" / "data.json").read_text())
    assert metrics["classification"]["skipped_files"] == 1 and metrics["detection"]["train_crowd_annotations"] == 1


def test_dvc_tracks_the_manifest_and_the_next_stage_sees_a_hand_edit(own_repo, capsys):
    """DVC tracks data/datasets/MANIFEST.json, not the tree (so `dvc status` stays fast at ImageNet size):
    it does not see a file edited inside the tree; the next stage's entry point does, naming it and the fix."""
    from overlock.pipeline.runner import run_stage

    root = own_repo["root"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = [o["path"] for o in lock["stages"]["extract"]["outs"]]
    assert "data/datasets/MANIFEST.json" in outs and "data/datasets" not in outs
    edited = root / "data" / "datasets" / "classification" / "splits.json"
    text, stat = edited.read_text(), edited.stat()
    try:
        edited.write_text(text + " ")
        assert "up to date" in _run(["dvc", "status", "extract"], root).stdout  # the trade-off
        code = run_stage("pretrain", ["--params", str(root / "params.yaml"), "--data", str(root / "data/datasets"),
                                      "--out", str(root / "m"), "--metrics", str(root / "m.json"),
                                      "--plots", str(root / "p")])
        err = capsys.readouterr().err
        assert code == 1 and "1 changed (e.g. classification/splits.json)" in err and "dvc repro -f extract" in err
        assert not (root / "m").exists()
    finally:
        edited.write_text(text)
        os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_detector_takes_classes_from_the_extracted_annotations(own_repo):
    data = own_repo["root"] / "data" / "datasets"
    files = coco_split_files(data / "detection")
    train = json.loads(Path(files["train"][0]).read_text())
    assert [c["id"] for c in train["categories"]] == [3, 7, 12]  # written in id order: mmdet's cat_ids agree
    assert coco_categories(data / "detection") == ["car", "person", "dog"]
    assert (Path(files["train"][1]) / "sub" / "train_1.jpg").is_file()
    pytest.importorskip("mmcv")
    pytest.importorskip("mmdet")
    from mmdet.datasets import build_dataset

    from overlock.detection.config import build_detection_config
    from overlock.detection.finetune import read_classes
    classes = read_classes(files["train"][0])  # what the finetune stage passes to the config builder
    assert classes == ["car", "person", "dog"]
    params = parse_params(yaml.safe_load((own_repo["root"] / "params.yaml").read_text()))
    cfg = build_detection_config(params, data, own_repo["root"] / "work", classes)
    assert cfg.model.roi_head.bbox_head.num_classes == 3 and cfg.model.roi_head.mask_head.num_classes == 3
    val = build_dataset(cfg.data.val)
    assert list(val.CLASSES) == ["car", "person", "dog"] and list(val.cat_ids) == [3, 7, 12]


def test_mask_rcnn_on_boxes_only_data_fails_before_training(own_repo, tmp_path):
    pytest.importorskip("mmcv")
    from overlock.detection.finetune import check_inputs
    data = own_repo["root"] / "data" / "datasets"
    raw = yaml.safe_load((own_repo["root"] / "params.yaml").read_text())
    raw["finetune"].update(init="none", detector="mask_rcnn")
    check_inputs(parse_params(raw), data, tmp_path)  # every annotation of the fixture has a mask
    boxes_only = tmp_path / "datasets"
    shutil.copytree(data, boxes_only, symlinks=True)
    report = json.loads((boxes_only / "integrity_report.json").read_text())
    report["detection"]["annotations_without_masks"]["train"] = 2
    (boxes_only / "integrity_report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="2 train annotations .* no segmentation.*finetune.detector=faster_rcnn"):
        check_inputs(parse_params(raw), boxes_only, tmp_path)
    raw["finetune"]["detector"] = "faster_rcnn"
    check_inputs(parse_params(raw), boxes_only, tmp_path)


def test_dvc_status_sees_a_changed_image(own_repo):
    root, classes = own_repo["root"], own_repo["classes"]
    assert "up to date" in _run(["dvc", "status", "download", "extract"], root).stdout
    _photo(999, (50, 40)).save(classes / "val" / "cat" / "img_1.JPEG", quality=85)  # edited in place
    status = _run(["dvc", "status", "download", "extract"], root).stdout
    assert "download:" in status and "extract:" in status and "modified:           data/archives" in status


def test_repro_reruns_on_changed_data_and_stops_at_extract_when_bad(own_repo):
    """After the edited image (previous test) and a broken annotation file, `dvc repro` re-runs download and
    fails in extract, naming the file and the fix, with no dataset left in data/datasets."""
    root, coco_zip = own_repo["root"], own_repo["coco_zip"]
    before = json.loads((root / "data/archives" / MANIFEST).read_text())
    tree = own_repo["coco_tree"]
    (tree / "annotations" / "instances_train.json").write_text("{'images': [")
    _pack(tree, coco_zip, top="my_coco")  # the same file, rewritten
    bad = _run(["dvc", "repro", "extract"], root, check=False)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "Running stage 'download'" in out and "Running stage 'extract'" in out
    assert f"{coco_zip}:my_coco/annotations/instances_train.json is not valid JSON" in out
    assert "export the annotations again in COCO format" in out
    after = json.loads((root / "data/archives" / MANIFEST).read_text())
    assert after["folder"]["digest"] != before["folder"]["digest"]  # the edited image was seen
    data = root / "data" / "datasets"
    assert not (data / "integrity_report.json").exists() and not (data / "classification").exists()
    # no partial build to resume from (own data is linked, cheap to redo); what stays: the stage's logs and the
    # manifest the earlier, successful extract kept for DVC's deleted outs
    state = root / ".overlock/state/extract"
    left = [p.relative_to(state) for p in state.rglob("*") if p.is_file()]
    assert not [p for p in left if "logs" not in p.parts and p.name != "MANIFEST.json" or "staging" in p.parts], left


# ---------------------------------------------------------------------------- every bad case, in-process
@pytest.fixture(scope="module")
def good_sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("good")
    return {"classes": make_class_tree(base / "classes"), "coco": make_coco_tree(base / "coco")}


def _extract(tmp_path, monkeypatch, classes: Path, coco: Path | None, per_class: int = 1):
    """Place the sources as the download stage does, then run the extract stage in ``tmp_path``."""
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    sources = {"folder": str(classes), **({"coco_folder": str(coco)} if coco else {})}
    params = parse_params({"data": {"dataset": "folder", "detection_dataset": "coco_folder" if coco else "none",
                                    "calibration_per_class": per_class, "sources": sources}})
    archives, state = tmp_path / "data/archives", tmp_path / "state"
    archives.mkdir(parents=True)
    manifest = {k: place_own_source(k, params.data.source(k), archives, state) for k in sources}
    (archives / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "data/datasets"
    return run_extract(params, None, archives, out, tmp_path / "metrics/data.json"), out


def _tree_case(name):
    def build(root: Path):
        make_class_tree(root)
        if name == "no_classes":
            for split in ("train", "val"):
                shutil.rmtree(root / split)
                (root / split).mkdir()
            _photo(1, (32, 32)).save(root / "train" / "loose.jpg")
            _photo(1, (32, 32)).save(root / "val" / "loose.jpg")
        elif name == "no_val":
            shutil.rmtree(root / "val")
        elif name == "empty_class":
            for f in (root / "val" / "cat").iterdir():
                f.unlink()
            (root / "val" / "cat" / "readme.md").write_text("todo")
        elif name == "classes_differ":
            shutil.rmtree(root / "val" / "bird")
            (root / "val" / "fish").mkdir()
            _photo(2, (32, 32)).save(root / "val" / "fish" / "a.jpg")
        elif name == "too_few_for_calibration":
            for f in sorted((root / "train" / "dog").iterdir())[1:]:
                f.unlink()
        return root
    return build


TREE_CASES = {  # case: (file named in the message, phrases of the problem and the fix)
    "no_classes": ("train/", ["holds no class folders", "no classes", "train/<class>/"]),
    "no_val": ("", ["has no val/ folder, or no file in it", "train/<class>/ and val/<class>/"]),
    "empty_class": ("val/cat/", ["holds no images", "empty class", "Add images"]),
    "classes_differ": ("", ["differ", "only in train/: bird", "only in val/: fish", "add or rename"]),
    "too_few_for_calibration": ("train/dog/", ["has 1 images", "data.calibration_per_class=1",
                                               "lower data.calibration_per_class"]),
}


@pytest.mark.parametrize("case,packed", [(c, "directory") for c in sorted(TREE_CASES)]
                         + [("classes_differ", "tar.gz"), ("empty_class", "tar.gz")])  # archive:member naming
def test_bad_class_folders_fail_naming_file_and_fix(tmp_path, monkeypatch, good_sources, case, packed):
    src = _tree_case(case)(tmp_path / "mine")
    if packed == "tar.gz":
        src = _pack(src, tmp_path / "mine.tar.gz", top="mine")
    with pytest.raises(ArchiveError) as err:
        _extract(tmp_path / "run", monkeypatch, src, None)
    rel, phrases = TREE_CASES[case]
    named = f"{src}:mine/{rel}" if packed == "tar.gz" else f"{src}/{rel}".rstrip("/")
    assert named in str(err.value)
    for phrase in phrases:
        assert phrase in str(err.value)
    _assert_nothing_left(tmp_path / "run")


def _assert_nothing_left(root: Path):
    out = root / "data/datasets"
    assert not out.exists(), sorted(out.rglob("*"))
    assert not (root / "metrics/data.json").exists()
    # no partial build to resume from (own data is linked, cheap to redo); what stays: the stage's logs and the
    # manifest the earlier, successful extract kept for DVC's deleted outs
    state = root / ".overlock/state/extract"
    left = [p.relative_to(state) for p in state.rglob("*") if p.is_file()]
    assert not [p for p in left if "logs" not in p.parts and p.name != "MANIFEST.json" or "staging" in p.parts], left


def _drop(key):
    return lambda split, coco: {k: v for k, v in coco.items() if k != key} if split == "train" else coco


def _edit_ann(field, value, split_only="train"):
    def edit(split, coco):
        if split == split_only:
            coco["annotations"][0][field] = value
    return edit


def _duplicate(key):
    def edit(split, coco):
        if split == "val":
            coco[key][1]["id"] = coco[key][0]["id"]
    return edit


def _missing_image(split, coco):
    if split == "val":
        coco["images"].append({"id": 777, "file_name": "gone.jpg", "width": 10, "height": 10})


def _val_categories(split, coco):
    if split == "val":
        coco["categories"] = [dict(c, name="auto") if c["id"] == 3 else c for c in coco["categories"]]


COCO_CASES = {  # case: (edit, annotation file named, phrases)
    "not_json": (lambda s, c: "{'images': [" if s == "train" else c, "instances_train.json",
                 ["is not valid JSON", "export the annotations again in COCO format"]),
    "lacks_images": (_drop("images"), "instances_train.json", ["lacks 'images'", "COCO instances file"]),
    "lacks_annotations": (_drop("annotations"), "instances_train.json", ["lacks 'annotations'",
                                                                         "an empty annotations list is fine"]),
    "lacks_categories": (_drop("categories"), "instances_train.json", ["lacks 'categories'"]),
    "image_missing_on_disk": (_missing_image, "instances_val.json", ["not in", "val/", "gone.jpg",
                                                                      "Add the files, or remove those images"]),
    "unknown_category": (_edit_ann("category_id", 5), "instances_train.json",
                         ["category_id 5", "not in categories", "3, 7, 12", "add the category or fix"]),
    "box_zero_width": (_edit_ann("bbox", [4, 6, 0, 12]), "instances_train.json", ["non-positive size",
                                                                                  "fix or remove"]),
    "box_outside_image": (_edit_ann("bbox", [60, 6, 20, 12]), "instances_train.json", ["outside its image",
                                                                                        "64x48", "clip it"]),
    "duplicate_image_ids": (_duplicate("images"), "instances_val.json", ["duplicate image id", "renumber"]),
    "duplicate_annotation_ids": (_duplicate("annotations"), "instances_val.json", ["duplicate annotation id"]),
    "duplicate_category_ids": (_duplicate("categories"), "instances_val.json", ["duplicate category id"]),
    "categories_differ": (_val_categories, "instances_val.json", ["categories of", "differ", "3:auto",
                                                                  "same categories"]),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_bad_coco_fails_naming_file_and_fix(tmp_path, monkeypatch, good_sources, case):
    edit, file, phrases = COCO_CASES[case]
    coco = make_coco_tree(tmp_path / "coco", edit)
    with pytest.raises(ArchiveError) as err:
        _extract(tmp_path / "run", monkeypatch, good_sources["classes"], coco)
    assert f"{coco}/annotations/{file}" in str(err.value)
    for phrase in phrases:
        assert phrase in str(err.value), str(err.value)
    _assert_nothing_left(tmp_path / "run")


# ------------------------------------------------------------------------------- archives, pins, params
def test_tar_gz_class_folders_in_a_top_folder_extract_like_the_directory(tmp_path, monkeypatch, good_sources):
    import overlock.data.layouts as layouts
    archive = _pack(good_sources["classes"], tmp_path / "classes.tar.gz", top="flowers")
    params = parse_params({"data": {"dataset": "folder", "detection_dataset": "none", "calibration_per_class": 1,
                                    "sources": {"folder": str(archive)}}})
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    archives = tmp_path / "archives"
    archives.mkdir()
    manifest = {"folder": place_own_source("folder", params.data.source("folder"), archives, tmp_path / "state")}
    report = layouts.build_all(params, archives, manifest, tmp_path / "built")
    assert [c["id"] for c in load_classes(tmp_path / "built")] == list(CLASSES)
    assert report["classification"]["splits"] == {"train": 6, "calibration": 3, "val": 6}
    assert report["classification"]["source"]["kind"] == "archive"
    assert not list((tmp_path / "built").glob(".*unpacked"))  # the unpacked archive is gone
    assert ClassificationDataset(tmp_path / "built", "val")[0][0].mode == "RGB"
    # the same images as a directory: the same deterministic calibration split
    params = parse_params({"data": {"dataset": "folder", "detection_dataset": "none", "calibration_per_class": 1,
                                    "sources": {"folder": str(good_sources["classes"])}}})
    manifest = {"folder": place_own_source("folder", params.data.source("folder"), archives, tmp_path / "state")}
    layouts.build_all(params, archives, manifest, tmp_path / "from_dir")
    splits = [json.loads((tmp_path / d / "classification/splits.json").read_text()) for d in ("built", "from_dir")]
    assert splits[0] == splits[1] and len(splits[0]["calibration"]) == 3


def test_files_added_after_download_are_named_with_the_fix(tmp_path, monkeypatch):
    src = make_class_tree(tmp_path / "mine")
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    params = parse_params({"data": {"dataset": "folder", "detection_dataset": "none", "calibration_per_class": 1,
                                    "sources": {"folder": str(src)}}})
    archives = tmp_path / "archives"
    manifest = {"folder": place_own_source("folder", params.data.source("folder"), archives, tmp_path / "state")}
    _photo(5, (30, 30)).save(src / "val" / "dog" / "new.jpg")  # DVC cannot see this through the links
    import overlock.data.layouts as layouts
    with pytest.raises(ArchiveError, match=r"1 files added, e.g. val/dog/new.jpg.*dvc repro -f download"):
        layouts.build_all(params, archives, manifest, tmp_path / "built")


def test_pinned_checksum_is_checked(tmp_path, good_sources):
    state = tmp_path / "state"
    placed = place_own_source("folder", SourceParams(path=str(good_sources["classes"])), tmp_path / "a", state)
    again = place_own_source("folder", SourceParams(path=str(good_sources["classes"]), sha256=placed["digest"]),
                             tmp_path / "a", state)
    assert again["digest"] == placed["digest"] and (tmp_path / "a/folder/train/cat").is_dir()
    with pytest.raises(OwnDataError, match=f"it is {placed['digest']}.*data.sources.folder.sha256"):
        place_own_source("folder", SourceParams(path=str(good_sources["classes"]), sha256="0" * 64),
                         tmp_path / "b", state)
    assert not (tmp_path / "b/folder").exists()
    with pytest.raises(OwnDataError, match="does not exist"):
        place_own_source("folder", SourceParams(path=str(tmp_path / "nope")), tmp_path / "b", state)


def test_params_need_a_source_for_own_data_and_accept_both_shapes():
    with pytest.raises(ParamsError, match="needs data.sources.folder"):
        parse_params({"data": {"dataset": "folder"}})
    with pytest.raises(ParamsError, match="needs data.sources.coco_folder"):
        parse_params({"data": {"detection_dataset": "coco_folder"}})
    with pytest.raises(ParamsError, match="sha256"):
        parse_params({"data": {"dataset": "folder", "sources": {"folder": {"path": "/x", "sha256": "12"}}}})
    p = parse_params({"data": {"sources": {"ILSVRC2012_img_val.tar": "/data/val.tar",
                                           "folder": {"path": "/data/f.zip", "md5": "a" * 32}}}})
    assert p.data.source("ILSVRC2012_img_val.tar").path == "/data/val.tar"
    assert p.data.source("folder").md5 == "a" * 32 and p.data.source("nothing") is None
