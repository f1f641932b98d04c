"""Evaluation methods carry their capabilities (`MethodSpec`): a method registered from here runs through
`shadowllm evaluate` end to end; the `evaluate:` schema has no code defaults; the stage's bad input is one line."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.evaluate import catalog, registry
from pipeline.evaluate.config import EvaluateParams, PerplexityParams
from pipeline.evaluate.forward import Masking
from pipeline.hooks import UnitMasker
from pipeline.masks import keep_mask
from pipeline.models.adapters import resolve
from pipeline.params import load, schema_defaults
from tests.conftest import tiny_model
from tests.test_evaluate import CharTokenizer, _params

REPO = Path(__file__).resolve().parents[1]


class KeepFirst(Masking):
    """Keeps the first units of every prunable layer (a fixed mask, ranked within the layer)."""

    def __init__(self, ctx: registry.MethodContext, spec):
        self.ctx, lay = ctx, ctx.layout
        self.keep = {}
        for pool, units in (("heads", lay.n_heads), ("neurons", lay.ffn_dim)):
            scores = -torch.arange(units, dtype=torch.float32).expand(lay.n_layers, units)
            s = spec.s(pool)
            self.keep[pool] = None if s == 0 else keep_mask(scores, s, "local", dense_layers=spec.dense_layers).float()

    @contextmanager
    def forward(self, info):
        h, n = self.keep["heads"], self.keep["neurons"]
        with UnitMasker(
            self.ctx.model,
            self.ctx.layout,
            head_fn=None if h is None else (lambda l, x: h[l]),
            neuron_fn=None if n is None else (lambda l, x: n[l]),
        ):
            yield None


@pytest.fixture
def keep_first(monkeypatch):
    spec = registry.MethodSpec("keep_first", KeepFirst, fixed_granularity="none", title_of=lambda g: "keep_first (k)")
    monkeypatch.setitem(catalog.METHODS._items, spec.name, spec)  # registered for this test only
    return spec


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """`shadowllm evaluate` on the tiny llama with a character tokenizer (no weights read from disk)."""
    import pipeline.models.loading as loading
    from stages.evaluate import cli

    model = tiny_model("llama")
    loaded = loading.Loaded(model, CharTokenizer(), resolve(model), "fp0", 0.0)
    monkeypatch.setattr(loading, "open_model", lambda mp: loaded)
    monkeypatch.setattr(loading, "check_model", lambda mp: None)
    monkeypatch.setenv("SHADOWLLM_TRACKING", "0")

    def run(params: dict, *args: str):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        out = tmp_path / "out"
        return CliRunner().invoke(cli, ["--params", str(path), "--out", str(out), *args]), out

    return run


def test_a_method_registered_from_a_test_runs_through_the_evaluate_stage(tmp_path, stage, keep_first):
    res, out = stage(
        _params(tmp_path, methods=["dense", "keep_first"], sparsities=[0.5]), "--records", str(tmp_path / "r.json.gz")
    )
    assert res.exit_code == 0, res.output
    summary = {r["label"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(summary) == {"dense", "keep_first (k)"}
    kf = summary["keep_first (k)"]
    assert kf["granularity"] == "none" and float(kf["sparsity"]) == 0.5
    assert float(kf["eff_heads"]) == pytest.approx(2 * 2 / (3 * 4))  # 2 of 4 heads in 2 of 3 layers
    assert float(kf["word_perplexity"]) != float(summary["dense"]["word_perplexity"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "mean_acc" in metrics["keep_first (k)"]["s50"]
    # its points are cached like every other method's: a rerun evaluates nothing
    res, _ = stage(_params(tmp_path, methods=["dense", "keep_first"], sparsities=[0.5]))
    assert res.exit_code == 0 and "(0 evaluated, 4 cached)" in res.output, res.output


def _one_line(res) -> str:
    assert res.exit_code != 0, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize(
    "edit, args, expected",
    [
        ({"sparsity": [0.5]}, (), "unknown parameter evaluate.sparsity (did you mean 'sparsities'?)"),
        (
            {"methods": ["shadowllm:plainact"], "predictors_dir": "nowhere"},
            (),
            "no predictor nowhere/shadowllm-plainact",
        ),
        ({"methods": ["static:fisher"]}, (), "scores.json not found (run the aggregate stage first)"),
        ({}, ("--set", "evaluate.batch_size=0"), "evaluate.batch_size must be >= 1"),
        ({}, ("--set", "evaluate.methods=[dense, wat]"), "unknown method 'wat' (params: evaluate.methods)"),
        ({}, ("--set", "evaluate.perplexity.seq_len=1"), "evaluate.perplexity.seq_len must be >= 2"),
    ],
)
def test_bad_evaluate_input_is_one_line_before_the_model_loads(tmp_path, stage, monkeypatch, edit, args, expected):
    import pipeline.models.loading as loading

    monkeypatch.setattr(loading, "open_model", lambda mp: pytest.fail("the model must not be loaded"))
    params = _params(tmp_path)
    params["evaluate"].update(edit)
    res, out = stage(params, *args)
    assert expected in _one_line(res)
    assert not out.exists()


def test_evaluate_schema_has_no_defaults_and_covers_params_yaml():
    assert schema_defaults(EvaluateParams) == {} and schema_defaults(PerplexityParams) == {}
    sec = load(REPO / "params.yaml")["evaluate"]
    assert set(sec) == {f.name for f in fields(EvaluateParams)}
    ep = EvaluateParams.from_mapping(sec, "evaluate")
    assert ep.batch_size == sec["batch_size"] and ep.calibration_examples == sec["calibration_examples"]
    assert ep.as_dict()["perplexity"] == sec["perplexity"]


def test_every_registered_method_states_its_needs():
    for name, spec in catalog.METHODS.items():
        assert spec.needs in ("nothing", "scores", "predictor", "calibration"), name
        assert spec.fixed_granularity in (None, "none") or spec.fixed_granularity in spec.granularities, name
        if spec.needs == "predictor":
            assert spec.criterion and spec.predictor_kind == name
    assert [n for n, s in catalog.METHODS.items() if s.reference] == ["dense"]


def test_compare_lmeval_subcommand(tmp_path):
    from stages.cli import main

    lm = tmp_path / "lm" / "run"
    lm.mkdir(parents=True)
    (lm / "results_1.json").write_text(
        json.dumps({"results": {"local_piqa": {"acc,none": 0.5, "acc_stderr,none": 0.25}}})
    )
    (lm / "samples_local_piqa_1.jsonl").write_text(
        "\n".join(
            json.dumps({"doc_id": i, "acc": a, "filtered_resps": [["-1.0"], ["-2.0"]]}) for i, a in [(0, 1), (1, 0)]
        )
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    rec = {
        "method": "dense",
        "task": "piqa",
        "ident": {"task_settings": {"limit": 2}},
        "metrics": {"acc": {"value": 0.5, "stderr": 0.25, "n": 2}},
        "per_example": [
            {"id": "piqa/0", "acc": 1.0, "loglik": [-1.0, -2.0]},
            {"id": "piqa/1", "acc": 0.0, "loglik": [-1.0, -2.0]},
        ],
    }
    (cache / "k.json").write_text(json.dumps(rec))
    out = tmp_path / "cmp.md"
    res = CliRunner().invoke(
        main,
        [
            "compare-lmeval",
            "--lmeval-out",
            str(tmp_path / "lm"),
            "--cache",
            str(cache),
            "--limit",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| piqa | 2 | acc | 50.0 ± 25.0 | 50.0 ± 25.0 | +0.00 | 2/2 |" in out.read_text()
    res = CliRunner().invoke(
        main, ["compare-lmeval", "--lmeval-out", str(cache), "--cache", str(cache), "--out", str(out)]
    )
    assert res.exit_code != 0 and "no lm-eval results_*.json" in res.output
