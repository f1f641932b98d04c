"""Architecture adapters: where the prunable units of a stock `transformers` decoder live.

An adapter is data, not code: dotted module paths and config attribute names. `resolve(model)`
turns it into a `Layout` holding the live modules and the unit counts. Adding an architecture is
one `register(ArchSpec(...))` call; nothing else branches on `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipeline.errors import UserError


class ArchitectureError(UserError):
    """The model is not one the adapters know, or lacks a module the adapter names."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str  # path from the *ForCausalLM root to the ModuleList of decoder layers
    attn_out: str  # per layer: the attention output projection (its input = concatenated heads)
    ffn_down: str  # per layer: the FFN down projection (its input = intermediate activation)
    ffn_in: tuple[str, ...]  # per layer: projections producing the intermediate (gate, up) or (fc1,)
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    n_heads: str = "num_attention_heads"
    n_kv_heads: str | None = "num_key_value_heads"
    head_dim: str | None = "head_dim"
    ffn_dim: str = "intermediate_size"
    hidden: str = "hidden_size"
    gated: bool = True


@dataclass
class Layout:
    """One model's units. Heads are *query* heads; `kv_group[h]` is the kv head that serves head h."""

    spec: ArchSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn_dim: int
    layers: list[nn.Module] = field(repr=False)
    attn_out: list[nn.Linear] = field(repr=False)
    ffn_down: list[nn.Linear] = field(repr=False)

    @property
    def kv_group(self) -> list[int]:
        per = self.n_heads // self.n_kv_heads
        return [h // per for h in range(self.n_heads)]

    def dims(self) -> dict[str, Any]:
        """Plain-data description, stored in trace and predictor metadata."""
        return {
            "arch": self.spec.name,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden": self.hidden,
            "ffn_dim": self.ffn_dim,
            "kv_group": self.kv_group,
        }


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for mt in spec.model_types:
        _REGISTRY[mt] = spec
    return spec


def known_model_types() -> list[str]:
    return sorted(_REGISTRY)


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
)
register(ArchSpec(name="llama", model_types=("llama",), **_LLAMA_LIKE))
register(ArchSpec(name="mistral", model_types=("mistral",), **_LLAMA_LIKE))
register(ArchSpec(name="qwen2", model_types=("qwen2", "qwen3"), **_LLAMA_LIKE))
register(ArchSpec(name="gemma", model_types=("gemma", "gemma2", "gemma3_text"), **_LLAMA_LIKE))
register(
    ArchSpec(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        attn_out="self_attn.out_proj",
        ffn_down="fc2",
        ffn_in=("fc1",),
        n_kv_heads=None,
        head_dim=None,
        ffn_dim="ffn_dim",
        gated=False,
    )
)


def get_spec(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None)
    if model_type not in _REGISTRY and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    if model_type not in _REGISTRY:
        raise ArchitectureError(
            f"unknown architecture '{model_type}' (params: model): no adapter; known: "
            f"{', '.join(known_model_types())}. Add one with pipeline.models.adapters.register(ArchSpec(...))"
        )
    return _REGISTRY[model_type]


def _get(root: nn.Module, path: str, what: str, spec: ArchSpec) -> nn.Module:
    mod: Any = root
    for part in path.split("."):
        if isinstance(mod, nn.ModuleList) and part.isdigit():
            mod = mod[int(part)]
        elif hasattr(mod, part):
            mod = getattr(mod, part)
        else:
            raise ArchitectureError(
                f"architecture '{spec.name}': {what} not found at '{path}' (missing '{part}' in {type(mod).__name__})"
            )
    return mod


def _cfg(config: Any, attr: str | None, spec: ArchSpec) -> int | None:
    if attr is None:
        return None
    value = getattr(config, attr, None)
    return int(value) if value is not None else None


def check_config(config: Any) -> ArchSpec:
    """Validate a config against its adapter without building the model; returns the spec."""
    spec = get_spec(config)
    for attr in (spec.n_heads, spec.ffn_dim, spec.hidden, "num_hidden_layers"):
        if getattr(config, attr, None) is None:
            raise ArchitectureError(f"architecture '{spec.name}': config lacks '{attr}'")
    return spec


def layout_from_config(config: Any) -> dict[str, int]:
    """Unit counts from a config alone (no modules)."""
    spec = check_config(config)
    n_heads = _cfg(config, spec.n_heads, spec)
    hidden = _cfg(config, spec.hidden, spec)
    head_dim = _cfg(config, spec.head_dim, spec) or hidden // n_heads
    n_kv = _cfg(config, spec.n_kv_heads, spec) or n_heads
    return {
        "n_layers": int(config.num_hidden_layers),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "hidden": hidden,
        "ffn_dim": _cfg(config, spec.ffn_dim, spec),
    }


def resolve(model: nn.Module) -> Layout:
    """Locate every unit of `model`; raise ArchitectureError naming whatever is missing."""
    config = model.config
    spec = check_config(config)
    dims = layout_from_config(config)
    layers = _get(model, spec.layers, "decoder layer list", spec)
    if not isinstance(layers, nn.ModuleList):
        raise ArchitectureError(f"architecture '{spec.name}': '{spec.layers}' is not a ModuleList")
    attn_out = [_get(layer, spec.attn_out, "attention output projection", spec) for layer in layers]
    ffn_down = [_get(layer, spec.ffn_down, "FFN down projection", spec) for layer in layers]
    for path in spec.ffn_in + spec.attn_in:
        _get(layers[0], path, "projection", spec)
    layout = Layout(spec=spec, layers=list(layers), attn_out=attn_out, ffn_down=ffn_down, **dims)
    if attn_out[0].in_features != layout.n_heads * layout.head_dim:
        raise ArchitectureError(
            f"architecture '{spec.name}': {spec.attn_out} takes {attn_out[0].in_features} features, "
            f"expected n_heads*head_dim = {layout.n_heads * layout.head_dim}"
        )
    if ffn_down[0].in_features != layout.ffn_dim:
        raise ArchitectureError(
            f"architecture '{spec.name}': {spec.ffn_down} takes {ffn_down[0].in_features} features, "
            f"expected ffn_dim = {layout.ffn_dim}"
        )
    return layout
