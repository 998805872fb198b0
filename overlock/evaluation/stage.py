"""The ``evaluate`` stage: validation, calibration summary, COCO AP, complexity, ERF, Grad-CAM and the report.

Every part adds its numbers to one flat metrics dict (DVC metrics JSON and MLflow summary) and its tables
and figures to the report; figures are written into a staging copy of ``out`` that replaces ``out`` only
when the report is complete.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from overlock.compute import select_device
from overlock.evaluation import plots as figures
from overlock.evaluation.classification import confusion_matrix, per_class_accuracy, topk_accuracy
from overlock.evaluation.report import DEMO_NOTE, Report, fmt, published_results, table
from overlock.evaluation.segmentation import segmentation_section
from overlock.evaluation.segmentation import summary_row as segmentation_summary_row
from overlock.inference.calibrated import (
    DETECTOR_CALIBRATION_FILE,
    TEMPERATURE_FILE,
    apply_temperature,
    load_temperature,
)
from overlock.inference.classifier import (
    ClassifierInfo,
    classification_split,
    collect_logits,
    eval_transform,
    load_classifier,
    read_checkpoint,
    read_classifier_info,
)
from overlock.params import Params
from overlock.state import read_json
from overlock.tracking import write_metrics_file

if TYPE_CHECKING:  # the kernel is above this package: only its type is named here
    from overlock.pipeline.context import StageContext

log = logging.getLogger(__name__)

PER_CLASS_CSV = "per_class_accuracy.csv"


def _published_label(params: Params) -> str | None:
    """None when this run's dataset is the published one, else why the published column is not comparable."""
    return (
        None
        if params.data.dataset == "imagenet1k"
        else (DEMO_NOTE if params.data.dataset == "demo" else f"n/a ({params.data.dataset}, not ImageNet-1K)")
    )


