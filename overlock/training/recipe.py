"""The pretraining recipe built from ``params`` with timm: model, transforms, mixup, loss, optimizer, schedule, EMA.

Two recipes (``pretrain.recipe``):

* ``demo`` (default): the ``pretrain.*`` values exactly as given (small, no mixup; CPU demo and tests).
* ``official``: the ImageNet recipe of the paper (``overlock/reference/published_results.json``,
  ``overlock_imagenet_recipe``). It sets every ``pretrain`` field listed in :data:`OFFICIAL_PRETRAIN` that still
  holds its schema default (a value you changed yourself wins), and turns on AMP: ``compute.precision`` fp32
  becomes bf16 (fp16 stays fp16). The learning rate keeps the official rule ``1e-3 x global batch / 1024``
  unless ``pretrain.lr`` is set; the global batch is 2048 (official: 8 GPUs x 256), reached on fewer GPUs by
  gradient accumulation (:func:`accumulation_steps`).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
from torch import nn

from overlock.params import Params, PretrainParams
from overlock.registry import import_model_modules, resolve_model

#: pretrain fields the official recipe sets (when they hold the schema default) -> official value
OFFICIAL_PRETRAIN: dict[str, Any] = {
    "lr": None, "epochs": 300, "input_size": 224, "batch_size": 256, "lr_base": 1e-3, "weight_decay": 0.05,
    "warmup_epochs": 5, "warmup_lr": 1e-6, "min_lr": 1e-5, "cooldown_epochs": 10, "aux_loss_ratio": 0.4,
    "ema_decay": 0.9999, "clip_grad": 5.0, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
    "randaugment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "train_interpolation": "random",
    "global_batch": 2048,
}


def official_recipe_reference() -> dict:
    """The published recipe table shipped as package data."""
    text = resources.files("overlock.reference").joinpath("published_results.json").read_text()
    return json.loads(text)["overlock_imagenet_recipe"]


def effective_params(params: Params) -> Params:
    """``params`` with the recipe applied (``official`` overrides defaults and turns on AMP); others unchanged."""
    if params.pretrain.recipe != "official":
        return params
    defaults = PretrainParams()
    updates = {k: v for k, v in OFFICIAL_PRETRAIN.items() if getattr(params.pretrain, k) == getattr(defaults, k)}
    out = params.model_copy(deep=True)
    out.pretrain = params.pretrain.model_copy(update=updates)
    if out.compute.precision == "fp32":
        out.compute = params.compute.model_copy(update={"precision": "bf16"})
    return out


def global_batch(p: PretrainParams, world_size: int) -> int:
    """Images per optimizer step: ``pretrain.global_batch``, or workers x per-worker batch when unset."""
    return p.global_batch if p.global_batch is not None else p.batch_size * world_size


def accumulation_steps(p: PretrainParams, world_size: int) -> int:
    """Micro-batches per optimizer step: global batch / (workers x per-worker batch), which must divide."""
    per_step = p.batch_size * world_size
    total = global_batch(p, world_size)
    if total % per_step:
        raise ValueError(
            f"pretrain.global_batch={total} is not a multiple of workers x batch_size = {world_size} x "
            f"{p.batch_size} = {per_step}: pick a batch_size that divides global_batch / workers, or set "
            "pretrain.memory_preset (auto, 11gb, 24gb, 40gb, 80gb) to plan it")
    return total // per_step


def learning_rate(p: PretrainParams, world_size: int) -> float:
    """``pretrain.lr``, or the official rule ``lr_base x global batch / 1024`` (the global batch counts the
    accumulated micro-batches: workers x per-worker batch x accumulation steps)."""
    return p.lr if p.lr is not None else p.lr_base * global_batch(p, world_size) / 1024


def apply_grad_checkpointing(model: nn.Module, blocks_per_stage: list[int]) -> int:
    """Recompute the first ``blocks_per_stage[s]`` blocks of each stage in the backward pass (the official
    ``--ckpt-stg``: stage s's Base-Net blocks and, for stages 3/4, its Focus-Net blocks); returns how many
    blocks are checkpointed. Gradients are unchanged (drop path's RNG state is replayed)."""
    if not any(blocks_per_stage):
        return 0
    if not all(hasattr(model, f"blocks{s + 1}") for s in range(4)):
        raise ValueError(f"pretrain.grad_checkpointing={blocks_per_stage} needs an OverLoCK model "
                         f"({type(model).__name__} has no per-stage blocks); set it to [0, 0, 0, 0]")
    count = 0
    for stage, n in enumerate(blocks_per_stage):
        for name in (f"blocks{stage + 1}", f"sub_blocks{stage + 1}"):
            for i, block in enumerate(getattr(model, name, ())):
                block.use_checkpoint = i < n
                count += i < n
    return count


def build_model(params: Params, num_classes: int) -> nn.Module:
    """The classifier of ``model.arch``/``model.size`` (timm), with the recipe's drop path for the size."""
    import timm
    spec = resolve_model(params.model.arch, params.model.size)
    try:
        import_model_modules(spec)
    except ImportError as err:
        raise RuntimeError(f"model.arch={params.model.arch!r} needs module {spec.module!r}, which failed to "
                           f"import ({err}); check the installation (pip install -e .)") from err
    drop_path = params.model.drop_path_rate if params.model.drop_path_rate is not None else spec.drop_path_rate
    return timm.create_model(spec.timm_name, num_classes=num_classes, drop_path_rate=drop_path,
                             **params.model.constructor_kwargs())


def data_config(model: nn.Module, input_size: int) -> dict:
    """timm's data config of the model (mean/std/interpolation/crop_pct) at ``input_size``."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (3, input_size, input_size)
    return cfg


def posterize_keeping_bits(img, bits_to_keep: int, **_):
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 bits gives a black image.

    timm's ``PosterizeIncreasing`` maps magnitude 10 to 0 bits ("keep 4 down to 0 MSB", as in the UDA/TF
    RandAugment), and ``rand-m9-mstd0.5`` draws magnitudes around 9 clipped at 10, so about 2% of its
    posterize calls ask for 0 bits. Pillow up to 10 posterized 0 bits to black (mask ``~255``); Pillow 11+
    (13.0.0 here) raises ``ValueError: bits must be between or equal to 1 and 8``. This op keeps the old
    result, so the augmentation distribution is that of the official runs.
    """
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, int(bits_to_keep))
    return img.point([0] * 256 * len(img.getbands()))


def fix_randaugment_ops(transform) -> int:
    """Swap the posterize op of every timm RandAugment/AutoAugment inside ``transform`` for
    :func:`posterize_keeping_bits`; return how many ops were swapped."""
    from timm.data.auto_augment import AugmentOp
    swapped = 0
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp):
            if t.name.startswith("Posterize"):
                t.aug_fn = posterize_keeping_bits
                swapped += 1
            continue
        for attr in ("transforms", "ops", "policy"):
            inner = getattr(t, attr, None)
            if isinstance(inner, (list, tuple)):
                stack.extend(x for item in inner for x in (item if isinstance(item, (list, tuple)) else [item]))
    return swapped


