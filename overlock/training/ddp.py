"""Gradients laid out as DDP's buckets expect: no "Grad strides do not match bucket view strides" copies.

What PyTorch checks: DDP's reducer builds each parameter's bucket view with the parameter's exact strides
(when it is dense) and, for every gradient, compares ``grad.strides() == bucket_view.strides()`` exactly;
on a mismatch it warns once and copies the gradient into the bucket on every step. Autograd's
AccumulateGrad keeps the gradient a convolution backward produced when it obeys the layout contract,
which ignores the strides of size-1 dimensions. For a parameter with a size-1 dimension the two layouts
differ only there: a pointwise conv weight ``[420, 1008, 1, 1]`` is the same memory with strides
``(1008, 1, 1, 1)`` (the parameter, contiguous) or ``(1008, 1, 1008, 1008)`` (the gradient a channels_last
backward makes), a depth-wise weight ``[96, 1, 3, 3]`` with ``(9, 9, 3, 1)`` or ``(9, 1, 3, 1)``. Which one
the backward produces depends on the op and the device (oneDNN, cuDNN), so no choice of parameter strides
fits all. ``align_grad_strides`` instead gives each such gradient the parameter's strides as it arrives:
a zero-copy ``as_strided`` view (same memory, only the strides of size-1 dimensions change).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["align_grad_strides", "same_memory_layout"]


def same_memory_layout(size, strides_a, strides_b) -> bool:
    """Whether two stride tuples address the same memory for ``size`` (they differ only at size-1 dims)."""
    return all(a == b or n == 1 for n, a, b in zip(size, strides_a, strides_b))


def align_grad_strides(model: nn.Module) -> int:
    """Register, on every parameter with a size-1 dimension, a gradient hook that returns the incoming
    gradient re-strided (a view, no copy) to the parameter's strides when only size-1 strides differ (and
    that removes itself after a first gradient that needs nothing). Call before or after wrapping in DDP;
    returns the number of parameters hooked (idempotent)."""
    hooked = 0
    for param in model.parameters():
        if not param.requires_grad or 1 not in param.shape:
            continue
        if not getattr(param, "_overlock_grad_strides_hooked", False):
            _register(param)
            param._overlock_grad_strides_hooked = True
        hooked += 1
    return hooked


def _register(param: torch.Tensor) -> None:
    """The hook removes itself when the first gradient already has the parameter's strides (most do), so
    that only the parameters whose backward picks the other layout pay a Python call per step."""
    state = {"first": True}

    def hook(grad: torch.Tensor):
        strides = param.stride()
        if grad.layout != torch.strided or grad.shape != param.shape:
            return None
        if grad.stride() == strides:
            if state["first"]:
                handle.remove()
            return None
        state["first"] = False
        if not same_memory_layout(grad.shape, grad.stride(), strides):
            return None
        return grad.as_strided(grad.shape, strides, grad.storage_offset())
    handle = param.register_hook(hook)
