"""Build the MMDetection config of the ``finetune`` stage from params.

The shipped configs (``overlock/detection/configs``, mmdet 2.x ``_base_`` style) hold the recipes;
this module picks one from ``finetune.detector``/``finetune.schedule``/``model.size`` and fills in what
depends on the run: backbone type and overrides, classes, data paths, optimizer values, demo schedule
length, device/precision and the work dir. The FPN in_channels are never typed: :func:`load_config` and
:func:`build_detection_config` read them from the backbone built (on the meta device) from the config.
"""
from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path
from typing import Sequence

from overlock.params import Params
from overlock.registry import resolve_model

log = logging.getLogger(__name__)

__all__ = ["CONFIG_DIR", "config_file", "shipped_configs", "backbone_out_channels", "load_config",
           "coco_files", "build_detection_config", "DEMO_MAX_ITERS"]

CONFIG_DIR = Path(str(resources.files("overlock.detection") / "configs"))
DEMO_MAX_ITERS = 100
DEMO_LR = 4e-4  # short demo schedule on tiny data; official COCO recipe: 2e-4


def shipped_configs() -> list[Path]:
    """Every leaf config shipped in the package (``_base_`` files excluded)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.py") if "_base_" not in p.parts)


def config_file(detector: str, schedule: str, size: str = "t", arch: str = "overlock") -> Path:
    """The shipped config for a detector/schedule/size (baselines: their own config when they ship one)."""
    if schedule == "demo":
        path = CONFIG_DIR / "demo" / f"{detector}_overlock_demo.py"
    else:
        if arch != "overlock":
            own = CONFIG_DIR / "baselines" / f"{detector}_{arch}_fpn_{schedule}_coco.py"
            if own.exists():
                return own
        path = CONFIG_DIR / detector / f"{detector}_overlock_{size}_fpn_{schedule}_coco.py"
    if not path.exists():
        choices = ", ".join(str(p.relative_to(CONFIG_DIR)) for p in shipped_configs())
        raise ValueError(f"no detection config for finetune.detector={detector!r}, finetune.schedule={schedule!r}"
                         f" (model.size={size!r}); shipped configs: {choices}. Faster R-CNN ships 1x and demo only.")
    return path


def backbone_out_channels(backbone: dict) -> list[int]:
    """Channels of the levels the mmdet backbone ``backbone`` (a config dict) returns, read from the backbone
    built on the meta device: the FPN's in_channels, whatever the overrides and ``out_indices``."""
    import torch
    from mmdet.models import build_backbone

    from overlock.detection.registration import register_mmdet_backbones

    register_mmdet_backbones()
    backbone = {k: v for k, v in dict(backbone).items() if k not in ("init_cfg", "pretrained")}
    with torch.device("meta"):
        model = build_backbone(copy.deepcopy(backbone))
    return [int(c) for c in model.out_channels]


def load_config(path: Path | str):
    """``mmcv.Config.fromfile`` of a shipped config with the FPN in_channels set from its backbone."""
    from mmcv import Config

    cfg = Config.fromfile(str(path))
    cfg.model.neck.in_channels = backbone_out_channels(cfg.model.backbone)
    return cfg


def coco_files(data_dir: Path) -> dict[str, tuple[str, str]]:
    """``{"train"|"calibration"|"val": (annotation file, image dir)}`` of the extracted detection dataset."""
    try:
        from overlock.data.datasets import coco_split_files, detection_root
        files = coco_split_files(detection_root(Path(data_dir)))
        return {k: (str(a), str(i)) for k, (a, i) in files.items()}
    except ImportError:  # the data package without the dataset helpers: the on-disk contract directly
        root = Path(data_dir) / "detection"
        return {"train": (str(root / "splits/train.json"), str(root / "train2017")),
                "calibration": (str(root / "splits/calibration.json"), str(root / "train2017")),
                "val": (str(root / "annotations/instances_val2017.json"), str(root / "val2017"))}


def _set_img_scale(pipeline: list, scale: tuple[int, int]) -> None:
    for step in pipeline:
        if step.get("type") in ("Resize", "MultiScaleFlipAug") and "img_scale" in step:
            step["img_scale"] = tuple(scale)
        if "transforms" in step:
            _set_img_scale(step["transforms"], scale)


