"""`shadowllm research-report`: one command from a research run's records and train tables to its report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.evaluate import research
from pipeline.evaluate.claims import save_records

TASKS = ["copa", "piqa"]


def _rec(method, label, criterion, s, pools, scope, task, correct, *, ppl=None):
    """A point record as `Evaluator.run` writes it: per-example outcomes, or perplexity with window logliks."""
    ident = {"task": task, "task_settings": {"limit": len(correct or [0]), "num_fewshot": 0, "add_bos": False}}
    if method != "dense":
        ident["mask"] = {"pools": pools, "sparsity": s}
    key = f"{method}-{criterion}-{s}-{'+'.join(pools)}-{scope}-{task}"
    rec = {
        "key": key,
        "ident": ident,
        "model": "tiny",
        "model_fingerprint": "fp",
        "method": method,
        "criterion": criterion,
        "label": label,
        "sparsity": s,
        "granularity": "none",
        "scope": "none" if method == "dense" else scope,
        "task": task,
        "sparsity_detail": {"heads": {"effective": s}, "neurons": {"effective": s if "neurons" in pools else 0.0}},
    }
    if ppl is not None:
        lls = [-ppl * 10.0 - i for i in range(4)]
        m = {k: {"value": ppl, "stderr": None, "n": 4} for k in ("word_perplexity", "token_perplexity")}
        return {**rec, "metrics": m, "details": {"window_logliks": lls, "seq_len": 11}, "per_example": []}
    acc = float(np.mean(correct))
    se = float(np.std(correct, ddof=1) / math.sqrt(len(correct)))
    rec["metrics"] = {"acc": {"value": acc, "stderr": se, "n": len(correct)}}
    rec["per_example"] = [{"id": f"{task}/{i}", "acc": float(c), "loglik": [0.0, -1.0]} for i, c in enumerate(correct)]
    return rec


def _point(method, label, criterion, s, pools, scope, accs, ppl):
    out = [_rec(method, label, criterion, s, pools, scope, t, a) for t, a in zip(TASKS, accs)]
    return out + [_rec(method, label, criterion, s, pools, scope, "wikitext2", None, ppl=ppl)]


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    heads, hn = [], []

    def accs(p):
        return [(rng.random(20) < p).astype(float).tolist() for _ in TASKS]

    dense = _point("dense", "dense", "", 0.0, [], "none", accs(0.7), 20.0)
    for s in (0.3, 0.5):
        heads += _point("static", "static-plainact", "plainact", s, ["heads"], "global", accs(0.6), 30.0 + 10 * s)
        heads += _point("static", "static-fisher", "fisher", s, ["heads"], "global", accs(0.6), 28.0 + 10 * s)
        heads += _point("shadowllm", "shadowllm-plainact", "plainact", s, ["heads"], "global", accs(0.65), 25.0)
        hn += _point("shadowllm", "shadowllm-plainact", "plainact", s, ["heads", "neurons"], "global", accs(0.5), 60.0)
    (tmp_path / "heads").mkdir()
    (tmp_path / "hn").mkdir()
    save_records(tmp_path / "heads" / "records.json.gz", dense + heads)
    save_records(tmp_path / "hn" / "records.json.gz", dense + hn)  # the dense point twice: read once

    def rho(j, p):
        return {"spearman_joint": j, "spearman_per_layer": p}

    tables = {
        "predictors": {
            "plainact": {
                "shadowllm": {
                    "heads": rho(0.72, 0.68),
                    "neurons": rho(0.66, 0.52),
                    "size": {"bytes_bf16": 3 * 2**20, "share_of_model": 0.021},
                }
            }
        },
        "train_mean": {"plainact": {"heads": rho(0.67, 0.65), "neurons": rho(0.60, 0.50)}},
        "ridge": {"plainact": {"shadowllm": {"heads": rho(0.71, 0.67), "neurons": rho(0.65, 0.51)}}},
    }
    (tmp_path / "train_tables.json").write_text(json.dumps(tables))
    fisher = {part: {"fisher": v["plainact"]} for part, v in tables.items()}  # a second train call, one criterion
    (tmp_path / "train_tables-fisher.json").write_text(json.dumps(fisher))
    (tmp_path / "peaks.log").write_text("collect: wall 12.0 s, peak RSS 1.00 GiB, peak GPU 2.00 GiB, exit 0\n")
    params = {
        "model": {"dtype": "bfloat16", "device": "cuda"},
        "collect": {
            "tasks": ["a", "b"],
            "n_per_task": 500,
            "num_fewshot": 5,
            "max_tokens": 1024,
            "criteria": ["plainact"],
        },
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    return tmp_path


def test_the_report_has_every_pool_setting_the_criteria_the_predictors_and_the_claims(run_dir):
    out = research.build(run_dir, "tiny")
    md = (run_dir / "report.md").read_text()
    n_points = 1 + 3 * 2 + 2  # dense, 3 methods x 2 sparsities heads-only, 2 heads+neurons
    assert out["records"] == 3 * n_points
    assert "## heads, global" in md and "## heads+neurons, global" in md
    # the method table's cells are the summary's: mean over tasks ± sqrt(sum se^2)/T, then the word perplexity
    row = next(
        r for r in out["summary"] if r["pools"] == "heads" and r["label"] == "static-fisher" and r["sparsity"] == 0.5
    )
    cell = f"{100 * row['mean_acc']:.1f} ± {100 * row['mean_acc_stderr']:.1f} / 33.00"
    assert any(line.startswith("| static-fisher |") and cell in line for line in md.splitlines())
    # the static criteria at 50 % heads-only, best perplexity first
    crit = md.split("## The static criteria at 50% heads-only (global)")[1].split("##")[0]
    assert crit.index("| fisher | 33.00") < crit.index("| plainact | 35.00")
    # predictors beside the train mean and ridge, size as a share of the model
    assert "| plainact | train mean (static) | 0.670 / 0.650 | 0.600 / 0.500 |" in md
    assert "| plainact | shadowllm | 0.720 / 0.680 | 0.660 / 0.520 | 3.0 MiB | 2.1 % |" in md
    assert "| plainact | shadowllm: ridge | 0.710 / 0.670 |" in md
    assert "| fisher | shadowllm | 0.720 / 0.680 |" in md  # merged from train_tables-fisher.json
    assert "### a contextual predictor beats the static ranking of its criterion" in md
    assert "| heads | global | 0.50 |" in md and "## Scope:" not in md  # one scope: no scope comparison
    assert "collect: wall 12.0 s" in md
    # evaluation 0-shot (from the records) and calibration 5-shot (the run's params.yaml) are told apart
    assert "evaluation: per-task limit 20, 0-shot" in md
    assert "up to 500 examples per task of 2, 5-shot, at most 1024 tokens, criteria plainact; weights bfloat16" in md
    for f in ("plots/accuracy-heads-global.png", "plots/perplexity-heads+neurons-global.png", "summary.csv"):
        assert (run_dir / f).stat().st_size > 0
    assert len((run_dir / "summary.csv").read_text().splitlines()) == 1 + len(out["summary"])
    metrics = research.headline_metrics(out["summary"])
    assert metrics["heads/global/static-fisher/s50/word_perplexity"] == 33.0


def test_the_command_writes_the_report_and_an_empty_run_is_one_line(run_dir, tmp_path_factory, monkeypatch):
    from stages.research_report import cli

    monkeypatch.setenv("SHADOWLLM_TRACKING", "0")
    res = CliRunner().invoke(cli, [str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "27 point records" in res.output and (run_dir / "report.md").is_file()
    empty = tmp_path_factory.mktemp("empty")
    res = CliRunner().invoke(cli, [str(empty)])
    assert res.exit_code != 0 and "no records.json.gz under" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_train_tables_of_one_criterion_split_over_calls_by_kind_are_merged(tmp_path):
    """`TARGETS="plainact:shadowllm plainact:dejavu"`: two files with the same criterion, other kinds."""

    def table(kind, j):
        return {
            "predictors": {"plainact": {kind: {"heads": {"spearman_joint": j}}}},
            "train_mean": {"plainact": {"heads": {"spearman_joint": 0.5}}},
            "ridge": {"plainact": {kind: {"heads": {"spearman_joint": j - 0.01}}}},
        }

    (tmp_path / "train_tables-plainact-shadowllm.json").write_text(json.dumps(table("shadowllm", 0.7)))
    (tmp_path / "train_tables-plainact-dejavu.json").write_text(json.dumps(table("dejavu", 0.6)))
    t = research.train_tables(tmp_path)
    assert set(t["predictors"]["plainact"]) == {"shadowllm", "dejavu"}
    assert set(t["ridge"]["plainact"]) == {"shadowllm", "dejavu"}
    assert t["predictors"]["plainact"]["dejavu"]["heads"]["spearman_joint"] == 0.6
    assert t["train_mean"]["plainact"]["heads"]["spearman_joint"] == 0.5


def test_runs_of_one_calibration_merge_into_one_report_and_others_are_refused(run_dir, tmp_path_factory):
    """`research-report OUT --run A --run B`: A's heads-only and B's heads+neurons records in one report (dense read
    once, A's train table winning where both have one kind), the stage figures of each run, the whole-test dense
    row; a run calibrated otherwise is one clear error and no report."""
    import shutil

    from pipeline.errors import UserError

    root = tmp_path_factory.mktemp("runs")
    a, b, out = root / "run-a", root / "run-b", root / "merged"
    for d, sub in ((a, "heads"), (b, "hn")):
        (d / sub).mkdir(parents=True)
        shutil.copy(run_dir / sub / "records.json.gz", d / sub / "records.json.gz")
        shutil.copy(run_dir / "params.yaml", d / "params.yaml")
    shutil.copy(run_dir / "train_tables.json", a / "train_tables.json")
    t = json.loads((run_dir / "train_tables.json").read_text())
    t["predictors"]["plainact"]["shadowllm"]["heads"]["spearman_joint"] = 0.11  # loses to a's
    t["predictors"]["plainact"]["dejavu"] = t["predictors"]["plainact"]["shadowllm"]
    (b / "train_tables-plainact-dejavu.json").write_text(json.dumps(t))
    (a / "peaks.log").write_text("collect: wall 1.0 s, peak RSS 1.00 GiB, peak GPU 1.00 GiB, exit 0\n")
    (b / "peaks.log").write_text("train: wall 2.0 s, peak RSS 2.00 GiB, peak GPU 2.00 GiB, exit 0\n")
    full = _rec("dense", "dense", "", 0.0, [], "none", "wikitext2", None, ppl=17.5)
    (b / "dense_full").mkdir()
    save_records(b / "dense_full" / "dense_full.json.gz", [full])
    res = research.build(out, "merged", [a, b])
    md = (out / "report.md").read_text()
    assert res["records"] == 27  # as the one run holding both settings: dense once
    assert "## heads, global" in md and "## heads+neurons, global" in md
    assert "Runs merged: `run-a`, `run-b` (one calibration)." in md
    assert "## Stages (run-a)" in md and "## Stages (run-b)" in md and "train: wall 2.0 s" in md
    assert "| plainact | shadowllm | 0.720 / 0.680 |" in md and "| plainact | dejavu | 0.110 / 0.680 |" in md
    assert "Dense on the whole WikiText-2 test (4 windows, `run-b/dense_full`): word perplexity 17.50" in md
    assert "| dense | " in md and (out / "summary.csv").is_file()
    assert not (a / "report.md").exists()  # written into OUT only
    p = json.loads((b / "params.yaml").read_text())
    p["collect"]["num_fewshot"] = 0
    (b / "params.yaml").write_text(json.dumps(p))
    (out / "report.md").unlink()
    with pytest.raises(UserError, match=r"calibrated differently .*num_fewshot"):
        research.build(out, "merged", [a, b])
    assert not (out / "report.md").exists()


def test_a_local_run_merged_with_a_global_one_gets_its_own_claims_and_the_scope_comparison(run_dir, tmp_path_factory):
    """Runs 3 + 4 (global) merged with run 5 (local): claims per (pools, scope), never paired across scopes,
    and each method local − global."""
    import shutil

    from pipeline.evaluate.claims import load_records

    root = tmp_path_factory.mktemp("scopes")
    g, loc, out = root / "global", root / "local", root / "merged"
    (g / "heads").mkdir(parents=True)
    (loc / "heads").mkdir(parents=True)
    for d in (g, loc):
        shutil.copy(run_dir / "params.yaml", d / "params.yaml")
    shutil.copy(run_dir / "heads" / "records.json.gz", g / "heads" / "records.json.gz")
    recs = load_records([run_dir / "heads" / "records.json.gz"])
    local = [
        dict(r, scope="local", key=r["key"].replace("-global-", "-local-")) for r in recs if r["method"] != "dense"
    ]
    for r in local:  # the local static ranking loses every example the global one got right at 50 %
        if r["label"] == "static-plainact" and r["sparsity"] == 0.5 and r["per_example"]:
            r["per_example"] = [dict(e, acc=0.0) for e in r["per_example"]]
    save_records(loc / "heads" / "records.json.gz", local)
    research.build(out, "merged", [g, loc])
    md = (out / "report.md").read_text()
    assert "## heads, global" in md and "## heads, local" in md
    claim = md.split("### fisher is a better static criterion than plainact")[1].split("###")[0]
    assert "| heads | global | 0.50 |" in claim and "| heads | local | 0.50 |" in claim
    scope = md.split("## Scope: local − global, paired")[1]
    row = next(line for line in scope.splitlines() if line.startswith("| heads | static-plainact | 0.50 |"))
    assert "local worse" in row
    assert "| heads | static-fisher | 0.50 | +0.0 ± 0.0 |" in scope  # the same outcomes under both scopes


def test_a_run_in_another_dtype_or_without_params_is_not_merged(tmp_path):
    from pipeline.errors import UserError

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, dtype in ((a, "bfloat16"), (b, "float32"), (c, None)):
        d.mkdir()
        if dtype:
            (d / "params.yaml").write_text(json.dumps({"model": {"dtype": dtype}, "collect": {"n_per_task": 500}}))
    with pytest.raises(UserError, match=r"calibrated differently .*\(model\.dtype\)"):
        research.check_same_calibration([a, b])
    with pytest.raises(UserError, match=r"\(params\.yaml missing\)"):
        research.check_same_calibration([a, c])
    research.check_same_calibration([a, a])
