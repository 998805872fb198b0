"""mmcv 1.7.2 / mmdet 2.28.2 on torch 2.x: each shim of overlock.compat fixes a failure of the unpatched code,
and mmcv's compiled ops (RoIAlign, nms) run on CPU with known answers (acceptance test of issue 2)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

mmcv = pytest.importorskip("mmcv")

from overlock import compat  # noqa: E402  (applies the shims)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ mmcv ops on CPU
def test_roi_align_cpu_known_answer():
    from mmcv.ops import RoIAlign

    # f(row, col) = col: bilinear sampling is exact on a linear map, so each bin averages to the value at
    # its centre. aligned=True shifts by half a pixel: box x in [2, 6] has bin centres 3 and 5 -> 2.5, 4.5.
    feat = torch.arange(8, dtype=torch.float32).repeat(8, 1)[None, None]
    rois = torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]])
    out = RoIAlign(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.5, 4.5], [2.5, 4.5]]))
    # the rows carry the same check transposed
    out_t = RoIAlign(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat.transpose(2, 3).contiguous(), rois)
    torch.testing.assert_close(out_t[0, 0], torch.tensor([[2.5, 2.5], [4.5, 4.5]]))


def test_roi_align_shim_reads_channels_last_features_correctly():
    """Unpatched, mmcv reads a channels_last map as NCHW memory and returns garbage (the RoI heads of a
    detector on a channels_last backbone then cannot learn); patched, forward and input gradient match."""
    from mmcv.ops import RoIAlign  # (RoIPool, patched the same way, has no CPU kernel in mmcv)
    from mmcv.ops.roi_align import RoIAlignFunction

    layer = RoIAlign(7, 0.5, 2)
    feat = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    rois = torch.tensor([[0, 2.0, 2.0, 20.0, 24.0], [1, 0.0, 8.0, 18.0, 18.0]], dtype=torch.float64)
    dense, last = feat.clone().requires_grad_(), feat.to(memory_format=torch.channels_last).requires_grad_()
    out_dense, out_last = layer(dense, rois), layer(last, rois)
    torch.testing.assert_close(out_last, out_dense)
    weight = torch.randn_like(out_dense)
    (out_dense * weight).sum().backward()
    (out_last * weight).sum().backward()
    torch.testing.assert_close(last.grad, dense.grad)

    class Unpatched(RoIAlignFunction):  # the original kernel really is wrong on channels_last input
        forward = staticmethod(compat.ORIGINALS["RoIAlignFunction.forward"])

    wrong = Unpatched.apply(feat.to(memory_format=torch.channels_last), rois, 7, 0.5, 2, "avg", True)
    assert (wrong - out_dense).abs().max() > 0.1


def test_nms_cpu_known_answer():
    from mmcv.ops import batched_nms, nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # box 3 (0.95) suppresses box 0 (IoU 0.9) and box 1 (IoU ~0.62); box 2 is disjoint
    assert keep.tolist() == [3, 2]
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.95, 0.7]))
    # per-class NMS keeps overlapping boxes of different classes
    _, keep_b = batched_nms(boxes, scores, torch.tensor([0, 1, 0, 0]), dict(type="nms", iou_threshold=0.5))
    assert sorted(keep_b.tolist()) == [1, 2, 3]


# ------------------------------------------------------------------------------------ numpy aliases
def test_numpy_alias_shim_restores_removed_aliases():
    unpatched = subprocess.run([sys.executable, "-c", "import numpy as np; np.array([1.7]).astype(np.int)"],
                               capture_output=True, text=True)
    assert unpatched.returncode != 0 and "np.int" in unpatched.stderr
    # the mmdet code path that uses it (CustomDataset.get_cat_ids) works with the shim
    assert np.array([1.7]).astype(np.int).tolist() == [1] and np.float is float and np.bool is bool


# ------------------------------------------------------------------------------------ checkpoint loading
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def _mmcv_checkpoint(path):
    from mmcv.runner import save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    # free-form meta as mmcv/mmdet write it (hook messages may hold numpy scalars)
    save_checkpoint(model, str(path), optimizer=optimizer, meta={"iter": 7, "hook_msgs": {"best_score": np.float64(0.5)}})
    return model


def test_checkpoint_shim_loads_own_full_checkpoint_only_in_trusted_dir(tmp_path):
    from mmcv.runner import CheckpointLoader

    work = tmp_path / "work"
    work.mkdir()
    model = _mmcv_checkpoint(work / "iter_7.pth")
    with pytest.raises(Exception, match="(?i)weights.only"):  # unpatched mmcv loader: torch 2.x default
        compat.ORIGINALS["load_from_local"](str(work / "iter_7.pth"))
    with compat.trusted_checkpoint_dir(work):
        ckpt = CheckpointLoader.load_checkpoint(str(work / "iter_7.pth"), map_location="cpu")
    assert ckpt["meta"]["iter"] == 7 and ckpt["meta"]["hook_msgs"]["best_score"] == 0.5
    torch.testing.assert_close(ckpt["state_dict"]["weight"], model.weight.detach())
    assert "state" in ckpt["optimizer"]
    # the same file outside a trusted dir (e.g. passed in by a user) stays weights_only and is refused clearly
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        CheckpointLoader.load_checkpoint(str(work / "iter_7.pth"), map_location="cpu")


def test_checkpoint_shim_keeps_foreign_files_weights_only(tmp_path):
    from mmcv.runner import CheckpointLoader, load_checkpoint

    plain = tmp_path / "official.pth"
    model = torch.nn.Linear(3, 2)
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": ("a", "b")}}, plain)
    target = torch.nn.Linear(3, 2)
    load_checkpoint(target, str(plain), map_location="cpu")  # plain tensors + primitives load fine
    torch.testing.assert_close(target.weight, model.weight)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": _Exploit(str(marker))}, evil)
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        CheckpointLoader.load_checkpoint(str(evil), map_location="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ _get_stream
def test_get_stream_shim_accepts_gpu_index():
    from mmcv.parallel import _functions
    from torch.nn.parallel._functions import _get_stream as torch_get_stream

    with pytest.raises(AttributeError):  # what mmcv's Scatter does unpatched: an int where torch wants a device
        torch_get_stream(0)
    # patched (CPU stand-in: no accelerator, so no stream is needed) for an index, -1 (CPU) and a device
    assert _functions._get_stream(0) is None
    assert _functions._get_stream(-1) is None
    assert _functions._get_stream(torch.device("cpu")) is None


# ------------------------------------------------------------------------------------ MMDistributedDataParallel
_DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    import overlock.compat
    from mmcv.parallel import MMDistributedDataParallel

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(4, 1)
        def forward(self, x):
            return self.fc(x)
        def train_step(self, data, optimizer=None):
            return {"loss": self(data).pow(2).mean()}

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    x = torch.full((2, 4), float(rank + 1))
    # unpatched: remove the shim's attributes -> forward fails as on a plain torch 2.x install
    saved = MMDistributedDataParallel.__dict__["_use_replicated_tensor_module"]
    del MMDistributedDataParallel._use_replicated_tensor_module
    try:
        MMDistributedDataParallel(Tiny())(x)
        result["unpatched"] = "ok"
    except AttributeError as err:
        result["unpatched"] = str(err)
    MMDistributedDataParallel._use_replicated_tensor_module = saved

    model = Tiny()
    ddp = MMDistributedDataParallel(model)
    ddp(x).pow(2).mean().backward()
    grads = [g.clone() for g in (model.fc.weight.grad, model.fc.bias.grad)]
    model.zero_grad()
    ddp.train_step(x)["loss"].backward()
    result["forward_grad"] = [g.flatten().tolist() for g in grads]
    result["train_step_grad"] = [p.grad.flatten().tolist() for p in (model.fc.weight, model.fc.bias)]
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_mmddp_shim_forward_backward_under_torchrun(tmp_path):
    import json

    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert "_use_replicated_tensor_module" in res["unpatched"]
    # gradients are all-reduced: both ranks hold the average of the per-rank gradients
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    expected = []
    for rank in range(2):
        model.zero_grad()
        model(torch.full((2, 4), float(rank + 1))).pow(2).mean().backward()
        expected.append([model.weight.grad.flatten().clone(), model.bias.grad.flatten().clone()])
    mean = [(a + b) / 2 for a, b in zip(*expected)]
    for res in results:
        for key in ("forward_grad", "train_step_grad"):
            for got, want in zip(res[key], mean):
                torch.testing.assert_close(torch.tensor(got), want)


# ------------------------------------------------------------------------------------ IterBasedRunner.resume
def test_iter_runner_resume_shim_works_without_gpu(tmp_path):
    import logging

    from mmcv.runner import IterBasedRunner

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 1)

        def train_step(self, data, optimizer):
            return {"loss": self.fc(data).sum(), "log_vars": {}, "num_samples": 1}

    def runner(work_dir):
        model = Model()
        return IterBasedRunner(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), work_dir=str(work_dir),
                               logger=logging.getLogger("test_compat"), max_iters=3)

    saved = runner(tmp_path)
    saved._iter = 3
    saved.save_checkpoint(str(tmp_path), filename_tmpl="iter_{}.pth")
    ckpt = str(tmp_path / "iter_4.pth")
    if not torch.cuda.is_available():  # unpatched: maps to torch.cuda.current_device() and fails on CPU
        with pytest.raises((RuntimeError, AssertionError)), compat.trusted_checkpoint_dir(tmp_path):
            compat.ORIGINALS["IterBasedRunner.resume"](runner(tmp_path), ckpt)
    resumed = runner(tmp_path)
    with compat.trusted_checkpoint_dir(tmp_path):
        resumed.resume(ckpt)
    assert resumed.iter == 3  # mmcv stores the iterations done before the saving hook ran
    torch.testing.assert_close(resumed.model.fc.weight, saved.model.fc.weight)
