"""The per-worker Ray Train loop: data shards, AMP steps with a non-finite-loss guard, EMA, validation,
per-epoch checkpoints through ``ray.train.report`` and MLflow logging from rank 0.

The loop resumes from ``ray.train.get_checkpoint()`` (a worker failure, or a re-run of a killed stage that
finds the same Ray run). MLflow steps already in the run are never logged again, so a resumed run has no
duplicated steps. A non-finite loss is not a worker failure: every rank stops, rank 0 records the error in
``config["fatal_file"]`` and the driver raises it (Ray's retries would only repeat it).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from overlock.compute import autocast, needs_grad_scaler, seed_everything, to_memory_format
from overlock.models.baselines import anneal_temperature
from overlock.params import Params, parse_params
from overlock.training import checkpoints as ckpt
from overlock.training import recipe
from overlock.training.ddp import align_grad_strides

log = logging.getLogger("overlock.pretrain")

STEP_LOSS = "train/loss"
STEP_LR = "train/lr"
EPOCH_KEYS = ("train_loss", "val_top1", "val_top5", "val_top1_ema", "val_top5_ema", "lr", "img_per_sec",
              "epoch_time_s")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf (terminal: retrying from a checkpoint would repeat it)."""


# -- data ---------------------------------------------------------------------------------------------
def load_datasets(data_dir: Path, train_tf=None, val_tf=None):
    """(train, val, classes.json records) of the classification layout under ``data_dir``."""
    from overlock.data.datasets import ClassificationDataset, classification_root, load_classes
    root = classification_root(data_dir)
    train = ClassificationDataset(root, "train", transform=train_tf)
    val = ClassificationDataset(root, "val", transform=val_tf)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{root}: the train or val split is empty; re-run the extract stage (dvc repro extract)")
    return train, val, load_classes(root)


def _loader(dataset, batch_size: int, sampler, workers: int, drop_last: bool):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       drop_last=drop_last, persistent_workers=workers > 0)


# -- distributed helpers ----------------------------------------------------------------------------
def _any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sum_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str) -> tuple[float, float]:
    """(top-1, top-5) in percent over every rank's shard of the validation set."""
    model.eval()
    correct1 = correct5 = count = 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with autocast(precision, device):
            logits, _ = recipe.main_and_aux(model(images))
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += targets.numel()
    correct1, correct5, count = _sum_ranks([correct1, correct5, count])
    return 100.0 * correct1 / max(count, 1), 100.0 * correct5 / max(count, 1)


# -- the step -------------------------------------------------------------------------------------------
def loss_with_fallback(model, images, targets, criterion, aux_ratio: float, precision: str,
                       device: torch.device, step: int, poison_step: int | None = None) -> torch.Tensor:
    """Forward + loss under ``precision``; a non-finite AMP loss is retried once in fp32, then fails.

    Every rank takes the same branch (the non-finite flag is all-reduced). ``poison_step`` (tests only)
    makes the loss NaN at that global step in every precision.
    """
    def forward(prec: str) -> torch.Tensor:
        with autocast(prec, device):
            output = model(images)
        loss = recipe.recipe_loss(criterion, output, targets, aux_ratio)
        return loss * float("nan") if poison_step == step else loss

    loss = forward(precision)
    bad = _any_rank(not torch.isfinite(loss).item())
    if bad and precision != "fp32":
        log.warning("non-finite loss at step %d under %s: retrying the step in fp32", step, precision)
        loss = forward("fp32")
        bad = _any_rank(not torch.isfinite(loss).item())
    if bad:
        raise NonFiniteLossError(
            f"non-finite training loss (NaN/inf) at global step {step} (precision {precision}"
            f"{', fp32 retry too' if precision != 'fp32' else ''}); lower pretrain.lr, lengthen "
            "pretrain.warmup_epochs or set pretrain.clip_grad, then re-run")
    return loss


