"""The per-worker Ray Train loop: data shards, AMP steps with a non-finite-loss guard, EMA, validation,
per-epoch checkpoints through ``ray.train.report`` and MLflow logging from rank 0.

:class:`TrainingWorker` is the loop as named pieces: set up (compute, model, loaders, optimizer), resume,
train an epoch, evaluate, checkpoint. It resumes from ``ray.train.get_checkpoint()`` (a worker failure, or a
re-run of a killed stage that finds the same Ray run). MLflow steps already in the run are never logged
again, so a resumed run has no duplicated steps. A non-finite loss is not a worker failure: every rank stops,
rank 0 records the error in ``config["fatal_file"]`` and the driver raises it (Ray's retries would only
repeat it). Code outside the library hooks in through ``pretrain.callbacks`` (:mod:`.callbacks`).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from overlock.compute import autocast, configure, needs_grad_scaler, seed_everything, to_memory_format
from overlock.models.baselines import anneal_temperature
from overlock.params import Params, parse_params
from overlock.training import checkpoints as ckpt
from overlock.training import elastic, recipe
from overlock.training.callbacks import TrainCallback, load_callbacks
from overlock.training.loader import loader_settings, worker_cpus
from overlock.training.ddp import align_grad_strides
from overlock.training.ray_logs import quiet_worker_logs
from overlock.training.step import OptimizerStep

log = logging.getLogger("overlock.pretrain")

STEP_LOSS = "train/loss"
STEP_LR = "train/lr"
EPOCH_KEYS = ("train_loss", "val_top1", "val_top5", "val_top1_ema", "val_top5_ema", "lr", "img_per_sec",
              "epoch_time_s", "world_size", "global_batch")


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


def _loader(dataset, batch_size: int, sampler, settings: dict, drop_last: bool):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                       **settings)


# -- distributed helpers ----------------------------------------------------------------------------
def _any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _distribute_bn(model: torch.nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over the ranks: DDP's buffer broadcast leaves each rank its own
    last update, so the ranks would evaluate (and rank 0 save) different statistics."""
    from timm.utils import distribute_bn
    distribute_bn(model, world, reduce=True)


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
                       device: torch.device, step: int, callbacks: TrainCallback | None = None) -> torch.Tensor:
    """Forward + loss under ``precision``; a non-finite AMP loss is retried once in fp32, then fails.

    Every rank takes the same branch (the non-finite flag is all-reduced). ``callbacks.transform_loss`` sees
    every computed loss (e.g. a test's fault injection) before the check.
    """
    def forward(prec: str) -> torch.Tensor:
        with autocast(prec, device):
            output = model(images)
        loss = recipe.recipe_loss(criterion, output, targets, aux_ratio)
        return callbacks.transform_loss(loss, step) if callbacks is not None else loss

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


@dataclass
class _Loaders:
    train: Any  # a DataLoader, or a ShardLoader of Ray Data batches (pretrain.loader: ray_data)
    sampler: torch.utils.data.DistributedSampler | None  # None: Ray Data shuffles every pass itself
    val: torch.utils.data.DataLoader
    classes: list
    steps_per_epoch: int  # optimizer steps (each of ``accum`` micro-batches)
    accum: int
    train_tf: Any  # finishes the batch on the device when it has ``on_device`` (the fast decode path)


