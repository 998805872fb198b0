"""The packages of ``overlock`` import each other one way only (no cycles) and keep their layers.

Every module is parsed with ``ast`` (nothing is imported): ``import``/``from ... import`` statements anywhere
in the file (function-level ones included) and ``importlib.import_module``/``__import__`` calls with a literal
name are its imports. A package is ``overlock.<name>`` (a subpackage, or a top-level module such as
``overlock.params``). Catalog entries name their classes as ``"module:Name"`` strings resolved at call time
(like timm's entrypoints); those are data, not imports, and are not counted.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "overlock"
UNPACKAGED = ("stages", "pipelines")  # the repository's entry points: not installed with the package

# which overlock packages each layer may import (besides itself); everything else is above it
MODELS_MAY_IMPORT = {"overlock.catalog", "overlock.backends"}  # both leaf modules
DATA_MUST_NOT_IMPORT = {"overlock.training", "overlock.detection", "overlock.calibration",
                        "overlock.evaluation", "overlock.inference"}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _library_files() -> list[Path]:
    # the mmdet config files under overlock/detection/configs are data read by mmcv, not modules
    return sorted(p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module ``path`` (under ``root``) imports, at any nesting level."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)  # submodules imported by name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


MODULE_STRING = re.compile(rf"^({'|'.join(UNPACKAGED)})(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


def _module_references(path: Path) -> list[str]:
    """Plain string literals that name a module of ``stages``/``pipelines`` (``"pipelines.pretrain"``,
    ``"stages.calibrate:main"``): the names a dynamic import would use. f-strings are not read
    (``f"stages.{i}"`` also names the submodules of a network)."""
    return [f"{_module_name(path)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and MODULE_STRING.match(node.value)]


def package_graph() -> dict[str, dict[str, list[str]]]:
    """``{package: {imported package: [importing module, ...]}}`` over the library (own package excluded)."""
    existing = {_module_name(p) for p in _library_files()}
    graph: dict[str, dict[str, list[str]]] = {}
    for path in _library_files():
        module = _module_name(path)
        source = _package(module)
        graph.setdefault(source, {})
        for name in _imports(path):
            if name.split(".")[0] in UNPACKAGED:
                graph[source].setdefault(name.split(".")[0], []).append(module)
            elif name.startswith("overlock.") and (name in existing or _package(name) in existing):
                target = _package(name)
                if target != source and target != "overlock":
                    graph[source].setdefault(target, []).append(module)
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """A cycle ``[a, b, ..., a]`` of the graph, or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _describe(graph, cycle: list[str]) -> str:
    steps = [f"{a} -> {b} (in {', '.join(sorted(set(graph[a][b])))})" for a, b in zip(cycle, cycle[1:])]
    return "import cycle between packages: " + " | ".join(steps)


def test_the_parser_sees_function_level_relative_and_importlib_imports(tmp_path):
    pkg = tmp_path / "overlock" / "alpha"
    pkg.mkdir(parents=True)
    (tmp_path / "overlock" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .inner import x\n")
    (pkg / "inner.py").write_text(
        "def f():\n    from overlock.beta import y\n    import importlib\n"
        "    importlib.import_module('overlock.gamma.mod')\n    return __import__('stages.calibrate')\n")
    assert _imports(pkg / "__init__.py", tmp_path) >= {"overlock.alpha.inner"}
    assert _imports(pkg / "inner.py", tmp_path) >= {"overlock.beta", "importlib", "overlock.gamma.mod",
                                                   "stages.calibrate"}
    assert MODULE_STRING.match("pipelines.pretrain") and MODULE_STRING.match("stages.finetune:main")
    assert not MODULE_STRING.match("stages") and not MODULE_STRING.match("stages.")
    graph = {"a": {"b": ["a.x"]}, "b": {"c": ["b.y"]}, "c": {"a": ["c.z"]}, "d": {}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert "a -> b (in a.x)" in _describe(graph, find_cycle(graph))
    assert find_cycle({"a": {"b": []}, "b": {}}) is None


def test_no_import_cycles_between_packages():
    graph = package_graph()
    assert {"overlock.models", "overlock.calibration", "overlock.evaluation", "overlock.data"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, _describe(graph, cycle)


def test_models_import_nothing_above_them():
    graph = package_graph()
    above = {target: modules for target, modules in graph["overlock.models"].items()
             if target not in MODELS_MAY_IMPORT}
    assert not above, f"overlock.models imports packages above it: {above}"


def test_data_imports_no_stage_package():
    graph = package_graph()
    wrong = {target: modules for target, modules in graph["overlock.data"].items()
             if target in DATA_MUST_NOT_IMPORT}
    assert not wrong, f"overlock.data imports stage packages: {wrong}"


def test_calibration_and_evaluation_do_not_import_each_other():
    graph = package_graph()
    assert "overlock.evaluation" not in graph["overlock.calibration"], graph["overlock.calibration"]
    assert "overlock.calibration" not in graph["overlock.evaluation"], graph["overlock.evaluation"]
    for stage in ("overlock.calibration", "overlock.evaluation"):  # they share overlock.inference instead
        assert "overlock.inference" in graph[stage]


def test_the_library_never_imports_stages_or_pipelines():
    graph = package_graph()
    imports = {f"{source} -> {target}": modules for source, targets in graph.items()
               for target, modules in targets.items() if target in UNPACKAGED}
    references = [ref for path in _library_files() for ref in _module_references(path)]
    assert not imports and not references, f"the library uses the unpackaged entry points: {imports} {references}"
