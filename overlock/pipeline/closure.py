"""The code a stage runs: the import closure of its entry point and its function, found statically.

Every ``import``/``from ... import`` statement anywhere in a file counts (function-level imports included),
restricted to the project's own code: the ``overlock`` package and the entry points (``stages``,
``pipelines``). A relative import is resolved against its package; ``from pkg import name`` reaches
``pkg/name.py`` when that is a module. A package reached through one of its modules also runs its
``__init__.py``, so those are part of the closure too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PROJECT_PACKAGES = ("overlock", "stages", "pipelines")


def module_file(root: Path, module: str) -> Path | None:
    """``root/a/b.py`` or ``root/a/b/__init__.py`` for module ``a.b`` (None outside the project)."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(root: Path, path: Path) -> set[str]:
    """Names of the modules ``path`` imports (anywhere in the file), absolute, candidates included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = _module_name(root, path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(root: Path, start: list[str]) -> set[Path]:
    """Files (relative to ``root``) reached from the modules or files in ``start`` through project imports."""
    root = Path(root).resolve()
    todo: list[Path] = []
    for item in start:
        path = root / item if item.endswith(".py") else module_file(root, item.partition(":")[0])
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{item}: no such module or file under {root}")
        todo.append(path)
        if item.endswith(".py"):
            continue
        todo += [p for m in _with_parents(item.partition(":")[0]) if (p := module_file(root, m))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(root, path):
            for module in _with_parents(name):
                found = module_file(root, module)
                if found is not None and found not in seen:
                    todo.append(found)
    return {p.relative_to(root) for p in seen}
