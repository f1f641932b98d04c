"""scripts/ship.py: a file split into parts travels and is reassembled bit for bit, or refused in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ship = _load("ship")


def test_split_stash_assemble_round_trip(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 9000 + b"tail")  # 2.2 MiB -> 3 parts of 1 MiB
    m = ship.split(src, tmp_path / "parts", part_mib=1)
    assert len(m["parts"]) == 3
    there = tmp_path / "device"
    for p in m["parts"]:  # one part per call, each stashed outside the repo
        call = tmp_path / f"call-{p['name']}"
        call.mkdir()
        (call / p["name"]).write_bytes((tmp_path / "parts" / p["name"]).read_bytes())
        (call / "manifest.json").write_text((tmp_path / "parts" / "manifest.json").read_text())
        ship.stash(call, there)
    out = ship.assemble(there, tmp_path / "work" / "model.gguf")
    assert out.read_bytes() == src.read_bytes()


def test_a_damaged_or_missing_part_is_refused_and_nothing_is_written(tmp_path, capsys):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * (3 << 20))
    ship.split(src, tmp_path / "parts", part_mib=1)
    part = tmp_path / "parts" / "part-001"
    part.write_bytes(b"y" + part.read_bytes()[1:])
    target = tmp_path / "out" / "f.bin"
    assert ship.main(["assemble", str(tmp_path / "parts"), "--to", str(target)]) == 2
    assert "part-001 has the wrong sha256" in capsys.readouterr().err
    part.unlink()
    assert ship.main(["assemble", str(tmp_path / "parts"), "--to", str(target)]) == 2
    assert "parts missing" in capsys.readouterr().err
    assert not target.exists() and not list((tmp_path / "out").glob(".*"))


def test_derive_params_overrides_and_refuses_a_new_section(tmp_path):
    derive = _load("derive_params")
    out = tmp_path / "p.yaml"
    p = derive.derive(ROOT / "params.yaml", out, ["model.device=cuda", "evaluate.limit=300"])
    assert p["model"]["device"] == "cuda" and p["evaluate"]["limit"] == 300
    from pipeline.params import ParamError

    with pytest.raises(ParamError, match="no section 'evalute'"):
        derive.derive(ROOT / "params.yaml", out, ["evalute.limit=3"])
