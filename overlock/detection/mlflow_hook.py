"""The mmcv hook that sends per-iteration losses and the learning rate to MLflow (via ``overlock.tracking``).

It reads the unaveraged ``log_vars`` of every training iteration (``runner.outputs``), so it does not
interfere with mmcv's averaging logger hooks, and it never pickles the model. It also appends each
iteration to a JSON-lines file in the work dir (the source of ``plots/finetune/loss.csv``).

Resume: steps already in MLflow (logged before a kill) are not logged again, so every iteration has
exactly one value; the JSON-lines history is cut back to the resumed iteration, so the loss curve is the
trajectory of the weights that were kept.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmcv.runner import HOOKS, Hook, get_dist_info

from overlock.tracking import attach_run

LOSS_HISTORY = "loss_history.jsonl"


def read_loss_history(path: str | Path) -> list[dict]:
    """Records ``{"iter", "loss", "lr", <loss terms>}`` of the loss history file (empty when missing)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


@HOOKS.register_module()
class MlflowLossHook(Hook):
    """Log ``loss``, each loss term and ``lr`` per iteration to the stage's MLflow run (rank 0 only).

    Args:
        tracking_uri, run_id: the stage run to attach to (works in torchrun workers too).
        history_file: JSON-lines file receiving one record per iteration.
        prefix: metric name prefix (``train/``).

    Register it with ``priority="LOW"`` (after the optimizer step of the same iteration).
    """

    def __init__(self, tracking_uri: str, run_id: str, history_file: str, prefix: str = "train/"):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.history_file = Path(history_file)
        self.prefix = prefix
        self._run = None
        self._last_logged_step = 0

    def before_run(self, runner) -> None:
        if get_dist_info()[0] != 0:
            return
        self._run = attach_run(self.tracking_uri, self.run_id)
        logged = self._run.metric_history(f"{self.prefix}loss")
        self._last_logged_step = max((step for step, _ in logged), default=0)
        # keep only the iterations of the checkpoint we resume from (runner.iter is set by resume)
        kept = [r for r in read_loss_history(self.history_file) if r["iter"] <= runner.iter]
        self.history_file.parent.mkdir(parents=True, exist_ok=True)
        self.history_file.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def after_train_iter(self, runner) -> None:
        if self._run is None:
            return
        step = runner.iter + 1
        log_vars = (runner.outputs or {}).get("log_vars", {})
        record = {"iter": step, **{k: float(v) for k, v in log_vars.items()}}
        lr = runner.current_lr()
        lr = lr[0] if isinstance(lr, list) else next(iter(lr.values()))[0]
        record["lr"] = float(lr)
        with self.history_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if step > self._last_logged_step:
            self._run.log_metrics({f"{self.prefix}{k}": v for k, v in record.items() if k != "iter"}, step=step)
            self._last_logged_step = step
