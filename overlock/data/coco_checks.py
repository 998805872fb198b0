"""Checks of a COCO instances file of your own data, before anything is trained on it.

Each problem raises :class:`CocoDataError` naming the file, the offending entry and the fix: not JSON; no
``images``/``annotations``/``categories`` list; duplicate image, annotation or category ids (or category names,
which MMDetection maps classes by); an image listed but missing on disk; an annotation of an unknown image or
category; a box with non-positive size or outside its image (more than :data:`BOX_TOLERANCE` pixels).
Crowd annotations (``iscrowd: 1``) and images without annotations are fine.

:func:`normalize_coco` returns the file as the training code reads it: categories in id order (the order of the
detector's classes), ``width``/``height`` filled in from the image when missing, ``area`` (box area) and
``iscrowd`` (0) filled in when missing.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath

from PIL import Image

from overlock.data.extract import ArchiveError

__all__ = ["CocoDataError", "load_coco", "normalize_coco", "same_categories", "BOX_TOLERANCE"]

BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (rounding in annotation tools)
SHOW = 5  # offending entries named in a message


class CocoDataError(ArchiveError):
    """A COCO instances file of your own data is malformed; the message names the file and the fix."""


def _some(items: list) -> str:
    head = ", ".join(map(str, items[:SHOW]))
    return head + (f" and {len(items) - SHOW} more" if len(items) > SHOW else "")


def _sorted(values) -> list:
    try:
        return sorted(values)
    except TypeError:  # ids of mixed types: still a stable order
        return sorted(values, key=str)


def load_coco(path: Path, where: str) -> dict:
    """Parse and structurally check the COCO JSON at ``path`` (``where``: how messages name the file)."""
    try:
        coco = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoDataError(f"{where} is not valid JSON ({err}); export the annotations again in COCO format "
                            f"(a JSON object with images, annotations and categories)") from None
    if not isinstance(coco, dict):
        raise CocoDataError(f"{where} holds a JSON {type(coco).__name__}, not a COCO object; export the "
                            f"annotations in COCO format (a JSON object with images, annotations and categories)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        raise CocoDataError(f"{where} lacks {' and '.join(repr(k) for k in missing)} (a list each): it is not a "
                            f"COCO instances file. Add the list(s) (an empty annotations list is fine) or export "
                            f"the annotations in COCO format")
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "category_id", "bbox")),
                        ("categories", ("id", "name"))):
        one = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
        bad = [i for i, e in enumerate(coco[key]) if not isinstance(e, dict) or any(f not in e for f in fields)]
        if bad:
            raise CocoDataError(f"{where}: {key} entries {_some(bad)} (by position) lack one of "
                                f"{', '.join(fields)}; every {one} needs them")
        dup = _sorted(k for k, n in Counter(e["id"] for e in coco[key]).items() if n > 1)
        if dup:
            raise CocoDataError(f"{where}: duplicate {one} id(s) {_some(dup)}; ids must be unique within "
                                f"{key}: renumber the {key}")
    dup = sorted(k for k, n in Counter(str(c["name"]) for c in coco["categories"]).items() if n > 1)
    if dup:
        raise CocoDataError(f"{where}: duplicate category name(s) {_some(dup)}; the detector names its classes by "
                            f"category name, so give each category its own name (or merge them)")
    if not coco["categories"]:
        raise CocoDataError(f"{where} has an empty categories list; list the object classes as categories")
    return coco


def _safe_name(name: str, where: str, image_id) -> str:
    norm = str(name).replace("\\", "/")
    if not norm or norm.startswith("/") or ".." in PurePosixPath(norm).parts or (len(norm) > 1 and norm[1] == ":"):
        raise CocoDataError(f"{where}: image id {image_id} has file_name {name!r}, which is not a path inside the "
                            f"images folder; use a path relative to it")
    return norm


def normalize_coco(coco: dict, where: str, images_dir: Path, images_where: str) -> dict:
    """Check ``coco`` against its images folder and return it normalised (see the module docstring)."""
    images_dir = Path(images_dir)
    sizes, missing = {}, []
    names = Counter()
    for img in coco["images"]:
        name = _safe_name(img["file_name"], where, img["id"])
        names[name] += 1
        path = images_dir / name
        if not path.is_file():
            missing.append(name)
            continue
        try:
            with Image.open(path) as im:
                sizes[img["id"]] = im.size
        except Exception:  # unreadable: reported and excluded by the image verification later
            sizes[img["id"]] = None
    if missing:
        raise CocoDataError(f"{where} lists {len(missing)} image(s) that are not in {images_where}: {_some(missing)}. "
                            f"Add the files, or remove those images (and their annotations) from the JSON")
    dup = [n for n, k in names.items() if k > 1]
    if dup:
        raise CocoDataError(f"{where}: file_name(s) {_some(dup)} listed for more than one image id; list each image "
                            f"once")
    images = []
    for img in coco["images"]:
        img = dict(img)
        actual = sizes.get(img["id"])
        if "width" not in img or "height" not in img:
            if actual is None:
                raise CocoDataError(f"{where}: image {img['file_name']} has no width/height and cannot be read; "
                                    f"add width and height to the JSON or replace the image")
            img["width"], img["height"] = actual
        elif actual is not None and tuple(actual) not in ((img["width"], img["height"]), (img["height"], img["width"])):
            raise CocoDataError(f"{where}: image {img['file_name']} is {actual[0]}x{actual[1]} pixels but the JSON "
                                f"says {img['width']}x{img['height']}; correct width/height in the JSON (or the "
                                f"image)")
        images.append(img)
    by_id = {i["id"]: i for i in images}
    cat_ids = {c["id"] for c in coco["categories"]}
    annotations = []
    for ann in coco["annotations"]:
        ann = dict(ann)
        if ann["image_id"] not in by_id:
            raise CocoDataError(f"{where}: annotation {ann['id']} refers to image_id {ann['image_id']}, which is not "
                                f"in images; add the image or remove the annotation")
        if ann["category_id"] not in cat_ids:
            raise CocoDataError(f"{where}: annotation {ann['id']} has category_id {ann['category_id']}, which is not "
                                f"in categories (ids {_some(_sorted(cat_ids))}); add the category or fix "
                                f"the annotation")
        img, box = by_id[ann["image_id"]], ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise CocoDataError(f"{where}: annotation {ann['id']} has bbox {box!r}; a COCO box is [x, y, width, "
                                f"height] in pixels")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise CocoDataError(f"{where}: annotation {ann['id']} (image {img['file_name']}) has a box of "
                                f"non-positive size {box}; a COCO box is [x, y, width, height] with width and height "
                                f"> 0: fix or remove the annotation")
        tol = BOX_TOLERANCE
        if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
            raise CocoDataError(f"{where}: annotation {ann['id']} has box {box} ([x, y, width, height]) outside its "
                                f"image {img['file_name']} ({img['width']}x{img['height']}); fix the box (clip it to "
                                f"the image) or remove the annotation")
        ann.setdefault("area", float(w * h))
        ann.setdefault("iscrowd", 0)
        annotations.append(ann)
    return {**coco, "images": images, "annotations": annotations,
            "categories": sorted(coco["categories"], key=lambda c: c["id"])}


def same_categories(train: dict, val: dict, train_where: str, val_where: str) -> None:
    """The detector is trained on train's categories and evaluated on val's: they must be the same."""
    a = {c["id"]: str(c["name"]) for c in train["categories"]}
    b = {c["id"]: str(c["name"]) for c in val["categories"]}
    if a != b:
        only_a = sorted(f"{k}:{v}" for k, v in a.items() if b.get(k) != v)
        only_b = sorted(f"{k}:{v}" for k, v in b.items() if a.get(k) != v)
        raise CocoDataError(f"the categories of {train_where} and {val_where} differ (id:name only in train: "
                            f"{_some(only_a) or '-'}; only in val: {_some(only_b) or '-'}); both splits need the "
                            f"same categories list")
