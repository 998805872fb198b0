"""The finetune stage's prediction of the val and calibration splits (MMDetection), written once.

:func:`predict_split` runs the detector batched (``samples_per_gpu`` images per forward pass); under torchrun
each rank predicts every ``world_size``-th image and rank 0 merges the shards in the split's image order. The
file format, and its reader for the calibrate and evaluate stages, is :mod:`overlock.data.coco_results`.
"""
from __future__ import annotations

import copy
from functools import partial

from tqdm import tqdm

from overlock.data.coco_results import (PREDICTED_SPLITS, PREDICTIONS_DIR, load_coco, predictions_file, to_coco,
                                        write_predictions)

__all__ = ["PREDICTIONS_DIR", "PREDICTED_SPLITS", "load_coco", "predictions_file", "predict_split",
           "write_predictions"]


def predict_split(model, test_cfg, ann_file: str, img_prefix: str, samples_per_gpu: int, workers: int,
                  device: str, desc: str = "predict") -> list[dict] | None:
    """Detections of ``model`` on one COCO split (rank 0: every image's, in image order; other ranks: None).

    ``test_cfg``: the mmdet ``data.test`` config (its pipeline and classes); ``ann_file``/``img_prefix``
    replace its split. Runs under an initialised process group (torchrun) as well as in one process.
    """
    import torch
    from mmcv.parallel import MMDataParallel, collate
    from mmcv.runner import get_dist_info
    from mmdet.datasets import build_dataset, replace_ImageToTensor

    cfg = copy.deepcopy(test_cfg)
    cfg.ann_file, cfg.img_prefix, cfg.test_mode = ann_file, img_prefix, True
    cfg.pipeline = replace_ImageToTensor(cfg.pipeline)  # batches > 1 need the DefaultFormatBundle form
    dataset = build_dataset(cfg)
    rank, world = get_dist_info()
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=samples_per_gpu, shuffle=False,
        num_workers=workers, collate_fn=partial(collate, samples_per_gpu=samples_per_gpu))
    if device == "cuda":
        model = model.cuda()
    if world > 1:
        _sync_from_rank0(model)
    if device == "cuda":
        wrapped = MMDataParallel(model, device_ids=[torch.cuda.current_device()])
    else:
        wrapped = MMDataParallel(model)
    wrapped.eval()
    per_image: dict[int, list[dict]] = {}
    done = 0
    with torch.no_grad():
        for data in tqdm(loader, desc=f"{desc} (rank {rank})" if world > 1 else desc, leave=False,
                         disable=None):
            results = wrapped(return_loss=False, rescale=True, **data)
            for result in results:
                index = indices[done]
                done += 1
                per_image[index] = to_coco(dataset.img_ids[index], result, dataset.cat_ids)
    if world > 1:
        shards = [None] * world if rank == 0 else None
        torch.distributed.gather_object(per_image, shards, dst=0)
        if rank != 0:
            return None
        per_image = {i: dets for shard in shards for i, dets in shard.items()}
    missing = len(dataset) - len(per_image)
    if missing:
        raise RuntimeError(f"{missing} of {len(dataset)} images of {ann_file} were not predicted")
    return [d for i in range(len(dataset)) for d in per_image[i]]


def _sync_from_rank0(model) -> None:
    """Every rank predicts with rank 0's weights and buffers (the ones saved as detector.pth): mmdet's DDP
    does not broadcast buffers, so each rank's BatchNorm statistics drift apart during training."""
    import torch

    with torch.no_grad():
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

