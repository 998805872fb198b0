"""The stage kernel: the console script from any directory, help texts from the descriptions, the state
directory (result vs operational params), atomic publication and compute configured explicitly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from overlock.params import parse_params
from overlock.pipeline.context import StageContext, code_digest, open_stage
from overlock.pipeline.spec import STAGES

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, pythonpath: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def package_only(tmp_path_factory) -> Path:
    """The ``overlock`` package alone (no stages/, pipelines/), as an installed wheel has it."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(REPO / "overlock", site / "overlock", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_console_script_runs_a_stage_outside_the_repository(package_only, tmp_path):
    """``overlock download`` with only the package installed, from an unrelated directory (it used to fail
    with ``ModuleNotFoundError: stages``); ``overlock <stage> --help`` names a command that exists."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    help_out = _run(["-m", "overlock", "pretrain", "--help"], work, package_only)
    assert help_out.returncode == 0, help_out.stderr
    assert help_out.stdout.startswith("usage: overlock pretrain ") and "--data" in help_out.stdout
    params = {"data": {"detection_dataset": "none",
                       "demo": {"num_classes": 2, "train_per_class": 4, "val_per_class": 2, "image_size": 16}},
              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run(["-m", "overlock", "download", "--params", "params.yaml", "--out", "archives"], work, package_only,
               OVERLOCK_REPO=str(work))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "archives" / "MANIFEST.json").is_file()


@pytest.mark.parametrize("stage", list(STAGES))
def test_entry_point_help_names_itself(stage):
    """``python -m stages.x --help`` / ``python pipelines/pretrain.py --help``: usage names that very command
    and lists every path option of the description."""
    spec = STAGES[stage]
    args = ["-m", spec.entry[:-3].replace("/", ".")] if spec.entry.startswith("stages/") else [spec.entry]
    out = _run([*args, "--help"], REPO, REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {spec.entry_command} ")
    for option in spec.paths:
        assert option.flag in out.stdout


def _ctx(tmp_path: Path, raw: dict, stage: str = "calibrate") -> StageContext:
    paths = {p.name: tmp_path / p.dvc for p in STAGES[stage].paths}
    return StageContext(STAGES[stage], parse_params(raw), paths)


def test_state_dir_changes_with_result_params_only(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    base = _ctx(tmp_path, {}).state_dir
    assert base.is_dir() and base.parent == tmp_path / ".overlock/state/calibrate"
    for operational in ({"tracking": {"experiment": "other", "uri": "sqlite:////x.db"}},
                        {"compute": {"threads": 7}}):
        assert _ctx(tmp_path, operational).state_dir == base, operational
    for result in ({"calibrate": {"bins": 10}}, {"model": {"size": "t"}}, {"seed": 1},
                   {"compute": {"precision": "bf16"}}):
        assert _ctx(tmp_path, result).state_dir != base, result
    # a param another stage reads does not move this stage's state
    assert _ctx(tmp_path, {"pretrain": {"lr": 0.5}}).state_dir == base


def test_pretrain_state_dir_ignores_operational_pretrain_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    base = _ctx(tmp_path, {}, "pretrain")
    assert base.resume_key == base.state_dir.name  # resumable: the MLflow resume key is the state hash
    ops = {"pretrain": {"log_every_steps": 1, "ray_address": "ray://h:1", "storage_path": "/s", "max_failures": 5,
                        "checkpoints_to_keep": 9, "num_data_workers": 4, "cpus_per_worker": 3,
                        "callbacks": ["fault_hooks:PoisonLoss"]}}
    assert _ctx(tmp_path, ops, "pretrain").state_dir == base.state_dir
    assert _ctx(tmp_path, {"pretrain": {"epochs": 9}}, "pretrain").state_dir != base.state_dir
    assert _ctx(tmp_path, {}, "calibrate").resume_key is None  # not resumable


def test_code_digest_follows_file_contents(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    before = code_digest(("pkg", "b.py"), root=tmp_path)
    assert code_digest(("b.py", "pkg"), root=tmp_path) == before
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert code_digest(("pkg", "b.py"), root=tmp_path) != before


def test_publish_replaces_the_output_only_when_complete(tmp_path):
    ctx = _ctx(tmp_path, {})
    out = ctx["out"]
    with pytest.raises(RuntimeError, match="half way"):
        with ctx.publish() as staging:
            (staging / "temperature.json").write_text("{}")
            raise RuntimeError("half way")
    assert not out.exists() and not list(out.parent.glob(".*staging*"))
    with ctx.publish() as staging:
        (staging / "temperature.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["temperature.json"]
    with ctx.publish() as staging:  # a re-run replaces the whole directory (no stale files)
        (staging / "other.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["other.json"]
    assert not list(out.parent.glob(".*staging*"))


def test_contmix_backend_is_configured_explicitly_not_from_the_environment(tmp_path, monkeypatch):
    """``compute.contmix_backend`` reaches the model code through ``configure`` (as in every Ray/torchrun
    worker); a stray environment variable does not override it; the stage restores the process default."""
    from overlock.backends import contmix_backend
    from overlock.models import contmix

    called = []
    for name in ("gather", "fast"):
        impl = contmix._IMPLEMENTATIONS[name]
        monkeypatch.setitem(contmix._IMPLEMENTATIONS, name,
                            lambda *a, _n=name, _f=impl: (called.append(_n), _f(*a))[1])
    monkeypatch.setenv(contmix.BACKEND_ENV_VAR, "fast")
    monkeypatch.setenv("OVERLOCK_REPO", str(tmp_path))
    attn, value = torch.rand(1, 1, 5, 5, 9).softmax(-1), torch.rand(1, 1, 5, 5, 4)
    params = parse_params({"compute": {"contmix_backend": "gather"}})
    before = contmix_backend()
    with open_stage("calibrate", params, track=False, **{p.name: tmp_path / p.name for p in STAGES["calibrate"].paths}):
        assert contmix_backend() == "gather"
        contmix.na2d_av(attn, value, 3)
    assert contmix_backend() == before
    assert called == ["gather"]


def test_production_code_reads_no_test_switches():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "overlock").rglob("*.py") if "OVERLOCK_TEST_" in p.read_text()]
    assert not offenders, f"test hooks belong to the tests (pretrain.callbacks), not to {offenders}"


def _runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (imports under ``if TYPE_CHECKING:`` left out)."""
    import ast

    names: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text()))
    return names


def test_library_below_the_kernel_does_not_import_it():
    """Stage functions get their context passed in; only cli.py (the console script) sits above the kernel."""
    offenders = []
    for path in (REPO / "overlock").rglob("*.py"):
        rel = path.relative_to(REPO / "overlock")
        if rel.parts[0] == "pipeline" or rel.name in ("cli.py", "__main__.py"):
            continue
        if any(m == "overlock.pipeline" or m.startswith("overlock.pipeline.") for m in _runtime_imports(path)):
            offenders.append(str(rel))
    assert not offenders, f"import the stage kernel only under TYPE_CHECKING: {offenders}"
