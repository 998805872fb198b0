"""Every stage of the pipeline, described once.

A :class:`StageSpec` says what a stage is: its name and help text, its path options (inputs, outputs,
metrics, plots, with their place in the DVC graph), the params that change its results and those that only
change how it runs, the code it depends on, its function and the inputs of its resume key. The entry points
(``stages/*.py``, ``pipelines/pretrain.py``), the ``overlock`` command line, the state directory and the
check of ``dvc.yaml`` (tests/test_stage_graph.py) all come from these descriptions.

This module imports nothing of the stages themselves (functions are ``"module:function"`` strings), so
``overlock --help`` and the DVC check stay cheap. A new stage (e.g. segmentation, issue 19) is one more
entry in :data:`STAGES` plus its function ``fn(ctx: StageContext) -> dict`` in its own package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["in", "out", "metrics", "plots"]

# Code every stage runs through the kernel (entry point -> runner -> context -> tracking/params/state/compute)
KERNEL_CODE = ("overlock/__init__.py", "overlock/pipeline/__init__.py", "overlock/pipeline/context.py",
               "overlock/pipeline/runner.py", "overlock/backends.py", "overlock/compute.py", "overlock/params.py",
               "overlock/registry.py", "overlock/catalog.py", "overlock/state.py", "overlock/tracking.py",
               "overlock/pipeline/records.py",
               "overlock/data/manifest.py")  # the entry point checks data/datasets against its manifest
# The descriptions themselves are not a dep: everything they say that DVC acts on is written in the stage's
# own dvc.yaml entry (cmd, deps, params, outs), which DVC compares stage by stage; the check is a test.
DESCRIPTION_FILES = ("overlock/pipeline/spec.py",)

# Params that only change how a stage runs, never what it computes (DESIGN.md 9): changing one re-runs no
# stage and never invalidates a resume. Everything else a stage lists in ``result_params`` is a result param.
OPERATIONAL = (
    "tracking",                       # MLflow URI, experiment name, model registration
    "compute.threads",
    "data.download_retries",
    "pretrain.storage_path", "pretrain.ray_address", "pretrain.max_failures", "pretrain.checkpoints_to_keep",
    "pretrain.log_every_steps", "pretrain.num_data_workers", "pretrain.cpus_per_worker", "pretrain.callbacks",
    "pretrain.min_workers", "pretrain.worker_resources",  # scale-out: where and on how many workers it runs
    "finetune.checkpoint_interval",
    "segment.checkpoint_interval",
)


@dataclass(frozen=True)
class PathOption:
    """A ``--name PATH`` option of a stage and its path in the DVC graph (``dvc``)."""
    name: str
    role: Role
    help: str
    dvc: str
    cache: bool = True          # DVC cache for an ``out`` (large extracted data: false)
    plot_file: str = ""         # the CSV inside a ``plots`` directory that dvc.yaml declares
    manifest: str = ""          # a file inside ``dvc`` that DVC tracks instead of the tree (data/datasets)
    optional: bool = False      # an input the stage function may go without (``ctx.paths.get``); dvc.yaml passes it

    @property
    def tracked(self) -> str:
        """The path dvc.yaml declares: the manifest when there is one, else the path itself."""
        return f"{self.dvc}/{self.manifest}" if self.manifest else self.dvc

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"


@dataclass(frozen=True)
class StageSpec:
    """One stage (see the module docstring)."""
    name: str
    help: str
    entry: str                              # entry point file (repo-relative)
    function: str                           # "module:function" called with a StageContext
    paths: tuple[PathOption, ...]
    result_params: tuple[str, ...]          # sections or dotted keys; OPERATIONAL keys inside are left out
    code: tuple[str, ...]                   # package dirs/files (dvc deps) beyond KERNEL_CODE
    loads: tuple[str, ...] = ()             # modules imported by name at run time (closure starts)
    resume_inputs: str = ""                 # "module:function" fingerprinting the inputs (state dir + resume key)
    model_size_arg: bool = True             # dvc.yaml passes --model-size ${model.size} (DVC's run cache)
    takes_context: bool = True              # fn(ctx); the data stages keep fn(params, run, **paths)
    datasets: tuple[str, ...] = ()          # splits recorded as MLflow dataset inputs ("classification/train")
    datasets_path: str = "data"             # the path option holding them (an "out": the stage produces them)

    @property
    def entry_command(self) -> str:
        """How the entry point is run: ``python -m stages.x`` or ``python pipelines/x.py`` (a script)."""
        if self.entry.startswith("stages/"):
            return f"python -m {self.entry[:-3].replace('/', '.')}"
        return f"python {self.entry}"

    def path(self, name: str) -> PathOption:
        return next(p for p in self.paths if p.name == name)

    def by_role(self, role: Role) -> tuple[PathOption, ...]:
        return tuple(p for p in self.paths if p.role == role)

    @property
    def deps(self) -> tuple[str, ...]:
        """dvc.yaml deps: the entry point, the kernel, the stage's code and its input paths."""
        return (self.entry, *KERNEL_CODE, *self.code, *(p.tracked for p in self.by_role("in")))


