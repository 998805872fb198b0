"""Shared pytest fixtures (append clearly named fixtures; do not remove others')."""
from __future__ import annotations

import pytest

# --- In CI (OVERLOCK_REQUIRE_ALL_DEPS=1, set by .ci/run) a missing or broken heavy dependency fails the run:
# without this, the module-level importorskip of mmcv/mmdet (and the natten parametrisation) would turn a broken
# install into silent skips.
REQUIRED_MODULES = ("mmcv.ops", "mmdet.models", "mmseg")


def _require_all_deps() -> bool:
    import os
    return os.environ.get("OVERLOCK_REQUIRE_ALL_DEPS") == "1"


def pytest_sessionstart(session):
    if not _require_all_deps():
        return
    import importlib
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (an ImportError or a broken build: both must fail here)
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    from overlock.models import contmix  # natten 0.17 imports on current torch only through its shims
    if contmix._natten_error() is not None:
        missing.append(f"natten: {contmix._natten_error()}")
    if missing:
        raise pytest.UsageError("OVERLOCK_REQUIRE_ALL_DEPS=1 but these do not import:\n  " + "\n  ".join(missing)
                                + "\nFix: WITH_NATTEN=1 make setup (build logs: ~/.cache/overlock/wheels/logs/)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under OVERLOCK_REQUIRE_ALL_DEPS=1 a skip caused by a missing module is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require_all_deps():
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(text in reason for text in ("could not import", "unavailable", "not installed")):
            report.outcome = "failed"
            report.longrepr = f"skipped for a missing dependency, which CI does not allow: {reason}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole test session (2 CPUs, no dashboard). Yields its GCS address.

    Its worker processes (of every job, subprocess drivers included) inherit this environment: tests/ and the
    repository root go on their PYTHONPATH, so test hooks (``pretrain.callbacks: fault_hooks:...``) import."""
    import os
    from pathlib import Path

    import ray
    here = Path(__file__).resolve().parent
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(here), str(here.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# --- calibration/evaluation: a tiny trained classifier on demo-like data (tests/test_calibration*.py,
# tests/test_evaluation*.py). Built once per session in a temporary repository root.
import pytest as _pytest_calib_eval


def _write_calib_eval_dataset(root, classes=("red", "green", "blue"), per_split=(16, 8, 8), size=32, seed=0):
    """Contract layout data/datasets/classification: noisy colour blobs, partly ambiguous so not trivial."""
    import json as _json

    import numpy as _np
    from PIL import Image as _Image

    rng = _np.random.default_rng(seed)
    cls_root = root / "classification"
    calibration = []
    for split, n in (("train", per_split[0] + per_split[1]), ("val", per_split[2])):
        for k, name in enumerate(classes):
            folder = cls_root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = rng.uniform(0.25, 0.55, size=3)
                base[k] += rng.uniform(0.05, 0.35)  # class signal, overlapping between classes
                img = _np.clip(base[None, None, :] + rng.normal(0, 0.18, (size, size, 3)), 0, 1)
                _Image.fromarray((img * 255).astype(_np.uint8)).save(folder / f"{split}_{i:03d}.png")
                if split == "train" and i >= per_split[0]:
                    calibration.append(f"train/c{k}/{split}_{i:03d}.png")  # relative to classification/
    (cls_root / "classes.json").write_text(_json.dumps([{"id": f"c{k}", "name": n} for k, n in enumerate(classes)]))
    (cls_root / "splits.json").write_text(_json.dumps({"calibration": calibration, "excluded": []}))
    return cls_root


def _train_calib_eval_classifier(data_dir, out, steps=60, overconfidence=4.0, size=32):
    """Train timm's test_resnet a few steps, scale its last layer (over-confident), write the pretrain out."""
    import json as _json

    import timm
    import torch
    from timm.utils import ModelEmaV3

    from overlock.inference.classifier import classification_split

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    cfg = {"input_size": (3, size, size), "crop_pct": 1.0, "interpolation": "bilinear",
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    transform = timm.data.create_transform(**cfg, is_training=False)
    train = classification_split(data_dir, "train", transform)
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.tensor([train[i][1] for i in range(len(train))])
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (16,))
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        if step % 20 == 19:
            history.append({"epoch": step // 20, "train_loss": float(loss.detach()), "val_top1": 0.5 + step / 400,
                            "val_top1_ema": 0.45 + step / 400})
    with torch.no_grad():  # an over-confident classifier: temperature scaling has a real effect
        model.fc.weight.mul_(overconfidence)
        model.fc.bias.mul_(overconfidence)
        ema.module.fc.weight.mul_(overconfidence)
        ema.module.fc.bias.mul_(overconfidence)
    out.mkdir(parents=True, exist_ok=True)
    classes = _json.loads((data_dir / "classification/classes.json").read_text())
    ckpt = {"state_dict": model.state_dict(), "state_dict_ema": ema.module.state_dict(), "arch": "test_resnet",
            "size": "xt", "model_kwargs": {}, "num_classes": 3, "classes": classes, "epoch": 2,
            "metrics": {"val_top1": 0.8}}
    torch.save(ckpt, out / "final.pth")
    (out / "model.json").write_text(_json.dumps({"arch": "test_resnet", "size": "xt", "timm_name": "test_resnet",
                                                 "model_kwargs": {}, "num_classes": 3, "classes": classes, **cfg}))
    (out / "history.json").write_text(_json.dumps(history))
    return out


@_pytest_calib_eval.fixture(scope="session")
def calib_eval_workspace(tmp_path_factory):
    """A repo root with demo-like classification data, a trained over-confident classifier and params.

    Returns a dict: root, data, classifier, detector (empty), raw_params (detection_dataset none, tiny sizes).
    """
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("calib_eval")
    data = root / "data/datasets"
    _write_calib_eval_dataset(data)
    classifier = _train_calib_eval_classifier(data, root / "models/classifier")
    (root / "models/detector").mkdir(parents=True)
    raw = {"data": {"detection_dataset": "none"},
           "tracking": {"uri": f"sqlite:///{root}/mlflow.db"},
           "compute": {"device": "cpu", "threads": 1},
           "evaluate": {"throughput_batch": 4, "throughput_iters": 1, "erf_images": 2, "gradcam_images": 2,
                        "detection_images": 1}}
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(raw))
    (root / "dvc.yaml").write_text("stages: {}\n")
    return {"root": root, "data": data, "classifier": classifier, "detector": root / "models/detector",
            "raw_params": raw}


