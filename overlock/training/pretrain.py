"""The ``pretrain`` stage: Ray Train (``TorchTrainer``) classification pretraining of ``model.arch``.

Runs the same from DVC (a local Ray runtime, or ``pretrain.ray_address`` / ``$RAY_ADDRESS``) and as a Ray
job (``ray job submit --working-dir . -- python pipelines/pretrain.py ...``), in the stage kernel's context
(``overlock.pipeline``). Ray's storage lives under the stage state directory's hash
(``<storage>/pretrain-<hash>``), outside DVC outs: a re-run after a kill finds the same Ray run and resumes
from its latest checkpoint; Ray retries worker failures from the last checkpoint (``pretrain.max_failures``).
The outputs are written at the end from the latest checkpoint, through the context's staging directory. On a multi-node cluster ``pretrain.storage_path`` and the MLflow store
(``tracking.uri``: an absolute path on shared storage, or an ``mlflow server``) must be reachable from
every node.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING


from overlock.compute import repo_root
from overlock.params import Params
from overlock.tracking import write_metrics_file
from overlock.training import checkpoints as ckpt
from overlock.training import elastic, ray_data_loader, recipe
from overlock.training.callbacks import load_callbacks
from overlock.training.loader import default_cpus_per_worker
from overlock.training.loop import NonFiniteLossError, load_datasets, train_loop_per_worker
from overlock.training.memory_plan import apply_plan, plan_for_params

if TYPE_CHECKING:  # the kernel is above this package: only its type is named here
    from overlock.pipeline.context import StageContext

log = logging.getLogger("overlock.pretrain")

STAGE = "pretrain"
PLOT_COLUMNS = ("epoch", "train_loss", "val_top1", "val_top1_ema", "val_top5", "lr")


def data_fingerprint(data: Path) -> str:
    """Cheap fingerprint of the classification data: classes.json, splits.json and file counts per folder."""
    from overlock.data.datasets import classification_root
    root = classification_root(data)
    h = hashlib.sha256()
    for name in ("classes.json", "splits.json"):
        if (root / name).exists():
            h.update((root / name).read_bytes())
    for split in ("train", "val"):
        if (root / split).is_dir():
            for entry in sorted(os.scandir(root / split), key=lambda e: e.name):
                if entry.is_dir():
                    h.update(f"{split}/{entry.name}:{sum(1 for _ in os.scandir(entry.path))}".encode())
    return h.hexdigest()[:16]


def input_fingerprint(params: Params, data: Path, **_: Path) -> str:
    """The resume-key input of the stage (:attr:`StageSpec.resume_inputs`): the classification data."""
    return data_fingerprint(Path(data).resolve())


def storage_root(params: Params) -> Path:
    """Absolute Ray storage path (``pretrain.storage_path`` or ``<repo>/.overlock/ray``)."""
    path = Path(params.pretrain.storage_path) if params.pretrain.storage_path else repo_root() / ".overlock" / "ray"
    return path.expanduser().resolve()


def _check_compute(params: Params) -> None:
    p = params.pretrain
    if params.compute.precision == "fp16" and p.gpus_per_worker == 0:
        raise ValueError("compute.precision=fp16 needs GPUs (pretrain.gpus_per_worker > 0); on CPU use bf16 or fp32")
    if params.compute.device == "cuda" and p.gpus_per_worker == 0:
        raise ValueError("compute.device=cuda but pretrain.gpus_per_worker=0: set pretrain.gpus_per_worker "
                         "(e.g. 1) or compute.device=auto")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_ray(params: Params) -> None:
    """Connect to ``pretrain.ray_address`` / ``$RAY_ADDRESS``, or start a local runtime with its dashboard
    (Ray's State API, which Ray Train's placement-group cleaner polls, is served by it) on a free local port.
    Ray's own INFO lines (and Ray Train's warnings, e.g. retried resource requests on a loaded machine) stay in
    its log files; the stage prints where they are."""
    import ray
    if ray.is_initialized():
        return
    address = params.pretrain.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # one node: nothing is drained or preempted, and Ray Train's PreemptionWatcher only logs an error here
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # Ray's 60 s fails on a loaded machine
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                 logging_level=logging.WARNING)
    log.info("Ray: %s; full logs: %s", ray.get_runtime_context().gcs_address, _ray_logs_dir())


def _ray_logs_dir() -> str:
    """Ray's log directory of this session (on the head node)."""
    try:
        from ray._private.worker import _global_node
        return _global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001  (a Ray-internal accessor: a plain hint when it moves)
        return "<ray temp dir>/session_latest/logs on the head node"


def _trainer(params: Params, config: dict, storage: Path, name: str):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    p = params.pretrain
    use_gpu = p.gpus_per_worker > 0
    import ray
    ray_data = p.loader == "ray_data"  # the workers decode nothing for training: fewer CPUs by default
    cpus = p.cpus_per_worker or (ray_data_loader.default_worker_cpus(p.gpus_per_worker) if ray_data else
                                 default_cpus_per_worker(p.gpus_per_worker, ray.cluster_resources()))
    resources = {"CPU": cpus, **({"GPU": p.gpus_per_worker} if use_gpu else {}), **p.worker_resources}
    datasets = ray_data_loader.trainer_datasets(params, Path(config["data"]), config["num_classes"], cpus) \
        if ray_data else None
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=config, datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=elastic.worker_range(p), use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             logging_config=LoggingConfig(log_level="ERROR"),  # the rest: Ray's log files
                             checkpoint_config=CheckpointConfig(num_to_keep=p.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=p.max_failures)))


