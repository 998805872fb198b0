"""The ``segment`` stage: UperNet semantic segmentation (mmsegmentation 0.30) on the OverLoCK backbone.

``run_segment(ctx)`` (paths data, classifier, out, metrics, plots):

1. checks the inputs (the extracted ADE20K-format layout, the backbone's initial checkpoint) and builds the
   mmseg config from params (:mod:`overlock.segmentation.config`);
2. ``segment.mode: train`` — builds UperNet (+ FCN auxiliary head), initialises the backbone from the pretrain
   output (``segment.init: raw|ema``) or an official classification checkpoint (``checkpoint``) and trains
   with ``mmseg.apis.train_segmentor`` in the stage's state directory (``.overlock/state/segment/<hash>/``);
   a re-run after a kill resumes from the latest complete ``iter_*.pth`` there. ``segment.launcher:
   pytorch`` trains under ``torchrun`` (``python -m overlock.segmentation.stage worker ...``);
   ``segment.mode: evaluate`` — loads a whole UperNet checkpoint (e.g. an official
   ``upernet_overlock_*_ade20k.pth``), every name and shape checked;
3. evaluates on val (mIoU, mAcc, aAcc, per-class IoU), fits a pixel-wise temperature on the held-out
   calibration split (ECE/NLL before and after on val), writes the DVC metrics, the loss curve and the
   figures, the outs (``segmenter.pth``, ``config.py``, ``metrics.json``, ``temperature.json``,
   ``per_class_iou.json``, figures) through a staging dir and logs everything to MLflow (as artifacts: the
   registry holds only models MLflow can serve, and the segmenter has no pyfunc flavor yet).

``data.segmentation_dataset: none`` or a baseline ``model.arch`` skips the stage's work: its outputs say so
(``status: skipped`` and the reason).
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import overlock.compat  # noqa: F401  (mmcv/torch 2.x shims before anything imports mmcv)
from overlock.compute import launch_torchrun
from overlock.data.datasets import segmentation_classes, segmentation_split_files
from overlock.detection.mlflow_hook import LOSS_HISTORY, read_loss_history
from overlock.detection.finetune import latest_checkpoint
from overlock.params import Params
from overlock.segmentation.config import build_segmentation_config
from overlock.state import file_digest, read_json, write_json_atomic
from overlock.tracking import StageRun, attach_run, write_metrics_file

if TYPE_CHECKING:
    from overlock.pipeline.context import StageContext

log = logging.getLogger(__name__)

__all__ = ["run_segment", "input_fingerprint", "check_inputs", "init_backbone", "load_segmenter_checkpoint",
           "evaluate_segmenter", "SEG_METRICS"]

SEG_METRICS = ("mIoU", "mAcc", "aAcc")


# ---------------------------------------------------------------------------------------- inputs
def _init_source(params: Params, classifier: Path) -> Path | None:
    from overlock.models.checkpoint import backbone_init_source
    return backbone_init_source(params.segment, classifier)


def check_inputs(params: Params, data: Path, classifier: Path) -> dict[str, dict]:
    """Fail early, naming the missing piece and the fix; returns the split files."""
    from overlock.registry import resolve_model
    from overlock.segmentation.registration import require_mmseg_backbone

    sg = params.segment
    require_mmseg_backbone(resolve_model(params.model.arch, params.model.size))
    splits = segmentation_split_files(data)
    if (sg.mode == "evaluate" or sg.init == "checkpoint") and not sg.checkpoint:
        raise ValueError(f"segment.{'mode=evaluate' if sg.mode == 'evaluate' else 'init=checkpoint'} needs "
                         "segment.checkpoint: the path of the checkpoint file")
    source = _init_source(params, classifier)
    if source is not None and not source.is_file():
        hint = ("run the pretrain stage first (`dvc repro pretrain`) or set segment.init=none"
                if sg.init in ("ema", "raw") and sg.mode == "train" else "check segment.checkpoint")
        raise FileNotFoundError(f"checkpoint {source} not found: {hint}")
    return splits


def input_fingerprint(params: Params, data: Path, classifier: Path, **_: Path) -> str:
    """The resume-key input (:attr:`StageSpec.resume_inputs`): the split files and the initial checkpoint."""
    digests = []
    try:
        digests += [file_digest(Path(s["split"])) for s in segmentation_split_files(data).values()]
    except FileNotFoundError:
        pass
    source = _init_source(params, Path(classifier))
    if source is not None and source.is_file():
        digests.append(file_digest(source))
    return "|".join(digests)


# ---------------------------------------------------------------------------------------- weights
def init_backbone(model, params: Params, classifier: Path) -> dict:
    """The backbone weights ``segment.init`` chooses (:func:`~overlock.models.checkpoint.init_dense_backbone`)."""
    from overlock.models.checkpoint import init_dense_backbone
    return init_dense_backbone(model.backbone, params.segment, classifier, "segmenter")


def _load_weights_only(path: Path):
    """``torch.load(weights_only=True)`` allowing the numpy scalars mmcv's checkpoint meta may hold."""
    allowed = [np.dtype, np.core.multiarray.scalar, *(type(np.dtype(t)) for t in ("float64", "float32", "int64"))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_segmenter_checkpoint(model, path: str | Path) -> dict:
    """Load a whole UperNet checkpoint (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``), checking
    every name and shape against ``model``; a mismatch raises naming the keys. Returns the checkpoint meta."""
    ckpt = _load_weights_only(Path(path))
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match the segmenter (model.size={getattr(model.backbone, 'size', '?')}, "
                         f"{len(own)} tensors): missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, shapes {shapes[:10]}; "
                         "check model.size, model.overrides and data.segmentation_dataset (number of classes)")
    model.load_state_dict(state, strict=True)
    return dict(ckpt.get("meta", {}) or {}) if isinstance(ckpt, dict) else {}


# ---------------------------------------------------------------------------------------- training
def _build_model(cfg):
    from mmseg.models import build_segmentor

    from overlock.segmentation.registration import register_mmseg_backbones

    register_mmseg_backbones()
    model = build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    return model


def _train(params: Params, cfg, classifier: Path, run_uri: str, run_id: str, distributed: bool) -> dict:
    """Build, initialise, (resume,) train; rank 0 saves ``final_segmenter.pth`` and ``train.json``."""
    from mmcv.runner import get_dist_info, save_checkpoint
    from mmseg.apis import train_segmentor
    from mmseg.datasets import build_dataset

    from overlock.compat import trusted_checkpoint_dir

    work_dir = Path(cfg.work_dir)
    model = _build_model(cfg)
    info = init_backbone(model, params, classifier)
    resume = latest_checkpoint(work_dir)
    cfg.resume_from = str(resume) if resume else None
    info["resumed_from_iter"] = int(resume.stem.split("_")[-1]) if resume else 0
    if resume:
        log.info("resuming from %s", resume)
    info["processes"] = f"{get_dist_info()[1]} ({'torchrun, ' if distributed else ''}{cfg.device})"
    if run_uri:  # untracked runs (tests, notebooks) train without the MLflow hook
        cfg.custom_hooks = list(cfg.get("custom_hooks", [])) + [dict(
            type="MlflowLossHook", tracking_uri=run_uri, run_id=run_id, history_file=str(work_dir / LOSS_HISTORY),
            priority="LOW")]
    dataset = build_dataset(cfg.data.train)
    model.CLASSES, model.PALETTE = dataset.CLASSES, dataset.PALETTE
    with trusted_checkpoint_dir(work_dir):
        train_segmentor(model, [dataset], cfg, distributed=distributed, validate=params.segment.schedule != "demo",
                        timestamp=time.strftime("%Y%m%d_%H%M%S", time.gmtime()),
                        meta=dict(config=cfg.pretty_text, seed=params.seed, CLASSES=dataset.CLASSES,
                                  PALETTE=dataset.PALETTE))
    if get_dist_info()[0] == 0:
        save_checkpoint(model, str(work_dir / "final_segmenter.pth"),
                        meta=dict(CLASSES=tuple(dataset.CLASSES), iter=int(cfg.runner.max_iters)))
        info["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        write_json_atomic(work_dir / "train.json", info)
    return info


def _launch_torchrun(params: Params, params_file: Path, run: StageRun, data: Path, classifier: Path,
                     work_dir: Path) -> None:
    launch_torchrun("segment", params.segment.nproc_per_node, "overlock.segmentation.stage",
                    ["--params-json", str(params_file), "--data", str(data), "--classifier", str(classifier),
                     "--work-dir", str(work_dir), "--run-uri", run.uri, "--run-id", run.run_id])


# ---------------------------------------------------------------------------------------- evaluation
def _image_rgb(filename: str) -> np.ndarray:
    from PIL import Image

    with Image.open(filename) as im:
        return np.asarray(im.convert("RGB"))


def _reduced_labels(dataset, gt: np.ndarray) -> np.ndarray:
    """The training labels of a ground-truth map: mmseg's ``get_gt_seg_map_by_idx`` returns the raw png
    values; ``reduce_zero_label`` maps 0 (unlabelled) to 255 and k to k - 1, as training and mmseg's metrics do."""
    gt = gt.astype(np.int64)
    if getattr(dataset, "reduce_zero_label", False):
        gt[gt == 0] = 256
        gt = gt - 1
        gt[gt == 254] = 255
    return gt


def _pass(model, dataset_cfg, device, on_image) -> int:
    """Run ``model`` over a test-mode dataset; ``on_image(index, logits [K, H, W], gt, meta)`` per image."""
    from mmseg.datasets import build_dataloader, build_dataset

    dataset = build_dataset(dataset_cfg)
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=0, dist=False, shuffle=False,
                              persistent_workers=False)
    from tqdm import tqdm

    for i, batch in enumerate(tqdm(loader, desc="segment eval", disable=None, leave=False)):
        img = batch["img"][0].to(device)
        meta = batch["img_metas"][0].data[0]
        with torch.no_grad():
            logits = model.whole_inference(img, meta, rescale=True)[0]
        on_image(i, logits, _reduced_labels(dataset, dataset.get_gt_seg_map_by_idx(i)), meta[0])
    return len(dataset)


def evaluate_segmenter(model, cfg, params: Params, classes: list[str], device) -> dict:
    """mIoU/mAcc/aAcc and per-class IoU on val, pixel-wise temperature scaling fitted on the calibration
    split (ECE/NLL before/after on val) and a few predicted masks beside the ground truth."""
    from overlock.segmentation.metrics import ConfusionMatrix, PixelSampler, calibrate_pixels

    sg = params.segment
    model = model.to(device).eval()
    num = int(cfg.model.decode_head.num_classes)
    confusion = ConfusionMatrix(num)
    datasets = {"val": cfg.data.val, "calibration": cfg.calibration_data}
    lengths = {k: len(Path(d["split"]).read_text().split()) for k, d in datasets.items()}
    samplers = {k: PixelSampler(sg.calibration_pixels, n, seed=params.seed + j)
                for j, (k, n) in enumerate(lengths.items())}
    samples: list[dict] = []

    def on_val(i, logits, gt, meta):
        pred = logits.argmax(0).cpu().numpy()
        confusion.update(pred, gt)
        samplers["val"].add(logits, gt)
        if len(samples) < sg.figure_images:
            samples.append({"name": Path(meta["filename"]).stem, "image": _image_rgb(meta["filename"]),
                            "gt": gt, "pred": pred})

    _pass(model, datasets["val"], device, on_val)
    _pass(model, datasets["calibration"], device, lambda i, logits, gt, meta: samplers["calibration"].add(logits, gt))
    calibration = calibrate_pixels(samplers["calibration"], samplers["val"], params.calibrate.bins,
                                   params.calibrate.max_iter)
    per_class = confusion.per_class()
    return {"metrics": confusion.summary(), "per_class": per_class, "calibration": calibration,
            "samples": samples, "classes": classes[:num]}


# ---------------------------------------------------------------------------------------- outputs
def _clean_config(cfg):
    from mmcv import Config

    raw = cfg._cfg_dict.to_dict()
    raw["custom_hooks"] = [h for h in raw.get("custom_hooks", []) if h.get("type") != "MlflowLossHook"]
    raw["resume_from"] = None
    return Config(raw)


def _flat_metrics(result: dict) -> dict:
    cal = result["calibration"]
    out = {k: float(result["metrics"][k]) for k in SEG_METRICS}
    out.update(temperature=cal["temperature"], ece_before=cal["before"]["ece"], ece_after=cal["after"]["ece"],
               nll_before=cal["before"]["nll"], nll_after=cal["after"]["nll"])
    return out


def _publish(ctx: "StageContext", cfg, work_dir: Path, model_file: Path, info: dict, result: dict) -> dict:
    from overlock.calibration.plots import reliability_diagram
    from overlock.segmentation import figures

    params, run = ctx.params, ctx.run
    flat = _flat_metrics(result)
    flat.update({k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    classes, per_class, cal = result["classes"], result["per_class"], result["calibration"]
    rows = [{"class": c, "iou": None if not np.isfinite(per_class["iou"][i]) else float(per_class["iou"][i]),
             "acc": None if not np.isfinite(per_class["acc"][i]) else float(per_class["acc"][i]),
             "pixels": int(per_class["pixels"][i])} for i, c in enumerate(classes)]
    with ctx.publish() as staging:
        shutil.copy2(model_file, staging / "segmenter.pth")
        _clean_config(cfg).dump(str(staging / "config.py"))
        write_json_atomic(staging / "metrics.json", {**flat, "status": "trained" if params.segment.mode == "train"
                                                     else "evaluated", "info": info})
        write_json_atomic(staging / "per_class_iou.json", rows)
        write_json_atomic(staging / "temperature.json", {"temperature": cal["temperature"], "before": cal["before"],
                                                          "after": cal["after"], "pixels": cal["pixels"],
                                                          "fitted_on": "calibration"})
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["pixels"])
        figures.per_class_iou_chart([classes[i] for i in order], [per_class["iou"][i] for i in order],
                                    staging / "per_class_iou.png")
        figures.mask_panels(result["samples"], classes, staging / "masks.png")
        reliability_diagram(cal["bins"], staging / "reliability.png", bins=params.calibrate.bins,
                            metrics={"before": cal["before"], "after": cal["after"]},
                            title=f"segment: pixel reliability on val (T = {cal['temperature']:.3f})")

    history = read_loss_history(work_dir / LOSS_HISTORY)
    ctx.write_plot([{"iter": r["iter"], "loss": f"{r['loss']:.6g}"} for r in history if "loss" in r],
                   ["iter", "loss"])
    png = figures.loss_curve(history, ctx["plots"] / "loss.png")
    write_metrics_file(ctx["metrics"], flat)
    if run is not None:
        run.log_summary(flat)
        run.set_tags({f"segment.{k}": v for k, v in info.items() if not isinstance(v, (int, float))})
        run.log_artifact(png, "plots")
        # logged, not registered: the registry holds models MLflow can load and serve (overlock.serving), and
        # the segmenter has no pyfunc flavor yet
        run.log_artifacts(ctx["out"], "segmenter")
    return flat


def skip_reason(params: Params) -> str | None:
    """Why the stage has nothing to do (no segmentation dataset, or an architecture without a segmentation
    backbone: the dynamic-convolution baselines), or None."""
    if params.data.segmentation_dataset == "none":
        return "data.segmentation_dataset is none"
    if params.model.arch != "overlock":
        return f"model.arch={params.model.arch} has no segmentation backbone (the segment stage is OverLoCK's)"
    return None


def _skip(ctx: "StageContext", reason: str) -> dict:
    """Outputs that say the stage did nothing, and why (never a model or metrics that look like results)."""
    with ctx.publish() as staging:
        write_json_atomic(staging / "metrics.json", {"status": "skipped", "reason": reason})
    ctx.write_plot([], ["iter", "loss"])
    write_metrics_file(ctx["metrics"], {"status": "skipped", "reason": reason})
    if ctx.run is not None:
        ctx.run.set_tags({"segment.status": "skipped"})
    log.warning("segment: skipped (%s)", reason)
    return {"status": "skipped"}


# ---------------------------------------------------------------------------------------- entry points
def run_segment(ctx: "StageContext") -> dict:
    """The segment stage (see the module docstring); returns the metrics written to ``metrics``."""
    from mmcv.runner import load_checkpoint

    from overlock.compat import trusted_checkpoint_dir

    params, run, data, classifier = ctx.params, ctx.run, ctx["data"], ctx["classifier"]
    sg = params.segment
    reason = skip_reason(params)
    if reason:
        return _skip(ctx, reason)
    splits = check_inputs(params, data, classifier)
    classes = _classes(params, data)
    work_dir = ctx.state_dir
    device = ctx.device.type
    world = (sg.nproc_per_node or torch.cuda.device_count()) if sg.launcher == "pytorch" else 1
    cfg = build_segmentation_config(params, splits, classes, work_dir, device=device, world_size=max(world, 1))
    if run is not None:
        run.log_params({"segment.config_file": Path(cfg.filename).name, "segment.work_dir": str(work_dir)})
        run.log_text(_clean_config(cfg).pretty_text, "config.py")

    if sg.mode == "evaluate":
        model = _build_model(cfg)
        meta = load_segmenter_checkpoint(model, sg.checkpoint)
        info = {"init": "checkpoint", "init_source": sg.checkpoint,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "checkpoint_meta_keys": ",".join(sorted(map(str, meta)))}
        model_file = work_dir / "final_segmenter.pth"
        from mmcv.runner import save_checkpoint
        save_checkpoint(model, str(model_file), meta=dict(CLASSES=tuple(classes), source=sg.checkpoint))
    else:
        (work_dir / "train.json").unlink(missing_ok=True)
        if sg.launcher == "pytorch":
            params_file = work_dir / "params.json"
            write_json_atomic(params_file, params.model_dump(mode="json"))
            _launch_torchrun(params, params_file, run, data, classifier, work_dir)
        else:
            _train(params, cfg, classifier, run.uri if run else "", run.run_id if run else "", distributed=False)
        info = read_json(work_dir / "train.json")
        if info is None:
            raise RuntimeError(f"training finished without writing {work_dir / 'train.json'}")
        model_file = work_dir / "final_segmenter.pth"
        model = _build_model(cfg)
        with trusted_checkpoint_dir(work_dir):
            load_checkpoint(model, str(model_file), map_location="cpu", strict=True)
    result = evaluate_segmenter(model, cfg, params, classes, ctx.device)
    log.info("segment: mIoU %.4f, mAcc %.4f, aAcc %.4f; pixel ECE %.4f -> %.4f (T = %.3f)",
             result["metrics"]["mIoU"], result["metrics"]["mAcc"], result["metrics"]["aAcc"],
             result["calibration"]["before"]["ece"], result["calibration"]["after"]["ece"],
             result["calibration"]["temperature"])
    return _publish(ctx, cfg, work_dir, model_file, info, result)


def _classes(params: Params, data: Path) -> list[str]:
    if params.data.segmentation_dataset == "ade20k":
        from mmseg.datasets import ADE20KDataset

        return list(ADE20KDataset.CLASSES)
    classes = segmentation_classes(data)
    if not classes:
        raise ValueError(f"{data}/segmentation/classes.json lists no classes: re-run the extract stage")
    return classes


def _worker(argv: list[str]) -> int:
    """torchrun worker: train on this rank's GPU (or CPU, gloo); rank 0 logs to MLflow."""
    from overlock.compute import start_torchrun_worker

    args, params, device = start_torchrun_worker("overlock.segmentation.stage", argv)
    data = Path(args.data)
    cfg = build_segmentation_config(params, segmentation_split_files(data), _classes(params, data),
                                    Path(args.work_dir), device=device,
                                    world_size=torch.distributed.get_world_size())
    attach_run(args.run_uri, args.run_id)
    _train(params, cfg, Path(args.classifier), args.run_uri, args.run_id, distributed=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: python -m overlock.segmentation.stage worker --params-json ... (started by the segment "
             "stage with segment.launcher=pytorch; run the stage with `python -m stages.segment`)")
