"""CPU smoke tests of the benchmark engine (torch reference kernels, fp32, tiny shapes): a few seconds."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench import bounds, reference, shapes, weights
from pipeline.bench import plan as plan_mod
from pipeline.bench.engine import DecodeEngine, EngineConfig
from pipeline.bench.predictors import PredictorSpec, dejavu_bytes, shadowllm_bytes

FAMILIES = ("llama", "opt")


def _engine(fam, method, sp, batch, w=None, steps_len=4, tiles=None):
    s = shapes.tiny(fam)
    w = w or weights.build(s, dtype=torch.float32, keep_raw=True, seed=3)
    cfg = EngineConfig(
        method=method,
        head_sparsity=sp,
        neuron_sparsity=sp,
        batch=batch,
        prompt_len=8,
        gen_len=steps_len,
        shadowllm=PredictorSpec(16, 16, 4, 8),
        dejavu=PredictorSpec(8, 8, 0, 0),
        overlap=True,
        seed=1,
        **({} if tiles is None else {"tiles": tiles}),
    )
    return DecodeEngine(s, cfg, weights=w, backend="torch", device="cpu", dtype=torch.float32), w


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("sp", [0.0, 0.5, 0.75])
def test_static_sparse_equals_masked_dense(fam, sp):
    """Gather kernels over kept rows == dense model with the dropped heads/neurons zeroed, over several steps."""
    eng, w = _engine(fam, "static", sp, batch=2)
    ref = reference.ReferenceDecoder(w, eng.k_cache, eng.v_cache)
    hk, nk = eng.plan.host_masks(eng.shape)
    assert hk[0].all() and nk[0].all(), "layer 0 stays dense"
    if sp > 0:
        assert not hk[1:].all() and not nk[1:].all()
    eng.reset()
    tok = eng.tok.clone()
    for t in range(4):
        eng.step()
        lr = ref.step(tok, 8 + t, hk, nk)
        torch.testing.assert_close(eng.logits, lr, rtol=1e-4, atol=1e-4)
        tok = lr.argmax(-1)
        assert torch.equal(eng.tok, tok)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", ["dense", "static", "shadowllm", "dejavu"])
def test_zero_sparsity_equals_dense(fam, method):
    eng, w = _engine(fam, method, 0.0, batch=1)
    ref = reference.ReferenceDecoder(w, eng.k_cache, eng.v_cache)
    eng.reset()
    tok = eng.tok.clone()
    for t in range(3):
        eng.step()
        lr = ref.step(tok, 8 + t)
        torch.testing.assert_close(eng.logits, lr, rtol=1e-4, atol=1e-4)
        tok = lr.argmax(-1)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", ["shadowllm", "dejavu"])
def test_predicted_masks_union_over_batch(fam, method):
    """Each layer keeps the union over the batch of every example's top-k, and the output equals the dense model
    with exactly the non-kept units zeroed."""
    B = 3
    eng, w = _engine(fam, method, 0.5, batch=B)
    s = eng.shape
    ref = reference.ReferenceDecoder(w, eng.k_cache, eng.v_cache)
    eng.reset()
    tok = eng.tok.clone()
    eng.step()
    hk, nk = eng.plan.host_masks(s)
    assert hk[0].all() and nk[0].all()
    if method == "shadowllm":  # all layers' scores are still in the buffers after the step
        sh = eng.s_heads.view(B, s.layers, s.heads)
        sn = eng.s_neurons.view(B, s.layers, s.ffn)
        for l in range(1, s.layers):
            per = torch.zeros(B, s.heads, dtype=torch.bool)
            per.scatter_(1, torch.topk(sh[:, l], eng.plan.k_heads, dim=1).indices, True)
            assert torch.equal(per.any(0), hk[l])
            per_n = torch.zeros(B, s.ffn, dtype=torch.bool)
            per_n.scatter_(1, torch.topk(sn[:, l], eng.plan.k_neurons, dim=1).indices, True)
            assert torch.equal(per_n.any(0), nk[l])
            assert (per.sum(1) == eng.plan.k_heads).all()
            # kv groups: kept iff any head of the group is kept
            qm = eng.plan.qkv_mask[l]
            kv = hk[l].view(s.kv_heads, -1).any(1).to(qm.dtype)
            assert torch.equal(qm[s.heads : s.heads + s.kv_heads], kv)
    else:  # the last layer's scores are in the buffers
        l = s.layers - 1
        per_n = torch.zeros(B, s.ffn, dtype=torch.bool)
        per_n.scatter_(1, torch.topk(eng.s_neurons, eng.plan.k_neurons, dim=1).indices, True)
        assert torch.equal(per_n.any(0), nk[l])
    assert (nk[1:].sum(1) >= eng.plan.k_neurons).all()
    idx, cnt = eng.plan.ffn_idx, eng.plan.ffn_count
    for l in range(s.layers):  # index lists ascending and of the right length
        row = idx[l, : int(cnt[l])]
        assert torch.equal(row, torch.sort(row).values) and int(cnt[l]) == int(nk[l].sum())
        heads = eng.plan.head_idx[l, : int(eng.plan.head_count[l])]  # the o-projection's kept-head list
        assert torch.equal(heads.long(), torch.nonzero(hk[l]).flatten())
    lr = ref.step(tok, 8, hk, nk)
    torch.testing.assert_close(eng.logits, lr, rtol=1e-4, atol=1e-4)


def test_kept_counts_and_bytes():
    assert plan_mod.kept(32, 0.5) == 16 and plan_mod.kept(32, 0.9) == 3 and plan_mod.kept(3, 0.99) == 1
    s = shapes.get("llama-3-8b")
    d = bounds.dense_bytes(s, batch=1, context=0)
    assert d["total_bytes"] == pytest.approx((s.layer_params() * s.layers + s.vocab * s.hidden) * 2)
    hk = torch.ones(s.layers, s.heads, dtype=torch.bool)
    hk[1:, 16:] = False
    nk = torch.ones(s.layers, s.ffn, dtype=torch.bool)
    nk[1:, s.ffn // 2 :] = False
    half = bounds.step_bytes(s, hk, nk, batch=1, context=0)
    assert 0.5 < half["total_bytes"] / d["total_bytes"] < 0.6
    sp = PredictorSpec(2048, 1024, 0)
    assert shadowllm_bytes(s, sp) == 2 * ((2048 + 1024) * 4096 + 32 * 32 * 2048 + 32 * 14336 * 1024)
    assert dejavu_bytes(s, sp) > 0


def test_model_registry_shapes():
    for name in ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "llama-2-7b", "llama-3-8b", "qwen2.5-7b"):
        s = shapes.get(name)
        assert s.heads * s.head_dim == s.hidden
    assert shapes.get("llama-3-8b").group_size == 4 and shapes.get("qwen2.5-7b").group_size == 7
    with pytest.raises(KeyError):
        shapes.get("gpt-5")
