"""Importance predictors (SPEC §6): ShadowLLM (one predictor after layer 0) and DejaVu-style
per-layer / look-ahead baselines, their files, and their training."""

from pipeline.predictors.base import Predictor, PredictorWidths, minmax_features
from pipeline.predictors.dejavu import DejaVuLookahead, DejaVuPredictor
from pipeline.predictors.registry import PREDICTORS, build
from pipeline.predictors.shadowllm import ShadowLLMPredictor
from pipeline.predictors.store import load_config, load_predictor, predictor_dir, save_predictor

__all__ = [
    "PREDICTORS",
    "DejaVuLookahead",
    "DejaVuPredictor",
    "Predictor",
    "PredictorWidths",
    "ShadowLLMPredictor",
    "build",
    "load_config",
    "load_predictor",
    "minmax_features",
    "predictor_dir",
    "save_predictor",
]
