"""The hooks capture the right tensors: on tiny Llama-GQA, OPT and Gemma models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.hooks import UnitCapture, UnitMasker
from pipeline.models.adapters import ArchitectureError, ArchSpec, register, resolve
from pipeline.scoring import ScoreSettings, Sequence, score_batch


def _ids(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (1, n), generator=g)


def _loss(model, ids):
    """Next-token CE in the model's own dtype (transformers' built-in loss upcasts to float32 only)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def test_layout_of_tiny_models(model, arch):
    layout = resolve(model)
    assert layout.n_layers == 3 and layout.n_heads == 4 and layout.head_dim == 8
    assert layout.kv_group == {"llama": [0, 0, 1, 1], "opt": [0, 1, 2, 3], "gemma": [0, 0, 0, 0]}[arch]


def test_captured_tensors_are_the_projection_inputs(model):
    layout = resolve(model)
    seen = {}
    handles = [
        layout.attn_out[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0].clone())),
        layout.ffn_down[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("d", a[0].clone())),
    ]
    with UnitCapture(model, layout, layer_inputs=True) as cap, torch.no_grad():
        model(input_ids=_ids())
    for h in handles:
        h.remove()
    assert torch.equal(cap.heads(cap.raw_heads[1]).flatten(2), seen["o"].view(1, 12, -1))
    assert torch.equal(cap.neurons(cap.raw_neurons[2]), seen["d"].view(1, 12, -1))
    assert cap.layer_inputs[0].shape == (1, 12, layout.hidden)


@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_scaling_a_unit_changes_loss_as_activation_times_gradient_predicts(model, unit):
    """Scale one unit by (1 - eps): to first order dL = -eps * sum(a * g) over that unit."""
    model = model.double()  # the loss change is ~1e-6: below float32 resolution
    layout = resolve(model)
    model.requires_grad_(False)
    ids = _ids(16, seed=1)
    seq = Sequence("x/0", "x", tuple(ids[0].tolist()), 15)
    out = score_batch(model, layout, [seq], ScoreSettings(("snip",), True))
    layer, idx, eps = 1, 2, 1e-3
    with UnitCapture(model, layout) as cap, torch.enable_grad():
        emb = model.get_input_embeddings()
        h = emb.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
        loss = _loss(model, ids)
        h.remove()
        raw = cap.raw_heads[layer] if unit == "head" else cap.raw_neurons[layer]
        (grad,) = torch.autograd.grad(loss, [raw])
    view = cap.heads if unit == "head" else cap.neurons
    predicted = (
        -eps * (view(raw) * view(grad))[..., idx, :].sum()
        if unit == "head"
        else -eps * (view(raw) * view(grad))[..., idx].sum()
    )

    def scale(l, x):
        if l != layer:
            return None
        m = torch.ones(x.shape[-2] if unit == "head" else x.shape[-1], dtype=x.dtype)
        m[idx] = 1 - eps
        return m

    with torch.no_grad():
        base = _loss(model, ids)
        kw = {"head_fn": scale} if unit == "head" else {"neuron_fn": scale}
        with UnitMasker(model, layout, **kw):
            changed = _loss(model, ids)
    actual = changed - base
    assert abs(predicted) > 1e-6
    assert torch.isclose(actual, predicted, rtol=2e-2, atol=1e-8), (actual, predicted)
    # snip over the same unit (collect's per-example score) bounds |sum a*g| from above
    col = out["snip_heads"] if unit == "head" else out["snip_neurons"]
    n_units = layout.n_heads if unit == "head" else layout.ffn_dim
    assert col[0, layer * n_units + idx] >= abs(predicted.item()) / eps - 1e-5


def test_forward_only_criteria_score_without_an_autograd_graph(model):
    """l2_norm needs no gradient: score_batch must not build a graph for it (the oracle scores every gold
    sequence in evaluation), and its scores equal the ones taken with a graph (snip in the same pass)."""
    layout = resolve(model)
    ids = _ids(16, seed=2)
    seq = Sequence("x/0", "x", tuple(ids[0].tolist()), 15)
    seen = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(torch.is_grad_enabled()))
    try:
        alone = score_batch(model, layout, [seq], ScoreSettings(("l2_norm",), False))
        both = score_batch(model, layout, [seq], ScoreSettings(("l2_norm", "snip"), False))
    finally:
        h.remove()
    assert seen == [False, True]
    for col in ("l2_norm_heads", "l2_norm_neurons"):
        assert (alone[col] == both[col]).all(), col


def test_zero_masks_are_exact_noops_and_zeroing_changes_logits(model):
    layout = resolve(model)
    ids = _ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with UnitMasker(
            model, layout, head_fn=lambda l, x: torch.ones(x.shape[2]), neuron_fn=lambda l, x: torch.ones(x.shape[2])
        ):
            same = model(input_ids=ids).logits
        with UnitMasker(model, layout, neuron_fn=lambda l, x: (torch.arange(x.shape[2]) % 2).float()):
            masked = model(input_ids=ids).logits
    assert torch.equal(dense, same)
    assert not torch.allclose(dense, masked)


def test_unknown_architecture_names_what_is_missing():
    class Cfg:
        model_type = "bert"

    class Fake(nn.Module):
        config = Cfg()

    with pytest.raises(ArchitectureError, match="unknown architecture 'bert'"):
        resolve(Fake())

    register(
        ArchSpec(
            name="broken",
            model_types=("broken_llama",),
            layers="model.layers",
            attn_out="self_attn.out",
            ffn_down="mlp.down_proj",
            ffn_in=("mlp.up_proj",),
        )
    )
    from tests.conftest import tiny_model

    m = tiny_model("llama")
    m.config.model_type = "broken_llama"
    with pytest.raises(ArchitectureError, match="attention output projection not found at 'self_attn.out'"):
        resolve(m)