# --- data stages (tests/test_data_*.py): one MLflow sqlite store for the session (creating one costs seconds).
@pytest.fixture(scope="session")
def data_mlflow_db(tmp_path_factory):
    """Path of a session-wide MLflow sqlite database for the data-stage tests (``tracking.uri`` sqlite:///...)."""
    return tmp_path_factory.mktemp("data_mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the CI machine has 2 shared cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def mlflow_db(data_mlflow_db):
    """The shared data-test MLflow store (see ``data_mlflow_db``)."""
    return data_mlflow_db


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A scratch repository root ($OVERLOCK_REPO): state directories go under it."""
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.setenv("OVERLOCK_REPO", str(root))
    return root


# --- detection tests (test_detection_finetune.py, test_calibration_detector.py)
def write_demo_detection_layout(data_dir, n_train: int = 12, n_val: int = 4, size: int = 96, seed: int = 0,
                                calibration: int = 2) -> list[str]:
    """The extract stage's detection layout from the demo generator (train2017, val2017, annotations and
    ``splits/{train,calibration}.json`` with the first ``calibration`` train images held out); returns the
    class names in category-id order."""
    import json
    from pathlib import Path

    from overlock.data.demo import demo_coco_split

    root = Path(data_dir) / "detection"
    for split, n, key, first in (("train2017", n_train, 0, 1), ("val2017", n_val, 1, 100000)):
        images, coco = demo_coco_split(n, size, seed, key, first_id=first)
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, data in images:
            (root / split / name).write_bytes(data)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        if split == "train2017":
            (root / "splits").mkdir(exist_ok=True)
            held = {im["id"] for im in coco["images"][:calibration]}
            for name, keep in (("calibration", lambda i: i in held), ("train", lambda i: i not in held)):
                sub = {**coco, "images": [im for im in coco["images"] if keep(im["id"])],
                       "annotations": [a for a in coco["annotations"] if keep(a["image_id"])]}
                (root / "splits" / f"{name}.json").write_text(json.dumps(sub))
    return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]


@pytest.fixture(scope="session")
def demo_detection_layout():
    """:func:`write_demo_detection_layout` (a fixture so test modules need not import conftest)."""
    return write_demo_detection_layout


def write_pretrain_output(out, overrides: dict, seed: int = 1) -> dict:
    """A real pretrain ``final.pth`` (10 classes) of a freshly built OverLoCK-XT with ``overrides``, with known,
    distinct raw and EMA weights; returns both state dicts."""
    import timm
    import torch

    import overlock.models  # noqa: F401

    torch.manual_seed(seed)
    model = timm.create_model("overlock_xt", num_classes=10, **overrides)
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in raw.items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": raw, "state_dict_ema": ema, "arch": "overlock", "size": "xt", "model_kwargs": overrides,
                "num_classes": 10, "classes": [f"c{i}" for i in range(10)], "epoch": 1, "metrics": {}},
               out / "final.pth")
    return {"state_dict": raw, "state_dict_ema": ema}


@pytest.fixture(scope="session")
def pretrain_output():
    """:func:`write_pretrain_output` (the stage tests' classifier input)."""
    return write_pretrain_output


def randomize_batchnorm_stats(model):
    """Trained-looking BatchNorm statistics and affine parameters (in place; returns ``model``), so that
    folding a BatchNorm into its neighbouring convolution is not the identity."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="session")
def trained_bn_stats():
    """:func:`randomize_batchnorm_stats` (a fixture so test modules need not import conftest)."""
    return randomize_batchnorm_stats


def count_forward_calls(model, x, modules):
    """``(model(x), how many times any of ``modules`` ran its forward)``."""
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in modules]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, len(calls)


@pytest.fixture(scope="session")
def forward_calls():
    """:func:`count_forward_calls` (a fixture so test modules need not import conftest)."""
    return count_forward_calls


@pytest.fixture(scope="session")
def real_size_classification(tmp_path_factory):
    """Real-size photo-like images (~500x375; grayscale, CMYK and PNG-named-.JPEG among them) in the extract
    stage's classification layout: 4 classes x 48 train + 8 val. Yields the data directory."""
    from overlock.data.synthetic_images import write_classification_layout
    data = tmp_path_factory.mktemp("real_size_data")
    write_classification_layout(data, num_classes=4, train_per_class=48, val_per_class=8, seed=0)
    return data
