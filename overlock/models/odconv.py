"""Omni-dimensional dynamic convolution (ODConv; Li, Zhou, Yao, ICLR 2022).

An ``ODConv2d`` holds ``kernel_num`` static kernels. A small attention head (global average pool ->
1x1 conv to ``max(in * reduction, 16)`` channels -> BN -> ReLU) predicts four attentions per sample:

* channel attention over the input channels (sigmoid),
* filter attention over the output channels (sigmoid; skipped for depth-wise convolutions),
* spatial attention over the ``k x k`` kernel positions (sigmoid; skipped for 1x1 kernels),
* kernel attention over the ``kernel_num`` kernels (softmax; skipped when ``kernel_num == 1``).

Every logit is divided by a temperature before its sigmoid/softmax. Training anneals it from 30 to 1
over the first epochs (``overlock.models.baselines.anneal_temperature``); a freshly built module uses the
final value 1, so evaluation and fine-tuning need no call. Parameter names follow the official release
(``weight``, ``attention.fc``/``bn``/``channel_fc``/``filter_fc``/``spatial_fc``/``kernel_fc``), so its
checkpoints load unchanged.

Forward: large output maps apply each sample's aggregated kernel in one grouped convolution (the batch as
extra groups); small maps (<= ``UNFOLD_MAX_POSITIONS``) use the equivalent unfold + shared-GEMM form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ODConv2d", "ODConvAttention", "normalize_attention_hidden"]

ODCONV_MIN_ATTENTION_CHANNELS = 16
# Output maps up to this many positions use the unfold + shared-GEMM form of ``ODConv2d.forward`` (equal
# result; on CPU 2-20x faster than per-sample kernels for deep, small maps, slower for large ones).
UNFOLD_MAX_POSITIONS = 64


def per_sample_conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Convolve each sample with its own kernel: ``weight`` [B, out, in // groups, kh, kw].

    One grouped convolution does it: the batch becomes extra groups.
    """
    b, in_planes, h, w = x.shape
    out_planes = weight.shape[1]
    out = F.conv2d(x.reshape(1, b * in_planes, h, w), weight.reshape(b * out_planes, *weight.shape[2:]), None,
                   stride, padding, dilation, groups * b)
    return out.view(b, out_planes, out.shape[-2], out.shape[-1])


