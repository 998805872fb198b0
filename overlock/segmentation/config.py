"""Build the mmsegmentation config of the ``segment`` stage from params.

The shipped configs (``overlock/segmentation/configs``) hold the recipes: ``upernet_overlock_{t,s,b}_ade20k_160k``
with the official values (AdamW 6e-5, weight decay 0.01 with no decay on norms, linear warm-up over 1500
iterations then poly decay with power 1, 160k iterations at 2 images x 8 GPUs, 512x512 crops, drop path
0.2/0.3/0.5 for T/S/B) and ``demo/upernet_overlock_demo`` (a short CPU schedule). This module picks one
from ``segment.schedule``/``model.size`` and fills in what depends on the run: backbone type, drop path and
overrides, the heads' in_channels (read from the backbone built on the meta device), classes, data paths,
demo crop size/head width/iterations/learning rate, device/precision and the work dir.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Sequence

from overlock.params import Params
from overlock.registry import resolve_model

__all__ = ["CONFIG_DIR", "config_file", "shipped_configs", "backbone_out_channels", "build_segmentation_config",
           "SEGMENTATION_DROP_PATH", "DEMO_LR"]

CONFIG_DIR = Path(str(resources.files("overlock.segmentation") / "configs"))
# official drop path per size (xt has no released segmentation model: its detection value)
SEGMENTATION_DROP_PATH = {"xt": 0.1, "t": 0.2, "s": 0.3, "b": 0.5}
DEMO_LR = 1e-3


def shipped_configs() -> list[Path]:
    """Every leaf config shipped in the package (``_base_`` excluded)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.py") if "_base_" not in p.parts)


def config_file(schedule: str, size: str = "t") -> Path:
    """The shipped config of a schedule/size (the 160k recipe of T serves XT, which has no official one)."""
    if schedule == "demo":
        return CONFIG_DIR / "demo" / "upernet_overlock_demo.py"
    path = CONFIG_DIR / f"upernet_overlock_{'t' if size == 'xt' else size}_ade20k_{schedule}.py"
    if not path.exists():
        choices = ", ".join(str(p.relative_to(CONFIG_DIR)) for p in shipped_configs())
        raise ValueError(f"no segmentation config for segment.schedule={schedule!r} (model.size={size!r}); "
                         f"shipped configs: {choices}")
    return path


def backbone_out_channels(backbone: dict) -> list[int]:
    """Channels of the pyramid levels of the mmseg backbone config ``backbone`` (built on the meta device)."""
    import torch
    from mmseg.models import build_backbone

    from overlock.segmentation.registration import register_mmseg_backbones

    register_mmseg_backbones()
    backbone = {k: v for k, v in dict(backbone).items() if k not in ("init_cfg", "pretrained")}
    with torch.device("meta"):
        model = build_backbone(copy.deepcopy(backbone))
    return [int(c) for c in model.out_channels]


def _dataset(kind: str, split: dict, classes: Sequence[str], pipeline: list, test_mode: bool = False) -> dict:
    cfg = dict(type="ADE20KDataset" if kind == "ade20k" else "CustomDataset", data_root=None,
               img_dir=split["img_dir"], ann_dir=split["ann_dir"], split=split["split"], pipeline=pipeline,
               test_mode=test_mode)
    if kind != "ade20k":  # ADE20KDataset sets these itself (and its 150 classes)
        cfg.update(img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True, classes=tuple(classes))
    return cfg


def _set_scale(pipeline: list, crop: tuple[int, int]) -> None:
    """Demo crop size: training/test scales are (4 x crop width, crop height), as 2048x512 is for 512."""
    for step in pipeline:
        if step.get("type") in ("Resize", "MultiScaleFlipAug") and "img_scale" in step:
            step["img_scale"] = (4 * crop[1], crop[0])
        if step.get("type") in ("RandomCrop", "Pad"):
            step["crop_size" if step["type"] == "RandomCrop" else "size"] = tuple(crop)
        if "transforms" in step:
            _set_scale(step["transforms"], crop)


