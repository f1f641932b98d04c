"""Evaluation: lm-eval-style scoring, shared-context reuse, masks through hooks, perplexity, caching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.tasks import Example
from pipeline.evaluate import catalog, methods, registry
from pipeline.evaluate.forward import ForwardInfo, dense_masking
from pipeline.evaluate.loglik import loglikelihoods
from pipeline.evaluate.perplexity import count_words, perplexity
from pipeline.evaluate.tasks import aggregate, mean_stderr, per_example
from pipeline.masks import MaskSpec
from pipeline.models.adapters import resolve
from tests.conftest import VOCAB, tiny_model

# ----------------------------------------------------------------------------- fakes


class CharTokenizer:
    """Reversible character tokenizer with ids < VOCAB (bos 0, eos 1)."""

    bos_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [2 + (ord(c) % (VOCAB - 2)) for c in text]}

    def decode(self, ids):
        return "".join(chr(i - 2 + 0) if i >= 2 else "" for i in ids)


class FakeShadow(nn.Module):
    """predict_all: [..., H*D] -> heads [..., L, H], neurons [..., L, F] (a fixed random projection)."""

    kind = "shadowllm"

    def __init__(self, layout, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        L, H, F, E = layout.n_layers, layout.n_heads, layout.ffn_dim, layout.n_heads * layout.head_dim
        self.wh = torch.randn(E, L * H, generator=g)
        self.wn = torch.randn(E, L * F, generator=g)
        self.L, self.H, self.F = L, H, F
        self.layers = list(range(L))

    def predict_all(self, x):
        return (x @ self.wh).unflatten(-1, (self.L, self.H)), (x @ self.wn).unflatten(-1, (self.L, self.F))


class FakeDejaVu(nn.Module):
    kind = "dejavu"

    def __init__(self, layout, offset=0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.offset = offset
        self.layers = list(range(offset, layout.n_layers))
        self.wh = torch.randn(layout.n_layers, layout.hidden, layout.n_heads, generator=g)
        self.wn = torch.randn(layout.n_layers, layout.hidden, layout.ffn_dim, generator=g)

    def predict_layer(self, l, x):
        return x @ self.wh[l], x @ self.wn[l]


def _ctx(model, granularity="per_token", criterion="plainact", pred=None, kind="shadowllm"):
    layout = resolve(model)
    ctx = registry.MethodContext(
        model=model,
        layout=layout,
        fingerprint="test",
        scores_dir=None,
        predictors_dir=None,
        criterion=criterion,
        granularity=granularity,
        calibration=None,
        oracle_batch=8,
    )
    if pred is not None:
        ctx.cache[f"pred/{kind}/{criterion}"] = pred
    return ctx


def _logits(model, masking, ids):
    info = ForwardInfo(
        ids=ids,
        valid=torch.ones_like(ids, dtype=torch.bool),
        last=torch.full((ids.shape[0],), ids.shape[1] - 1),
        mask_src=[(tuple(r.tolist()), ids.shape[1] - 1) for r in ids],
    )
    with torch.no_grad(), masking.forward(info):
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _all_maskings(model, s, pools=("heads", "neurons")):
    layout = resolve(model)
    spec = MaskSpec(sparsity={p: s for p in pools})
    static = {
        "heads": np.random.rand(layout.n_layers, layout.n_heads),
        "neurons": np.random.rand(layout.n_layers, layout.ffn_dim),
    }
    local = MaskSpec(sparsity={p: s for p in pools}, scope="local")  # DejaVu on sparse inputs ranks per layer
    out = {
        "static": methods.StaticMasking(_ctx(model), spec, static, normalize=True),
        "static/train_mean": methods.StaticMasking(_ctx(model), spec, static, normalize=False),
    }
    for g in ("per_token", "per_sequence"):
        out[f"shadowllm/{g}"] = methods.ShadowLLMMasking(_ctx(model, g), spec, FakeShadow(layout))
        dv = local if g == "per_token" else spec
        out[f"dejavu/{g}"] = methods.DejaVuMasking(_ctx(model, g), dv, FakeDejaVu(layout))
        out[f"lookahead/{g}"] = methods.DejaVuMasking(_ctx(model, g), dv, FakeDejaVu(layout, offset=1))
    out["oracle"] = methods.OracleMasking(_ctx(model, "per_sequence", "plainact"), spec)
    return out


# ----------------------------------------------------------------------------- masks through hooks


def test_zero_sparsity_reproduces_dense_logits_exactly(model):
    dense = _logits(model, dense_masking(), IDS)
    for name, masking in _all_maskings(model, 0.0).items():
        assert torch.equal(_logits(model, masking, IDS), dense), name


def test_half_sparsity_neuron_masks_change_logits(model):
    dense = _logits(model, dense_masking(), IDS)
    for name, masking in _all_maskings(model, 0.5, pools=("neurons",)).items():
        assert not torch.allclose(_logits(model, masking, IDS), dense, atol=1e-4), name


def test_half_sparsity_head_masks_change_logits(model):
    dense = _logits(model, dense_masking(), IDS)
    for name, masking in _all_maskings(model, 0.5, pools=("heads",)).items():
        assert not torch.allclose(_logits(model, masking, IDS), dense, atol=1e-4), name


def test_masks_zero_the_right_units():
    model = tiny_model("llama")
    layout = resolve(model)
    spec = MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5})
    seen = {}

    def spy(l):
        def hook(_m, args):
            seen[l] = args[0].detach().clone()

        return hook

    masking = methods.ShadowLLMMasking(_ctx(model, "per_token"), spec, FakeShadow(layout))
    with (
        torch.no_grad(),
        masking.forward(ForwardInfo(IDS, torch.ones_like(IDS, dtype=torch.bool), torch.tensor([11, 11]))),
    ):
        hs = [layout.ffn_down[l].register_forward_pre_hook(spy(l)) for l in range(layout.n_layers)]
        try:
            model(input_ids=IDS)
        finally:
            for h in hs:
                h.remove()
    # our spy runs after the masker (registered later): masked neurons are exact zeros
    assert (seen[0] != 0).all()  # layer 0 dense
    zero_frac = np.mean([(seen[l] == 0).float().mean().item() for l in range(1, layout.n_layers)])
    assert zero_frac == pytest.approx(0.5, abs=0.05)
    # per_token: masks differ between tokens of a sequence
    z = seen[1][0] == 0
    assert not all(torch.equal(z[0], z[t]) for t in range(1, z.shape[0]))


# ----------------------------------------------------------------------------- scoring


def _requests():
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(2, VOCAB, (9,), generator=g).tolist()
    ctx2 = torch.randint(2, VOCAB, (5,), generator=g).tolist()
    conts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 4, 2)]
    return (
        [(ctx, c) for c in conts]
        + [(ctx2, conts[1]), (ctx2, conts[3]), (ctx2 + [5], conts[2])]
        + [(ctx[:3], c) for c in conts[:3]]
    )


def _reference(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    tgt = torch.tensor(cont)
    sl = logp[len(ctx) - 1 :]
    return sl.gather(-1, tgt[:, None]).sum().item(), bool((sl.argmax(-1) == tgt).all())


def test_loglik_matches_reference_with_and_without_reuse(model):
    reqs = _requests()
    ref = [_reference(model, c, k) for c, k in reqs]
    for reuse in (True, False):
        stats = {}
        got = loglikelihoods(model, reqs, reuse_context=reuse, batch_size=3, stats=stats)
        for (ll, greedy), s in zip(ref, got):
            assert s.loglik == pytest.approx(ll, abs=1e-4) and s.is_greedy == greedy
        if reuse:  # shared contexts are computed once
            assert stats["forward_tokens"] < stats["request_tokens"]


def test_reuse_with_per_token_masks_matches_full_sequences():
    model = tiny_model("llama")
    layout = resolve(model)
    spec = MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5})
    masking = methods.ShadowLLMMasking(_ctx(model, "per_token"), spec, FakeShadow(layout))
    assert masking.reuse_context
    reqs = _requests()
    a = loglikelihoods(model, reqs, masking=masking, reuse_context=True)
    b = loglikelihoods(model, reqs, masking=masking, reuse_context=False)
    assert [x.loglik for x in a] == pytest.approx([x.loglik for x in b], abs=1e-4)


def test_truncation_keeps_continuation(model):
    ctx, cont = list(range(2, 40)), [5, 6, 7]
    (s,) = loglikelihoods(model, [(ctx, cont)], max_length=10)
    ll, _ = _reference(model, ctx[-8:], cont)
    assert s.loglik == pytest.approx(ll, abs=1e-4) and s.n_tokens == 3


def test_acc_norm_uses_choice_length_without_delimiter():
    # piqa: target_delimiter " "; choices "ab" (len 2) vs "abcdef" (len 6)
    ex = Example("piqa/0", "piqa", ("Q",) * 2, (" ab", " abcdef"), 1)
    rows = per_example([ex], [-2.2, -6.0], [False, False])
    assert rows[0]["acc"] == 0.0
    # -2.2/2 = -1.1 < -6/6 = -1.0 -> choice 1 wins; with the delimiter counted (-2.2/3 > -6/7) it would not
    assert rows[0]["acc_norm"] == 1.0


def test_winogrande_partial_scoring_and_stderr():
    ex = [Example(f"winogrande/{i}", "winogrande", ("A x", "A y"), (" rest",) * 2, i % 2) for i in range(4)]
    rows = per_example(ex, [-1, -2, -1, -2, -3, -1, -1, -2], [False] * 8)
    agg = aggregate("winogrande", rows)
    assert set(agg) == {"acc"}
    x = [1.0, 0.0, 0.0, 0.0]
    assert agg["acc"]["value"] == 0.25 and agg["acc"]["n"] == 4
    assert agg["acc"]["stderr"] == pytest.approx(np.std(x, ddof=1) / 2) == mean_stderr(x)


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_windows_and_word_count(model):
    tok = CharTokenizer()
    text = "the cat sat on the mat\n\n and the dog ran far away " * 3
    r = perplexity(model, tok, text, seq_len=16, batch_size=2)
    n_tok = len(text)
    assert r["n_tokens"] == n_tok and r["n_windows"] == math.ceil(n_tok / 16)
    assert r["n_scored_tokens"] == n_tok - r["n_windows"]
    assert r["n_words"] == count_words(text) == len(__import__("re").split(r"\s+", text))
    assert r["token_perplexity"] == pytest.approx(math.exp(-r["loglik"] / r["n_scored_tokens"]))
    assert r["word_perplexity"] == pytest.approx(math.exp(-r["loglik"] / r["n_words"]))
    # window log-likelihoods do not depend on batching
    r1 = perplexity(model, tok, text, seq_len=16, batch_size=1)
    assert r1["loglik"] == pytest.approx(r["loglik"], abs=1e-3)


# ----------------------------------------------------------------------------- params and caching


def _params(tmp_path: Path, **ev):
    mirror = tmp_path / "mirror"
    (mirror / "piqa").mkdir(parents=True, exist_ok=True)
    rows = [{"goal": f"goal {i}", "sol1": f"do a {i}", "sol2": f"do b thing {i}", "label": i % 2} for i in range(12)]
    (mirror / "piqa" / "piqa_validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (mirror / "wikitext2").mkdir(exist_ok=True)
    (mirror / "wikitext2" / "wiki.test.raw").write_text(" = Title = \n\n the cat sat on the mat . \n" * 6)
    e = {
        "tasks": ["piqa"],
        "limit": 4,
        "perplexity": {"task": "wikitext2", "seq_len": 32, "max_windows": 2},
        "methods": ["dense", "static:fisher"],
        "sparsities": [0.5],
        "scores_dir": str(tmp_path / "scores"),
        "cache_dir": str(tmp_path / "cache"),
    }
    e.update(ev)
    return full_params(
        model={"id": "unused"}, data={"mirror_dir": str(mirror), "calib_fraction": 0.5, "seed": 1}, evaluate=e
    )


def full_params(**sections) -> dict:
    """The repository's params.yaml with each given section updated (`evaluate.perplexity` key by key)."""
    import copy

    from pipeline.params import load

    params = copy.deepcopy(load(Path(__file__).resolve().parents[1] / "params.yaml"))
    for name, values in sections.items():
        values = dict(values)
        if name == "evaluate" and "perplexity" in values:
            values["perplexity"] = {**params["evaluate"]["perplexity"], **values["perplexity"]}
        params[name].update(values)
    return params


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"sparsities": [1.2]}, "evaluate.sparsities"),
        ({"methods": ["magic"]}, "evaluate.methods"),
        ({"methods": ["static"]}, r"evaluate.methods\[0\]"),
        ({"tasks": ["nope"]}, "evaluate.tasks"),
        ({"limit": 0}, "evaluate.limit"),
        ({"scope": "all"}, "evaluate.scope"),
        ({"granularity": "per_word"}, "evaluate.granularity"),
        ({"perplexity": {"task": "piqa"}}, "evaluate.perplexity.task"),
        ({"colour": 1}, "evaluate.colour"),
    ],
)
def test_bad_params_one_line_naming_parameter(tmp_path, bad, match):
    from pipeline.evaluate.config import parse
    from pipeline.params import ParamError

    with pytest.raises(ParamError, match=match) as ei:
        parse(_params(tmp_path, **bad))
    assert "\n" not in str(ei.value)