def _paths(**kw: tuple) -> tuple[PathOption, ...]:
    return tuple(PathOption(name, *args) for name, args in kw.items())


# The extracted datasets: DVC tracks their MANIFEST.json, not the tree (hashing 1.3 M files made a no-op
# `dvc status` take minutes at ImageNet size; see overlock/data/manifest.py); .dvcignore hides the tree.
DATASETS_MANIFEST = "MANIFEST.json"
DATASETS = ("in", "root of the extracted datasets", "data/datasets", True, "", DATASETS_MANIFEST)
CLASSIFIER = ("in", "pretrain stage output", "models/classifier")
DETECTOR = ("in", "finetune stage output", "models/detector")
MODEL_CODE = ("overlock/models",)
# calibrate and evaluate: loading and running the trained classifier and detector (overlock/inference)
CLASSIFIER_AND_DETECTOR_CODE = (
    "overlock/calibration", "overlock/evaluation", "overlock/inference", "overlock/metrics", "overlock/figures.py",
    "overlock/training/__init__.py", "overlock/training/loader.py", "overlock/compat.py", "overlock/data/__init__.py",
    "overlock/data/datasets.py", "overlock/data/coco_results.py", "overlock/detection", *MODEL_CODE)

STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec(
        name="download",
        help="fetch and verify the dataset archives (URLs, file:// or local paths; demo data is generated)",
        entry="stages/download.py", function="overlock.data.download:run_download",
        paths=_paths(out=("out", "directory the verified archives are written to", "data/archives", False)),
        result_params=("seed", "data.dataset", "data.detection_dataset", "data.segmentation_dataset",
                       "data.sources", "data.demo", "data.unverified_archives"),
        code=("overlock/data/__init__.py", "overlock/data/download.py", "overlock/data/sources.py",
              "overlock/data/demo.py", "overlock/data/datasets.py", "overlock/data/own_sources.py",
              "overlock/reference/dataset_archives.json"),
        model_size_arg=False, takes_context=False),
    StageSpec(
        name="extract",
        help="safely extract archives into the standard layouts and write the integrity report",
        entry="stages/extract.py", function="overlock.data.extract:run_extract",
        paths=_paths(archives=("in", "directory of verified archives (download stage output)", "data/archives"),
                     out=("out", "root of the extracted datasets", "data/datasets", False, "", DATASETS_MANIFEST),
                     metrics=("metrics", "integrity report (DVC metrics JSON)", "metrics/data.json")),
        datasets=("classification/train", "classification/calibration", "classification/val", "detection/train",
                  "detection/calibration", "detection/val"), datasets_path="out",
        result_params=("seed", "data"),
        code=("overlock/data/__init__.py", "overlock/data/extract.py", "overlock/data/layouts.py",
              "overlock/data/demo.py", "overlock/data/sources.py", "overlock/data/datasets.py",
              "overlock/data/download.py", "overlock/data/own_sources.py", "overlock/data/own_layouts.py",
              "overlock/data/coco_checks.py", "overlock/data/seg_layouts.py", "overlock/reference"),
        model_size_arg=False, takes_context=False),
    StageSpec(
        name="pretrain",
        help="ImageNet-style pretraining with Ray Train (also: ray job submit -- python pipelines/pretrain.py)",
        entry="pipelines/pretrain.py", function="overlock.training.pretrain:run_pretrain",
        paths=_paths(data=DATASETS,
                     out=("out", "classifier output directory (final + best)", "models/classifier"),
                     metrics=("metrics", "DVC metrics JSON", "metrics/pretrain.json"),
                     plots=("plots", "DVC plots directory", "plots/pretrain", True, "epochs.csv")),
        result_params=("seed", "data.dataset", "data.calibration_per_class", "model", "pretrain", "compute"),
        code=("overlock/training", "overlock/data/__init__.py", "overlock/data/datasets.py", *MODEL_CODE),
        resume_inputs="overlock.training.pretrain:input_fingerprint",
        datasets=("classification/train", "classification/val")),
    StageSpec(
        name="finetune",
        help="MMDetection COCO fine-tuning (Mask R-CNN / Faster R-CNN) or evaluation of a detector",
        entry="stages/finetune.py", function="overlock.detection.finetune:run_finetune",
        paths=_paths(data=DATASETS, classifier=CLASSIFIER,
                     out=("out", "detector output directory", "models/detector"),
                     metrics=("metrics", "DVC metrics JSON", "metrics/finetune.json"),
                     plots=("plots", "DVC plots directory", "plots/finetune", True, "loss.csv")),
        result_params=("seed", "data.detection_dataset", "model", "finetune", "compute"),
        code=("overlock/detection", "overlock/compat.py", "overlock/data/__init__.py",
              "overlock/data/datasets.py", "overlock/data/coco_results.py", "overlock/metrics/__init__.py",
              "overlock/metrics/coco.py", "overlock/figures.py", *MODEL_CODE),
        loads=("overlock.models", "overlock.detection.backbone", "overlock.detection.baseline_backbones"),
        resume_inputs="overlock.detection.finetune:input_fingerprint",
        datasets=("detection/train", "detection/val")),
    StageSpec(
        name="segment",
        help="UperNet semantic segmentation (mmseg, ADE20K layout) with pixel-wise temperature scaling",
        entry="stages/segment.py", function="overlock.segmentation.stage:run_segment",
        paths=_paths(data=DATASETS, classifier=CLASSIFIER,
                     out=("out", "segmenter output directory", "models/segmenter"),
                     metrics=("metrics", "DVC metrics JSON", "metrics/segment.json"),
                     plots=("plots", "DVC plots directory", "plots/segment", True, "loss.csv")),
        result_params=("seed", "data.segmentation_dataset", "data.calibration_per_class", "model", "segment",
                       "compute"),
        code=("overlock/segmentation", "overlock/detection", "overlock/compat.py", "overlock/data/__init__.py",
              "overlock/data/datasets.py", "overlock/data/coco_results.py", "overlock/metrics", "overlock/calibration", "overlock/inference/__init__.py",
              "overlock/inference/calibrated.py", "overlock/figures.py", *MODEL_CODE),
        loads=("overlock.models", "overlock.segmentation.backbone"),
        resume_inputs="overlock.segmentation.stage:input_fingerprint"),
    StageSpec(
        name="calibrate",
        help="temperature scaling on the held-out split; detector score calibration",
        entry="stages/calibrate.py", function="overlock.calibration.stage:run_calibrate",
        paths=_paths(data=DATASETS, classifier=CLASSIFIER, detector=DETECTOR,
                     out=("out", "calibration output directory", "models/calibration"),
                     metrics=("metrics", "DVC metrics JSON", "metrics/calibrate.json"),
                     plots=("plots", "DVC plots directory", "plots/calibrate", True, "reliability.csv")),
        result_params=("seed", "data.dataset", "data.detection_dataset", "model", "calibrate", "compute"),
        code=(*CLASSIFIER_AND_DETECTOR_CODE, "overlock/serving"),  # it registers the served models
        loads=("overlock.models", "overlock.detection.backbone", "overlock.detection.baseline_backbones"),
        datasets=("classification/calibration", "detection/calibration")),
    StageSpec(
        name="evaluate",
        help="accuracy, COCO AP, params/FLOPs, throughput, ERF, Grad-CAM and the report",
        entry="stages/evaluate.py", function="overlock.evaluation.stage:run_evaluate",
        paths=_paths(data=DATASETS, classifier=CLASSIFIER, detector=DETECTOR,
                     calibration=("in", "calibrate stage output", "models/calibration"),
                     segmenter=("in", "segment stage output", "models/segmenter", True, "", "", True),
                     out=("out", "report directory", "reports"),
                     metrics=("metrics", "DVC metrics JSON", "metrics/evaluate.json"),
                     plots=("plots", "DVC plots directory", "plots/evaluate", True, "per_class_accuracy.csv")),
        result_params=("seed", "data.dataset", "data.detection_dataset", "model", "finetune.detector",
                       "finetune.schedule", "calibrate.bins", "evaluate", "compute"),
        code=(*CLASSIFIER_AND_DETECTOR_CODE, "overlock/reference"),
        loads=("overlock.models", "overlock.detection.backbone", "overlock.detection.baseline_backbones"),
        datasets=("classification/val", "detection/val")),
)}


