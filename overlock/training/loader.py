"""The training input pipeline sized for real runs: DataLoader settings from the CPUs a worker has, and a
faster decode + random-resized-crop in front of timm's own augmentation.

:func:`loader_settings` turns the CPUs of a Ray worker (``pretrain.cpus_per_worker``) into loader
processes, pinned memory, persistent workers and prefetch. :class:`DecodeCropTransform` runs a timm training
transform (as :func:`overlock.training.recipe.build_transforms` builds it) from the image *file*: it draws the
crop, interpolation and flip exactly as timm does (same calls, same order, same random streams), then decodes
RGB JPEGs with libjpeg-turbo (``torchvision.io.decode_jpeg``) — or, when the crop is at least twice the
output size, straight to a reduced size (PIL ``Image.draft``: the JPEG's DCT scaling) — and crops and
resizes the uint8 tensor with antialiasing (PIL-equivalent filters). RandAugment (or colour jitter),
normalisation and random erasing are timm's own objects; the loader processes send uint8 images and
:meth:`DecodeCropTransform.on_device` normalises and erases the batch where it is (as timm's prefetcher does).
Per CPU core this loads ~1.25-1.35x the images of timm's own loader, ~1.4x counting only the CPU work a GPU
run leaves on the CPU (``benchmarks/data_loading.py``, ``benchmarks/RESULTS.md``: decoding and RandAugment's PIL
ops, the same on both sides, set the floor), with the same augmentation distribution; pixels differ from the PIL
path by resize rounding only (``tests/test_real_size_recipe.py``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

#: loader processes per GPU worker when nothing else is known (the official scripts use 8-10)
DEFAULT_GPU_CPUS = 10
#: CPUs kept for the training process itself (it drives the device, runs mixup and the optimizer)
MAIN_PROCESS_CPUS = 1


def loader_settings(cpus: float, device: str | torch.device, num_workers: int | None = None,
                    prefetch_factor: int = 4, persistent: bool = True) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for a training process that owns ``cpus`` CPUs.

    ``num_workers`` None: every CPU but :data:`MAIN_PROCESS_CPUS` becomes a loader process (0 with a single
    CPU: loading then runs in the training process). Pinned memory only for CUDA (page-locked host batches make
    the copy asynchronous); persistent workers (unless ``persistent`` is False: a single pass) and
    ``prefetch_factor`` batches per worker when there are workers.
    """
    workers = max(0, int(math.floor(cpus)) - MAIN_PROCESS_CPUS) if num_workers is None else int(num_workers)
    cuda = torch.device(device).type == "cuda"
    settings: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda, "persistent_workers": persistent and workers > 0}
    if workers > 0:
        settings["prefetch_factor"] = prefetch_factor
    return settings


def default_cpus_per_worker(gpus_per_worker: float, cluster: dict[str, float] | None = None) -> float:
    """``pretrain.cpus_per_worker`` when unset: 1 on CPU runs; on GPU runs the cluster's CPUs per GPU times the
    worker's GPUs (so every worker fits), capped at :data:`DEFAULT_GPU_CPUS` per GPU; that cap without a cluster.
    """
    if gpus_per_worker <= 0:
        return 1.0
    per_gpu = float(DEFAULT_GPU_CPUS)
    if cluster and cluster.get("GPU", 0) > 0 and cluster.get("CPU", 0) > 0:
        per_gpu = min(per_gpu, math.floor(cluster["CPU"] / cluster["GPU"]))
    return max(1.0, math.floor(per_gpu * gpus_per_worker))


