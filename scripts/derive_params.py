"""Write a copy of a params file with overrides: `key.path=value` (value parsed as YAML) or an overlay file
(a YAML mapping of the same shape, e.g. configs/research.yaml), applied in order.

Used to run the stages on another machine (the GPU one: `model.device=cuda`, paths outside the repo) or in
another configuration without editing `params.yaml`:
    python3 scripts/derive_params.py params.yaml /tmp/p.yaml configs/research.yaml model.device=cuda
Every overridden key must exist in the base (a misspelt one is an error, never a new key)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipeline.params import ParamError, set_override


def overlay_items(mapping: dict, params: dict, prefix: str = "") -> list[str]:
    """An overlay mapping -> `key.path=value` overrides: nested where the base has a mapping of the same
    name whose keys the overlay names, whole values elsewhere."""
    out = []
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        base = params.get(k) if isinstance(params, dict) else None
        if isinstance(v, dict) and isinstance(base, dict) and set(v) <= set(base):
            out += overlay_items(v, base, key + ".")
        else:
            out.append(f"{key}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()}")
    return out


def derive(base: Path, out: Path, overrides: list[str]) -> dict:
    params = yaml.safe_load(base.read_text())
    items = []
    for item in overrides:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            items += overlay_items(yaml.safe_load(Path(item).read_text()) or {}, params)
        else:
            items.append(item)
    for item in items:
        section = item.split("=", 1)[0].split(".")[0]
        if section not in params:
            raise ParamError(f"override {item!r}: no section {section!r} in {base}")
        set_override(params, item)
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    try:
        derive(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
    except ParamError as e:
        sys.exit(f"derive_params: {e}")
