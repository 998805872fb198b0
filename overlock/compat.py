"""Every shim that mmcv-full 1.7.2 / mmdet 2.28.2 need on torch 2.x and numpy >= 1.24, in one place.

Importing this module applies them (idempotently); ``overlock.detection`` imports it first. Each shim is
a small named function so tests can check its effect in isolation:

- ``patch_checkpoint_loading``: torch >= 2.6 loads with ``weights_only=True`` by default, so mmcv cannot
  resume from its own full checkpoints (optimizer state, free-form ``meta``). mmcv's local-file loader now
  passes ``weights_only`` explicitly: ``False`` only for files under a directory registered as trusted with
  :func:`trusted_checkpoint_dir` (the pipeline's own work dir), ``True`` for everything else (official
  releases, user-supplied paths), so a foreign pickle can never run code.
- ``patch_get_stream``: ``mmcv.parallel._functions.Scatter`` passes a GPU index (int) to torch's
  ``_get_stream``, which takes a ``torch.device`` since torch 2.0.
- ``patch_mmddp``: ``MMDistributedDataParallel._run_ddp_forward`` reads ``_use_replicated_tensor_module``,
  an attribute torch removed in 2.0; without it every DDP forward (e.g. distributed testing) fails.
- ``patch_cpu_distributed``: mmdet's ``build_ddp`` only accepts GPU-like devices and
  ``MMDistributedDataParallel`` only unwraps mmcv's ``DataContainer`` batches when it has ``device_ids``;
  mmdet's samplers broadcast their seed through a CUDA tensor (``sync_random_seed(device='cuda')``), which
  now uses the CPU when no GPU is visible; with these, ``train_detector(distributed=True)`` runs in gloo CPU processes (how the torchrun
  path of the finetune stage is exercised without GPUs).
- ``patch_iter_runner_resume``: ``IterBasedRunner.resume`` maps a checkpoint to
  ``torch.cuda.current_device()`` unconditionally, so resuming an iteration-based run fails on a CPU-only
  host; without CUDA the default now maps to the CPU (as ``BaseRunner.resume`` already does).
- ``patch_roi_ops_memory_format``: mmcv's RoIAlign/RoIPool kernels index their input as contiguous NCHW;
  a channels_last feature map (what OverLoCK's oneDNN convolutions and any channels_last backbone return)
  is read as garbage, silently: the RPN still learns, the RoI heads cannot. The inputs (and the output
  gradients) are made contiguous first.
- ``patch_numpy_aliases``: ``np.int``/``np.float``/``np.bool`` (removed in numpy 1.24) are still used by
  mmdet (``CustomDataset.get_cat_ids``, samplers).
"""
from __future__ import annotations

import contextlib
import pickle
import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = ["ORIGINALS", "apply_all", "trusted_checkpoint_dir", "is_trusted_checkpoint", "load_local_checkpoint",
           "patch_checkpoint_loading", "patch_get_stream", "patch_mmddp",
           "patch_iter_runner_resume", "patch_roi_ops_memory_format", "patch_cpu_distributed", "patch_numpy_aliases"]

_TRUSTED_DIRS: list[Path] = []
_LOCK = threading.Lock()
_APPLIED: set[str] = set()
# the functions each shim replaced (tests call them to show the failure the shim fixes)
ORIGINALS: dict[str, object] = {}


