"""Datasets the training stages read from the extract stage's layout (the one place that knows it).

``classification/``: ``train/<class>/*``, ``val/<class>/*``, ``classes.json``, ``splits.json`` (paths relative
to ``classification/``: ``"calibration"`` held out of train, ``"excluded"`` unreadable images).
``detection/``: COCO 2017 layout with ``splits/{train,calibration}.json``; MMDetection's ``CocoDataset`` reads
it through :func:`coco_split_files`.
``segmentation/``: ``ADEChallengeData2016/`` with ``splits/{train,calibration,val}.txt`` and ``classes.json``;
mmsegmentation's datasets read it through :func:`segmentation_split_files`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "calibration", "val")


def classification_root(data_dir: str | Path) -> Path:
    """``<data_dir>/classification`` (accepts that folder itself too)."""
    data_dir = Path(data_dir)
    return data_dir if (data_dir / "classes.json").exists() else data_dir / "classification"


def detection_root(data_dir: str | Path) -> Path:
    """``<data_dir>/detection`` (accepts that folder itself too)."""
    data_dir = Path(data_dir)
    return data_dir if (data_dir / "annotations").is_dir() else data_dir / "detection"


def load_classes(root: str | Path) -> list[dict]:
    """Ordered ``[{"id": wnid-or-name, "name": human name}]``; label ``i`` is entry ``i``."""
    path = classification_root(root) / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the extract stage first (dvc repro extract)")
    return json.loads(path.read_text())


def load_splits(root: str | Path) -> dict[str, list[str]]:
    """``{"calibration": [...], "excluded": [...]}`` relative to the classification root."""
    return json.loads((classification_root(root) / "splits.json").read_text())


def classification_samples(root: str | Path, split: str) -> list[tuple[str, int]]:
    """(absolute path, label) of ``split``: train (minus calibration and excluded), calibration or val."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    root = classification_root(root)
    classes = load_classes(root)
    splits = load_splits(root)
    excluded = set(splits["excluded"])
    label = {c["id"]: i for i, c in enumerate(classes)}
    if split == "calibration":
        rel = [p for p in splits["calibration"] if p not in excluded]
    else:
        held = set(splits["calibration"]) if split == "train" else set()
        rel = []
        for c in classes:
            folder = root / split / c["id"]
            names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".")) if folder.is_dir() else []
            rel += [p for p in (f"{split}/{c['id']}/{n}" for n in names) if p not in excluded and p not in held]
    return [(str(root / p), label[p.split("/")[1]]) for p in rel]


