"""Calibration: temperature scaling of the classifier and score calibration of the detector."""

from overlock.calibration.temperature import EvaluationSplitError, fit_temperature, save_temperature
from overlock.inference.calibrated import apply_temperature, load_temperature
from overlock.metrics.calibration import (
    adaptive_ece,
    binary_calibration,
    classification_calibration,
    reliability_bins,
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
