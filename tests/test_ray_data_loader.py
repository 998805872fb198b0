"""``pretrain.loader: ray_data`` on real Ray (the session's 2-CPU runtime): Ray Data tasks decode and augment the
real-size JPEGs of the DataLoader path's listing, Ray Train workers take equal shards; a short pretraining run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from overlock.compute import seed_everything
from overlock.data.datasets import classification_samples, read_image
from overlock.params import parse_params
from overlock.training import ray_data_loader as rdl
from overlock.training import recipe
from overlock.training.callbacks import TrainCallback

TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 32, 48], "sub_num_heads": [1, 2],
        "projection": 64}
CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
BATCH = 8


def _transform(decode: str = "fast"):
    p = parse_params({"pretrain": {"input_size": 32, "train_decode": decode}}).pretrain
    return recipe.build_transforms(p, CFG)[0]


@pytest.mark.parametrize("decode", ["fast", "pil"])
def test_map_batch_is_the_dataloader_paths_image_and_label(real_size_classification, decode):
    """One row through the map function = the same file through the DataLoader path's transform (same draws)."""
    samples = classification_samples(real_size_classification, "train")
    tf = _transform(decode)
    rows = np.array([0, 1, 2, 5])  # 1-3: grayscale JPEG, CMYK JPEG, PNG named .JPEG
    batch = {"index": rows, "path": np.array([samples[i][0] for i in rows]),
             "label": np.array([samples[i][1] for i in rows])}
    out = rdl.decode_batch(batch, tf, seed=3)
    seed_everything(rdl._batch_seed(3, rows))
    expected = np.stack([np.asarray(read_image(samples[i][0], tf)) for i in rows])
    np.testing.assert_array_equal(out["image"], expected)
    assert out["image"].dtype == (np.uint8 if decode == "fast" else np.float32)
    assert out["image"].shape == ((4, 32, 32, 3) if decode == "fast" else (4, 3, 32, 32))
    assert out["label"].tolist() == [samples[i][1] for i in rows] and out["label"].dtype == np.int64
    assert not np.array_equal(rdl.decode_batch(batch, tf, seed=4)["image"], out["image"])  # the seed draws


def test_two_workers_get_equal_shards_of_the_listing_every_epoch(ray_local, real_size_classification):
    """Two consumers of ``streaming_split(2, equal=True)`` (what Ray Train's DataConfig gives its workers), two
    passes each, consumed concurrently as the workers do."""
    import threading
    samples = classification_samples(real_size_classification, "train")
    ds = rdl.train_dataset(real_size_classification, _transform(), seed=0)
    loaders = [rdl.ShardLoader(BATCH, len(samples), 2, shard=s) for s in ds.streaming_split(2, equal=True)]
    seen: dict[int, list] = {}

    def consume(rank: int) -> None:
        seen[rank] = [[{"index": b["index"].tolist(), "label": b["label"].tolist(), "image": b["image"]}
                       for b in loaders[rank].batches()] for _ in range(2)]
        seen[rank].append(next(iter(loaders[rank])))  # the loop's view; a pass left early (max_steps_per_epoch)
    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive()
    steps = (len(samples) // 2) // BATCH
    assert len(samples) % (2 * BATCH) != 0  # some images are dropped: the shards must still be equal
    orders = []
    for e in range(2):
        batches = [b for r in (0, 1) for b in seen[r][e]]
        assert [len(seen[r][e]) for r in (0, 1)] == [steps, steps] == [len(loader) for loader in loaders]
        assert {(tuple(b["image"].shape), b["image"].dtype) for b in batches} == {((BATCH, 32, 32, 3), torch.uint8)}
        pairs = [(i, lab) for b in batches for i, lab in zip(b["index"], b["label"])]
        indices = [i for i, _ in pairs]
        assert len(set(indices)) == len(indices) == 2 * steps * BATCH  # each image at most once per epoch
        assert all(samples[i][1] == lab for i, lab in pairs)  # the listing's label for the listing's image
        orders.append(indices)
    assert orders[0] != orders[1]  # a fresh shuffle every pass
    for rank in (0, 1):
        images, labels = seen[rank][2]
        assert images.shape == (BATCH, 32, 32, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_clear_errors_for_a_cluster_it_cannot_feed(ray_local, tmp_path):
    with pytest.raises(ValueError, match=r"2 workers x 1 CPUs take 2 of the cluster's 2 CPUs: lower "
                                         r"pretrain.cpus_per_worker, add CPU nodes"):
        rdl.check_cpus_left(2, 2, 1, rdl.DEFAULT_CPUS_PER_TASK)
    rdl.check_cpus_left(2, 2, 0.5, rdl.DEFAULT_CPUS_PER_TASK)
    rdl.check_every_node_reads(tmp_path)
    with pytest.raises(ValueError, match=r"do not see .*/absent: put the data on storage every node mounts"):
        rdl.check_every_node_reads(tmp_path / "absent")


class RecordTrainLoader(TrainCallback):
    """pretrain.callbacks hook: each rank writes the type of its training loader and its Ray Data shard."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_step_end(self, rank: int, epoch: int, batch: int, step: int) -> None:
        import ray.train
        if step == 1:
            shard = ray.train.get_dataset_shard(rdl.TRAIN)
            (self.out_dir / f"loader_rank{rank}.txt").write_text(type(shard).__name__)


@pytest.mark.slow
def test_pretraining_with_ray_data_logs_to_mlflow(ray_local, real_size_classification, tmp_path, monkeypatch):
    """The stage itself: 2 workers, 1 epoch, a tiny OverLoCK; Ray Data feeds the workers from the 3rd CPU share."""
    from mlflow.tracking import MlflowClient

    from overlock.pipeline.context import open_stage
    from overlock.training.pretrain import run_pretrain
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    torch.set_num_threads(1)
    params = parse_params({
        "seed": 0, "model": {"overrides": TINY},
        "pretrain": {"loader": "ray_data", "epochs": 1, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0,
                     "input_size": 32, "workers": 2, "cpus_per_worker": 0.5, "log_every_steps": 1,
                     "storage_path": str(tmp_path / "ray"),
                     "callbacks": [{"target": "test_ray_data_loader:RecordTrainLoader",
                                    "kwargs": {"out_dir": str(tmp_path)}}]},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "register_models": False}})
    paths = {"data": real_size_classification, "out": tmp_path / "models" / "classifier",
             "metrics": tmp_path / "metrics" / "pretrain.json", "plots": tmp_path / "plots" / "pretrain"}
    with open_stage("pretrain", params, **paths) as ctx:
        summary = run_pretrain(ctx)
    steps = (len(classification_samples(real_size_classification, "train")) // 2) // 8
    for rank in (0, 1):  # each worker trained on its Ray Data shard
        assert (tmp_path / f"loader_rank{rank}.txt").read_text() == "StreamSplitDataIterator"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert sorted(m.step for m in client.get_metric_history(ctx.run.run_id, "train/loss")) == list(range(1, steps + 1))
    (epoch,) = client.get_metric_history(ctx.run.run_id, "img_per_sec")
    assert epoch.step == 1 and epoch.value > 0
    assert client.get_metric_history(ctx.run.run_id, "global_batch")[0].value == 16
    assert summary["epochs"] == 1 and (paths["out"] / "final.pth").exists()
    assert json.loads(paths["metrics"].read_text())["epochs"] == 1
