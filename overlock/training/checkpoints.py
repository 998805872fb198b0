"""Training state in Ray checkpoints, and the stage's output files in the contract format.

A Ray checkpoint directory holds one ``state.pt`` (model, EMA, optimizer, scaler, scheduler, epoch, global
step, RNG states, per-epoch history and the best epoch's weights), written by rank 0 every epoch. The stage
output (``final.pth``, ``best.pth``, ``model.json``, ``history.json``) is derived from the latest checkpoint.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (as tensors/primitives, loadable with weights_only)."""
    np_state = np.random.get_state()
    return {"python": repr(random.getstate()), "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    import ast
    random.setstate(ast.literal_eval(states["python"]))
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    torch.set_rng_state(states["torch"])


def save_training_state(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (already on CPU) as ``state.pt`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    return directory / STATE_FILE


def load_training_state(directory: Path) -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint directory (``weights_only=True``)."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint directory is incomplete; delete it and re-run")
    return torch.load(path, map_location="cpu", weights_only=True)


def classifier_payload(state: dict[str, Any], which: str) -> dict[str, Any]:
    """The contract dict of ``final.pth`` (``which='final'``) or ``best.pth`` from a training state."""
    meta = state["meta"]
    if which == "final":
        sd, ema, epoch, metrics = state["model"], state.get("ema"), state["epoch"], state["history"][-1]
    else:
        best = state["best"]
        sd, ema, epoch, metrics = best["model"], best.get("ema"), best["epoch"], best["metrics"]
    out = {"state_dict": sd, "arch": meta["arch"], "size": meta["size"], "model_kwargs": meta["model_kwargs"],
           "num_classes": meta["num_classes"], "classes": meta["classes"], "epoch": int(epoch),
           "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    if ema is not None:
        out["state_dict_ema"] = ema
    return out


def write_classifier_outputs(state: dict[str, Any], model_info: dict[str, Any], staging: Path) -> None:
    """Write final.pth, best.pth, model.json and history.json into ``staging``."""
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(classifier_payload(state, "final"), staging / "final.pth")
    torch.save(classifier_payload(state, "best"), staging / "best.pth")
    (staging / "model.json").write_text(json.dumps(model_info, indent=2) + "\n")
    (staging / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n")


def snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's state dict (unwrapping DDP)."""
    module = getattr(model, "module", model)
    return _cpu(module.state_dict())


def temp_checkpoint_dir() -> tempfile.TemporaryDirectory:
    """A temporary directory to stage a checkpoint before ``ray.train.report``."""
    return tempfile.TemporaryDirectory(prefix="overlock-ckpt-")
