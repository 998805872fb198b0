"""Predicting with the trained classifier as a user does: images in, calibrated class probabilities out.

:class:`ClassifierPredictor` holds the deploy form (``overlock.inference.deploy``), its preprocessing and the
fitted temperature, and runs batches of PIL images. ``overlock predict`` and the served MLflow model
(``overlock.serving``) both use it, so they preprocess, run and calibrate the same way (DESIGN.md 11).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from overlock.inference.classifier import logits_of
from overlock.inference.deploy import DeployClassifier, load_deploy_classifier, read_temperature

__all__ = ["ClassifierPredictor", "TopK"]


@dataclass
class TopK:
    """The ``k`` most probable classes of one image (indices, names, calibrated probabilities)."""

    class_ids: list[int]
    classes: list[str]
    probabilities: list[float]


class ClassifierPredictor:
    """The deploy-form classifier with its preprocessing and temperature (None: uncalibrated)."""

    def __init__(self, deploy: DeployClassifier, temperature: float | None, device: str | torch.device = "cpu"):
        from timm.data import create_transform

        self.deploy, self.temperature, self.device = deploy, temperature, torch.device(device)
        self.model = deploy.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.transform = create_transform(**deploy.data_config, is_training=False)
        self.class_names = deploy.class_names

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, calibration: str | os.PathLike | None = None, *,
             ema: bool = False, device: str | torch.device = "cpu", deploy: bool = True) -> "ClassifierPredictor":
        """From a pretrain output (directory or .pth with model.json beside it) and a calibrate output
        (directory or temperature.json; None for uncalibrated probabilities). ``deploy=False``: the model
        as trained instead of its re-parameterized deploy form (same outputs, slower)."""
        classifier = load_deploy_classifier(Path(checkpoint), ema=ema, reparameterize=deploy)
        temperature = read_temperature(calibration) if calibration is not None else None
        return cls(classifier, temperature, device)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """[N, 3, H, W] float32 of RGB PIL images (timm's evaluation transform of the model)."""
        return torch.stack([self.transform(img) for img in images])

    @torch.inference_mode()
    def logits(self, images: Sequence) -> torch.Tensor:
        """Uncalibrated logits [N, classes] (float32, CPU) of RGB PIL images."""
        x = self.preprocess(images).to(self.device).contiguous(memory_format=torch.channels_last)
        return logits_of(self.model(x)).float().cpu()

    def probabilities(self, images: Sequence) -> torch.Tensor:
        """``softmax(logits / T)`` [N, classes]: calibrated when a temperature was fitted."""
        return (self.logits(images) / (self.temperature or 1.0)).softmax(1)

    def top_k(self, probabilities: torch.Tensor, k: int = 5) -> list[TopK]:
        """The ``k`` most probable classes of each row of ``probabilities``."""
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [TopK(class_ids=idx, classes=[self.class_names[i] for i in idx], probabilities=vals)
                for vals, idx in zip(values.tolist(), indices.tolist())]
