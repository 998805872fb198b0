"""The one place that talks to MLflow.

A pipeline execution is one parent run; each stage that runs is a child run. DVC runs stages as separate
processes, so the parent is found by a key: the DVC experiment name when set, otherwise the git commit plus
a hash of params.yaml. Every stage ends its own run FINISHED or FAILED (error as tag and artifact), copies
its summary metrics to the parent, and the last stage (``evaluate``) closes the parent. A RUNNING child left
by a killed process is marked FAILED by the next stage that finds it — unless the stage resumes it.

Logging goes through :class:`StageRun`, which wraps ``MlflowClient`` with an explicit run id, so Ray workers
(rank 0) can attach to the driver's run with :func:`attach_run`.

Every run records (DESIGN.md 2): params, git commit and dirty flag, the DVC experiment name and baseline
revision, torch/CUDA versions, CPU/GPU model, ``pip freeze``, MLflow system metrics (:class:`SystemMetrics`)
and, through the stage kernel (:mod:`overlock.pipeline.records`), its log, its datasets as MLflow inputs and
the dvc.lock hashes of its deps.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator


from overlock.compute import repo_root
from overlock.params import Params

LAST_STAGE = "evaluate"
TAG_KEY = "overlock.pipeline_key"
TAG_ROLE = "overlock.role"
TAG_STAGE = "overlock.stage"
TAG_CLOSED = "overlock.closed"
TAG_RESUME = "overlock.resume_key"


def store_root(root: Path | None = None) -> Path:
    """Where the default store lives: the repository the user runs DVC in. A queued or ``--temp`` experiment
    runs in a throw-away copy under ``.dvc/tmp/exps/``; DVC names the real repository in $DVC_ROOT, so its
    runs land in the same store as every other run (and not in the copy, deleted afterwards)."""
    if root is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return (root or repo_root()).resolve()


def tracking_uri(params: Params | None = None, root: Path | None = None) -> str:
    """``tracking.uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<repo>/mlflow.db`` made absolute
    (``<repo>``: :func:`store_root`)."""
    if params is not None and params.tracking.uri:
        uri = params.tracking.uri
    else:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{store_root(root) / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        return f"sqlite:///{(store_root(root) / rel).resolve()}"
    return uri


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _git(*args: str, root: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state(root: Path | None = None) -> tuple[str, bool]:
    """(commit or 'nogit', dirty flag) of the repository."""
    root = root or repo_root()
    commit = _git("rev-parse", "HEAD", root=root) or "nogit"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", root=root))
    return commit, dirty


def dvc_experiment_name() -> str:
    """The DVC experiment name when running under ``dvc exp run`` ('' otherwise)."""
    return os.environ.get("DVC_EXP_NAME", "")


def pipeline_key(root: Path | None = None) -> str:
    """Key shared by every stage of one pipeline execution (see the module docstring)."""
    exp = dvc_experiment_name()
    if exp:
        return f"exp:{exp}"
    root = root or repo_root()
    commit, _ = git_state(root)
    params_file = root / "params.yaml"
    digest = hashlib.sha256(params_file.read_bytes() if params_file.exists() else b"").hexdigest()[:12]
    return f"git:{commit[:12]}:params:{digest}"


def environment_tags() -> dict[str, str]:
    """torch/CUDA versions, CPU/GPU model, host and python: recorded on every run."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"env.torch": torch.__version__, "env.cuda": str(torch.version.cuda), "env.cpu": cpu,
            "env.gpu": gpu, "env.python": platform.python_version(), "env.host": socket.gethostname()}


