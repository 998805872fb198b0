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

Reported per side: wall img/s, img/s per CPU core = images / CPU seconds of the main process and its loader
processes together (``getrusage``; loader processes end with each pass, so they are counted), and img/s per core
*for loading only*: the same CPU seconds less those of the batch steps that a GPU run does on the GPU (timed with
the main thread's CPU clock): for ``timm`` its prefetcher's normalisation and random erasing, for ``ours`` the
normalisation + erasing of ``on_device`` and the batch mixup (timm's ``FastCollateMixup`` mixes uint8 images in
the loader processes: loading work on every run). The last column is what sets the CPU cores a GPU needs. Each
figure is the best of ``--repeats`` interleaved passes (other jobs on a shared machine only ever add time); the
CPU-time rates depend much less on them than wall img/s does.

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
    """The official train.py's loader: timm ImageDataset + create_loader (prefetcher, FastCollateMixup). Returns
    the prefetcher's inner DataLoader and its batch steps (normalise, erase), which :func:`one_pass` runs as the
    prefetcher does, so that their CPU time can be told apart."""
    from timm.data import FastCollateMixup, ImageDataset, create_loader
    p = official()
    dataset = ImageDataset(str(root / "train"))
    mixup = FastCollateMixup(mixup_alpha=p.mixup, cutmix_alpha=p.cutmix, label_smoothing=p.smoothing,
                             num_classes=len(dataset.reader.class_to_idx))
    prefetcher = create_loader(dataset, input_size=CFG["input_size"], batch_size=BATCH, is_training=True,
                               re_prob=p.reprob, re_mode="pixel", re_count=1, auto_augment=p.randaugment,
                               interpolation="random", mean=CFG["mean"], std=CFG["std"], num_workers=workers,
                               collate_fn=mixup, pin_memory=False, device=torch.device("cpu"), use_prefetcher=True,
                               persistent_workers=False)
    recipe.fix_randaugment_ops(prefetcher.loader.dataset.transform)  # else Pillow 13 raises on 0-bit posterize

    def batch_steps(images, targets):  # PrefetchLoader.__iter__'s steps on the device
        images = images.to(prefetcher.img_dtype).sub_(prefetcher.mean).div_(prefetcher.std)
        if prefetcher.random_erasing is not None:
            images = prefetcher.random_erasing(images)
        return images, targets
    return prefetcher.loader, batch_steps


def official(**kw):
    return recipe.effective_params(parse_params({"pretrain": {"recipe": "official", **kw}})).pretrain


def our_loader(root: Path, workers: int, decode: str):
    """Our pretrain loader: ClassificationDataset + the recipe transform, loader_settings; its batch steps are
    those of the training loop after the batch reaches the device (``on_device`` on the fast path, then Mixup)."""
    p = official(train_decode=decode)
    train_tf, _ = recipe.build_transforms(p, CFG)
    dataset = ClassificationDataset(root, "train", transform=train_tf)
    settings = loader_settings(workers + 1, "cpu", persistent=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, **settings)
    mixup, on_device = recipe.build_mixup(p, len(dataset.classes)), getattr(train_tf, "on_device", None)

    def batch_steps(images, targets):
        if on_device is not None:
            images = on_device(images)
        return mixup(images, targets) if mixup is not None else (images, targets)
    return loader, batch_steps


def one_pass(make, workers: int) -> tuple[float, float, float, int]:
    """(wall img/s, img/s per CPU core, img/s per CPU core for loading only, images) of one pass over the
    training split; loading only = all CPU time less that of the batch steps a GPU run does on the GPU."""
    loader, batch_steps = make(workers)
    torch.manual_seed(0)
    cpu0, t0, n, device_cpu = _cpu_seconds(), time.perf_counter(), 0, 0.0
    for images, targets in loader:
        c = time.thread_time()
        images, targets = batch_steps(images, targets)
        device_cpu += time.thread_time() - c
        n += images.shape[0]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    del loader
    return n / wall, n / cpu, n / (cpu - device_cpu), n


def step_costs(paths: list[Path], repeats: int) -> dict[str, float]:
    """Per-image CPU milliseconds of each step (best of ``repeats`` passes), timm's training transform beside
    ours on the same files with the same random draws (both make the same calls in the same order, so after the
    same seeds they crop, flip and augment every image alike): where the difference comes from."""
    import random

    import numpy as np
    from PIL import Image
    from timm.data import create_transform
    p = official()
    ours, _ = recipe.build_transforms(official(train_decode="fast"), CFG)
    crop, flip, randaugment, to_array = create_transform(
        CFG["input_size"][1:], is_training=True, auto_augment=p.randaugment, re_prob=0, interpolation="random",
        use_prefetcher=True).transforms
    recipe.fix_randaugment_ops(randaugment)
    best: dict[str, float] = {}
    for _ in range(repeats):
        cost: dict[str, float] = {}

        def timed(side_step: str, t0: float) -> float:
            t1 = time.process_time()
            cost[side_step] = cost.get(side_step, 0.0) + t1 - t0
            return t1
        for side in ("timm", "ours"):
            random.seed(0), np.random.seed(0), torch.manual_seed(0)
            for path in paths:
                t = time.process_time()
                if side == "timm":
                    with open(path, "rb") as fh:
                        img = Image.open(fh).convert("RGB")
                    t = timed("timm: open + decode (PIL)", t)
                    img = flip(crop(img))
                    t = timed("timm: crop + resize + flip (PIL)", t)
                    img = randaugment(img)
                    t = timed("timm: RandAugment", t)
                    to_array(img)
                    timed("timm: to array", t)
                else:
                    hwc = ours.decode_crop(path)
                    t = timed("ours: open + decode + crop + resize + flip", t)
                    img = Image.fromarray(np.ascontiguousarray(hwc.numpy()))  # as DecodeCropTransform.__call__
                    t = timed("ours: to and from PIL", t)
                    for op in ours.pil_ops:
                        img = op(img)
                    t = timed("ours: RandAugment", t)
                    torch.from_numpy(np.array(img))
                    timed("ours: to and from PIL", t)
        for k, v in cost.items():
            best[k] = min(best.get(k, float("inf")), v / len(paths) * 1e3)
    return best


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
        print("| loader processes | side | wall img/s | img/s per core (CPU time) | img/s per core, loading only |")
        print("|---:|---|---:|---:|---:|")
        summary = {}
        for w in workers:
            runs = {name: [] for name in sides}
            for _ in range(args.repeats):
                for name, make in sides.items():  # interleaved: every side sees the same load
                    runs[name].append(one_pass(make, w))
            for name in sides:  # best of the repeats: other jobs on the machine only ever add time
                wall = max(r[0] for r in runs[name])
                per_core = max(r[1] for r in runs[name])
                loading = max(r[2] for r in runs[name])
                summary[(w, name)] = per_core, loading
                print(f"| {w} | {name} | {wall:.1f} | {per_core:.1f} | {loading:.1f} |")
        for w in workers:
            ours, pil, timm = (summary[(w, side)] for side in ("ours", "ours-pil", "timm"))
            print(f"RATIO workers={w}: ours/timm per core {ours[0] / timm[0]:.2f}x, loading only "
                  f"{ours[1] / timm[1]:.2f}x; ours-pil/timm {pil[0] / timm[0]:.2f}x, loading only {pil[1] / timm[1]:.2f}x")
        paths = sorted((root / "train").rglob("*.JPEG"))[: args.images]
        costs = step_costs(paths, args.repeats)
        print("\n| step (one loader process, same images and random draws) | CPU ms per image |\n|---|---:|")
        for step, ms in costs.items():
            print(f"| {step} | {ms:.3f} |")
        totals = {side: sum(ms for step, ms in costs.items() if step.startswith(side)) for side in ("timm", "ours")}
        print(f"STEPS total timm {totals['timm']:.3f} ms, ours {totals['ours']:.3f} ms per image: "
              f"{totals['timm'] / totals['ours']:.2f}x")


if __name__ == "__main__":
    main()
