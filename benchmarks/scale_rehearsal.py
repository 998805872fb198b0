"""Scale rehearsal: ILSVRC2012-format archives of real-size images through the real download and extract stages
(under DVC, in a scratch copy of this repository), then ``dvc status`` / ``dvc commit`` of the pipeline (DVC
tracks the tree's ``MANIFEST.json``, not its files), the manifest check a stage runs before reading the data,
and one epoch of the training input pipeline; each step timed and extrapolated to ImageNet-1K.

The generated archives cannot match the published checksums: the scratch project lists them in
``data.unverified_archives`` (the download stage then hashes them and logs each as UNVERIFIED).

    python benchmarks/scale_rehearsal.py                 # default 20 classes x 50 + 1,000 val: minutes on 2 cores
    python benchmarks/scale_rehearsal.py --classes 100 --train-per-class 100 --val 5000   # the real-size target

Extrapolation (printed with the table): the extraction and the verification are also timed in this process
(without the stage's start-up); ``dvc status``/``commit`` are split into a fixed part (``dvc status`` before any
data exists) and a per-file part. Extraction scales with archive bytes (ImageNet-1K train+val: 147.9 GB
for 1,331,167 images, ~111 kB each), image verification and loading with images, ``dvc status`` with files;
work that runs in parallel (per-class extraction, verification, loading) is scaled linearly from the cores used
here to ``--target-cores`` - an assumption that holds while the disk keeps up (a local NVMe SSD reads
>2 GB/s; 148 GB in 20 min needs ~125 MB/s).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET_FILES = 1_281_167 + 50_000
IMAGENET_BYTES = 147.9e9  # ILSVRC2012_img_train.tar 138 GB + ILSVRC2012_img_val.tar 6.3 GB (+ devkit)


def _run(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took


def _project(work: Path, archives: dict[str, Path], calibration: int) -> Path:
    """A scratch copy of this repository (tracked files) set up for imagenet1k from the generated archives."""
    project = work / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / rel)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(dataset="imagenet1k", detection_dataset="none", calibration_per_class=calibration,
                          sources={p.name: str(p) for p in archives.values()},
                          unverified_archives=[p.name for p in archives.values()])
    params["tracking"]["uri"] = f"sqlite:///{project / 'mlflow.db'}"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=r@example.com", "-c", "user.name=rehearsal", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    return project


def _loading_epoch(data: Path, workers: int) -> tuple[float, float, int]:
    """(wall img/s, img/s per CPU core, images) of one epoch of the official training input pipeline."""
    import torch

    from overlock.data.datasets import ClassificationDataset
    from overlock.params import parse_params
    from overlock.training import recipe
    from overlock.training.loader import loader_settings
    p = recipe.effective_params(parse_params({"pretrain": {"recipe": "official"}})).pretrain
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
           "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
    train_tf, _ = recipe.build_transforms(p, cfg)
    ds = ClassificationDataset(data, "train", transform=train_tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, drop_last=False,
                                         **loader_settings(workers + 1, "cpu", persistent=False))
    mixup = recipe.build_mixup(p, len(ds.classes))

    def cpu() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
    c0, t0, n = cpu(), time.perf_counter(), 0
    for images, targets in loader:
        images = train_tf.on_device(images)
        if len(images) % 2 == 0:  # timm's batch mixup needs an even batch
            images, targets = mixup(images, targets)
        n += len(images)
    del loader
    return n / (time.perf_counter() - t0), n / (cpu() - c0), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory (deleted)")
    parser.add_argument("--target-cores", type=int, default=16)
    args = parser.parse_args()
    from overlock.data.layouts import find_unreadable
    from overlock.data.synthetic_images import write_ilsvrc2012_archives
    from overlock.training.loader import worker_cpu_count
    cores = worker_cpu_count()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scale_rehearsal_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    env.pop("OVERLOCK_REPO", None)
    rows: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        archives = write_ilsvrc2012_archives(work / "archives", args.classes, args.train_per_class, args.val,
                                             workers=cores)
        rows["generate archives"] = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in archives.values())
        n_images = args.classes * args.train_per_class + args.val
        project = _project(work, archives, calibration=min(5, args.train_per_class - 1))
        env["PYTHONPATH"] = str(project)
        rows["dvc status before any data (fixed cost)"] = _run(["dvc", "status"], project, env)
        rows["dvc repro download (hash 3 archives)"] = _run(["dvc", "repro", "-s", "download"], project, env)
        rows["dvc repro extract (extract + verify + splits)"] = _run(["dvc", "repro", "-s", "extract"], project, env)
        from overlock.data.layouts import build_imagenet
        t0 = time.perf_counter()  # the extraction alone, in this process (no stage start-up, MLflow, verify)
        build_imagenet(archives["train"], archives["val"], archives["devkit"], work / "extract_alone")
        rows["extraction alone (train per-class tars in parallel, val)"] = time.perf_counter() - t0
        shutil.rmtree(work / "extract_alone")
        data = project / "data" / "datasets" / "classification"
        rel = [str(p.relative_to(data)) for p in data.rglob("*.JPEG")]
        t0 = time.perf_counter()
        bad = find_unreadable(data, rel, "full")
        rows["verify alone (full decode, all cores)"] = time.perf_counter() - t0
        rows["dvc status (whole pipeline)"] = _run(["dvc", "status"], project, env)
        rows["dvc status again"] = _run(["dvc", "status"], project, env)
        rows["dvc commit -f extract"] = _run(["dvc", "commit", "-f", "extract"], project, env)
        from overlock.data.manifest import check_tree
        t0 = time.perf_counter()  # what each later stage's entry point does instead of DVC hashing the tree
        check_tree(project / "data" / "datasets")
        rows["manifest check (stat of every file, before a stage reads the data)"] = time.perf_counter() - t0
        files = sum(1 for _ in (project / "data" / "datasets").rglob("*") if _.is_file())
        wall, per_core, loaded = _loading_epoch(project / "data" / "datasets", max(0, cores - 1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    extract_only = rows["extraction alone (train per-class tars in parallel, val)"]
    fixed = rows["dvc status before any data (fixed cost)"]
    scale_cores = args.target_cores / cores
    to_imagenet = {"bytes": IMAGENET_BYTES / size, "images": IMAGENET_FILES / n_images, "files": IMAGENET_FILES / files}
    print(f"# {cores} cores (load average {os.getloadavg()[0]:.1f}); {args.classes} classes x {args.train_per_class} "
          f"train + {args.val} val = {n_images} images, {size / 1e6:.0f} MB of archives "
          f"({size / n_images / 1e3:.0f} kB/image), {files} files in data/datasets, {len(bad)} unreadable")
    print("| step | here (s) | per unit | ImageNet-1K on "
          f"{args.target_cores} cores (extrapolated) |")
    print("|---|---:|---:|---:|")
    est = {
        "extraction (per-class tars in parallel, val serial)": (extract_only, "bytes", True),
        "verify (full decode, parallel)": (rows["verify alone (full decode, all cores)"], "images", True),
        "dvc status, per-file part": (rows["dvc status (whole pipeline)"] - fixed, "files", False),
        "dvc status again, per-file part": (rows["dvc status again"] - fixed, "files", False),
        "dvc commit -f extract, per-file part": (rows["dvc commit -f extract"] - fixed, "files", False),
    }
    for name, secs in rows.items():
        print(f"| {name} | {secs:.1f} | | |")  # as measured, stage start-up included
    for name, (secs, unit, parallel) in est.items():
        total = secs * to_imagenet[unit] / (scale_cores if parallel else 1) + (0 if parallel else fixed)
        print(f"| {name} | {secs:.1f} | {secs / (size if unit == 'bytes' else n_images if unit == 'images' else files) * (1e9 if unit == 'bytes' else 1e3):.2f} "
              f"{'s/GB' if unit == 'bytes' else 'ms/' + unit[:-1]} | {total / 60:.1f} min |")
    check = rows["manifest check (stat of every file, before a stage reads the data)"]
    print(f"| manifest check at a stage's start (one process, stat only) | {check:.1f} | "
          f"{check / files * 1e3:.3f} ms/file | {check * to_imagenet['files'] / 60:.1f} min |")
    print(f"| training input pipeline, one epoch ({max(0, cores - 1)} loader processes) | {loaded / wall:.1f} | "
          f"{per_core:.0f} img/s per core | {1_281_167 / (per_core * args.target_cores) / 60:.1f} min per epoch "
          f"at {args.target_cores} cores |")
    print(json.dumps({"rows_s": rows, "loading": {"wall_img_s": wall, "img_s_per_core": per_core}}, indent=None))


if __name__ == "__main__":
    main()
