"""The ``calibrate`` stage: temperature scaling of the classifier, score calibration of the detector.

Outputs (written to a staging directory, then moved into place): ``<out>/temperature.json``,
``<out>/detector_calibration.json``, reliability diagrams (PNG); ``<metrics>`` (DVC metrics JSON) and
``<plots>/reliability.csv`` (confidence, accuracy, count, when — validation split, before/after). With
``tracking.register_models`` it registers the classifier and the detector, with the calibration just fitted,
as MLflow pyfunc models that serve (``overlock.serving``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from overlock.calibration.detection import DETECTOR_CALIBRATION_FILE, calibrate_detector
from overlock.calibration.temperature import fit_temperature, save_temperature
from overlock.inference.calibrated import apply_temperature
from overlock.inference.detector import detector_skip_reason
from overlock.metrics.calibration import classification_calibration, reliability_bins, top1_confidence
from overlock.params import Params
from overlock.serving.package import register_served_models
from overlock.state import write_json_atomic
from overlock.tracking import write_metrics_file

if TYPE_CHECKING:  # the kernel is above this package: only its type is named here
    from overlock.pipeline.context import StageContext

log = logging.getLogger(__name__)

RELIABILITY_CSV = "reliability.csv"


def calibrate_classifier(params: Params, data: Path, classifier: Path, device) -> dict:
    """Fit T on the calibration split; metrics before/after on the calibration and validation splits."""
    from overlock.inference.classifier import (
        classification_split,
        collect_logits,
        eval_transform,
        load_classifier,
        read_classifier_info,
    )

    info = read_classifier_info(classifier)
    model = load_classifier(classifier, device=device)
    transform = eval_transform(model, info)
    split = params.calibrate.split
    logits = {}
    for name in (split, "val"):
        dataset = classification_split(data, name, transform)
        if len(dataset) == 0:
            raise ValueError(
                f"the {name!r} split of {data} is empty; the data stage must hold out "
                "data.calibration_per_class images per class (run `dvc repro extract`)"
            )
        logits[name] = collect_logits(
            model, dataset, device=device, precision=params.compute.precision, desc=f"logits {name}"
        )
    temperature = fit_temperature(*logits[split], split=split, max_iter=params.calibrate.max_iter)
    bins = params.calibrate.bins
    result = {"temperature": temperature, "before": {}, "after": {}, "reliability": {}}
    for name, (z, y) in logits.items():
        for when, zz in (("before", z), ("after", apply_temperature(z, temperature))):
            result[when][name] = classification_calibration(zz, y, bins)
            result["reliability"][f"{name}/{when}"] = reliability_bins(*top1_confidence(zz, y), bins)
    return result


def _flat_metrics(result: dict, detector: dict) -> dict:
    flat = {"temperature": result["temperature"]}
    for when in ("before", "after"):
        for split, metrics in result[when].items():
            flat.update({f"{split}.{k}_{when}": v for k, v in metrics.items()})
    if detector.get("status") == "fitted":
        for split in ("calibration", "val"):
            for when in ("before", "after"):
                flat.update({f"detector.{split}.{k}_{when}": v for k, v in detector[split][when].items()})
        if detector["calibrator"]["method"] == "temperature":
            flat["detector.temperature"] = detector["calibrator"]["temperature"]
    return flat


def run_calibrate(ctx: "StageContext") -> dict:
    """Calibrate the classifier (and the detector when there is one); write outs, metrics, plots, MLflow."""
    params, run, data, device = ctx.params, ctx.run, ctx["data"], ctx.device
    result = calibrate_classifier(params, data, ctx["classifier"], device)
    detector_result = calibrate_detector(params, ctx["detector"], data, device)
    with ctx.publish() as staging:
        _write_outputs(params, result, detector_result, staging)

    rows = [{**r, "when": when} for when in ("before", "after") for r in result["reliability"][f"val/{when}"]]
    ctx.write_plot(rows, ["confidence", "accuracy", "count", "when"])
    flat = _flat_metrics(result, detector_result)
    write_metrics_file(ctx["metrics"], {**flat, "detector.status": detector_result["status"]})

    run.log_summary(flat)
    run.set_tags(
        {
            "calibrate.detector": detector_result["status"],
            **(
                {"calibrate.detector_skip_reason": detector_result["reason"]}
                if detector_result.get("reason")
                else {}
            ),
        }
    )
    for path in sorted(ctx["out"].iterdir()):
        run.log_artifact(path, "calibration")
    run.log_artifact(ctx["plots"] / RELIABILITY_CSV, "plots")
    if params.tracking.register_models:
        register_served_models(run, ctx["classifier"], ctx["detector"], ctx["out"],
                               detector_ready=detector_skip_reason(params, ctx["detector"], data) is None)
    log.info(
        "temperature %.3f; val ECE %.4f -> %.4f, NLL %.4f -> %.4f",
        result["temperature"],
        result["before"]["val"]["ece"],
        result["after"]["val"]["ece"],
        result["before"]["val"]["nll"],
        result["after"]["val"]["nll"],
    )
    return {"temperature": result["temperature"], "metrics": flat, "detector": detector_result}


def _write_outputs(params: Params, result: dict, detector_result: dict, staging: Path) -> None:
    """temperature.json, detector_calibration.json and the reliability diagrams, into ``staging``."""
    from overlock.calibration.plots import reliability_diagram

    split, bins = params.calibrate.split, params.calibrate.bins
    save_temperature(
        staging,
        result["temperature"],
        result["before"],
        result["after"],
        fit_split=split,
        bins=bins,
        reliability=result["reliability"],
    )
    write_json_atomic(staging / DETECTOR_CALIBRATION_FILE, detector_result)
    pngs = []
    for name in (split, "val"):
        panels = {
            "before (T=1)": result["reliability"][f"{name}/before"],
            f"after (T={result['temperature']:.2f})": result["reliability"][f"{name}/after"],
        }
        shown = dict(zip(panels, (result["before"][name], result["after"][name])))
        pngs.append(
            reliability_diagram(
                panels,
                staging / f"reliability_{name}.png",
                bins,
                shown,
                title=f"Classifier reliability on the {name} split",
            )
        )
    if detector_result.get("status") == "fitted":
        panels = {
            "before": detector_result["val"]["reliability_before"],
            f"after ({detector_result['calibrator']['method']})": detector_result["val"]["reliability_after"],
        }
        shown = dict(zip(panels, (detector_result["val"]["before"], detector_result["val"]["after"])))
        pngs.append(
            reliability_diagram(
                panels,
                staging / "reliability_detector_val.png",
                bins,
                shown,
                title="Detector score reliability (val, IoU-matched)",
                xlabel="box score (probability that the detection is correct)",
            )
        )
    else:
        log.warning("detector calibration skipped: %s", detector_result.get("reason"))