# -- the loop -------------------------------------------------------------------------------------------
class _Progress:
    """Rank-0 progress: MLflow logging without duplicate steps, a per-epoch line and an optional tqdm bar."""

    def __init__(self, config: dict, rank: int):
        self.rank = rank
        self.run = None
        self.last_step = self.last_epoch = -1
        if rank == 0 and config.get("mlflow_run_id"):
            from overlock.tracking import attach_run
            self.run = attach_run(config["mlflow_uri"], config["mlflow_run_id"])
            self.last_step = max((s for s, _ in self.run.metric_history(STEP_LOSS)), default=-1)
            self.last_epoch = max((s for s, _ in self.run.metric_history("val_top1")), default=-1)
        self.tty = bool(config.get("tty"))

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.run is not None and step > self.last_step:
            self.run.log_metrics({STEP_LOSS: loss, STEP_LR: lr}, step=step)

    def epoch(self, row: dict) -> None:
        if self.run is not None and row["epoch"] > self.last_epoch:
            self.run.log_metrics({k: row[k] for k in EPOCH_KEYS if k in row}, step=row["epoch"])

    def bar(self, total: int, epoch: int):
        if self.rank != 0 or not self.tty:
            return None
        from ray.experimental.tqdm_ray import tqdm
        return tqdm(total=total, desc=f"epoch {epoch}")


