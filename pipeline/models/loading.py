"""Load a causal LM and its tokenizer by named model (pipeline/models/named.py), Hugging Face id, local
directory or GGUF file."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import named
from pipeline.models.adapters import ArchitectureError, check_config
from pipeline.params import ModelParams

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(UserError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'gguf', 'dir' or 'hub' (a named model is its checkpoint 'dir')."""

    kind: str
    path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        if spec in named.NAMED_MODELS:  # a named model (pipeline/models/named.py) -> its converted checkpoint
            d = named.checkpoint_dir(spec)
            if not (d / "config.json").is_file():
                raise ModelError(
                    f"named model '{spec}' is not prepared ({d} missing): run "
                    f"`shadowllm prepare-model --name {spec}` (params: model.id)"
                )
            return cls("dir", str(d))
        p = Path(spec).expanduser()
        if spec.endswith(".gguf"):
            if not p.is_file():
                raise ModelError(f"model GGUF file not found: {spec} (params: model)")
            return cls("gguf", str(p.parent), p.name)
        if p.exists():
            if not (p / "config.json").is_file():
                raise ModelError(f"model directory has no config.json: {spec} (params: model)")
            return cls("dir", str(p))
        if _looks_local(spec):
            raise ModelError(f"model path not found: {spec} (params: model.id)")
        return cls("hub", spec)

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _looks_local(spec: str) -> bool:
    """A `model.id` that can only be a path: './x', '/x', '~/x', 'a/b/c', a Windows path, or 'd/x' whose
    first part `d` is a local directory (`models/nope`); a hub id is 'org/name' with no such directory."""
    if not spec.strip() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return True
    if (os.sep != "/" and os.sep in spec) or (os.altsep and os.altsep != "/" and os.altsep in spec):
        return True
    return "/" in spec and Path(spec.split("/", 1)[0]).is_dir()


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelError(f"unknown dtype '{name}' (params: dtype); known: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_config(spec: str, *, trust_remote_code: bool = False):
    """Load and validate only the config (cheap): run before any weights are read."""
    from transformers import AutoConfig

    src = ModelSource.parse(spec)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.load_kwargs())
    except OSError as e:
        offline = " and the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") else ""
        why = " ".join(str(e).split())  # transformers' message spans lines; a ModelError is one
        raise ModelError(f"model '{spec}' could not be found locally{offline} (params: model.id): {why}") from None
    try:
        check_config(config)
    except ArchitectureError as e:
        raise ModelError(str(e)) from None
    return config


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = ModelSource.parse(spec)
    torch_dtype = parse_dtype(dtype)
    load_config(spec, trust_remote_code=trust_remote_code)
    kw = dict(trust_remote_code=trust_remote_code, **src.load_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(src.path, **kw)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype, **kw, **extra)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


_VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "_commit_hash",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "_attn_implementation_autoset",
)


def fingerprint(model: nn.Module, *, samples: int = 4096) -> str:
    """Content hash of a model: architecture config plus a strided sample of every tensor.

    Stable across dtype casts of fp32 weights is not promised: the sample is read in float32.
    """
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    for k in _VOLATILE_CONFIG_KEYS:
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_from_params(mp: ModelParams) -> tuple[nn.Module, Any]:
    """`load_model` configured by the `model:` section of params.yaml."""
    return load_model(
        mp.id,
        dtype=mp.dtype,
        device=mp.device,
        trust_remote_code=mp.trust_remote_code,
        attn_implementation=mp.attn_implementation,
    )


def check_model(mp: ModelParams) -> None:
    """What can be checked of `model:` before any weight is read: the dtype and the config (ModelError)."""
    parse_dtype(mp.dtype)
    load_config(mp.id, trust_remote_code=mp.trust_remote_code)


@dataclass
class Loaded:
    """A model opened for a stage: weights, tokenizer, layout, content fingerprint, load time."""

    model: nn.Module
    tokenizer: Any
    layout: Any  # pipeline.models.adapters.Layout
    fingerprint: str
    load_seconds: float

    def meta(self, mp: ModelParams) -> dict[str, Any]:
        """The model record stages write beside their outputs."""
        return {
            "id": mp.id,
            "fingerprint": self.fingerprint,
            "dims": self.layout.dims(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": mp.dtype,
        }


def open_model(mp: ModelParams) -> Loaded:
    """Load + resolve the architecture + fingerprint, timed: the start of every stage that runs the model."""
    from pipeline.models.adapters import resolve

    t0 = time.perf_counter()
    model, tokenizer = load_from_params(mp)
    layout = resolve(model)
    fp = fingerprint(model)
    return Loaded(model, tokenizer, layout, fp, time.perf_counter() - t0)