def _denormalize(batch: torch.Tensor, info_cfg: dict) -> np.ndarray:
    mean = torch.tensor(info_cfg.get("mean", (0.485, 0.456, 0.406)))[:, None, None]
    std = torch.tensor(info_cfg.get("std", (0.229, 0.224, 0.225)))[:, None, None]
    return np.stack([(img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() for img in batch])


def _per_class_table(names: list[str], accuracy: list[float], counts: list[int], limit: int = 40) -> str:
    """All classes, or the ``limit`` lowest-accuracy ones when there are more (the CSV plot has all)."""
    order = list(range(len(names)))
    note = ""
    if len(names) > limit:
        order = sorted(order, key=lambda i: (np.nan_to_num(accuracy[i], nan=-1.0), names[i]))[:limit]
        note = (
            f"The {limit} classes with the lowest accuracy of {len(names)} (all of them: "
            f"`plots/evaluate/{PER_CLASS_CSV}`).\n\n"
        )
    return note + table(
        ["class", "accuracy", "images"], [[names[i], accuracy[i], int(counts[i])] for i in order]
    )


def evaluate_classifier(
    params: Params,
    info: ClassifierInfo,
    data: Path,
    classifier: Path,
    calibration: Path,
    device,
    staging: Path,
    report: Report,
) -> dict:
    """Top-1/top-5 (raw, EMA), calibrated NLL/ECE on val, per-class accuracy and the confusion matrix."""
    from overlock.metrics.calibration import classification_calibration

    checkpoint, ckpt_path = read_checkpoint(classifier)
    model = load_classifier(classifier, device=device, checkpoint=checkpoint)
    ema = load_classifier(classifier, ema=True, device=device, checkpoint=checkpoint)
    transform = eval_transform(model, info)
    val = classification_split(data, "val", transform)
    logits, labels = collect_logits(
        model, val, device=device, precision=params.compute.precision, desc="val raw"
    )
    k5 = min(5, info.num_classes)
    metrics = {
        "val.top1": topk_accuracy(logits, labels, 1),
        f"val.top{k5}": topk_accuracy(logits, labels, k5),
    }
    if ema is not None:
        ema_logits, _ = collect_logits(
            ema, val, device=device, precision=params.compute.precision, desc="val EMA"
        )
        metrics.update(
            {
                "val.top1_ema": topk_accuracy(ema_logits, labels, 1),
                f"val.top{k5}_ema": topk_accuracy(ema_logits, labels, k5),
            }
        )
    temperature = load_temperature(calibration)
    raw_cal = classification_calibration(logits, labels, params.calibrate.bins)
    metrics.update({"val.nll": raw_cal["nll"], "val.ece": raw_cal["ece"]})
    if temperature is not None:
        scaled = classification_calibration(
            apply_temperature(logits, temperature), labels, params.calibrate.bins
        )
        metrics.update(
            {
                "val.nll_calibrated": scaled["nll"],
                "val.ece_calibrated": scaled["ece"],
                "temperature": temperature,
            }
        )
    confusion = confusion_matrix(logits, labels)
    accuracy = per_class_accuracy(confusion)
    names = info.class_names

    data_cfg = info.data_config
    published = _published_label(params)
    ref = published_results()["overlock_imagenet1k"].get(info.timm_name, {})
    ref_top1 = published or (fmt(ref["top1"], 1) if ref else "n/a (no published figure)")
    pct = lambda key: f"{100 * metrics[key]:.2f}" if key in metrics else "—"
    rows = [
        ["top-1 (%)", pct("val.top1"), pct("val.top1_ema"), ref_top1],
        [f"top-{k5} (%)", pct(f"val.top{k5}"), pct(f"val.top{k5}_ema"), "—"],
    ]
    report.add(
        "Classification",
        f"Validation split: {len(val)} images, {info.num_classes} classes; weights from `{ckpt_path.name}` "
        f"(epoch {checkpoint.get('epoch', '?')}). Preprocessing: input {data_cfg.get('input_size')}, "
        f"crop_pct {data_cfg.get('crop_pct')}, {data_cfg.get('interpolation')} interpolation.",
        table(["metric", "this run (raw)", "this run (EMA)", f"published ({info.timm_name})"], rows),
        _per_class_table(names, accuracy, confusion.sum(dim=1).tolist()),
    )
    report.image(
        "Classification",
        figures.per_class_bar(
            names,
            accuracy,
            staging / "per_class_accuracy.png",
            "accuracy (fraction of the class's validation images)",
            "Per-class accuracy (validation, raw weights)",
        ),
        "Per-class accuracy",
    )
    report.image(
        "Classification",
        figures.confusion_matrix_plot(confusion.numpy(), names, staging / "confusion.png"),
        "Confusion matrix (rows: true class, normalised)",
    )
    return {
        "metrics": metrics,
        "model": model,
        "val": val,
        "per_class": list(zip(names, accuracy)),
        "temperature": temperature,
    }


def calibration_section(calibration: Path, staging: Path, report: Report) -> dict:
    """Before/after table and reliability diagrams from the calibrate stage's outputs."""
    temp = read_json(Path(calibration) / TEMPERATURE_FILE)
    if temp is None:
        report.add("Calibration", f"No `{TEMPERATURE_FILE}` in {calibration}: run `dvc repro calibrate`.")
        return {}
    keys = ("ece", "mce", "adaptive_ece", "nll", "brier", "top1")
    rows = [
        [f"{split}, {when}"] + [temp[when][split][k] for k in keys]
        for split in temp["before"]
        for when in ("before", "after")
    ]
    report.add(
        "Calibration",
        f"Temperature scaling fitted on the held-out `{temp.get('fit_split', 'calibration')}` split "
        f"(never on validation): **T = {temp['temperature']:.3f}**. ECE/MCE use {temp.get('bins', 15)} "
        "equal-width bins, adaptive ECE equal-mass bins; Brier is the multiclass sum of squares.",
        table(["split, when", "ECE", "MCE", "adaptive ECE", "NLL", "Brier", "top-1"], rows),
    )
    for png in sorted(Path(calibration).glob("reliability_*.png")):
        shutil.copy2(png, staging / png.name)
        split = png.stem.removeprefix("reliability_").replace("_", " ")
        report.image("Calibration", staging / png.name, f"Reliability diagram ({split} split), before/after")
    det = read_json(Path(calibration) / DETECTOR_CALIBRATION_FILE, {})
    if det.get("status") == "fitted":
        keys = ("ece", "mce", "adaptive_ece", "nll", "brier")
        rows = [
            [f"{split}, {when}"] + [det[split][when][k] for k in keys]
            for split in ("calibration", "val")
            for when in ("before", "after")
        ]
        report.add(
            "Calibration",
            f"Detector box scores ({det['calibrator']['method']} calibrator, detections "
            f"matched at IoU ≥ {det['iou_threshold']}):",
            table(["split, when", "ECE", "MCE", "adaptive ECE", "NLL", "Brier"], rows),
        )
    elif det:
        report.add("Calibration", f"Detector score calibration skipped: {det.get('reason')}.")
    return temp


def detection_section(
    params: Params, data: Path, detector: Path, staging: Path, report: Report, device,
    calibration: Path | None = None,
) -> dict:
    """COCO bbox/segm AP (finetune metrics + our per-class AP from pycocotools) and drawn predictions.

    When the calibrate stage fitted a detector score calibrator (``<calibration>/detector_calibration.json``),
    the drawn predictions carry calibrated scores (probability that the box is a correct detection); AP is
    computed from the raw scores (a monotone calibrator leaves every AP unchanged).
    """
    from overlock.evaluation.detection import coco_evaluate, draw_gt_vs_pred, read_finetune_metrics
    from overlock.inference.detector import detector_skip_reason, load_predictions

    reason = detector_skip_reason(params, detector, data)
    if reason:
        log.warning("detection evaluation skipped: %s", reason)
        report.add("Detection", f"Skipped: {reason}.")
        return {"detection.status": "skipped"}
    finetune = read_finetune_metrics(detector)
    coco, img_prefix, results = load_predictions(detector, data, "val")  # the finetune stage's: not run again
    metrics = {"detection.status": "evaluated"}
    per_class = {}
    for iou_type in ("bbox", "segm"):
        if results[iou_type]:
            ev = coco_evaluate(coco, results[iou_type], iou_type)
            metrics.update({f"detection.{iou_type}_{k}": v for k, v in ev["summary"].items()})
            per_class[iou_type] = ev["per_class"]
    size = params.model.size if params.model.arch == "overlock" else params.model.arch
    ref = (
        published_results()["overlock_coco_mask_rcnn"]
        .get(f"overlock_{size}", {})
        .get(params.finetune.schedule, {})
    )
    demo = params.data.detection_dataset != "coco2017"
    pub = lambda k: DEMO_NOTE if demo else fmt(ref.get(k), 1) if ref.get(k) is not None else "n/a"
    rows = [
        [
            "box AP",
            metrics.get("detection.bbox_AP"),
            finetune.get("bbox_mAP", finetune.get("bbox_AP")),
            pub("ap_box"),
        ],
        ["box AP50", metrics.get("detection.bbox_AP50"), finetune.get("bbox_mAP_50"), "—"],
        [
            "mask AP",
            metrics.get("detection.segm_AP"),
            finetune.get("segm_mAP", finetune.get("segm_AP")),
            pub("ap_mask"),
        ],
    ]
    report.add(
        "Detection",
        f"{params.finetune.detector} on {len(coco.getImgIds())} validation images.",
        table(["metric", "this run (evaluate)", "finetune metrics.json", "published (×100)"], rows),
    )
    if per_class:
        classes = sorted(per_class.get("bbox", {}))
        report.add(
            "Detection",
            "Per-class AP (IoU 0.50:0.95, all areas, from pycocotools `eval['precision']`):",
            table(
                ["class", "box AP", "mask AP"],
                [[c, per_class.get("bbox", {}).get(c), per_class.get("segm", {}).get(c)] for c in classes],
            ),
        )
        report.image(
            "Detection",
            figures.per_class_bar(
                classes,
                [per_class["bbox"][c] for c in classes],
                staging / "per_class_ap.png",
                "box AP (IoU 0.50:0.95)",
                "Per-class box AP (validation)",
            ),
            "Per-class box AP",
        )
    ids = coco.getImgIds()[: params.evaluate.detection_images]
    if ids:
        shown, caption = calibrated_detections(results, calibration)
        report.image(
            "Detection",
            draw_gt_vs_pred(coco, img_prefix, shown, ids, staging / "detections.png"),
            f"Ground truth (left) vs. predictions (right), {caption}",
        )
    return metrics


def calibrated_detections(results: dict, calibration: Path | None) -> tuple[dict, str]:
    """``results`` with box scores mapped through the fitted detector calibrator (when there is one)."""
    from overlock.inference.calibrated import ScoreCalibrator

    fitted = read_json(Path(calibration) / DETECTOR_CALIBRATION_FILE, {}) if calibration else {}
    if fitted.get("status") != "fitted":
        return results, "raw scores (no fitted detector calibrator)"
    calibrator = ScoreCalibrator.from_dict(fitted["calibrator"])
    boxes = results["bbox"]
    scores = calibrator(np.array([d["score"] for d in boxes])) if boxes else []
    shown = {**results, "bbox": [{**d, "score": float(s)} for d, s in zip(boxes, scores)]}
    return shown, f"calibrated scores ({calibrator.method} calibrator from the calibrate stage)"


def complexity_section(
    params: Params, info: ClassifierInfo, model, staging: Path, report: Report, device
) -> dict:
    """Params, fvcore FLOPs and speed of the train and re-parameterized forms."""
    from overlock.evaluation.complexity import complexity_report

    size = params.evaluate.throughput_image_size or int(info.data_config.get("input_size", (3, 224, 224))[-1])
    result = complexity_report(
        model,
        size,
        params.evaluate.throughput_batch,
        params.evaluate.throughput_iters,
        device,
        channels_last=True,
        precision=params.compute.precision,
    )
    rows, bars, metrics = [], [], {}
    for name, form in result["forms"].items():
        key = "reparam" if name != "train form" else "train"
        for layout, speed in (("channels_last", form["speed"]), ("contiguous", form.get("speed_contiguous"))):
            if speed:
                rows.append(
                    [
                        name,
                        layout,
                        f"{form['params'] / 1e6:.4f}",
                        f"{form['params_no_aux'] / 1e6:.4f}",
                        f"{form['gflops']:.4f}",
                        f"{form['gflops_with_contmix']:.4f}",
                        f"{speed['throughput']:.1f}",
                        f"{speed['latency_ms']:.2f}",
                    ]
                )
                bars.append({"form": f"{name}, {layout}", **speed})
        metrics.update(
            {
                f"complexity.{key}.params_m": form["params"] / 1e6,
                f"complexity.{key}.gflops": form["gflops"],
                f"complexity.{key}.gflops_with_contmix": form["gflops_with_contmix"],
                f"complexity.{key}.throughput": form["speed"]["throughput"],
                f"complexity.{key}.latency_ms": form["speed"]["latency_ms"],
            }
        )
    unsupported = sorted({op for f in result["forms"].values() for op in f["unsupported_ops"]})
    report.add(
        "Complexity",
        f"Input {size}×{size}; throughput at batch {params.evaluate.throughput_batch}, latency at batch 1, "
        f"median of {params.evaluate.throughput_iters} runs on {device} ({params.compute.precision}). "
        f"Re-parameterization: {result['reparameterization']}.",
        table(
            [
                "form",
                "memory layout",
                "params (M)",
                "params w/o aux head (M)",
                "GFLOPs",
                "GFLOPs incl. ContMix",
                "throughput (img/s)",
                "latency (ms)",
            ],
            rows,
        ),
        "GFLOPs are fvcore's multiply-add counts. The **GFLOPs** column does **not count** OverLoCK's "
        "ContMix aggregation (the dynamic neighbourhood weighted sum), the convention of the official "
        "figures; **GFLOPs incl. ContMix** adds it, counted as the einsum of the `gather` reference "
        "backend (B·heads·H·W·K²·C multiply-adds). Element-wise ops are never counted by fvcore; it "
        "skipped: " + (", ".join(f"`{o}`" for o in unsupported) or "none") + ".",
    )
    ref = published_results()["overlock_imagenet1k"].get(info.timm_name)
    counts = published_results()["overlock_official_param_counts"].get(info.timm_name)
    if ref:
        label = (
            "n/a (reduced demo model via model.overrides)"
            if params.model.overrides
            else f"n/a for the variant (model.head={params.model.head}, model.attention={params.model.attention})"
            if params.model.variant_kwargs()
            else (
                f"{ref['params_m']} M params, {ref['gflops']} GFLOPs at {ref['input']} px (paper); official "
                f"definitions: {counts['reparam_no_aux'] / 1e6:.3f} M re-parameterized without aux head, "
                f"{counts['train_form'] / 1e6:.3f} M in training form, fvcore {counts['fvcore_gflops_reparam']} "
                "GFLOPs re-parameterized at 224 px"
            )
        )
        report.add("Complexity", f"Published ({info.timm_name}): {label}.")
    report.image("Complexity", figures.complexity_bars(bars, staging / "speed.png"), "Throughput and latency")
    return metrics


def erf_section(params: Params, model, val, info: ClassifierInfo, staging: Path, report: Report) -> dict:
    """ERF heatmap over ``evaluate.erf_images`` validation images and its high-contribution area ratios."""
    from overlock.evaluation.erf import effective_receptive_field, erf_heatmap_values, high_contribution_ratio

    n = min(params.evaluate.erf_images, len(val))
    images = torch.stack([val[i][0] for i in range(n)]).to(next(model.parameters()).device)
    contribution = effective_receptive_field(model, images)
    ratios = {t: high_contribution_ratio(contribution, t) for t in (0.2, 0.3, 0.5, 0.99)}
    size = images.shape[-1]
    report.add(
        "Effective receptive field",
        f"Gradient of the central pixel of the last stage's feature map w.r.t. the input, summed over "
        f"{n} validation images ({size}×{size}), log-scaled. Share of the input area holding t of the "
        "total contribution (larger = wider ERF):",
        table(["t", "area ratio"], [[t, r] for t, r in ratios.items()]),
    )
    report.image(
        "Effective receptive field",
        figures.erf_heatmap(
            erf_heatmap_values(contribution),
            staging / "erf.png",
            f"Effective receptive field ({info.timm_name}, {n} images)",
            size,
        ),
        "ERF",
    )
    return {f"erf.area_ratio_{int(t * 100)}": r for t, r in ratios.items()}


def gradcam_section(
    params: Params, model, val, info: ClassifierInfo, temperature, staging: Path, report: Report
) -> None:
    """Grad-CAM of the predicted class on ``evaluate.gradcam_images`` validation images."""
    from overlock.evaluation.gradcam import gradcam_maps, last_spatial_layer, overlay

    n = min(params.evaluate.gradcam_images, len(val))
    if n == 0:
        report.add("Grad-CAM", "evaluate.gradcam_images is 0: no maps drawn.")
        return
    picks = np.linspace(0, len(val) - 1, n).astype(int)
    images = torch.stack([val[int(i)][0] for i in picks]).to(next(model.parameters()).device)
    labels = [val[int(i)][1] for i in picks]
    with torch.no_grad():
        probs = apply_temperature(model(images), temperature or 1.0).softmax(1)
    conf, pred = probs.max(1)
    maps = gradcam_maps(model, images, targets=pred.tolist())
    rgb = _denormalize(images.cpu(), info.data_config)
    names = info.class_names
    tiles, titles = [], []
    for img, cam, y, p, c in zip(rgb, maps, labels, pred.tolist(), conf.tolist()):
        tiles += [img, overlay(img, cam)]
        titles += [f"input (true: {names[y]})", f"Grad-CAM, pred: {names[p]} ({c:.2f})"]
    layer = {m: k for k, m in model.named_modules()}[last_spatial_layer(model, images)]
    report.add(
        "Grad-CAM",
        f"`pytorch_grad_cam.GradCAM` on `{layer}` (the last stage's spatial output) for the "
        "predicted class; titles show the calibrated confidence.",
    )
    report.image(
        "Grad-CAM",
        figures.image_grid(
            tiles,
            titles,
            staging / "gradcam.png",
            "Grad-CAM on validation images (predicted class; red = high)",
        ),
        "Grad-CAM: each input beside its class-activation map",
    )


def provenance_section(params: Params, report: Report) -> None:
    from overlock.tracking import git_state

    commit, dirty = git_state()
    report.add(
        "Environment and provenance",
        table(
            ["item", "value"],
            [
                ["git commit", commit + (" (dirty)" if dirty else "")],
                ["python", platform.python_version()],
                ["torch", torch.__version__],
                ["device", str(select_device(params.compute))],
                ["precision", params.compute.precision],
            ],
        ),
        "Parameters:\n\n```yaml\n" + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False) + "```",
    )


