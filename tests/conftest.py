"""Shared fixtures: tiny randomly initialised decoders built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("SHADOWLLM_TRACKING", "0")  # no mlflow.db in the cwd; tests/test_tracking.py turns it on

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    OPTConfig,
)

VOCAB = 96


def tiny_config(kind: str):
    if kind == "llama":  # grouped-query attention: 4 query heads share 2 kv heads
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    if kind == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=True,
        )
    if kind == "gemma":  # multi-query attention, GeGLU
        return Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    raise KeyError(kind)


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(kind)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init with larger weights so that activations and gradients are far from zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.float().eval()


ARCHS = ("llama", "opt", "gemma")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


def section_params(schema, **overrides):
    """`schema` (a `pipeline.params.Section`) built from the repository's params.yaml section with
    `overrides` — how tests get a full, valid section without restating its defaults."""
    import copy

    from pipeline.params import load

    sec = copy.deepcopy(load(Path(__file__).resolve().parents[1] / "params.yaml")[schema.SECTION])
    sec.update(overrides)
    return schema.from_mapping(sec, schema.SECTION)


def bench_small_shape(fam: str):
    """The decode engine's GPU test shape: `shapes.tiny(fam)` widened to tiles the compiled kernels accept (hidden
    256, 4 heads of 64 in 2 kv groups for Llama, FFN 512, vocab 512, 4 layers)."""
    from dataclasses import replace

    from pipeline.bench import shapes

    return replace(
        shapes.tiny(fam),
        hidden=256,
        heads=4,
        kv_heads=2 if fam == "llama" else 4,
        head_dim=64,
        ffn=512,
        vocab=512,
        layers=4,
        max_positions=512,
    )


def bench_small_config(method: str, sparsity: float, batch: int):
    """An `EngineConfig` for `bench_small_shape`: 16-token prompt, 8 steps, small predictors, overlap on."""
    from pipeline.bench.engine import EngineConfig
    from pipeline.bench.predictors import PredictorSpec

    return EngineConfig(
        method=method,
        head_sparsity=sparsity,
        neuron_sparsity=sparsity,
        batch=batch,
        prompt_len=16,
        gen_len=8,
        shadowllm=PredictorSpec(64, 64, 16),
        dejavu=PredictorSpec(32, 32, 0),
        overlap=True,
        seed=0,
    )
