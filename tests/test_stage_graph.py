"""dvc.yaml cannot go stale: it matches the stage descriptions, each stage's deps cover the code it imports
(function-level imports included), and real DVC sees a code or result-param change, but not an operational
param change (a temporary git + DVC repository with the project's code and a committed dvc.lock)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from overlock.pipeline.closure import import_closure
from overlock.pipeline.dvcgraph import check_dvc_yaml, covered, uncovered_code
from overlock.pipeline.spec import OPERATIONAL, STAGES, is_operational, result_keys

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_dvc_yaml_matches_the_stage_descriptions():
    problems = check_dvc_yaml(REPO / "dvc.yaml")
    assert not problems, "dvc.yaml differs from overlock/pipeline/spec.py (regenerate the stages with " \
                         "`python -m overlock.pipeline.dvcgraph`):\n" + "\n".join(problems)


@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_cover_the_code_the_stage_imports(stage):
    missing = uncovered_code(STAGES[stage], REPO)
    assert not missing, f"stage {stage} runs {missing} but its deps in overlock/pipeline/spec.py (and dvc.yaml) " \
                        "do not cover them: add the file or its package to the stage's `code`"


def test_closure_follows_function_level_and_relative_imports(tmp_path):
    """What the coverage test relies on: imports inside functions, ``from pkg import module`` and relative
    imports are followed; a file imported only inside a function is reported when no dep covers it."""
    pkg = tmp_path / "overlock"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("import json\n\ndef run():\n    from overlock.sub import inner\n    return inner\n")
    (pkg / "sub" / "inner.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    import overlock.sub.deep\n")
    (pkg / "sub" / "deep.py").write_text("")
    closure = {str(p) for p in import_closure(tmp_path, ["overlock.top:run"])}
    assert closure == {"overlock/__init__.py", "overlock/top.py", "overlock/sub/__init__.py",
                       "overlock/sub/inner.py", "overlock/sub/leaf.py", "overlock/sub/deep.py"}
    deps = ("overlock/__init__.py", "overlock/top.py", "overlock/sub/__init__.py", "overlock/sub/inner.py",
            "overlock/sub/leaf.py")
    assert [p for p in sorted(closure) if not covered(p, deps)] == ["overlock/sub/deep.py"]
    assert covered("overlock/sub/deep.py", ("overlock/sub",)) and not covered("overlock/subx.py", ("overlock/sub",))


def test_every_param_is_a_result_of_some_stage_or_operational():
    """The descriptions are the one place that says which param is which: none is left unassigned, and no
    stage lists an operational param among its results."""
    from overlock.params import Params
    schema = Params().model_dump(mode="json")
    results = {key for spec in STAGES.values() for key in result_keys(spec, schema)}
    for key in results:
        assert not is_operational(key), key
    leaves = [s for s, v in schema.items() if not isinstance(v, dict)] + \
        [f"{s}.{k}" for s, v in schema.items() if isinstance(v, dict) for k in v]
    unassigned = [k for k in leaves if not is_operational(k) and k not in results and k.split(".")[0] not in results]
    assert not unassigned, f"params neither a result of a stage nor operational: {unassigned}"
    assert {"tracking", "compute.threads", "pretrain.ray_address", "pretrain.log_every_steps"} <= set(OPERATIONAL)


# ------------------------------------------------------------------------------------------ real DVC
def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return proc


def _changed(repo: Path) -> dict[str, list[str]]:
    """Stage -> what changed (``changed deps``/``changed params``/...), from ``dvc status --json``."""
    status = json.loads(_dvc(repo, "status", "--json").stdout or "{}")
    return {stage: sorted(k for entry in entries if isinstance(entry, dict) for k in entry)
            for stage, entries in status.items()}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """The project's code, dvc.yaml and params.yaml in a new git + DVC repository, every stage's outputs stood
    in by small files and committed (dvc.lock), so ``dvc status`` starts clean."""
    repo = tmp_path_factory.mktemp("dvc_repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("overlock", "stages", "pipelines"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    for spec in STAGES.values():
        for option in spec.paths:
            path = repo / option.dvc
            if option.role == "metrics":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            elif option.role == "plots":
                path.mkdir(parents=True, exist_ok=True)
                (path / option.plot_file).write_text("x,y\n0,0\n")
            elif option.role == "out":
                path.mkdir(parents=True, exist_ok=True)
                (path / "stand-in.txt").write_text(option.name)
                if option.manifest:  # DVC tracks the manifest inside the tree (data/datasets/MANIFEST.json)
                    (path / option.manifest).write_text("{}\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    _dvc(repo, "commit", "-f", "-q")
    assert _changed(repo) == {}
    return repo


def _edited(path: Path, text: str):
    """Context: append ``text`` to ``path``, restore it afterwards."""
    import contextlib

    @contextlib.contextmanager
    def edit():
        old = path.read_text()
        path.write_text(old + text)
        try:
            yield
        finally:
            path.write_text(old)
    return edit()


def _params_set(repo: Path, **changes):
    """Context: set dotted params in params.yaml (``tracking__experiment="x"``), restore afterwards."""
    import contextlib

    @contextlib.contextmanager
    def edit():
        path = repo / "params.yaml"
        old = path.read_text()
        raw = yaml.safe_load(old)
        for key, value in changes.items():
            section, _, name = key.partition("__")
            raw[section][name] = value
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            yield
        finally:
            path.write_text(old)
    return edit()


@pytest.mark.parametrize("path, stages", [
    ("overlock/data/datasets.py", {"download", "extract", "pretrain", "finetune", "segment", "calibrate",
                                   "evaluate"}),
    ("overlock/compat.py", {"finetune", "segment", "calibrate", "evaluate"}),
    ("overlock/training/recipe.py", {"pretrain"}),
])
def test_editing_covered_code_marks_exactly_its_stages_changed(dvc_repo, path, stages):
    with _edited(dvc_repo / path, "\n# an edit\n"):
        changed = _changed(dvc_repo)
    assert set(changed) == stages, changed
    assert all(kinds == ["changed deps"] for kinds in changed.values()), changed


def test_operational_params_rerun_nothing_result_params_do(dvc_repo):
    with _params_set(dvc_repo, tracking__experiment="renamed", tracking__uri="sqlite:////tmp/elsewhere.db",
                     tracking__register_models=False, compute__threads=3, pretrain__log_every_steps=50,
                     pretrain__ray_address="ray://head:10001", pretrain__storage_path="/mnt/ray",
                     pretrain__num_data_workers=8, pretrain__max_failures=3, data__download_retries=9,
                     finetune__checkpoint_interval=7,
                     pretrain__callbacks=[{"target": "fault_hooks:PoisonLoss", "kwargs": {"step": 3}}]):
        assert _changed(dvc_repo) == {}
    with _params_set(dvc_repo, pretrain__lr=0.01):
        assert set(_changed(dvc_repo)) == {"pretrain"}
    with _params_set(dvc_repo, calibrate__bins=10):
        assert set(_changed(dvc_repo)) == {"calibrate", "evaluate"}