class ClassificationDataset(Dataset):
    """(image, label) pairs of one split; ``transform`` (e.g. from ``timm.data.create_transform``) maps PIL.

    ``classes``: class ids (wnids/folder names) in label order; ``class_names``: human names;
    ``samples``: (path, label) list; ``targets``: labels.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        self.root = classification_root(root)
        self.split = split
        self.transform = transform
        records = load_classes(self.root)
        self.classes = [c["id"] for c in records]
        self.class_names = [c["name"] for c in records]
        self.samples = classification_samples(self.root, split)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return read_image(path, self.transform), label


def read_image(path: str, transform: Callable | None = None):
    """The image at ``path`` through ``transform``: given the path when the transform decodes the file itself
    (``reads_files``, training/loader.py), else the RGB PIL image; without a transform, the PIL image."""
    if getattr(transform, "reads_files", False):
        return transform(path)
    with Image.open(path) as im:
        image = im.convert("RGB")
    return transform(image) if transform else image


def coco_split_files(detection_root_dir: str | Path) -> dict[str, tuple[str, str]]:
    """``{"train"|"calibration"|"val": (annotation json, image folder with trailing /)}`` for mmdet configs."""
    root = Path(detection_root_dir).resolve()
    files = {"train": (root / "splits" / "train.json", root / "train2017"),
             "calibration": (root / "splits" / "calibration.json", root / "train2017"),
             "val": (root / "annotations" / "instances_val2017.json", root / "val2017")}
    missing = [str(a) for a, _ in files.values() if not a.exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not found: run the extract stage with data.detection_dataset set")
    return {k: (str(a), str(i) + "/") for k, (a, i) in files.items()}


def coco_categories(detection_root_dir: str | Path) -> list[str]:
    """Category names in COCO id order (mmdet's ``classes``)."""
    ann = json.loads(Path(coco_split_files(detection_root_dir)["val"][0]).read_text())
    return [c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"])]


def segmentation_split_files(data_dir: str | Path) -> dict[str, dict[str, str]]:
    """``{"train"|"calibration"|"val": {"img_dir", "ann_dir", "split"}}`` (absolute) of the extracted ADE20K
    layout under ``<data_dir>/segmentation`` (mmseg dataset arguments)."""
    root = Path(data_dir).resolve()
    root = root if (root / "splits").is_dir() and (root / "ADEChallengeData2016").is_dir() else root / "segmentation"
    out = {}
    for split, sub in (("train", "training"), ("calibration", "training"), ("val", "validation")):
        out[split] = {"img_dir": str(root / "ADEChallengeData2016" / "images" / sub),
                      "ann_dir": str(root / "ADEChallengeData2016" / "annotations" / sub),
                      "split": str(root / "splits" / f"{split}.txt")}
    missing = [v["split"] for v in out.values() if not Path(v["split"]).exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not found: run the extract stage with data.segmentation_dataset set "
                                f"(`dvc repro extract`)")
    return out


def segmentation_classes(data_dir: str | Path) -> list[str]:
    """Class names of the extracted segmentation dataset (``classes.json``; empty when the archive had none)."""
    files = segmentation_split_files(data_dir)
    path = Path(files["train"]["split"]).parent.parent / "classes.json"
    return json.loads(path.read_text()) if path.exists() else []


# ---------------------------------------------------------------------------------------- run records
def _listing_digest(lines: list[str], *blobs: bytes) -> str:
    h = hashlib.md5()
    for blob in blobs:
        h.update(blob)
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def classification_split_record(data_dir: str | Path, split: str, name: str) -> dict:
    """A classification split for the run records: digest = md5 of ``classes.json`` then one
    ``<path relative to classification/>\\t<bytes>`` line per sample in label order (file sizes, not
    contents: a stat per image, cheap at ImageNet scale; any added, removed, moved or resized image changes it)."""
    root = classification_root(data_dir)
    samples = classification_samples(root, split)
    lines = [f"{Path(p).relative_to(root).as_posix()}\t{os.stat(p).st_size}" for p, _ in samples]
    return {"name": f"{name}/{split}", "task": "classification", "split": split, "source": str(root / ("splits.json" if split == "calibration" else split)),
            "digest": _listing_digest(lines, (root / "classes.json").read_bytes()),
            "profile": {"num_images": len(samples), "num_classes": len(load_classes(root))}}


def detection_split_record(data_dir: str | Path, split: str, name: str) -> dict:
    """A detection split for the run records: digest = md5 of its COCO annotation file then one
    ``<file_name>\\t<bytes>`` line per image it lists."""
    ann_file, image_dir = coco_split_files(detection_root(data_dir))[split]
    blob = Path(ann_file).read_bytes()
    ann = json.loads(blob)
    lines = [f"{im['file_name']}\t{os.stat(Path(image_dir) / im['file_name']).st_size}" for im in ann["images"]]
    return {"name": f"{name}/{split}", "task": "detection", "split": split, "source": ann_file,
            "digest": _listing_digest(lines, blob),
            "profile": {"num_images": len(ann["images"]), "num_annotations": len(ann.get("annotations", [])),
                        "num_categories": len(ann.get("categories", []))}}


def split_records(data_dir: str | Path, splits: tuple[str, ...], names: dict[str, str]) -> list[dict]:
    """Records (name, split, digest, source, profile) of ``splits`` such as ``"classification/train"``,
    ``"detection/val"``; those absent from ``data_dir`` (e.g. no detection dataset) are left out.
    ``names``: the dataset name per task (``data.dataset``, ``data.detection_dataset``)."""
    records, data_dir = [], Path(data_dir).resolve()  # sources as absolute paths (stages get relative ones)
    for item in splits:
        task, split = item.split("/")
        if task == "classification" and (classification_root(data_dir) / "classes.json").exists():
            records.append(classification_split_record(data_dir, split, names[task]))
        elif task == "detection" and (detection_root(data_dir) / "annotations").is_dir():
            records.append(detection_split_record(data_dir, split, names[task]))
    return records
