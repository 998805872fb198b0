"""Your own data to the standard layouts: class folders (``folder``) and COCO-format detection sets (``coco_folder``).

The source (``data/archives/<key>``: a tree of links to a directory, or a link to a tar/tar.gz/zip archive) is
checked completely before anything is placed; each problem raises :class:`OwnDataLayoutError` naming the file
(as the user knows it: the source directory or ``archive:member``) and the fix. A source whose content sits in
one top-level folder (``tar czf flowers.tar.gz flowers/``) is accepted as well.

* ``folder``: ``train/<class>/`` and ``val/<class>/``, any number of classes, any image format PIL reads (files
  in sub-folders of a class count for it). Class ids and names are the folder names, in sorted order.
  Other files are skipped and listed in the integrity report.
* ``coco_folder``: ``train/`` and ``val/`` image folders and ``annotations/instances_{train,val}.json`` (or
  ``annotations/{train,val}.json``), checked by :mod:`overlock.data.coco_checks`. Only the listed images are
  placed; the layout is the COCO 2017 one the detector reads (``train2017/``, ``val2017/``,
  ``annotations/instances_{train,val}2017.json``).

Images are hard-linked from a directory source (copied across file systems) and moved out of an unpacked
archive, so the layout costs no second copy of the data.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path

from PIL import Image

from overlock.data.coco_checks import load_coco, normalize_coco, same_categories
from overlock.data.extract import ArchiveError, safe_extract
from overlock.data.own_sources import tree_files
from overlock.state import write_json_atomic

__all__ = ["OwnDataLayoutError", "image_suffixes", "build_class_folders", "build_coco_folder", "source_report"]

SHOW = 5
NOT_IMAGES = {"BUFR", "GRIB", "HDF5", "FITS", "MPEG", "EPS", "WMF"}  # stub or non-image formats PIL registers
ANNOTATION_NAMES = ("annotations/instances_{split}.json", "annotations/{split}.json")


class OwnDataLayoutError(ArchiveError):
    """Your own data does not have the expected layout; the message names the file and the fix."""


@lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """File suffixes of every image format PIL can open (``.jpg``, ``.png``, ``.tif``, ``.webp``, ...)."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in NOT_IMAGES)


def _some(items: list) -> str:
    head = ", ".join(map(str, items[:SHOW]))
    return head + (f" and {len(items) - SHOW} more" if len(items) > SHOW else "")


