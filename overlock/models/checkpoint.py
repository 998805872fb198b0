"""Load and save OverLoCK checkpoints in the official layout.

Official checkpoints use the same parameter names as our models, so loading is about the wrapping: the
top-level entry (``state_dict``, ``model``, ``state_dict_ema`` or a bare state dict), wrapper prefixes
(``module.`` from DDP, ``backbone.`` from an MMDetection detector) and the parts that only one kind of model
has (``head``/``aux_head`` of the classifier, ``h_proj``/``extra_norm`` of the dense backbone).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "CheckpointLoadReport",
    "extract_state_dict",
    "strip_wrapper_prefixes",
    "normalize_state_dict",
    "load_official_checkpoint",
    "save_official_checkpoint",
]

log = logging.getLogger(__name__)

# Top-level entries tried, in order, when no ``state_dict_key`` is given.
AUTO_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DETECTOR_BACKBONE_PREFIX = "backbone."
# Parts of one model kind that another kind lacks: dropped (and reported) when the target has none of them.
CLASSIFIER_ONLY_PREFIXES = ("head.", "aux_head.", "pyramid_fusion.", "cbam.")  # + the head variants
DENSE_ONLY_PREFIXES = ("h_proj.", "extra_norm.")


@dataclass
class CheckpointLoadReport:
    """What ``load_official_checkpoint`` did: the entry used and the keys it could not match."""

    source_key: str | None
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)
    reparameterized_model: bool = False

    @property
    def clean(self) -> bool:
        """True when every model key was loaded and nothing unexpected was left."""
        return not self.missing_keys and not self.unexpected_keys


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(checkpoint: Mapping, state_dict_key: str | None = None
                       ) -> tuple[dict, str | None]:
    """The state dict inside ``checkpoint`` and the top-level key it came from (None for a bare dict).

    With ``state_dict_key`` that entry must exist (e.g. ``"state_dict_ema"`` for timm's EMA weights);
    otherwise the first of ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema`` is used, or the
    checkpoint itself when it is a bare ``name -> tensor`` mapping.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping, got {type(checkpoint).__name__}")
    if state_dict_key is not None:
        if state_dict_key not in checkpoint:
            raise KeyError(f"checkpoint has no top-level entry {state_dict_key!r}; "
                           f"entries: {sorted(map(str, checkpoint))}")
        return dict(checkpoint[state_dict_key]), state_dict_key
    for key in AUTO_STATE_DICT_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key]), key
    if _is_state_dict(checkpoint):
        return dict(checkpoint), None
    raise KeyError(f"no state dict found in checkpoint; top-level entries: {sorted(map(str, checkpoint))} "
                   f"(pass state_dict_key=...)")


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Remove ``module.``/``_orig_mod.`` prefixes; keep only ``backbone.*`` of a detector checkpoint.

    Returns the new state dict and the keys dropped (a detector's neck/heads).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    dropped: list[str] = []
    if any(k.startswith(DETECTOR_BACKBONE_PREFIX) for k in out):
        dropped = [k for k in out if not k.startswith(DETECTOR_BACKBONE_PREFIX)]
        cut = len(DETECTOR_BACKBONE_PREFIX)
        out = {k[cut:]: v for k, v in out.items() if k.startswith(DETECTOR_BACKBONE_PREFIX)}
    return out, dropped


def _foreign_part_keys(state_dict: Mapping, model_keys: Iterable[str]) -> list[str]:
    """Keys of parts (classifier heads / dense-only layers) that ``model`` does not have at all."""
    model_keys = list(model_keys)
    foreign = []
    for prefix in CLASSIFIER_ONLY_PREFIXES + DENSE_ONLY_PREFIXES:
        if not any(k.startswith(prefix) for k in model_keys):
            foreign += [k for k in state_dict if k.startswith(prefix)]
    return foreign


def normalize_state_dict(checkpoint: Mapping, model: nn.Module, state_dict_key: str | None = None
                         ) -> dict:
    """``checkpoint``'s state dict for ``model``: unwrapped, prefixes stripped, foreign parts dropped."""
    state_dict, _ = extract_state_dict(checkpoint, state_dict_key)
    state_dict, _ = strip_wrapper_prefixes(state_dict)
    foreign = set(_foreign_part_keys(state_dict, model.state_dict().keys()))
    return {k: v for k, v in state_dict.items() if k not in foreign}


def _torch_load(path: str | os.PathLike) -> Mapping:
    # timm's CheckpointSaver stores the argparse Namespace of the run; allow it and nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_deploy_form(keys: Iterable[str]) -> bool:
    return any(k.endswith("lk_origin.bias") for k in keys)


def load_official_checkpoint(
        model: nn.Module,
        checkpoint: str | os.PathLike | Mapping,
        *,
        state_dict_key: str | None = None,
        strict: bool = True,
        exclude: Iterable[str] = (),
) -> CheckpointLoadReport:
    """Load an official-format OverLoCK checkpoint (file path or loaded dict) into ``model``.

    - ``state_dict_key`` picks the top-level entry (``"state_dict"``, ``"model"``, ``"state_dict_ema"``);
      by default the first present, or a bare state dict.
    - ``module.`` / ``backbone.`` prefixes are stripped; a detector's non-backbone keys are dropped.
    - Keys of parts the model lacks (classifier ``head``/``aux_head`` for the dense backbone,
      ``h_proj``/``extra_norm`` for the classifier) and keys under an ``exclude`` prefix (e.g. ``"head.4."``
      when fine-tuning with another number of classes) are dropped and reported.
    - A re-parameterized (deploy-form) checkpoint re-parameterizes a train-form model first.
    - A shape mismatch raises ``ValueError`` naming each key; with ``strict`` missing or unexpected keys
      raise ``RuntimeError``, otherwise they are logged and returned in the report.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _torch_load(checkpoint)
    state_dict, source_key = extract_state_dict(checkpoint, state_dict_key)
    state_dict, dropped = strip_wrapper_prefixes(state_dict)

    target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    report = CheckpointLoadReport(source_key=source_key)
    if _is_deploy_form(state_dict) and not _is_deploy_form(target.state_dict()):
        from .overlock import reparameterize  # local: overlock.py imports this module

        reparameterize(target)
        report.reparameterized_model = _is_deploy_form(target.state_dict())
        if report.reparameterized_model:
            log.info("checkpoint is re-parameterized (deploy form): re-parameterized the model to match")

    model_state = target.state_dict()
    exclude = tuple(exclude)
    foreign = set(_foreign_part_keys(state_dict, model_state.keys()))
    dropped += [k for k in state_dict if k in foreign or (exclude and k.startswith(exclude))]
    state_dict = {k: v for k, v in state_dict.items() if k not in set(dropped)}

    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        raise ValueError("shape mismatch between checkpoint and model for key(s):\n  "
                         + "\n  ".join(mismatched))

    result = target.load_state_dict(state_dict, strict=False)
    report.missing_keys = list(result.missing_keys)
    report.unexpected_keys = list(result.unexpected_keys)
    report.dropped_keys = dropped
    report.loaded_keys = [k for k in state_dict if k in model_state]

    where = f"entry {source_key!r}" if source_key else "bare state dict"
    log.info("loaded %d/%d tensors from %s", len(report.loaded_keys), len(model_state), where)
    if dropped:
        log.info("dropped %d checkpoint keys not used by %s: %s", len(dropped), type(target).__name__,
                 _summarize(dropped))
    if report.missing_keys:
        log.warning("missing keys (left at their initial values): %s", ", ".join(report.missing_keys))
    if report.unexpected_keys:
        log.warning("unexpected keys (ignored): %s", ", ".join(report.unexpected_keys))
    if strict and not report.clean:
        raise RuntimeError(
            f"checkpoint does not match {type(target).__name__}: missing keys {report.missing_keys}, "
            f"unexpected keys {report.unexpected_keys} (pass strict=False to load anyway)")
    return report


# ------------------------------------------------------------- a dense-prediction backbone's initial weights
def backbone_init_source(section, classifier: str | os.PathLike) -> Path | None:
    """The file a detector's or segmenter's backbone starts from. ``section`` is the stage's params section
    (``finetune`` / ``segment``: ``mode``, ``init``, ``checkpoint``): an official checkpoint for ``mode=evaluate``
    or ``init=checkpoint``, the pretrain output ``<classifier>/final.pth`` for ``init=raw|ema``, else None."""
    if section.mode == "evaluate" or section.init == "checkpoint":
        return Path(section.checkpoint) if section.checkpoint else None
    if section.init in ("ema", "raw"):
        return Path(classifier) / "final.pth"
    return None


def init_dense_backbone(backbone: nn.Module, section, classifier: str | os.PathLike, what: str) -> dict:
    """Load the weights ``section.init`` chooses into ``backbone`` (classifier-only keys dropped; an
    ``init=ema`` without EMA weights falls back to the raw ones, with a warning). Returns the summary logged to
    MLflow (source, entry, loaded/missing/dropped key counts); ``what`` names the model in the error."""
    if section.init == "none":
        return {"init": "none"}
    source = backbone_init_source(section, classifier)
    key = None
    if section.init in ("ema", "raw"):
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
        key = "state_dict_ema" if section.init == "ema" and ckpt.get("state_dict_ema") else "state_dict"
        if section.init == "ema" and key != "state_dict_ema":
            log.warning("%s has no EMA weights: initialising from the raw weights", source)
    else:
        ckpt = str(source)  # an official file: loaded with weights_only=True by load_official_checkpoint
    report = load_official_checkpoint(backbone, ckpt, state_dict_key=key, strict=False)
    if not report.loaded_keys:
        raise ValueError(f"no backbone weight of {source} matches the {what}'s backbone "
                         f"({type(backbone).__name__}): check model.arch/model.size/model.overrides")
    return {"init": section.init, "init_source": str(source), "init_entry": report.source_key or "bare",
            "init_loaded": len(report.loaded_keys), "init_missing": len(report.missing_keys),
            "init_dropped": len(report.dropped_keys)}


def _summarize(keys: list[str]) -> str:
    """Group keys by their top-level module for a short log line."""
    groups: dict[str, int] = {}
    for k in keys:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{name}.* ({n})" for name, n in groups.items())


def save_official_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                             wrap_key: str | None = "state_dict",
                             extra: Mapping | None = None) -> Path:
    """Write ``model``'s weights with official names (CPU tensors) that the official code loads.

    The file holds ``{wrap_key: state_dict, **extra}`` (``wrap_key=None`` writes the bare state dict), which
    both ``mmcv``/``mmengine``'s ``load_checkpoint`` and our loader read. A re-parameterized model gives a
    deploy-form checkpoint (official ``deploy=True``). Written atomically; returns the path.
    """
    target = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    target = getattr(target, "_orig_mod", target)  # torch.compile wrapper
    state_dict = {k: v.detach().cpu().clone() for k, v in target.state_dict().items()}
    payload = state_dict if wrap_key is None else {wrap_key: state_dict, **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