@contextlib.contextmanager
def trusted_checkpoint_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Within the block, mmcv loads files under ``path`` with ``weights_only=False`` (our own checkpoints)."""
    resolved = Path(path).resolve()
    with _LOCK:
        _TRUSTED_DIRS.append(resolved)
    try:
        yield resolved
    finally:
        with _LOCK:
            _TRUSTED_DIRS.remove(resolved)


def is_trusted_checkpoint(filename: str | os.PathLike) -> bool:
    """True when ``filename`` (symlinks resolved) lies inside a directory registered as trusted."""
    resolved = Path(filename).expanduser().resolve()
    with _LOCK:
        return any(resolved.is_relative_to(d) for d in _TRUSTED_DIRS)


def load_local_checkpoint(filename: str, map_location=None):
    """mmcv's local checkpoint loader with an explicit ``weights_only`` (False only for trusted files)."""
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    trusted = is_trusted_checkpoint(filename)
    try:
        return torch.load(filename, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as err:  # a foreign file holding arbitrary objects
        if trusted:
            raise
        raise RuntimeError(
            f"refusing to unpickle {filename}: it is not a checkpoint written by this pipeline and holds "
            f"objects other than tensors and plain containers ({err.__class__.__name__}). Re-save it with "
            f"plain tensors (torch.save({{'state_dict': model.state_dict()}}, path)) and pass that file.") from err


def patch_checkpoint_loading() -> None:
    """Route mmcv's local-file scheme (and the module attribute) through :func:`load_local_checkpoint`."""
    from mmcv.runner import checkpoint as mmcv_checkpoint

    ORIGINALS.setdefault("load_from_local", mmcv_checkpoint.load_from_local)
    mmcv_checkpoint.load_from_local = load_local_checkpoint
    mmcv_checkpoint.CheckpointLoader.register_scheme(prefixes="", loader=load_local_checkpoint, force=True)


def _get_stream_accepting_int(device):
    from torch.nn.parallel._functions import _get_stream as torch_get_stream

    if isinstance(device, int):
        device = torch.device("cpu") if device < 0 else torch.device("cuda", device)
    return torch_get_stream(device)


def patch_get_stream() -> None:
    """Make ``mmcv.parallel._functions._get_stream`` accept the GPU index mmcv passes."""
    from mmcv.parallel import _functions

    ORIGINALS.setdefault("_get_stream", _functions._get_stream)
    _functions._get_stream = _get_stream_accepting_int


def patch_mmddp() -> None:
    """Give ``MMDistributedDataParallel`` the attributes torch 2.x removed (no replicated module)."""
    from mmcv.parallel import MMDistributedDataParallel

    if not hasattr(MMDistributedDataParallel, "_use_replicated_tensor_module"):
        MMDistributedDataParallel._use_replicated_tensor_module = False
        MMDistributedDataParallel._replicated_tensor_module = None


def cpu_capable_build_ddp(build_ddp):
    """OpenMMLab's ``build_ddp(model, device, ...)`` that also takes ``device="cpu"`` (gloo processes)."""
    from mmcv.parallel import MMDistributedDataParallel

    def build_ddp_with_cpu(model, device="cuda", *args, **kwargs):
        if device != "cpu":
            return build_ddp(model, device, *args, **kwargs)
        kwargs.pop("device_ids", None)
        return MMDistributedDataParallel(model, *args, device_ids=None, **kwargs)

    build_ddp_with_cpu.__doc__ = build_ddp.__doc__
    return build_ddp_with_cpu


def patch_cpu_distributed() -> None:
    """``build_ddp(model, "cpu")`` and CPU ``MMDistributedDataParallel.train_step/val_step`` (gloo)."""
    import mmdet.apis.train as mmdet_train
    import mmdet.utils.util_distribution as distribution
    from mmcv.parallel import MMDistributedDataParallel

    import mmdet.core.utils as core_utils
    import mmdet.core.utils.dist_utils as dist_utils
    import mmdet.datasets.samplers.class_aware_sampler as class_aware_sampler
    import mmdet.datasets.samplers.distributed_sampler as distributed_sampler
    import mmdet.datasets.samplers.infinite_sampler as infinite_sampler

    sync_random_seed = ORIGINALS.setdefault("sync_random_seed", dist_utils.sync_random_seed)

    def sync_random_seed_any_device(seed=None, device="cuda"):
        return sync_random_seed(seed, device if torch.cuda.is_available() else "cpu")

    sync_random_seed_any_device.__doc__ = sync_random_seed.__doc__
    for module in (dist_utils, core_utils, class_aware_sampler, distributed_sampler, infinite_sampler):
        module.sync_random_seed = sync_random_seed_any_device

    build_ddp_with_cpu = cpu_capable_build_ddp(ORIGINALS.setdefault("build_ddp", distribution.build_ddp))
    distribution.build_ddp = build_ddp_with_cpu
    mmdet_train.build_ddp = build_ddp_with_cpu  # imported by name there

    for name in ("train_step", "val_step"):
        original = ORIGINALS.setdefault(f"MMDistributedDataParallel.{name}", getattr(MMDistributedDataParallel, name))

        def step(self, *inputs, _original=original, **kwargs):
            if not self.device_ids:  # CPU: unwrap the DataContainers as MMDataParallel does on the CPU
                inputs, kwargs = self.scatter(inputs, kwargs, [-1])
                inputs, kwargs = inputs[0], kwargs[0]
            return _original(self, *inputs, **kwargs)

        step.__doc__ = original.__doc__
        setattr(MMDistributedDataParallel, name, step)


def patch_iter_runner_resume() -> None:
    """``IterBasedRunner.resume(map_location='default')`` loads onto the CPU when no GPU is visible."""
    from mmcv.runner import IterBasedRunner

    original = ORIGINALS.setdefault("IterBasedRunner.resume", IterBasedRunner.resume)

    def resume(self, checkpoint, resume_optimizer=True, map_location="default"):
        if map_location == "default" and not torch.cuda.is_available():
            map_location = "cpu"
        return original(self, checkpoint, resume_optimizer=resume_optimizer, map_location=map_location)

    resume.__doc__ = original.__doc__
    IterBasedRunner.resume = resume


def _contiguous_op(function: type, name: str) -> None:
    """Wrap ``function``'s forward/backward so their tensor arguments reach the kernel contiguous."""
    forward = ORIGINALS.setdefault(f"{name}.forward", function.forward)
    backward = ORIGINALS.setdefault(f"{name}.backward", function.backward)

    def contiguous_forward(ctx, input, rois, *args, **kwargs):
        return forward(ctx, input.contiguous(), rois.contiguous(), *args, **kwargs)

    def contiguous_backward(ctx, grad_output):
        return backward(ctx, grad_output.contiguous())

    function.forward = staticmethod(contiguous_forward)
    function.backward = staticmethod(contiguous_backward)


def patch_roi_ops_memory_format() -> None:
    """mmcv's RoIAlign and RoIPool accept channels_last (any non-contiguous) feature maps correctly."""
    from mmcv.ops.roi_align import RoIAlignFunction
    from mmcv.ops.roi_pool import RoIPoolFunction

    _contiguous_op(RoIAlignFunction, "RoIAlignFunction")
    _contiguous_op(RoIPoolFunction, "RoIPoolFunction")


def patch_numpy_aliases() -> None:
    """Restore the builtin-type aliases numpy 1.24 removed (``np.int`` is ``int``, as it always was)."""
    for name, value in (("int", int), ("float", float), ("bool", bool), ("object", object)):
        if name not in np.__dict__:
            setattr(np, name, value)


def apply_all() -> None:
    """Apply every shim once (no-op for shims already applied; mmcv shims need mmcv installed)."""
    shims = {"numpy": patch_numpy_aliases, "checkpoint": patch_checkpoint_loading,
             "get_stream": patch_get_stream, "mmddp": patch_mmddp, "iter_resume": patch_iter_runner_resume,
             "roi_memory_format": patch_roi_ops_memory_format, "cpu_distributed": patch_cpu_distributed}
    for name, shim in shims.items():
        if name not in _APPLIED:
            shim()
            _APPLIED.add(name)


apply_all()