class _Source:
    """The unpacked source and how messages name a path in it (``dir/rel`` or ``archive:rel``)."""

    def __init__(self, link: Path, origin: str, work: Path, key: str):
        self.origin, self.key = origin, key
        if Path(link).is_dir():
            _check_links_current(Path(link), Path(origin), key)
            self.base, self.prefix, self.moves = Path(link), "", False
        else:
            unpacked = Path(work) / f".{key}.unpacked"
            shutil.rmtree(unpacked, ignore_errors=True)
            if not (zipfile.is_zipfile(link) or tarfile.is_tarfile(link)):
                raise OwnDataLayoutError(f"{origin} is neither a directory nor a tar, tar.gz or zip archive; point "
                                         f"data.sources.{key} at the folder of your data or an archive of it")
            safe_extract(Path(link), unpacked)
            self.base, self.prefix, self.moves = unpacked, "", True
        self.unpacked = self.base if self.moves else None
        entries = [p for p in self.base.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        if not (self.base / "train").exists() and len(entries) == 1 and entries[0].is_dir():
            self.prefix = entries[0].name + "/"  # everything in one top-level folder
            self.base = entries[0]

    def where(self, rel: str = "") -> str:
        rel = self.prefix + rel
        if self.moves:
            return f"{self.origin}:{rel}" if rel else self.origin
        return f"{self.origin.rstrip('/')}/{rel}" if rel else self.origin

    def listing(self) -> str:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in self.base.iterdir() if not p.name.startswith("."))
        return _some(names) or "nothing"

    def place(self, src: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.moves:
            os.replace(src, dest)
            return
        try:
            os.link(src, dest)  # follows the link to the user's file
        except OSError:
            shutil.copy2(src, dest)

    def close(self) -> None:
        if self.unpacked is not None:
            shutil.rmtree(self.unpacked, ignore_errors=True)


def _check_links_current(link: Path, origin: Path, key: str) -> None:
    """The download stage's link tree still lists the files of the source directory (DVC cannot see additions)."""
    if not origin.is_dir():
        raise OwnDataLayoutError(f"{origin} (data.sources.{key}) is gone; restore it or set data.sources.{key}")
    now, linked = set(tree_files(origin)), set(tree_files(link))
    if now != linked:
        added, gone = sorted(now - linked), sorted(linked - now)
        raise OwnDataLayoutError(f"{origin} changed since the download stage placed it ({len(added)} files added, e.g. "
                                 f"{_some(added) or '-'}; {len(gone)} gone, e.g. {_some(gone) or '-'}). DVC sees "
                                 f"changed files, not added or deleted ones: run `dvc repro -f download` (then "
                                 f"`dvc repro`)")


def _require_split_dirs(src: _Source, layout: str) -> None:
    for split in ("train", "val"):
        if not (src.base / split).is_dir():
            raise OwnDataLayoutError(f"{src.where()} has no {split}/ folder, or no file in it (it holds: "
                                     f"{src.listing()}). Your own data needs {layout}; see README 'Your own data'")


# ----------------------------------------------------------------------------------------- class folders
def source_report(entry: dict) -> dict:
    """The integrity report's ``source`` of own data, from its download manifest ``entry``."""
    return {"source": {"path": entry["source"], "kind": entry["kind"], entry["algo"]: entry["digest"],
                       "files": entry["files"], "bytes": entry["size"]}}


def _scan_class_folders(src: _Source) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """({split: {class: image paths relative to the class folder}}, skipped non-image files)."""
    suffixes = image_suffixes()
    found: dict[str, dict[str, list[str]]] = {}
    skipped: list[str] = []
    for split in ("train", "val"):
        found[split] = {}
        for d in sorted(p for p in (src.base / split).iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = tree_files(d)
            found[split][d.name] = [f for f in files if Path(f).suffix.lower() in suffixes]
            skipped += [f"{split}/{d.name}/{f}" for f in files if Path(f).suffix.lower() not in suffixes]
    return found, skipped


def _check_class_folders(src: _Source, found: dict, skipped: list[str], per_class: int) -> None:
    if not found["train"]:
        loose = [p.name for p in (src.base / "train").iterdir() if p.is_file() and not p.name.startswith(".")]
        raise OwnDataLayoutError(
            f"{src.where('train/')} holds no class folders{f' ({len(loose)} loose files)' if loose else ''}: "
            f"no classes. Put each class's images in a folder named after the class, train/<class>/ and "
            f"val/<class>/")
    only_train = sorted(set(found["train"]) - set(found["val"]))
    only_val = sorted(set(found["val"]) - set(found["train"]))
    if only_train or only_val:
        raise OwnDataLayoutError(
            f"{src.where()}: the class folders of train/ and val/ differ (only in train/: "
            f"{_some(only_train) or '-'}; only in val/: {_some(only_val) or '-'}). Every class needs a folder in "
            f"both: add or rename the folders so train/ and val/ hold the same classes")
    for split in ("train", "val"):
        for cls, images in found[split].items():
            if not images:
                others = len([s for s in skipped if s.startswith(f"{split}/{cls}/")])
                raise OwnDataLayoutError(
                    f"{src.where(f'{split}/{cls}/')} holds no images"
                    f"{f' ({others} files PIL cannot open)' if others else ''}: an empty class. Add images (any "
                    f"format PIL reads: .jpg, .png, .webp, .tif, ...) or remove the class from train/ and val/")
    for cls, images in found["train"].items():
        if len(images) <= per_class:
            raise OwnDataLayoutError(
                f"{src.where(f'train/{cls}/')} has {len(images)} images, but the held-out calibration split takes "
                f"data.calibration_per_class={per_class} per class and training needs at least one more: add "
                f"train images to this class or lower data.calibration_per_class")


def build_class_folders(link: Path, entry: dict, root: Path, per_class: int) -> tuple[list[dict], dict]:
    """Check ``train/<class>/`` + ``val/<class>/`` and place the images under ``root``; return (classes, info).

    ``link``: ``data/archives/folder``; ``entry``: its download manifest entry (names the user's source).
    Files in sub-folders of a class are placed flat (``a/b.jpg`` as ``a__b.jpg``).
    """
    shutil.rmtree(root, ignore_errors=True)  # a failed earlier attempt in the same staging dir
    src = _Source(link, str(entry["source"]), root.parent, entry["dataset"])
    try:
        _require_split_dirs(src, "train/<class>/ and val/<class>/ image folders")
        found, skipped = _scan_class_folders(src)
        _check_class_folders(src, found, skipped, per_class)
        for split in ("train", "val"):
            for cls, images in found[split].items():
                for rel in images:
                    src.place(src.base / split / cls / rel, root / split / cls / rel.replace("/", "__"))
    finally:
        src.close()
    classes = [{"id": c, "name": c} for c in sorted(found["train"])]
    info = {**source_report(entry), "source_layout": "train/<class>/ + val/<class>/",
            "skipped_files": len(skipped), "skipped_examples": skipped[:20]}
    return classes, info


# ------------------------------------------------------------------------------------------- COCO folders
def _annotation_file(src: _Source, split: str) -> str:
    for pattern in ANNOTATION_NAMES:
        rel = pattern.format(split=split)
        if (src.base / rel).is_file():
            return rel
    raise OwnDataLayoutError(f"{src.where()} has no COCO annotation file for {split} (looked for "
                             f"{', '.join(p.format(split=split) for p in ANNOTATION_NAMES)}; it holds: "
                             f"{src.listing()}). Put the {split} annotations (COCO instances JSON) at "
                             f"{ANNOTATION_NAMES[0].format(split=split)}")


def build_coco_folder(link: Path, entry: dict, root: Path) -> dict:
    """Check the COCO-format source and build the COCO 2017 layout under ``root``; return the report info."""
    shutil.rmtree(root, ignore_errors=True)  # a failed earlier attempt in the same staging dir
    src = _Source(link, str(entry["source"]), root.parent, entry["dataset"])
    try:
        _require_split_dirs(src, "train/ and val/ image folders and annotations/instances_train.json + "
                                 "annotations/instances_val.json (COCO)")
        splits = {}
        for split in ("train", "val"):
            rel = _annotation_file(src, split)
            coco = load_coco(src.base / rel, src.where(rel))
            splits[split] = (rel, normalize_coco(coco, src.where(rel), src.base / split, src.where(f"{split}/")))
        same_categories(splits["train"][1], splits["val"][1], src.where(splits["train"][0]),
                        src.where(splits["val"][0]))
        info: dict = {**source_report(entry), "source_layout": "train/ + val/ + annotations/instances_{train,val}.json",
                      "crowd_annotations": {}, "images_without_annotations": {}, "annotations_without_masks": {},
                      "unlisted_files": {}}
        for split, (rel, coco) in splits.items():
            listed = {i["file_name"] for i in coco["images"]}
            annotated = {a["image_id"] for a in coco["annotations"]}
            info["crowd_annotations"][split] = sum(bool(a.get("iscrowd")) for a in coco["annotations"])
            info["images_without_annotations"][split] = sum(i["id"] not in annotated for i in coco["images"])
            info["annotations_without_masks"][split] = sum(not a.get("segmentation") for a in coco["annotations"])
            info["unlisted_files"][split] = len(set(tree_files(src.base / split)) - listed)
            for name in sorted(listed):
                src.place(src.base / split / name, root / f"{split}2017" / name)
            write_json_atomic(root / "annotations" / f"instances_{split}2017.json", coco)
    finally:
        src.close()
    return info
