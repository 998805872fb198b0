"""Standard dataset layouts built from verified archives, the held-out splits and the integrity report.

* ImageNet-1K (and the demo, packed the same way): ``train/<wnid>/*.JPEG`` from the train tar of per-class
  tars, ``val/<wnid>/*.JPEG`` from the flat val tar and the devkit's ground truth + ``meta.mat``.
* ImageNet-100: the CMC subset, as relative symlinks into an ImageNet-1K tree next to it (no copies).
* CIFAR-10: the python batches to ``train/<class>/*.png`` and ``val/<class>/*.png``.
* COCO 2017: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``.
* ADE20K (and its demo): ``segmentation/ADEChallengeData2016/`` with ``splits/*.txt`` (:mod:`.seg_layouts`).
* Your own data (``folder``, ``coco_folder``): checked and placed by :mod:`overlock.data.own_layouts` into the
  same layouts (class folders; the COCO 2017 layout).

Then ``classification/classes.json`` + ``splits.json`` (deterministic per-class calibration split,
unreadable images excluded) and ``detection/splits/{train,calibration}.json``, and the integrity report.
Images are verified with PIL (``data.verify_images``: ``full`` decodes every image, in parallel over all CPU
cores for large datasets; ``header`` only checks the file header).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from overlock.data.extract import ArchiveError, check_tar_members, extract_inner_tars, safe_extract
from overlock.data.manifest import write_manifest
from overlock.data.own_layouts import build_class_folders, build_coco_folder, image_suffixes
from overlock.data.seg_layouts import build_ade, segmentation_splits
from overlock.data.sources import archive_dataset, expected_counts, imagenet100_classes
from overlock.state import write_json_atomic

log = logging.getLogger(__name__)
REPORT = "integrity_report.json"
IMAGE_SUFFIXES = image_suffixes()  # every format PIL opens
PARALLEL_VERIFY_MIN = 2000


# ------------------------------------------------------------------------------------------ ImageNet
def read_devkit(devkit: Path) -> tuple[list[int], dict[int, tuple[str, str]]]:
    """(validation ground truth as 1-based ILSVRC2012_IDs, {ILSVRC2012_ID: (wnid, words)} of leaf synsets)."""
    import scipy.io
    with tarfile.open(devkit) as tar:
        files = {m.name: m for m in tar.getmembers() if m.isfile()}

        def member(suffix: str):
            found = [n for n in files if n.endswith(suffix)]
            if not found:
                raise ArchiveError(f"{devkit.name} has no {suffix}; it is not an ILSVRC2012 devkit")
            return tar.extractfile(files[found[0]]).read()
        truth = [int(v) for v in member("data/ILSVRC2012_validation_ground_truth.txt").split()]
        synsets = scipy.io.loadmat(io.BytesIO(member("data/meta.mat")), squeeze_me=True)["synsets"]
    leaves = {int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]))
              for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0}
    return truth, leaves


def _val_index(name: str) -> int:
    found = re.search(r"(\d+)\.jpe?g$", name, re.IGNORECASE)
    if not found:
        raise ArchiveError(f"unexpected validation image name {name!r} (expected ILSVRC2012_val_<n>.JPEG)")
    return int(found.group(1))


def build_imagenet(train_tar: Path, val_tar: Path, devkit: Path, root: Path) -> list[dict]:
    """ImageNet layout under ``root``; resumable (finished classes and the val split are kept)."""
    truth, synsets = read_devkit(devkit)
    by_wnid = {w: words for w, words in synsets.values()}
    train_dir = root / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(train_tar) as outer:
        members = [m for m in check_tar_members(outer, train_dir, train_tar.name) if m.isfile()]
        class_tars = [m for m in members if m.name.endswith(".tar")]
        if not class_tars:
            raise ArchiveError(f"{train_tar.name} holds no per-class tars (<wnid>.tar); it is not the ImageNet "
                               f"train archive")
        unknown = [m.name for m in class_tars if PurePosixPath(m.name).stem not in by_wnid]
        if unknown:
            raise ArchiveError(f"{train_tar.name}: class tar {unknown[0]} is not a class of the devkit's meta.mat")
    # per-class tars in parallel over every CPU; finished classes (an earlier, killed run) are kept
    extract_inner_tars(train_tar, class_tars, [train_dir / PurePosixPath(m.name).stem for m in class_tars])
    done = root / ".val_done"
    if not done.exists():
        val_dir = root / "val"
        with tarfile.open(val_tar) as tar:
            files = [m for m in check_tar_members(tar, val_dir, val_tar.name) if m.isfile()]
            if len(files) != len(truth):
                raise ArchiveError(f"{val_tar.name} holds {len(files)} images but the devkit ground truth lists "
                                   f"{len(truth)}; the archives do not belong together")
            for m in tqdm(files, desc="val images", unit="img", disable=None):
                wnid = synsets[truth[_val_index(m.name) - 1]][0]
                dest = val_dir / wnid / PurePosixPath(m.name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, dest.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        done.touch()
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [{"id": w, "name": by_wnid[w]} for w in wnids]


def link_imagenet100(imagenet1k: Path, root: Path) -> list[dict]:
    """ImageNet-100 (CMC subset) as relative symlinks to the class folders of ``imagenet1k``."""
    wnids = sorted(imagenet100_classes())
    missing = [w for w in wnids if not (imagenet1k / "train" / w).is_dir()]
    if missing:
        raise ArchiveError(f"the ImageNet-1K archive lacks {len(missing)} ImageNet-100 classes (e.g. "
                           f"{missing[:3]}); use the full ILSVRC2012 train archive")
    names = {c["id"]: c["name"] for c in json.loads((imagenet1k / "classes.json").read_text())}
    for split in ("train", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for w in wnids:
            link = root / split / w
            if not link.is_symlink():
                os.symlink(os.path.relpath(imagenet1k / split / w, root / split), link)
    return [{"id": w, "name": names[w]} for w in wnids]


# ------------------------------------------------------------------------------------------ CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches only: plain containers and NumPy arrays, no other code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch references {module}.{name}; refusing to load it")
        return super().find_class(module, name)


def _load_batch(data: bytes) -> dict:
    obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def build_cifar10(archive: Path, root: Path) -> list[dict]:
    """CIFAR-10 python batches -> ``train/<class>/*.png`` and ``val/<class>/*.png``."""
    with tarfile.open(archive) as tar:
        members = {PurePosixPath(m.name).name: m for m in check_tar_members(tar, root, archive.name) if m.isfile()}
        need = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        if any(n not in members for n in need):
            raise ArchiveError(f"{archive.name} lacks {[n for n in need if n not in members]}; it is not "
                               f"cifar-10-python.tar.gz")
        read = {n: _load_batch(tar.extractfile(members[n]).read()) for n in need}
    names = [n.decode() if isinstance(n, bytes) else n for n in read["batches.meta"]["label_names"]]
    for split, batches in (("train", need[:5]), ("val", ["test_batch"])):
        index = 0
        for b in batches:
            data = np.asarray(read[b]["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for img, label in zip(tqdm(data, desc=f"{split} {b}", disable=None, leave=False), read[b]["labels"]):
                dest = root / split / names[label] / f"{index:05d}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(dest)
                index += 1
    return [{"id": n, "name": n} for n in names]


# -------------------------------------------------------------------------------------------- COCO
def build_coco(train_zip: Path, val_zip: Path, annotations_zip: Path, root: Path) -> None:
    """COCO 2017 layout (images and instance annotations) under ``root``; finished zips are kept."""
    for archive, split in ((train_zip, "train2017"), (val_zip, "val2017")):
        done = root / f".{split}_done"
        if not done.exists():
            safe_extract(archive, root)
            if not (root / split).is_dir():
                raise ArchiveError(f"{archive.name} holds no {split}/ folder; it is not the COCO {split} zip")
            done.touch()
    wanted = [f"annotations/instances_{s}.json" for s in ("train2017", "val2017")]
    safe_extract(annotations_zip, root, members=wanted)
    missing = [w for w in wanted if not (root / w).exists()]
    if missing:
        raise ArchiveError(f"{annotations_zip.name} lacks {missing}; it is not the COCO 2017 annotations zip")


# -------------------------------------------------------------------------------- image verification
def check_image(path: str, mode: str = "full") -> str | None:
    """None when PIL can read ``path`` (``full``: decode all pixels; ``header``: verify), else the error."""
    return check_image_digest(path, mode)[0]


def check_image_digest(path: str, mode: str = "full") -> tuple[str | None, str | None]:
    """(:func:`check_image`'s error, the file's md5) from one read of the file (the md5 goes into the
    dataset's ``MANIFEST.json``; None when the file cannot be read)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        return f"{type(err).__name__}: {err}", None
    digest = hashlib.md5(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "full":
                im.load()
            else:
                im.verify()
    except Exception as err:  # PIL raises many types for damaged files
        return f"{type(err).__name__}: {err}", digest
    return None, digest


def _check_pair(args: tuple[str, str]) -> tuple[str | None, str | None]:
    return check_image_digest(*args)


def find_unreadable(root: Path, relpaths: list[str], mode: str, digests: dict | None = None) -> dict[str, str]:
    """{relative path: error} of the images PIL cannot read (parallel over all cores for large sets).

    ``digests``: filled with {real path: md5} of every file read (the same read as the check)."""
    jobs = [(str(root / p), mode) for p in relpaths]
    workers = os.cpu_count() or 1
    if len(jobs) >= PARALLEL_VERIFY_MIN and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            chunk = max(1, min(256, len(jobs) // (workers * 8)))
            checked = list(tqdm(pool.map(_check_pair, jobs, chunksize=chunk), total=len(jobs), desc="verify images",
                                disable=None))
    else:
        checked = [_check_pair(j) for j in jobs]
    if digests is not None:
        digests.update((os.path.realpath(path), md5) for (path, _), (_, md5) in zip(jobs, checked) if md5)
    return {p: err for p, (err, _) in zip(relpaths, checked) if err}


# ---------------------------------------------------------------------------------------------- splits
def _list_images(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder)
                  if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def classification_splits(root: Path, classes: list[dict], seed: int, per_class: int, mode: str,
                          digests: dict | None = None) -> dict:
    """Write ``classes.json`` and ``splits.json`` under ``root``; return the classification report."""
    write_json_atomic(root / "classes.json", classes)
    files = {s: {c["id"]: [f"{s}/{c['id']}/{n}" for n in _list_images(root / s / c["id"])] for c in classes}
             for s in ("train", "val")}
    bad = find_unreadable(root, [p for s in files.values() for ps in s.values() for p in ps], mode, digests)
    calibration, per_class_counts = [], {}
    for k, c in enumerate(classes):
        usable = [p for p in files["train"][c["id"]] if p not in bad]
        if len(usable) <= per_class:
            raise ArchiveError(f"class {c['id']} (train/{c['id']}/) has only {len(usable)} readable train images, "
                               f"not more than data.calibration_per_class={per_class}; add train images to the "
                               f"class or lower data.calibration_per_class")
        pick = np.random.default_rng([seed % (2**32), k]).choice(len(usable), per_class, replace=False)
        held = sorted(usable[i] for i in pick)
        calibration += held
        per_class_counts[c["id"]] = {"train": len(files["train"][c["id"]]), "val": len(files["val"][c["id"]]),
                                     "calibration": len(held)}
    excluded = sorted(bad)
    write_json_atomic(root / "splits.json", {"calibration": calibration, "excluded": excluded})
    n_train = sum(len(v) for v in files["train"].values())
    n_val = sum(len(v) for v in files["val"].values())
    n_bad_train = sum(p.startswith("train/") for p in excluded)
    return {"classes": len(classes), "images": {"train": n_train, "val": n_val},
            "splits": {"train": n_train - len(calibration) - n_bad_train, "calibration": len(calibration),
                       "val": n_val - (len(excluded) - n_bad_train)},
            "excluded": len(excluded), "excluded_files": {p: bad[p] for p in excluded},
            "per_class": per_class_counts}


def calibration_images(coco: dict, seed: int, per_class: int, skip: set[int]) -> list[int]:
    """Deterministic held-out image ids: images (seeded order) until each category has ``per_class``."""
    cats_of: dict[int, set[int]] = {}
    for a in coco["annotations"]:
        cats_of.setdefault(a["image_id"], set()).add(a["category_id"])
    ids = sorted(i["id"] for i in coco["images"] if i["id"] in cats_of and i["id"] not in skip)
    need = {c["id"]: per_class for c in coco["categories"]}
    chosen = []
    for idx in np.random.default_rng(seed % (2**32)).permutation(len(ids)):
        image_id = ids[idx]
        if any(need.get(c, 0) > 0 for c in cats_of[image_id]):
            chosen.append(image_id)
            for c in cats_of[image_id]:
                need[c] = need.get(c, 0) - 1
        if all(v <= 0 for v in need.values()):
            break
    return sorted(chosen)


def _coco_subset(coco: dict, image_ids: set[int]) -> dict:
    return {**coco, "images": [i for i in coco["images"] if i["id"] in image_ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}


def detection_splits(root: Path, seed: int, per_class: int, mode: str, digests: dict | None = None) -> dict:
    """Write ``splits/{train,calibration}.json`` (COCO subsets of train); return the detection report."""
    report: dict = {"images": {}, "annotations": {}, "excluded_files": {}}
    train = None
    for split in ("train2017", "val2017"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        names = [f"{split}/{i['file_name']}" for i in coco["images"]]
        bad = find_unreadable(root, names, mode, digests)
        report["excluded_files"].update(bad)
        report["images"][split[:-4]] = len(coco["images"])
        report["annotations"][split[:-4]] = len(coco["annotations"])
        if split == "train2017":
            train, bad_train = coco, {i["id"] for i in coco["images"] if f"{split}/{i['file_name']}" in bad}
    cal = set(calibration_images(train, seed, per_class, bad_train))
    keep = {i["id"] for i in train["images"]} - cal - bad_train
    (root / "splits").mkdir(exist_ok=True)
    write_json_atomic(root / "splits" / "train.json", _coco_subset(train, keep))
    write_json_atomic(root / "splits" / "calibration.json", _coco_subset(train, cal))
    names = [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]  # the detector's classes
    report.update(categories=len(train["categories"]), category_names=names, excluded=len(report["excluded_files"]),
                  splits={"train": len(keep), "calibration": len(cal), "val": report["images"]["val"]})
    return report


# ------------------------------------------------------------------------------------ the whole stage
def _archives_by_role(manifest: dict, archives: Path, dataset: str) -> dict[str, Path]:
    name = archive_dataset(dataset)
    found = {m["role"]: Path(archives) / f for f, m in manifest.items() if m["dataset"] == name}
    if not found:
        raise ArchiveError(f"no archives of {name} in {archives}: run the download stage with "
                           f"data.dataset/data.detection_dataset set as now")
    return found


def _with_expected(section: dict, dataset: str) -> dict:
    expected = expected_counts(dataset)
    if expected:
        section["expected"] = expected
        section["matches_expected"] = all(section["images"].get(k) == v for k, v in expected.items())
        if not section["matches_expected"]:
            log.warning("%s: found %s images, the published dataset has %s", dataset, section["images"], expected)
    return section


def build_all(params, archives: Path, manifest: dict, root: Path) -> dict:
    """Build the selected datasets under ``root`` and write the splits and the integrity report."""
    data = params.data
    mode = data.verify_images
    cls_root = root / "classification"
    a = _archives_by_role(manifest, archives, data.dataset)
    extra: dict = {}
    if data.dataset == "folder":
        classes, extra = build_class_folders(a["data"], manifest["folder"], cls_root, data.calibration_per_class)
    elif data.dataset in ("demo", "imagenet1k"):
        classes = build_imagenet(a["train"], a["val"], a["devkit"], cls_root)
    elif data.dataset == "imagenet100":
        full = root / "imagenet1k"
        full_classes = build_imagenet(a["train"], a["val"], a["devkit"], full)
        write_json_atomic(full / "classes.json", full_classes)
        classes = link_imagenet100(full, cls_root)
    else:
        classes = build_cifar10(a["python"], cls_root)
    if data.detection_dataset == "coco_folder":  # checked before the (long) image verification of either
        d = _archives_by_role(manifest, archives, data.detection_dataset)
        det_extra = build_coco_folder(d["data"], manifest["coco_folder"], root / "detection")
    digests: dict[str, str] = {}  # md5 of every verified image, for the manifest
    report = {"verify_images": mode,
              "classification": _with_expected({"dataset": data.dataset, **classification_splits(
                  cls_root, classes, params.seed, data.calibration_per_class, mode, digests), **extra}, data.dataset)}
    if data.detection_dataset != "none":
        if data.detection_dataset != "coco_folder":
            d = _archives_by_role(manifest, archives, data.detection_dataset)
            build_coco(d["train"], d["val"], d["annotations"], root / "detection")
            det_extra = {}
        report["detection"] = _with_expected({"dataset": data.detection_dataset, **detection_splits(
            root / "detection", params.seed, data.calibration_per_class, mode, digests), **det_extra},
            data.detection_dataset)
    if data.segmentation_dataset != "none":  # ADE20K layout (overlock.data.seg_layouts)
        s = _archives_by_role(manifest, archives, data.segmentation_dataset)
        build_ade(s["trainval"], root / "segmentation")
        report["segmentation"] = _with_expected({"dataset": data.segmentation_dataset, **segmentation_splits(
            root / "segmentation", params.seed, data.calibration_per_class * 10, mode)}, data.segmentation_dataset)
    write_json_atomic(root / REPORT, report)
    plot_class_counts(report["classification"], root / "integrity_classes.png")
    write_manifest(root, digests)  # last: it lists every file above
    return report


def report_metrics(report: dict) -> dict:
    """The numbers of the integrity report, nested one level, for ``dvc metrics show``."""
    out = {}
    for section in ("classification", "detection", "segmentation"):
        if section not in report:
            continue
        r = report[section]
        m = {f"{k}_images": v for k, v in r["images"].items()}
        m.update({f"{k}_split": v for k, v in r["splits"].items()})
        m.update(excluded=r["excluded"], **({"classes": r["classes"]} if "classes" in r else
                                            {"categories": r["categories"]}))
        if "annotations" in r:
            m.update({f"{k}_annotations": v for k, v in r["annotations"].items()})
        if "skipped_files" in r:  # own data: files in class folders PIL cannot open
            m["skipped_files"] = r["skipped_files"]
        for key in ("crowd_annotations", "images_without_annotations", "unlisted_files"):
            m.update({f"{k}_{key}": v for k, v in r.get(key, {}).items()})
        if "expected" in r:
            m.update({f"expected_{k}": v for k, v in r["expected"].items()},
                     matches_expected=int(r["matches_expected"]))
        out[section] = m
    return out


def plot_class_counts(section: dict, path: Path) -> None:
    """Bar chart of train/val images per class (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(section["per_class"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, min(40, len(names) * 0.3)), 3.5))
    for off, split in ((-0.2, "train"), (0.2, "val")):
        ax.bar(x + off, [section["per_class"][n][split] for n in names], width=0.4, label=split)
    if len(names) <= 100:
        ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylabel("images")
    ax.set_title(f"{section['dataset']}: images per class ({section['excluded']} excluded as unreadable)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
