"""Deterministic demo datasets, packed exactly like the real archives so the real extract path runs.

* Classification (``data.dataset: demo``): each class is a shape in a colour (hue); images vary in position,
  scale, rotation, colour, background texture and noise, some carry a distractor shape and some are faint
  (low contrast, small), so a small ConvNet learns the classes well above chance but not perfectly.
  Packed like ImageNet: a train tar of per-class tars, a flat val tar and a devkit with the validation
  ground truth and ``meta.mat``.
* Instances (``data.detection_dataset: demo_coco``): circles, rectangles and triangles with polygon masks on
  textured backgrounds, packed like COCO 2017 (image zips plus an annotation zip).
* Semantic segmentation (``data.segmentation_dataset: demo_ade``): a "wall" above a striped "floor" with
  discs, boxes, triangles and rings of overlapping colours, packed like ``ADEChallengeData2016.zip``
  (``images/``, ``annotations/`` with 0 = unlabelled, ``objectInfo150.txt``).

Everything is seeded by ``seed``; the same params give byte-identical archives. The writers of the archive
formats (:func:`write_imagenet_archives`, :func:`write_cifar10_archive`, :func:`write_coco_archives`) are
also used by the tests to build miniature real-format datasets.
"""
from __future__ import annotations

import colorsys
import gzip
import io
import json
import math
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from overlock.data.sources import DEMO_ARCHIVES
from overlock.state import file_digest

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "hexagon", "bar")
COLOURS = ("red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple", "magenta", "pink")
DETECTION_CATEGORIES = ({"id": 1, "name": "circle", "hue": 0.0}, {"id": 2, "name": "rectangle", "hue": 0.33},
                        {"id": 3, "name": "triangle", "hue": 0.62})
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ``radius`` rotated by ``angle``."""
    def ring(n: int, radii: Iterable[float]):
        return [(cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
                for i, r in zip(range(n), radii)]
    if shape in ("circle", "ring"):
        return ring(32, [radius] * 32)
    if shape in ("square", "rectangle"):
        return ring(4, [radius] * 4)
    if shape == "triangle":
        return ring(3, [radius] * 3)
    if shape == "hexagon":
        return ring(6, [radius] * 6)
    if shape == "star":
        return ring(10, [radius if i % 2 == 0 else radius * 0.45 for i in range(10)])
    if shape in ("cross", "bar"):
        w = radius * (0.33 if shape == "cross" else 0.3)
        arms = [(-radius, -w), (radius, -w), (radius, w), (-radius, w)]
        pts = arms if shape == "bar" else [(-radius, -w), (-w, -w), (-w, -radius), (w, -radius), (w, -w),
                                           (radius, -w), (radius, w), (w, w), (w, radius), (-w, radius),
                                           (-w, w), (-radius, w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(size: int, shape: str, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=255)
    if shape == "ring":
        draw.polygon(_polygon("circle", cx, cy, radius * 0.55, angle), fill=0)
    return mask


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, val))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-saturation, low-frequency texture plus pixel noise."""
    cells = int(rng.integers(3, 9))
    base = rng.uniform(60, 190)
    grid = np.clip(base + rng.normal(0, 30, (cells, cells, 1)) + rng.normal(0, 12, (cells, cells, 3)), 0, 255)
    img = Image.fromarray(grid.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _paste(img: Image.Image, mask: Image.Image, colour: tuple[int, int, int], alpha: float = 1.0) -> None:
    if alpha < 1.0:
        mask = mask.point(lambda v: int(v * alpha))
    img.paste(Image.new("RGB", img.size, colour), (0, 0), mask)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def demo_class_table(num_classes: int) -> list[dict]:
    """The demo classes: wnid-style id, human name, shape and hue of each."""
    out = []
    for k in range(num_classes):
        shape = SHAPES[k % len(SHAPES)]
        hue = (k * 0.381966) % 1.0 if num_classes > len(COLOURS) else k / num_classes
        colour = COLOURS[int(hue * len(COLOURS)) % len(COLOURS)]
        out.append({"id": f"n{99000000 + k:08d}", "name": f"{colour} {shape} {k}", "shape": shape, "hue": hue})
    return out


def demo_classification_image(cls: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of demo class ``cls``: its shape in its hue, with variation, distractors and faint cases."""
    img = _background(rng, size)
    if rng.random() < 0.4:  # distractor: another shape in another colour, smaller
        r = size * rng.uniform(0.07, 0.13)
        _paste(img, _shape_mask(size, SHAPES[int(rng.integers(len(SHAPES)))], *rng.uniform(r, size - r, 2), r,
                                rng.uniform(0, 2 * math.pi)),
               _rgb(rng.random(), rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
    faint = rng.random() < 0.08
    radius = size * (rng.uniform(0.1, 0.16) if faint else rng.uniform(0.2, 0.38))
    cx, cy = rng.uniform(radius, size - radius, 2)
    colour = _rgb(cls["hue"] + rng.normal(0, 0.025), rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))
    _paste(img, _shape_mask(size, cls["shape"], cx, cy, radius, rng.uniform(0, 2 * math.pi)), colour,
           alpha=rng.uniform(0.25, 0.45) if faint else 1.0)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(4, 16), (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------- archive writers
def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(files: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            _tar_add(tar, name, data)
    return buf.getvalue()


def _write_tar(path: Path, files: Iterable[tuple[str, bytes]], gz: bool = False) -> None:
    data = _tar_bytes(files)
    if gz:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:
            fh.write(data)
        data = buf.getvalue()
    path.write_bytes(data)


def _write_zip(path: Path, files: Iterable[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)


def _meta_mat(classes: list[dict]) -> bytes:
    """A devkit ``meta.mat``: ``synsets`` with ILSVRC2012_ID, WNID, words, num_children (+ one non-leaf)."""
    import scipy.io
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
              ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(i + 1, c["id"], c["name"], c["name"], 0, 0, 0) for i, c in enumerate(classes)]
    rows.append((len(classes) + 1, "n00001740", "entity", "root synset", len(classes), 1, 0))
    arr = np.zeros((len(rows), 1), dtype=fields)
    for i, row in enumerate(rows):
        arr[i, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, written by overlock-pipeline".ljust(116)  # no timestamp: reproducible
    return bytes(data)


def write_imagenet_archives(out_dir: Path, classes: list[dict], train: dict[str, list[bytes]],
                            val: list[tuple[str, bytes]], files: dict[str, str]) -> list[Path]:
    """Write ImageNet-format archives: train tar of ``<wnid>.tar`` class tars, flat val tar, devkit tar.gz.

    ``classes``: ordered ``{"id": wnid, "name": ...}``; ``train``: wnid -> JPEG bytes; ``val``: (wnid, JPEG
    bytes) in archive order; ``files``: role (train/val/devkit) -> archive file name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {c["id"]: i + 1 for i, c in enumerate(classes)}
    _write_tar(out_dir / files["train"], (
        (f"{wnid}.tar", _tar_bytes((f"{wnid}_{j}.JPEG", jpg) for j, jpg in enumerate(images)))
        for wnid, images in sorted(train.items())))
    _write_tar(out_dir / files["val"], ((f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpg) for i, (_, jpg) in enumerate(val)))
    truth = "".join(f"{ids[wnid]}\n" for wnid, _ in val).encode()
    _write_tar(out_dir / files["devkit"], [
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth),
        ("ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(classes))], gz=True)
    return [out_dir / files[r] for r in ("train", "val", "devkit")]


def write_cifar10_archive(path: Path, train: tuple[np.ndarray, list[int]], test: tuple[np.ndarray, list[int]],
                          label_names: list[str]) -> Path:
    """Write a ``cifar-10-python.tar.gz``: 5 train batches, ``test_batch`` and ``batches.meta`` (pickles).

    ``train``/``test``: (uint8 images N x 32 x 32 x 3, labels).
    """
    def batch(images: np.ndarray, labels: list[int], name: str, offset: int) -> bytes:
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
        obj = {b"batch_label": name.encode(), b"labels": list(map(int, labels)), b"data": np.ascontiguousarray(data),
               b"filenames": [f"img_{offset + i:05d}.png".encode() for i in range(len(images))]}
        return pickle.dumps(obj, protocol=2)
    images, labels = train
    chunks = np.array_split(np.arange(len(images)), 5)
    files = [(f"cifar-10-batches-py/data_batch_{i + 1}",
              batch(images[idx], [labels[j] for j in idx], f"training batch {i + 1} of 5", int(idx[0]) if len(idx) else 0))
             for i, idx in enumerate(chunks)]
    files.append(("cifar-10-batches-py/test_batch", batch(test[0], test[1], "testing batch 1 of 1", 0)))
    files.append(("cifar-10-batches-py/batches.meta", pickle.dumps(
        {b"label_names": [n.encode() for n in label_names], b"num_cases_per_batch": 10000, b"num_vis": 3072},
        protocol=2)))
    _write_tar(Path(path), files, gz=True)
    return Path(path)


def write_coco_archives(out_dir: Path, splits: dict[str, tuple[list[tuple[str, bytes]], dict]],
                        files: dict[str, str]) -> list[Path]:
    """Write COCO 2017 zips: ``train2017/``, ``val2017/`` images and ``annotations/instances_*.json``.

    ``splits``: ``{"train2017": ([(file name, JPEG bytes)], coco dict), "val2017": (...)}``;
    ``files``: role (train/val/annotations) -> archive file name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for role, split in (("train", "train2017"), ("val", "val2017")):
        _write_zip(out_dir / files[role], ((f"{split}/{name}", data) for name, data in splits[split][0]))
    _write_zip(out_dir / files["annotations"], (
        (f"annotations/instances_{split}.json", json.dumps(splits[split][1]).encode())
        for split in ("train2017", "val2017")))
    return [out_dir / files[r] for r in ("train", "val", "annotations")]


# ---------------------------------------------------------------------------------------- generators
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed % (2**32), *keys])


def write_demo_classification(demo, seed: int, out_dir: Path) -> list[Path]:
    """Generate the demo classification dataset as ImageNet-format archives in ``out_dir``."""
    classes = demo_class_table(demo.num_classes)
    size = demo.image_size
    train = {c["id"]: [_jpeg(demo_classification_image(c, size, _rng(seed, 0, k, j)))
                       for j in range(demo.train_per_class)] for k, c in enumerate(classes)}
    val = [(c["id"], _jpeg(demo_classification_image(c, size, _rng(seed, 1, k, j))))
           for k, c in enumerate(classes) for j in range(demo.val_per_class)]
    order = _rng(seed, 2).permutation(len(val))  # like ImageNet, val images are not grouped by class
    return write_imagenet_archives(out_dir, [{"id": c["id"], "name": c["name"]} for c in classes], train,
                                   [val[i] for i in order], DEMO_ARCHIVES["demo"])


def demo_detection_image(size: int, rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """One demo instance image: 1-4 non-overlapping objects; returns the image and its objects."""
    import pycocotools.mask as mask_utils
    img = _background(rng, size)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            radius = size * rng.uniform(0.12, 0.24)
            cx, cy = rng.uniform(radius, size - radius, 2)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > radius + o["r"] + 2 for o in objects):
                break
        else:
            continue
        cat = DETECTION_CATEGORIES[int(rng.integers(len(DETECTION_CATEGORIES)))]
        shape = {"rectangle": "square"}.get(cat["name"], cat["name"])
        angle = rng.uniform(-0.3, 0.3) + (math.pi / 4 if shape == "square" else 0.0)
        if shape == "triangle":
            angle = rng.uniform(0, 2 * math.pi)
        poly = [(min(max(x, 0.0), size - 1.0), min(max(y, 0.0), size - 1.0))
                for x, y in _polygon(shape, cx, cy, radius, angle)]
        colour = _rgb(cat["hue"] + rng.normal(0, 0.05), rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).polygon(poly, fill=255)
        _paste(img, mask, colour)
        flat = [round(v, 2) for xy in poly for v in xy]
        rle = mask_utils.frPyObjects([flat], size, size)
        objects.append({"cx": cx, "cy": cy, "r": radius, "category_id": cat["id"], "segmentation": [flat],
                        "area": float(mask_utils.area(mask_utils.merge(rle))),
                        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(mask_utils.merge(rle))]})
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), objects


def demo_coco_split(num_images: int, size: int, seed: int, split_key: int, first_id: int = 1):
    """Images and the COCO ``instances`` dict of one demo split."""
    images, coco_images, annotations = [], [], []
    for i in range(num_images):
        image_id = first_id + i
        img, objects = demo_detection_image(size, _rng(seed, 10 + split_key, i))
        name = f"{image_id:012d}.jpg"
        images.append((name, _jpeg(img, 92)))
        coco_images.append({"id": image_id, "file_name": name, "width": size, "height": size, "license": 1})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj["category_id"], "segmentation": obj["segmentation"],
                                "area": obj["area"], "bbox": obj["bbox"], "iscrowd": 0})
    coco = {"info": {"description": "overlock-pipeline demo instances (synthetic)", "version": "1.0",
                     "year": 2026},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}], "images": coco_images,
            "annotations": annotations,
            "categories": [{"id": c["id"], "name": c["name"], "supercategory": "shape"}
                           for c in DETECTION_CATEGORIES]}
    return images, coco


def write_demo_coco(demo, seed: int, out_dir: Path) -> list[Path]:
    """Generate the demo instance-segmentation dataset as COCO 2017-format zips in ``out_dir``."""
    size = demo.coco_image_size
    splits = {"train2017": demo_coco_split(demo.coco_train_images, size, seed, 0, first_id=1),
              "val2017": demo_coco_split(demo.coco_val_images, size, seed, 1, first_id=100000)}
    return write_coco_archives(out_dir, splits, DEMO_ARCHIVES["demo_coco"])


# ------------------------------------------------------------------------ semantic segmentation (ADE20K)
# label 0 is "unlabelled" (ignored, as in ADE20K); 1..K are the classes, in objectInfo150.txt order
SEGMENTATION_CLASSES = ("wall", "floor", "disc", "box", "triangle", "ring")
_SEG_SHAPES = {"disc": ("circle", 0.02), "box": ("square", 0.36), "triangle": ("triangle", 0.62),
               "ring": ("ring", 0.83)}  # class -> (shape, typical hue)


def demo_segmentation_image(size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """One demo scene: a noisy low-frequency "wall" above a striped "floor" (a wavy horizon), with 1-4
    (possibly occluding) shapes of four classes whose colours overlap; a 1-pixel unlabelled (0) seam
    outside every object's visible part."""
    img = _background(rng, size)
    label = np.ones((size, size), dtype=np.uint8)  # wall
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    horizon = size * rng.uniform(0.35, 0.7) + size * 0.08 * np.sin(xx / size * rng.uniform(2, 7) + rng.uniform(0, 6))
    floor = yy > horizon
    period = rng.uniform(3.0, 6.0)
    stripes = 28 * np.sign(np.sin((yy + 0.3 * xx * rng.uniform(-1, 1)) * 2 * math.pi / period))
    arr = np.asarray(img, dtype=np.float32).copy()
    arr[floor] += stripes[floor, None] + rng.uniform(-40, 40, 3)
    label[floor] = 2
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    seam = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        name = SEGMENTATION_CLASSES[2 + int(rng.integers(4))]
        shape, hue = _SEG_SHAPES[name]
        radius = size * rng.uniform(0.13, 0.26)
        cx, cy = rng.uniform(radius, size - radius, 2)
        mask = _shape_mask(size, shape, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        colour = _rgb(hue + rng.normal(0, 0.08), rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0))
        _paste(img, mask, colour)
        inside = np.asarray(mask) > 127
        edge = (np.asarray(mask.filter(ImageFilter.MaxFilter(3))) > 127) & ~inside
        label[inside] = 1 + SEGMENTATION_CLASSES.index(name)
        seam = (seam & ~inside) | edge
    label[seam] = 0
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(4, 14), (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), label


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def ade_object_info(names: Iterable[str]) -> bytes:
    """``objectInfo150.txt`` of the ADE20K release (Idx, Ratio, Train, Val, Name) for ``names``."""
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0\t0\t0\t{n}" for i, n in enumerate(names, 1)]
    return ("\n".join(rows) + "\n").encode()


def write_demo_ade(demo, seed: int, out_dir: Path) -> list[Path]:
    """Generate the demo segmentation dataset as an ``ADEChallengeData2016.zip``-format archive."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    top = "ADEChallengeData2016"
    files = [(f"{top}/objectInfo150.txt", ade_object_info(SEGMENTATION_CLASSES))]
    for key, (split, stem, count) in enumerate((("training", "train", demo.seg_train_images),
                                                ("validation", "val", demo.seg_val_images))):
        for i in range(count):
            img, label = demo_segmentation_image(demo.seg_image_size, _rng(seed, 20 + key, i))
            name = f"ADE_{stem}_{i + 1:08d}"
            files += [(f"{top}/images/{split}/{name}.jpg", _jpeg(img, 92)),
                      (f"{top}/annotations/{split}/{name}.png", _png(label))]
    path = out_dir / DEMO_ARCHIVES["demo_ade"]["trainval"]
    _write_zip(path, files)
    return [path]


def write_demo_archives(name: str, demo, seed: int, out_dir: Path) -> dict[str, str]:
    """Generate the archives of demo dataset ``name`` (demo | demo_coco | demo_ade); return file name -> sha256."""
    writer = {"demo": write_demo_classification, "demo_coco": write_demo_coco, "demo_ade": write_demo_ade}[name]
    return {p.name: file_digest(p, "sha256") for p in writer(demo, seed, Path(out_dir))}
