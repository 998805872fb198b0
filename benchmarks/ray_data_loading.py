"""Benchmark: ``pretrain.loader: ray_data`` beside the DataLoader path on the same real-size JPEGs, in one run.

The files, transform and batch step are ``benchmarks/data_loading.py``'s (photo-like ~500x375 JPEGs; the
official training distribution: RandomResizedCrop 224 with random bilinear/bicubic, flip, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25, mixup 0.8 / cutmix 1.0; batch 32; the default fast decode).
For each N:

* ``dataloader``: the pretrain DataLoader with N loader processes (``data_loading.our_loader``);
* ``ray_data``: a local Ray runtime of N CPUs; :func:`overlock.training.ray_data_loader.train_dataset`'s map
  tasks (1 CPU each) decode and augment, this process iterates ``iter_torch_batches`` as a worker's shard does.

Both sides finish each batch in this process (normalise + erase, mixup) as the training loop does. Wall img/s,
best of ``--repeats`` interleaved passes after one warm-up pass per side (Ray's worker processes start once per
run, as the DataLoader's persistent workers do). ``--nodes`` adds a row with N single-CPU Ray nodes on this one
machine (``ray.cluster_utils.Cluster``): the same cores, so it shows how the tasks spread over nodes, not more
throughput.

    python benchmarks/ray_data_loading.py --images 512 --cpus 1 2 --repeats 3 --nodes
    python benchmarks/ray_data_loading.py --quick
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # not Ray Data's INFO lines per pass
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loading import BATCH, CFG, _cpu_seconds, official, our_loader  # noqa: E402

from overlock.data.synthetic_images import write_classification_layout  # noqa: E402
from overlock.training import ray_data_loader, recipe  # noqa: E402


def _cpu_seconds_with_ray() -> float:
    """CPU seconds of this process, its ended children and its live descendants: the local Ray runtime (GCS,
    raylets, object store, the task worker processes) and anything else it started."""
    import psutil
    total = _cpu_seconds()
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _node_of(batch: dict) -> dict:
    """Tag the rows with the node that decoded them (fused into the decode task)."""
    import ray
    node = int(ray.get_runtime_context().get_node_id()[:12], 16)
    return {**batch, "node": np.full(len(batch["index"]), node, dtype=np.int64)}


def ray_pass(root: Path, nodes: collections.Counter | None = None) -> tuple[int, float, float, float]:
    """(images, seconds, seconds to the first batch, CPU seconds) of one Ray Data pass over the training split."""
    p = official()
    transform, _ = recipe.build_transforms(p, CFG)
    ds = ray_data_loader.train_dataset(root, transform, seed=0)
    if nodes is not None:
        ds = ds.map_batches(_node_of, batch_format="numpy", num_cpus=ray_data_loader.DEFAULT_CPUS_PER_TASK)
    mixup = recipe.build_mixup(p, 8)
    torch.manual_seed(0)
    cpu0, t0, n, first = _cpu_seconds_with_ray(), time.perf_counter(), 0, None
    for batch in ds.iter_torch_batches(batch_size=BATCH, drop_last=True, prefetch_batches=4, device="cpu"):
        first = first or time.perf_counter() - t0
        images, targets = transform.on_device(batch["image"]), batch["label"]
        images, targets = mixup(images, targets)
        n += images.shape[0]
        if nodes is not None:
            nodes.update(batch["node"].tolist())
    return n, time.perf_counter() - t0, first, _cpu_seconds_with_ray() - cpu0


def loader_pass(root: Path, workers: int) -> tuple[int, float, float, float]:
    """(images, seconds, seconds to the first batch, CPU seconds) of one pass of the pretrain DataLoader with
    ``workers`` loader processes (their CPU time once they end with the pass; the idle Ray runtime's too)."""
    loader, batch_steps = our_loader(root, workers, "fast")
    torch.manual_seed(0)
    cpu0, t0, n, first = _cpu_seconds_with_ray(), time.perf_counter(), 0, None
    for images, targets in loader:
        first = first or time.perf_counter() - t0
        images, targets = batch_steps(images, targets)  # normalise + erase, mixup
        n += images.shape[0]
    elapsed = time.perf_counter() - t0
    del loader  # its processes end: their CPU time is counted
    return n, elapsed, first, _cpu_seconds_with_ray() - cpu0


def _start_ray(cpus: int, nodes: int = 1):
    """A local Ray runtime of ``cpus`` CPUs, or ``nodes`` nodes of ``cpus // nodes`` CPUs each; its stop."""
    import ray
    if nodes == 1:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        return ray.shutdown
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus // nodes})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus // nodes)
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)

    def stop():
        ray.shutdown()
        cluster.shutdown()
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="training images (real size)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2],
                        help="N: loader processes (dataloader) = CPUs of the Ray runtime (ray_data)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", action="store_true", help="also N Ray nodes of 1 CPU each (same machine)")
    parser.add_argument("--quick", action="store_true", help="64 images, N=1, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.cpus, args.repeats = 64, [1], 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ray_data_loading_") as tmp:
        classes = 8
        root = write_classification_layout(tmp, classes, -(-args.images // classes) + 1, 1, seed=0)
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"load average {os.getloadavg()[0]:.1f}; {args.images} images, batch {BATCH}")
        print("| N | side | wall img/s | first batch (s) | img/s after the first batch | img/s per core (CPU time) |")
        print("|---:|---|---:|---:|---:|---:|")
        best: dict[tuple[int, str], tuple[float, float, float]] = {}
        layouts = [(n, 1) for n in args.cpus] + ([(n, n) for n in args.cpus if n > 1] if args.nodes else [])
        for cpus, nodes in layouts:
            side = "ray_data" if nodes == 1 else f"ray_data {nodes} nodes"
            stop = _start_ray(cpus, nodes)
            try:
                spread: collections.Counter = collections.Counter()
                ray_pass(root), loader_pass(root, cpus)  # warm-up: worker processes, page cache
                runs = {side: [], "dataloader": []}
                for _ in range(args.repeats):  # interleaved: both sides see the same load
                    runs[side].append(ray_pass(root, spread if nodes > 1 else None))
                    if nodes == 1:
                        runs["dataloader"].append(loader_pass(root, cpus))
            finally:
                stop()
            for name, results in runs.items():
                if results:
                    wall = max(n / t for n, t, _, _ in results)  # best pass: other jobs only ever add time
                    steady = max((n - BATCH) / (t - first) for n, t, first, _ in results)
                    per_core = max(n / cpu for n, _, _, cpu in results)
                    best[(cpus, name)] = (wall, steady, per_core)
                    print(f"| {cpus} | {name} | {wall:.1f} | {min(r[2] for r in results):.2f} | {steady:.1f} | "
                          f"{per_core:.1f} |")
            if nodes > 1:
                print(f"# {side}: images decoded per node {sorted(spread.values(), reverse=True)}")
        for cpus in args.cpus:
            ray_side, loader_side = best[(cpus, "ray_data")], best[(cpus, "dataloader")]
            wall, steady, per_core = (r / d for r, d in zip(ray_side, loader_side))
            print(f"RATIO N={cpus}: ray_data/dataloader {wall:.2f}x wall img/s, {steady:.2f}x after the first batch, "
                  f"{per_core:.2f}x per core")


if __name__ == "__main__":
    main()