def build_transforms(p: PretrainParams, cfg: dict):
    """(train, eval) transforms: random-resized crop + flip (+RandAugment, random erasing) / resize + centre crop.

    The training crop (and RandAugment's geometric ops) interpolate with ``pretrain.train_interpolation``
    (``random``: bilinear or bicubic per image, the official ``train.py``), else the model's own.
    """
    from timm.data import create_transform
    common = dict(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"])
    train = create_transform(is_training=True, auto_augment=p.randaugment, re_prob=p.reprob, re_mode="pixel",
                             color_jitter=0.4 if p.randaugment is None else None,
                             interpolation=p.train_interpolation or cfg["interpolation"], **common)
    fix_randaugment_ops(train)
    if p.train_decode == "fast":
        from overlock.training.loader import DecodeCropTransform
        train = DecodeCropTransform(train)
    val = create_transform(is_training=False, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                           **common)
    return train, val


def build_mixup(p: PretrainParams, num_classes: int):
    """timm ``Mixup`` (mixup/cutmix with label smoothing) or None when both alphas are 0."""
    if p.mixup <= 0 and p.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=p.mixup, cutmix_alpha=p.cutmix, label_smoothing=p.smoothing, num_classes=num_classes)


def build_loss(p: PretrainParams, mixup) -> nn.Module:
    """Soft-target CE with mixup, label-smoothing CE with ``smoothing``, else plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if p.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=p.smoothing)
    return nn.CrossEntropyLoss()


def build_optimizer(p: PretrainParams, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on weights only (no decay on norms, biases, ``no_weight_decay()`` params)."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=p.weight_decay, filter_bias_and_bn=True,
                               foreach=True)


def build_scheduler(p: PretrainParams, optimizer, steps_per_epoch: int):
    """Per-step cosine schedule: linear warmup, cosine to ``min_lr`` over epochs-cooldown, then hold min_lr."""
    from timm.scheduler import CosineLRScheduler
    total = max(1, (p.epochs - p.cooldown_epochs) * steps_per_epoch)
    warmup = min(int(p.warmup_epochs * steps_per_epoch), total - 1)
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=p.min_lr, warmup_t=warmup,
                             warmup_lr_init=p.warmup_lr, warmup_prefix=False, cycle_limit=1, t_in_epochs=False)


def build_ema(p: PretrainParams, model: nn.Module):
    """timm ``ModelEmaV3`` of the (unwrapped) model, or None when ``ema_decay`` is null."""
    if p.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=p.ema_decay)


def main_and_aux(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a model output into (main logits, aux logits or None): tensor, (main, aux) tuple or dict."""
    if isinstance(output, dict):
        return output["main"], output.get("aux")
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def recipe_loss(criterion: nn.Module, output, target: torch.Tensor, aux_ratio: float) -> torch.Tensor:
    """Main loss plus ``aux_ratio`` x the aux-head loss (OverLoCK's deep supervision)."""
    main, aux = main_and_aux(output)
    loss = criterion(main.float(), target)
    if aux is not None and aux_ratio > 0:
        loss = loss + aux_ratio * criterion(aux.float(), target)
    return loss
