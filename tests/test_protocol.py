"""The evaluation protocol (issue 9, SPEC §5-§7): masks come from the context only, features are read where
`collect` read them, the oracle is one gold-derived mask per example, static = the train mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import collect
from pipeline.evaluate import catalog, methods, registry
from pipeline.evaluate.loglik import loglikelihoods
from pipeline.evaluate.perplexity import window_logliks
from pipeline.masks import MaskSpec, keep_mask
from pipeline.models.adapters import resolve
from pipeline.scoring import ScoreSettings
from tests.conftest import VOCAB, tiny_model
from tests.test_evaluate import FakeDejaVu, FakeShadow, _ctx

SPEC = MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5})


class Spy(nn.Module):
    """Wraps a fake predictor and records every feature row it is asked about."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []
        self.kind, self.layers = inner.kind, inner.layers
        self.offset = getattr(inner, "offset", 0)

    def predict_all(self, x):
        self.rows.append(x.detach().clone())
        return self.inner.predict_all(x)

    def predict_layer(self, l, x):
        self.rows.append((l, x.detach().clone()))
        return self.inner.predict_layer(l, x)


def _example():
    g = torch.Generator().manual_seed(7)
    ctx = torch.randint(2, VOCAB, (9,), generator=g).tolist()
    conts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 1, 4, 2)]
    return ctx, conts


@pytest.mark.parametrize("reuse", [True, False])
def test_predictor_row_in_evaluation_equals_the_calibration_trace_features(arch, reuse):
    model = tiny_model(arch)
    layout = resolve(model)
    ctx, conts = _example()
    gold = 2
    seq = collect.mc_sequence("ex", "t", ctx, conts[gold], max_tokens=64)
    trace = collect.score_batch(model, layout, [seq], ScoreSettings(("plainact",), True))
    reqs = [(ctx, c) for c in conts]

    spy = Spy(FakeShadow(layout))
    loglikelihoods(
        model, reqs, masking=methods.ShadowLLMMasking(_ctx(model, "per_sequence"), SPEC, spy), reuse_context=reuse
    )
    rows = torch.cat([r.reshape(-1, r.shape[-1]) for r in spy.rows])
    assert len(rows) >= 1
    for r in rows:  # every candidate's mask is predicted from the gold example's trace row
        np.testing.assert_allclose(r.numpy(), trace["feat_l0"][0], rtol=1e-4, atol=1e-5)

    spy = Spy(FakeDejaVu(layout))
    loglikelihoods(
        model, reqs, masking=methods.DejaVuMasking(_ctx(model, "per_sequence"), SPEC, spy), reuse_context=reuse
    )
    E = layout.hidden
    feats = trace["feat_layers"][0].reshape(layout.n_layers, E)
    for l, x in spy.rows:
        for r in x.reshape(-1, E):
            np.testing.assert_allclose(r.numpy(), feats[l], rtol=1e-4, atol=1e-5)


def _applied_masks(model, masking, reqs, **kw):
    """Head keep masks the hooks multiplied in, per forward pass row (bool [rows, L, H])."""
    layout = resolve(model)
    seen = []
    real = masking.forward

    from contextlib import contextmanager

    @contextmanager
    def spying(info):
        with real(info) as state:
            yield state
            if state is not None and state["heads"] is not None:
                seen.append(state["heads"].clone())

    masking.forward = spying
    loglikelihoods(model, reqs, masking=masking, **kw)
    return torch.cat(seen) if seen else torch.zeros(0, layout.n_layers, layout.n_heads, dtype=torch.bool)


