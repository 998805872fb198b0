"""Grad-CAM maps (``pytorch_grad_cam.GradCAM``) on the last stage of the classifier."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def last_spatial_layer(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """The module of the last stage whose output is the final spatial map (before global pooling).

    timm models name it in ``feature_info``; otherwise (OverLoCK) it is the last module producing a 4-D
    tensor with spatial size > 1 in a forward pass.
    """
    info = getattr(model, "feature_info", None)
    if info:
        entry = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        modules = dict(model.named_modules())
        if entry.get("module") in modules:
            return modules[entry["module"]]
    seen: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: (
                seen.append(m)
                if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[-1] * o.shape[-2] > 1
                else None
            )
        )
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model.eval()(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no spatial feature map for Grad-CAM")
    return seen[-1]


def gradcam_maps(model: nn.Module, images: torch.Tensor, targets: list[int] | None = None) -> np.ndarray:
    """Grad-CAM heatmaps [N, H, W] in [0, 1] for ``images`` (for the predicted class unless ``targets``)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = last_spatial_layer(model, images)
    cam_targets = [ClassifierOutputTarget(t) for t in targets] if targets is not None else None
    with GradCAM(model=model.eval(), target_layers=[layer]) as cam:
        return cam(input_tensor=images, targets=cam_targets)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RGB float image [H, W, 3] in [0, 1] with the heatmap blended on top (grad-cam's colouring)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(
        np.clip(image, 0, 1).astype(np.float32), heatmap, use_rgb=True, image_weight=0.55
    )
