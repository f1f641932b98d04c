"""Predictor cost relative to the model it serves (SPEC §8: p = predictor bytes / model bytes)."""

from __future__ import annotations

from typing import Any

from pipeline.models.adapters import _REGISTRY


def _gated(arch: str) -> bool:
    for spec in _REGISTRY.values():
        if spec.name == arch:
            return spec.gated
    raise ValueError(f"unknown architecture '{arch}' in trace dims; cannot count its parameters")


def layer_params(dims: dict[str, Any]) -> int:
    """Weights of all decoder layers' projections (q, k, v, o and the FFN), from the dims, GQA-aware.

    Biases, norms, embeddings and the LM head are not counted: this is the part a sparse decode skips in."""
    e, h, kv, d, f = dims["hidden"], dims["n_heads"], dims["n_kv_heads"], dims["head_dim"], dims["ffn_dim"]
    attn = e * h * d + 2 * e * kv * d + h * d * e
    ffn = (3 if _gated(dims["arch"]) else 2) * e * f
    return dims["n_layers"] * (attn + ffn)


def model_params(model_meta: dict[str, Any]) -> tuple[int, str]:
    """(parameter count, basis): the trace's recorded total (`n_params`) if present, else `layer_params`."""
    for key in ("parameters", "n_params", "model_params"):
        if isinstance(model_meta.get(key), int):
            return model_meta[key], "all model parameters (trace meta)"
    return layer_params(model_meta["dims"]), "decoder-layer projection weights (from dims)"


def cost(n_params: int, n_bytes: int, model_meta: dict[str, Any]) -> dict[str, Any]:
    """Predictor size figures; the share is by parameter count (same dtype for model and predictor)."""
    total, basis = model_params(model_meta)
    layers = layer_params(model_meta["dims"])
    return {
        "params": n_params,
        "bytes": n_bytes,
        "bytes_bf16": 2 * n_params,
        "model_params": total,
        "share_of_model": n_params / total,
        "share_basis": basis,
        "model_layer_params": layers,
        "share_of_layers": n_params / layers,
    }
