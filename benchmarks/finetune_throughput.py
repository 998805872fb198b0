"""Seconds per training iteration of the demo detection config on CPU (Mask R-CNN and Faster R-CNN).

Measured side by side in one process on the same generated demo COCO images: the default demo model
(OverLoCK-XT) and the reduced model the tests use (``model.overrides``), each for both detectors.
``--stage`` additionally runs the real ``finetune`` stage with the default demo params and reports its
pycocotools AP. Results go to stdout as a markdown table (paste into benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/finetune_throughput.py --iters 6 [--stage]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 64, 96], "kernel_size": [7, 7, 7, 7]}


def seconds_per_iter(params, data_dir: Path, work_dir: Path, iters: int, warmup: int = 2) -> float:
    """Median wall time of ``model.train_step`` + backward + AdamW step over ``iters`` demo batches."""
    from mmcv.parallel import MMDataParallel
    from mmcv.runner import build_optimizer
    from mmdet.datasets import build_dataloader, build_dataset
    from mmdet.models import build_detector

    from overlock.detection.config import build_detection_config
    from overlock.detection.finetune import _register_backbones, read_classes

    _register_backbones(params)
    classes = read_classes(str(data_dir / "detection/splits/train.json"))
    cfg = build_detection_config(params, data_dir, work_dir, classes)
    model = build_detector(cfg.model)
    model.init_weights()
    model = MMDataParallel(model)
    model.train()
    optimizer = build_optimizer(model, cfg.optimizer)
    loader = build_dataloader(build_dataset(cfg.data.train), cfg.data.samples_per_gpu, 0, num_gpus=1, dist=False,
                              seed=0)
    times = []
    batches = iter(loader)
    for i in range(warmup + iters):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        start = time.perf_counter()
        out = model.train_step(batch, optimizer)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_stage(tmp: Path) -> dict:
    """The real finetune stage with the default demo params; returns its metrics."""
    import subprocess

    import yaml

    from conftest import write_demo_detection_layout
    from test_detection_finetune import write_pretrain_output

    from overlock.params import parse_params

    defaults = parse_params({})
    demo = defaults.data.demo
    write_demo_detection_layout(tmp / "data/datasets", demo.coco_train_images, demo.coco_val_images,
                                demo.coco_image_size, calibration=2)
    write_pretrain_output(tmp / "models/classifier", {})
    (tmp / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}))
    (tmp / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    cmd = [sys.executable, "-m", "stages.finetune", "--params", str(tmp / "params.yaml"), "--data",
           str(tmp / "data/datasets"), "--classifier", str(tmp / "models/classifier"), "--out",
           str(tmp / "models/detector"), "--metrics", str(tmp / "metrics.json"), "--plots", str(tmp / "plots")]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**__import__("os").environ, "OVERLOCK_REPO": str(tmp)})
    metrics = json.loads((tmp / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--stage", action="store_true", help="also run the default demo stage and report AP")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from conftest import write_demo_detection_layout

    from overlock.params import parse_params

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        defaults = parse_params({}).data.demo
        write_demo_detection_layout(tmp / "data", 8, 2, defaults.coco_image_size)
        for detector in ("mask_rcnn", "faster_rcnn"):
            for label, overrides in (("OverLoCK-XT (demo default)", {}), ("reduced (tests)", TINY)):
                params = parse_params({"model": {"overrides": overrides}, "finetune": {"detector": detector}})
                s = seconds_per_iter(params, tmp / "data", tmp / "wd", args.iters)
                rows.append((detector, label, params.finetune.img_scale, params.finetune.samples_per_gpu, s))
                print(f"{detector:12s} {label:28s} {s:.3f} s/iter", flush=True)
        print(f"\n| detector | backbone | img_scale | batch | s/iter (CPU, {args.threads} thread, fp32) |")
        print("|---|---|---|---|---|")
        for detector, label, scale, batch, s in rows:
            print(f"| {detector} | {label} | {scale[0]}x{scale[1]} | {batch} | {s:.3f} |")
        if args.stage:
            metrics = run_stage(tmp / "stage")
            keys = ["bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50", "params_m", "wall_s"]
            print("\n" + json.dumps({k: round(metrics[k], 4) for k in keys if k in metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
