"""The benchmark stage without a GPU (records a skip), and the report writers on synthetic rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.bench import report

REPO = Path(__file__).resolve().parents[1]


def _row(model, method, sp, ms, batch=1):
    return {
        "model": model,
        "method": method,
        "batch": batch,
        "head_sparsity": sp,
        "neuron_sparsity": sp,
        "ms_per_token": ms,
        "ms_p10": ms,
        "ms_p90": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "achieved_gbps": 4000.0,
        "bound_ms": ms * 0.85,
        "frac_of_bound": 0.85,
        "speedup_vs_dense": None,
        "speedup_bound": 1.0,
        "total_bytes": 1e9,
        "predictor_bytes": 1e8 if method in ("shadowllm", "dejavu") else 0.0,
        "predictor_params": 5e7,
        "predictor_share": 0.01,
        "kept_heads_mean": 16.0,
        "kept_neurons_mean": 7000.0,
        "status": "ok",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_stage_records_skip_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOWLLM_TRACKING", "0")
    from stages.benchmark import cli

    metrics = tmp_path / "m" / "benchmark.json"
    res = CliRunner().invoke(
        cli,
        [
            "--params",
            str(REPO / "params.yaml"),
            "--set",
            "benchmark.models=[opt-1.3b]",
            "--set",
            "benchmark.sparsities=[0.0, 0.5]",
            "--out-dir",
            str(tmp_path / "out"),
            "--metrics-file",
            str(metrics),
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) == 1 and "skipped" in res.output
    m = json.loads(metrics.read_text())
    assert m["skipped"] is True and "CUDA" in m["reason"]
    recorded = json.loads((tmp_path / "out" / "benchmark.json").read_text())["params"]
    assert recorded["sparsities"] == [0.0, 0.5] and recorded["models"] == ["opt-1.3b"]
    assert recorded["methods"] == ["dense", "static", "shadowllm", "dejavu"]  # the parsed section, not the raw one


def test_stage_rejects_misspelt_param_in_one_line(tmp_path):
    from stages.benchmark import cli

    res = CliRunner().invoke(cli, ["--params", str(REPO / "params.yaml"), "--set", "benchmark.modes=[dense]"])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: unknown parameter benchmark.modes "), res.output


def test_report_outputs(tmp_path):
    rows = [
        _row("llama-3-8b", "dense", 0.0, 4.0),
        _row("llama-3-8b", "static", 0.5, 2.4),
        _row("llama-3-8b", "shadowllm", 0.0, 4.1),
        _row("llama-3-8b", "static", 0.0, 4.0),
        _row("llama-3-8b", "shadowllm", 0.5, 2.5),
        _row("llama-3-8b", "dejavu", 0.5, 3.0),
        {"model": "opt-30b", "batch": 1, "status": "skipped: time budget"},
    ]
    micro = {
        "kernels": [
            {"kernel": "gateup", "sparsity": 0.5, "us": 30.0, "gbps": 4000.0, "frac_of_copy": 0.9},
            {"kernel": "attn", "sparsity": 0.5, "us": 9.0, "gbps": 90.0, "frac_of_copy": 0.02},
        ]
    }
    s = report.summarize(rows, micro)
    assert s["shadowllm50_speedup_vs_dense"]["value"] == pytest.approx(1.6) and s["shadowllm50_speedup_vs_dense"]["met"]
    assert s["shadowllm50_speedup_vs_dejavu"]["value"] == pytest.approx(1.2)
    assert (
        s["shadowllm0_predictor_share"]["value"] == pytest.approx(0.1 / 4.1) and s["shadowllm0_predictor_share"]["met"]
    )
    assert s["gather_kernels_min_frac_of_copy_at50"]["value"] == pytest.approx(0.9)  # attention is not a gather GEMV
    res = {
        "device": "test",
        "copy": {"copy_gbps": 4300.0},
        "params": {"prompt_len": 128, "gen_len": 128},
        "rows": rows,
        "summary": s,
        "micro": micro,
    }
    paths = report.write_all(res, tmp_path, "t")
    names = {p.name for p in paths}
    assert {"t.json", "t.md", "t.csv"} <= names
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,method,batch") and len(csv_lines) == len(rows) + 1
    assert "shadowllm50_speedup_vs_dense" in (tmp_path / "t.md").read_text()
    assert "llama-3-8b" in report.short_table(res)
