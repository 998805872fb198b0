"""One optimizer step over ``accum`` micro-batches (gradient accumulation), independent of Ray.

Each micro-batch's loss is divided by ``accum`` before its backward, so the accumulated gradient is that of
the mean loss over the whole step's images (micro-batches are equal-sized: the loader drops the last
partial batch). Gradient clipping, the optimizer and scaler step, the per-step LR schedule and the EMA
update run once per optimizer step. Under DDP the micro-batches before the last run inside
``model.no_sync()``, so gradients are all-reduced once per optimizer step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

__all__ = ["StepResult", "OptimizerStep"]


@dataclass
class StepResult:
    loss: float      # mean of the micro-batch losses (= the loss of the whole step's batch)
    images: int      # images this rank processed in the step
    micro_batches: int


class OptimizerStep:
    """Runs :meth:`__call__` = one optimizer step; ``model`` is the unwrapped model (clipping, EMA) and
    ``ddp_model`` what the forward runs through (DDP / compiled, or the model itself)."""

    def __init__(self, model: torch.nn.Module, ddp_model: torch.nn.Module, optimizer, scheduler, *,
                 accum: int, compute_loss: Callable[[torch.nn.Module, Any, Any, int], torch.Tensor],
                 prepare: Callable[[Any, Any], tuple[Any, Any]] = lambda x, y: (x, y),
                 scaler=None, ema=None, clip_grad: float | None = None):
        if accum < 1:
            raise ValueError(f"accumulation steps must be >= 1, got {accum}")
        self.model, self.ddp_model = model, ddp_model
        self.optimizer, self.scheduler, self.scaler, self.ema = optimizer, scheduler, scaler, ema
        self.accum, self.compute_loss, self.prepare, self.clip_grad = accum, compute_loss, prepare, clip_grad

    def _sync_context(self, last: bool):
        no_sync = getattr(self.ddp_model, "no_sync", None)
        if last or no_sync is None:
            return contextlib.nullcontext()
        return no_sync()  # DDP: keep this micro-batch's gradients local; the last one all-reduces the sum

    def __call__(self, micro_batches: Iterable, step: int) -> StepResult:
        """Forward/backward ``accum`` micro-batches from ``micro_batches`` and take optimizer step number
        ``step`` (1-based, the schedule's and the EMA's counter)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, images, count = 0.0, 0, 0
        for images_, targets in micro_batches:
            last = count == self.accum - 1
            with self._sync_context(last):
                images_, targets = self.prepare(images_, targets)
                loss = self.compute_loss(self.ddp_model, images_, targets, step)
                scaled = loss / self.accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_sum += loss.item()
            images += images_.shape[0]
            count += 1
            if last:
                break
        if count != self.accum:
            raise RuntimeError(f"optimizer step {step} got {count} of its {self.accum} micro-batches")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step_update(step)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return StepResult(loss_sum / count, images, count)
