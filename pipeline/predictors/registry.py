"""Predictor kinds by name: `PREDICTORS` (a `pipeline.registry.Registry`), filled by `@registered` where
each kind is defined; importing the kind modules here registers them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.predictors import dejavu, shadowllm  # noqa: F401 (importing a kind's module registers it)
from pipeline.predictors.base import PREDICTORS, Predictor, PredictorWidths


def build(kind: str, criterion: str, dims: dict[str, Any], widths: Mapping[str, int] | PredictorWidths) -> Predictor:
    """A new predictor of `kind`; `widths`: all four of `PredictorWidths` (a mapping is checked like params)."""
    cls = PREDICTORS.get(kind)
    if not isinstance(widths, PredictorWidths):
        widths = PredictorWidths.from_mapping(dict(widths), f"widths of {kind}")
    return cls(criterion, dims, **widths.as_dict())
