"""Temperature scaling (Guo et al., 2017): one scalar ``T`` dividing the logits, fitted by minimising NLL.

``T`` is fitted on the held-out calibration split only; ``fit_temperature`` refuses logits tagged with an
evaluation split. The result is saved as ``temperature.json`` beside the calibration outputs and read back
by ``evaluate`` and ``overlock predict`` (``overlock.inference.calibrated.load_temperature``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from overlock.inference.calibrated import TEMPERATURE_FILE
from overlock.state import write_json_atomic

FIT_SPLITS = ("calibration",)
EVALUATION_SPLITS = ("val", "validation", "test", "eval", "evaluation")


class EvaluationSplitError(ValueError):
    """Calibration was asked to fit on the split its metrics are reported on."""


def check_fit_split(split: str) -> None:
    """Raise unless ``split`` is the held-out calibration split (the error says why)."""
    if split in EVALUATION_SPLITS:
        raise EvaluationSplitError(
            f"refusing to fit calibration on the evaluation split {split!r}: a temperature fitted on the data "
            "it is then evaluated on makes the reported calibration (ECE, NLL) optimistic and leaks the "
            "evaluation labels into the model. Fit on the held-out 'calibration' split (created by the data "
            "stage, data.calibration_per_class images per class, never trained on)."
        )
    if split not in FIT_SPLITS:
        raise ValueError(f"unknown calibration split {split!r}; fit on one of: {', '.join(FIT_SPLITS)}")


def minimise_over_temperature(loss_at: Callable[[torch.Tensor], torch.Tensor], max_iter: int = 200) -> float:
    """The ``T > 0`` minimising ``loss_at(T)``: L-BFGS (strong-Wolfe line search, float64) on ``log T`` from T = 1.

    lr=1 lets the line search take full steps (a few loss evaluations; see benchmarks/RESULTS.md).
    """
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_at(log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, split: str, max_iter: int = 200) -> float:
    """Fit ``T > 0`` minimising ``NLL(logits / T, labels)`` with L-BFGS on ``log T``; return ``T``.

    ``split`` names where the logits come from and must be the held-out ``"calibration"`` split;
    evaluation splits (``"val"``, ``"test"``) raise :class:`EvaluationSplitError`.
    """
    check_fit_split(split)
    logits = logits.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(
            f"expected non-empty logits [N, C] and labels [N], got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}"
        )
    if not torch.isfinite(logits).all():
        raise ValueError(
            "logits contain NaN/inf: the classifier checkpoint is broken (retrain: dvc repro pretrain)"
        )
    temperature = minimise_over_temperature(lambda t: F.cross_entropy(logits / t, labels), max_iter)
    if not math.isfinite(temperature) or temperature <= 0:
        raise RuntimeError(f"temperature fit diverged (T={temperature}); check the calibration split labels")
    return temperature


def save_temperature(out_dir: Path, temperature: float, before: dict, after: dict, **extra) -> Path:
    """Write ``temperature.json`` ({"temperature", "before", "after", ...}) atomically; return its path."""
    path = Path(out_dir) / TEMPERATURE_FILE
    write_json_atomic(path, {"temperature": float(temperature), "before": before, "after": after, **extra})
    return path
