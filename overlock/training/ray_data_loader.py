"""``pretrain.loader: ray_data``: Ray Data tasks on any node's CPUs read, decode and augment the training split
and stream the batches to the Ray Train workers.

The driver builds :func:`train_dataset` from the DataLoader path's own listing
(:func:`overlock.data.datasets.classification_samples`: the same images and labels). Every pass shuffles the
cheap ``(index, path, label)`` rows (Ray's ``random_shuffle`` reseeded per pass from ``seed``: pass k of an
uninterrupted run is epoch k; a run resumed after a failure starts its pass count again), then map tasks of
``cpus_per_task`` CPUs, placed by Ray on whichever node has CPUs free, decode and augment the images with the
recipe's training transform (:func:`overlock.data.datasets.read_image`, the object
:func:`overlock.training.recipe.build_transforms` returns for the DataLoader path). Each map batch seeds its
augmentation draws from the run seed and its rows. ``TorchTrainer(datasets={"train": ...})`` splits every pass
into equal shards (``streaming_split(equal=True)``); :class:`ShardLoader` batches a worker's shard with
``drop_last``, so every worker takes the same number of steps. Normalisation of the fast decode, mixup and
cutmix stay in the training loop, as for the DataLoader path; validation keeps the DataLoader path.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from overlock.compute import seed_everything
from overlock.data.datasets import classification_samples, read_image

#: the Ray Train dataset name (``ray.train.get_dataset_shard``)
TRAIN = "train"
#: CPUs of one decode/augment map task
DEFAULT_CPUS_PER_TASK = 1.0
#: images a map task hands on at a time
DECODE_BATCH = 16
#: listing rows per block (a map task decodes one block) at scale; small datasets get smaller blocks
ROWS_PER_BLOCK = 1024


def _num_blocks(n: int) -> int:
    """Blocks of an ``n``-row listing: about 1024 rows each, but up to 64 blocks of >= 32 rows for small sets
    (map tasks work a block each, so blocks are what spreads the work over CPUs)."""
    return max(math.ceil(n / ROWS_PER_BLOCK), min(math.ceil(n / 32), 64), 1)


def _batch_seed(seed: int, rows: np.ndarray) -> int:
    digest = hashlib.blake2b(np.asarray([seed, *rows], dtype=np.int64).tobytes(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def decode_batch(batch: dict[str, np.ndarray], transform, seed: int) -> dict[str, np.ndarray]:
    """The map function: the rows' images through ``transform`` (uint8 HWC on the fast decode path, normalised
    float CHW on the PIL path), with augmentation draws seeded from ``seed`` and the rows."""
    seed_everything(_batch_seed(seed, batch["index"]))
    images = [np.asarray(read_image(str(path), transform)) for path in batch["path"]]
    return {"index": batch["index"], "image": np.stack(images), "label": batch["label"].astype(np.int64)}


def train_dataset(data_dir: str | Path, transform, seed: int, cpus_per_task: float = DEFAULT_CPUS_PER_TASK):
    """The training split as a lazy Ray Dataset of ``index``, ``image``, ``label`` (see the module docstring)."""
    import ray.data
    from ray.data import RandomSeedConfig
    samples = classification_samples(data_dir, "train")
    if not samples:
        raise ValueError(f"{data_dir}: the train split is empty; re-run the extract stage (dvc repro extract)")
    rows = [{"index": i, "path": path, "label": label} for i, (path, label) in enumerate(samples)]
    ds = ray.data.from_items(rows, override_num_blocks=_num_blocks(len(rows)))
    ds.context.enable_progress_bars = False
    ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(decode_batch, fn_kwargs={"transform": transform, "seed": seed}, batch_size=DECODE_BATCH,
                          batch_format="numpy", num_cpus=cpus_per_task)


# -- the driver's side ---------------------------------------------------------------------------------
def default_worker_cpus(gpus_per_worker: float) -> float:
    """``pretrain.cpus_per_worker`` when unset: 1 on CPU runs, 2 on GPU runs (the training process and one
    validation loader process; the training images are decoded elsewhere)."""
    return 1.0 if gpus_per_worker <= 0 else 2.0


def _exists(path: str) -> bool:
    return os.path.exists(path)


def check_every_node_reads(path: str | Path) -> None:
    """Fail unless every live node with CPUs sees ``path``: Ray places the map tasks on any of them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    exists = ray.remote(num_cpus=0)(_exists)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    refs = {n["NodeManagerAddress"]: exists.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(path)) for n in nodes}
    blind = sorted(address for address, ref in refs.items() if not ray.get(ref))
    if blind:
        raise ValueError(f"pretrain.loader=ray_data reads the images on every node's CPUs, but node(s) {blind} do "
                         f"not see {path}: put the data on storage every node mounts at the same path, or set "
                         "pretrain.loader: dataloader (each worker reads on its own node)")