def _test_hook(config: dict, rank: int, epoch: int, batch: int) -> None:
    """Tests only: after the first step of epoch index 1, write this worker's pid and hold (once)."""
    pid_dir = config.get("test_pid_dir")
    if not pid_dir or epoch != 1 or batch != 0:
        return
    marker = Path(pid_dir) / f"rank{rank}_epoch{epoch}.pid"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    time.sleep(float(config.get("test_hold_s", 0)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=config)``)."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params: Params = parse_params(config["params"], "train_loop_config")
    p = params.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(p.cpus_per_worker)) if not params.compute.threads else params.compute.threads)
    device = ray.train.torch.get_device()
    precision = params.compute.precision
    torch.manual_seed(params.seed + rank)

    model = recipe.build_model(params, config["num_classes"]).to(device)
    memory_format = torch.channels_last if params.compute.channels_last else torch.contiguous_format
    model = to_memory_format(model, memory_format)
    cfg = recipe.data_config(model, p.input_size)
    train_tf, val_tf = recipe.build_transforms(p, cfg)
    train_ds, val_ds, classes = load_datasets(Path(config["data"]), train_tf, val_tf)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=params.seed, drop_last=True)
    batch = min(p.batch_size, max(1, len(train_ds) // world))
    train_loader = _loader(train_ds, batch, sampler, p.num_data_workers, drop_last=True)
    val_shard = torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_loader = _loader(val_shard, p.batch_size, None, p.num_data_workers, drop_last=False)
    steps_per_epoch = len(train_loader) if p.max_steps_per_epoch is None else min(len(train_loader),
                                                                                  p.max_steps_per_epoch)
    lr = recipe.learning_rate(p, world)
    optimizer = recipe.build_optimizer(p, model, lr)
    scheduler = recipe.build_scheduler(p, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(precision, device) else None
    mixup = recipe.build_mixup(p, config["num_classes"])
    criterion = recipe.build_loss(p, mixup)

    if world > 1:  # gradients in DDP's bucket strides: no per-step copies (overlock/training/ddp.py)
        align_grad_strides(model)
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model  # broadcasts rank 0's weights
    if params.compute.compile:  # opt-in; the first steps pay the compile time (benchmarks/RESULTS.md)
        ddp_model = torch.compile(ddp_model)
    ema = recipe.build_ema(p, model)
    start_epoch, step, history, best = 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load_training_state(Path(d))
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, history, best = state["epoch"], state["step"], state["history"], state.get("best")
        if rank == 0:
            ckpt.restore_rng_states(state["rng"])
            log.info("resumed from the checkpoint of epoch %d (global step %d)", start_epoch, step)
        if config.get("test_pid_dir"):  # tests only: record where each rank resumed
            with (Path(config["test_pid_dir"]) / f"resumed_rank{rank}.txt").open("a") as fh:
                fh.write(f"{start_epoch}\n")
    progress = _Progress(config, rank)
    meta = {"arch": params.model.arch, "size": params.model.size, "model_kwargs": dict(params.model.overrides),
            "num_classes": config["num_classes"], "classes": classes}
    epoch_times = [h["epoch_time_s"] for h in history]

    for epoch in range(start_epoch, p.epochs):
        sampler.set_epoch(epoch)
        seed_everything(params.seed * 1000 + epoch * 16 + rank)  # augmentation draws: same on a resume
        ddp_model.train()
        t0, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = progress.bar(steps_per_epoch, epoch + 1)
        try:
            for i, (images, targets) in enumerate(train_loader):
                if i >= steps_per_epoch:
                    break
                # ODConv/KernelWarehouse temperature schedule (a no-op for models without dynamic kernels)
                anneal_temperature(model, epoch + i / steps_per_epoch, p.epochs)
                if ema is not None:
                    anneal_temperature(ema.module, epoch + i / steps_per_epoch, p.epochs)
                images, targets = images.to(device, memory_format=memory_format), targets.to(device)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                loss = loss_with_fallback(ddp_model, images, targets, criterion, p.aux_loss_ratio, precision,
                                          device, step + 1, config.get("test_poison_step"))
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if p.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), p.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(model, step=step)
                value, cur_lr = loss.item(), optimizer.param_groups[0]["lr"]
                loss_sum += value
                steps += 1
                seen += images.shape[0]
                if step % p.log_every_steps == 0:
                    progress.step(step, value, cur_lr)
                if bar is not None:
                    bar.update(1)
                _test_hook(config, rank, epoch, i)
        except NonFiniteLossError as err:
            if rank == 0:
                Path(config["fatal_file"]).write_text(str(err))
            log.error("%s", err)
            ray.train.report({"fatal_error": str(err), "epoch": epoch})
            return
        finally:
            if bar is not None:
                bar.close()
        train_time = time.perf_counter() - t0
        loss_total, steps_total, seen_total = _sum_ranks([loss_sum, steps, seen])
        top1, top5 = evaluate(model, val_loader, device, precision)
        top1_ema, top5_ema = evaluate(ema.module, val_loader, device, precision) if ema is not None \
            else (float("nan"), float("nan"))
        epoch_time = time.perf_counter() - t0
        epoch_times.append(epoch_time)
        row = {"epoch": epoch + 1, "train_loss": loss_total / max(steps_total, 1), "val_top1": top1,
               "val_top5": top5, "val_top1_ema": top1_ema, "val_top5_ema": top5_ema,
               "lr": optimizer.param_groups[0]["lr"], "img_per_sec": seen_total / max(train_time, 1e-9),
               "epoch_time_s": epoch_time, "step": step}
        history.append(row)
        score = max(top1, top1_ema if math.isfinite(top1_ema) else -1.0)
        if rank == 0:
            progress.epoch(row)
            eta = (sum(epoch_times) / len(epoch_times)) * (p.epochs - epoch - 1)
            log.info("epoch %d/%d  loss %.4f  lr %.3g  val top-1 %.2f%% (EMA %.2f%%) top-5 %.2f%%  %.1f img/s  "
                     "%.1fs  ETA %.0fs", epoch + 1, p.epochs, row["train_loss"], row["lr"], top1, top1_ema, top5,
                     row["img_per_sec"], epoch_time, eta)
        if best is None or score >= best["score"]:
            best = {"score": score, "epoch": epoch + 1, "metrics": row,
                    "model": ckpt.snapshot_weights(model) if rank == 0 else None,
                    "ema": ckpt.snapshot_weights(ema.module) if (ema is not None and rank == 0) else None}
        report = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if rank == 0:
            state = {"model": ckpt.snapshot_weights(model),
                     "ema": ckpt.snapshot_weights(ema.module) if ema is not None else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "epoch": epoch + 1, "step": step, "history": history, "best": best, "meta": meta,
                     "rng": ckpt.rng_states(), "world_size": world}
            with ckpt.temp_checkpoint_dir() as tmp:
                ckpt.save_training_state(Path(tmp), state)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)
        # wait until the controller has committed this epoch's checkpoint: a failure from here on resumes it
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
