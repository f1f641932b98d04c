"""The benchmark's parameters (one typed schema over `benchmark:`) and its tiles (an immutable value passed to the
engine, the launchers and the sweeps): CPU only."""

from __future__ import annotations

import copy
from dataclasses import astuple
from pathlib import Path

import pytest
import torch

from pipeline.bench import shapes, weights
from pipeline.bench.engine import DecodeEngine, EngineConfig
from pipeline.bench.params import BenchmarkParams
from pipeline.bench.predictors import PredictorSpec
from pipeline.bench.tiles import DEFAULT_TILES, attn_tiling, col_tiling, row_tiling
from pipeline.params import ParamError, load

PARAMS = load(Path(__file__).resolve().parents[1] / "params.yaml")


def _with(**bench):
    params = copy.deepcopy(PARAMS)
    params["benchmark"].update(bench)
    return params


def test_params_yaml_parses():
    bp = BenchmarkParams.from_params(PARAMS)
    assert bp.methods == ["dense", "static", "shadowllm", "dejavu"]
    assert bp.shadowllm.spec == PredictorSpec(2048, 1024, 256, 0)
    fullrank = next(e for e in bp.extra if e.name == "shadowllm-fullrank")
    assert fullrank.shadowllm.rank_neurons == 0 and fullrank.overlap is None and fullrank.batch is None
    assert [(p.method, p.sparsity) for p in bp.profile][1] == ("static", 0.5)
    assert bp.as_dict()["extra"][0]["pdl"] is False  # the parsed config is what is logged and recorded


@pytest.mark.parametrize(
    "bench, named",
    [
        ({"modes": ["dense"]}, "benchmark.modes"),
        ({"prompt_len": 0}, "benchmark.prompt_len"),
        ({"batches": [1, 32]}, "benchmark.batches"),
        ({"methods": ["dense", "sparse"]}, "benchmark.methods[1]"),
        ({"models": ["gpt-5"]}, "benchmark.models[0]"),
        ({"shadowllm": {"hidden_heads": 8, "hidden_neurons": 8, "rank_heads": 0, "rank_neuron": 0}}, "rank_neuron"),
        ({"extra": [{"name": "x", "model": "opt-1.3b", "method": "dense", "sparsity": 0.0, "pld": False}]}, "pld"),
        ({"profile": [{"method": "dense"}]}, "benchmark.profile[0].sparsity"),
    ],
)
def test_bad_params_are_one_line_errors_naming_them(bench, named):
    with pytest.raises(ParamError) as e:
        BenchmarkParams.from_params(_with(**bench))
    assert named in str(e.value) and "\n" not in str(e.value)


def test_missing_key_is_an_error():
    params = copy.deepcopy(PARAMS)
    del params["benchmark"]["warmup_steps"]
    with pytest.raises(ParamError, match=r"missing parameter benchmark\.warmup_steps"):
        BenchmarkParams.from_params(params)


def test_widths_from_train():
    bp = BenchmarkParams.from_params(_with(widths_from_train=True))
    assert bp.shadowllm.as_dict() == PARAMS["train"]["widths"]["shadowllm"]
    assert bp.dejavu.as_dict() == PARAMS["train"]["widths"]["dejavu_lookahead"]
    params = _with(widths_from_train=True)
    del params["train"]["widths"]["dejavu_lookahead"]
    with pytest.raises(ParamError, match=r"train\.widths\.dejavu_lookahead"):
        BenchmarkParams.from_params(params)


# ---- tiles ----------------------------------------------------------------------------------------------------


def test_tiles_are_an_immutable_value():
    before = DEFAULT_TILES.as_dict()
    other = DEFAULT_TILES.replace("row", {"BN": 1, "BK": 4096, "warps": 8})
    assert other.row["BK"] == 4096 and DEFAULT_TILES.as_dict() == before
    with pytest.raises(TypeError):
        DEFAULT_TILES.row["BN"] = 8  # type: ignore[index]
    with pytest.raises(KeyError):
        DEFAULT_TILES.replace("rows", {"BN": 1})
    assert type(DEFAULT_TILES).from_dict(other.as_dict()) == other