def run_evaluate(ctx: "StageContext") -> dict:
    """Evaluate the classifier (and detector) and write the report, DVC metrics/plots and MLflow entries."""
    params, run, out = ctx.params, ctx.run, ctx["out"]
    with ctx.publish() as staging:
        flat, per_class = _write_report(params, ctx["data"], ctx["classifier"], ctx["detector"],
                                        ctx["calibration"], ctx.device, staging, ctx.paths.get("segmenter"))
    ctx.write_plot([{"class": n, "accuracy": a} for n, a in per_class], ["class", "accuracy"])
    numeric = {
        k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    write_metrics_file(ctx["metrics"], {**numeric, "detection.status": flat.get("detection.status", "skipped"),
                                        "segmentation.status": flat.get("segmentation.status", "missing")})
    if run is not None:
        run.log_summary(numeric)
        run.log_artifacts(out, "report")
        run.log_artifact(ctx["plots"] / PER_CLASS_CSV, "plots")
    log.info("report written to %s", out / "report.html")
    return {"metrics": numeric, "report": out / "report.html"}


def _write_report(params: Params, data: Path, classifier: Path, detector: Path, calibration: Path, device,
                  staging: Path, segmenter: Path | None = None) -> tuple[dict, list]:
    """Every section of the report, written into ``staging``; returns the flat metrics and per-class accuracy."""
    info = read_classifier_info(classifier)
    report = Report(f"OverLoCK pipeline report: {info.timm_name} on {params.data.dataset}")
    cls = evaluate_classifier(params, info, data, classifier, calibration, device, staging, report)
    flat = dict(cls["metrics"])
    calibration_section(calibration, staging, report)
    flat.update(detection_section(params, data, detector, staging, report, device, calibration))
    flat.update(segmentation_section(segmenter, staging, report))
    flat.update(complexity_section(params, info, cls["model"], staging, report, device))
    flat.update(erf_section(params, cls["model"], cls["val"], info, staging, report))
    gradcam_section(params, cls["model"], cls["val"], info, cls["temperature"], staging, report)
    history = read_json(Path(classifier) / "history.json", [])
    curves = figures.training_curves(history, staging / "training_curves.png", "Pretraining (history.json)")
    report.image("Training curves", curves, "Pretraining loss and accuracy per epoch")
    if curves is None:
        report.add("Training curves", "No per-epoch history in history.json.")
    provenance_section(params, report)
    k5 = min(5, info.num_classes)
    summary = [
        [f"top-1 / top-{k5} (raw)", f"{100 * flat['val.top1']:.2f}% / {100 * flat[f'val.top{k5}']:.2f}%"]
    ]
    if "val.top1_ema" in flat:
        summary.append(["top-1 (EMA)", f"{100 * flat['val.top1_ema']:.2f}%"])
    if "val.ece_calibrated" in flat:
        summary.append(
            ["val ECE before → after T", f"{flat['val.ece']:.4f} → {flat['val.ece_calibrated']:.4f}"]
        )
    if flat.get("detection.status") == "evaluated":
        summary.append(
            ["box / mask AP", f"{fmt(flat.get('detection.bbox_AP'))} / {fmt(flat.get('detection.segm_AP'))}"]
        )
    if segmentation_summary_row(flat):
        summary.append(segmentation_summary_row(flat))
    summary.append(
        [
            "params / GFLOPs (train form)",
            f"{flat['complexity.train.params_m']:.3f} M / {flat['complexity.train.gflops']:.4f}",
        ]
    )
    report.add(
        "Summary",
        f"Model `{info.timm_name}` (arch `{info.arch}`, size `{info.size}`), dataset "
        f"`{params.data.dataset}`, detection dataset `{params.data.detection_dataset}`.",
        table(["result", "value"], summary),
    )
    report.write(staging)
    return flat, cls["per_class"]