def build_detection_config(params: Params, data_dir: Path, work_dir: Path, classes: Sequence[str],
                           device: str = "cpu", world_size: int = 1):
    """The full ``mmcv.Config`` for this run (nothing run-specific is left at the shipped defaults)."""
    from mmcv import Config

    ft, spec = params.finetune, resolve_model(params.model.arch, params.model.size)
    cfg = Config.fromfile(str(config_file(ft.detector, ft.schedule, params.model.size, params.model.arch)))
    classes = tuple(classes)

    # backbone + neck
    overrides = dict(params.model.overrides)
    dpr = ft.drop_path_rate if ft.drop_path_rate is not None else spec.detection_drop_path_rate
    if spec.is_overlock:
        cfg.model.backbone = dict(type=spec.mmdet_backbone, drop_path_rate=dpr, out_indices=(0, 1, 2, 3), **overrides)
    else:  # a baseline: keep its own config's backbone settings, or swap the backbone into an OverLoCK recipe
        backbone = dict(cfg.model.backbone)
        if backbone.get("type") != spec.mmdet_backbone:
            backbone = dict(type=spec.mmdet_backbone)
        backbone.update(overrides)
        if ft.drop_path_rate is not None:
            backbone["drop_path_rate"] = ft.drop_path_rate
        cfg.model.backbone = backbone
    # weights come from the pretrain output / finetune.checkpoint, never from a download at run time
    for key in ("init_cfg", "pretrained"):
        cfg.model.backbone.pop(key, None)
    cfg.model.neck.in_channels = backbone_out_channels(cfg.model.backbone)  # honours model.overrides
    cfg.model.roi_head.bbox_head.num_classes = len(classes)
    if cfg.model.roi_head.get("mask_head"):
        cfg.model.roi_head.mask_head.num_classes = len(classes)

    # data
    files = coco_files(Path(data_dir))
    for split, key in (("train", "train"), ("val", "val"), ("test", "val")):
        ann, img = files[key]
        cfg.data[split].ann_file, cfg.data[split].img_prefix, cfg.data[split].classes = ann, img + "/", classes
    cfg.data.samples_per_gpu = ft.samples_per_gpu
    cfg.data.workers_per_gpu = 0 if ft.schedule == "demo" else 2
    if ft.schedule == "demo":
        for split in ("train", "val", "test"):
            _set_img_scale(cfg.data[split].pipeline, tuple(ft.img_scale))

    # optimizer and schedule
    cfg.optimizer.weight_decay = ft.weight_decay
    if ft.lr is not None:
        cfg.optimizer.lr = ft.lr
    elif ft.schedule == "demo":
        cfg.optimizer.lr = DEMO_LR  # 1x/3x keep the official recipe's 2e-4 from their configs
    if ft.schedule == "demo":
        max_iters = ft.max_iters or DEMO_MAX_ITERS
        cfg.runner.max_iters = max_iters
        cfg.lr_config.step = [max(1, int(0.75 * max_iters))]
        cfg.lr_config.warmup_iters = min(cfg.lr_config.warmup_iters, max(1, max_iters // 4))
        cfg.checkpoint_config.interval = ft.checkpoint_interval
        cfg.evaluation.interval = max_iters
        cfg.log_config.interval = min(cfg.log_config.interval, max_iters)
    elif ft.max_iters is not None:
        log.warning("finetune.max_iters only shortens the demo schedule; %s keeps its epochs", ft.schedule)

    # precision: mmcv 1.x has loss-scaled fp16 only
    if params.compute.precision == "fp16":
        if device != "cuda":
            raise ValueError("compute.precision=fp16 needs a GPU for MMDetection; use fp32 on CPU")
        cfg.fp16 = dict(loss_scale="dynamic")
    elif params.compute.precision == "bf16":
        raise ValueError("compute.precision=bf16 is not supported by MMDetection 2.x (mmcv 1.x has fp16 "
                         "loss scaling only); use fp32 or fp16 for the finetune stage")

    cfg.work_dir = str(work_dir)
    cfg.seed = params.seed
    cfg.device = device
    cfg.gpu_ids = list(range(world_size)) if device == "cuda" else [0]
    cfg.auto_resume = False  # the stage picks the checkpoint itself (see finetune.latest_checkpoint)
    cfg.resume_from = None
    cfg.load_from = None
    if ft.launcher == "pytorch":
        cfg.dist_params = dict(backend="nccl" if device == "cuda" else "gloo")
        if spec.is_overlock and device == "cuda":
            cfg.model.backbone.sync_bn = True  # as the official multi-GPU recipe (SyncBN; torch's is GPU-only)
    return cfg
