"""The ``finetune`` stage: MMDetection fine-tuning of the pretrained backbone, then COCO evaluation.

``run_finetune(ctx)`` (a :class:`overlock.pipeline.context.StageContext` with paths data, classifier, out,
metrics, plots):

1. checks the inputs (detection layout, classifier checkpoint) and builds the mmdet config from params;
2. ``finetune.mode: train`` — builds the detector, initialises the backbone from the pretrain output
   (``finetune.init: ema|raw``) or an official classification checkpoint (``checkpoint``), and trains with
   ``mmdet.apis.train_detector``; the work dir is the stage's state directory
   (``.overlock/state/finetune/<hash>/``) and a re-run after a kill resumes from the latest complete
   checkpoint there;
   ``finetune.mode: evaluate`` — loads a detector checkpoint (e.g. an official Mask R-CNN release);
3. predicts the val and calibration splits once, batched (``overlock.detection.predictions``), and evaluates
   the val predictions with pycocotools (bbox/segm AP, AP50, AP75, APs/m/l); writes the DVC metrics, the loss
   curve (``plots/loss.csv``, ``loss.png``) and the outs (``detector.pth``, ``config.py``, ``metrics.json``,
   ``predictions/{val,calibration}.json``, which calibrate and evaluate read instead of running the detector)
   through a staging dir, logs metrics/artifacts to MLflow (the calibrate stage registers the detector, with its fitted score
   calibration, as the pyfunc model ``overlock-detector``: ``overlock.serving``).

``finetune.launcher: pytorch`` runs the training under ``torchrun`` on every visible GPU
(``python -m overlock.detection.finetune worker ...``), with rank 0 logging into the same MLflow run; each rank
predicts its shard of the val and calibration images and rank 0 merges and writes them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import overlock.compat  # noqa: F401  (mmcv/torch 2.x shims before anything imports mmcv)
from overlock.compute import launch_torchrun
from overlock.detection.config import build_detection_config, coco_files
from overlock.detection.mlflow_hook import LOSS_HISTORY, read_loss_history
from overlock.data.coco_results import PREDICTIONS_DIR
from overlock.params import Params
from overlock.state import file_digest, read_json, write_json_atomic
from overlock.tracking import StageRun, attach_run, write_metrics_file

if TYPE_CHECKING:  # the kernel is above this package: only its type is named here
    from overlock.pipeline.context import StageContext

log = logging.getLogger(__name__)

__all__ = ["run_finetune", "input_fingerprint", "check_inputs", "read_classes", "latest_checkpoint",
           "init_backbone", "evaluate_detector", "COCO_METRICS"]

COCO_METRICS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


# ---------------------------------------------------------------------------------------- inputs
def _init_source(params: Params, classifier: Path) -> Path | None:
    from overlock.models.checkpoint import backbone_init_source
    return backbone_init_source(params.finetune, classifier)


def check_inputs(params: Params, data: Path, classifier: Path) -> dict[str, tuple[str, str]]:
    """Fail early, naming the missing piece and the fix; returns the COCO split files."""
    ft = params.finetune
    files = coco_files(Path(data))
    for split in ("train", "val"):
        ann, img = files[split]
        if not Path(ann).is_file() or not Path(img).is_dir():
            raise FileNotFoundError(
                f"detection {split} split missing ({ann} / {img}): run the extract stage first "
                f"(`dvc repro extract`) with data.detection_dataset set (now {params.data.detection_dataset!r})")
    bare = _annotations_without_masks(Path(data))
    if ft.mode == "train" and ft.detector == "mask_rcnn" and bare:
        raise ValueError(f"{bare} train annotations of data.detection_dataset={params.data.detection_dataset!r} have "
                         f"no segmentation, which Mask R-CNN trains on: set finetune.detector=faster_rcnn for a "
                         f"boxes-only dataset, or add the masks (see data/datasets/integrity_report.json)")
    if (ft.mode == "evaluate" or ft.init == "checkpoint") and not ft.checkpoint:
        raise ValueError(f"finetune.{'mode=evaluate' if ft.mode == 'evaluate' else 'init=checkpoint'} needs "
                         "finetune.checkpoint: the path of the checkpoint file")
    source = _init_source(params, classifier)
    if source is not None and not source.is_file():
        hint = ("run the pretrain stage first (`dvc repro pretrain`) or set finetune.init=none"
                if ft.init in ("ema", "raw") and ft.mode == "train" else "check finetune.checkpoint")
        raise FileNotFoundError(f"checkpoint {source} not found: {hint}")
    return files


def _annotations_without_masks(data: Path) -> int:
    """Train annotations without a mask, as the extract stage's integrity report counts them (own data)."""
    report = read_json(Path(data) / "integrity_report.json") or {}
    return int(report.get("detection", {}).get("annotations_without_masks", {}).get("train", 0))


