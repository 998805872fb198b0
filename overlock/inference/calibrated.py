"""The fitted calibration as prediction uses it: the classifier's temperature and the detector's score map.

The calibrate stage fits them (``overlock.calibration``) and writes ``temperature.json`` and
``detector_calibration.json``; ``evaluate`` and ``overlock predict`` read and apply them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from overlock.state import read_json

__all__ = ["TEMPERATURE_FILE", "DETECTOR_CALIBRATION_FILE", "load_temperature", "apply_temperature",
           "score_logit", "ScoreCalibrator"]

TEMPERATURE_FILE = "temperature.json"
DETECTOR_CALIBRATION_FILE = "detector_calibration.json"
_EPS = 1e-6


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated logits ``logits / T``."""
    return logits / temperature


def load_temperature(calibration_dir: Path | None) -> float | None:
    """The fitted ``T`` from ``<calibration_dir>/temperature.json``, or None when there is none."""
    if calibration_dir is None:
        return None
    data = read_json(Path(calibration_dir) / TEMPERATURE_FILE)
    if data is None:
        return None
    temperature = float(data["temperature"])
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"{calibration_dir}/{TEMPERATURE_FILE} holds an invalid temperature {temperature}; "
            "re-run the calibrate stage (dvc repro calibrate)"
        )
    return temperature


def score_logit(scores: np.ndarray) -> torch.Tensor:
    """``logit(s)`` of detection scores (float64, clipped away from 0 and 1)."""
    s = torch.as_tensor(np.clip(scores, _EPS, 1 - _EPS), dtype=torch.float64)
    return torch.log(s) - torch.log1p(-s)


@dataclass
class ScoreCalibrator:
    """A fitted map from raw detection scores to calibrated probabilities of being a correct detection:
    ``temperature`` (``sigmoid(logit(s) / T)``) or ``isotonic`` (the knots of an isotonic regression).
    Fitted by ``overlock.calibration.detection.fit_score_calibrator``."""

    method: str
    temperature: float = 1.0
    knots_x: list[float] = field(default_factory=list)
    knots_y: list[float] = field(default_factory=list)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if self.method == "temperature":
            return torch.sigmoid(score_logit(scores) / self.temperature).numpy()
        return np.interp(scores, self.knots_x, self.knots_y)

    def to_dict(self) -> dict:
        out = {"method": self.method}
        if self.method == "temperature":
            out["temperature"] = self.temperature
        else:
            out.update(knots_x=self.knots_x, knots_y=self.knots_y)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ScoreCalibrator:
        return cls(
            data["method"],
            float(data.get("temperature", 1.0)),
            list(data.get("knots_x", [])),
            list(data.get("knots_y", [])),
        )
