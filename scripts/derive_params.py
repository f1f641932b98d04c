"""Write a copy of a params file with `key.path=value` overrides (values parsed as YAML).

Used to run the stages on another machine (the GPU one: `model.device=cuda`, paths outside the repo)
without editing `params.yaml`:  python3 scripts/derive_params.py params.yaml /tmp/p.yaml model.device=cuda
An override must name an existing section (a misspelt one would silently start a new section)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipeline.params import ParamError, set_override


def derive(base: Path, out: Path, overrides: list[str]) -> dict:
    params = yaml.safe_load(base.read_text())
    for item in overrides:
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