def build_loaders(params: Params, model: torch.nn.Module, data: Path, rank: int, world: int, cpus: float,
                  device: torch.device) -> _Loaders:
    """This rank's shard of train (distributed sampler, drop last) and val, with the recipe's transforms;
    loader processes, pinned memory and prefetch sized from the worker's ``cpus``. With ``pretrain.loader:
    ray_data`` the train batches come from this worker's Ray Data shard instead (:mod:`.ray_data_loader`, the
    same listing, transform and drop-last batches). An epoch is
    ``steps_per_epoch`` optimizer steps of ``accum`` micro-batches (``pretrain.max_steps_per_epoch`` counts
    optimizer steps)."""
    p = params.pretrain
    train_tf, val_tf = recipe.build_transforms(p, recipe.data_config(model, p.input_size))
    train_ds, val_ds, classes = load_datasets(data, train_tf, val_tf)
    batch = min(elastic.per_worker_batch(p, world), max(1, len(train_ds) // world))
    settings = loader_settings(cpus, device, p.num_data_workers)
    if p.loader == "ray_data":  # decoded and augmented by Ray Data tasks on any node's CPUs
        from overlock.training.ray_data_loader import ShardLoader
        sampler, train_loader = None, ShardLoader(batch, len(train_ds), world)
    else:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=params.seed, drop_last=True)
        train_loader = _loader(train_ds, batch, sampler, settings, drop_last=True)
    val_shard = torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_loader = _loader(val_shard, p.batch_size, None, settings, drop_last=False)
    # micro-batches per optimizer step as planned for the full run: the elastic rule already sizes ``batch``
    # (keep_global_batch: batch x live workers = the full run's; scale_lr: the global batch follows the workers)
    accum = recipe.accumulation_steps(p, p.workers)
    steps = len(train_loader) // accum
    if steps == 0:
        raise ValueError(f"one optimizer step needs {accum} micro-batches of {batch} images per worker, but a "
                         f"worker's shard has {len(train_loader)} batches: lower pretrain.global_batch or use "
                         "more data")
    steps = steps if p.max_steps_per_epoch is None else min(steps, p.max_steps_per_epoch)
    return _Loaders(train_loader, sampler, val_loader, classes, steps, accum, train_tf)


@dataclass
class TrainingState:
    """What a checkpoint carries between epochs (and across a resume)."""
    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None


class TrainingWorker:
    """One Ray Train worker: :meth:`run` = resume, then per epoch :meth:`train_epoch`, :meth:`evaluate`,
    :meth:`checkpoint`."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        self.config = config
        self.params: Params = parse_params(config["params"], "train_loop_config")
        params, p = self.params, self.params.pretrain
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # the pipeline's compute params, applied in this process (threads: the worker's CPU share by default)
        cpus = worker_cpus(p)
        configure(params.compute, params.seed + self.rank, default_threads=max(1, int(cpus)))
        self.device = ray.train.torch.get_device()
        self.precision = params.compute.precision
        self.callbacks = load_callbacks(c.model_dump() for c in p.callbacks)

        model = recipe.build_model(params, config["num_classes"]).to(self.device)
        recipe.apply_grad_checkpointing(model, p.grad_checkpointing)
        self.memory_format = torch.channels_last if params.compute.channels_last else torch.contiguous_format
        self.model = to_memory_format(model, self.memory_format)
        self.loaders = build_loaders(params, self.model, Path(config["data"]), self.rank, self.world, cpus,
                                     self.device)
        self.optimizer = recipe.build_optimizer(p, self.model, elastic.learning_rate(p, self.world))
        self.scheduler = recipe.build_scheduler(p, self.optimizer, self.loaders.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(self.precision, self.device) else None
        self.mixup = recipe.build_mixup(p, config["num_classes"])
        self.criterion = recipe.build_loss(p, self.mixup)
        if self.world > 1:  # gradients in DDP's bucket strides: no per-step copies (overlock/training/ddp.py)
            align_grad_strides(self.model)
        # DDP broadcasts rank 0's weights; torch.compile is opt-in (the first steps pay the compile time)
        self.ddp_model = ray.train.torch.prepare_model(self.model) if self.world > 1 else self.model
        if params.compute.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self.ema = recipe.build_ema(p, self.model)
        self.state = TrainingState()
        self.progress = _Progress(config, self.rank)
        self.optimizer_step = OptimizerStep(
            self.model, self.ddp_model, self.optimizer, self.scheduler, accum=self.loaders.accum,
            compute_loss=self._micro_batch_loss, prepare=self._prepare, scaler=self.scaler, ema=self.ema,
            clip_grad=p.clip_grad)
        self.meta = {"arch": params.model.arch, "size": params.model.size,
                     "model_kwargs": params.model.constructor_kwargs(), "num_classes": config["num_classes"],
                     "classes": self.loaders.classes}

    # -- resume ------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the latest committed checkpoint (a retried worker or a re-run of a killed stage), if any."""
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = ckpt.load_training_state(Path(d))
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_world = state.get("world_size", self.world)  # an elastic run may resume on another worker count
        p = self.params.pretrain
        elastic.rescale_schedule(self.optimizer, self.scheduler,
                                 elastic.learning_rate(p, self.world) / elastic.learning_rate(p, saved_world))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainingState(state["epoch"], state["step"], state["history"], state.get("best"))
        if self.rank == 0:
            ckpt.restore_rng_states(state["rng"])
            log.info("resumed from the checkpoint of epoch %d (global step %d) on %d workers (saved on %d)",
                     self.state.epoch, self.state.step, self.world, saved_world)
        self.callbacks.on_resume(self.rank, self.state.epoch, self.state.step)

    # -- train an epoch ----------------------------------------------------------------------------
    def _prepare(self, images, targets):
        """A micro-batch on the device: memory format, on-device normalisation (fast decode), mixup."""
        images, targets = images.to(self.device, memory_format=self.memory_format), targets.to(self.device)
        if hasattr(self.loaders.train_tf, "on_device"):  # uint8 from the loader: normalise (and erase) here
            images = self.loaders.train_tf.on_device(images, self.memory_format)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets

    def _micro_batch_loss(self, model, images, targets, step: int) -> torch.Tensor:
        return loss_with_fallback(model, images, targets, self.criterion, self.params.pretrain.aux_loss_ratio,
                                  self.precision, self.device, step, self.callbacks)

    def train_step(self, micro_batches, epoch: int, batch: int) -> tuple[float, int]:
        """One optimizer step over ``accum`` micro-batches (temperature schedule, mixup, AMP loss with
        fallback, clipping, EMA: :class:`OptimizerStep`); returns (loss, images)."""
        p, steps = self.params.pretrain, self.loaders.steps_per_epoch
        # ODConv/KernelWarehouse temperature schedule (a no-op for models without dynamic kernels)
        anneal_temperature(self.model, epoch + batch / steps, p.epochs)
        if self.ema is not None:
            anneal_temperature(self.ema.module, epoch + batch / steps, p.epochs)
        result = self.optimizer_step(micro_batches, self.state.step + 1)
        self.state.step += 1
        return result.loss, result.images

    def train_epoch(self, epoch: int) -> dict:
        """Train epoch index ``epoch``; returns loss sum, steps and images of this rank plus the time taken."""
        p = self.params.pretrain
        if self.loaders.sampler is not None:
            self.loaders.sampler.set_epoch(epoch)
        seed_everything(self.params.seed * 1000 + epoch * 16 + self.rank)  # augmentation draws: same on a resume
        self.ddp_model.train()
        t0, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = self.progress.bar(self.loaders.steps_per_epoch, epoch + 1)
        try:
            micro_batches = iter(self.loaders.train)
            for i in range(self.loaders.steps_per_epoch):
                value, images = self.train_step(itertools.islice(micro_batches, self.loaders.accum), epoch, i)
                loss_sum, steps, seen = loss_sum + value, steps + 1, seen + images
                if self.state.step % p.log_every_steps == 0:
                    self.progress.step(self.state.step, value, self.optimizer.param_groups[0]["lr"])
                if bar is not None:
                    bar.update(1)
                self.callbacks.on_step_end(self.rank, epoch, i, self.state.step)
        finally:
            if bar is not None:
                bar.close()
        return {"loss_sum": loss_sum, "steps": steps, "seen": seen, "t0": t0,
                "train_time": time.perf_counter() - t0}

    # -- evaluate ----------------------------------------------------------------------------------
    def evaluate(self, epoch: int, trained: dict) -> dict:
        """Validation (raw and EMA) over every rank's shard; the epoch's history row."""
        loss_total, steps_total, seen_total = _sum_ranks([trained["loss_sum"], trained["steps"], trained["seen"]])
        if self.world > 1:  # one set of BN statistics on every rank (their mean), as the official train.py does
            _distribute_bn(self.model, self.world)
            if self.ema is not None:
                _distribute_bn(self.ema.module, self.world)
        top1, top5 = evaluate(self.model, self.loaders.val, self.device, self.precision)
        top1_ema, top5_ema = evaluate(self.ema.module, self.loaders.val, self.device, self.precision) \
            if self.ema is not None else (float("nan"), float("nan"))
        return {"epoch": epoch + 1, "train_loss": loss_total / max(steps_total, 1), "val_top1": top1,
                "val_top5": top5, "val_top1_ema": top1_ema, "val_top5_ema": top5_ema,
                "lr": self.optimizer.param_groups[0]["lr"],
                "img_per_sec": seen_total / max(trained["train_time"], 1e-9),
                "epoch_time_s": time.perf_counter() - trained["t0"], "step": self.state.step,
                "world_size": self.world,
                "global_batch": self.loaders.train.batch_size * self.world * self.loaders.accum}

    def _log_epoch(self, row: dict) -> None:
        p, history = self.params.pretrain, self.state.history
        if self.rank != 0:
            return
        self.progress.epoch(row)
        eta = (sum(h["epoch_time_s"] for h in history) / len(history)) * (p.epochs - row["epoch"])
        log.info("epoch %d/%d  loss %.4f  lr %.3g  val top-1 %.2f%% (EMA %.2f%%) top-5 %.2f%%  %.1f img/s  "
                 "%.1fs  ETA %.0fs", row["epoch"], p.epochs, row["train_loss"], row["lr"], row["val_top1"],
                 row["val_top1_ema"], row["val_top5"], row["img_per_sec"], row["epoch_time_s"], eta)

    # -- checkpoint --------------------------------------------------------------------------------
    def _update_best(self, row: dict) -> None:
        top1_ema = row["val_top1_ema"]
        score = max(row["val_top1"], top1_ema if math.isfinite(top1_ema) else -1.0)
        best = self.state.best
        if best is None or score >= best["score"]:
            keep = self.rank == 0
            self.state.best = {"score": score, "epoch": row["epoch"], "metrics": row,
                               "model": ckpt.snapshot_weights(self.model) if keep else None,
                               "ema": ckpt.snapshot_weights(self.ema.module) if (keep and self.ema is not None) else None}

    def checkpoint(self, row: dict) -> None:
        """Report the epoch to Ray Train (rank 0 with the full training state) and wait until it is committed:
        a failure from then on resumes after this epoch."""
        import ray.train
        self._update_best(row)
        report = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if self.rank == 0:
            state = {"model": ckpt.snapshot_weights(self.model),
                     "ema": ckpt.snapshot_weights(self.ema.module) if self.ema is not None else None,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "epoch": row["epoch"], "step": self.state.step, "history": self.state.history,
                     "best": self.state.best, "meta": self.meta, "rng": ckpt.rng_states(), "world_size": self.world}
            with ckpt.temp_checkpoint_dir() as tmp:
                ckpt.save_training_state(Path(tmp), state)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train
        self.resume()
        for epoch in range(self.state.epoch, self.params.pretrain.epochs):
            try:
                trained = self.train_epoch(epoch)
            except NonFiniteLossError as err:  # terminal: every rank stops, the driver raises it
                if self.rank == 0:
                    Path(self.config["fatal_file"]).write_text(str(err))
                log.error("%s", err)
                ray.train.report({"fatal_error": str(err), "epoch": epoch})
                return
            row = self.evaluate(epoch, trained)
            self.state.history.append(row)
            self._log_epoch(row)
            self.checkpoint(row)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=config)``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_worker_logs()
    TrainingWorker(config).run()
