"""Training-loop callbacks: hooks that code outside the library (tests, experiments) plugs into the loop.

``pretrain.callbacks`` (an operational param) lists them as ``{target: "module:name", kwargs: {...}}``;
every Ray Train worker imports and builds them itself, so a hook reaches the worker process wherever it
runs (the module must be importable there). Subclass :class:`TrainCallback` and override what you need.
The tests' fault injection (kill a worker mid-epoch, poison the loss) is written this way
(tests/fault_hooks.py); the library reads no test switch of its own.
"""
from __future__ import annotations

from typing import Iterable

import torch

from overlock.catalog import load_object


class TrainCallback:
    """Base class: every hook is a no-op."""

    def on_resume(self, rank: int, epoch: int, step: int) -> None:
        """The worker resumed from a checkpoint: ``epoch`` epochs and ``step`` steps are done."""

    def on_step_end(self, rank: int, epoch: int, batch: int, step: int) -> None:
        """After optimizer step ``step`` (global, from 1), batch ``batch`` (from 0) of epoch index ``epoch``."""

    def transform_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of global step ``step`` before the non-finite check (e.g. to inject a NaN)."""
        return loss


class Callbacks(TrainCallback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Iterable[TrainCallback] = ()):
        self.callbacks = list(callbacks)

    def on_resume(self, rank: int, epoch: int, step: int) -> None:
        for cb in self.callbacks:
            cb.on_resume(rank, epoch, step)

    def on_step_end(self, rank: int, epoch: int, batch: int, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_end(rank, epoch, batch, step)

    def transform_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        for cb in self.callbacks:
            loss = cb.transform_loss(loss, step)
        return loss


def load_callbacks(specs: Iterable[dict]) -> Callbacks:
    """Build callbacks from ``[{"target": "module:name", "kwargs": {...}}]`` (``pretrain.callbacks``)."""
    built = []
    for spec in specs:
        try:
            factory = load_object(spec["target"])
        except (ImportError, AttributeError) as err:
            raise ImportError(f"pretrain.callbacks: cannot import {spec['target']!r} ({err}); the module must be "
                              "importable in every Ray worker (e.g. on its PYTHONPATH)") from err
        callback = factory(**spec.get("kwargs", {}))
        if not isinstance(callback, TrainCallback):
            raise TypeError(f"pretrain.callbacks: {spec['target']} built a {type(callback).__name__}, not a "
                            "TrainCallback")
        built.append(callback)
    return Callbacks(built)
