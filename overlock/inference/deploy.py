"""The classifier's deploy form: the trained weights (final or best, raw or EMA) re-parameterized for inference
(one large kernel per dilated block, no auxiliary head), with its preprocessing and class names.

One loader for everything that serves the classifier: ``overlock predict``, the registered MLflow model
(``overlock.serving``) and the ONNX export (``overlock.onnx_export``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["DeployClassifier", "load_deploy_classifier", "resolved_data_config", "read_temperature"]


@dataclass
class DeployClassifier:
    """A pipeline classifier in its deploy form, with what a consumer needs to preprocess and calibrate."""

    model: nn.Module
    data_config: dict  # timm: input_size, crop_pct, interpolation, mean, std
    class_names: list[str]
    timm_name: str
    model_kwargs: dict
    checkpoint: Path
    weights: str  # "state_dict" or "state_dict_ema"


def _checkpoint_paths(checkpoint: Path) -> tuple[Path, Path | None]:
    """(classifier directory with model.json, checkpoint file or None for the directory's default)."""
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} does not exist: pass the pretrain output directory (models/classifier) "
            "or one of its .pth files (run `dvc repro pretrain` first)")
    if checkpoint.is_dir():
        return checkpoint, None
    return checkpoint.parent, checkpoint


def load_deploy_classifier(checkpoint: str | os.PathLike, *, ema: bool = False,
                           reparameterize: bool = True) -> DeployClassifier:
    """The pipeline classifier at ``checkpoint`` (a pretrain output directory: ``final.pth``, else
    ``best.pth``; or one of those files, with ``model.json`` beside it) in eval mode, re-parameterized without
    its auxiliary head (``reparameterize=False``: as trained). Raises ``FileNotFoundError``/``ValueError``
    naming the problem for anything else."""
    from overlock.inference.classifier import load_classifier, read_checkpoint, read_classifier_info

    directory, file = _checkpoint_paths(Path(checkpoint))
    if not (directory / "model.json").exists():
        raise ValueError(
            f"{checkpoint} is not a pipeline classifier: no model.json in {directory} (the pretrain stage "
            "writes model.json beside final.pth/best.pth; detector or official checkpoints cannot be "
            "exported here)")
    info = read_classifier_info(directory)
    try:
        if file is None:
            payload, file = read_checkpoint(directory)
        else:
            payload = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle/zip errors of a file that is not a torch checkpoint
        raise ValueError(f"{file or directory} is not a readable PyTorch checkpoint: {err}") from None
    key = "state_dict_ema" if ema else "state_dict"
    if not isinstance(payload, dict) or not payload.get(key):
        raise ValueError(f"{file} has no {key!r}: it is not a pretrain-stage classifier checkpoint"
                         + (" (or was trained without EMA: drop --ema)" if ema else ""))
    try:
        model = load_classifier(directory, ema=ema, checkpoint=payload)  # built from model.json, eval mode
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{file} does not match the classifier described by {directory / 'model.json'} "
                         f"({info.timm_name}): {err}") from None
    if reparameterize and hasattr(model, "reparameterize"):
        model.reparameterize(remove_aux_head=True)
    return DeployClassifier(model=model, data_config=resolved_data_config(info, model),
                            class_names=info.class_names, timm_name=info.timm_name,
                            model_kwargs=info.model_kwargs, checkpoint=Path(file), weights=key)


def resolved_data_config(info, model: nn.Module) -> dict:
    """timm's evaluation preprocessing of ``info`` (model.json) completed from the model's defaults, as
    plain JSON values: input_size, crop_pct, interpolation, mean, std."""
    from timm.data import resolve_data_config

    config = resolve_data_config(dict(info.data_config), model=model)
    return {"input_size": [int(v) for v in config["input_size"]], "crop_pct": float(config["crop_pct"]),
            "interpolation": str(config["interpolation"]), "mean": [float(v) for v in config["mean"]],
            "std": [float(v) for v in config["std"]]}


def read_temperature(calibration: str | os.PathLike) -> float:
    """The fitted temperature of a calibrate output directory or its ``temperature.json`` (must exist)."""
    from overlock.inference.calibrated import TEMPERATURE_FILE, load_temperature

    path = Path(calibration)
    directory = path.parent if path.name == TEMPERATURE_FILE else path
    temperature = load_temperature(directory)
    if temperature is None:
        raise FileNotFoundError(f"no {TEMPERATURE_FILE} at {path}: run `dvc repro calibrate` or drop "
                                "--calibration")
    return temperature


