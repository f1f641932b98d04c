"""Predictor kinds by name."""

from __future__ import annotations

from typing import Any

from pipeline.predictors.base import Predictor
from pipeline.predictors.dejavu import DejaVuLookahead, DejaVuPredictor
from pipeline.predictors.shadowllm import ShadowLLMPredictor

PREDICTORS: dict[str, type[Predictor]] = {c.kind: c for c in (ShadowLLMPredictor, DejaVuPredictor, DejaVuLookahead)}
WIDTH_KEYS = ("hidden_heads", "hidden_neurons", "rank_heads", "rank_neurons")


def build(kind: str, criterion: str, dims: dict[str, Any], widths: dict[str, int]) -> Predictor:
    if kind not in PREDICTORS:
        raise ValueError(f"unknown predictor kind '{kind}'; known: {', '.join(PREDICTORS)}")
    return PREDICTORS[kind](criterion, dims, **{k: int(widths[k]) for k in WIDTH_KEYS if k in widths})
