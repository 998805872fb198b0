"""The typed schema of ``params.yaml``: parsed and validated once, then passed down to every stage.

Namespaces follow the stages (``data``, ``model``, ``pretrain``, ``finetune``, ``calibrate``, ``evaluate``,
``tracking``, ``compute``) plus a top-level ``seed``. Unknown keys and bad values fail before any work with
a message that names the key and the valid choices.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from overlock.registry import ARCH_NAMES, OVERLOCK_SIZES, resolve_model

DatasetName = Literal["demo", "imagenet1k", "imagenet100", "cifar10", "folder"]
DetectionDatasetName = Literal["demo_coco", "coco2017", "coco_folder", "none"]
SegmentationDatasetName = Literal["demo_ade", "ade20k", "none"]
Precision = Literal["fp32", "bf16", "fp16"]


class ParamsError(ValueError):
    """params.yaml (or a ``-S`` override) is invalid; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoDataParams(_Section):
    """Size of the locally generated demo datasets (classification + COCO-style instances)."""
    num_classes: int = Field(10, ge=2, le=100)
    train_per_class: int = Field(60, ge=4)
    val_per_class: int = Field(20, ge=2)
    image_size: int = Field(64, ge=16, le=512)
    coco_train_images: int = Field(48, ge=2)
    coco_val_images: int = Field(16, ge=2)
    coco_image_size: int = Field(128, ge=32, le=1024)
    seg_train_images: int = Field(64, ge=4)
    seg_val_images: int = Field(16, ge=2)
    seg_image_size: int = Field(64, ge=32, le=1024)


class SourceParams(_Section):
    """One archive source with an optional checksum: ``{path: /data/mine.tar.gz, sha256: ...}``."""
    path: str = Field(min_length=1, description="http(s) URL, file:// URL or local path (file or directory)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    md5: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")


# your own data (data.dataset: folder, data.detection_dataset: coco_folder); each name is its data.sources key
OWN_DATASETS = ("folder", "coco_folder")


class DataParams(_Section):
    """Which datasets the ``download``/``extract`` stages prepare and where their archives come from."""
    dataset: DatasetName = "demo"
    detection_dataset: DetectionDatasetName = "demo_coco"
    segmentation_dataset: SegmentationDatasetName = "none"  # demo_ade (params.yaml) | ade20k; none: no segment stage work
    root: str = "data"
    # archive file name -> http(s) URL, file:// URL or local path (ImageNet needs a login: local paths), or
    # {path: ..., sha256: ...}; your own data: `folder` / `coco_folder` -> a directory or a tar/tar.gz/zip
    sources: dict[str, str | SourceParams] = Field(default_factory=dict)
    download_retries: int = Field(5, ge=0, le=50)
    # archive names accepted WITHOUT their published checksum (rehearsals with generated archives, e.g.
    # benchmarks/scale_rehearsal.py; never for real data): each local source is hashed and logged as unverified
    unverified_archives: list[str] = Field(default_factory=list)
    # held-out calibration split: images per class taken deterministically from train, never trained on
    calibration_per_class: int = Field(5, ge=1)
    # image check of the extract stage: full = decode every image (parallel over all cores), header = PIL verify
    verify_images: Literal["full", "header"] = "full"
    demo: DemoDataParams = Field(default_factory=DemoDataParams)

    @model_validator(mode="after")
    def _own_data_has_a_source(self) -> "DataParams":
        for key, chosen in (("dataset", self.dataset), ("detection_dataset", self.detection_dataset)):
            if chosen in OWN_DATASETS and chosen not in self.sources:
                layout = ("train/<class>/ and val/<class>/ image folders" if chosen == "folder" else
                          "train/ and val/ image folders plus annotations/instances_train.json and "
                          "annotations/instances_val.json (COCO)")
                raise ValueError(f"data.{key}={chosen!r} needs data.sources.{chosen}: the path of a directory or "
                                 f"a tar/tar.gz/zip archive holding {layout}")
        return self

    def source(self, key: str) -> SourceParams | None:
        """``data.sources[key]`` as a :class:`SourceParams` (a plain string is its path), None when unset."""
        value = self.sources.get(key)
        return SourceParams(path=value) if isinstance(value, str) else value


