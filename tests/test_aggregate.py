"""Aggregation (SPEC §4): static means, per-layer min-max targets, the scores files, the aggregate stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import aggregate as agg
from tests.conftest import section_params, tiny_model

CRITERIA = ["plainact", "l2_norm", "jacov"]  # jacov: static-only (heads only)
AGG = {"targets": ["plainact", "l2_norm"], "heatmap": "plainact", "target_dtype": "float32"}
FINGERPRINT = "tiny-llama-fp"


def build_traces(out_dir: Path, n: int = 64, seed: int = 0) -> Path:
    """A real trace directory: tiny random Llama (GQA), random token sequences, the collect loop."""
    from pipeline.collect import CollectParams, Sequence, collect
    from pipeline.models.adapters import resolve

    model = tiny_model("llama")
    layout = resolve(model)
    rng = np.random.default_rng(seed)
    seqs = [
        Sequence(f"ex{i:03d}", "synthetic", tuple(int(v) for v in rng.integers(0, 96, int(rng.integers(6, 14)))), 3)
        for i in range(n)
    ]
    meta = {"model": {"id": "tiny-llama", "fingerprint": FINGERPRINT, "dims": layout.dims()}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        with np.errstate(over="ignore"):  # float16 storage overflows on jacov for this random model
            collect(
                model,
                layout,
                seqs,
                out_dir,
                section_params(
                    CollectParams, criteria=CRITERIA, shard_size=32, batch_size=8, storage="float16", layer_inputs=True
                ),
                meta,
                progress=False,
            )
    finally:
        torch.set_num_threads(threads)
    return out_dir


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.fixture(scope="session")
def trace_dir(tmp_path_factory) -> Path:
    return build_traces(tmp_path_factory.mktemp("traces"))


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("SHADOWLLM_TRACKING", "0")


class FakeTraces:
    def __init__(self, heads: np.ndarray, neurons: np.ndarray):
        self._s = {"heads": heads, "neurons": neurons}

    def scores(self, criterion: str, unit: str) -> np.ndarray:
        return self._s[unit]


def test_minmax_per_layer_by_hand():
    x = np.array([[[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]], [[-2.0, 0.0, 2.0], [0.0, 10.0, 5.0]]])
    expect = np.array([[[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]], [[0.0, 0.5, 1.0], [0.0, 1.0, 0.5]]])
    np.testing.assert_allclose(agg.minmax_per_layer(x), expect)


def test_static_scores_is_the_mean_by_hand():
    heads = np.array([[[1.0, 2.0]], [[3.0, 6.0]]])  # N=2, L=1, H=2
    neurons = np.array([[[0.0, 4.0, 8.0]], [[2.0, 0.0, 2.0]]])
    raw = agg.static_scores(FakeTraces(heads, neurons), "plainact", raw=True)
    np.testing.assert_allclose(raw["heads"], [[2.0, 4.0]])
    np.testing.assert_allclose(raw["neurons"], [[1.0, 2.0, 5.0]])
    # the train mean: each example min-max normalised per layer first
    s = agg.static_scores(FakeTraces(heads, neurons), "plainact")
    np.testing.assert_allclose(s["heads"], [[0.0, 1.0]])
    np.testing.assert_allclose(s["neurons"], [[0.5, 0.25, 1.0]])
    assert set(agg.static_scores(FakeTraces(heads, neurons), "jacov")) == {"heads"}  # static-only, heads only


def test_static_is_the_train_mean_and_outranks_one_dominant_example():
    """One example with scores 1000x the others decides the raw mean; the train mean follows the majority."""
    rng = np.random.default_rng(0)
    base = np.arange(8, dtype=np.float64)[::-1] + 1.0  # unit 0 most important for most examples
    heads = np.stack([base + rng.uniform(0, 0.1, 8) for _ in range(9)] + [np.arange(8.0) * 1000.0])[:, None, :]
    tr = FakeTraces(heads, heads)
    train_mean = agg.static_scores(tr, "plainact")["heads"][0]
    raw_mean = agg.static_scores(tr, "plainact", raw=True)["heads"][0]
    np.testing.assert_allclose(train_mean, agg.minmax_per_layer(heads).mean(0)[0], rtol=1e-6)
    assert np.argmax(train_mean) == 0 and np.argmax(raw_mean) == 7


def test_non_finite_clipped_to_the_layer_range():
    x = np.array([[[1.0, np.inf, 3.0, -np.inf, np.nan]]])
    clean, n_bad = agg.clean(x)
    assert n_bad == 3
    np.testing.assert_allclose(clean, [[[1.0, 3.0, 3.0, 1.0, 1.0]]])


def test_scores_round_trip_and_refusals(tmp_path, trace_dir):
    from pipeline.traces import Traces

    tr = Traces.open(trace_dir)
    static = {c: agg.static_scores(tr, c) for c in tr.criteria}
    raw = {c: agg.static_scores(tr, c, raw=True) for c in tr.criteria}
    tgt, _ = agg.targets(tr, "plainact")
    agg.save_scores(
        tmp_path, static, {"plainact": tgt}, agg.scores_meta(tr, list(static), ["plainact"]), raw_static=raw
    )
    back = agg.load_static(tmp_path, "plainact", model_fingerprint=FINGERPRINT)
    assert set(back) == {"heads", "neurons"}
    np.testing.assert_array_equal(back["heads"], static["plainact"]["heads"])
    np.testing.assert_array_equal(back["neurons"], static["plainact"]["neurons"])
    np.testing.assert_array_equal(back["heads"], tgt["heads"].mean(0, dtype=np.float64).astype(np.float32))
    back_raw = agg.load_static(tmp_path, "plainact", variant="raw_mean")
    np.testing.assert_array_equal(back_raw["neurons"], raw["plainact"]["neurons"])
    assert set(agg.load_static(tmp_path, "jacov")) == {"heads"}
    t = agg.load_targets(tmp_path, "plainact")
    np.testing.assert_array_equal(t["heads"], tgt["heads"])
    assert t["neurons"].shape == (64, 3, 48) and t["neurons"].min() >= 0 and t["neurons"].max() <= 1
    meta = agg.load_meta(tmp_path)
    assert meta["trace_params_hash"] == tr.meta["params_hash"] and meta["model"]["fingerprint"] == FINGERPRINT
    with pytest.raises(ValueError, match="other-fp"):
        agg.load_static(tmp_path, "plainact", model_fingerprint="other-fp")
    with pytest.raises(ValueError, match="no static scores for criterion 'fisher'"):
        agg.load_static(tmp_path, "fisher")
    with pytest.raises(ValueError, match="no predictor targets for criterion 'l2_norm'"):
        agg.load_targets(tmp_path, "l2_norm")


def test_aggregate_stage_end_to_end(tmp_path, trace_dir):
    from stages.aggregate import cli

    params = write_params(tmp_path / "params.yaml", aggregate=AGG)
    out = tmp_path / "scores"
    res = CliRunner().invoke(
        cli,
        ["--params", str(params), "--traces", str(trace_dir), "--out", str(out), "--plots", str(tmp_path / "plots")],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "scores.json").read_text())
    assert meta["criteria"] == sorted(CRITERIA) and meta["targets"] == ["l2_norm", "plainact"]
    assert meta["non_finite"] == {"plainact": 0, "l2_norm": 0}
    assert (tmp_path / "plots" / "heatmap-plainact.png").stat().st_size > 1000
    assert (out / "targets-l2_norm.safetensors").is_file()


def _run_stage(tmp_path, traces):
    from stages.aggregate import cli

    params = write_params(tmp_path / "params.yaml", aggregate=AGG)
    args = ["--params", str(params), "--traces", str(traces), "--out", str(tmp_path / "scores")]
    return CliRunner().invoke(cli, [*args, "--plots", str(tmp_path / "plots")])


def test_aggregate_stage_refuses_an_incomplete_or_corrupt_trace_set(tmp_path, trace_dir):
    import shutil

    traces = tmp_path / "traces"
    shutil.copytree(trace_dir, traces)
    (traces / "part-00001.parquet").unlink()
    res = _run_stage(tmp_path, traces)
    assert res.exit_code == 1, res.output
    assert "incomplete trace set: 1 of 2 shards (missing part-00001.parquet); rerun the collect stage" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "scores").exists()

    shutil.rmtree(traces)
    shutil.copytree(trace_dir, traces)
    shard = traces / "part-00000.parquet"
    b = bytearray(shard.read_bytes())
    b[len(b) // 2 : len(b) // 2 + 1000] = bytes(1000)  # 1000 zero bytes inside a data page
    shard.write_bytes(bytes(b))
    res = _run_stage(tmp_path, traces)
    assert res.exit_code == 1 and f"{shard}: content differs from its sha256 in manifest.json" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["static.safetensors", "targets-plainact.safetensors"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_scores_file_is_refused_by_name(tmp_path, trace_dir, name, damage):
    agg.aggregate(agg.open_traces(trace_dir), agg.AggregateParams.from_mapping(AGG, "aggregate"), tmp_path)
    assert set(agg.load_meta(tmp_path)["sha256"]) == {
        "static.safetensors",
        *(agg.target_file(c) for c in AGG["targets"]),
    }
    f = tmp_path / name
    b = bytearray(f.read_bytes())
    if damage == "flip":
        b[len(b) // 2 : len(b) // 2 + 1000] = bytes(x ^ 0xFF for x in b[len(b) // 2 : len(b) // 2 + 1000])
    else:
        del b[len(b) // 2 :]
    f.write_bytes(bytes(b))
    load = agg.load_static if name.startswith("static") else agg.load_targets
    with pytest.raises(agg.InputError, match=re.escape(f"{f}: content differs from its sha256 in scores.json")) as e:
        load(tmp_path, "plainact")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"targets": ["jacov"]}, "aggregate.targets: criterion 'jacov' is static-only"),
        ({"targets": ["fisher"]}, "aggregate.targets: criterion 'fisher' is not in the traces"),
        ({"targets": ["nope"]}, "aggregate.targets: unknown criterion 'nope'"),
        ({"targets": ["plainact"], "heatmap": "grasp"}, "aggregate.heatmap"),
        ({"target_dtype": "int8"}, "aggregate.target_dtype must be one of 'float32', 'float16'"),
        ({"targets": ["plainact", "plainact"]}, "aggregate.targets has duplicates"),
        ({"heatmap_criterion": "plainact"}, "unknown parameter aggregate.heatmap_criterion"),
        ({"heatmap": None}, "aggregate.heatmap must be a string"),
    ],
)
def test_aggregate_stage_bad_params(tmp_path, trace_dir, section, message):
    from stages.aggregate import cli

    params = write_params(tmp_path / "params.yaml", aggregate={**AGG, **section})
    res = CliRunner().invoke(cli, ["--params", str(params), "--traces", str(trace_dir), "--out", str(tmp_path / "s")])
    assert res.exit_code == 1 and message in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_aggregate_params_have_no_code_defaults():
    """Every key of `aggregate:` is required: params.yaml is the one source of defaults."""
    from pipeline.params import ParamError

    assert section_params(agg.AggregateParams).targets  # the repository's section is valid
    for key in AGG:
        with pytest.raises(ParamError, match=f"missing parameter aggregate.{key}"):
            agg.AggregateParams.from_mapping({k: v for k, v in AGG.items() if k != key}, "aggregate")
