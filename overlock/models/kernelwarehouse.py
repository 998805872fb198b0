"""KernelWarehouse dynamic convolution (KW; Li & Yao, ICML 2024).

A network's convolutions are grouped into *warehouses* (``sharing_range`` fuses layer names, e.g. all
convolutions of one stage). Each layer's static kernel is split into equal *kernel cells* (output and input
channels cut at the greatest common divisor of the warehouse's layers, spatially cut into 1x1 cells), and the
warehouse stores ``cell_num_ratio`` times as many cells as its layers need (1x: same budget as the static
network, 4x: four times). Every cell of a layer is assembled per sample as a linear mixture of *all* the
warehouse's cells, weighted by that layer's attention (the paper's NAF: a linear head whose outputs per
mixture are divided by their absolute sum, plus one extra "zero cell" slot).

Temperature: attentions are blended with a fixed one-hot initialisation (each mixture starts on "its own"
cell) as ``(1 - t) * attention + t * one_hot``; training anneals ``t`` from 1 to 0 over the first epochs
(``overlock.models.baselines.anneal_temperature``). A freshly built layer uses the final ``t = 0``.

Usage::

    manager = WarehouseManager(reduction=0.0625, cell_num_ratio=1, sharing_range=("layer", "conv"))
    conv = manager.reserve(64, 64, 3, padding=1, bias=False, warehouse_name="stage0_layer1_conv1")
    ...                                   # reserve all layers while building the network
    manager.store(); manager.allocate(network)

Parameter names follow the official release (``warehouse_manager.weights.<i>``, ``attention.fc1``/``norm1``/
``fc2``), so its checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .odconv import normalize_attention_hidden, per_sample_conv2d

__all__ = ["KWAttention", "KWConv2d", "WarehouseManager"]

KW_MIN_ATTENTION_CHANNELS = 16
_NORMALIZE_EPS = 1e-3


def _per_warehouse(value, n: int, name: str) -> list:
    """A scalar for every warehouse, or one value per warehouse."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * n
        if len(value) != n:
            raise ValueError(f"{name} needs 1 or {n} values (one per warehouse), got {len(value)}")
        return list(value)
    return [value] * n


