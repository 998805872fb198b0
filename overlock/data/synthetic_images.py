"""Photo-like test images at real ImageNet size: the one generator for the benchmarks, the scale rehearsal
and the tests (DESIGN.md 10).

Each image is a random size around ImageNet's typical 500x375 (either orientation), with smooth colour fields,
a few soft-edged shapes, edges and fine grain, saved as a JPEG of quality ~75-95, so that files (~40-120 kB)
and decoding cost resemble real photos. Like the real ILSVRC2012 train set, a few files are grayscale JPEGs,
CMYK JPEGs, or PNGs named ``.JPEG``; :data:`KIND_FRACTIONS` sets how many (more than ImageNet has, so that
small samples contain each kind). Deterministic for a seed.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: fraction of each non-RGB kind among generated files (the rest: RGB JPEG)
KIND_FRACTIONS = {"gray": 0.04, "cmyk": 0.02, "png": 0.02}
KINDS = ("rgb", "gray", "cmyk", "png")


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): the long side 400-640 (mostly 500), aspect 4:3 or 3:2-ish, landscape 75% of the time."""
    long_side = int(rng.choice([500, 500, 500, int(rng.integers(400, 641))]))
    short = int(round(long_side / rng.uniform(1.25, 1.55)))
    return (long_side, short) if rng.random() < 0.75 else (short, long_side)


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """An RGB image of ``size`` (w, h): smooth colour field + soft shapes + edges + fine grain."""
    w, h = size
    sw, sh = max(8, w // 4), max(8, h // 4)  # shapes drawn and blurred at quarter size, then upsampled (soft)
    base = rng.uniform(20, 235, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3)).astype(np.uint8)
    small = Image.fromarray(base).resize((sw, sh), Image.BICUBIC)
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-sw // 4, sw)), int(rng.integers(-sh // 4, sh))
        x1, y1 = x0 + int(rng.integers(sw // 10, sw // 2)), y0 + int(rng.integers(sh // 10, sh // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    small = small.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    img = small.resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # sharp edges (the high frequencies a photo has)
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 5)))
    grain = rng.normal(0, float(rng.uniform(3, 9)), (h // 2, w // 2, 1)).astype(np.float32)
    grain = np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)
    arr = np.asarray(img, dtype=np.float32)
    arr[: grain.shape[0], : grain.shape[1]] += grain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def image_kind(rng: np.random.Generator) -> str:
    """Draw a file kind (rgb/gray/cmyk/png) with :data:`KIND_FRACTIONS`."""
    u, acc = rng.random(), 0.0
    for kind, frac in KIND_FRACTIONS.items():
        acc += frac
        if u < acc:
            return kind
    return "rgb"


def encode(img: Image.Image, kind: str, quality: int) -> bytes:
    """``img`` as the bytes of a file of ``kind``: an RGB/grayscale/CMYK JPEG, or a PNG (named .JPEG by callers)."""
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        mode = {"rgb": "RGB", "gray": "L", "cmyk": "CMYK"}[kind]
        img.convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_image_bytes(seed: int, index: int, kind: str | None = None) -> tuple[bytes, str]:
    """(file bytes, kind) of image ``index`` of the set seeded by ``seed`` (independent per index)."""
    rng = np.random.default_rng([seed % (2**32), index])
    kind = kind or image_kind(rng)
    img = photo_like(rng, random_size(rng))
    return encode(img, kind, int(rng.integers(75, 96))), kind


def write_synthetic_images(out_dir: str | Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Write ``count`` images ``<prefix>_<i>.JPEG`` into ``out_dir`` (every kind at least once when count >= 4)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    forced = dict(zip(range(1, 4), KINDS[1:])) if count >= 4 else {}
    paths = []
    for i in range(count):
        data, _ = synthetic_image_bytes(seed, i, forced.get(i))
        path = out_dir / f"{prefix}_{i:06d}.JPEG"
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_classification_layout(data_dir: str | Path, num_classes: int, train_per_class: int, val_per_class: int,
                                seed: int = 0, calibration_per_class: int = 1) -> Path:
    """The extract stage's classification layout (``train/<wnid>/``, ``val/<wnid>/``, ``classes.json``,
    ``splits.json``) of real-size synthetic images under ``<data_dir>/classification``; returns that folder.

    Image ``i`` of the whole set is :func:`synthetic_image_bytes` ``(seed, i)``; images 1-3 are a grayscale
    JPEG, a CMYK JPEG and a PNG named ``.JPEG``.
    """
    import json
    root = Path(data_dir) / "classification"
    classes, calibration, index = [], [], 0
    forced = dict(zip(range(1, 4), KINDS[1:]))
    for c in range(num_classes):
        wnid = f"n{90000000 + c:08d}"
        classes.append({"id": wnid, "name": f"synthetic {c}"})
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                data, _ = synthetic_image_bytes(seed, index, forced.get(index))
                (folder / f"{wnid}_{k}.JPEG").write_bytes(data)
                index += 1
        calibration += [f"train/{wnid}/{wnid}_{k}.JPEG" for k in range(calibration_per_class)]
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "splits.json").write_text(json.dumps({"calibration": calibration, "excluded": []}))
    return root


def _class_tar(job: tuple[int, int, int, int]) -> bytes:
    """The per-class tar of class ``c`` (wnid ``n9xxxxxxx``): ``count`` images starting at global index ``first``."""
    import tarfile
    seed, c, first, count = job
    wnid = f"n{90000000 + c:08d}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for k in range(count):
            data, _ = synthetic_image_bytes(seed, first + k)
            info = tarfile.TarInfo(f"{wnid}_{k}.JPEG")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _val_image(job: tuple[int, int]) -> bytes:
    return synthetic_image_bytes(*job)[0]


def write_ilsvrc2012_archives(out_dir: str | Path, num_classes: int, train_per_class: int, val_images: int,
                              seed: int = 0, workers: int = 1) -> dict[str, Path]:
    """ILSVRC2012-format archives of real-size synthetic images, written as a stream (any size fits in memory):
    ``ILSVRC2012_img_train.tar`` (one uncompressed ``<wnid>.tar`` per class), ``ILSVRC2012_img_val.tar`` (flat,
    ``ILSVRC2012_val_<n>.JPEG``) and ``ILSVRC2012_devkit_t12.tar.gz`` (validation ground truth + ``meta.mat``).
    Images are generated over ``workers`` processes. Returns {role: path}.
    """
    import tarfile
    from concurrent.futures import ProcessPoolExecutor

    from overlock.data.demo import _meta_mat, _write_tar
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = [{"id": f"n{90000000 + c:08d}", "name": f"synthetic {c}"} for c in range(num_classes)]
    files = {"train": out_dir / "ILSVRC2012_img_train.tar", "val": out_dir / "ILSVRC2012_img_val.tar",
             "devkit": out_dir / "ILSVRC2012_devkit_t12.tar.gz"}
    first_val = num_classes * train_per_class
    labels = np.random.default_rng([seed % (2**32), 7]).integers(0, num_classes, val_images)

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    mapper = pool.map if pool else map
    try:
        with tarfile.open(files["train"], "w", format=tarfile.USTAR_FORMAT) as tar:
            jobs = [(seed, c, c * train_per_class, train_per_class) for c in range(num_classes)]
            for c, data in enumerate(mapper(_class_tar, jobs)):
                add(tar, f"{classes[c]['id']}.tar", data)
        with tarfile.open(files["val"], "w", format=tarfile.USTAR_FORMAT) as tar:
            jobs = [(seed, first_val + i) for i in range(val_images)]
            for i, data in enumerate(mapper(_val_image, jobs, **({"chunksize": 16} if pool else {}))):
                add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", data)
    finally:
        if pool:
            pool.shutdown()
    truth = "".join(f"{int(v) + 1}\n" for v in labels).encode()
    _write_tar(files["devkit"], [("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth),
                                 ("ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(classes))], gz=True)
    return files
