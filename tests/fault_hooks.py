"""Fault injection for the pretraining tests, plugged in through ``pretrain.callbacks`` (the library reads
no test switch): every Ray worker imports this module (the test session puts tests/ on the workers' path)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from overlock.training.callbacks import TrainCallback


class HoldAfterFirstStep(TrainCallback):
    """After the first step of each epoch index in ``epochs``, write ``rank<r>_epoch<e>.pid`` (this worker's pid)
    into ``pid_dir`` and hold (once per rank and epoch) for ``hold_s`` or until the test writes
    ``release_epoch<e>`` there, so the test can SIGKILL real processes mid-epoch. A released epoch no longer
    holds (a resumed run passes it). Every resume appends the epoch it resumed after to
    ``resumed_rank<r>.txt``."""

    def __init__(self, pid_dir: str, hold_s: float = 0.0, epoch: int = 1, epochs: list[int] | None = None):
        self.pid_dir, self.hold_s = Path(pid_dir), float(hold_s)
        self.epochs = set(epochs) if epochs is not None else {epoch}

    def on_step_end(self, rank: int, epoch: int, batch: int, step: int) -> None:
        marker = self.pid_dir / f"rank{rank}_epoch{epoch}.pid"
        release = self.pid_dir / f"release_epoch{epoch}"
        if epoch not in self.epochs or batch != 0 or marker.exists() or release.exists():
            return
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.hold_s
        while time.monotonic() < deadline and not release.exists():
            time.sleep(0.1)

    def on_resume(self, rank: int, epoch: int, step: int) -> None:
        with (self.pid_dir / f"resumed_rank{rank}.txt").open("a") as fh:
            fh.write(f"{epoch}\n")


class PoisonLoss(TrainCallback):
    """The loss of global step ``step`` becomes NaN (in every precision)."""

    def __init__(self, step: int):
        self.step = int(step)

    def transform_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if step == self.step else loss


class RecordCompute(TrainCallback):
    """After the first step, write what this worker process runs with (ContMix backend, torch threads) to
    ``<out_dir>/compute_rank<r>.json``: the pipeline's compute params must be applied in every worker."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_step_end(self, rank: int, epoch: int, batch: int, step: int) -> None:
        if step == 1:
            import json

            import overlock
            from overlock.backends import contmix_backend
            (self.out_dir / f"compute_rank{rank}.json").write_text(
                json.dumps({"contmix_backend": contmix_backend(), "threads": torch.get_num_threads(),
                            "pid": os.getpid(), "library": overlock.__file__, "cwd": os.getcwd()}))