def normalize_attention_hidden(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Apply an attention head's norm; a BatchNorm meeting a single pooled sample in training (a last batch
    of one) uses its running statistics instead of failing on a one-value batch."""
    if norm.training and h.shape[0] == 1 and isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(
            h, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
        )
    return norm(h)


class ODConvAttention(nn.Module):
    """The four ODConv attentions of one layer; a skipped attention is returned as the scalar 1.0."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        min_channels: int = ODCONV_MIN_ATTENTION_CHANNELS,
    ):
        super().__init__()
        hidden = max(int(in_planes * reduction), min_channels)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(hidden, in_planes, 1, bias=True)
        depthwise = in_planes == groups == out_planes
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_planes, 1, bias=True)
        self.spatial_fc = (
            None if kernel_size == 1 else nn.Conv2d(hidden, kernel_size * kernel_size, 1, bias=True)
        )
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_temperature(self, temperature: float) -> None:
        """Divide every attention logit by ``temperature`` (>= 1 while annealing, 1 afterwards)."""
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor):
        """Return (channel, filter, spatial, kernel) attentions shaped to broadcast in ``ODConv2d``."""
        b = x.shape[0]
        h = self.relu(normalize_attention_hidden(self.bn, self.fc(F.adaptive_avg_pool2d(x, 1))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(h).view(b, -1, 1, 1) / t)
        filt = 1.0 if self.filter_fc is None else torch.sigmoid(self.filter_fc(h).view(b, -1, 1, 1) / t)
        if self.spatial_fc is None:
            spatial = 1.0
        else:
            k = self.kernel_size
            spatial = torch.sigmoid(self.spatial_fc(h).view(b, 1, 1, 1, k, k) / t)
        kernel = (
            1.0
            if self.kernel_fc is None
            else torch.softmax(self.kernel_fc(h).view(b, -1, 1, 1, 1, 1) / t, dim=1)
        )
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """Drop-in ``nn.Conv2d`` replacement (no bias) with omni-dimensional dynamic kernels."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
    ):
        super().__init__()
        if in_planes % groups or out_planes % groups:
            raise ValueError(
                f"ODConv2d: in_planes={in_planes} and out_planes={out_planes} must be divisible "
                f"by groups={groups}"
            )
        if kernel_num < 1:
            raise ValueError(f"ODConv2d: kernel_num must be >= 1, got {kernel_num}")
        self.in_planes, self.out_planes = in_planes, out_planes
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.groups, self.kernel_num = groups, kernel_num
        self.attention = ODConvAttention(
            in_planes, out_planes, kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num
        )
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size)
        )
        for i in range(kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, kernel_num={self.kernel_num}"
        )

    def set_temperature(self, temperature: float) -> None:
        self.attention.set_temperature(temperature)

    def _mix_kernels(self, spatial, kernel, b: int) -> torch.Tensor:
        """``sum_n kernel[b, n] * W_n * spatial[b]`` as one matmul: the spatial attention does not depend on
        ``n``, so the ``(B, n, out, in, k, k)`` product of the naive form is never materialised."""
        k = self.kernel_size
        if isinstance(kernel, float):
            w = self.weight[0].unsqueeze(0).expand(b, *self.weight.shape[1:])
        else:
            w = (kernel.view(b, self.kernel_num) @ self.weight.view(self.kernel_num, -1)).view(
                b, *self.weight.shape[1:]
            )
        return w if isinstance(spatial, float) else w * spatial.view(b, 1, 1, k, k)

    def aggregated_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample kernels ``(B, out, in/groups, k, k)`` this layer applies to ``x`` (for inspection).

        Channel and filter attentions scale the input and output in ``forward``; here they are folded into
        the kernel so the result is the full effective kernel.
        """
        channel, filt, spatial, kernel = self.attention(x)
        b = x.shape[0]
        w = self._mix_kernels(spatial, kernel, b)
        cin = self.in_planes // self.groups
        ch = channel.view(b, self.groups, 1, cin).expand(b, self.groups, self.out_planes // self.groups, cin)
        w = w * ch.reshape(b, self.out_planes, cin, 1, 1)
        if not isinstance(filt, float):
            w = w * filt.view(b, self.out_planes, 1, 1, 1)
        return w

    def _forward_unfold(self, x: torch.Tensor, spatial, kernel, ho: int, wo: int) -> torch.Tensor:
        """Same result for small outputs: the spatial attention scales the unfolded input patches, then the
        ``kernel_num`` static kernels run as one shared GEMM and the kernel attention mixes their outputs.
        No per-sample kernel (nor its gradient) is materialised, which dominates on small, deep maps."""
        b, c = x.shape[:2]
        k, n, o = self.kernel_size, self.kernel_num, self.out_planes
        cols = F.unfold(x, k, self.dilation, self.padding, self.stride)  # (B, C*k*k, L)
        if not isinstance(spatial, float):
            cols = (cols.view(b, c, k * k, -1) * spatial.view(b, 1, k * k, 1)).view(b, c * k * k, -1)
        y = torch.matmul(self.weight.view(n * o, c * k * k), cols)  # (B, n*out, L)
        if not isinstance(kernel, float):
            y = (y.view(b, n, o, -1) * kernel.view(b, n, 1, 1)).sum(1)
        return y.view(b, o, ho, wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, filt, spatial, kernel = self.attention(x)
        x = x * channel  # scaling the input equals scaling the kernel's input channels, and is cheaper
        if self.kernel_num == 1 and self.kernel_size == 1:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
            return out * filt
        b, _, h, w = x.shape
        k, d = self.kernel_size, self.dilation
        ho = (h + 2 * self.padding - d * (k - 1) - 1) // self.stride + 1
        wo = (w + 2 * self.padding - d * (k - 1) - 1) // self.stride + 1
        if self.groups == 1 and ho * wo <= UNFOLD_MAX_POSITIONS:
            return self._forward_unfold(x, spatial, kernel, ho, wo) * filt
        weight = self._mix_kernels(spatial, kernel, b).reshape(
            b, self.out_planes, self.in_planes // self.groups, self.kernel_size, self.kernel_size
        )
        out = per_sample_conv2d(x, weight, self.stride, self.padding, self.dilation, self.groups)
        return out * filt