def pip_freeze() -> str:
    """Installed distributions as ``name==version`` lines (like ``pip freeze``)."""
    dists = {(d.metadata["Name"] or "?"): d.version for d in importlib.metadata.distributions()}
    return "\n".join(f"{n}=={v}" for n, v in sorted(dists.items(), key=lambda kv: kv[0].lower())) + "\n"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (``model.size``), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """An MLflow run addressed by id; every logging call of the project goes through this class."""

    def __init__(self, uri: str, run_id: str, parent_id: str | None = None, stage: str = ""):
        self.uri, self.run_id, self.parent_id, self.stage = uri, run_id, parent_id, stage
        self.client = _client(uri)
        self.summary: dict[str, float] = {}

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log (flattened) params; values already logged with the same value are skipped."""
        from mlflow.entities import Param
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-finite values are skipped, not stored as NaN)."""
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and float(v) == float(v) and abs(float(v)) != float("inf")]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Log final metrics of the stage; they are also copied to the parent run on finish."""
        self.log_metrics(metrics)
        self.summary.update({k: float(v) for k, v in metrics.items() if v is not None})

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_datasets(self, records: list[dict], produced: bool = False) -> None:
        """Log dataset splits as MLflow dataset inputs (``mlflow.data``): name, digest, source (the split's
        folder or annotation file), profile (sizes) and the split as the input's context.
        ``records``: :func:`overlock.data.datasets.split_records`; ``produced``: the stage wrote them."""
        from mlflow.entities import DatasetInput, InputTag
        inputs = []
        for rec in records:
            dataset = _split_dataset(rec)
            tags = [InputTag("mlflow.data.context", rec["split"]), InputTag("overlock.task", rec["task"])]
            if produced:
                tags.append(InputTag("overlock.produced", "true"))
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_dvc_deps(self, hashes: dict[str, dict]) -> None:
        """The stage's dep hashes as DVC computes them for dvc.lock: tags ``input.<path>`` (md5) and the
        artifact ``dvc/deps.json`` (md5, size, nfiles)."""
        if not hashes:
            return
        self.set_tags({f"input.{path}": entry["md5"] for path, entry in hashes.items()})
        self.log_dict(hashes, "dvc/deps.json")

    def start_system_metrics(self, node_id: str | None = None) -> "SystemMetrics | None":
        """Start MLflow's system metrics for this run (see :class:`SystemMetrics`); None when unavailable."""
        try:
            return SystemMetrics(self, node_id=node_id).start()
        except Exception as err:  # noqa: BLE001 - e.g. psutil missing: the stage runs without them
            import logging
            logging.getLogger(__name__).warning("system metrics not recorded: %s", err)
            return None

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """Make this run the fluent API's active run (for ``mlflow.<flavor>.log_model``)."""
        import mlflow
        mlflow.set_tracking_uri(self.uri)
        if mlflow.active_run() and mlflow.active_run().info.run_id == self.run_id:
            yield mlflow.active_run()
            return
        run = mlflow.start_run(run_id=self.run_id)
        try:
            yield run
        finally:
            mlflow.end_run()  # marks FINISHED; the stage's own finish() decides the final status
            self.client.update_run(self.run_id, status="RUNNING")

    def log_pyfunc_model(self, name: str, python_model, *, artifacts: dict[str, str], code_paths: list[str],
                         input_example, pip_requirements: list[str], registered_name: str | None = None,
                         alias: str = "latest-pipeline", tags: dict[str, str] | None = None) -> str | None:
        """Log an MLflow pyfunc model (``python_model``: a ``mlflow.pyfunc.PythonModel``) into this run; its
        signature is inferred by running it on ``input_example`` (a DataFrame, or (DataFrame, params)).
        Register it as ``registered_name`` with ``alias`` and ``tags`` on the version; returns the version."""
        import sys

        import mlflow
        path = list(sys.path)
        with self.active():
            info = mlflow.pyfunc.log_model(name=name, python_model=python_model, artifacts=artifacts,
                                           code_paths=code_paths, input_example=input_example,
                                           pip_requirements=pip_requirements, tags=tags)
        sys.path[:] = path  # loading the example puts the model's (temporary) code/ first on the path
        if not registered_name:
            return None
        version = self.register(info.model_uri, registered_name, alias)
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(registered_name, version, key, str(value))
        return version

    def register(self, model_uri: str, registered_name: str, alias: str = "latest-pipeline") -> str:
        """Register ``model_uri`` in the model registry and point ``alias`` at the new version."""
        import mlflow
        mv = mlflow.register_model(model_uri, registered_name)
        self.client.set_registered_model_alias(registered_name, alias, mv.version)
        self.set_tags({f"registered.{registered_name}": mv.version})
        return str(mv.version)

    # -- lifecycle -------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        """End this run; copy the summary to the parent; close the parent after the last stage."""
        if error is not None:
            text = "".join(traceback.format_exception(error))
            self.set_tags({"overlock.error": f"{type(error).__name__}: {error}"[:5000]})
            with contextlib.suppress(Exception):
                self.log_text(text, "error.txt")
        self.client.set_terminated(self.run_id, status=status)
        if not self.parent_id:
            return
        if self.summary:
            self.client.log_batch(self.parent_id, metrics=[
                __import__("mlflow").entities.Metric(f"{self.stage}.{k}", v, int(time.time() * 1000), 0)
                for k, v in self.summary.items()])
        if status != "FINISHED":
            self.client.set_tag(self.parent_id, "overlock.failed_stage", self.stage)
            self.client.set_terminated(self.parent_id, status="FAILED")
        else:
            if self.stage == LAST_STAGE:
                self.client.set_tag(self.parent_id, TAG_CLOSED, "true")
            self.client.set_terminated(self.parent_id, status="FINISHED")


