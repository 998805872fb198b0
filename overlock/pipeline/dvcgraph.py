"""dvc.yaml from the stage descriptions: each stage's expected entry, and the check that dvc.yaml matches.

``python -m overlock.pipeline.dvcgraph`` prints the expected ``stages:`` section (paste it into dvc.yaml after
changing a description); ``python -m overlock.pipeline.dvcgraph --check`` lists what differs (exit 1).
The tests run the same check and the import-closure check (tests/test_stage_graph.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from overlock.pipeline.closure import import_closure
from overlock.pipeline.spec import DESCRIPTION_FILES, KERNEL_CODE, STAGES, StageSpec, command, result_keys


class _IndentedDumper(yaml.SafeDumper):
    """Lists indented under their key, as dvc.yaml is written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def stages_yaml() -> str:
    """The expected ``stages:`` section of dvc.yaml (a blank line between stages)."""
    schema = _schema()
    body = yaml.dump({"stages": {n: expected_stage(s, schema) for n, s in STAGES.items()}}, Dumper=_IndentedDumper,
                     sort_keys=False, width=200)
    lines: list[str] = []
    for line in body.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and len(lines) > 1:
            lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _schema() -> dict:
    from overlock.params import Params
    return Params().model_dump(mode="json")


def expected_stage(spec: StageSpec, schema: dict | None = None) -> dict:
    """The stage's dvc.yaml entry: cmd, deps, params (result params only), outs, metrics, plots."""
    entry: dict = {"cmd": command(spec), "deps": list(spec.deps), "params": result_keys(spec, schema or _schema())}
    outs = [p.tracked if p.cache else {p.tracked: {"cache": False}} for p in spec.by_role("out")]
    if outs:
        entry["outs"] = outs
    if spec.by_role("metrics"):
        entry["metrics"] = [{p.dvc: {"cache": False}} for p in spec.by_role("metrics")]
    if spec.by_role("plots"):
        entry["plots"] = [{f"{p.dvc}/{p.plot_file}": {"cache": False}} for p in spec.by_role("plots")]
    return entry


def _names(items: list) -> set[str]:
    return {item if isinstance(item, str) else next(iter(item)) for item in items or []}


def check_dvc_yaml(path: Path) -> list[str]:
    """Differences between ``path`` and the descriptions (empty when dvc.yaml matches them)."""
    stages = (yaml.safe_load(Path(path).read_text()) or {}).get("stages", {})
    schema = _schema()
    problems = []
    for name, spec in STAGES.items():
        if name not in stages:
            problems.append(f"{name}: missing from {path}")
            continue
        want, have = expected_stage(spec, schema), stages[name]
        if have.get("cmd") != want["cmd"]:
            problems.append(f"{name}: cmd is {have.get('cmd')!r}, the description gives {want['cmd']!r}")
        for field in ("deps", "params", "outs", "metrics", "plots"):
            extra, missing = _names(have.get(field)) - _names(want.get(field)), \
                _names(want.get(field)) - _names(have.get(field))
            if extra or missing:
                problems.append(f"{name}: {field} differ: not in the description {sorted(extra)}, "
                                f"missing {sorted(missing)}")
        caches = {k: v for item in have.get("outs") or [] if isinstance(item, dict) for k, v in item.items()}
        for option in spec.by_role("out"):
            if (caches.get(option.tracked) or {}).get("cache", True) != option.cache:
                problems.append(f"{name}: out {option.tracked} must have cache: {str(option.cache).lower()}")
    return problems


def covered(path: str, deps: tuple[str, ...]) -> bool:
    """True when ``path`` is one of ``deps`` or inside a directory dep."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def uncovered_code(spec: StageSpec, root: Path) -> list[str]:
    """Files of the stage's import closure (entry point, function, modules it loads by name) that its deps
    do not cover."""
    closure = import_closure(root, [spec.entry, spec.function, *spec.loads,
                                    *([spec.resume_inputs] if spec.resume_inputs else [])])
    deps = (*spec.deps, *DESCRIPTION_FILES)
    return sorted(str(p) for p in closure if not covered(str(p), deps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlock.pipeline.dvcgraph", description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="DVC_YAML", nargs="?", const="dvc.yaml",
                        help="compare DVC_YAML (default dvc.yaml) with the descriptions")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_dvc_yaml(Path(args.check))
        print("\n".join(problems) or f"{args.check} matches the stage descriptions")
        return 1 if problems else 0
    print(stages_yaml(), end="")
    return 0


__all__ = ["expected_stage", "stages_yaml", "check_dvc_yaml", "uncovered_code", "covered", "KERNEL_CODE"]

if __name__ == "__main__":
    sys.exit(main())
