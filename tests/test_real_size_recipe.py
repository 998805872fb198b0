"""The official recipe on real-size images: its whole training transform (RandAugment rand-m9-mstd0.5-inc1,
random erasing, mixup/cutmix) over photo-like ~500x375 JPEGs (grayscale, CMYK and PNG-named-.JPEG among them),
the posterize fix, the faster decode path against timm's PIL path, the loader settings, and a few real
training steps of the official recipe at 224 px through the pretrain stage."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from overlock.data.datasets import ClassificationDataset
from overlock.params import parse_params
from overlock.training import recipe
from overlock.training.loader import (DecodeCropTransform, default_cpus_per_worker, loader_settings,
                                      worker_cpu_count)

CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
SAMPLES = 1500  # transform draws over the fixture's 188 train images (each ~8 times, fresh draws); with seed 0
# the first zero-bit posterize comes at ~1350 (expected rate ~1 in 650 images: 2 ops x 1/15 x p 0.5 x 2.3%)


def _official(**pretrain):
    return recipe.effective_params(parse_params({"pretrain": {"recipe": "official", **pretrain}})).pretrain


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _posterize_ops(transform):
    from timm.data.auto_augment import AugmentOp
    ops = transform.pil_ops if isinstance(transform, DecodeCropTransform) else transform.transforms
    return [op for t in ops for op in getattr(t, "ops", []) if isinstance(op, AugmentOp)
            and op.name.startswith("Posterize")]


def test_official_transform_mixup_over_real_size_images_and_the_posterize_fix(real_size_classification):
    from timm.data.auto_augment import posterize as timm_posterize
    p = _official()
    assert p.randaugment == "rand-m9-mstd0.5-inc1" and p.reprob == 0.25 and p.train_interpolation == "random"
    train_tf, _ = recipe.build_transforms(p, CFG)
    assert isinstance(train_tf, DecodeCropTransform)
    assert len(train_tf.crop.interpolation) == 2  # random: bilinear or bicubic per image, as the official train.py
    (op,) = _posterize_ops(train_tf)
    zero_bit_inputs = []

    def spy(img, bits, **kw):
        if bits < 1:
            zero_bit_inputs.append(img.copy())
        return recipe.posterize_keeping_bits(img, bits, **kw)
    op.aug_fn = spy

    ds = ClassificationDataset(real_size_classification, "train", transform=train_tf)
    modes = {Image.open(path).mode for path, _ in ds.samples} | {Image.open(path).format for path, _ in ds.samples}
    assert {"L", "CMYK", "PNG"} <= modes  # the awkward files are in the set
    mixup = recipe.build_mixup(p, num_classes=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True)
    _seed(0)
    seen = 0
    while seen < SAMPLES:
        for images, targets in loader:
            assert images.dtype == torch.uint8  # loader processes send uint8; normalised where the batch is
            images, soft = mixup(train_tf.on_device(images), targets)
            assert images.shape == (32, 3, 224, 224) and torch.isfinite(images).all()
            assert torch.allclose(soft.sum(1), torch.ones(32))
            seen += len(images)
    # magnitude 9, std 0.5, clipped at 10 -> ~2% of posterize calls ask for 0 bits: the run met some, and
    # timm's own op (Pillow 13) fails on exactly those inputs, which the fix turns black as Pillow <= 10 did
    assert zero_bit_inputs, "no zero-bit posterize drawn: raise SAMPLES"
    for img in zero_bit_inputs:
        with pytest.raises(ValueError, match="bits must be between"):
            timm_posterize(img, 0)
        assert recipe.posterize_keeping_bits(img, 0).getextrema() == ((0, 0),) * 3
    img = zero_bit_inputs[0]
    assert recipe.posterize_keeping_bits(img, 3).tobytes() == timm_posterize(img, 3).tobytes()


def test_fast_decode_matches_timm_pil_path(real_size_classification, tmp_path):
    p = _official()
    plain, _ = recipe.build_transforms(_official(train_decode="pil"), CFG)
    fast, _ = recipe.build_transforms(p, CFG)
    paths = [s for s, _ in ClassificationDataset(real_size_classification, "train").samples[:40]]
    diffs = []
    for k, path in enumerate(paths):
        _seed(k)
        with Image.open(path) as im:
            a = plain(im.convert("RGB"))
        after_plain = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        _seed(k)
        b = fast.on_device(fast(path)[None])[0]  # uint8 HWC from the loader -> normalised CHW
        assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == after_plain  # same draws
        diffs.append(float((a - b).abs().mean()) * 0.226 * 255)  # in 0-255 pixel units
    # decode is bit-exact; the antialiased tensor resize differs from PIL's by rounding (<= a few levels)
    assert np.median(diffs) < 0.05 and max(diffs) < 1.0, diffs

    # reduced-size decode (JPEG DCT scaling) when the crop is >= 2x the output: same crop -> near-identical
    big = Image.fromarray(np.asarray(Image.open(paths[0]).convert("RGB").resize((1600, 1200), Image.BICUBIC)))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    (tmp_path / "big.JPEG").write_bytes(buf.getvalue())
    from torchvision.transforms import InterpolationMode
    box = (100, 150, 800, 900)  # i, j, h, w: >= 2 x 224 (< 4 x 224) on both sides -> decoded at 1/2
    for interp, pil in ((InterpolationMode.BILINEAR, Image.BILINEAR), (InterpolationMode.BICUBIC, Image.BICUBIC)):
        with Image.open(tmp_path / "big.JPEG") as im:
            got = fast.crop_resize(im, str(tmp_path / "big.JPEG"), box, interp).numpy().astype(float)  # HWC
            assert im.size == (800, 600)  # the decoder really ran at a reduced scale
        with Image.open(tmp_path / "big.JPEG") as im:
            want = np.asarray(im.convert("RGB").crop((150, 100, 1050, 900)).resize((224, 224), pil), dtype=float)
        assert np.abs(got - want).mean() < 1.5 and np.percentile(np.abs(got - want), 99) < 12


def test_loader_settings_follow_the_cpus_of_a_worker():
    one = loader_settings(1, "cpu")
    assert one == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    gpu = loader_settings(10, torch.device("cuda", 0))
    assert gpu == {"num_workers": 9, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    assert loader_settings(10, "cpu", num_workers=2, persistent=False)["num_workers"] == 2
    assert not loader_settings(4, "cpu", persistent=False)["persistent_workers"]
    assert default_cpus_per_worker(0, {"CPU": 64, "GPU": 8}) == 1  # CPU runs: one CPU per worker
    assert default_cpus_per_worker(1, {"CPU": 64, "GPU": 8}) == 8  # every GPU worker fits on the node
    assert default_cpus_per_worker(1, {"CPU": 256, "GPU": 8}) == 10  # capped at 10 per GPU
    assert default_cpus_per_worker(2, {"CPU": 64, "GPU": 8}) == 16
    assert default_cpus_per_worker(1, None) == 10
    assert worker_cpu_count() >= 1
    p = parse_params({}).pretrain
    assert p.cpus_per_worker is None and p.num_data_workers is None  # derived, for the real run


def test_official_recipe_trains_at_224_on_real_size_images(ray_local, real_size_classification, tmp_path,
                                                           monkeypatch):
    """A few real steps of the official recipe (RandAugment, erasing, mixup/cutmix, EMA, bf16) with a tiny
    OverLoCK through the pretrain stage, one Ray worker with one loader process."""
    from overlock.pipeline.context import open_stage
    from overlock.training.pretrain import run_pretrain
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    tiny = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 32, 48], "sub_num_heads": [1, 2],
            "projection": 64}
    params = parse_params({
        "seed": 0, "model": {"overrides": tiny},
        "pretrain": {"recipe": "official", "epochs": 1, "batch_size": 8, "global_batch": 16, "workers": 1,
                     "cpus_per_worker": 1,
                     "num_data_workers": 1, "max_steps_per_epoch": 3, "log_every_steps": 1, "max_failures": 0,
                     "storage_path": str(tmp_path / "ray")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "register_models": False}})
    paths = {"data": real_size_classification, "out": tmp_path / "classifier", "metrics": tmp_path / "m.json",
             "plots": tmp_path / "plots"}
    with open_stage("pretrain", params, **paths) as ctx:
        summary = run_pretrain(ctx)
    history = json.loads((paths["out"] / "history.json").read_text())
    assert summary["epochs"] == 1 and history[-1]["step"] == 3  # optimizer steps of 2 x 8 images
    assert np.isfinite(history[-1]["train_loss"]) and np.isfinite(summary["final_val_top1"])
    assert json.loads((paths["out"] / "model.json").read_text())["input_size"] == [3, 224, 224]