@pytest.mark.parametrize("method", ["shadowllm", "dejavu", "lookahead"])
@pytest.mark.parametrize("reuse", [True, False])
def test_candidates_sharing_a_context_get_identical_masks(method, reuse):
    model = tiny_model("llama")
    layout = resolve(model)
    ctx, conts = _example()
    pred = {"shadowllm": FakeShadow(layout), "dejavu": FakeDejaVu(layout), "lookahead": FakeDejaVu(layout, offset=1)}[
        method
    ]
    cls = methods.ShadowLLMMasking if method == "shadowllm" else methods.DejaVuMasking
    masks = _applied_masks(
        model,
        cls(_ctx(model, "per_sequence"), SPEC, pred),
        [(ctx, c) for c in conts],
        reuse_context=reuse,
        batch_size=2,
    )
    assert len(masks) >= 2 and (masks[1:] == masks[0]).all()
    # and the mask is the one the context alone produces: changing every continuation changes nothing
    other = [[(t + 11) % (VOCAB - 2) + 2 for t in c] for c in conts]
    masks2 = _applied_masks(
        model,
        cls(_ctx(model, "per_sequence"), SPEC, pred),
        [(ctx, c) for c in other],
        reuse_context=reuse,
        batch_size=2,
    )
    assert (masks2 == masks[0]).all()


@pytest.mark.parametrize("method", ["shadowllm", "dejavu", "oracle"])
def test_per_sequence_scores_agree_with_and_without_kv_reuse(method):
    """The shared-prefix path (masks made once from the context) = whole sequences with features at the
    last context token: both are the same protocol."""
    model = tiny_model("llama")
    layout = resolve(model)
    ctx, conts = _example()
    reqs = [(ctx, c) for c in conts] + [(ctx[:4], c) for c in conts[:2]]
    sources = [1, 1, 1, 1, 5, 5]
    if method == "oracle":
        make = lambda: methods.OracleMasking(_ctx(model, "per_sequence"), SPEC)
    elif method == "shadowllm":
        make = lambda: methods.ShadowLLMMasking(_ctx(model, "per_sequence"), SPEC, FakeShadow(layout))
    else:
        make = lambda: methods.DejaVuMasking(_ctx(model, "per_sequence"), SPEC, FakeDejaVu(layout))
    a = loglikelihoods(model, reqs, masking=make(), reuse_context=True, mask_sources=sources, batch_size=2)
    b = loglikelihoods(model, reqs, masking=make(), reuse_context=False, mask_sources=sources, batch_size=2)
    assert [x.loglik for x in a] == pytest.approx([x.loglik for x in b], abs=1e-4)


def test_oracle_is_one_gold_mask_per_example_shared_by_its_candidates():
    model = tiny_model("llama")
    layout = resolve(model)
    ctx, conts = _example()
    gold = 2
    reqs = [(ctx, c) for c in conts]
    oracle = methods.OracleMasking(_ctx(model, "per_sequence"), SPEC)
    masks = _applied_masks(model, oracle, reqs, reuse_context=False, mask_sources=[gold] * len(reqs))
    assert list(oracle._masks) == [(tuple(ctx + conts[gold]), len(conts[gold]))]
    assert (masks == masks[0]).all()
    # = what collect computes for the gold continuation, ranked as the oracle ranks it
    seq = collect.mc_sequence("ex", "t", ctx, conts[gold], max_tokens=64)
    out = collect.score_batch(model, layout, [seq], ScoreSettings(("plainact",), True))
    true = torch.as_tensor(out["plainact_heads"]).reshape(1, layout.n_layers, layout.n_heads)
    from pipeline.masks import contextual_masks

    assert torch.equal(masks[0], contextual_masks(true, "heads", SPEC, normalize=True)[0])


def test_changing_the_last_token_of_a_perplexity_window_leaves_its_masks_unchanged():
    model = tiny_model("llama")
    layout = resolve(model)
    g = torch.Generator().manual_seed(5)
    w = torch.randint(2, VOCAB, (16,), generator=g).tolist()
    w2 = w[:-1] + [(w[-1] + 7) % (VOCAB - 2) + 2]
    for pred, cls in ((FakeShadow(layout), methods.ShadowLLMMasking), (FakeDejaVu(layout), methods.DejaVuMasking)):
        seen = []
        for win in (w, w2):
            spy = Spy(pred)
            window_logliks(model, [win], masking=cls(_ctx(model, "per_sequence"), SPEC, spy))
            seen.append(spy.rows)
        for a, b in zip(*seen):
            a, b = (a, b) if isinstance(a, torch.Tensor) else (a[1], b[1])
            assert torch.equal(a, b)