def build_segmentation_config(params: Params, splits: dict[str, dict], classes: Sequence[str], work_dir: Path,
                              device: str = "cpu", world_size: int = 1):
    """The full ``mmcv.Config`` for this run. ``splits``: :func:`overlock.data.datasets.segmentation_split_files`."""
    from mmcv import Config

    sg, spec = params.segment, resolve_model(params.model.arch, params.model.size)
    cfg = Config.fromfile(str(config_file(sg.schedule, params.model.size)))
    kind = params.data.segmentation_dataset

    dpr = sg.drop_path_rate if sg.drop_path_rate is not None else SEGMENTATION_DROP_PATH.get(params.model.size, 0.2)
    cfg.model.backbone = dict(type=spec.mmdet_backbone, drop_path_rate=dpr, out_indices=(0, 1, 2, 3),
                              **dict(params.model.overrides))
    channels = backbone_out_channels(cfg.model.backbone)
    cfg.model.decode_head.in_channels = channels
    cfg.model.auxiliary_head.in_channels = channels[cfg.model.auxiliary_head.in_index]
    num_classes = 150 if kind == "ade20k" else len(classes)
    cfg.model.decode_head.num_classes = cfg.model.auxiliary_head.num_classes = num_classes
    norm = dict(type="SyncBN" if device == "cuda" and world_size > 1 else "BN", requires_grad=True)
    cfg.model.decode_head.norm_cfg = cfg.model.auxiliary_head.norm_cfg = norm
    if sg.schedule == "demo":
        cfg.model.decode_head.channels = sg.head_channels
        cfg.model.auxiliary_head.channels = max(8, sg.head_channels // 2)
        for split in ("train", "val", "test"):
            _set_scale(cfg.data[split].pipeline, tuple(sg.crop_size))

    pipelines = {k: cfg.data[k].pipeline for k in ("train", "val", "test")}
    cfg.data.train = _dataset(kind, splits["train"], classes, pipelines["train"])
    cfg.data.val = _dataset(kind, splits["val"], classes, pipelines["val"], test_mode=True)
    cfg.data.test = _dataset(kind, splits["val"], classes, pipelines["test"], test_mode=True)
    # outside cfg.data: mmseg passes every other cfg.data key to its data loaders
    cfg.calibration_data = _dataset(kind, splits["calibration"], classes, pipelines["test"], test_mode=True)
    cfg.data.samples_per_gpu = sg.samples_per_gpu
    cfg.data.workers_per_gpu = 0 if sg.schedule == "demo" else 4
    cfg.data.persistent_workers = cfg.data.workers_per_gpu > 0  # torch refuses it without workers

    cfg.optimizer.weight_decay = sg.weight_decay
    if sg.lr is not None:
        cfg.optimizer.lr = sg.lr
    elif sg.schedule == "demo":
        cfg.optimizer.lr = DEMO_LR
    if sg.schedule == "demo":
        max_iters = sg.max_iters or cfg.runner.max_iters
        cfg.runner.max_iters = max_iters
        cfg.lr_config.warmup_iters = min(cfg.lr_config.warmup_iters, max(1, max_iters // 6))
        cfg.checkpoint_config.interval = sg.checkpoint_interval
        cfg.evaluation.interval = max_iters
        cfg.log_config.interval = min(cfg.log_config.interval, max_iters)

    if params.compute.precision == "fp16":
        if device != "cuda":
            raise ValueError("compute.precision=fp16 needs a GPU for mmsegmentation; use fp32 on CPU")
        cfg.optimizer_config = dict(type="Fp16OptimizerHook", loss_scale="dynamic")
        cfg.fp16 = dict()
    elif params.compute.precision == "bf16":
        raise ValueError("compute.precision=bf16 is not supported by mmsegmentation 0.x (mmcv 1.x has fp16 "
                         "loss scaling only); use fp32 or fp16 for the segment stage")

    cfg.work_dir = str(work_dir)
    cfg.seed = params.seed
    cfg.device = device
    cfg.gpu_ids = list(range(world_size)) if device == "cuda" else [0]
    cfg.auto_resume = False  # the stage picks the checkpoint itself
    cfg.resume_from = None
    cfg.load_from = None
    cfg.cudnn_benchmark = device == "cuda"
    if sg.launcher == "pytorch":
        cfg.dist_params = dict(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            cfg.model.backbone.sync_bn = True
    return cfg
