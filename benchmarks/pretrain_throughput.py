"""Training throughput (img/s) of the Ray Train pretraining loop: 1 vs 2 CPU workers, side by side in one run.

Runs the real worker loop (``overlock.training.loop``) through ``TorchTrainer`` on generated images at the
requested size (default OverLoCK-XT at 224), ``--steps`` optimizer steps per configuration, no MLflow. img/s is
the global training throughput of the epoch (all workers; the first step, which includes warm-up, counts).

    .venv/bin/python benchmarks/pretrain_throughput.py --size xt --image-size 224 --batch 8 --steps 3
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlock.params import parse_params  # noqa: E402


def write_images(root: Path, image_size: int, per_class: int, classes: int = 2) -> Path:
    """A minimal classification layout (train/val/classes.json/splits.json) of random images."""
    rng = np.random.default_rng(0)
    cls_root = root / "classification"
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = cls_root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    (cls_root / "classes.json").write_text(json.dumps([{"id": f"c{c}", "name": f"c{c}"} for c in range(classes)]))
    (cls_root / "splits.json").write_text(json.dumps({"calibration": [], "excluded": []}))
    return root


def measure(size: str, image_size: int, batch: int, steps: int, workers: int, precision: str, work: Path,
            data: Path) -> dict:
    """Run one 1-epoch training of ``steps`` steps with ``workers`` Ray workers; return its epoch metrics."""
    from overlock.training.pretrain import _trainer
    raw = {"model": {"size": size}, "compute": {"precision": precision},
           "pretrain": {"epochs": 1, "batch_size": batch, "input_size": image_size, "workers": workers,
                        "cpus_per_worker": 1, "max_steps_per_epoch": steps, "warmup_epochs": 0, "max_failures": 0}}
    params = parse_params(raw)
    config = {"params": params.model_dump(mode="json"), "data": str(data), "num_classes": 2,
              "fatal_file": str(work / f"fatal{workers}{precision}.txt"), "tty": False}
    result = _trainer(params, config, work / "ray", f"bench-{workers}w-{precision}-{time.time_ns()}").fit()
    return dict(result.metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="xt", help="OverLoCK size (xt/t/s/b)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="per worker")
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    import ray
    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_images(work / "data", args.image_size, per_class=args.batch * max(args.workers) * args.steps)
        for precision in args.precision:
            for workers in args.workers:
                try:
                    m = measure(args.size, args.image_size, args.batch, args.steps, workers, precision, work, data)
                except Exception as err:  # e.g. a model path without bf16 support: record it, keep going
                    rows.append((workers, precision, None, f"failed: {str(err).splitlines()[-1][:120]}"))
                    continue
                rows.append((workers, precision, m["img_per_sec"], m["epoch_time_s"]))
                print(f"workers={workers} precision={precision} img/s={m['img_per_sec']:.2f}", flush=True)
    ray.shutdown()
    print(f"\nOverLoCK-{args.size.upper()} training, {args.image_size}px, batch {args.batch}/worker, "
          f"{args.steps} steps, {platform.processor() or platform.machine()}")
    print("| workers | precision | train img/s | epoch time incl. val (s) |\n|---|---|---|---|")
    for workers, precision, ips, t in rows:
        print(f"| {workers} | {precision} | {ips:.2f} | {t:.1f} |" if ips is not None
              else f"| {workers} | {precision} | - | {t} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