def test_launch_tilings_use_the_tiles_given():
    tiles = DEFAULT_TILES.replace("qkv", {"BN": 1, "BK": 2048, "warps": 8}).replace(
        "col", {"BN": 256, "BK": 4, "KPP": 128, "warps": 2, "TP": 768}
    )
    args = dict(batch=1, k=4096, sel_kind="dense", sel_group=1, ksel_group=None)
    assert astuple(row_tiling(tiles, "qkv", **args)) == (1, 2048, 8)
    assert astuple(row_tiling(DEFAULT_TILES, "qkv", **args)) == (2, 1024, 4)
    assert astuple(row_tiling(tiles, "row", **args)) == (2, 512, 4)  # only the role replaced changed
    dense = dict(batch=1, n=4096, sel_kind="dense", sel_group=1, sel_expect=0)
    assert astuple(col_tiling(tiles, **dense)) == (256, 4, 128, 2)
    assert astuple(col_tiling(DEFAULT_TILES, **dense)) == (512, 8, 256, 4)
    t = attn_tiling(DEFAULT_TILES.replace("attn", {"BT": 16, "NT": 2, "warps": 1}), max_len=256)
    assert (t.BT, t.NT, t.splits, t.warps) == (16, 2, 8, 1)


class _Recording:
    """The torch reference backend, recording the tiles each launch was given."""

    def __init__(self):
        from pipeline.bench import kernels_ref

        self.ref, self.seen = kernels_ref, []

    def __getattr__(self, name):
        fn = getattr(self.ref, name)

        def call(*a, **kw):
            if "tiles" in kw:
                self.seen.append((name, kw["tiles"]))
            return fn(*a, **kw)

        return call


@pytest.mark.parametrize("method", ["dense", "shadowllm"])
def test_engine_launches_with_its_tiles(method, monkeypatch):
    from pipeline.bench import backend

    rec = _Recording()
    monkeypatch.setattr(backend, "get", lambda name: rec)
    tiles = DEFAULT_TILES.replace("o", {"BN": 1, "BK": 256, "warps": 1})
    s = shapes.tiny("llama")
    cfg = EngineConfig(
        method=method,
        head_sparsity=0.5,
        neuron_sparsity=0.5,
        batch=1,
        prompt_len=8,
        gen_len=2,
        shadowllm=PredictorSpec(16, 16, 4, 8),
        dejavu=PredictorSpec(8, 8, 0, 0),
        overlap=False,
        seed=1,
        tiles=tiles,
    )
    eng = DecodeEngine(s, cfg, weights=weights.build(s, dtype=torch.float32, seed=3), device="cpu", dtype=torch.float32)
    eng.reset()
    eng.step()
    names = {n for n, _ in rec.seen}
    assert {"attention_workspace", "row_gemv", "col_gemv_add", "attention_decode"} <= names
    assert all(t is tiles for _, t in rec.seen)


def test_sweep_returns_the_best_tiles_and_leaves_the_default():
    from pipeline.bench import microbench

    cands = [{"BN": 4, "BK": 512, "warps": 4}, {"BN": 1, "BK": 4096, "warps": 8}, {"BN": 9, "BK": 0, "warps": 0}]

    def measure(t):
        if t.row["BN"] == 9:
            raise RuntimeError("does not compile")
        return t.row["BK"]  # ms: lower is better

    before = DEFAULT_TILES.as_dict()
    tiles, record = microbench._pick(DEFAULT_TILES, "row", cands, measure, "ms", lower_is_better=True)
    assert tiles.row == cands[0] and tiles.qkv == DEFAULT_TILES.qkv
    assert record["best"]["config"] == cands[0] and "error" in record["all"][2]
    assert DEFAULT_TILES.as_dict() == before