def input_fingerprint(params: Params, data: Path, classifier: Path, **_: Path) -> str:
    """The resume-key input of the stage (:attr:`StageSpec.resume_inputs`): the COCO annotation files and the
    backbone's initial checkpoint (a changed one never resumes another run's work dir)."""
    files = coco_files(Path(data))
    digests = [file_digest(Path(files[s][0])) for s in ("train", "val") if Path(files[s][0]).is_file()]
    source = _init_source(params, Path(classifier))
    if source is not None and source.is_file():
        digests.append(file_digest(source))
    return "|".join(digests)


def read_classes(ann_file: str) -> list[str]:
    """Category names of a COCO annotation file, in category-id order (the model's class order)."""
    cats = sorted(json.loads(Path(ann_file).read_text())["categories"], key=lambda c: c["id"])
    if not cats:
        raise ValueError(f"{ann_file} has no categories: the detection dataset is empty or corrupt")
    return [c["name"] for c in cats]


# ---------------------------------------------------------------------------------------- checkpoints
def _is_complete(path: Path) -> bool:
    """A torch zip checkpoint cut by a kill has no central directory: not a valid zip."""
    try:
        return path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return False


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete ``iter_*.pth``/``epoch_*.pth`` in ``work_dir`` (None when there is none)."""
    found = []
    for p in Path(work_dir).glob("*.pth"):
        stem = p.stem
        if p.is_symlink() or not (stem.startswith("iter_") or stem.startswith("epoch_")):
            continue
        try:
            found.append((int(stem.split("_")[-1]), p))
        except ValueError:
            continue
    for _, p in sorted(found, reverse=True):
        if _is_complete(p):
            return p
        log.warning("skipping incomplete checkpoint %s (cut by a kill)", p)
    return None


def init_backbone(model, params: Params, classifier: Path) -> dict:
    """The backbone weights ``finetune.init`` chooses (:func:`~overlock.models.checkpoint.init_dense_backbone`)."""
    from overlock.models.checkpoint import init_dense_backbone
    return init_dense_backbone(model.backbone, params.finetune, classifier, "detector")


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_detector(model, cfg, splits: dict[str, tuple[str, str]], work_dir: Path) -> dict[str, float]:
    """Predict the val and calibration splits once (batched; sharded over the ranks under torchrun), write
    the predictions to ``<work_dir>/predictions/<split>.json`` and return the val COCO metrics (rank 0; other
    ranks: {}). The calibrate and evaluate stages read these predictions instead of running the detector."""
    from mmcv.runner import get_dist_info

    from overlock.data.coco_results import PREDICTED_SPLITS, load_coco, predictions_file, write_predictions
    from overlock.detection.predictions import predict_split
    from overlock.metrics.coco import SUMMARY_NAMES, coco_evaluate

    device = "cuda" if cfg.device == "cuda" else "cpu"
    batch = max(2, int(cfg.data.samples_per_gpu))  # inference holds no gradients: at least 2 images per pass
    rank = get_dist_info()[0]
    val = None
    for split in PREDICTED_SPLITS:
        ann_file, img_prefix = splits[split]
        if not Path(ann_file).is_file():
            log.warning("no %s split (%s): its predictions are not written", split, ann_file)
            continue
        dets = predict_split(model, cfg.data.test, ann_file, img_prefix, batch, cfg.data.workers_per_gpu, device,
                             desc=f"predict {split}")
        if rank == 0:
            write_predictions(predictions_file(work_dir, split), dets)
            val = dets if split == "val" else val
    if rank != 0:
        return {}
    if val is None:
        raise FileNotFoundError(f"{splits['val'][0]} not found: run the extract stage first (`dvc repro extract`)")
    coco = load_coco(splits["val"][0])
    out = {}
    for metric in (m for m in ("bbox", "segm") if m in cfg.evaluation.metric):
        results = [d for d in val if metric == "bbox" or "segmentation" in d]
        if metric == "bbox":
            results = [{k: v for k, v in d.items() if k != "segmentation"} for d in results]
        ev = coco_evaluate(coco, results, metric)
        if not ev["summary"]:
            log.warning("no %s detections on the validation split: every %s AP is 0", metric, metric)
        out.update({f"{metric}_{ours}": float(ev["summary"].get(theirs, 0.0))
                    for ours, theirs in zip(COCO_METRICS, SUMMARY_NAMES)})
        log.info("%s per-class AP: %s", metric, json.dumps(ev["per_class"]))
    return out


# ---------------------------------------------------------------------------------------- training
def _register_backbones(params: Params) -> None:
    """Register the catalog's backbones in mmdet's BACKBONES; fails unless this model's is registered."""
    from overlock.detection.registration import require_mmdet_backbone
    from overlock.registry import resolve_model

    require_mmdet_backbone(resolve_model(params.model.arch, params.model.size))


