"""Paired method comparisons (pipeline.evaluate.claims): differences, stderr and verdicts by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate import claims


def _rec(label, task, accs, s=0.5, pools=("heads",), lls=None, scope="global"):
    rec = {
        "label": label,
        "task": task,
        "sparsity": s,
        "method": label.split("-")[0],
        "scope": scope,
        "ident": {"mask": {"pools": list(pools)}} if s > 0 else {},
    }
    if lls is not None:
        return dict(rec, per_example=[], metrics={}, details={"window_logliks": lls, "seq_len": 11})
    return dict(
        rec,
        per_example=[{"id": f"{task}/{i}", "acc": float(a)} for i, a in enumerate(accs)],
        metrics={
            "acc": {
                "value": float(np.mean(accs)),
                "n": len(accs),
                "stderr": float(np.std(accs, ddof=1) / math.sqrt(len(accs))),
            }
        },
    )


def test_paired_accuracy_gap_by_hand():
    a1, b1 = [1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 0, 0]
    a2, b2 = [0, 1, 1, 1], [0, 1, 1, 0]
    ra = {"t1": _rec("A", "t1", a1), "t2": _rec("A", "t2", a2)}
    rb = {"t1": _rec("B", "t1", b1), "t2": _rec("B", "t2", b2)}
    g = claims.accuracy_gap(ra, rb, ["t1", "t2"])
    d1, d2 = np.subtract(a1, b1), np.subtract(a2, b2)
    assert g.delta == pytest.approx((d1.mean() + d2.mean()) / 2)
    se = math.sqrt((d1.std(ddof=1) / math.sqrt(6)) ** 2 + (d2.std(ddof=1) / math.sqrt(4)) ** 2) / 2
    assert g.se == pytest.approx(se) and g.n == 10
    assert g.verdict == ("A > B" if g.delta > 2 * se else "within noise")
    assert claims.accuracy_gap(ra, {"t1": rb["t1"]}, ["t1", "t2"]) is None  # a missing task: no claim


def test_verdicts_need_two_standard_errors():
    assert claims.Gap(0.03, 0.01, 100).verdict == "A > B"
    assert claims.Gap(-0.03, 0.01, 100).verdict == "A < B"
    assert claims.Gap(0.019, 0.01, 100).verdict == "within noise"


def test_perplexity_gap_is_the_log_ratio_paired_over_windows():
    la = [-20.0, -30.0, -25.0]
    lb = [-22.0, -31.0, -28.0]
    g = claims.perplexity_gap(_rec("A", "w", [], lls=la), _rec("B", "w", [], lls=lb))
    d = (np.array(lb) - np.array(la)) / 10  # NLL_A - NLL_B per token
    assert g.delta == pytest.approx(d.mean()) and g.se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert g.delta < 0  # A has the lower perplexity


def test_claims_markdown_files_dense_under_every_pools_setting_and_states_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    good = (rng.random(400) < 0.7).astype(float)
    bad = np.where(rng.random(400) < 0.8, good, 0.0)  # B loses ~14 % of A's hits
    recs = [
        _rec("shadowllm-plainact", "piqa", good),
        _rec("static-plainact", "piqa", bad),
        _rec("dense", "piqa", good, s=0.0),
    ]
    md = claims.claims_markdown(recs, ["piqa"], None)
    assert "a contextual predictor beats the static ranking" in md and "A > B" in md
    assert "| heads | global | 0.50 |" in md
    idx = claims.index(recs)
    assert ("heads", "global", "dense", 0.0) in idx
    claims.save_records(tmp_path / "r.json.gz", recs)
    assert claims.load_records([tmp_path / "r.json.gz"]) == recs


def test_the_thresholder_claims_pair_methods_at_one_sparsity_setting():
    """ShadowLLM vs TEAL is answered from records at the same `sparsity` (a byte target in bytes mode)."""
    rng = np.random.default_rng(1)
    recs = []
    for label in ("shadowllm-plainact", "teal", "static-plainact", "teal (greedy)"):
        recs += [_rec(label, t, (rng.random(30) < 0.6).astype(float), s=0.4, pools=("heads", "neurons")) for t in "ab"]
    md = claims.claims_markdown(recs, ["a", "b"], None)
    assert "### ShadowLLM beats TEAL" in md and "### TEAL beats the static ranking (plainact)" in md
    assert "### TEAL's greedy allocation beats uniform TEAL" in md
    assert "### ShadowLLM beats GRIFFIN" not in md  # no griffin records: no section
    section = md.split("### ShadowLLM beats TEAL")[1].split("###")[0]
    assert "| heads+neurons | global | 0.40 |" in section


def test_claims_never_pair_records_of_different_scopes():
    """Runs merged by the research report hold one method at one sparsity under two scopes: each scope gets its
    own row, A of one scope is never paired with (or overwritten by) the other's."""
    rng = np.random.default_rng(2)
    base = (rng.random(400) < 0.6).astype(float)
    worse = np.where(rng.random(400) < 0.7, base, 0.0)
    recs = [
        _rec("shadowllm-plainact", "piqa", base, scope="global"),  # global: A > B
        _rec("static-plainact", "piqa", worse, scope="global"),
        _rec("shadowllm-plainact", "piqa", worse, scope="local"),  # local: A < B
        _rec("static-plainact", "piqa", base, scope="local"),
        _rec("dense", "piqa", base, s=0.0, scope="none"),
    ]
    section = claims.claims_markdown(recs, ["piqa"], None).split("### a contextual predictor")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| heads |")]
    assert len(rows) == 2
    assert "| heads | global | 0.50 |" in rows[0] and "A > B" in rows[0]
    assert "| heads | local | 0.50 |" in rows[1] and "A < B" in rows[1]
    assert {("heads", "global", "dense", 0.0), ("heads", "local", "dense", 0.0)} <= set(claims.index(recs))


def test_scope_markdown_pairs_each_method_with_itself_under_the_other_scope():
    rng = np.random.default_rng(3)
    base = (rng.random(400) < 0.6).astype(float)
    worse = np.where(rng.random(400) < 0.7, base, 0.0)
    recs = [
        _rec("static-plainact", "piqa", worse, scope="local"),
        _rec("static-plainact", "piqa", base, scope="global"),
        _rec("shadowllm-plainact", "piqa", base, scope="local"),  # no global point: no row
        _rec("dense", "piqa", base, s=0.0, scope="none"),
    ]
    md = claims.scope_markdown(recs, ["piqa"], None)
    rows = [line for line in md.splitlines() if line.startswith("| heads |")]
    assert rows == [rows[0]] and "| heads | static-plainact | 0.50 |" in rows[0] and "local worse" in rows[0]
    g = claims.accuracy_gap({"piqa": recs[0]}, {"piqa": recs[1]}, ["piqa"])
    assert f"{100 * g.delta:+.1f} ± {100 * g.se:.1f}" in rows[0]
    assert claims.scope_markdown([r for r in recs if r["scope"] != "global"], ["piqa"], None) == ""


def test_split_tasks_sorts_the_accuracy_tasks_and_finds_the_perplexity_one():
    from pipeline.evaluate.claims import split_tasks

    recs = [{"task": t} for t in ("piqa", "wikitext2", "copa", "piqa")]
    assert split_tasks(recs) == (["copa", "piqa"], "wikitext2")
    assert split_tasks(recs[:1]) == (["piqa"], None)