def check_cpus_left(cluster_cpus: float, workers: int, worker_cpus: float, cpus_per_task: float) -> None:
    """Fail when the training workers leave the cluster no CPUs for one map task (the run would wait forever)."""
    taken = workers * worker_cpus
    if cluster_cpus - taken < cpus_per_task:
        raise ValueError(f"pretrain.loader=ray_data decodes in Ray Data tasks of {cpus_per_task:g} CPU beside the "
                         f"training workers, but {workers} workers x {worker_cpus:g} CPUs take {taken:g} of the "
                         f"cluster's {cluster_cpus:g} CPUs: lower pretrain.cpus_per_worker, add CPU nodes "
                         "(ray start --address ...), or set pretrain.loader: dataloader")


def trainer_datasets(params, data_dir: Path, num_classes: int, worker_cpus: float) -> dict:
    """``TorchTrainer(datasets=...)`` of a ``pretrain.loader: ray_data`` run, after the checks above; the
    transform is the recipe's at the model's data config (as the workers build it)."""
    import ray

    from overlock.training import recipe
    p = params.pretrain
    check_cpus_left(ray.cluster_resources().get("CPU", 0.0), p.workers, worker_cpus, DEFAULT_CPUS_PER_TASK)
    check_every_node_reads(data_dir)
    model = recipe.build_model(params, num_classes)
    transform, _ = recipe.build_transforms(p, recipe.data_config(model, p.input_size))
    return {TRAIN: train_dataset(data_dir, transform, params.seed)}


# -- the worker side ------------------------------------------------------------------------------------
class ShardLoader:
    """This worker's shard of the ``train`` dataset as the loop's training loader: each ``iter()`` is a fresh
    pass of ``len()`` batches of ``batch_size`` (image, label), the last partial batch dropped."""

    def __init__(self, batch_size: int, num_samples: int, world: int, prefetch_batches: int = 4, shard=None):
        """``shard``: a Ray ``DataIterator`` (one of ``streaming_split(world, equal=True)``); None: this Ray Train
        worker's ``train`` shard."""
        import ray.train
        self.shard = ray.train.get_dataset_shard(TRAIN) if shard is None else shard
        if self.shard is None:
            raise RuntimeError(f"pretrain.loader=ray_data, but this Ray Train run has no {TRAIN!r} dataset: the "
                               f"driver passes TorchTrainer(datasets=trainer_datasets(...)) (training/pretrain.py)")
        self.batch_size, self.prefetch_batches = batch_size, prefetch_batches
        self.num_batches = (num_samples // world) // batch_size  # streaming_split(equal=True): N // world rows

    def __len__(self) -> int:
        return self.num_batches

    def batches(self):
        """The pass as Ray's dicts of tensors (``index``, ``image``, ``label``)."""
        return self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                             prefetch_batches=self.prefetch_batches)

    def __iter__(self):
        for batch in self.batches():
            yield batch["image"], batch["label"]