# ------------------------------------------------------------------------------------ the faster decode
def _reduced_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that keeps the crop at least the output size."""
    scale = 1
    while scale < 8 and crop_h >= 2 * scale * out_h and crop_w >= 2 * scale * out_w:
        scale *= 2
    return scale


class DecodeCropTransform:
    """A timm training transform (``Compose``) run from the image file with a faster decode and crop.

    ``plain`` must start with timm's ``RandomResizedCropAndInterpolation`` (optionally followed by
    ``RandomHorizontalFlip``), then PIL ops (RandAugment / colour jitter), ``ToTensor``, ``Normalize`` and an
    optional ``RandomErasing``. Called with a path, it returns the augmented uint8 image (H, W, C): loader
    processes send a quarter of the bytes of a float image, and no pass reorders the channels. :meth:`on_device`
    then makes the float (N, C, H, W) batch, normalises it and applies the random erasing where the batch is (the
    GPU in a real run), as timm's prefetcher does.
    """

    reads_files = True  # ClassificationDataset passes the path instead of a decoded image

    def __init__(self, plain):
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms as T
        steps = list(plain.transforms)
        if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
            raise ValueError(f"DecodeCropTransform needs a transform starting with RandomResizedCropAndInterpolation, "
                             f"got {steps[:1]}")
        self.crop = steps.pop(0)
        self.flip = steps.pop(0) if steps and isinstance(steps[0], T.RandomHorizontalFlip) else None
        tensor_at = next((k for k, t in enumerate(steps) if type(t).__name__ in ("MaybeToTensor", "ToTensor")), None)
        if tensor_at is None or tensor_at + 1 >= len(steps) or not isinstance(steps[tensor_at + 1], T.Normalize):
            raise ValueError(f"DecodeCropTransform needs ToTensor + Normalize after the PIL ops, got {steps}")
        self.pil_ops = steps[:tensor_at]
        norm = steps[tensor_at + 1]
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32).clone().view(-1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.as_tensor(norm.std, dtype=torch.float32).clone().view(-1, 1, 1) * 255.0)
        self.tensor_ops = steps[tensor_at + 2:]  # random erasing (works on the normalised tensor)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop={self.crop}, flip={self.flip}, pil_ops={self.pil_ops}, "
                f"tensor_ops={self.tensor_ops})")

    def on_device(self, images: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
        """The normalised float32 (N, C, H, W) batch of a uint8 (N, H, W, C) batch where it is, then the
        per-image random erasing."""
        x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=memory_format)
        x.sub_(self.mean.to(x.device)).mul_(self.inv_std.to(x.device))
        for op in self.tensor_ops:
            if hasattr(op, "device"):  # timm RandomErasing draws its noise on op.device
                op.device = x.device
            x = op(x)
        return x

    def draw(self, img: Image.Image) -> tuple[tuple[int, int, int, int], Any, bool]:
        """timm's draws for ``img`` (an opened, not yet decoded image): crop (i, j, h, w), interpolation, flip."""
        import random
        box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)  # reads only img.size
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)
        return box, interp, flip

    def crop_resize(self, im: Image.Image, path: str, box, interp) -> torch.Tensor:
        """The crop ``box`` (i, j, h, w) of ``im`` (opened from ``path``) resized to the output size: uint8 HWC."""
        from torchvision.io import decode_jpeg
        from torchvision.transforms import InterpolationMode
        i, j, h, w = box
        out_h, out_w = self.crop.size
        plain_jpeg = im.format == "JPEG" and im.mode == "RGB"
        scale = _reduced_scale(h, w, out_h, out_w) if plain_jpeg else 1
        if scale > 1:  # decode straight to 1/scale (DCT scaling); the crop stays >= the output size
            full_w, full_h = im.size
            im.draft("RGB", (math.ceil(full_w / scale), math.ceil(full_h / scale)))
            sx, sy = im.size[0] / full_w, im.size[1] / full_h
            small = im.convert("RGB").resize((out_w, out_h), _pil_filter(interp),
                                              box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))
            return torch.from_numpy(np.asarray(small).copy())
        if plain_jpeg:  # decode_jpeg returns a channels-last (HWC) buffer: no copies until the resize
            with open(path, "rb") as fh:
                chw = decode_jpeg(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8))
        else:  # grayscale, CMYK, PNG...: PIL's conversion to RGB, as the plain path does
            chw = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # writable
        region = chw[None, :, i:i + h, j:j + w].contiguous(memory_format=torch.channels_last)  # HWC rows: cheap
        mode = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}.get(interp)
        if mode is None:
            raise ValueError(f"DecodeCropTransform supports bilinear and bicubic crops, not {interp}")
        out = torch.nn.functional.interpolate(region, size=(out_h, out_w), mode=mode, antialias=True,
                                              align_corners=False)
        return out[0].permute(1, 2, 0)  # channels-last in, channels-last out: a contiguous HWC image

    def decode_crop(self, path: str) -> torch.Tensor:
        """The image at ``path`` decoded, randomly cropped, resized and flipped: uint8 HWC (before the PIL ops)."""
        with Image.open(path) as im:
            box, interp, flip = self.draw(im)
            hwc = self.crop_resize(im, path, box, interp)
        return hwc.flip(1) if flip else hwc

    def __call__(self, path: str) -> torch.Tensor:
        hwc = self.decode_crop(path)
        if self.pil_ops:
            img = Image.fromarray(np.ascontiguousarray(hwc.numpy()))
            for op in self.pil_ops:
                img = op(img)
            hwc = torch.from_numpy(np.array(img))
        return hwc.contiguous()


def _pil_filter(interp) -> int:
    from torchvision.transforms import InterpolationMode
    return {InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
            InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.LANCZOS: Image.LANCZOS}[interp]


def worker_cpu_count() -> int:
    """CPUs this process may use (its affinity mask; ``os.cpu_count`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_cpus(p) -> float:
    """The CPUs of this training process: ``pretrain.cpus_per_worker``, else what Ray assigned to this worker
    (:func:`default_cpus_per_worker` on the driver), else 1."""
    if p.cpus_per_worker:
        return float(p.cpus_per_worker)
    try:
        import ray
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU") if ray.is_initialized() else None
    except Exception:  # not in a Ray worker
        assigned = None
    return float(assigned or 1.0)