def is_operational(key: str) -> bool:
    """True for a dotted param key that only changes how a stage runs (see :data:`OPERATIONAL`)."""
    return any(key == op or key.startswith(op + ".") for op in OPERATIONAL)


def result_keys(spec: StageSpec, schema: dict) -> list[str]:
    """The stage's result params as dvc.yaml lists them: a whole section when none of its keys is
    operational, else its keys one by one without the operational ones. ``schema`` is a params dump."""
    keys: list[str] = []
    for item in spec.result_params:
        if is_operational(item):
            raise ValueError(f"stage {spec.name}: {item} is operational and cannot be a result param")
        value = _lookup(schema, item)
        if isinstance(value, dict) and any(is_operational(f"{item}.{k}") for k in value):
            keys += [f"{item}.{k}" for k in value if not is_operational(f"{item}.{k}")]
        else:
            keys.append(item)
    return keys


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def result_values(spec: StageSpec, schema: dict) -> dict:
    """``{key: value}`` of the stage's result params (the state directory hashes these)."""
    return {key: _lookup(schema, key) for key in result_keys(spec, schema)}


def command(spec: StageSpec) -> str:
    """The stage's dvc.yaml ``cmd``."""
    parts = [spec.entry_command, "--params params.yaml"]
    if spec.model_size_arg:
        parts.append("--model-size ${model.size}")
    parts += [f"{p.flag} {p.dvc}" for p in spec.paths]
    return " ".join(parts)


STAGE_ORDER = tuple(STAGES)
__all__ = ["PathOption", "StageSpec", "STAGES", "STAGE_ORDER", "OPERATIONAL", "KERNEL_CODE", "command",
           "is_operational", "result_keys", "result_values"]
