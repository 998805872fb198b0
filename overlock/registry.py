"""The one registry of model names used by timm, MMDetection and the stages.

``model.arch`` picks a family entry; for OverLoCK ``model.size`` picks xt/t/s/b. Baseline families
(ODConv, KernelWarehouse, plain ResNet/MobileNetV2/ConvNeXt) have one variant per arch name and ignore
``model.size``. Importing the model modules (``import_model_modules``) registers them with timm and
MMDetection; this module itself imports neither, so params validation stays cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

OVERLOCK_SIZES = ("xt", "t", "s", "b")


@dataclass(frozen=True)
class ModelSpec:
    """Everything a stage needs to build one model variant."""
    arch: str
    timm_name: str                      # timm.create_model name (classifier)
    mmdet_backbone: str                 # type name in MMDetection's BACKBONES
    pyramid_channels: tuple[int, ...]   # channels of the 4 dense levels (FPN in_channels)
    drop_path_rate: float               # ImageNet recipe default
    detection_drop_path_rate: float     # COCO recipe default
    module: str                         # python module whose import registers the model
    backbone_kwargs: dict = field(default_factory=dict)

    @property
    def is_overlock(self) -> bool:
        return self.arch == "overlock"


_OVERLOCK = {
    # size: (pyramid channels, ImageNet drop path, COCO drop path)
    "xt": ((56, 112, 340, 420), 0.1, 0.1),
    "t": ((64, 128, 384, 640), 0.15, 0.2),
    "s": ((64, 128, 448, 640), 0.4, 0.3),
    "b": ((80, 160, 528, 720), 0.5, 0.4),
}

_SPECS: dict[tuple[str, str | None], ModelSpec] = {
    ("overlock", size): ModelSpec(
        arch="overlock", timm_name=f"overlock_{size}", mmdet_backbone=f"overlock_{size}",
        pyramid_channels=ch, drop_path_rate=dp, detection_drop_path_rate=ddp, module="overlock.models")
    for size, (ch, dp, ddp) in _OVERLOCK.items()
}


def register_baseline(spec: ModelSpec) -> None:
    """Add a single-variant baseline family entry (called at import of this module's table below)."""
    _SPECS[(spec.arch, None)] = spec


def _baselines() -> None:
    # ODConv / KernelWarehouse baselines and their plain counterparts (overlock.models.baselines; MMDetection
    # backbones in overlock.detection.baseline_backbones). name: (pyramid channels, ImageNet drop path, COCO
    # drop path) -- the official recipes' values; timm and mmdet names are f"dc_{name}".
    r50, mbv2, cnx = (256, 512, 1024, 2048), (24, 32, 96, 1280), (96, 192, 384, 768)
    table = {
        "resnet50": (r50, 0.0, 0.0),
        "odconv1x_resnet50": (r50, 0.0, 0.0),
        "odconv4x_resnet50": (r50, 0.0, 0.0),
        "kw1x_resnet50": (r50, 0.1, 0.1),
        "kw4x_resnet50": (r50, 0.1, 0.1),
        "mobilenetv2_100": (mbv2, 0.0, 0.0),
        "odconv1x_mobilenetv2_100": (mbv2, 0.0, 0.0),
        "odconv4x_mobilenetv2_100": (mbv2, 0.0, 0.0),
        "kw1x_mobilenetv2_100": (mbv2, 0.0, 0.0),
        "kw4x_mobilenetv2_100": (mbv2, 0.0, 0.0),
        "convnext_tiny": (cnx, 0.1, 0.4),
        "kw1x_convnext_tiny": (cnx, 0.3, 0.4),
    }
    for name, (ch, dp, ddp) in table.items():
        register_baseline(ModelSpec(arch=name, timm_name=f"dc_{name}", mmdet_backbone=f"dc_{name}",
                                    pyramid_channels=ch, drop_path_rate=dp, detection_drop_path_rate=ddp,
                                    module="overlock.models.baselines"))


_baselines()

ARCH_NAMES = tuple(dict.fromkeys(arch for arch, _ in _SPECS))


def resolve_model(arch: str, size: str = "xt") -> ModelSpec:
    """The spec for ``model.arch``/``model.size``; a clear error lists the valid names."""
    if arch == "overlock":
        if size not in OVERLOCK_SIZES:
            raise ValueError(f"unknown OverLoCK size {size!r}; valid: {', '.join(OVERLOCK_SIZES)}")
        return _SPECS[("overlock", size)]
    if (arch, None) in _SPECS:
        return _SPECS[(arch, None)]
    raise ValueError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCH_NAMES)}")


def import_model_modules(spec: ModelSpec | None = None) -> None:
    """Import the module(s) that register models with timm (and MMDetection when available)."""
    modules = {spec.module} if spec else {s.module for s in _SPECS.values()}
    for mod in sorted(modules):
        importlib.import_module(mod)
