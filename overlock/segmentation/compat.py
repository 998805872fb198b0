"""mmsegmentation 0.30 shims for CPU (gloo) distributed training, as ``overlock.compat`` does for mmdet.

``mmseg.utils.build_ddp`` accepts GPU-like devices only and the distributed sampler broadcasts its seed
through a CUDA tensor; with these, ``train_segmentor(distributed=True)`` also runs in gloo CPU processes
(how the torchrun path of the segment stage is exercised without GPUs). mmcv's own shims
(``MMDistributedDataParallel`` on the CPU, checkpoint loading, iteration resume) come from ``overlock.compat``.
"""
from __future__ import annotations

import torch

import overlock.compat  # noqa: F401  (the mmcv shims)

__all__ = ["apply_mmseg_shims"]

_ORIGINALS: dict = {}


def apply_mmseg_shims() -> None:
    """Patch ``build_ddp`` (mmseg.utils, mmseg.apis.train) and the sampler's seed sync once."""
    if _ORIGINALS:
        return
    import mmseg.apis.train as mmseg_train
    import mmseg.datasets.samplers.distributed_sampler as sampler
    import mmseg.utils as mmseg_utils
    import mmseg.utils.util_distribution as distribution

    original = _ORIGINALS.setdefault("build_ddp", distribution.build_ddp)
    build_ddp_with_cpu = overlock.compat.cpu_capable_build_ddp(original)
    for module in (distribution, mmseg_utils, mmseg_train):
        module.build_ddp = build_ddp_with_cpu

    sync = getattr(sampler, "sync_random_seed", None)
    if sync is not None:
        _ORIGINALS["sync_random_seed"] = sync

        def sync_random_seed_any_device(seed=None, device="cuda"):
            return sync(seed, device if torch.cuda.is_available() else "cpu")

        sampler.sync_random_seed = sync_random_seed_any_device
