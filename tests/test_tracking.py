"""MLflow lineage: one parent run per pipeline execution, one child per stage, nothing left RUNNING."""
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from overlock import tracking
from overlock.params import parse_params


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A tiny repo root (params.yaml + dvc.yaml) with its own sqlite store."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  download:\n    cmd: x\n    deps: [params.yaml]\n")
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _params(store, name):
    return parse_params({"tracking": {"uri": store, "experiment": name}})


def _runs(store, name):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id])


def test_stages_share_one_parent_and_last_stage_closes_it(repo, store):
    params = _params(store, "lineage")
    for stage in ("download", "extract", "evaluate"):
        with tracking.stage_run(stage, params) as run:
            run.log_summary({"score": 1.0 if stage == "evaluate" else 0.5})
    client, runs = _runs(store, "lineage")
    parents = [r for r in runs if r.data.tags.get("overlock.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("overlock.role") == "stage"]
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parents[0].data.metrics["evaluate.score"] == 1.0
    assert parents[0].data.tags[tracking.TAG_CLOSED] == "true"
    child = children[0]
    for tag in ("git.commit", "git.dirty", "dvc.experiment", "env.torch", "env.cpu", "overlock.stage"):
        assert tag in child.data.tags
    assert child.data.params["model.size"] == "xt"
    assert any(a.path == "environment" for a in client.list_artifacts(child.info.run_id))
    # a new execution after the closed one gets a new parent
    with tracking.stage_run("download", params):
        pass
    _, runs = _runs(store, "lineage")
    assert len([r for r in runs if r.data.tags.get("overlock.role") == "pipeline"]) == 2


def test_failed_stage_marks_child_and_parent_failed_with_error(repo, store):
    params = _params(store, "failing")
    with pytest.raises(RuntimeError):
        with tracking.stage_run("extract", params):
            raise RuntimeError("corrupt archive foo.tar")
    _, runs = _runs(store, "failing")
    child = next(r for r in runs if r.data.tags.get("overlock.role") == "stage")
    parent = next(r for r in runs if r.data.tags.get("overlock.role") == "pipeline")
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    assert "corrupt archive foo.tar" in child.data.tags["overlock.error"]
    assert parent.data.tags["overlock.failed_stage"] == "extract"


def test_killed_stage_is_marked_failed_by_next_stage(repo, store):
    params = _params(store, "killed")
    code = ("import os; from overlock import tracking; from overlock.params import parse_params;"
            f"r = tracking.start_stage('pretrain', parse_params({{'tracking': {{'uri': {store!r}, 'experiment': 'killed'}}}}));"
            "os._exit(9)")
    proc = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ}, cwd=repo)
    assert proc.returncode == 9
    with tracking.stage_run("finetune", params):
        pass
    _, runs = _runs(store, "killed")
    by_stage = {r.data.tags.get("overlock.stage"): r for r in runs if r.data.tags.get("overlock.role") == "stage"}
    assert by_stage["pretrain"].info.status == "FAILED"
    assert "killed" in by_stage["pretrain"].data.tags["overlock.error"]
    assert by_stage["finetune"].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_resume_key_continues_the_same_child_run(repo, store):
    params = _params(store, "resume")
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("pretrain", params, resume_key="abc") as run:
            first = run.run_id
            run.log_metrics({"loss": 1.0}, step=1)
            raise KeyboardInterrupt
    with tracking.stage_run("pretrain", params, resume_key="abc") as run:
        assert run.run_id == first
        run.log_metrics({"loss": 0.5}, step=2)
        assert run.metric_history("loss") == [(1, 1.0), (2, 0.5)]
    with tracking.stage_run("pretrain", params, resume_key="other") as run:
        assert run.run_id != first


def test_pipeline_key_prefers_dvc_experiment(repo, monkeypatch):
    key = tracking.pipeline_key(repo)
    (repo / "params.yaml").write_text("seed: 1\n")
    assert tracking.pipeline_key(repo) != key
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tuna")
    assert tracking.pipeline_key(repo) == "exp:bushy-tuna"