class KWAttention(nn.Module):
    """Per-sample attention of a layer's ``num_mixtures`` kernel cells over its warehouse's ``num_cells``."""

    def __init__(
        self,
        in_planes: int,
        reduction: float,
        num_cells: int,
        num_mixtures: int,
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
    ):
        super().__init__()
        hidden = max(int(in_planes * reduction), KW_MIN_ATTENTION_CHANNELS)
        self.slots = num_cells + 1  # the warehouse's cells plus one "zero cell"
        self.num_mixtures = num_mixtures
        self.fc1 = nn.Linear(in_planes, hidden, bias=norm_layer is not nn.BatchNorm1d)
        self.norm1 = norm_layer(hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, self.slots * num_mixtures, bias=True)
        self.register_buffer("temp_bias", torch.zeros(self.slots * num_mixtures), persistent=False)
        self.temperature = 0.0
        for m in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_temperature(self, temperature: float) -> None:
        """Weight of the one-hot initial assignment in the attention (1 at the start of training, then 0)."""
        self.temperature = float(temperature)

    def assign_cells(self, start: int, cells_per_mixture: float) -> int:
        """Point each mixture's initial one-hot at its own warehouse cell(s); return the next free cell."""
        self.temp_bias.zero_()
        if cells_per_mixture >= 1.0:
            step = int(cells_per_mixture)
            for m in range(self.num_mixtures):
                self.temp_bias[m * self.slots + start] = 1.0
                start += step
            return start
        share = int(
            round(1.0 / cells_per_mixture)
        )  # several mixtures share one cell: the others start at zero
        for m in range(self.num_mixtures):
            if m % share == (m // share) % share:
                self.temp_bias[m * self.slots + start] = 1.0
                start += 1
            else:
                self.temp_bias[m * self.slots + self.slots - 1] = 1.0
        return start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B * num_mixtures, num_cells)`` mixing weights for input ``x`` of shape ``(B, C, H, W)``."""
        h = self.act1(normalize_attention_hidden(self.norm1, self.fc1(x.flatten(2).mean(-1))))
        logits = self.fc2(h).view(x.shape[0], self.num_mixtures, self.slots)
        att = logits / (logits.abs().sum(-1, keepdim=True) + _NORMALIZE_EPS)
        t = self.temperature
        if t != 0.0:
            att = (1.0 - t) * att + t * self.temp_bias.view(1, self.num_mixtures, self.slots).to(att.dtype)
        return att[..., :-1].reshape(-1, self.slots - 1)


class KWConv2d(nn.Module):
    """A 2-D convolution whose kernel is assembled per sample from its warehouse (``WarehouseManager``)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        warehouse_id: int = 0,
        warehouse_manager: "WarehouseManager | None" = None,
    ):
        super().__init__()
        self.in_planes, self.out_planes, self.groups = in_planes, out_planes, groups
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.bias = nn.Parameter(torch.zeros(out_planes)) if bias else None
        self.warehouse_id = warehouse_id
        # a list, so the shared manager (registered once on the network) is not a child of every layer
        self._manager = [warehouse_manager]
        self.attention: KWAttention | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, warehouse={self.warehouse_id}"
        )

    def bind(
        self,
        cells: torch.Tensor,
        start: int,
        reduction: float,
        cells_per_mixture: float,
        norm_layer: type[nn.Module],
    ) -> int:
        """Create this layer's attention over the warehouse ``cells``; return the next free cell index."""
        self.cell_shape = tuple(cells.shape)  # (num_cells, cell_out, cell_in, cell_kh, cell_kw)
        self.groups_out = self.out_planes // self.cell_shape[1]
        self.groups_in = self.in_planes // self.groups // self.cell_shape[2]
        self.groups_spatial = (self.kernel_size[0] // self.cell_shape[3]) * (
            self.kernel_size[1] // self.cell_shape[4]
        )
        mixtures = self.groups_out * self.groups_in * self.groups_spatial
        self.attention = KWAttention(
            self.in_planes, reduction, self.cell_shape[0], mixtures, norm_layer=norm_layer
        )
        return self.attention.assign_cells(start, cells_per_mixture)

    def set_temperature(self, temperature: float) -> None:
        self.attention.set_temperature(temperature)

    def _assemble(self, x: torch.Tensor) -> torch.Tensor:
        att = self.attention(x)
        cells = self._manager[0].cells(self.warehouse_id)
        mixed = att @ cells.reshape(cells.shape[0], -1).to(att.dtype)
        b = x.shape[0]
        _, co, ci, ckh, ckw = self.cell_shape
        mixed = mixed.view(b, self.groups_spatial, self.groups_out, self.groups_in, co, ci, ckh, ckw)
        # -> (B, out = groups_out * co, in = groups_in * ci, spatial cells, cell kh, cell kw)
        mixed = mixed.permute(0, 2, 4, 3, 5, 1, 6, 7)
        return mixed.reshape(b, self.out_planes, self.in_planes // self.groups, *self.kernel_size)

    def aggregated_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample kernels ``(B, out, in/groups, kh, kw)`` this layer applies to ``x``."""
        return self._assemble(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        weight = self._assemble(x).reshape(b, self.out_planes, self.in_planes // self.groups, *self.kernel_size)
        out = per_sample_conv2d(x, weight, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class WarehouseManager(nn.Module):
    """Collects the layers of a network, then creates and shares their warehouses.

    Args:
        reduction: attention hidden width as a fraction of the input channels (min 16).
        cell_num_ratio: warehouse cells / cells the layers need (1 -> "KW 1x", 4 -> "KW 4x").
        cell_inplane_ratio, cell_outplane_ratio: cell channels relative to the warehouse's channel gcd.
        sharing_range: name parts that are fused, e.g. ``("layer", "conv")`` maps ``stage1_layer3_conv2`` to
            the warehouse ``stage1_layer_conv``.
        norm_layer: normalisation inside the attention (BatchNorm1d; LayerNorm for ConvNeXt).
        spatial_partition: cut kernels into 1x1 spatial cells.
    All ratios may be a scalar or one value per warehouse.
    """

    def __init__(
        self,
        reduction=0.0625,
        cell_num_ratio=1.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range: Sequence[str] = (),
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
        spatial_partition=True,
    ):
        super().__init__()
        self.reduction = reduction
        self.cell_num_ratio = cell_num_ratio
        self.cell_inplane_ratio = cell_inplane_ratio
        self.cell_outplane_ratio = cell_outplane_ratio
        self.sharing_range = tuple(sharing_range)
        self.norm_layer = norm_layer
        self.spatial_partition = spatial_partition
        self.layer_shapes: dict[str, list[tuple[int, ...]]] = {}
        self.weights = nn.ParameterList()

    def warehouse_key(self, layer_name: str) -> str:
        """Map ``layer_name`` to its warehouse: parts starting with a ``sharing_range`` entry are fused."""
        parts = []
        for part in layer_name.split("_"):
            for shared in self.sharing_range:
                if part.startswith(shared):
                    part = shared
            parts.append(part)
        return "_".join(parts)

    def reserve(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size=1,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        warehouse_name: str = "default",
        enabled: bool = True,
    ) -> nn.Module:
        """A ``KWConv2d`` registered in the warehouse of ``warehouse_name`` (``nn.Conv2d`` if not enabled)."""
        if not enabled:
            return nn.Conv2d(
                in_planes,
                out_planes,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
            )
        if len(self.weights):
            raise RuntimeError("WarehouseManager.reserve() after store(): reserve every layer first")
        key = self.warehouse_key(warehouse_name)
        ks = nn.modules.utils._pair(kernel_size)
        self.layer_shapes.setdefault(key, []).append((out_planes, in_planes // groups, *ks))
        return KWConv2d(
            in_planes,
            out_planes,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            warehouse_id=list(self.layer_shapes).index(key),
            warehouse_manager=self,
        )

    def store(self) -> None:
        """Create one parameter per warehouse: ``(cells, cell_out, cell_in, cell_kh, cell_kw)``."""
        n = len(self.layer_shapes)
        self._reduction = _per_warehouse(self.reduction, n, "reduction")
        self._num_ratio = _per_warehouse(self.cell_num_ratio, n, "cell_num_ratio")
        in_ratio = _per_warehouse(self.cell_inplane_ratio, n, "cell_inplane_ratio")
        out_ratio = _per_warehouse(self.cell_outplane_ratio, n, "cell_outplane_ratio")
        partition = _per_warehouse(self.spatial_partition, n, "spatial_partition")
        for idx, (key, shapes) in enumerate(self.layer_shapes.items()):
            out_gcd = math.gcd(*[s[0] for s in shapes])
            in_gcd = math.gcd(*[s[1] for s in shapes])
            if not partition[idx] and len({s[2:] for s in shapes}) > 1:
                raise ValueError(f"warehouse {key!r}: kernel sizes differ, so spatial_partition must be True")
            cell_in = max(int(in_gcd * in_ratio[idx]), 1)
            cell_out = max(int(out_gcd * out_ratio[idx]), 1)
            cell_k = (1, 1) if partition[idx] else shapes[0][2:]
            mixtures = sum(
                (o // cell_out) * (i // cell_in) * (kh // cell_k[0]) * (kw // cell_k[1])
                for o, i, kh, kw in shapes
            )
            num_cells = max(int(mixtures * self._num_ratio[idx]), 1)
            self.weights.append(nn.Parameter(torch.empty(num_cells, cell_out, cell_in, *cell_k)))

    @torch.no_grad()
    def allocate(self, network: nn.Module) -> None:
        """Bind every ``KWConv2d`` of ``network`` to its warehouse and initialise the cells it starts on."""
        next_cell = [0] * len(self.weights)
        for layer in network.modules():
            if not isinstance(layer, KWConv2d) or layer._manager[0] is not self:
                continue
            wid = layer.warehouse_id
            start = next_cell[wid]
            end = layer.bind(
                self.weights[wid], start, self._reduction[wid], self._num_ratio[wid], self.norm_layer
            )
            fan_out = layer.out_planes * layer.kernel_size[0] * layer.kernel_size[1] // layer.groups
            self.weights[wid][start:end].normal_(0.0, math.sqrt(2.0 / fan_out))
            next_cell[wid] = end
        for wid, used in enumerate(next_cell):
            if used != self.weights[wid].shape[0]:
                raise RuntimeError(
                    f"warehouse {wid}: {used} cells assigned but {self.weights[wid].shape[0]} "
                    "stored; was a reserved layer left out of the network?"
                )

    def cells(self, warehouse_id: int) -> torch.Tensor:
        return self.weights[warehouse_id]
