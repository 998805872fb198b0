"""ContMix aggregation: natten 0.17's ``na2d_av`` (neighbourhood attention "AV") with fast PyTorch backends.

``out[b, h, i, j, :] = sum_k attn[b, h, i, j, k] * value[b, h, row(i, k // Kw), col(j, k % Kw), :]``

Window rule (natten 0.17 ``get_window_start``), per axis of length ``L``, odd kernel ``K``, dilation ``d``:
index ``i`` belongs to dilation group ``g = i % d`` whose ``n_g = ceil((L - g) / d)`` positions are
``g, g + d, ...``; its window starts at group position ``s = clamp(i // d - K // 2, 0, max(n_g - K, 0))`` and
slot ``a`` reads position ``g + (s + a) * d``. The window is clamped to stay inside the map (no zero padding).

Maps smaller than the window: natten 0.17 rejects ``H`` or ``W < K * dilation``. The official OverLoCK never
calls it there: its detection backbone first up-samples a map whose short side is below ``kernel_size``
(bilinear) and pools the result back (``DynamicConvBlock.resize_small_maps`` here); the classifier never meets
such maps at 224. This function still defines them, the natural continuation of the rule above: a group
shorter than ``K`` gets ``s = 0`` and its slots past the map edge read zeros (they contribute nothing and
their attention gradient is zero). Equivalently: zero-pad ``value`` at the bottom/right to ``K * dilation``.
Every backend, natten included, gives these results (the dispatcher pads, runs, crops).

Backends (``backend=`` keyword, else the one ``compute.configure`` set (``overlock.backends``), else the
``OVERLOCK_CONTMIX_BACKEND`` environment variable (benchmarks, unconfigured library use), else ``auto``):
  ``auto``    natten when it is installed and the tensors are on CUDA, else ``fast``;
  ``fast``    PyTorch: attention scattered into dense per-tile matrices, one batched matmul, hand-written
              backward (transposed matmuls); tile size chosen from the shape (the whole map when the window
              covers most of it). Device-agnostic and ``torch.compile``-friendly;
  ``gather``  the plain reference: index gather of every window + einsum (autograd backward);
  ``unfold``  a naive ``F.unfold`` formulation (benchmark baseline);
  ``natten``  natten 0.17.x ``natten.functional.na2d_av`` (CPU or CUDA; optional dependency);
  ``triton``  Triton kernels (``contmix_triton``): CUDA without natten; CPU only through Triton's
              interpreter (``TRITON_INTERPRET=1``, tests). Opt-in: not measured faster than ``fast`` on a GPU.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F

from overlock.backends import contmix_backend

__all__ = ["na2d_av", "BACKENDS", "BACKEND_ENV_VAR"]

BACKEND_ENV_VAR = "OVERLOCK_CONTMIX_BACKEND"
BACKENDS = ("auto", "fast", "gather", "unfold", "natten", "triton")

IntPair = Union[int, Sequence[int]]


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: IntPair, dilation: IntPair = 1, *,
            backend: str | None = None) -> torch.Tensor:
    """Neighbourhood sum: attn [B, heads, H, W, Kh*Kw], value [B, heads, H, W, C] -> [B, heads, H, W, C].

    ``kernel_size`` (odd) and ``dilation`` are ints or (rows, cols) pairs. ``backend`` overrides
    ``$OVERLOCK_CONTMIX_BACKEND``; see the module docstring for the names and the window rule.
    """
    kernel, dil = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ValueError(f"kernel_size must be odd (natten 0.17 semantics), got {kernel}")
    if attn.dim() != 5 or value.dim() != 5:
        raise ValueError(f"expected 5-D attn and value, got {tuple(attn.shape)} and {tuple(value.shape)}")
    if attn.shape[:4] != value.shape[:4] or attn.shape[4] != kernel[0] * kernel[1]:
        raise ValueError(f"attn {tuple(attn.shape)} does not match value {tuple(value.shape)}, "
                         f"kernel {kernel}")
    name = _resolve_backend(backend, value, kernel)
    if torch.is_autocast_enabled(value.device.type):  # one dtype for both operands (custom backward)
        dtype = torch.get_autocast_dtype(value.device.type)
        attn, value = attn.to(dtype), value.to(dtype)
    if attn.dtype != value.dtype:
        attn = attn.to(value.dtype)
    height, width = value.shape[2], value.shape[3]
    pad_h, pad_w = max(0, kernel[0] * dil[0] - height), max(0, kernel[1] * dil[1] - width)
    if pad_h or pad_w:  # maps smaller than the window: zero-padded value (see the module docstring)
        attn = F.pad(attn, (0, 0, 0, pad_w, 0, pad_h))
        value = F.pad(value, (0, 0, 0, pad_w, 0, pad_h))
    out = _IMPLEMENTATIONS[name](attn, value, kernel, dil)
    if pad_h or pad_w:
        out = out[:, :, :height, :width]
    return out


# ----------------------------------------------------------------------------------------------- backends

def _resolve_backend(backend: str | None, value: torch.Tensor, kernel: tuple[int, int]) -> str:
    configured = contmix_backend()
    if backend is not None:
        name, source = backend, "backend argument"
    elif configured is not None:
        name, source = configured, "compute.contmix_backend"
    else:
        name, source = os.environ.get(BACKEND_ENV_VAR, "") or "auto", f"${BACKEND_ENV_VAR}"
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown ContMix backend {name!r} (from {source}); "
                         f"valid backends: {', '.join(BACKENDS)}")
    if name == "natten":
        _natten_na2d_av()  # raises with the reason when natten cannot be used
    if name == "triton":
        from .contmix_triton import triton_error
        error = triton_error(value.device)
        if error is not None:
            raise RuntimeError(f"ContMix backend 'triton' is unavailable: {error}; "
                               f"pick one of: {', '.join(b for b in BACKENDS if b != 'triton')}")
    if name == "auto":
        use_natten = value.is_cuda and min(kernel) > 1 and _natten_error() is None
        name = "natten" if use_natten else "fast"
    return name


def _gather_av(attn, value, kernel, dilation):
    """Reference: gather every window [N, HW, K*K, C], then one einsum (autograd backward)."""
    batch, heads, height, width, channels = value.shape
    index = _cached(("window", height, width, kernel, dilation), value.device,
                    lambda: _window_index(height, width, kernel, dilation, value.device))
    windows = value.reshape(batch * heads, height * width, channels)[:, index]
    out = torch.einsum("npk,npkc->npc", attn.reshape(batch * heads, height * width, -1), windows)
    return out.reshape(batch, heads, height, width, channels)


def _unfold_av(attn, value, kernel, dilation):
    """Naive unfold: im2col of every valid window (no padding), picked per pixel by its window start."""
    batch, heads, height, width, channels = value.shape
    n = batch * heads
    cols = F.unfold(value.reshape(n, height, width, channels).permute(0, 3, 1, 2), kernel, dilation=dilation)
    valid_w = width - (kernel[1] - 1) * dilation[1]
    def build():
        rows = torch.tensor(_window_starts(height, kernel[0], dilation[0]), device=value.device)
        cols = torch.tensor(_window_starts(width, kernel[1], dilation[1]), device=value.device)
        return (rows[:, None] * valid_w + cols[None, :]).reshape(-1)
    starts = _cached(("unfold", height, width, kernel, dilation), value.device, build)
    windows = cols.view(n, channels, kernel[0] * kernel[1], -1)[..., starts]  # [N, C, K*K, HW]
    out = torch.einsum("npk,nckp->npc", attn.reshape(n, height * width, -1), windows)
    return out.reshape(batch, heads, height, width, channels)


def _fast_av(attn, value, kernel, dilation, tile: tuple[int, int] | None = None):
    """Tiled dense matmul (see ``_TiledDenseAV``); ``tile`` overrides the shape-based choice (for tuning)."""
    batch, heads, height, width, channels = value.shape
    geom, idx_local, region_idx = _plan(height, width, kernel, dilation, channels, tile, value.device)
    n = batch * heads
    out = _TiledDenseAV.apply(attn.reshape(n, height, width, -1), value.reshape(n, height, width, channels),
                              idx_local, region_idx, geom)
    return out.reshape(batch, heads, height, width, channels)


def _plan(height, width, kernel, dilation, channels, tile, device):
    """Tile choice and index tensors: cached in eager mode; while torch.compile traces, the Python planning
    runs as a constant (static shapes) or is traced and specialised (symbolic shapes)."""
    if not torch.compiler.is_compiling():
        if tile is None:
            tile = _choose_tile_cached(height, width, kernel, dilation, channels)
        key = ("tiles", height, width, kernel, dilation, tile)
        return _cached(key, device, lambda: _tile_plan(height, width, kernel, dilation, tile, device))
    static = all(isinstance(x, int) for x in (height, width, channels))
    if tile is None:
        tile = (_choose_tile_constant if static else _choose_tile)(height, width, kernel, dilation, channels)
    axis_tiles = _axis_tiles_constant if static else _axis_tiles
    return _tile_plan(height, width, kernel, dilation, tile, device, axis_tiles)


def _natten_av(attn, value, kernel, dilation):
    return _natten_na2d_av()(attn.contiguous(), value.contiguous(), kernel, dilation)


def _triton_av(attn, value, kernel, dilation):
    from .contmix_triton import triton_av
    return triton_av(attn, value, kernel, dilation)


_IMPLEMENTATIONS: dict[str, Callable] = {"fast": _fast_av, "gather": _gather_av, "unfold": _unfold_av,
                                         "natten": _natten_av, "triton": _triton_av}


# ------------------------------------------------------------------------------------------ window geometry

def _pair(x: IntPair, name: str) -> tuple[int, int]:
    pair = (int(x), int(x)) if isinstance(x, int) else tuple(int(v) for v in x)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {x!r}")
    return pair


def _window_starts(length: int, kernel: int, dilation: int) -> list[int]:
    """First position of each index's window along one axis (natten 0.17; short groups start at 0)."""
    starts = []
    for i in range(length):
        group, pos = i % dilation, i // dilation
        group_len = (length - group + dilation - 1) // dilation
        starts.append(group + dilation * min(max(pos - kernel // 2, 0), max(group_len - kernel, 0)))
    return starts


def _window_index(height, width, kernel, dilation, device) -> torch.Tensor:
    """Flat value index of every window slot, [H*W, Kh*Kw] (map at least K*dilation on each axis)."""
    rows = torch.tensor(_window_starts(height, kernel[0], dilation[0]), device=device)[:, None] \
        + torch.arange(kernel[0], device=device) * dilation[0]
    cols = torch.tensor(_window_starts(width, kernel[1], dilation[1]), device=device)[:, None] \
        + torch.arange(kernel[1], device=device) * dilation[1]
    return (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, -1)


def _axis_tiles(length: int, kernel: int, dilation: int, tile: int):
    """One axis cut into tiles of ``tile`` outputs: region size R, region starts, and each output's window
    positions relative to its tile's region ([n_tiles * tile, K]; padded outputs point at 0)."""
    starts = _window_starts(length, kernel, dilation)
    n_tiles = -(-length // tile)
    span = (kernel - 1) * dilation
    lows = [min(starts[t * tile:(t + 1) * tile]) for t in range(n_tiles)]
    highs = [max(starts[t * tile:(t + 1) * tile]) + span for t in range(n_tiles)]
    region = max(h - lo + 1 for lo, h in zip(lows, highs))
    region_starts = [min(lo, length - region) for lo in lows]
    local = [[0] * kernel for _ in range(n_tiles * tile)]
    for i, s in enumerate(starts):
        base = s - region_starts[i // tile]
        local[i] = [base + a * dilation for a in range(kernel)]
    return region, tuple(region_starts), tuple(tuple(row) for row in local)


class _Geometry(NamedTuple):
    """Static layout of the tiled dense formulation (ints and flags only)."""
    height: int
    width: int
    tile_h: int
    tile_w: int
    n_h: int
    n_w: int
    region: int  # dense columns per tile: region_h * region_w
    whole: bool  # one tile whose region is the whole map (no region gather / fold)
    identity: bool  # every tile's pixels share one window: the dense matrix is the attention itself
    save_dense: bool  # keep the dense matrix for backward (only when barely larger than attn)


def _tile_plan(height, width, kernel, dilation, tile, device, axis_tiles: Callable | None = None):
    """Geometry and index tensors of the tiled dense formulation.

    idx_local [n_tiles, P, Kh*Kw]: column of each window slot in its tile's dense [P, Rh*Rw] matrix;
    region_idx [n_tiles, Rh*Rw]: flat value index of each region position (empty when ``whole``).
    """
    axis_tiles = axis_tiles or _axis_tiles
    tile_h, tile_w = tile
    reg_h, starts_h, local_h = axis_tiles(height, kernel[0], dilation[0], tile_h)
    reg_w, starts_w, local_w = axis_tiles(width, kernel[1], dilation[1], tile_w)
    n_h, n_w = len(starts_h), len(starts_w)
    lh = torch.tensor(local_h, device=device).view(n_h, tile_h, kernel[0])
    lw = torch.tensor(local_w, device=device).view(n_w, tile_w, kernel[1])
    # [nh, nw, th, tw, kh, kw]
    idx_local = lh[:, None, :, None, :, None] * reg_w + lw[None, :, None, :, None, :]
    idx_local = idx_local.reshape(n_h * n_w, tile_h * tile_w, kernel[0] * kernel[1])
    whole = n_h == 1 and n_w == 1 and reg_h == height and reg_w == width
    if whole:
        region_idx = torch.zeros(0, dtype=torch.long, device=device)
    else:
        rows = torch.tensor(starts_h, device=device)[:, None] + torch.arange(reg_h, device=device)
        cols = torch.tensor(starts_w, device=device)[:, None] + torch.arange(reg_w, device=device)
        region_idx = (rows[:, None, :, None] * width + cols[None, :, None, :])
        region_idx = region_idx.reshape(n_h * n_w, reg_h * reg_w)
    identity = (_is_identity(local_h[:height], kernel[0]) and _is_identity(local_w[:width], kernel[1]))
    padded_pixels = n_h * tile_h * n_w * tile_w
    save_dense = padded_pixels * reg_h * reg_w <= 1.25 * height * width * kernel[0] * kernel[1]
    geom = _Geometry(height, width, tile_h, tile_w, n_h, n_w, reg_h * reg_w, whole, identity, save_dense)
    return geom, idx_local, region_idx


def _is_identity(local, kernel: int) -> bool:
    return all(tuple(row) == tuple(range(kernel)) for row in local)


def _choose_tile(height, width, kernel, dilation, channels) -> tuple[int, int]:
    """Tile size minimising a cost model per output pixel: dense columns (zero-fill, scatter, three matmuls)
    plus the value region each tile gathers, ``region * (1 + C / P)``, times the padded-output fraction;
    penalties for padding (a copy) and for tiling at all (region gather, fold, tile copies). Windows that
    cover most of the map therefore get one whole-map tile (OverLoCK stage 3 at 224: 14x14, K=13)."""
    best, best_cost = (height, width), math.inf
    for tile_h, reg_h, pad_h in _axis_candidates(height, kernel[0], dilation[0]):
        for tile_w, reg_w, pad_w in _axis_candidates(width, kernel[1], dilation[1]):
            cost = pad_h * pad_w * reg_h * reg_w * (1.0 + channels / (tile_h * tile_w))
            if pad_h * pad_w > 1.0:
                cost *= 1.15
            if (tile_h, tile_w) != (height, width):
                cost *= 1.3
            if cost < best_cost:
                best, best_cost = (tile_h, tile_w), cost
    return best


def _axis_candidates(length: int, kernel: int, dilation: int) -> list[tuple[int, int, float]]:
    """(tile, region, padded/real outputs) for the useful tile sizes along one axis."""
    starts = _window_starts(length, kernel, dilation)
    span = (kernel - 1) * dilation
    sizes = sorted(set(range(1, min(length, 3 * (span + 1)) + 1)) | {length})
    out = []
    for tile in sizes:
        chunks = [starts[t:t + tile] for t in range(0, length, tile)]
        region = max(max(c) - min(c) for c in chunks) + span + 1
        out.append((tile, region, len(chunks) * tile / length))
    return out


_choose_tile_cached = functools.lru_cache(maxsize=256)(_choose_tile)
# Evaluated once at trace time by torch.compile (their results become constants); distinct function objects
# because assume_constant_result marks the function it is given.
_choose_tile_constant = torch.compiler.assume_constant_result(lambda *args: _choose_tile(*args))
_axis_tiles_constant = torch.compiler.assume_constant_result(lambda *args: _axis_tiles(*args))


# --------------------------------------------------------------------------------------- tiled dense kernel

def _to_tiles(x: torch.Tensor, geom) -> torch.Tensor:
    """[N, H, W, F] -> [N, n_tiles, tile_h * tile_w, F] (bottom/right zero-padded to whole tiles)."""
    height, width, tile_h, tile_w, n_h, n_w = geom[:6]
    n, feat = x.shape[0], x.shape[-1]
    pad_h, pad_w = n_h * tile_h - height, n_w * tile_w - width
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = x.reshape(n, n_h, tile_h, n_w, tile_w, feat).transpose(2, 3)
    return x.reshape(n, n_h * n_w, tile_h * tile_w, feat)


def _from_tiles(x: torch.Tensor, geom) -> torch.Tensor:
    """Inverse of ``_to_tiles``: [N, n_tiles, P, F] -> [N, H, W, F] (contiguous)."""
    height, width, tile_h, tile_w, n_h, n_w = geom[:6]
    n, feat = x.shape[0], x.shape[-1]
    x = x.reshape(n, n_h, n_w, tile_h, tile_w, feat).transpose(2, 3)
    x = x.reshape(n, n_h * tile_h, n_w * tile_w, feat)
    return x[:, :height, :width].contiguous()


def _dense_tiles(attn: torch.Tensor, idx_local: torch.Tensor, geom: _Geometry) -> torch.Tensor:
    """Attention scattered into one dense [P, region] matrix per tile: [N, n_tiles, P, region]."""
    attn_t = _to_tiles(attn, geom)
    if geom.identity:
        return attn_t
    index = idx_local.expand(attn_t.shape[0], -1, -1, -1)
    return attn_t.new_zeros(attn_t.shape[:-1] + (geom.region,)).scatter_(-1, index, attn_t)


def _regions(value: torch.Tensor, region_idx: torch.Tensor, geom: _Geometry) -> torch.Tensor:
    """Value rows each tile reads, [N, n_tiles, region, C]."""
    n, channels = value.shape[0], value.shape[-1]
    flat = value.reshape(n, -1, channels)
    if geom.whole:
        return flat.unsqueeze(1)
    regions = flat.index_select(1, region_idx.reshape(-1))
    return regions.view(n, region_idx.shape[0], region_idx.shape[1], channels)


class _TiledDenseAV(torch.autograd.Function):
    """out = dense(attn) @ value per tile; backward: grad_attn = gather(grad_out @ value^T),
    grad_value = fold(dense(attn)^T @ grad_out). attn [N, H, W, K*K], value [N, H, W, C]."""

    @staticmethod
    def forward(ctx, attn, value, idx_local, region_idx, geom):
        dense = _dense_tiles(attn, idx_local, geom)
        out_t = torch.matmul(dense, _regions(value, region_idx, geom))
        ctx.save_for_backward(dense if geom.save_dense else attn, value, idx_local, region_idx)
        ctx.geom = geom
        return _from_tiles(out_t, geom)

    @staticmethod
    def backward(ctx, grad_out):
        saved, value, idx_local, region_idx = ctx.saved_tensors
        geom = ctx.geom
        grad_t = _to_tiles(grad_out, geom)  # [N, T, P, C]
        grad_attn = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_dense = torch.matmul(grad_t, _regions(value, region_idx, geom).transpose(-1, -2))
            if not geom.identity:
                grad_dense = grad_dense.gather(-1, idx_local.expand(grad_t.shape[0], -1, -1, -1))
            grad_attn = _from_tiles(grad_dense, geom)
        if ctx.needs_input_grad[1]:
            dense = saved if geom.save_dense else _dense_tiles(saved, idx_local, geom)
            grad_regions = torch.matmul(dense.transpose(-1, -2), grad_t)
            n, channels = grad_regions.shape[0], grad_regions.shape[-1]
            if geom.whole:
                grad_value = grad_regions.reshape(value.shape)
            else:
                grad_value = grad_regions.new_zeros(n, geom.height * geom.width, channels).index_add_(
                    1, region_idx.reshape(-1), grad_regions.reshape(n, -1, channels)).view(value.shape)
        return grad_attn, grad_value, None, None, None


# ----------------------------------------------------------------------------------------- caches, natten

_INDEX_CACHE: dict = {}


def _cached(key, device: torch.device, build: Callable):
    """Index tensors per (geometry, device); rebuilt inside torch.compile tracing (they become constants).
    Built as normal tensors even under ``torch.inference_mode`` (an inference tensor in the cache would break
    every later call that records autograd, e.g. Grad-CAM after a throughput measurement)."""
    if torch.compiler.is_compiling():
        return build()
    full_key = key + (str(device),)
    hit = _INDEX_CACHE.get(full_key)
    if hit is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False), torch.no_grad():
            hit = _INDEX_CACHE[full_key] = build()
    return hit


_NATTEN: dict = {}


def _natten_error() -> str | None:
    """Why natten cannot be used (None when it can). Imports it once."""
    if not _NATTEN:
        _NATTEN.update(_import_natten())
    return _NATTEN.get("error")


def _natten_na2d_av() -> Callable:
    error = _natten_error()
    if error is not None:
        raise RuntimeError(f"ContMix backend 'natten' is unavailable: {error}. "
                           f"Install it with `make natten`, "
                           f"or pick one of: {', '.join(b for b in BACKENDS if b != 'natten')}")
    return _NATTEN["na2d_av"]


def _import_natten() -> dict:
    """Import natten 0.17.x with the shims it needs on current torch and on machines without a GPU:
    ``torch.cuda._device_t`` (a type alias natten imports; removed from torch) and a device-capability
    query that natten makes at import time (it raises without a CUDA driver; answered with (0, 0) then)."""
    try:
        import importlib.metadata as metadata
        version = metadata.version("natten")
    except Exception:
        return {"error": "natten is not installed"}
    if not version.startswith("0.17."):
        return {"error": f"natten {version} is installed; the 0.17 API (natten.functional.na2d_av) is needed"}
    if not hasattr(torch.cuda, "_device_t"):
        torch.cuda._device_t = Union[torch.device, str, int, None]
    real_capability = torch.cuda.get_device_capability
    if not torch.cuda.is_available():
        torch.cuda.get_device_capability = lambda device=None: (0, 0)
    try:
        with warnings.catch_warnings():  # natten's import triggers torch's own deprecation warnings
            warnings.simplefilter("ignore", FutureWarning)
            from natten.functional import na2d_av as natten_na2d_av
    except Exception as exc:  # a broken build must not break the pure-PyTorch path
        return {"error": f"importing natten {version} failed: {type(exc).__name__}: {exc}"}
    finally:
        torch.cuda.get_device_capability = real_capability
    return {"na2d_av": natten_na2d_av, "version": version, "error": None}