def test_static_mask_equals_the_train_mean_keep_mask(tmp_path):
    """static:<crit> ranks the mean of the per-example normalised targets as a predictor's output is ranked."""
    from pipeline import aggregate as agg

    model = tiny_model("llama")
    layout = resolve(model)
    rng = np.random.default_rng(0)
    L, H, F = layout.n_layers, layout.n_heads, layout.ffn_dim
    heads = rng.lognormal(0, 2, (20, L, H)).astype(np.float32)
    neurons = rng.lognormal(0, 2, (20, L, F)).astype(np.float32)
    targets = {"heads": agg.minmax_per_layer(heads), "neurons": agg.minmax_per_layer(neurons)}
    train_mean = {u: t.mean(0) for u, t in targets.items()}
    raw = {"heads": heads.mean(0), "neurons": neurons.mean(0)}
    meta = {"model": {"fingerprint": "fp", "dims": layout.dims()}}
    agg.save_scores(tmp_path, {"plainact": train_mean}, {}, meta, raw_static={"plainact": raw})
    ctx = registry.MethodContext(
        model=model,
        layout=layout,
        fingerprint="fp",
        scores_dir=str(tmp_path),
        predictors_dir=None,
        criterion="plainact",
        granularity="per_sequence",
        calibration=None,
        oracle_batch=8,
    )
    static = catalog.build("static", ctx, SPEC)
    for pool, _U in (("heads", H), ("neurons", F)):
        want = keep_mask(torch.as_tensor(train_mean[pool]), 0.5, "global")
        assert torch.equal(static.keep[pool], want), pool
    raw_m = catalog.build("static_raw", ctx, SPEC)
    assert not all(torch.equal(static.keep[p], raw_m.keep[p]) for p in ("heads", "neurons"))


def test_dejavu_labels_say_which_inputs_it_saw():
    assert catalog.title("dejavu", "l2_norm", "per_sequence") == "dejavu-l2_norm (dense inputs)"
    assert catalog.title("dejavu_lookahead", "l2_norm", "per_token") == "dejavu_lookahead-l2_norm (sparse inputs)"
    assert catalog.title("shadowllm", "plainact", "per_sequence") == "shadowllm-plainact"


def test_dejavu_per_token_runs_on_the_sparse_models_own_layer_inputs():
    """Layer l's per-token prediction sees layer l's input as the masked model computes it."""
    model = tiny_model("llama")
    layout = resolve(model)
    spec = MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5}, scope="local")
    ids = torch.randint(2, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    spy = Spy(FakeDejaVu(layout))
    masking = methods.DejaVuMasking(_ctx(model, "per_token"), spec, spy)
    from pipeline.evaluate.forward import ForwardInfo
    from pipeline.hooks import UnitCapture

    info = ForwardInfo(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool), last=torch.tensor([9]))
    with torch.no_grad(), UnitCapture(model, layout, layer_inputs=True) as cap, masking.forward(info):
        model(input_ids=ids)
    with torch.no_grad(), UnitCapture(model, layout, layer_inputs=True) as dense:
        model(input_ids=ids)
    got = dict(spy.rows)
    for l in range(1, layout.n_layers):
        assert torch.allclose(got[l], cap.layer_inputs[l].float())  # the sparse model's own input ...
    assert not torch.allclose(got[2], dense.layer_inputs[2].float(), atol=1e-4)  # ... not the dense one
    with pytest.raises(registry.MethodError, match="scope local"):
        methods.DejaVuMasking(_ctx(model, "per_token"), SPEC, FakeDejaVu(layout))