def test_sweep_caches_points_and_reruns_only_new_ones(tmp_path, monkeypatch):
    from pipeline.evaluate.config import parse
    from pipeline.evaluate.report import write_all
    from pipeline.evaluate.runner import Evaluator

    model = tiny_model("llama")
    layout = resolve(model)
    tok = CharTokenizer()
    static = {
        "heads": np.random.rand(layout.n_layers, layout.n_heads).astype(np.float32),
        "neurons": np.random.rand(layout.n_layers, layout.ffn_dim).astype(np.float32),
    }
    import pipeline.aggregate as agg

    monkeypatch.setattr(agg, "load_static", lambda d, c, model_fingerprint=None, variant="train_mean": static)
    cfg = parse(_params(tmp_path))
    ev = Evaluator(cfg, model, tok, layout, "fp0", model_id="tiny", log=lambda s: None)
    recs = ev.run()
    assert len(recs) == 4 and not any(r["cached"] for r in recs)  # (dense, static@0.5) x (piqa, wikitext2)
    assert all(r["split"]["n_eval_total"] == 6 for r in recs if r["task"] == "piqa")
    cfg2 = parse(_params(tmp_path, sparsities=[0.5, 0.7]))
    recs2 = Evaluator(cfg2, model, tok, layout, "fp0", model_id="tiny", log=lambda s: None).run()
    assert len(recs2) == 6 and sum(not r["cached"] for r in recs2) == 2
    info = {
        "model": "tiny",
        "fingerprint": "fp0",
        "scope": cfg2.scope,
        "pools": cfg2.pools,
        "granularity": "-",
        "seed": 1,
        "calib_fraction": 0.5,
        "limit": 4,
        "seq_len": 32,
        "max_windows": 2,
        "cache_dir": "c",
    }
    out = write_all(tmp_path / "out", recs2, cfg2, info)
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert header.startswith("model,method,criterion,sparsity,granularity,task,metric,value,n,stderr")
    assert (tmp_path / "out" / "plots" / "accuracy.png").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert "s70" in out["metrics"]["static-fisher"] and "mean_acc" in out["metrics"]["dense"]["s00"]
    # evaluated ids are evaluation ids only
    calib = set(ev.task_data("piqa")[0].split.calib_ids)
    assert not calib & {e.id for e in ev.task_data("piqa")[0].examples}


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu", "dejavu_lookahead"])
@pytest.mark.parametrize("granularity", ["per_token", "per_sequence"])
def test_real_predictors_through_registry(tmp_path, kind, granularity):
    """Predictors saved by pipeline.predictors and loaded by the method registry, as the sweep does."""
    from pipeline.predictors import build, save_predictor

    model = tiny_model("llama")
    layout = resolve(model)
    pred = build(
        kind, "plainact", layout.dims(), {"hidden_heads": 16, "hidden_neurons": 16, "rank_heads": 0, "rank_neurons": 0}
    )
    save_predictor(pred, tmp_path / f"{kind}-plainact", {"model_fingerprint": "fpX"})
    ctx = registry.MethodContext(
        model=model,
        layout=layout,
        fingerprint="fpX",
        scores_dir=None,
        predictors_dir=str(tmp_path),
        criterion="plainact",
        granularity=granularity,
        calibration=None,
        oracle_batch=8,
    )
    dense = _logits(model, dense_masking(), IDS)
    assert torch.equal(
        _logits(model, catalog.build(kind, ctx, MaskSpec(sparsity={"heads": 0.0, "neurons": 0.0})), IDS), dense
    )
    scope = "local" if kind != "shadowllm" and granularity == "per_token" else "global"  # DejaVu on sparse inputs
    sparse = catalog.build(kind, ctx, MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5}, scope=scope))
    assert not torch.allclose(_logits(model, sparse, IDS), dense, atol=1e-4)
    ctx.fingerprint = "other"
    ctx.cache.clear()
    with pytest.raises(registry.MethodError, match=r"fingerprint fpX, not for this model \(other\).*predictors_dir"):
        catalog.build(kind, ctx, MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5}))
