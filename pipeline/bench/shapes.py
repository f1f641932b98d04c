"""Model shapes for the latency benchmark, written out so that no hub access is needed.

Latency does not depend on weight values, so only the shapes matter. Values are those of the
public Hugging Face configs of each model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # "opt" (LayerNorm, ReLU fc1/fc2, biases, learned positions) or "llama" (RMSNorm, SiLU-gated, RoPE)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    gated: bool  # gate/up/down (True) or fc1/fc2 (False)
    qkv_bias: bool = False
    mlp_bias: bool = False
    o_bias: bool = False
    rope_theta: float = 10000.0
    tied_embeddings: bool = False
    max_positions: int = 2048

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def norm(self) -> str:
        return "ln" if self.family == "opt" else "rms"

    @property
    def rope(self) -> bool:
        return self.family != "opt"

    def layer_params(self) -> int:
        """Weight-matrix parameters of one decoder layer (biases and norms excluded)."""
        d = self.hidden
        attn = self.qkv_rows * d + self.heads * self.head_dim * d
        mlp = (3 if self.gated else 2) * self.ffn * d
        return attn + mlp

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads must be a multiple of kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even")


def _opt(name: str, hidden: int, layers: int, heads: int, ffn: int) -> ModelShape:
    return ModelShape(
        name=name,
        family="opt",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        ffn=ffn,
        vocab=50272,
        gated=False,
        qkv_bias=True,
        mlp_bias=True,
        o_bias=True,
        tied_embeddings=True,
        max_positions=2048,
    )


MODELS: dict[str, ModelShape] = {
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32, 8192),
    "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32, 16384),
    "opt-13b": _opt("opt-13b", 5120, 40, 40, 20480),
    "opt-30b": _opt("opt-30b", 7168, 48, 56, 28672),
    "llama-2-7b": ModelShape(
        name="llama-2-7b",
        family="llama",
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        head_dim=128,
        ffn=11008,
        vocab=32000,
        gated=True,
        rope_theta=10000.0,
        max_positions=4096,
    ),
    "llama-3-8b": ModelShape(
        name="llama-3-8b",
        family="llama",
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        ffn=14336,
        vocab=128256,
        gated=True,
        rope_theta=500000.0,
        max_positions=8192,
    ),
    "qwen2.5-7b": ModelShape(
        name="qwen2.5-7b",
        family="llama",
        hidden=3584,
        layers=28,
        heads=28,
        kv_heads=4,
        head_dim=128,
        ffn=18944,
        vocab=152064,
        gated=True,
        qkv_bias=True,
        rope_theta=1000000.0,
        max_positions=32768,
    ),
}


def get(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark model {name!r}; known: {sorted(MODELS)}") from None


def tiny(family: str = "llama", *, kv_heads: int | None = None, layers: int = 3) -> ModelShape:
    """A toy shape for the CPU smoke path and the tests (same code paths, tiny sizes)."""
    base = MODELS["llama-3-8b"] if family == "llama" else MODELS["opt-1.3b"]
    heads = 4
    return replace(
        base,
        name=f"tiny-{family}",
        hidden=48,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads if kv_heads is not None else (2 if family == "llama" else heads),
        head_dim=16,
        ffn=48,
        vocab=64,
        max_positions=64,
        qkv_bias=family == "opt" or base.qkv_bias,
    )