SYSTEM_METRICS_INTERVAL_S = 10.0


class SystemMetrics:
    """MLflow's system metrics of one run (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, disk, network and, where NVML sees GPUs, ``system/gpu_*``),
    sampled by MLflow's own monitors.

    One sample every ``interval`` seconds (10 s; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides), logged at
    once (a killed stage loses nothing already sampled), plus a last one at :meth:`stop`, so a stage shorter
    than the interval records one too. :meth:`stop` returns at once: the sampler waits on an event, not in a
    sleep. A resumed run continues the steps. ``node_id`` prefixes the keys (``system/<node>/...``)."""

    def __init__(self, run: StageRun, node_id: str | None = None, interval: float | None = None):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        self.run = run
        self._monitor = SystemMetricsMonitor(run.run_id, sampling_interval=interval or SYSTEM_METRICS_INTERVAL_S,
                                             resume_logging=True, node_id=node_id, tracking_uri=run.uri)
        self.interval = float(self._monitor.sampling_interval)
        self.prefix = "system/" + (f"{self._monitor.node_id}/" if self._monitor.node_id else "")
        self._step = self._monitor._logging_step
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "SystemMetrics":
        self._thread = threading.Thread(target=self._loop, daemon=True, name="system-metrics")
        self._thread.start()
        return self

    def _sample(self) -> None:
        self._monitor.collect_metrics()
        values = self._monitor.aggregate_metrics()
        for monitor in self._monitor.monitors:
            monitor.clear_metrics()
        self.run.log_metrics({self.prefix + k: v for k, v in values.items()}, step=self._step)
        self._step += 1

    def _loop(self) -> None:
        # prime psutil's CPU counters (kept per thread) so the first sample covers its interval, not 0 %
        self._monitor.collect_metrics()
        for monitor in self._monitor.monitors:
            monitor.clear_metrics()
        stopped = False
        while not stopped:
            stopped = self._stop.wait(self.interval)
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a store hiccup costs a sample, never the stage
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