class ModelParams(_Section):
    """``arch`` picks the family (OverLoCK or a dynamic-convolution baseline), ``size`` the OverLoCK size."""
    arch: str = "overlock"
    size: str = "xt"
    # constructor overrides (depth, sub_depth, embed_dim, kernel_size, ...) for a model smaller than XT
    overrides: dict[str, Any] = Field(default_factory=dict)
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)
    # classifier variants (OverLoCK only; overlock/models/heads.py): fpn = pyramid levels fused before pooling
    head: Literal["plain", "fpn"] = "plain"
    attention: Literal["none", "cbam"] = "none"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCH_NAMES:
            raise ValueError(f"unknown model.arch {v!r}; valid: {', '.join(ARCH_NAMES)}")
        return v

    @field_validator("size")
    @classmethod
    def _known_size(cls, v: str) -> str:
        if v not in OVERLOCK_SIZES:
            raise ValueError(f"unknown model.size {v!r}; valid: {', '.join(OVERLOCK_SIZES)}")
        return v

    @model_validator(mode="after")
    def _resolvable(self) -> "ModelParams":
        resolve_model(self.arch, self.size)  # raises with the valid choices
        allowed = {"depth", "sub_depth", "embed_dim", "kernel_size", "mlp_ratio", "sub_mlp_ratio",
                   "sub_num_heads", "ls_init_value", "res_scale", "smk_size", "use_ds", "projection",
                   "deploy", "use_checkpoint", "width_mult", "kernel_num", "reduction"}
        unknown = sorted(set(self.overrides) - allowed)
        if unknown:
            raise ValueError(f"unknown model.overrides key(s) {unknown}; valid: {', '.join(sorted(allowed))}")
        if self.arch != "overlock" and (self.head != "plain" or self.attention != "none"):
            raise ValueError(f"model.head={self.head!r} / model.attention={self.attention!r} are OverLoCK variants; "
                             f"with model.arch={self.arch!r} keep model.head=plain and model.attention=none")
        return self

    def variant_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the chosen head variant (empty for the plain model)."""
        out: dict[str, Any] = {}
        if self.head != "plain":
            out["head_type"] = self.head
        if self.attention != "none":
            out["attention"] = self.attention
        return out

    def constructor_kwargs(self) -> dict[str, Any]:
        """``overrides`` plus the variant's arguments: what the classifier is built with (model.json)."""
        return {**self.overrides, **self.variant_kwargs()}


