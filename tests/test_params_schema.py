"""params.yaml is the only source of defaults (issue 10): every section has one typed schema with no
defaults, every key of params.yaml belongs to a schema, and a misspelt key anywhere is a one-line error
naming it."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest

import pipeline
from pipeline.params import ParamError, Section, load

REPO = Path(__file__).resolve().parents[1]
PARAMS = load(REPO / "params.yaml")


def _modules():
    """Every library module that imports here (the Triton kernels need triton: they hold no schema)."""
    out = []
    for mod in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        try:
            out.append(importlib.import_module(mod.name))
        except ImportError:
            continue
    return out


MODULES = _modules()


def _all_schemas() -> list[type[Section]]:
    out, todo = [], list(Section.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


SCHEMAS = _all_schemas()
TOP = {cls.SECTION: cls for cls in SCHEMAS if cls.SECTION and "." not in cls.SECTION}  # nested ones: via their parent


def test_every_section_of_params_yaml_has_a_schema_and_parses():
    assert set(PARAMS) == set(TOP), f"sections without a schema: {set(PARAMS) - set(TOP)}"
    for cls in TOP.values():
        parsed = cls.from_params(PARAMS)
        assert isinstance(parsed, cls) and parsed.as_dict()


@pytest.mark.parametrize("cls", SCHEMAS, ids=lambda c: c.__name__)
def test_no_schema_has_a_default(cls):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_default, f"{cls.__name__}: code defaults {with_default} (params.yaml is the only source)"


def _key_paths(node, prefix=()):
    """Every mapping key path in params.yaml, down through nested mappings (lists of mappings included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _key_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _key_paths(v, (*prefix, i))


def _misspelt_paths():
    # mappings keyed by data (task names, predictor kinds, ...) are not schema keys: a new key there is a
    # new entry, checked against its registry instead
    return [p for p in _key_paths(PARAMS) if len(p) >= 2 and not isinstance(p[-1], int)]


@pytest.mark.parametrize("path", _misspelt_paths(), ids=lambda p: ".".join(map(str, p)))
def test_a_misspelt_key_anywhere_is_a_one_line_error_naming_it(path):
    params = copy.deepcopy(PARAMS)
    node = params
    for k in path[:-1]:
        node = node[k]
    if not isinstance(path[-1], str) or path[-1] not in node:
        pytest.skip("not a mapping key")
    wrong = f"{path[-1]}x"
    node[wrong] = node.pop(path[-1])
    with pytest.raises(ParamError) as e:
        TOP[path[0]].from_params(params)
    msg = str(e.value)
    assert "\n" not in msg and wrong in msg, msg


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def test_code_mirrors_of_params_carry_no_other_defaults():
    """A dataclass in the library that mirrors a section (shares >= 3 of its keys) must not restate a
    default that differs from params.yaml (the FitSettings / CollectSettings pattern of the past)."""
    sections = {name: set(sec) for name, sec in PARAMS.items() if isinstance(sec, dict)}
    bad = []
    for m in MODULES:
        for obj in vars(m).values():
            if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)) or obj.__module__ != m.__name__:
                continue
            names = {f.name for f in dataclasses.fields(obj)}
            for sec, keys in sections.items():
                if len(names & keys) < 3:
                    continue
                for f in dataclasses.fields(obj):
                    if (
                        f.name in keys
                        and f.default is not dataclasses.MISSING
                        and _plain(f.default) != _plain(PARAMS[sec][f.name])
                    ):
                        bad.append(
                            f"{obj.__module__}.{obj.__name__}.{f.name} = {f.default!r} "
                            f"(params.yaml {sec}.{f.name}: {PARAMS[sec][f.name]!r})"
                        )
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("overlay", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_overlay_applies_to_params_yaml_and_parses(tmp_path, overlay):
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from derive_params import derive
    finally:
        sys.path.pop(0)
    derived = derive(REPO / "params.yaml", tmp_path / "p.yaml", [str(overlay), "model.id=qwen2.5-coder-0.5b"])
    for cls in TOP.values():
        cls.from_params(derived)
    with pytest.raises(ParamError, match="colect"):
        (tmp_path / "bad.yaml").write_text("colect: {n_per_task: 3}\n")
        derive(REPO / "params.yaml", tmp_path / "p2.yaml", [str(tmp_path / "bad.yaml")])
