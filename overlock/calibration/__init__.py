"""Calibration: temperature scaling of the classifier and score calibration of the detector."""

from overlock.calibration.metrics import (
    adaptive_ece,
    binary_calibration,
    classification_calibration,
    reliability_bins,
)
from overlock.calibration.temperature import (
    EvaluationSplitError,
    apply_temperature,
    fit_temperature,
    load_temperature,
    save_temperature,
)

__all__ = [
    "EvaluationSplitError",
    "adaptive_ece",
    "apply_temperature",
    "binary_calibration",
    "classification_calibration",
    "fit_temperature",
    "load_temperature",
    "reliability_bins",
    "save_temperature",
]
