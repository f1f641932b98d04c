"""lm-evaluation-harness as a front end (issue 13 item 8): `--model shadowllm` is lm-eval's `LM` over the project's
scorer, so its log-likelihoods are the project's own, dense, under a static mask and under a per-sequence
contextual mask, whichever order or grouping lm-eval hands the requests in."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.data.tokenize import prefix_token_id
from pipeline.evaluate.config import MethodRef
from pipeline.evaluate.lmeval_lm import NAME, SparseLM, overrides
from pipeline.evaluate.loglik import loglikelihoods
from pipeline.evaluate.perplexity import window_logliks
from pipeline.evaluate.tasks import requests_of
from pipeline.models.adapters import resolve
from tests.conftest import tiny_model
from tests.test_evaluate import CharTokenizer, FakeShadow, _params


@pytest.fixture
def make(tmp_path, monkeypatch):
    """`--model shadowllm` built by lm-eval from a model_args string, on the tiny llama (no weights on disk)."""
    import pipeline.aggregate as agg
    import pipeline.models.loading as loading

    model = tiny_model("llama")
    layout = resolve(model)
    loaded = loading.Loaded(model, CharTokenizer(), layout, "fp0", 0.0)
    monkeypatch.setattr(loading, "open_model", lambda mp: loaded)
    monkeypatch.setattr(loading, "check_model", lambda mp: None)
    rng = np.random.default_rng(0)
    static = {
        "heads": rng.random((layout.n_layers, layout.n_heads), dtype=np.float32),
        "neurons": rng.random((layout.n_layers, layout.ffn_dim), dtype=np.float32),
    }
    monkeypatch.setattr(agg, "load_static", lambda d, c, model_fingerprint=None, variant="train_mean": static)
    params = _params(tmp_path)
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "scores.json").write_text("{}")  # the preflight's check; load_static is the fake
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))

    def build(args: str | dict = "", **extra) -> SparseLM:
        lm_eval_given = {"batch_size": extra.get("batch_size", 1), "device": "cuda:0"}  # what lm-eval passes
        if isinstance(args, dict):  # lm-eval's CLI parses --model_args into a dict (brackets kept whole)
            return get_model(NAME).create_from_arg_obj({"params": str(path), **args}, lm_eval_given)
        arg = f"params={path}" + (f",{args}" if args else "")
        return get_model(NAME).create_from_arg_string(arg, lm_eval_given)

    return build


def _requests(lm: SparseLM) -> list[tuple[str, str]]:
    td, _ = lm.ev.task_data("piqa")
    return [(c, k) for e in td.examples for c, k in zip(e.contexts, e.continuations)]


def _instances(pairs, kind="loglikelihood") -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def _ours(lm: SparseLM, masking) -> list[float]:
    td, _ = lm.ev.task_data("piqa")
    reqs = requests_of(td.examples, lm.tok, add_bos=lm.cfg.add_bos)
    return [s.loglik for s in loglikelihoods(lm.model, reqs, masking=masking, batch_size=lm.cfg.batch_size)]


def test_shadowllm_is_registered_beside_lm_evals_own_models():
    assert get_model(NAME) is SparseLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours first does not hide lm-eval's own


def test_model_args_become_params_overrides_and_a_typo_is_one_line():
    assert overrides({"model": "m", "method": "static:fisher", "sparsity": 0.5, "pools": "heads+neurons"}) == [
        'model.id="m"',
        'evaluate.methods=["static:fisher"]',
        "evaluate.sparsities=[0.5]",
        'evaluate.pools=["heads", "neurons"]',
    ]
    assert overrides({"evaluate.calibration_examples": 8}) == ["evaluate.calibration_examples=8"]
    with pytest.raises(Exception, match="unknown model arg 'sparsty'"):
        overrides({"sparsty": 0.5})


@pytest.mark.parametrize("args", ["method=dense", "method=static:fisher,sparsity=0.5,pools=heads+neurons"])
def test_loglikelihood_is_the_project_scorer(make, args):
    lm = make(args)
    pairs = _requests(lm)
    got = [ll for ll, _ in lm.loglikelihood(_instances(pairs))]
    want = _ours(lm, lm.ev.masking(lm.method, lm.sparsity))
    assert got == pytest.approx(want, abs=1e-5)
    if "static" in args:  # the mask acts
        dense = _ours(lm, lm.ev.masking(MethodRef.of("dense"), 0.0))
        assert max(abs(a - b) for a, b in zip(got, dense)) > 1e-3


def test_a_contextual_mask_comes_from_the_context_whatever_lm_eval_sends(make):
    from pipeline.evaluate import methods

    lm = make("method=static:fisher,sparsity=0.5,pools=heads+neurons")
    lm.ev.ctx.granularity = "per_sequence"
    lm.masking = methods.ShadowLLMMasking(lm.ev.ctx, lm.cfg.mask_spec(0.5), FakeShadow(lm.ev.layout))
    pairs = _requests(lm)
    want = _ours(lm, lm.masking)
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    shuffled = [ll for ll, _ in lm.loglikelihood(_instances([pairs[i] for i in order]))]
    assert [shuffled[order.index(i)] for i in range(len(pairs))] == pytest.approx(want, abs=1e-5)
    one_by_one = [lm.loglikelihood(_instances([p]))[0][0] for p in pairs]  # no shared prefix to reuse
    assert one_by_one == pytest.approx(want, abs=1e-5)
    dense = _ours(lm, lm.ev.masking(MethodRef.of("dense"), 0.0))
    assert max(abs(a - b) for a, b in zip(want, dense)) > 1e-3


@pytest.mark.parametrize("args", ["method=dense", "method=static:fisher,sparsity=0.5,pools=heads"])
def test_loglikelihood_rolling_is_the_project_perplexity_of_each_window(make, args):
    lm = make(args + ",max_length=16,evaluate.batch_size=4", batch_size=1)
    docs = ["the cat sat.", "a much longer document that needs several rolling windows of 16."]
    got = lm.loglikelihood_rolling(_instances([(d,) for d in docs], "loglikelihood_rolling"))
    masking = lm.ev.masking(lm.method, lm.sparsity)
    p = prefix_token_id(lm.tok)
    short = window_logliks(lm.model, [[p, *lm.tok(docs[0])["input_ids"]]], masking=masking)
    assert got[0] == pytest.approx(short[0], abs=1e-5)  # one window: [prefix] + the doc, every doc token scored
    ids = lm.tok(docs[1])["input_ids"]
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, p, 16, 1)]
    assert len(windows) > 2 and sum(len(k) for _, k in windows) == len(ids)  # every token scored once
    if "dense" in args:  # unmasked, a window's score is an ordinary request's
        want = loglikelihoods(lm.model, windows, masking=masking, reuse_context=False)
        assert got[1] == pytest.approx(sum(s.loglik for s in want), abs=1e-4)
    assert lm.cfg.batch_size == 4  # a dotted params key in the model args; lm-eval's own batch_size is not used
    assert lm.cfg.model.device == "cpu"  # params.yaml's, not lm-eval's default cuda:0


def test_one_method_at_one_sparsity(make):
    assert make({"method": "dense", "evaluate.sparsities": [0.3, 0.5]}).sparsity == 0.0  # the reference needs none
    with pytest.raises(Exception, match="one method at one sparsity"):
        make({"method": "static:fisher", "evaluate.sparsities": [0.3, 0.5]})


def test_generation_tasks_are_refused_in_one_line(make):
    lm = make("method=dense")
    with pytest.raises(Exception, match="generate_until tasks are not supported"):
        lm.generate_until(_instances([("ctx", {"until": ["\n"]})], "generate_until"))


TINY_PIQA = """task: tiny_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {file}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_evals_evaluator_on_a_mirror_file_gives_the_project_scores(make, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pipeline.data.tasks import load_examples
    from pipeline.evaluate.tasks import aggregate, per_example

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    lm = make("method=static:fisher,sparsity=0.5,pools=heads+neurons")
    mirror = tmp_path / "mirror"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_piqa.yaml").write_text(TINY_PIQA.format(file=mirror / "piqa" / "piqa_validation.jsonl"))
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tiny_piqa"], task_manager=tm, log_samples=True)
    samples = sorted(out["samples"]["tiny_piqa"], key=lambda d: d["doc_id"])
    got = [float(r[0]) for d in samples for r in d["filtered_resps"]]
    examples = load_examples("piqa", mirror)  # the project's reading of the same file: the same prompts
    reqs = requests_of(examples, lm.tok, add_bos=lm.cfg.add_bos)
    want = [s.loglik for s in loglikelihoods(lm.model, reqs, masking=lm.masking, batch_size=lm.cfg.batch_size)]
    assert len(samples) == len(examples) == 12 and got == pytest.approx(want, abs=1e-5)
    acc = aggregate("piqa", per_example(examples, want, [False] * len(want)))["acc"]["value"]
    assert out["results"]["tiny_piqa"]["acc,none"] == pytest.approx(acc)


def test_shadowllm_lm_eval_hands_its_arguments_to_lm_evals_cli(monkeypatch):
    import lm_eval.__main__ as lm_main
    from click.testing import CliRunner

    from stages.cli import main

    seen = {}
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda: seen.setdefault("argv", list(sys.argv)))
    res = CliRunner().invoke(main, ["lm-eval", "--model", NAME, "--model_args", "method=dense", "--limit", "3"])
    assert res.exit_code == 0, res.output
    assert seen["argv"] == ["lm-eval", "--model", NAME, "--model_args", "method=dense", "--limit", "3"]