def _elastic_params(p) -> dict:
    """What MLflow records of the elastic setup: the worker range, the rule, the LR and global batch per count."""
    counts = range(p.min_workers or p.workers, p.workers + 1)
    return {"workers": f"{p.min_workers or p.workers}..{p.workers}", "scaling": p.elastic_scaling,
            "lr_per_workers": {n: elastic.learning_rate(p, n) for n in counts},
            "global_batch_per_workers": {n: elastic.global_batch(p, n) for n in counts}}


def _curves_png(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for key in ("val_top1", "val_top1_ema", "val_top5"):
        ax2.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="validation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_metrics(state: dict) -> dict:
    """DVC/MLflow summary: best and final top-1/top-5 (raw and EMA), epochs, throughput."""
    hist = state["history"]
    last = hist[-1]
    return {"best_val_top1": max(h["val_top1"] for h in hist),
            "best_val_top1_ema": max(h["val_top1_ema"] for h in hist),
            "best_val_top5": max(h["val_top5"] for h in hist),
            "best_epoch": state["best"]["epoch"],
            "final_val_top1": last["val_top1"], "final_val_top5": last["val_top5"],
            "final_val_top1_ema": last["val_top1_ema"], "final_val_top5_ema": last["val_top5_ema"],
            "epochs": last["epoch"], "mean_img_per_sec": sum(h["img_per_sec"] for h in hist) / len(hist)}


def _model_info(params: Params, state: dict, model) -> dict:
    from overlock.registry import resolve_model
    spec_name = resolve_model(params.model.arch, params.model.size).timm_name
    cfg = recipe.data_config(model, params.pretrain.input_size)
    meta = state["meta"]
    return {"arch": meta["arch"], "size": meta["size"], "timm_name": spec_name, "model_kwargs": meta["model_kwargs"],
            "num_classes": meta["num_classes"], "classes": meta["classes"], "input_size": list(cfg["input_size"]),
            "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
            "std": list(cfg["std"])}


def run_pretrain(ctx: "StageContext") -> dict:
    """Train the classifier with Ray Train and write ``out`` (final/best/model.json/history.json), metrics, plots."""
    import ray
    params, run = ctx.params, ctx.run
    eff = recipe.effective_params(params)
    _check_compute(eff)
    data = ctx["data"].resolve()
    _, _, classes = load_datasets(data)  # fails here (not in the workers) when the data is missing
    load_callbacks(c.model_dump() for c in params.pretrain.callbacks)  # an unimportable hook fails here, not in Ray
    key_dir = ctx.state_dir
    storage, name = storage_root(params), f"{STAGE}-{key_dir.name}"
    fatal_file = key_dir / "fatal_error.txt"
    fatal_file.unlink(missing_ok=True)
    _init_ray(params)
    plan = plan_for_params(eff, len(classes))  # pretrain.memory_preset: batch, accumulation, checkpointing
    eff = apply_plan(eff, plan)
    p = eff.pretrain
    accum = recipe.accumulation_steps(p, p.workers)  # a global batch that does not divide fails here
    if plan is not None:
        print(plan.describe(), flush=True)
        log.info("%s", plan.describe())
        run.log_params({"memory_plan": plan.as_dict()})
        run.log_dict(plan.as_dict(), "memory_plan.json")
    run.set_tags({"overlock.ray_run": str(storage / name), "overlock.recipe": p.recipe})
    run.log_params({"effective": {"pretrain": eff.pretrain.model_dump(mode="json"),
                                  "precision": eff.compute.precision, "lr": recipe.learning_rate(p, p.workers),
                                  "global_batch": recipe.global_batch(p, p.workers), "accum_steps": accum},
                    "elastic": _elastic_params(p)})
    config = {"params": eff.model_dump(mode="json"), "data": str(data), "num_classes": len(classes),
              "mlflow_uri": run.uri, "mlflow_run_id": run.run_id, "fatal_file": str(fatal_file),
              "tty": sys.stderr.isatty()}
    log.info("Ray Train run %s (storage %s): %s workers x %d per worker x %d accumulation steps, recipe %s, "
             "precision %s", name, storage, elastic.worker_range(p), p.batch_size, accum, p.recipe,
             eff.compute.precision)
    try:
        result = _trainer(eff, config, storage, name).fit()
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"pretraining failed after pretrain.max_failures={p.max_failures} retries: {err}; "
                           f"the Ray run is {storage / name} (re-running the stage resumes it)") from err
    if fatal_file.exists():
        raise NonFiniteLossError(fatal_file.read_text())
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining finished without a checkpoint in {storage / name}; delete that "
                           "directory and re-run the stage")
    with result.checkpoint.as_directory() as d:
        state = ckpt.load_training_state(Path(d))
    return _write_outputs(ctx, eff, state)


def _write_outputs(ctx: "StageContext", params: Params, state: dict) -> dict:
    run = ctx.run
    model = recipe.build_model(params, state["meta"]["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    with ctx.publish() as staging:
        ckpt.write_classifier_outputs(state, _model_info(params, state, model), staging)
        for name in ("best.pth", "final.pth", "model.json"):
            run.log_artifact(staging / name, "checkpoints")
    summary = summary_metrics(state)
    write_metrics_file(ctx["metrics"], summary)
    ctx.write_plot(state["history"], PLOT_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "pretrain_curves.png"
        _curves_png(state["history"], png)
        run.log_artifact(png, "plots")
    run.log_dict(state["history"], "history.json")
    run.log_summary(summary)
    log.info("pretrain done: best top-1 %.2f%% (EMA %.2f%%), final top-1 %.2f%% -> %s", summary["best_val_top1"],
             summary["best_val_top1_ema"], summary["final_val_top1"], ctx["out"])
    return summary
