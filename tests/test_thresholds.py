"""The training-free thresholders (TEAL, CATS, GRIFFIN, WINA) and the byte sparsity every method reports
(issue 12 items 1-2), on tiny random Llama (GQA), OPT (ReLU, fc1/fc2) and Gemma (MQA, GeGLU) models."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from pipeline.evaluate import catalog, methods, registry, thresholds
from pipeline.evaluate.forward import ForwardInfo, dense_masking
from pipeline.evaluate.loglik import loglikelihoods
from pipeline.hooks import observe_masks
from pipeline.masks import MaskSpec
from pipeline.models.adapters import resolve
from pipeline.units import n_kept
from tests.conftest import VOCAB, tiny_model
from tests.test_evaluate import CharTokenizer, _logits, _params

METHODS = ("teal", "teal_greedy", "cats", "griffin", "wina")
IDS = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _seqs(n: int, T: int, seed: int) -> list[list[int]]:
    return torch.randint(2, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed)).tolist()


def _ctx(model, calib=(64, 32, 0)):
    return registry.MethodContext(
        model=model,
        layout=resolve(model),
        fingerprint="test",
        scores_dir=None,
        predictors_dir=None,
        criterion=None,
        granularity="per_token",
        calibration=lambda: _seqs(*calib),
        oracle_batch=8,
    )


def _build(name, ctx, s, pools=("heads", "neurons")):
    ctx.granularity = catalog.granularity(name, "per_sequence")
    return catalog.build(name, ctx, MaskSpec(sparsity={p: (s if p in pools else 0.0) for p in ("heads", "neurons")}))


def _realised(model, masking, ids):
    """Dropped share per reported (site, layer) tensor over all tokens of `ids`, and the pooled share per pool."""
    info = ForwardInfo(
        ids=ids, valid=torch.ones_like(ids, dtype=torch.bool), last=torch.full((len(ids),), ids.shape[1] - 1)
    )
    per, pooled = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])

    def obs(pool, l, keep, site=None, cost=None):
        key = (thresholds.TEAL_SITE.get(site, "act"), l)
        for acc in (per[key], pooled[pool]):
            acc[0] += float((~keep).sum())
            acc[1] += keep.numel()

    with torch.no_grad(), observe_masks(obs), masking.forward(info):
        model(input_ids=ids)
    return {k: d / n for k, (d, n) in per.items()}, {k: d / n for k, (d, n) in pooled.items()}


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_thresholds_calibrated_to_s_hit_s_within_2_percent_on_held_out_data(arch, method):
    """Calibrated on 128 random sequences of 64 tokens, measured on 128 others with the method applied."""
    model = tiny_model(arch)
    ctx = _ctx(model, calib=(128, 64, 0))
    held_out = torch.tensor(_seqs(128, 64, 1))
    for s in (0.3, 0.5, 0.7):
        masking = _build(method, ctx, s)
        per, _ = _realised(model, masking, held_out)
        assert set(per) == set(masking.th.targets)
        free = {k for k in per if masking.th.t[k] > 0}
        # a ReLU's exact zeros (OPT's fc2 input) are below every threshold: where they exceed s, t = 0 and the
        # tensor realises its zero share (> s), not s
        for k in set(per) - free:
            assert arch == "opt" and k[0] in ("down", "act") and per[k] > s, (k, per[k])
        if not free:  # OPT's CATS below its ReLU sparsity: nothing to calibrate
            assert arch == "opt" and method == "cats" and s < 0.55
            continue
        pooled = sum(per[k] for k in free) / len(free)  # every tensor of a pool has the same width per site kind
        assert pooled == pytest.approx(s, abs=0.02), (s, pooled)
        worst = max(abs(per[k] - s) for k in free)
        assert worst <= 0.04, (s, worst)  # one tensor: the tiny models' attention outputs are noisy (max seen 0.027)


def test_thresholds_are_calibrated_on_the_sparsified_model_in_forward_order():
    """On the calibration sequences themselves every tensor realises exactly its quantile."""
    model = tiny_model("llama")
    ctx = _ctx(model, calib=(32, 24, 3))
    masking = _build("teal", ctx, 0.6)
    per, _ = _realised(model, masking, torch.tensor(_seqs(32, 24, 3)))
    for k, v in per.items():
        assert v == pytest.approx(0.6, abs=0.003), k


def test_abs_histogram_quantile_matches_the_exact_quantile():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3
    x[:3000] = 0.0  # 15% exact zeros
    h = thresholds.AbsHistogram()
    h.add(x[:10000])
    h.add(x[10000:])
    for s in (0.3, 0.5, 0.9):
        t = h.threshold(s)
        assert float((x.abs() <= t).double().mean()) == pytest.approx(s, abs=1e-3)
    assert h.threshold(0.1) == 0.0 and h.zero_share() == pytest.approx(0.15)


# ----------------------------------------------------------------------------- exactness


def test_a_method_at_zero_sparsity_reproduces_dense_logits_exactly(arch):
    model = tiny_model(arch)
    dense = _logits(model, dense_masking(), IDS)
    ctx = _ctx(model)
    for name in METHODS:
        masking = _build(name, ctx, 0.0)
        assert torch.equal(_logits(model, masking, IDS), dense), name


def test_half_sparsity_changes_logits(arch):
    model = tiny_model(arch)
    dense = _logits(model, dense_masking(), IDS)
    ctx = _ctx(model)
    for name in METHODS:
        got = _logits(model, _build(name, ctx, 0.5), IDS)
        if name == "cats" and arch == "opt":
            # ~55% of OPT's fc2 inputs are ReLU zeros: CATS at 50% drops only those, the output is unchanged
            # (and fc2 columns are still skipped: see the byte test)
            assert torch.equal(got, dense)
            got = _logits(model, _build(name, ctx, 0.8), IDS)
        assert not torch.allclose(got, dense, atol=1e-4), name


@pytest.mark.parametrize("method", METHODS)
def test_scores_agree_with_and_without_kv_reuse(method):
    """Per-token thresholds are causal and GRIFFIN's mask is the context's: the shared-prefix path equals whole
    sequences."""
    model = tiny_model("llama")
    ctx = _ctx(model)
    g = torch.Generator().manual_seed(7)
    c = torch.randint(2, VOCAB, (9,), generator=g).tolist()
    reqs = [(c, torch.randint(2, VOCAB, (n,), generator=g).tolist()) for n in (3, 1, 4, 2)] + [(c[:4], [5, 6])] * 2
    masking = _build(method, ctx, 0.5)
    a = loglikelihoods(model, reqs, masking=masking, reuse_context=True, batch_size=2)
    b = loglikelihoods(model, reqs, masking=masking, reuse_context=False, batch_size=2)
    assert [x.loglik for x in a] == pytest.approx([x.loglik for x in b], abs=1e-4)


# ----------------------------------------------------------------------------- WINA


def test_wina_score_equals_abs_x_times_weight_column_norm_by_hand(arch):
    model = tiny_model(arch)
    lin = thresholds.layer_linears(resolve(model))[1]
    W = lin.by_role["k"].weight.detach()
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    by_hand = torch.tensor(
        [
            [
                abs(float(x[r, i])) * math.sqrt(sum(float(W[o, i]) ** 2 for o in range(W.shape[0])))
                for i in range(W.shape[1])
            ]
            for r in range(3)
        ]
    )
    got = thresholds.wina_scores(x, W.float().norm(dim=0))
    assert torch.allclose(got, by_hand, rtol=1e-5)

    # and the hooks keep exactly the top n_kept(in, s) channels by that score at every token
    s, seen = 0.5, {}
    ctx = _ctx(model)
    masking = _build("wina", ctx, s)
    mod = lin.by_role["k"]
    before = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone()))
    try:
        info = ForwardInfo(ids=IDS, valid=torch.ones_like(IDS, dtype=torch.bool), last=torch.tensor([11, 11]))
        with torch.no_grad(), masking.forward(info):
            after = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0].detach().clone()))
            model(input_ids=IDS)
            after.remove()
    finally:
        before.remove()
    xin = seen["in"].reshape(-1, W.shape[1])
    k = n_kept(W.shape[1], s)
    score = xin.abs() * torch.linalg.vector_norm(W, dim=0)
    want = torch.zeros_like(xin)
    for r in range(len(xin)):
        top = sorted(range(W.shape[1]), key=lambda i: -float(score[r, i]))[:k]
        want[r, top] = xin[r, top]
    assert torch.equal(seen["out"].reshape(-1, W.shape[1]), want)


# ----------------------------------------------------------------------------- GRIFFIN


def test_griffin_statistic_by_hand():
    z = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]]])  # [B=1, T=3, F=3]
    ctx = torch.tensor([[True, True, False]])
    # unit rows: [0.6, 0.8, 0], [0, 0, 1]; norms over the two context tokens: [0.6, 0.8, 1]
    assert torch.allclose(thresholds.griffin_statistic(z, ctx), torch.tensor([[0.6, 0.8, 1.0]]))


def _griffin_masks(model, masking, reqs, **kw):
    seen = []
    real = masking.forward

    @contextmanager
    def spying(info):
        with real(info) as state:
            yield state
            seen.append(state["neurons"].clone())

    masking.forward = spying
    out = loglikelihoods(model, reqs, masking=masking, **kw)
    return torch.cat(seen), out


@pytest.mark.parametrize("reuse", [True, False])
def test_griffin_mask_depends_on_the_context_only(arch, reuse):
    model = tiny_model(arch)
    ctx = _ctx(model)
    g = torch.Generator().manual_seed(7)
    c = torch.randint(2, VOCAB, (10,), generator=g).tolist()
    conts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 1, 4, 2)]
    masks, _ = _griffin_masks(
        model, _build("griffin", ctx, 0.5), [(c, k) for k in conts], reuse_context=reuse, batch_size=2
    )
    assert len(masks) >= 2 and (masks == masks[0]).all()  # every candidate: one mask
    other = [[(t + 11) % (VOCAB - 2) + 2 for t in k] for k in conts]
    masks2, _ = _griffin_masks(
        model, _build("griffin", ctx, 0.5), [(c, k) for k in other], reuse_context=reuse, batch_size=2
    )
    assert (masks2 == masks[0]).all()  # other continuations: the same mask
    # = the top-k of the dense context's statistic, layer 0 dense, k = n_kept(F, s) elsewhere
    lay = resolve(model)
    from pipeline.hooks import UnitCapture

    with torch.no_grad(), UnitCapture(model, lay) as cap:
        model(input_ids=torch.tensor([c]))
    for l in range(lay.n_layers):
        keep = masks[0][l]
        if l == 0:
            assert keep.all()
            continue
        stat = thresholds.griffin_statistic(cap.neurons(cap.raw_neurons[l]), torch.ones(1, len(c), dtype=torch.bool))[0]
        assert int(keep.sum()) == n_kept(lay.ffn_dim, 0.5)
        assert stat[keep].min() >= stat[~keep].max()
    masks3, _ = _griffin_masks(
        model, _build("griffin", ctx, 0.5), [(c[:-1] + [(c[-1] + 5) % (VOCAB - 2) + 2], conts[0])], reuse_context=reuse
    )
    assert not torch.equal(masks3[0], masks[0])  # another context: another mask


# ----------------------------------------------------------------------------- bytes


def test_byte_sparsity_by_hand_on_a_small_config():
    """Tiny Llama: E = 32, H = 4 query heads of 8 in 2 kv groups, F = 48, 3 layers, vocab 96."""
    model = tiny_model("llama")
    lay = resolve(model)
    wb = thresholds.WeightBytes.of(model, lay)
    per_layer = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 48 * 32  # q, k, v, o, gate, up, down = 7680
    assert wb.dense == 3 * per_layer + 96 * 32 == 26112
    assert wb.head == (8 * 32 + 8 * 32,) * 3 and wb.kv_group == (8 * 32 * 2,) * 3 and wb.neuron == (32 * 3,) * 3
    # layer 1 drops heads 0 and 1 (all of kv group 0) and 10 neurons; layer 2 drops head 2 (group 1 half-used)
    keep_h = torch.ones(3, 4, dtype=torch.bool)
    keep_h[1, :2] = False
    keep_h[2, 2] = False
    keep_n = torch.ones(3, 48, dtype=torch.bool)
    keep_n[1, :10] = False
    by_hand = (2 * 512 + 512) + 512 + 10 * 96  # = 3008 elements
    got = sum(
        float(thresholds.skipped_elements(wb, "heads", l, keep_h[l]))
        + float(thresholds.skipped_elements(wb, "neurons", l, keep_n[l]))
        for l in range(3)
    )
    assert got == by_hand
    # an input-channel mask: 5 of o's 32 input columns (32 rows each) and 3 of down's 48 (32 rows)
    assert float(thresholds.skipped_elements(wb, "heads", 1, torch.arange(32) >= 5, cost=32)) == 5 * 32

    # through the meter, on a static mask: every token skips the same 3008 / 26112
    masking = methods.StaticMasking(_ctx(model), MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5}), {}, normalize=False)
    masking.mult = {"heads": keep_h.float(), "neurons": keep_n.float()}
    meter = thresholds.meter(masking, wb)
    loglikelihoods(
        model,
        [(IDS[0, :8].tolist(), IDS[0, 8:].tolist()), (IDS[1, :5].tolist(), IDS[1, 5:].tolist())],
        masking=meter.wrap(masking),
    )
    bs = meter.summary()["byte_sparsity"]
    assert bs["mean"] == pytest.approx(by_hand / 26112) and bs["std"] == pytest.approx(0.0, abs=1e-12)
    assert bs["n_tokens"] == 2 * 11  # every real token of both requests (no padding)


def test_byte_sparsity_unit_a_threshold_method_is_the_mean_over_tokens_of_its_own_masks():
    model = tiny_model("opt")
    lay = resolve(model)
    wb = thresholds.WeightBytes.of(model, lay)
    assert wb.dense == 3 * (4 * 32 * 32 + 2 * 40 * 32) + 96 * 32 == 23040
    assert wb.neuron == (32 + 32,) * 3  # an fc1 row and an fc2 column
    ctx = _ctx(model)
    masking = _build("cats", ctx, 0.5)
    meter = thresholds.meter(masking, wb)
    per_token = []

    def obs(pool, l, keep, site=None, cost=None):  # CATS on OPT: an fc2 column (32 elements) per dropped neuron
        assert site == "cats" and cost == 32
        per_token.append((~keep).sum(-1).double() * 32)

    info = ForwardInfo(ids=IDS, valid=torch.ones_like(IDS, dtype=torch.bool), last=torch.tensor([11, 11]))
    with torch.no_grad(), observe_masks(obs), meter.wrap(masking).forward(info):
        model(input_ids=IDS)
    share = (sum(per_token) / wb.dense).flatten()
    summary = meter.summary()
    assert summary["byte_sparsity"]["mean"] == pytest.approx(float(share.mean()))
    assert summary["byte_sparsity"]["std"] == pytest.approx(float(share.std(unbiased=False)))
    assert summary["byte_sparsity"]["std"] > 0  # thresholds: the count varies per token
    assert summary["predictor_share"] == pytest.approx(2 / wb.dense)  # two thresholds (layers 1, 2)


def test_predictor_weights_are_a_cost():
    class WithPredictor(methods.Masking):
        pred = nn.Linear(10, 5)

    model = tiny_model("llama")
    wb = thresholds.WeightBytes.of(model, resolve(model))
    assert thresholds.predictor_elements(WithPredictor()) == 55
    s = thresholds.meter(WithPredictor(), wb).summary()
    assert s["predictor_share"] == pytest.approx(55 / wb.dense)


def test_a_gated_mlp_without_an_activation_module_says_why_cats_does_not_apply():
    model = tiny_model("llama")
    for layer in model.model.layers:
        del layer.mlp._modules["act_fn"]
        object.__setattr__(layer.mlp, "act_fn", torch.nn.functional.silu)
    with pytest.raises(registry.MethodError, match="act_fn"):
        _build("cats", _ctx(model), 0.5)


# ----------------------------------------------------------------------------- the sweep


def test_thresholders_run_in_the_sweep_and_record_byte_sparsity(tmp_path):
    from pipeline.evaluate.config import parse
    from pipeline.evaluate.runner import Evaluator

    model = tiny_model("llama")
    layout = resolve(model)
    params = _params(
        tmp_path,
        methods=["dense", "teal", "cats", "griffin", "wina"],
        limit=2,
        perplexity={"task": "wikitext2", "seq_len": 32, "max_windows": 1},
        calibration_examples=4,
    )
    params["collect"].update({"tasks": ["piqa"], "n_per_task": 6, "max_tokens": 64})
    cfg = parse(params)
    ev = Evaluator(cfg, model, CharTokenizer(), layout, "fp0", model_id="tiny", log=lambda s: None)
    calib = ev.calibration_sequences()
    assert len(calib) == 4 and all(len(q) > 1 for q in calib)
    recs = ev.run()
    assert len(recs) == 10
    by = {(r["method"], r["task"]): r for r in recs}
    for (name, _task), r in by.items():
        b = r["sparsity_detail"]["bytes"]["byte_sparsity"]
        assert b["n_tokens"] > 0 and b["std"] >= 0
        if name == "dense":
            assert b["mean"] == 0.0
        else:
            assert 0.05 < b["mean"] < 0.5, (name, b)
    assert (
        by[("teal", "piqa")]["granularity"] == "per_token" and by[("griffin", "piqa")]["granularity"] == "per_sequence"
    )
    assert by[("griffin", "piqa")]["sparsity_detail"]["heads"]["effective"] == 0.0  # neurons only, and says so
    assert "neurons only" in by[("griffin", "piqa")]["sparsity_detail"]["heads"]["note"]
    eff = by[("teal", "piqa")]["sparsity_detail"]["neurons"]["effective"]  # measured: 2 of 3 layers at ~0.5
    assert eff == pytest.approx(0.5 * 2 / 3, abs=0.05)
    json.dumps(recs)  # records stay JSON
    from pipeline.evaluate.report import write_all

    info = {
        "model": "tiny",
        "fingerprint": "fp0",
        "scope": cfg.scope,
        "pools": cfg.pools,
        "granularity": "-",
        "seed": 1,
        "calib_fraction": 0.5,
        "limit": 2,
        "seq_len": 32,
        "max_windows": 1,
        "cache_dir": "c",
    }
    out = write_all(tmp_path / "out", recs, cfg, info)
    assert out["metrics"]["wina (no transform)"]["s50"]["byte_sparsity"] > 0.05
    assert "bytes skipped" in (tmp_path / "out" / "report.md").read_text()
    assert "byte_sparsity" in (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    # the calibration sample is part of the point key of teal and cats only
    cfg2 = parse({**params, "evaluate": {**params["evaluate"], "calibration_examples": 3}})
    from pipeline.evaluate.config import MethodRef
    from pipeline.evaluate.runner import artifact_hash

    assert artifact_hash(cfg, MethodRef.of("teal")) != artifact_hash(cfg2, MethodRef.of("teal"))
    assert artifact_hash(cfg, MethodRef.of("wina")) is None


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"calibration_examples": 0}, "evaluate.calibration_examples"),
        ({"methods": ["teal"]}, "collect.tasks"),
    ],
)
def test_bad_threshold_params_one_line_naming_parameter(tmp_path, bad, match):
    from pipeline.evaluate.config import parse
    from pipeline.params import ParamError

    params = _params(tmp_path, **bad)
    if "calibration_examples" in bad:
        params["collect"].update({"tasks": ["piqa"], "n_per_task": 4, "max_tokens": 64})
    with pytest.raises(ParamError, match=match) as ei:
        parse(params)
    assert "\n" not in str(ei.value)


def test_registry_lists_the_thresholders_with_their_granularity():
    for name in METHODS:
        assert name in catalog.METHODS and not catalog.METHODS.get(name).criterion
    assert catalog.granularity("griffin", "per_token") == "per_sequence"
    assert catalog.granularity("teal", "per_sequence") == "per_token"
    assert catalog.title("wina", None, "per_token") == "wina (no transform)"


def test_report_pools_byte_sparsity_over_tasks():
    from pipeline.evaluate.report import pooled_bytes

    def rec(n, mean, std):
        return {
            "sparsity_detail": {
                "bytes": {"byte_sparsity": {"mean": mean, "std": std, "n_tokens": n}, "predictor_share": 0.01}
            }
        }

    x = torch.cat([torch.full((30,), 0.2), torch.full((10,), 0.6)]).double()
    got = pooled_bytes([rec(30, 0.2, 0.0), rec(10, 0.6, 0.0), {"sparsity_detail": {}}])
    assert got["byte_sparsity"] == pytest.approx(float(x.mean()))
    assert got["byte_sparsity_std"] == pytest.approx(float(x.std(unbiased=False)))
    assert got["byte_net"] == pytest.approx(float(x.mean()) - 0.01)
    assert pooled_bytes([{"sparsity_detail": {}}]) is None


def test_method_titles_become_valid_mlflow_metric_names():
    """'wina (no transform)' and 'dejavu-l2_norm (dense inputs)': MLflow rejects parentheses."""
    import re

    from pipeline.tracking import metric_name

    for key in ("wina (no transform)/s50/mean_acc", "dejavu-l2_norm (dense inputs)/s50/byte_sparsity"):
        assert re.fullmatch(r"[0-9A-Za-z_\-. :/]+", metric_name(key))
    assert metric_name("dense/s00/mean_acc") == "dense/s00/mean_acc"


# ----------------------------------------------------------------------------- byte-sparsity targets


def test_unit_sparsity_for_a_byte_target_by_hand_on_a_small_config():
    # tiny Llama: per layer q 1,024, k 512, v 512, o 1,024 (attention 3,072), MLP 3 x 32 x 48 = 4,608;
    # 3 layers + LM head 3,072 = 26,112 elements; layer 0 dense, so layers 1 and 2 count
    model = tiny_model("llama")
    wb = thresholds.WeightBytes.of(model, resolve(model))
    assert wb.dense == 26_112 and wb.attn == (3072,) * 3 and wb.cats_neuron == (64,) * 3
    solve = thresholds.unit_sparsity_for_bytes
    both = ["heads", "neurons"]
    # heads (q rows + o columns, 4 x 512) + neurons (4,608) per layer: 2 x 6,656 / 26,112
    s, most = solve(wb, "units", both, (0,), 0.25)
    assert most == pytest.approx(13_312 / 26_112) and s == round(0.25 * 26_112 / 13_312, 4)
    s, most = solve(wb, "inputs", both, (0,), 0.25)  # every column of every linear: 2 x 7,680
    assert most == pytest.approx(15_360 / 26_112) and s == round(0.25 * 26_112 / 15_360, 4)
    s, most = solve(wb, "units", ["neurons"], (0,), 0.25)
    assert s == round(0.25 * 26_112 / 9_216, 4)
    # CATS: up row + down column per neuron, 2 x 48 x 64 = 6,144 = 23.5 %: 25 % is out of reach
    s, most = solve(wb, "gated_neurons", both, (0,), 0.25)
    assert s is None and most == pytest.approx(6_144 / 26_112)
    assert solve(wb, "gated_neurons", ["heads"], (0,), 0.1) == (None, 0.0)


def test_byte_targets_in_the_sweep_every_method_skips_the_target_share(tmp_path):
    from pipeline.evaluate.config import MethodRef, parse
    from pipeline.evaluate.runner import Evaluator, point_key

    model = tiny_model("llama")
    layout = resolve(model)
    params = _params(
        tmp_path,
        methods=["dense", "teal", "cats", "griffin", "wina"],
        sparsities=[0.2, 0.3],
        sparsity_unit="bytes",
        limit=2,
        perplexity={"task": "wikitext2", "seq_len": 32, "max_windows": 1},
        calibration_examples=4,
    )
    params["collect"].update({"tasks": ["piqa"], "n_per_task": 6, "max_tokens": 64})
    cfg = parse(params)
    lines = []
    ev = Evaluator(cfg, model, CharTokenizer(), layout, "fp0", model_id="tiny", log=lines.append)
    recs = ev.run()
    got = {(r["method"], r["sparsity"], r["task"]): r for r in recs}
    # cats reaches 23.5 % at most (test above): no 0.3 point, and the log says why
    assert ("cats", 0.3, "piqa") not in got and ("cats", 0.2, "piqa") in got
    assert any("cats" in x and "out of reach" in x for x in lines)
    for (name, s, task), r in got.items():
        if name == "dense":
            continue
        b = r["sparsity_detail"]["bytes"]
        assert b["target"] == s
        assert b["byte_sparsity"]["mean"] == pytest.approx(s, abs=0.03), (name, s, task, b["byte_sparsity"])
        assert r["ident"]["mask"]["byte_target"] == s and r["ident"]["mask"]["sparsity"] != s
    # the same method at the same number is a different point in units mode, and units keys carry no target
    from dataclasses import replace

    units = replace(ev.cfg, evaluate=replace(ev.cfg.evaluate, sparsity_unit="units"))
    k_units, ident = point_key(units, "fp0", MethodRef.of("teal"), 0.2, "piqa", None)
    k_bytes, _ = point_key(ev.cfg, "fp0", MethodRef.of("teal"), 0.2, "piqa", None, 0.34)
    assert k_units != k_bytes and "byte_target" not in ident["mask"]
    from pipeline.evaluate.report import write_all

    info = {**ev.report_info(), "granularity": "-"}
    write_all(tmp_path / "out", recs, cfg, info)
    assert "byte-sparsity target" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "plots" / "accuracy_bytes.png").stat().st_size > 0


# ----------------------------------------------------------------------------- TEAL's greedy allocation


def test_greedy_allocation_by_hand():
    """Costs 10·a² and b² on sites of 100 and 300 elements: the greedy loads the cheap site, hits the weighted
    target exactly, beats the uniform allocation, and stops at the 0.99 cap when the target is out of reach."""
    el = {"a": 100, "b": 300}

    def err(x):
        return 10 * x["a"] ** 2 + x["b"] ** 2

    got = thresholds.greedy_allocation(err, el, 0.5)
    assert (got["a"] * 100 + got["b"] * 300) / 400 == pytest.approx(0.5, abs=1e-12)
    assert got["b"] > 0.5 > got["a"]
    assert err(got) < err({"a": 0.5, "b": 0.5})
    # a step lifts a by 0.2 or b by 1/15: b's error stays below a's first step (10·0.2² = 0.4 plus b²) all the way,
    # so b carries the whole target (error 0.444; the constrained optimum a 0.022, b 0.659 has 0.439)
    assert got == pytest.approx({"a": 0.0, "b": 2 / 3}, abs=1e-9)
    capped = thresholds.greedy_allocation(err, el, 0.999)
    assert max(capped.values()) <= 0.99 + 1e-12


def test_teal_greedy_allocates_each_pool_to_its_sparsity_and_beats_uniform_on_the_calibration_data(arch):
    """Per layer and pool, the element-weighted mean of the chosen site sparsities is the pool's sparsity; the
    thresholds realise them on the calibration sequences; the final hidden state's error against dense on those
    sequences is lower than uniform TEAL's at the same sparsity."""
    model = tiny_model(arch)
    ctx = _ctx(model, calib=(48, 24, 5))
    greedy, uniform = _build("teal_greedy", ctx, 0.5), _build("teal", ctx, 0.5)
    lins = thresholds.layer_linears(ctx.layout)
    for l in greedy.layers:
        el = thresholds._site_elements(lins[l])
        for pool in ("heads", "neurons"):
            sites = [k for k in el if thresholds.SITE_POOL[k] == pool]
            mean = sum(greedy.th.targets.get((k, l), 0.0) * el[k] for k in sites) / sum(el[k] for k in sites)
            assert mean == pytest.approx(0.5, abs=1e-9), (l, pool)
    assert greedy.th.targets != uniform.th.targets  # it did reallocate
    ids = torch.tensor(_seqs(48, 24, 5))
    per, _ = _realised(model, greedy, ids)
    for k, v in per.items():
        if greedy.th.t[k] > 0:
            assert v == pytest.approx(greedy.th.targets[k], abs=0.01), k
    info = ForwardInfo(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool), last=torch.full((len(ids),), 23))

    def hidden(masking):
        with torch.no_grad(), masking.forward(info):
            return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float()

    dense = hidden(dense_masking())
    e_greedy, e_uniform = ((hidden(m) - dense).pow(2).sum().item() for m in (greedy, uniform))
    assert e_greedy < e_uniform, (e_greedy, e_uniform)  # measured: 13 % (llama), 24 % (opt), 32 % (gemma) lower
