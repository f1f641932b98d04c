"""Reading `params.yaml`: one section per stage, plus shared top-level sections.

Each section has one typed schema, a frozen dataclass subclassing `Section` and owned by the library
module that uses it (`ModelParams`, `DataParams` here; `CollectParams` in `pipeline.collect`, ...). A
schema has no defaults: `params.yaml` is the only source of them (tests/test_params_schema.py loads it
into every schema and fails on any code default)."""

from __future__ import annotations

import difflib
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import UserError


class ParamError(UserError):
    """A bad parameter; the message names it (e.g. 'collect.n_per_task')."""


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: invalid YAML{_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ParamError(f"{path}: top level must be a mapping")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params or not isinstance(params[name], dict):
        raise ParamError(f"params.yaml has no '{name}' section")
    return params[name]


def require(sec: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    if key not in sec:
        raise ParamError(f"missing parameter {where}.{key}")
    value = sec[key]
    if kind is not None and not isinstance(value, kind):
        raise ParamError(f"parameter {where}.{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def check_fraction(value: Any, name: str) -> float:
    """A sparsity or fraction in [0, 1)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParamError(f"parameter {name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise ParamError(f"parameter {name} must be in [0, 1), got {v}")
    return v


def _yaml_problem(e: yaml.YAMLError) -> str:
    """' at line L, column C: problem' of a YAML error, on one line (lines and columns from 1)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return f"{where}: {' '.join(f'{context}, {problem}'.split()) if context else ' '.join(problem.split())}"


def set_override(params: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the params mapping, in place. Every key along the
    path must already be in `params` (a misspelt `evalute.limit` would otherwise start a new section and
    change nothing); a whole mapping value (`evaluate.limit={piqa: 3}`) replaces the old value."""
    if "=" not in assignment:
        raise ParamError(f"--set expects key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = params
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not isinstance(node, dict):
            raise ParamError(f"--set {assignment!r}: parameter {'.'.join(parts[:i])} is not a mapping")
        if part not in node:
            known = [str(k) for k in node]
            raise ParamError(f"unknown parameter {where}{_suggest(part, known)} (--set {assignment!r})")
        if i < len(parts) - 1:
            node = node[part]
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ParamError(f"--set {assignment!r}: invalid YAML value{_yaml_problem(e)}") from None


# ---- typed section schemas ------------------------------------------------------------------------


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the annotation `tp` (int, float, bool, str, None, Literal, list, tuple,
    dict, unions of these, a nested `Section`), converted where YAML leaves a choice (int -> float,
    list -> tuple). A bool is never a number, a number never a bool."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ParamError(f"parameter {where} must be null, got {value!r}")
    if origin in (Union, types.UnionType):
        for alt in args:
            try:
                return _coerce(value, alt, where)
            except ParamError:
                continue
        raise ParamError(f"parameter {where} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):  # 1 is not True, "1" is not 1
            return value
        raise ParamError(f"parameter {where} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, Section):
        if not isinstance(value, dict):
            raise ParamError(f"parameter {where} must be a mapping, got {value!r}")
        return tp.from_mapping(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamError(f"parameter {where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamError(f"parameter {where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ParamError(f"parameter {where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamError(f"parameter {where} must be a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"parameter {where} must be a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"parameter {where} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"schema annotation {tp!r} of {where} is not supported")


def _bounds(value: Any, meta: Any, where: str) -> None:
    if value is None:
        return
    nums = value if isinstance(value, (list, tuple)) else [value]
    for v in nums:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise ParamError(f"parameter {where} must be >= {meta['min']}, got {v!r}")
        if "max" in meta and v > meta["max"]:
            raise ParamError(f"parameter {where} must be <= {meta['max']}, got {v!r}")
        if "below" in meta and not v < meta["below"]:
            raise ParamError(f"parameter {where} must be < {meta['below']}, got {v!r}")
        if "above" in meta and not v > meta["above"]:
            raise ParamError(f"parameter {where} must be > {meta['above']}, got {v!r}")
    if meta.get("nonempty") and isinstance(value, (list, tuple, dict)) and not value:
        raise ParamError(f"parameter {where} must not be empty")


def at_least(minimum: float, **more: Any) -> Any:
    """A schema field whose value (or every value of its list) is >= `minimum`."""
    return field(metadata={"min": minimum, **more})


def fraction(**more: Any) -> Any:
    """A schema field in [0, 1) (sparsities, shares)."""
    return field(metadata={"min": 0.0, "below": 1.0, **more})


def nonempty() -> Any:
    return field(metadata={"nonempty": True})


class Section:
    """Base of the typed schema of one `params.yaml` section: subclass as a frozen dataclass whose fields
    have **no defaults** (params.yaml is the only source of defaults), set `SECTION`, and build it with
    `from_params(params)`. Every key is required; an unknown or misspelt key is an error naming it; each
    value is checked against its annotation (and `at_least`/`fraction` bounds) once, here, where it enters.
    `check()` is the hook for rules across fields or against registries (raise ParamError)."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_params(cls: type[S], params: dict[str, Any]) -> S:
        return cls.from_mapping(section(params, cls.SECTION), cls.SECTION)

    @classmethod
    def from_mapping(cls: type[S], sec: dict[str, Any], where: str) -> S:
        flds = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        for key in sec:
            if key not in flds:
                raise ParamError(
                    f"unknown parameter {where}.{key}{_suggest(str(key), list(flds))}; known: {', '.join(flds)}"
                )
        hints = get_type_hints(cls)
        values = {}
        for name, f in flds.items():
            if name not in sec:
                raise ParamError(f"missing parameter {where}.{name}")
            v = _coerce(sec[name], hints[name], f"{where}.{name}")
            _bounds(v, f.metadata, f"{where}.{name}")
            values[name] = v
        obj = cls(**values)
        obj.check(where)
        return obj

    def check(self, where: str) -> None:
        """Rules across fields; raise ParamError naming the parameter."""

    def as_dict(self) -> dict[str, Any]:
        """The parsed values (what is logged to MLflow)."""
        return asdict(self)  # type: ignore[call-overload]


S = TypeVar("S", bound=Section)


def schema_defaults(cls: type) -> dict[str, Any]:
    """{field: default} of a dataclass's fields that have a default (a schema has none)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


# ---- the shared sections ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelParams(Section):
    """`model:` — which checkpoint, how it is loaded, its BOS policy."""

    SECTION: ClassVar[str] = "model"
    id: str
    dtype: Literal["float32", "float16", "bfloat16"]
    device: str
    trust_remote_code: bool
    attn_implementation: str | None
    add_bos: Literal["auto"] | bool


@dataclass(frozen=True)
class DataParams(Section):
    """`data:` — where the task data comes from and the seeded calibration / evaluation split."""

    SECTION: ClassVar[str] = "data"
    mirror_dir: str | None
    calib_fraction: float = fraction()
    seed: int = at_least(0)
