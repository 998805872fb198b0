"""Effective receptive field (ERF), as in the OverLoCK and RepLKNet papers.

For each image, the gradient of the central pixel of the last stage's feature map (summed over channels)
with respect to the input; absolute values summed over colour channels and over images, then log-scaled
(``log10(1 + x)``) and normalised to [0, 1] for the heatmap. ``high_contribution_ratio`` gives the share of
the input area that holds a fraction ``t`` of the total contribution (larger means a wider ERF).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def last_stage_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Feature map [B, C, h, w] of the last stage (OverLoCK: the Focus-Net output; timm: forward_features)."""
    out = model.forward_features(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim != 4:
        raise ValueError(
            f"{type(model).__name__}.forward_features returns shape {tuple(out.shape)}, not a "
            "[B, C, h, w] feature map: the ERF needs a convolutional last stage"
        )
    return out


def effective_receptive_field(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Summed |d centre(features) / d input| over ``images`` [N, 3, H, W]: a raw [H, W] contribution map."""
    model = model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for image in tqdm(images, desc="ERF", leave=False):
        x = image[None].clone().requires_grad_(True)
        features = last_stage_features(model, x)
        h, w = features.shape[-2:]
        features[:, :, h // 2, w // 2].sum().backward()
        total += x.grad.detach().abs().sum(dim=(0, 1)).double().cpu()
        model.zero_grad(set_to_none=True)
    return total.numpy()


def erf_heatmap_values(contribution: np.ndarray) -> np.ndarray:
    """``log10(1 + x)`` of the contribution map, normalised to [0, 1] (the paper's visualisation)."""
    scaled = np.log10(contribution / max(contribution.max(), 1e-12) * 1e3 + 1)  # scale-free before the log
    return scaled / max(scaled.max(), 1e-12)


def high_contribution_ratio(contribution: np.ndarray, threshold: float) -> float:
    """Smallest fraction of input pixels whose contributions sum to ``threshold`` of the total."""
    values = np.sort(contribution.ravel())[::-1]
    cumulative = np.cumsum(values) / max(values.sum(), 1e-12)
    return float((np.searchsorted(cumulative, threshold) + 1) / values.size)