def _train(params: Params, cfg, data: Path, classifier: Path, run_uri: str, run_id: str, distributed: bool) -> dict:
    """Build, initialise, (resume,) train, predict and evaluate; returns the metrics (rank 0) and the model info."""
    from mmcv.runner import get_dist_info
    from mmdet.apis import train_detector
    from mmdet.datasets import build_dataset
    from mmdet.models import build_detector

    from overlock.compat import trusted_checkpoint_dir

    _register_backbones(params)

    work_dir = Path(cfg.work_dir)
    model = build_detector(cfg.model)
    model.init_weights()
    info = init_backbone(model, params, classifier)
    resume = latest_checkpoint(work_dir)
    cfg.resume_from = str(resume) if resume else None
    info["resumed_from_iter"] = _checkpoint_iter(resume)
    world_size = get_dist_info()[1]
    info["processes"] = f"{world_size} ({'torchrun, ' if distributed else ''}{cfg.device})"
    cfg.custom_hooks = list(cfg.get("custom_hooks", [])) + [dict(
        type="MlflowLossHook", tracking_uri=run_uri, run_id=run_id, history_file=str(work_dir / LOSS_HISTORY),
        priority="LOW")]
    dataset = build_dataset(cfg.data.train)
    model.CLASSES = dataset.CLASSES
    with trusted_checkpoint_dir(work_dir):
        train_detector(model, [dataset], cfg, distributed=distributed, validate=params.finetune.schedule != "demo",
                       timestamp=time.strftime("%Y%m%d_%H%M%S", time.gmtime()),
                       meta=dict(config=cfg.pretty_text, seed=params.seed, CLASSES=dataset.CLASSES))
    metrics = evaluate_detector(model, cfg, coco_files(Path(data)), work_dir)
    if get_dist_info()[0] == 0:
        from mmcv.runner import save_checkpoint
        save_checkpoint(model, str(work_dir / "final_detector.pth"),
                        meta=dict(CLASSES=tuple(dataset.CLASSES), config=cfg.pretty_text,
                                  iter=int(cfg.runner.get("max_iters") or 0)))
        info["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        write_json_atomic(work_dir / "result.json", {"metrics": metrics, "info": info})
    return {"metrics": metrics, "info": info}


def _checkpoint_iter(path: Path | None) -> int:
    return int(path.stem.split("_")[-1]) if path else 0


def _evaluate_only(params: Params, cfg, data: Path) -> dict:
    """``finetune.mode: evaluate``: load a detector checkpoint (official release or ours) and evaluate."""
    from mmcv.runner import load_checkpoint, save_checkpoint
    from mmdet.models import build_detector

    _register_backbones(params)
    model = build_detector(cfg.model)
    ckpt = load_checkpoint(model, params.finetune.checkpoint, map_location="cpu", strict=False)
    meta = (ckpt or {}).get("meta", {}) or {}
    if meta.get("CLASSES"):  # the checkpoint's class names, else those of the dataset it is evaluated on
        model.CLASSES = tuple(meta["CLASSES"])
    else:
        from mmdet.datasets import build_dataset
        model.CLASSES = tuple(build_dataset(cfg.data.val).CLASSES)
    work_dir = Path(cfg.work_dir)
    metrics = evaluate_detector(model, cfg, coco_files(Path(data)), work_dir)
    save_checkpoint(model, str(work_dir / "final_detector.pth"),
                    meta=dict(CLASSES=tuple(model.CLASSES), config=cfg.pretty_text, source=params.finetune.checkpoint))
    info = {"init": "checkpoint", "init_source": params.finetune.checkpoint,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "checkpoint_meta_keys": sorted(map(str, meta))}
    write_json_atomic(work_dir / "result.json", {"metrics": metrics, "info": info})
    return {"metrics": metrics, "info": info}


def _launch_torchrun(params: Params, params_file: Path, run: StageRun, data: Path, classifier: Path,
                     work_dir: Path) -> None:
    """Run the training under ``torchrun`` (one process per GPU; gloo CPU processes on a CPU-only host)."""
    launch_torchrun("finetune", params.finetune.nproc_per_node, "overlock.detection.finetune",
                    ["--params-json", str(params_file), "--data", str(data), "--classifier", str(classifier),
                     "--work-dir", str(work_dir), "--run-uri", run.uri, "--run-id", run.run_id])


# ---------------------------------------------------------------------------------------- outputs
def _write_plots(history: list[dict], ctx: "StageContext") -> Path:
    from overlock.figures import loss_curve

    ctx.write_plot([{"iter": r["iter"], "loss": f"{r['loss']:.6g}"} for r in history if "loss" in r], ["iter", "loss"])
    return loss_curve(history, ctx["plots"] / "loss.png", "finetune")


def _clean_config(cfg):
    """The config without the run-specific MLflow hook (what downstream stages rebuild the detector from)."""
    from mmcv import Config

    raw = cfg._cfg_dict.to_dict()
    raw["custom_hooks"] = [h for h in raw.get("custom_hooks", []) if h.get("type") != "MlflowLossHook"]
    raw["resume_from"] = None
    return Config(raw)


def _publish(ctx: "StageContext", cfg, work_dir: Path, result: dict) -> None:
    """Write the outs through a staging dir, the DVC metrics and plots, and log everything to MLflow."""
    params, run, out = ctx.params, ctx.run, ctx["out"]
    summary = {**result["metrics"], **{k: v for k, v in result["info"].items() if isinstance(v, (int, float))}}
    with ctx.publish() as staging:
        shutil.copy2(work_dir / "final_detector.pth", staging / "detector.pth")
        _clean_config(cfg).dump(str(staging / "config.py"))
        write_json_atomic(staging / "metrics.json", {**summary, "info": result["info"]})
        shutil.copytree(work_dir / PREDICTIONS_DIR, staging / PREDICTIONS_DIR)

    history = read_loss_history(work_dir / LOSS_HISTORY)
    png = _write_plots(history, ctx)
    write_metrics_file(ctx["metrics"], summary)

    run.log_summary({k: v for k, v in summary.items()})
    run.set_tags({f"finetune.{k}": v for k, v in result["info"].items() if not isinstance(v, (int, float))})
    run.log_artifact(png, "plots")
    run.log_artifacts(out, "detector")
    last = latest_checkpoint(work_dir)
    if last is not None:
        run.log_artifact(last, "checkpoints/last")
    for best in sorted(work_dir.glob("best_*.pth")):
        run.log_artifact(best, "checkpoints/best")


# ---------------------------------------------------------------------------------------- entry points
def run_finetune(ctx: "StageContext") -> dict:
    """The finetune stage (see the module docstring); returns the metrics written to ``metrics``."""
    params, run, data, classifier = ctx.params, ctx.run, ctx["data"], ctx["classifier"]
    ft = params.finetune
    files = check_inputs(params, data, classifier)
    classes = read_classes(files["train"][0])
    work_dir = ctx.state_dir
    device = ctx.device.type
    world = (ft.nproc_per_node or torch.cuda.device_count()) if ft.launcher == "pytorch" else 1
    cfg = build_detection_config(params, Path(data), work_dir, classes, device=device, world_size=max(world, 1))
    run.log_params({"finetune.config_file": str(Path(cfg.filename).name), "finetune.work_dir": str(work_dir)})
    run.log_text(_clean_config(cfg).pretty_text, "config.py")
    (work_dir / "result.json").unlink(missing_ok=True)
    shutil.rmtree(work_dir / PREDICTIONS_DIR, ignore_errors=True)  # written again after training

    if ft.mode == "evaluate":
        result = _evaluate_only(params, cfg, data)
    elif ft.launcher == "pytorch":
        params_file = work_dir / "params.json"
        write_json_atomic(params_file, params.model_dump(mode="json"))
        _launch_torchrun(params, params_file, run, data, classifier, work_dir)
        result = read_json(work_dir / "result.json")
        if result is None:
            raise RuntimeError(f"the torchrun workers finished without writing {work_dir / 'result.json'}")
    else:
        result = _train(params, cfg, data, classifier, run.uri, run.run_id, distributed=False)
    _publish(ctx, cfg, work_dir, result)
    return result["metrics"]


def _worker(argv: list[str]) -> int:
    """torchrun worker: train on this rank's GPU (or CPU, gloo); rank 0 logs to MLflow."""
    from overlock.compute import start_torchrun_worker

    args, params, device = start_torchrun_worker("overlock.detection.finetune", argv)
    files = coco_files(Path(args.data))
    cfg = build_detection_config(params, Path(args.data), Path(args.work_dir), read_classes(files["train"][0]),
                                 device=device, world_size=torch.distributed.get_world_size())
    attach_run(args.run_uri, args.run_id)  # fail fast when the store is unreachable from this worker
    _train(params, cfg, Path(args.data), Path(args.classifier), args.run_uri, args.run_id, distributed=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: python -m overlock.detection.finetune worker --params-json ... (started by the "
             "finetune stage with finetune.launcher=pytorch; run the stage with `python -m stages.finetune`)")