def test_default_uri_is_absolute_sqlite_at_repo_root(repo):
    assert tracking.tracking_uri(parse_params({}), repo) == f"sqlite:///{repo.resolve()}/mlflow.db"
    rel = parse_params({"tracking": {"uri": "sqlite:///runs/m.db"}})
    assert tracking.tracking_uri(rel, repo) == f"sqlite:///{repo.resolve()}/runs/m.db"


def test_artifacts_live_beside_the_sqlite_store_not_in_the_working_directory(repo, tmp_path_factory,
                                                                             monkeypatch):
    """A stage run from another directory (a Ray job's working-dir copy, a test) logs its artifacts next to the
    store: MLflow's default would write ./mlruns into whatever directory the process runs in."""
    store_dir = tmp_path_factory.mktemp("store")
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    params = parse_params({"tracking": {"uri": f"sqlite:///{store_dir / 'mlflow.db'}", "experiment": "art"}})
    note = repo / "note.txt"
    note.write_text("hello")
    with tracking.stage_run("download", params) as run:
        run.log_artifact(note, "notes")
    assert list(store_dir.glob("mlartifacts/**/notes/note.txt")), sorted(store_dir.rglob("*"))
    assert not (elsewhere / "mlruns").exists()


# ---- complete run records (issue 20, item 3) ----------------------------------------------------------------
def test_queued_experiment_logs_into_the_dvc_repository_store(repo, monkeypatch, tmp_path_factory):
    """DVC runs a queued experiment in a copy under .dvc/tmp/exps/ and names the real repository in
    $DVC_ROOT: the default store is the real repository's, not the copy's (deleted afterwards)."""
    copy = tmp_path_factory.mktemp("exps") / "tmpcopy"
    copy.mkdir()
    monkeypatch.setenv("OVERLOCK_REPO", str(copy))
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.tracking_uri(parse_params({})) == f"sqlite:///{repo.resolve()}/mlflow.db"


def test_system_metrics_record_a_stage_shorter_than_the_interval(repo, store):
    params = _params(store, "system")
    with tracking.stage_run("download", params) as run:
        pass
    client = MlflowClient(store)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert len(client.get_metric_history(run.run_id, key)) == 1, key
    assert client.get_run(run.run_id).data.metrics["system/system_memory_usage_megabytes"] > 0


def test_stage_log_copies_the_output_of_the_process_and_its_children(tmp_path, capfd):
    """The tee works on file descriptors 1 and 2: a child process's output is logged and still shown."""
    from overlock.pipeline.records import StageLog
    log = StageLog(tmp_path / "logs" / "stage.log").start()
    os.write(1, b"from the stage\n")
    subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                   check=True)
    log.write("written to the log only\n")
    log.stop()
    os.write(1, b"after stop\n")
    text = (tmp_path / "logs" / "stage.log").read_text()
    assert all(line in text for line in ("from the stage", "child out", "child err", "written to the log only"))
    assert "after stop" not in text
    out, err = capfd.readouterr()
    assert "from the stage" in out and "child out" in out and "after stop" in out and "child err" in err


def test_stage_log_keeps_the_lines_of_stdout_and_stderr_whole(tmp_path, capfd):
    """A line of stdout written in pieces (``print`` writes the text, then the newline) is not split by a line
    of stderr written in between: the log holds the same lines the user saw on the two streams."""
    import time

    from overlock.pipeline.records import StageLog
    log = StageLog(tmp_path / "stage.log").start()
    os.write(1, b"Done (t=0.00s)")
    time.sleep(0.2)  # the pumps have read the partial line before the warning arrives
    os.write(2, b"UserWarning: a warning\n")
    time.sleep(0.2)
    os.write(1, b"\nno newline at the end")
    log.stop()
    lines = (tmp_path / "stage.log").read_text().splitlines()
    assert sorted(lines) == sorted(["Done (t=0.00s)", "UserWarning: a warning", "no newline at the end"]), lines
    capfd.readouterr()
