"""Pretraining on a real multi-node Ray cluster on one machine (issue 21): a head and two worker nodes, each
its own ``ray start --block`` process tree, that cannot import this repository (the job brings the code with
``--working-dir``). One job is submitted as the README's cluster section does; a worker node is SIGKILLed
mid-epoch (elastic: training continues on the node left), then the job's driver is killed and the same job
submitted again (it resumes the same Ray run and the same MLflow child run)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from mlflow_serving import free_port, hidden_env
from test_pretrain import demo_data  # noqa: F401  (the fixture: 4 colour classes of 32 px)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TINY = {"depth": [1, 1, 1, 1], "sub_depth": [1, 1], "embed_dim": [16, 32, 32, 48], "sub_num_heads": [1, 2],
        "projection": 64}
SLOT = "trainer_slot"  # one per worker node: one training worker lands on each node
START_TIMEOUT = 180


class Node:
    """One ``ray start --block`` process (its own session) and everything it started."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        agent_ports = [f"--{opt}={free_port()}" for opt in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port")]
        self.proc = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", *args, *agent_ports],
                                     env=env, cwd=logs, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tree(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        return []

    def holds(self, pid: int) -> bool:
        return pid in {p.pid for p in self.tree()}

    def kill(self) -> None:
        """SIGKILL the node: ``ray start``, its raylet and every worker process on it."""
        procs = self.tree()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"{self.name}: still alive after SIGKILL: {alive}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


_T0 = time.monotonic()


def _log(what: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {what}", flush=True)


def _wait(what: str, ready, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s; logs:\n" + "\n".join(
                f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists()))
        time.sleep(1)


def _alive_nodes(dashboard: str) -> list[dict]:
    try:
        with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as resp:
            summary = json.loads(resp.read())["data"]["summary"]
    except (OSError, KeyError, ValueError):
        return []
    return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (no training slot: the job's driver runs here) + two worker nodes with one ``trainer_slot`` each.

    All three run in :func:`mlflow_serving.hidden_env`: this repository is off their path and every open of a
    file in it is refused and logged, so the workers can only use the code the job uploads."""
    base = tmp_path_factory.mktemp("cluster")
    env = hidden_env(base, f"sqlite:///{base}/unused.db")
    env.pop("MLFLOW_TRACKING_URI")
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway cluster on 127.0.0.1
    env["RAY_raylet_start_wait_time_s"] = "120"  # Ray's 60 s is short on a loaded 2-core machine
    gcs, dash = free_port(), free_port()
    temp = Path(f"/tmp/rc{os.getpid()}_{gcs}")  # Ray's socket paths must stay short
    head = Node("head", ["--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
                         f"--ray-client-server-port={free_port()}"], env, base)
    dashboard = f"http://127.0.0.1:{dash}"
    workers = []
    try:
        _wait("the head's dashboard answers", lambda: bool(_alive_nodes(dashboard)), START_TIMEOUT, [head.log])
        for i in (1, 2):  # one after the other: nodes registering at once time out on a loaded machine
            workers.append(Node(f"worker{i}", [f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                                               f"--resources={json.dumps({SLOT: 1})}"], env, base))
            _wait(f"{i + 1} nodes are alive", lambda n=i + 1: len(_alive_nodes(dashboard)) == n, START_TIMEOUT,
                  [head.log, *(w.log for w in workers)])
        yield {"dashboard": dashboard, "head": head, "workers": workers, "env": env, "base": base}
    finally:
        for node in [*workers, head]:
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _job_dir(tmp: Path) -> Path:
    """A copy of the checkout's files that git does not ignore: what ``ray job submit --working-dir .`` uploads
    from a user's clone (Ray leaves out what .gitignore lists: .venv, data, stores)."""
    work = tmp / "project"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    # the test's fault hooks at the top, where driver and workers import from (site-packages has a `tests`)
    shutil.copy(REPO / "tests" / "fault_hooks.py", work / "fault_hooks.py")
    return work


def _submit(cluster: dict, work: Path, submission_id: str, out: Path, data: Path) -> None:
    """``ray job submit --no-wait`` as in the README's cluster section."""
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--submission-id", submission_id,
           "--working-dir", ".", "--no-wait", "--",
           "python", "pipelines/pretrain.py", "--params", "params.yaml", "--data", str(data),
           "--out", str(out / "classifier"), "--metrics", str(out / "pretrain.json"), "--plots", str(out / "plots")]
    for _ in range(30):  # the dashboard answers before its job agent is ready
        job = subprocess.run(cmd, cwd=work, env=cluster["env"], capture_output=True, text=True, timeout=300)
        if "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]


def _job(cluster: dict, submission_id: str) -> dict:
    with urllib.request.urlopen(f"{cluster['dashboard']}/api/jobs/{submission_id}", timeout=10) as resp:
        return json.loads(resp.read())


def _job_logs(cluster: dict, submission_id: str) -> str:
    try:
        with urllib.request.urlopen(f"{cluster['dashboard']}/api/jobs/{submission_id}/logs", timeout=10) as resp:
            return json.loads(resp.read()).get("logs", "")
    except urllib.error.URLError as err:
        return f"(no logs: {err})"


def _wait_job(cluster: dict, submission_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _job(cluster, submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise AssertionError(f"job {submission_id} still running after {timeout}s:\n"
                         + _job_logs(cluster, submission_id)[-4000:])


def _wait_file(path: Path, cluster: dict, submission_id: str, timeout: float = 600) -> int:
    """Wait for a pid file the fault hook writes; fail early with the job's log when the job ended."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        status = _job(cluster, submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never appeared (job {status}):\n"
                                 + _job_logs(cluster, submission_id)[-4000:])
        time.sleep(0.5)
    time.sleep(0.2)  # the pid is written before the file is closed
    return int(path.read_text())


@pytest.mark.slow
def test_job_on_two_nodes_survives_a_lost_node_and_a_killed_driver(cluster, demo_data, tmp_path):
    work, out, hooks = _job_dir(tmp_path), tmp_path / "out", tmp_path / "hooks"
    hooks.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # absolute: every node and both submissions use one store
    epochs = 3
    raw = {"seed": 0, "model": {"overrides": TINY},
           "pretrain": {"epochs": epochs, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-4, "warmup_epochs": 0,
                        "input_size": 32, "workers": 2, "min_workers": 1, "worker_resources": {SLOT: 1},
                        "cpus_per_worker": 1, "ema_decay": 0.7, "log_every_steps": 1, "max_failures": 1,
                        "storage_path": str(tmp_path / "ray"),
                        "callbacks": [{"target": "fault_hooks:HoldAfterFirstStep",
                                       "kwargs": {"pid_dir": str(hooks), "hold_s": 120, "epochs": [1, 2]}},
                                      {"target": "fault_hooks:RecordCompute",
                                       "kwargs": {"out_dir": str(hooks)}}]},
           "tracking": {"uri": uri, "register_models": False}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))

    # 1. the job runs one training worker on each worker node
    _log("cluster up")
    _submit(cluster, work, "pretrain-1", out, demo_data)
    pids = {r: _wait_file(hooks / f"rank{r}_epoch1.pid", cluster, "pretrain-1") for r in (0, 1)}  # 0-based
    _log("epoch 2 started")
    node_of = {r: [w for w in cluster["workers"] if w.holds(pid)] for r, pid in pids.items()}
    assert [len(v) for v in node_of.values()] == [1, 1] and node_of[0][0] is not node_of[1][0], \
        "the two training workers did not land one per worker node"

    # 2. the node of rank 1 is lost mid-epoch 2: SIGKILL its raylet, its training worker, everything on it
    lost = node_of[1][0]
    lost.kill()
    assert not psutil.pid_exists(pids[1]), "the training worker of the killed node survived"
    (hooks / "release_epoch1").touch()
    _log("node killed")

    # 3. elastic: training goes on with the one worker left (from the epoch-1 checkpoint); then the driver dies
    _wait_file(hooks / "rank0_epoch2.pid", cluster, "pretrain-1")
    _log("epoch 3 started")
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("overlock-pipeline")
    (child,) = client.search_runs([exp.experiment_id], "tags.`overlock.stage` = 'pretrain'")
    driver = int(child.data.tags["overlock.pid"])
    assert cluster["head"].holds(driver), "the job's driver does not run on the head node"
    os.kill(driver, signal.SIGKILL)
    assert _wait_job(cluster, "pretrain-1", 120) == "FAILED"
    (hooks / "release_epoch2").touch()
    _log("driver killed")

    # 4. the same job submitted again resumes the same Ray run and the same MLflow child run
    _submit(cluster, work, "pretrain-2", out, demo_data)
    status = _wait_job(cluster, "pretrain-2", 600)
    _log("second job ended")
    assert status == "SUCCEEDED", _job_logs(cluster, "pretrain-2")[-4000:]
    runs = client.search_runs([exp.experiment_id], "tags.`overlock.stage` = 'pretrain'")
    assert [r.info.run_id for r in runs] == [child.info.run_id]
    assert runs[0].info.status == "FINISHED"
    history = lambda key: sorted(m.step for m in client.get_metric_history(child.info.run_id, key))  # noqa: E731
    assert history("val_top1") == list(range(1, epochs + 1))  # no epoch lost or repeated
    world = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "world_size")}
    assert world == {1: 2, 2: 1, 3: 1}, world
    batch = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "global_batch")}
    assert set(batch.values()) == {16.0}, batch  # keep_global_batch: 1 worker takes 16 per step
    assert history("train/loss") == list(range(1, epochs * 9 + 1))  # no step lost or duplicated
    assert client.get_run(child.info.run_id).data.params["elastic.workers"] == "1..2"
    # resumed after epoch 1 (node lost) and after epoch 2 (driver killed); the final checkpoint is epoch 3
    assert (hooks / "resumed_rank0.txt").read_text().split() == ["1", "2"]
    assert torch.load(out / "classifier" / "final.pth", weights_only=True)["epoch"] == epochs
    ray_runs = [p.name for p in (tmp_path / "ray").iterdir() if p.is_dir()]
    assert len(ray_runs) == 1 and ray_runs[0].startswith("pretrain-"), ray_runs

    # 5. the code came with the job: workers imported overlock from the uploaded copy, never this checkout
    for rank in (0, 1):
        record = json.loads((hooks / f"compute_rank{rank}.json").read_text())
        assert not record["library"].startswith(str(REPO)) and "working_dir_files" in record["library"], record
    hidden = cluster["base"] / "hidden_opens.log"
    assert not hidden.exists(), hidden.read_text()[:2000]