class CallbackParams(_Section):
    """A training-loop callback (overlock/training/callbacks.py): ``target`` "module:name" and its ``kwargs``."""
    target: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class PretrainParams(_Section):
    """ImageNet-style pretraining with Ray Train (official recipe defaults where they apply)."""
    recipe: Literal["demo", "official"] = "demo"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float | None = Field(2e-3, gt=0, description="None: 1e-3 * global batch / 1024 (official rule)")
    lr_base: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    cooldown_epochs: int = Field(0, ge=0)
    aux_loss_ratio: float = Field(0.4, ge=0)
    ema_decay: float | None = Field(0.9, gt=0, lt=1)
    clip_grad: float | None = Field(5.0, gt=0)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    smoothing: float = Field(0.1, ge=0, lt=1)
    randaugment: str | None = None
    reprob: float = Field(0.0, ge=0, le=1)
    # training crop interpolation: random (bilinear or bicubic per image, official) | bilinear | bicubic;
    # None: the model's own (bicubic)
    train_interpolation: Literal["random", "bilinear", "bicubic"] | None = None
    input_size: int = Field(64, ge=16)
    workers: int = Field(2, ge=1, description="Ray Train workers")
    gpus_per_worker: float = Field(0, ge=0)
    # CPUs per Ray worker (loader processes + the training process); None: 1 on CPU runs, on GPU runs the
    # cluster's CPUs per GPU (at most 10 per GPU; loader ray_data: 2). Operational: changing it re-runs nothing
    cpus_per_worker: float | None = Field(None, gt=0)
    max_failures: int = Field(1, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)
    storage_path: str | None = Field(None, description="Ray storage; None: .overlock/ray (absolute)")
    ray_address: str | None = Field(None, description="None: connect to RAY_ADDRESS or start local Ray")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    log_every_steps: int = Field(5, ge=1)
    # DataLoader processes per Ray worker; None: cpus_per_worker - 1 (operational)
    num_data_workers: int | None = Field(None, ge=0)
    # training decode: fast (libjpeg-turbo / reduced-size JPEG decode + tensor crop, uint8 to the device; same
    # augmentation distribution, ~1.25-1.35x the images per core of timm's loader) | pil (timm's PIL path)
    train_decode: Literal["fast", "pil"] = "fast"
    # training input: dataloader (loader processes inside each Ray worker) | ray_data (Ray Data tasks on any node's
    # CPUs decode + augment, batches stream to the workers; overlock/training/ray_data_loader.py); a result param
    loader: Literal["dataloader", "ray_data"] = "dataloader"
    # operational: hooks every Ray worker imports and calls ("module:name" or {target, kwargs}); tests use them
    callbacks: list[CallbackParams] = Field(default_factory=list)
    # --- scale-out (README "Ray cluster"): elastic workers, per-node placement
    # elastic training: None = exactly `workers`; else Ray Train runs min_workers..workers workers and continues
    # on fewer when a node is lost (operational)
    min_workers: int | None = Field(None, ge=1)
    # how the global batch and the LR follow the live worker count (elastic runs): keep_global_batch (per-worker
    # batch = batch_size * workers / live workers, LR unchanged) | scale_lr (per-worker batch fixed, global batch
    # and LR scale with the live workers: the linear rule)
    elastic_scaling: Literal["keep_global_batch", "scale_lr"] = "keep_global_batch"
    # custom Ray resources each training worker needs, e.g. {trainer_slot: 1} with `ray start --resources` giving
    # each node one slot: one worker per node (operational)
    worker_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _elastic_range(self) -> "PretrainParams":
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"pretrain.min_workers={self.min_workers} is above pretrain.workers={self.workers} "
                             "(the most workers); set min_workers <= workers, or null for a fixed worker count")
        return self

    # -- fitting the recipe on fewer/smaller GPUs (README "Reproducing the paper on fewer GPUs") --
    # images per optimizer step = workers x batch_size x accumulation steps; None: workers x batch_size (no
    # accumulation). The official recipe: 2048. The LR rule (lr: null) uses this global batch
    global_batch: int | None = Field(None, ge=1)
    # blocks recomputed in the backward pass per stage (official --ckpt-stg; stages 1-4, Focus-Net blocks of
    # stages 3/4 included); identical gradients, less activation memory; a result param: recomputed
    # BatchNorms update their running statistics twice (as the official code does)
    grad_checkpointing: list[int] = Field(default_factory=lambda: [0, 0, 0, 0], min_length=4, max_length=4)
    # none: batch_size/grad_checkpointing as given | auto (measure on the GPU) | 11gb/24gb/40gb/80gb: the
    # planner picks batch_size, accumulation and checkpointing that fit and keep global_batch
    memory_preset: Literal["none", "auto", "11gb", "24gb", "40gb", "80gb"] = "none"

    @field_validator("grad_checkpointing")
    @classmethod
    def _non_negative_blocks(cls, v: list[int]) -> list[int]:
        if any(n < 0 for n in v):
            raise ValueError(f"grad_checkpointing counts blocks per stage (4 values >= 0), got {v}")
        return v

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callback_strings(cls, v: Any) -> Any:
        return [{"target": c} if isinstance(c, str) else c for c in v] if isinstance(v, list) else v


class FinetuneParams(_Section):
    """MMDetection fine-tuning (or evaluation of an official detector checkpoint)."""
    mode: Literal["train", "evaluate"] = "train"
    detector: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
    schedule: Literal["demo", "1x", "3x"] = "demo"
    init: Literal["ema", "raw", "checkpoint", "none"] = "raw"
    checkpoint: str | None = Field(None, description="official classification (init) or detector (evaluate) ckpt")
    max_iters: int | None = Field(100, ge=1, description="demo schedule length; None: config default")
    samples_per_gpu: int = Field(2, ge=1)
    lr: float | None = Field(None, gt=0, description="None: the schedule's own (official 2e-4; demo 4e-4)")
    weight_decay: float = Field(0.05, ge=0)
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    img_scale: tuple[int, int] = (128, 128)
    checkpoint_interval: int = Field(10, ge=1)
    launcher: Literal["none", "pytorch"] = "none"
    nproc_per_node: int | None = Field(None, ge=1, description="torchrun processes (launcher pytorch); None: "
                                       "every visible GPU. On a CPU-only host: that many gloo CPU processes")


