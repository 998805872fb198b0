"""Dynamic-convolution baselines: ResNet-50, MobileNetV2 (1.0x) and ConvNeXt-Tiny, plain or with ODConv / KW.

One class per family (``DCResNet``, ``DCMobileNetV2``, ``DCConvNeXt``) takes ``conv_type`` ("plain", "odconv",
"kw"); which convolutions become dynamic, and how KW warehouses are shared, follow the official releases:

* ODConv (OSVAI/ODConv): every convolution of the ResNet bottlenecks (not the stem, not the shortcut) and
  every convolution of MobileNetV2 after the stem; reduction 1/16 (min 16 channels), ``kernel_num`` 1 or 4.
* KW (OSVAI/KernelWarehouse): ResNet shares one warehouse per stage (``sharing_range=("layer", "conv")``), the
  first block of a stage and its strided shortcut draw from the previous stage's warehouse, the first
  block of stage 1 keeps a plain 1x1 conv; MobileNetV2 puts everything including the stem in warehouses
  (1x shares point-wise convs of a stage, 4x shares per conv role); ConvNeXt shares per stage and role.

Classifiers (registered in timm as ``dc_<arch>``, e.g. ``timm.create_model("dc_odconv4x_resnet50")``) return
plain logits. ``forward_pyramid`` gives the four dense levels (strides 4-32) that the MMDetection backbones in
``overlock.detection.baseline_backbones`` return. Module names follow the official code (torchvision-style
ResNet/MobileNetV2, Meta's ConvNeXt), so official checkpoints load through ``checkpoint_filter_fn``.

Temperature annealing (the hook the training loops call, duck-typed):
    ``model.update_temperature(epoch, total_epochs)`` or ``anneal_temperature(model, epoch, total_epochs)``
at the start of each epoch (a fractional ``epoch`` anneals per iteration). ODConv divides its attention logits
by a temperature annealed 30 -> 1 over the first 10 epochs (official ``get_temperature``); KW blends its
attention with a one-hot initial assignment, weight 1 -> 0 over the first 20 epochs (15 for MobileNetV2). A
run shorter than the official recipe keeps the schedule's share of training (see ``TemperatureSchedule``).
Newly built models sit at the final temperature, which is what evaluation and fine-tuning use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .kernelwarehouse import KWConv2d, WarehouseManager
from .odconv import ODConv2d

__all__ = [
    "BASELINE_ARCHS",
    "DCResNet",
    "DCMobileNetV2",
    "DCConvNeXt",
    "TemperatureSchedule",
    "anneal_temperature",
    "set_temperature",
    "temperature_schedule",
    "create_baseline",
    "checkpoint_filter_fn",
    "baseline_class",
    "baseline_kwargs",
    "baseline_pyramid_channels",
]

CONV_TYPES = ("plain", "odconv", "kw")


# --------------------------------------------------------------------------------------------- temperature
@dataclass(frozen=True)
class TemperatureSchedule:
    """Linear annealing from ``start`` to ``end`` over the first ``epochs`` of a ``recipe_epochs`` recipe.

    With ``total_epochs`` shorter than the recipe, the span shrinks to the same share of training
    (``epochs * total_epochs / recipe_epochs``), so a short demo run still ends at the final temperature.
    """

    start: float
    end: float
    epochs: float
    recipe_epochs: int

    def span(self, total_epochs: float | None = None) -> float:
        if total_epochs is None:
            return float(self.epochs)
        return min(float(self.epochs), self.epochs * float(total_epochs) / self.recipe_epochs)

    def at(self, epoch: float, span: float) -> float:
        """Temperature after ``epoch`` (fractional) epochs of an anneal lasting ``span`` epochs."""
        if span <= 0:
            return self.end
        return self.end + (self.start - self.end) * max(0.0, 1.0 - float(epoch) / span)

    def value(self, epoch: float, total_epochs: float | None = None) -> float:
        return self.at(epoch, self.span(total_epochs))


ODCONV_SCHEDULE = TemperatureSchedule(start=30.0, end=1.0, epochs=10, recipe_epochs=100)
ODCONV_MOBILENET_SCHEDULE = TemperatureSchedule(start=30.0, end=1.0, epochs=10, recipe_epochs=150)
KW_SCHEDULE = TemperatureSchedule(start=1.0, end=0.0, epochs=20, recipe_epochs=300)
KW_MOBILENET_SCHEDULE = TemperatureSchedule(start=1.0, end=0.0, epochs=15, recipe_epochs=150)


def temperature_schedule(model: nn.Module) -> TemperatureSchedule | None:
    """The schedule of the first dynamic-convolution network inside ``model`` (wrappers, detectors, EMA)."""
    for m in model.modules():
        schedule = getattr(m, "temperature_schedule", None)
        if isinstance(schedule, TemperatureSchedule):
            return schedule
    return None


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every dynamic convolution in ``model``; returns how many were set."""
    count = 0
    for m in model.modules():
        if isinstance(m, (ODConv2d, KWConv2d)):
            m.set_temperature(value)
            count += 1
    return count


