"""The trained classifier: load it from the pretrain output (``models/classifier``) and run it over a split.

The model is rebuilt from ``model.json`` through the registry and timm, the weights (raw or EMA) come from
``final.pth``; prediction uses the model's own crop_pct/interpolation/mean/std (``timm.data``). Shared by the
calibrate and evaluate stages and ``overlock predict``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "ClassifierInfo", "read_classifier_info", "build_classifier", "read_checkpoint",
           "load_classifier", "eval_transform", "classification_split", "logits_of", "collect_logits"]

CHECKPOINTS = ("final.pth", "best.pth")


@dataclass
class ClassifierInfo:
    """``model.json`` of the pretrain output (architecture, classes and the evaluation preprocessing)."""

    arch: str
    size: str
    timm_name: str
    model_kwargs: dict
    num_classes: int
    classes: list[dict]
    data_config: dict

    @property
    def class_names(self) -> list[str]:
        return [str(c.get("name") or c.get("id")) for c in self.classes]


def read_classifier_info(classifier_dir: Path) -> ClassifierInfo:
    """Parse ``<classifier_dir>/model.json``; a clear error when the pretrain output is missing."""
    path = Path(classifier_dir) / "model.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the pretrain stage has not produced a classifier "
            "(run `dvc repro pretrain`, or pass --classifier DIR)"
        )
    info = json.loads(path.read_text())
    classes = [c if isinstance(c, dict) else {"id": str(c), "name": str(c)} for c in info.get("classes", [])]
    keys = ("input_size", "crop_pct", "interpolation", "mean", "std")
    data_config = {k: info[k] for k in keys if info.get(k) is not None}
    if isinstance(data_config.get("input_size"), int):
        data_config["input_size"] = (3, data_config["input_size"], data_config["input_size"])
    return ClassifierInfo(
        arch=info.get("arch", "overlock"),
        size=info.get("size", "xt"),
        timm_name=info["timm_name"],
        model_kwargs=dict(info.get("model_kwargs") or {}),
        num_classes=int(info["num_classes"]),
        classes=classes,
        data_config=data_config,
    )


def build_classifier(info: ClassifierInfo) -> nn.Module:
    """An untrained model of ``info``'s architecture (registry + timm)."""
    import timm

    if not timm.is_model(info.timm_name):
        from overlock.registry import import_model_modules, resolve_model

        import_model_modules(resolve_model(info.arch, info.size))
    return timm.create_model(info.timm_name, num_classes=info.num_classes, **info.model_kwargs)


def _load_weights(model: nn.Module, checkpoint: dict, key: str) -> None:
    try:
        from overlock.models.checkpoint import load_official_checkpoint
    except ImportError:  # the model package is optional for non-OverLoCK classifiers
        load_official_checkpoint = None
    if load_official_checkpoint is not None:
        load_official_checkpoint(model, checkpoint, state_dict_key=key)
    else:
        model.load_state_dict(checkpoint[key])


def read_checkpoint(classifier_dir: Path) -> tuple[dict, Path]:
    """The first of ``final.pth``/``best.pth`` found (``weights_only=True``) and its path."""
    for name in CHECKPOINTS:
        path = Path(classifier_dir) / name
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True), path
    raise FileNotFoundError(f"no {' or '.join(CHECKPOINTS)} in {classifier_dir}: run `dvc repro pretrain`")


def load_classifier(
    classifier_dir: Path,
    *,
    ema: bool = False,
    device: torch.device | str = "cpu",
    checkpoint: dict | None = None,
) -> nn.Module | None:
    """The trained classifier in eval mode (EMA weights when ``ema``; None when the checkpoint has no EMA)."""
    info = read_classifier_info(classifier_dir)
    if checkpoint is None:
        checkpoint, _ = read_checkpoint(classifier_dir)
    key = "state_dict_ema" if ema else "state_dict"
    if not checkpoint.get(key):
        if ema:
            return None
        raise KeyError(f"checkpoint in {classifier_dir} has no {key!r}; it is not a pretrain-stage output")
    model = build_classifier(info)
    _load_weights(model, checkpoint, key)
    return model.to(device).eval()


def eval_transform(model: nn.Module, info: ClassifierInfo):
    """timm's evaluation transform at the model's input size, crop_pct and interpolation."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(dict(info.data_config), model=model)
    return create_transform(**config, is_training=False)


def classification_split(data_dir: Path, split: str, transform=None) -> Dataset:
    """The ``split`` ("train", "calibration", "val") of the classification dataset under ``data_dir``."""
    from overlock.data.datasets import ClassificationDataset, classification_root

    root = classification_root(Path(data_dir))
    if not (root / "classes.json").exists():
        raise FileNotFoundError(
            f"no classification dataset at {root} (classes.json missing): run `dvc repro extract`"
        )
    return ClassificationDataset(root, split, transform=transform)


def logits_of(output: Any) -> torch.Tensor:
    """Main logits from a model output: a tensor, a (main, aux) tuple or a {"main", "aux"} dict."""
    if isinstance(output, dict):
        return output["main"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    precision: str = "fp32",
    desc: str = "predict",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, C], labels [N]) of ``model`` over ``dataset``, on CPU."""
    from overlock.compute import autocast
    from overlock.training.loader import loader_settings, worker_cpu_count

    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        **loader_settings(worker_cpu_count(), device, persistent=False))
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False):
        with autocast(precision, device):
            out = logits_of(model(images.to(device)))
        all_logits.append(out.float().cpu())
        all_labels.append(torch.as_tensor(labels).long())
    if not all_logits:
        raise ValueError(f"{desc}: the split is empty")
    logits = torch.cat(all_logits)
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            f"{desc}: the classifier produced NaN/inf logits; its weights are broken "
            "(retrain with `dvc repro pretrain`)"
        )
    return logits, torch.cat(all_labels)
