"""Reading `params.yaml`: one section per stage, plus shared top-level sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ParamError(ValueError):
    """A bad parameter; the message names it (e.g. 'collect.n_per_task')."""


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
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
