"""Each criterion against a direct, loop-by-loop transcription of SPEC §3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import criteria as C

B, T, H, D, F = 2, 7, 3, 4, 5


@pytest.fixture
def unit_data():
    g = torch.Generator().manual_seed(0)
    a_h, g_h, hg_h = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    a_n, g_n, hg_n = (torch.randn(B, T, F, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 5:] = False  # example 1 has 5 real tokens
    labels = torch.randint(0, 3, (B, T), generator=g)
    labels[:, -1] = -100
    heads = C.UnitBatch(a_h, g_h, valid, hg_h, labels)
    neurons = C.UnitBatch(a_n, g_n, valid, hg_n, labels)
    return heads, neurons


def _tokens(b, u):
    return [t for t in range(T) if u.valid[b, t]]


def ref_heads(name, u):
    out = np.zeros((B, H))
    for b in range(B):
        ts = _tokens(b, u)
        for h in range(H):
            a, g, hg = (x[b, ts, h].numpy() for x in (u.a, u.g, u.hg))  # [t, d]
            if name == "plainact":
                out[b, h] = sum(abs((a[t] * g[t]).sum()) for t in range(len(ts)))
            elif name == "fisher":
                out[b, h] = sum(np.mean([(a[t, d] * g[t, d]) ** 2 for t in range(len(ts))]) for d in range(D))
            elif name == "grad_norm":
                out[b, h] = math.sqrt((g**2).sum())
            elif name == "l2_norm":
                out[b, h] = math.sqrt((a**2).sum())
            elif name == "snip":
                out[b, h] = np.abs(a * g).sum()
            elif name == "grasp":
                out[b, h] = -(hg * a).sum()
            elif name == "nwot":
                c = (a > 0).astype(float)
                k = c @ c.T + (1 - c) @ (1 - c).T + 1e-3 * np.eye(len(ts))
                out[b, h] = np.linalg.slogdet(k)[1]
            elif name == "jacov":
                v = np.clip(np.linalg.eigvalsh(np.corrcoef(g)), 0, None)
                out[b, h] = -np.sum(np.log(v + 1e-5) + 1.0 / (v + 1e-5))
            elif name == "epenas":
                lab = u.labels[b, ts].numpy()
                keep = lab >= 0
                s = []
                for cls in np.unique(lab[keep]):
                    rows = g[keep][lab[keep] == cls]
                    corr = np.atleast_2d(np.corrcoef(rows))
                    s.append(np.log(np.abs(corr) + 1e-5).sum())
                s = np.array(s)
                out[b, h] = np.abs(s[:, None] - s[None, :]).sum() / len(s)
    return out


def ref_neurons(name, u):
    out = np.zeros((B, F))
    for b in range(B):
        ts = _tokens(b, u)
        a, g, hg = (x[b, ts].numpy() for x in (u.a, u.g, u.hg))  # [t, f]
        out[b] = {
            "plainact": np.abs(a * g).sum(0),
            "fisher": ((a * g) ** 2).mean(0),
            "grad_norm": np.sqrt((g**2).sum(0)),
            "l2_norm": np.sqrt((a**2).sum(0)),
            "snip": np.abs(a * g).sum(0),
            "grasp": -(hg * a).sum(0),
            "nwot": np.log(np.maximum((a <= 0).mean(0), 1e-5)),
        }[name]
    return out


@pytest.mark.parametrize("name", sorted(C.CRITERIA))
def test_criterion_matches_reference(name, unit_data):
    heads, neurons = unit_data
    c = C.get(name)
    np.testing.assert_allclose(c.heads(heads).numpy(), ref_heads(name, heads), rtol=1e-6, atol=1e-8)
    if c.neurons is None:
        assert not c.predictable
    else:
        np.testing.assert_allclose(c.neurons(neurons).numpy(), ref_neurons(name, neurons), rtol=1e-6, atol=1e-8)


def test_registry_has_all_nine_and_rejects_unknown():
    assert set(C.CRITERIA) == {"plainact", "fisher", "grad_norm", "l2_norm", "snip", "grasp", "nwot", "jacov", "epenas"}
    assert {n for n, c in C.CRITERIA.items() if not c.predictable} == {"jacov", "epenas"}
    with pytest.raises(C.CriterionError, match="unknown criterion 'nope' \\(params: criteria\\)"):
        C.get("nope")


def test_padding_tokens_do_not_count(unit_data):
    heads, _ = unit_data
    poisoned = C.UnitBatch(heads.a.clone(), heads.g.clone(), heads.valid, heads.hg, heads.labels)
    poisoned.a[1, 5:] = 1e6
    poisoned.g[1, 5:] = 1e6
    for name in ("plainact", "fisher", "grad_norm", "l2_norm", "snip", "nwot", "jacov"):
        np.testing.assert_allclose(C.get(name).heads(poisoned).numpy(), C.get(name).heads(heads).numpy())
