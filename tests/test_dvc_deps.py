"""Every DVC stage lists, as deps, every repository source file its command can import (function-level
imports included), so that an edit to any of them reruns the stage (issue 10: `dvc repro` reruns what it
must). Found by walking the imports statically from the stage module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# modules whose import is optional at run time and never changes a stage's outputs
OPTIONAL = {"pipeline/tracking.py"}  # MLflow logging only


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in out if m.split(".")[0] in ("pipeline", "stages")}


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        f = _module_file(todo.pop())
        if f is None or f in seen:
            continue
        seen.add(f)
        todo += _imports(f)
        parts = f.relative_to(REPO).parts  # importing a.b.c runs a/__init__ and a/b/__init__ too
        for i in range(1, len(parts)):
            init = REPO.joinpath(*parts[:i], "__init__.py")
            if init.is_file() and init not in seen:
                todo.append(".".join(parts[:i]))
    return {str(f.relative_to(REPO)) for f in seen}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


STAGE_MODULES = {
    "prepare_model": "stages.prepare_model",
    "collect": "stages.collect",
    "aggregate": "stages.aggregate",
    "train": "stages.train",
    "evaluate": "stages.evaluate",
    "benchmark": "stages.benchmark",
}


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_cover_every_imported_source_file(stage):
    deps = [d for d in DVC[stage]["deps"] if isinstance(d, str)]
    needed = closure(STAGE_MODULES[stage]) - OPTIONAL
    needed = {p for p in needed if not p.endswith("__init__.py") or Path(REPO / p).stat().st_size > 0}
    missing = sorted(p for p in needed if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} lacks deps: {missing}"


def test_every_stage_module_is_checked():
    assert set(STAGE_MODULES) == set(DVC)