class SegmentParams(_Section):
    """UperNet semantic segmentation (mmsegmentation 0.30) on the OverLoCK segmentation backbone."""
    mode: Literal["train", "evaluate"] = "train"
    schedule: Literal["demo", "160k"] = "demo"
    init: Literal["ema", "raw", "checkpoint", "none"] = "raw"
    checkpoint: str | None = Field(None, description="official classification (init) or UperNet (evaluate) ckpt")
    max_iters: int | None = Field(60, ge=1, description="demo schedule length; None: the demo default")
    samples_per_gpu: int = Field(4, ge=1, description="official 160k: 2 per GPU on 8 GPUs")
    lr: float | None = Field(None, gt=0, description="None: the schedule's own (official AdamW 6e-5)")
    weight_decay: float = Field(0.01, ge=0)
    drop_path_rate: float | None = Field(None, ge=0, lt=1, description="None: official per size")
    crop_size: tuple[int, int] = Field((64, 64), description="demo schedule only (160k: official 512x512)")
    head_channels: int = Field(64, ge=8, description="demo schedule only (160k: official 512, aux 256)")
    checkpoint_interval: int = Field(10, ge=1)
    calibration_pixels: int = Field(200000, ge=100, description="pixels sampled per split for T and ECE")
    figure_images: int = Field(4, ge=0)
    launcher: Literal["none", "pytorch"] = "none"
    nproc_per_node: int | None = Field(None, ge=1, description="torchrun processes (launcher pytorch); None: "
                                       "every visible GPU. On a CPU-only host: that many gloo CPU processes")


class CalibrateParams(_Section):
    """Temperature scaling on the held-out calibration split; detector score calibration."""
    split: Literal["calibration", "val"] = "calibration"
    bins: int = Field(15, ge=2)
    max_iter: int = Field(200, ge=1)
    detection_iou: float = Field(0.5, gt=0, lt=1)
    detection_calibrator: Literal["temperature", "isotonic"] = "temperature"


class EvaluateParams(_Section):
    """Validation, COCO metrics, params/FLOPs, throughput, ERF/Grad-CAM and the report."""
    throughput_batch: int = Field(64, ge=1)
    throughput_image_size: int | None = Field(None, ge=16)
    throughput_iters: int = Field(3, ge=1)
    erf_images: int = Field(8, ge=1)
    gradcam_images: int = Field(4, ge=0)
    detection_images: int = Field(4, ge=0)


class TrackingParams(_Section):
    """MLflow: the URI (None: sqlite:///<repo>/mlflow.db, absolute) and the experiment name."""
    uri: str | None = None
    experiment: str = "overlock-pipeline"
    register_models: bool = True


class ComputeParams(_Section):
    """Device and numerics shared by every stage."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "fp32"
    threads: int | None = Field(None, ge=1)
    channels_last: bool = False
    contmix_backend: Literal["auto", "gather", "fast", "natten", "triton"] = "auto"  # triton: opt-in (README)
    # torch.compile (inductor) the pretraining model: opt-in, ~10% faster CPU steps after minutes of compiling
    compile: bool = False


class Params(_Section):
    """The whole of params.yaml."""
    seed: int = 0
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)

    @model_validator(mode="after")
    def _calibration_not_eval(self) -> "Params":
        if self.calibrate.split == "val":
            raise ValueError(
                "calibrate.split='val' would fit the calibration on the evaluation split, which makes the "
                "reported calibration metrics optimistic; use the held-out 'calibration' split "
                "(its size is data.calibration_per_class)")
        return self

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (e.g. a stage's params) for state directories."""
        dump = self.model_dump(mode="json")
        blob = json.dumps({s: dump[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the valid keys)"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; {msg.lower()}"
        lines.append(f"  - {loc}: {msg}")
    lines.append("Fix the value in params.yaml (or your `dvc exp run -S key=value`) and run again.")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise ParamsError naming each bad key and its valid values."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the repository root or pass --params PATH")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    return parse_params(raw, str(path))
