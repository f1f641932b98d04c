"""The compiled PyTorch dense baseline (pipeline/bench/compiled.py): on the engine's folded weights it computes the
textbook decoder (the unfolded fp32 reference), step after step through its static cache, and traces as one graph."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench import reference, shapes, weights
from pipeline.bench.compiled import CompiledDense

FAMILIES = ("llama", "opt")


def _setup(fam: str, batch: int = 2, prompt: int = 8, gen: int = 4):
    s = shapes.tiny(fam)
    w = weights.build(s, dtype=torch.float32, keep_raw=True, seed=3)
    g = torch.Generator().manual_seed(0)
    kc = torch.randn((s.layers, batch, s.kv_heads, prompt + gen, s.head_dim), generator=g)
    vc = torch.randn(kc.shape, generator=g)
    return s, w, kc, vc


@pytest.mark.parametrize("fam", FAMILIES)
def test_compiled_baseline_equals_the_reference_decoder(fam):
    _, w, kc, vc = _setup(fam)
    ref = reference.ReferenceDecoder(w, kc, vc)
    base = CompiledDense(w, kc, vc)
    tok = torch.tensor([1, 5])
    for t in range(4):
        pos = 8 + t
        lr = ref.step(tok, pos)
        lb = base.step(tok, torch.tensor([pos]))
        torch.testing.assert_close(lb, lr, rtol=1e-4, atol=1e-4)
        tok = lr.argmax(-1)
    # the cache got this step's k/v at the step's position, and the prompt's entries are untouched
    assert torch.equal(base.kc[:, :, :, :8], kc[:, :, :, :8])
    assert not torch.equal(base.kc[:, :, :, 8:12], kc[:, :, :, 8:12])


@pytest.mark.parametrize("fam", FAMILIES)
def test_compiled_baseline_traces_as_one_graph(fam):
    """fullgraph=True: a graph break (Python left in the timed step) is an error, and one traced graph serves
    every position (the position is a tensor)."""
    torch._dynamo.reset()
    _, w, kc, vc = _setup(fam)
    base = CompiledDense(w, kc, vc)
    eager = CompiledDense(w, kc, vc)
    fn = base.compiled(mode=None, backend="eager")
    tok = torch.tensor([1, 5])
    for t in range(3):
        pos = torch.tensor([8 + t])
        torch.testing.assert_close(fn(tok, pos), eager.step(tok, pos))


def test_the_run_measures_the_baseline_and_reports_it_beside_our_dense():
    """run_all's compiled row (on a CPU traced without code generation) and the report's table and column."""
    from pipeline.bench import report, run_all
    from pipeline.bench.params import BenchmarkParams
    from tests.conftest import section_params

    torch._dynamo.reset()
    bp = section_params(BenchmarkParams, prompt_len=8, gen_len=3, warmup_steps=1)
    w = weights.build(shapes.tiny("llama"), dtype=torch.float32, seed=3)
    row = run_all.measure_compiled_row(w.shape, w, 2, bp, print, mode=None, backend="eager")
    assert row["status"] == "ok", row["status"]
    assert row["method"] == "compiled-dense" and row["n_timed"] == 3 and row["ms_per_token"] > 0
    ms = row["ms_per_token"]
    dense = dict(
        model=w.shape.name, method="dense", batch=2, head_sparsity=0.0, ms_per_token=ms / 2, tokens_per_s=1.0,
        achieved_gbps=1.0, bound_ms=1.0, frac_of_bound=0.5, speedup_vs_dense=1.0, speedup_vs_compiled=2.0,
        speedup_bound=1.0, predictor_bytes=0, status="ok",
    )  # fmt: skip
    md = report.to_markdown({"rows": [dense], "compiled_rows": [row], "params": {"prompt_len": 8, "gen_len": 3}})
    assert "## Compiled PyTorch dense baseline" in md
    assert f"| {w.shape.name} | 2 | {ms:.3f} | {ms / 2:.3f} | 2.00 |" in md
    assert "| × dense | × compiled |" in md
    failed = run_all.measure_compiled_row(w.shape, w, 2, bp, print, mode=None, backend="no-such-backend")
    assert failed["status"].startswith("error:")  # recorded, not raised: the run goes on