def anneal_temperature(model: nn.Module, epoch: float, total_epochs: float | None = None) -> float | None:
    """Set the published temperature for ``epoch``; returns it, or None if ``model`` has no dynamic convs."""
    schedule = temperature_schedule(model)
    if schedule is None:
        return None
    value = schedule.value(epoch, total_epochs)
    set_temperature(model, value)
    return value


class _DynamicConvModel(nn.Module):
    """Shared classifier plumbing: conv factory, timm head API and the temperature hook."""

    def _init_convs(
        self,
        conv_type: str,
        kernel_num: int,
        reduction: float,
        cell_num_ratio: float,
        sharing_range: Sequence[str],
        kw_norm: type[nn.Module] = nn.BatchNorm1d,
        schedules: tuple[TemperatureSchedule, TemperatureSchedule] = (ODCONV_SCHEDULE, KW_SCHEDULE),
    ):
        if conv_type not in CONV_TYPES:
            raise ValueError(f"unknown conv_type {conv_type!r}; valid: {', '.join(CONV_TYPES)}")
        self.conv_type, self.kernel_num, self.reduction = conv_type, kernel_num, reduction
        self.temperature_schedule = {"plain": None, "odconv": schedules[0], "kw": schedules[1]}[conv_type]
        self.warehouse_manager = None
        if conv_type == "kw":
            self.warehouse_manager = WarehouseManager(
                reduction=reduction,
                cell_num_ratio=cell_num_ratio,
                sharing_range=sharing_range,
                norm_layer=kw_norm,
            )

    def _conv(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        name: str | None = None,
        odconv: bool = True,
    ) -> nn.Module:
        """A convolution of the configured type; ``name`` is its KW warehouse name (None: plain conv)."""
        if self.conv_type == "odconv" and odconv:
            if bias:
                raise ValueError("ODConv2d has no bias")
            return ODConv2d(
                cin,
                cout,
                k,
                stride=stride,
                padding=padding,
                groups=groups,
                reduction=self.reduction,
                kernel_num=self.kernel_num,
            )
        if self.conv_type == "kw" and name is not None:
            return self.warehouse_manager.reserve(
                cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias, warehouse_name=name
            )
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias)

    def _finish_warehouses(self) -> None:
        if self.warehouse_manager is not None:
            self.warehouse_manager.store()
            self.warehouse_manager.allocate(self)

    def update_temperature(self, epoch: float, total_epochs: float | None = None) -> float | None:
        """Training-loop hook: set the published temperature for ``epoch`` (None for plain models)."""
        return anneal_temperature(self, epoch, total_epochs)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        setattr(
            self, self.head_name, nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean((2, 3)) if x.ndim == 4 else x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four dense feature levels (strides 4, 8, 16, 32)."""
        outs = []
        for i, stage in enumerate(self.pyramid_stages()):
            x = stage(x)
            if i > 0:
                outs.append(x)
        return outs

    @property
    def pyramid_channels(self) -> tuple[int, ...]:
        return tuple(info["num_chs"] for info in self.feature_info)


# -------------------------------------------------------------------------------------------------- ResNet
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        net: _DynamicConvModel,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        names: tuple[str | None, str, str],
        drop_path: float,
    ):
        super().__init__()
        self.conv1 = net._conv(inplanes, planes, 1, name=names[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = net._conv(planes, planes, 3, stride, 1, name=names[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = net._conv(planes, planes * 4, 1, name=names[2])
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(shortcut + self.drop_path(out))


class DCResNet(_DynamicConvModel):
    """Bottleneck ResNet (ResNet-50 by default), plain, ODConv or KW."""

    head_name = "fc"

    def __init__(
        self,
        conv_type: str = "plain",
        num_classes: int = 1000,
        depth: Sequence[int] = (3, 4, 6, 3),
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        kernel_num: int = 1,
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        sharing_range: Sequence[str] = ("layer", "conv"),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        **kwargs,
    ):
        super().__init__()
        _reject_unknown(kwargs, type(self).__name__)
        self._init_convs(conv_type, kernel_num, reduction, cell_num_ratio, sharing_range)
        self.inplanes = stem = 64
        self.conv1 = nn.Conv2d(in_chans, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = []
        prev_blocks = 0
        for s, (blocks, planes) in enumerate(zip(depth, embed_dim)):
            layer = self._make_layer(s, planes, blocks, 1 if s == 0 else 2, prev_blocks, drop_path_rate)
            setattr(self, f"layer{s + 1}", layer)
            self.feature_info.append(dict(num_chs=planes * 4, reduction=4 * 2**s, module=f"layer{s + 1}"))
            prev_blocks = blocks
        self.num_features = self.inplanes
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._finish_warehouses()

    def _make_layer(self, s: int, planes: int, blocks: int, stride: int, prev_blocks: int, drop_path: float):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            # KW: a strided shortcut draws from the previous stage's warehouse; ODConv keeps it static
            ds_name = f"stage{s - 1}_layer{prev_blocks + 1}_conv0" if stride != 1 else None
            downsample = nn.Sequential(
                self._conv(self.inplanes, planes * 4, 1, stride, name=ds_name, odconv=False),
                nn.BatchNorm2d(planes * 4),
            )
        first_conv1 = f"stage{s - 1}_layer{prev_blocks}_conv0" if s > 0 else None
        layers = [
            Bottleneck(
                self,
                self.inplanes,
                planes,
                stride,
                downsample,
                (first_conv1, f"stage{s}_layer0_conv1", f"stage{s}_layer0_conv2"),
                drop_path,
            )
        ]
        self.inplanes = planes * 4
        for j in range(1, blocks):
            names = tuple(f"stage{s}_layer{j}_conv{c}" for c in range(3))
            layers.append(Bottleneck(self, self.inplanes, planes, 1, None, names, drop_path))
        return nn.Sequential(*layers)

    def pyramid_stages(self) -> list[nn.Module]:
        return [
            nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool),
            self.layer1,
            self.layer2,
            self.layer3,
            self.layer4,
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.pyramid_stages():
            x = stage(x)
        return x


# --------------------------------------------------------------------------------------------- MobileNetV2
MBV2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)  # expansion t, channels c, repeats n, stride s
KW_MBV2_STAGE = (1, 2, 3, 4, 5, 6, 6)  # KW warehouse stage of each group of blocks


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, conv: nn.Module, cout: int):
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, net: _DynamicConvModel, inp: int, oup: int, stride: int, expand: int, names: tuple):
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(net._conv(inp, hidden, 1, name=names[0]), hidden))
        layers += [
            ConvBNReLU(net._conv(hidden, hidden, 3, stride, 1, groups=hidden, name=names[1]), hidden),
            net._conv(hidden, oup, 1, name=names[2]),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class DCMobileNetV2(_DynamicConvModel):
    """MobileNetV2 (1.0x by default), plain, ODConv or KW; ``depth`` overrides the 7 repeat counts."""

    head_name = "classifier"

    def __init__(
        self,
        conv_type: str = "plain",
        num_classes: int = 1000,
        width_mult: float = 1.0,
        depth: Sequence[int] | None = None,
        kernel_num: int = 1,
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        sharing_range: Sequence[str] = ("layer", "pwconv"),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        **kwargs,
    ):
        super().__init__()
        _reject_unknown(kwargs, type(self).__name__)
        self._init_convs(
            conv_type,
            kernel_num,
            reduction,
            cell_num_ratio,
            sharing_range,
            schedules=(ODCONV_MOBILENET_SCHEDULE, KW_MOBILENET_SCHEDULE),
        )
        depth = [n for *_, n, _ in MBV2_SETTING] if depth is None else list(depth)
        if len(depth) != len(MBV2_SETTING):
            raise ValueError(f"MobileNetV2 depth needs {len(MBV2_SETTING)} repeat counts, got {depth}")
        cin = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            ConvBNReLU(self._conv(in_chans, cin, 3, 2, 1, name="stage0_conv0", odconv=False), cin)
        ]
        level_ends, layer_idx = [], 0
        for g, ((t, c, _, s), n) in enumerate(zip(MBV2_SETTING, depth)):
            cout = make_divisible(c * width_mult)
            for i in range(n):
                handover = i == 0 and g > 0 and KW_MBV2_STAGE[g] != KW_MBV2_STAGE[g - 1]
                st = KW_MBV2_STAGE[g] - 1 if handover else KW_MBV2_STAGE[g]
                names = tuple(
                    f"stage{st}_layer{layer_idx}_{role}" for role in ("pwconv0", "dwconv0", "pwconv1")
                )
                features.append(InvertedResidual(self, cin, cout, s if i == 0 else 1, t, names))
                cin, layer_idx = cout, 0 if handover else layer_idx + 1
            if g in (1, 2, 4):  # last block at strides 4, 8, 16
                level_ends.append((len(features) - 1, cout))
        last = f"stage{KW_MBV2_STAGE[-1]}_layer{layer_idx}_pwconv1"
        features.append(ConvBNReLU(self._conv(cin, self.num_features, 1, name=last), self.num_features))
        level_ends.append((len(features) - 1, self.num_features))
        self.features = nn.Sequential(*features)
        self._level_ends = [i for i, _ in level_ends]
        self.feature_info = [
            dict(num_chs=ch, reduction=4 * 2**k, module=f"features.{i}")
            for k, (i, ch) in enumerate(level_ends)
        ]
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._finish_warehouses()

    def pyramid_stages(self) -> list[nn.Module]:
        """Stem (conv + the first block), then the blocks up to each level's end."""
        bounds = [0, 2] + [i + 1 for i in self._level_ends]
        return [self.features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# ------------------------------------------------------------------------------------------------ ConvNeXt
class ConvNeXtBlock(nn.Module):
    def __init__(
        self, net: _DynamicConvModel, dim: int, drop_path: float, ls_init_value: float, stage: int, index: int
    ):
        super().__init__()
        self.dynamic = net.conv_type == "kw"
        name = f"stage{stage}_layer{index}_"
        self.dwconv = net._conv(dim, dim, 7, padding=3, groups=dim, bias=True, name=name + "dwconv0")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if self.dynamic:  # KW: point-wise convs stay channels-first
            self.pwconv1 = net._conv(dim, 4 * dim, 1, bias=True, name=name + "pwconv1")
            self.pwconv2 = net._conv(4 * dim, dim, 1, bias=True, name=name + "pwconv2")
        else:
            self.pwconv1 = nn.Linear(dim, 4 * dim)
            self.pwconv2 = nn.Linear(4 * dim, dim)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        if self.dynamic:
            x = self.pwconv2(self.act(self.pwconv1(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        else:
            x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class DCConvNeXt(_DynamicConvModel):
    """ConvNeXt (Tiny by default), plain or KW; ``depth``/``embed_dim`` override stage depths and widths."""

    head_name = "head"

    def __init__(
        self,
        conv_type: str = "plain",
        num_classes: int = 1000,
        depth: Sequence[int] = (3, 3, 9, 3),
        embed_dim: Sequence[int] = (96, 192, 384, 768),
        kernel_num: int = 1,
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        sharing_range: Sequence[str] = ("layer", "pwconv"),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float = 1e-6,
        in_chans: int = 3,
        **kwargs,
    ):
        super().__init__()
        _reject_unknown(kwargs, type(self).__name__)
        if conv_type == "odconv":
            raise ValueError("ConvNeXt baselines are plain or KW (conv_type 'plain' or 'kw')")
        self._init_convs(
            conv_type, kernel_num, reduction, cell_num_ratio, sharing_range, kw_norm=nn.LayerNorm
        )
        dims = list(embed_dim)
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    self._conv(in_chans, dims[0], 4, 4, bias=True, name="stagestem_conv0"),
                    LayerNorm2d(dims[0], eps=1e-6),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    self._conv(dims[i], dims[i + 1], 2, 2, bias=True, name=f"stage{i}_layerds_conv0"),
                )
            )
        total = sum(depth)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages, cur = nn.ModuleList(), 0
        for i, n in enumerate(depth):
            self.stages.append(
                nn.Sequential(
                    *[ConvNeXtBlock(self, dims[i], rates[cur + j], ls_init_value, i, j) for j in range(n)]
                )
            )
            cur += n
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._finish_warehouses()

    def pyramid_stages(self) -> list[nn.Module]:
        return [nn.Identity()] + [nn.Sequential(d, s) for d, s in zip(self.downsample_layers, self.stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for ds, stage in zip(self.downsample_layers, self.stages):
            x = stage(ds(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.head(x)


# ------------------------------------------------------------------------------------------- registration
def _reject_unknown(kwargs: dict, cls_name: str) -> None:
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    if kwargs:
        raise TypeError(
            f"{cls_name} got unsupported argument(s) {sorted(kwargs)}; baselines accept depth, "
            "embed_dim (ResNet/ConvNeXt), width_mult (MobileNetV2), kernel_num, reduction, "
            "drop_rate, drop_path_rate"
        )


_FAMILIES = {"resnet": DCResNet, "mobilenetv2": DCMobileNetV2, "convnext": DCConvNeXt}

# model.arch -> family and constructor arguments (official settings of each variant)
BASELINE_ARCHS: dict[str, dict] = {
    "resnet50": dict(family="resnet", conv_type="plain"),
    "odconv1x_resnet50": dict(family="resnet", conv_type="odconv", kernel_num=1),
    "odconv4x_resnet50": dict(family="resnet", conv_type="odconv", kernel_num=4),
    "kw1x_resnet50": dict(family="resnet", conv_type="kw", cell_num_ratio=1),
    "kw4x_resnet50": dict(family="resnet", conv_type="kw", cell_num_ratio=4),
    "mobilenetv2_100": dict(family="mobilenetv2", conv_type="plain"),
    "odconv1x_mobilenetv2_100": dict(family="mobilenetv2", conv_type="odconv", kernel_num=1),
    "odconv4x_mobilenetv2_100": dict(family="mobilenetv2", conv_type="odconv", kernel_num=4),
    "kw1x_mobilenetv2_100": dict(
        family="mobilenetv2", conv_type="kw", cell_num_ratio=1, sharing_range=("layer", "pwconv")
    ),
    "kw4x_mobilenetv2_100": dict(
        family="mobilenetv2", conv_type="kw", cell_num_ratio=4, sharing_range=("layer",)
    ),
    "convnext_tiny": dict(family="convnext", conv_type="plain"),
    "kw1x_convnext_tiny": dict(family="convnext", conv_type="kw", cell_num_ratio=1),
}


def baseline_class(arch: str) -> type[_DynamicConvModel]:
    """The model class of a baseline ``model.arch``; a bad name lists the valid ones."""
    if arch not in BASELINE_ARCHS:
        raise ValueError(f"unknown baseline arch {arch!r}; valid: {', '.join(BASELINE_ARCHS)}")
    return _FAMILIES[BASELINE_ARCHS[arch]["family"]]


def baseline_kwargs(arch: str) -> dict:
    baseline_class(arch)
    return {k: v for k, v in BASELINE_ARCHS[arch].items() if k != "family"}


def baseline_pyramid_channels(arch: str, **overrides) -> tuple[int, ...]:
    """FPN in_channels of a baseline with ``model.overrides`` applied (e.g. ``embed_dim``, ``width_mult``)."""
    with torch.device("meta"):
        model = baseline_class(arch)(**{**baseline_kwargs(arch), **overrides}, num_classes=0)
    return model.pyramid_channels


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map official checkpoints (``module.`` prefix, ``classifier.1`` head, 4-D layer scale) to ``model``."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if k.startswith("classifier.1.") and "classifier.1." + k[13:] not in own:
            k = "classifier." + k[len("classifier.1.") :]
        if k in own and own[k].shape != v.shape and own[k].numel() == v.numel():
            v = v.reshape(own[k].shape)
        out[k] = v
    return out


def create_baseline(arch: str, pretrained: bool = False, **kwargs) -> _DynamicConvModel:
    """Build the classifier of a baseline ``model.arch`` with timm's builder (``pretrained`` needs a file)."""
    if kwargs.pop("features_only", False):
        raise ValueError("features_only is not supported; use forward_pyramid() or the MMDetection backbone")
    return build_model_with_cfg(
        baseline_class(arch),
        f"dc_{arch}",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**baseline_kwargs(arch), **kwargs},
    )


def _cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        **kwargs,
    }


_CFG_BY_FAMILY = {
    "resnet": dict(first_conv="conv1", classifier="fc"),
    "mobilenetv2": dict(first_conv="features.0.0", classifier="classifier"),
    "convnext": dict(
        first_conv="downsample_layers.0.0", classifier="head", crop_pct=0.875, interpolation="bicubic"
    ),
}
default_cfgs = generate_default_cfgs(
    {f"dc_{arch}": _cfg(**_CFG_BY_FAMILY[spec["family"]]) for arch, spec in BASELINE_ARCHS.items()}
)


@register_model
def dc_resnet50(pretrained: bool = False, **kwargs):
    """ResNet-50 (25.56M params)."""
    return create_baseline("resnet50", pretrained, **kwargs)


@register_model
def dc_odconv1x_resnet50(pretrained: bool = False, **kwargs):
    """ODConv (1x) ResNet-50 (28.64M params)."""
    return create_baseline("odconv1x_resnet50", pretrained, **kwargs)


@register_model
def dc_odconv4x_resnet50(pretrained: bool = False, **kwargs):
    """ODConv (4x) ResNet-50 (90.67M params)."""
    return create_baseline("odconv4x_resnet50", pretrained, **kwargs)


@register_model
def dc_kw1x_resnet50(pretrained: bool = False, **kwargs):
    """KernelWarehouse (1x) ResNet-50 (28.05M params)."""
    return create_baseline("kw1x_resnet50", pretrained, **kwargs)


@register_model
def dc_kw4x_resnet50(pretrained: bool = False, **kwargs):
    """KernelWarehouse (4x) ResNet-50 (102.02M params)."""
    return create_baseline("kw4x_resnet50", pretrained, **kwargs)


@register_model
def dc_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """MobileNetV2 1.0x (3.50M params)."""
    return create_baseline("mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_odconv1x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """ODConv (1x) MobileNetV2 1.0x (4.94M params)."""
    return create_baseline("odconv1x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_odconv4x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """ODConv (4x) MobileNetV2 1.0x (11.52M params)."""
    return create_baseline("odconv4x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_kw1x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """KernelWarehouse (1x) MobileNetV2 1.0x (5.17M params)."""
    return create_baseline("kw1x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_kw4x_mobilenetv2_100(pretrained: bool = False, **kwargs):
    """KernelWarehouse (4x) MobileNetV2 1.0x (11.38M params)."""
    return create_baseline("kw4x_mobilenetv2_100", pretrained, **kwargs)


@register_model
def dc_convnext_tiny(pretrained: bool = False, **kwargs):
    """ConvNeXt-Tiny (28.59M params)."""
    return create_baseline("convnext_tiny", pretrained, **kwargs)


@register_model
def dc_kw1x_convnext_tiny(pretrained: bool = False, **kwargs):
    """KernelWarehouse (1x) ConvNeXt-Tiny (39.37M params)."""
    return create_baseline("kw1x_convnext_tiny", pretrained, **kwargs)


def _register_mmdet_backbones_if_loaded() -> None:
    """When MMDetection is already imported (the finetune stage imports it before the model modules), also
    register the dense backbones, so ``import_model_modules(spec)`` suffices for ``spec.mmdet_backbone``.
    The classifier-only stages never import mmdet."""
    import sys

    if "mmdet.models" in sys.modules:
        import importlib

        importlib.import_module("overlock.detection.baseline_backbones")


_register_mmdet_backbones_if_loaded()
