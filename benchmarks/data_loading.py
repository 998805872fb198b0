"""Benchmark: the official training input pipeline over real-size JPEGs, ours beside timm's own loader.

One run, the same files (photo-like ~500x375 JPEGs from :mod:`overlock.data.synthetic_images`, grayscale, CMYK
and PNG-named-.JPEG among them), the same augmentation distribution (RandomResizedCrop 224 with random
bilinear/bicubic, flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, mixup 0.8 / cutmix 1.0),
for 0..N loader processes, interleaved so both sides see the same machine load:

* ``timm``: ``timm.data.create_loader`` as the official ``train.py`` uses it (prefetcher: uint8 batches from
  the workers, ``FastCollateMixup`` in the workers, normalisation and erasing in the main process), with our
  posterize fix applied to its RandAugment (without it timm 1.0.31 + Pillow 13 dies on ~1 in 650 images);
* ``ours-pil``: our recipe's transform on timm's PIL path (``pretrain.train_decode: pil``) in our loader;
* ``ours``: the default ``pretrain.train_decode: fast`` (``overlock.training.loader.DecodeCropTransform``).

Reported per side: wall img/s and img/s per CPU core = images / CPU seconds of the main process and its loader
processes together (``getrusage``; loader processes end with each pass, so they are counted). Each figure is the
best of ``--repeats`` interleaved passes (other jobs on a shared machine only ever add time); the CPU-time rate
depends much less on them than wall img/s does.

    python benchmarks/data_loading.py --images 512 --workers 0 1 2
    python benchmarks/data_loading.py --quick
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from overlock.data.datasets import ClassificationDataset  # noqa: E402
from overlock.data.synthetic_images import write_classification_layout  # noqa: E402
from overlock.params import parse_params  # noqa: E402
from overlock.training import recipe  # noqa: E402
from overlock.training.loader import loader_settings  # noqa: E402

CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
BATCH = 32


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timm_loader(root: Path, workers: int):
    """The official train.py's loader: timm ImageDataset + create_loader (prefetcher, FastCollateMixup)."""
    from timm.data import FastCollateMixup, ImageDataset, create_loader
    p = official()
    dataset = ImageDataset(str(root / "train"))
    mixup = FastCollateMixup(mixup_alpha=p.mixup, cutmix_alpha=p.cutmix, label_smoothing=p.smoothing,
                             num_classes=len(dataset.reader.class_to_idx))
    loader = create_loader(dataset, input_size=CFG["input_size"], batch_size=BATCH, is_training=True,
                           re_prob=p.reprob, re_mode="pixel", re_count=1, auto_augment=p.randaugment,
                           interpolation="random", mean=CFG["mean"], std=CFG["std"], num_workers=workers,
                           collate_fn=mixup, pin_memory=False, device=torch.device("cpu"), use_prefetcher=True,
                           persistent_workers=False)
    recipe.fix_randaugment_ops(loader.loader.dataset.transform)  # else Pillow 13 raises on 0-bit posterize
    return loader, None, None


def official(**kw):
    return recipe.effective_params(parse_params({"pretrain": {"recipe": "official", **kw}})).pretrain


def our_loader(root: Path, workers: int, decode: str):
    """Our pretrain loader: ClassificationDataset + the recipe transform, loader_settings; in the main process
    the batch step of the fast path (normalise + erase) and Mixup, as the training loop does."""
    p = official(train_decode=decode)
    train_tf, _ = recipe.build_transforms(p, CFG)
    dataset = ClassificationDataset(root, "train", transform=train_tf)
    settings = loader_settings(workers + 1, "cpu", persistent=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, **settings)
    return loader, recipe.build_mixup(p, len(dataset.classes)), getattr(train_tf, "on_device", None)


def one_pass(make, workers: int) -> tuple[float, float, int]:
    """(wall img/s, img/s per CPU core, images) of one pass over the training split."""
    loader, mixup, on_device = make(workers)
    torch.manual_seed(0)
    cpu0, t0, n = _cpu_seconds(), time.perf_counter(), 0
    for images, targets in loader:
        if on_device is not None:  # as the training loop does after moving the batch to the device
            images = on_device(images)
        if mixup is not None:
            images, targets = mixup(images, targets)
        n += images.shape[0]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    del loader
    return n / wall, n / cpu, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="training images (real size)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="loader processes (default 0..cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="96 images, 0 and 1 workers, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.workers, args.repeats = 96, [0, 1], 1
    workers = args.workers if args.workers is not None else list(range(0, (os.cpu_count() or 1) + 1))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="data_loading_") as tmp:
        classes = 8
        root = write_classification_layout(tmp, classes, -(-args.images // classes) + 1, 1, seed=0)
        sides = {"timm": lambda w: timm_loader(root, w), "ours-pil": lambda w: our_loader(root, w, "pil"),
                 "ours": lambda w: our_loader(root, w, "fast")}
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}; load average {os.getloadavg()[0]:.1f}; {args.images} images, batch {BATCH}")
        print("| loader processes | side | wall img/s | img/s per core (CPU time) |")
        print("|---:|---|---:|---:|")
        summary = {}
        for w in workers:
            runs = {name: [] for name in sides}
            for _ in range(args.repeats):
                for name, make in sides.items():  # interleaved: every side sees the same load
                    runs[name].append(one_pass(make, w))
            for name in sides:  # best of the repeats: other jobs on the machine only ever add time
                wall = max(r[0] for r in runs[name])
                per_core = max(r[1] for r in runs[name])
                summary[(w, name)] = per_core
                print(f"| {w} | {name} | {wall:.1f} | {per_core:.1f} |")
        for w in workers:
            print(f"RATIO workers={w}: ours/timm per core {summary[(w, 'ours')] / summary[(w, 'timm')]:.2f}x, "
                  f"ours-pil/timm {summary[(w, 'ours-pil')] / summary[(w, 'timm')]:.2f}x")


if __name__ == "__main__":
    main()
