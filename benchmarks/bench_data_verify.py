"""Benchmark: cost of the extract stage's image check (``data.verify_images``) per image and for ImageNet.

Generates ImageNet-sized JPEGs (500x375, the most common ImageNet size) and times, side by side in one run:
``header`` (PIL verify, serial), ``full`` decode serial, and ``full`` decode in parallel over all cores (what
the stage does for >= 2000 images). Prints a Markdown table with the extrapolation to ImageNet-1K.

    python benchmarks/bench_data_verify.py --images 600
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from overlock.data import layouts

IMAGENET_IMAGES = 1_281_167 + 50_000


def make_images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = np.asarray(Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((500, 375)))
    names = []
    for i in range(n):
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        (folder / f"{i:06d}.JPEG").write_bytes(buf.getvalue())
        names.append(f"{i:06d}.JPEG")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="number of test JPEGs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_images(root, args.images)
        rows = []
        for label, mode, parallel in (("header, serial", "header", False), ("full, serial", "full", False),
                                      (f"full, parallel ({os.cpu_count()} processes)", "full", True)):
            layouts.PARALLEL_VERIFY_MIN = 1 if parallel else 10**12
            start = time.perf_counter()
            bad = layouts.find_unreadable(root, names, mode)
            seconds = time.perf_counter() - start
            assert not bad
            per = seconds / len(names)
            rows.append((label, per * 1e3, per * IMAGENET_IMAGES / 3600))
    print(f"| check ({args.images} JPEGs 500x375) | ms / image | ImageNet-1K train+val (h) |")
    print("|---|---|---|")
    for label, ms, hours in rows:
        print(f"| {label} | {ms:.2f} | {hours:.2f} |")


if __name__ == "__main__":
    main()