def attach_run(uri: str, run_id: str) -> StageRun:
    """Attach to an existing run (e.g. from a Ray worker) to log into it."""
    return StageRun(uri, run_id)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (``<db dir>/mlartifacts``), so they
    follow the store wherever the stage runs (MLflow's default, ``./mlruns`` of the current directory, would
    put them into a Ray job's throw-away working-dir copy or a test's cwd); None (MLflow's choice) otherwise."""
    if uri.startswith("sqlite:////"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _split_dataset(rec: dict):
    """An ``mlflow.data`` dataset for one split record (:func:`overlock.data.datasets.split_records`)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    class SplitDataset(MetaDataset):
        """A split on disk: digest computed from its files, profile with its sizes."""

        @property
        def profile(self):
            return rec["profile"]

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(rec["profile"])}

    return SplitDataset(LocalArtifactDatasetSource(rec["source"]), name=rec["name"], digest=rec["digest"])


def _experiment_id(client, name: str, uri: str = "") -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _find_parent(client, exp_id: str, key: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_ROLE}` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=10)
    for run in runs:
        if run.data.tags.get(TAG_CLOSED) != "true":
            return run
    return None


def _fail_stale_children(client, exp_id: str, parent_id: str) -> None:
    host = socket.gethostname()
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                                      "attributes.status = 'RUNNING'")
    for run in runs:
        pid = int(run.data.tags.get("overlock.pid", "0") or 0)
        if run.data.tags.get("env.host") == host and pid and _pid_alive(pid):
            continue
        client.set_tag(run.info.run_id, "overlock.error", f"killed: process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, status="FAILED")


def start_stage(stage: str, params: Params, resume_key: str | None = None,
                root: Path | None = None) -> StageRun:
    """Find or create the pipeline's parent run and start (or resume) this stage's child run."""
    uri = tracking_uri(params, root)  # root None: $DVC_ROOT's store for a queued experiment (store_root)
    root = root or repo_root()
    client = _client(uri)
    exp_id = _experiment_id(client, params.tracking.experiment, uri)
    key = pipeline_key(root)
    commit, dirty = git_state(root)
    exp_name = dvc_experiment_name()
    common = {TAG_KEY: key, "git.commit": commit, "git.dirty": str(dirty).lower(),
              "dvc.experiment": exp_name or "(none)", "mlflow.source.git.commit": commit}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        common["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]

    parent = _find_parent(client, exp_id, key)
    if parent is None:
        name = f"pipeline {exp_name}" if exp_name else f"pipeline {commit[:8]}"
        parent_id = client.create_run(exp_id, run_name=name, tags={**common, TAG_ROLE: "pipeline"}).info.run_id
        client.log_batch(parent_id, params=[__import__("mlflow").entities.Param(k, str(v)[:6000])
                                            for k, v in flatten(params.model_dump(mode="json")).items()])
    else:
        parent_id = parent.info.run_id
        client.update_run(parent_id, status="RUNNING")
        _fail_stale_children(client, exp_id, parent_id)

    run_id = None
    if resume_key:
        prior = client.search_runs([exp_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TAG_STAGE}` = '{stage}' and "
            f"tags.`{TAG_RESUME}` = '{resume_key}'"), order_by=["attributes.start_time DESC"], max_results=1)
        if prior and prior[0].info.status != "FINISHED":
            run_id = prior[0].info.run_id
            client.update_run(run_id, status="RUNNING")
    if run_id is None:
        tags = {**common, TAG_ROLE: "stage", TAG_STAGE: stage, "mlflow.parentRunId": parent_id}
        if resume_key:
            tags[TAG_RESUME] = resume_key
        run_id = client.create_run(exp_id, run_name=stage, tags=tags).info.run_id
    run = StageRun(uri, run_id, parent_id, stage)
    run.set_tags({"overlock.pid": os.getpid(), **environment_tags()})
    run.log_params(params.model_dump(mode="json"))
    with tempfile.TemporaryDirectory() as tmp:
        freeze = Path(tmp) / "pip_freeze.txt"
        freeze.write_text(pip_freeze())
        run.log_artifact(freeze, "environment")
    return run


@contextlib.contextmanager
def stage_run(stage: str, params: Params, resume_key: str | None = None) -> Iterator[StageRun]:
    """Context manager: the stage's child run, ended FINISHED, or FAILED with the error on an exception."""
    run = start_stage(stage, params, resume_key=resume_key)
    system = run.start_system_metrics()
    try:
        yield run
    except BaseException as err:  # KeyboardInterrupt/SystemExit too: nothing is left RUNNING
        if system is not None:
            system.stop()
        with contextlib.suppress(Exception):
            run.finish("FAILED", error=err)
        raise
    else:
        if system is not None:
            system.stop()
        run.finish("FINISHED")


def write_metrics_file(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a DVC metrics JSON (atomically)."""
    from overlock.state import write_json_atomic
    write_json_atomic(Path(path), metrics)


__all__ = ["StageRun", "SystemMetrics", "attach_run", "start_stage", "stage_run", "tracking_uri", "pipeline_key",
           "write_metrics_file"]
