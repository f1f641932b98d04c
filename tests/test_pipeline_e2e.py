"""End to end: `dvc repro` of the default pipeline on a reduced config, with the real default model.

Runs in a copy of the working tree (tracked and untracked-not-ignored files) inside a fresh git
repository, so the developer's own DVC cache, outputs and MLflow store are untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data"

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def reduce_params(p: dict, mirror: Path) -> dict:
    """The default params, shrunk to minutes on 2 CPU cores."""
    p["data"]["mirror_dir"] = str(mirror)
    p["collect"].update(
        tasks=["copa", "piqa"],
        n_per_task=12,
        max_tokens=96,
        shard_size=8,
        criteria=["plainact", "fisher", "l2_norm", "snip", "nwot", "jacov"],
    )
    p["aggregate"].update(targets=["plainact", "l2_norm"], heatmap="plainact")
    p["train"].update(kinds=["shadowllm", "dejavu"], epochs=3, sparsities=[0.5])
    for w in p["train"]["widths"].values():
        w.update(hidden_heads=64, hidden_neurons=64, rank_neurons=0)
    ev = p["evaluate"]
    ev.update(
        tasks=["copa"],
        limit=8,
        sparsities=[0.5],
        methods=["dense", "static:fisher", "oracle:plainact", "shadowllm:plainact", "dejavu:l2_norm"],
    )
    ev["perplexity"].update(max_windows=2, seq_len=128)
    return p


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no data mirror beside the repository")
def test_dvc_repro_default_pipeline_reduced(tmp_path):
    work = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("results/evaluate/", "results/benchmark/")):
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    params = reduce_params(yaml.safe_load((work / "params.yaml").read_text()), MIRROR)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        SHADOWLLM_PIPELINE_RUN="e2e-test",
        SHADOWLLM_TRACKING="1",  # conftest turns tracking off for the unit tests; this test checks the runs
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    env.pop("OMP_NUM_THREADS", None)  # the test runner pins 1 thread for the tiny models; the pipeline gets all
    _sh(["git", "init", "-q"], work, env)
    _sh(["git", "add", "-A"], work, env)
    _sh(["git", "commit", "-qm", "e2e"], work, env)

    out = _sh(["dvc", "repro"], work, env)
    for stage in ("prepare_model", "collect", "aggregate", "train", "evaluate", "benchmark"):
        assert f"'{stage}'" in out, f"stage {stage} did not run:\n{out[-3000:]}"

    collect = json.loads((work / "results/collect.json").read_text())
    assert collect["examples"] == 24
    train = json.loads((work / "results/train.json").read_text())
    assert train, "train wrote no metrics"
    metrics = json.loads((work / "results/evaluate/default/metrics.json").read_text())
    assert metrics, "evaluate wrote no metrics"
    bench = json.loads((work / "results/benchmark/metrics.json").read_text())
    assert bench.get("skipped") is True or "targets" in bench

    # A second repro is a no-op; changing a later stage's params does not rerun collect.
    again = _sh(["dvc", "repro"], work, env)
    assert "didn't change, skipping" in again and "Running stage" not in again
    params["aggregate"]["targets"] = ["plainact"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _sh(["dvc", "status"], work, env)
    assert "collect:" not in status and "aggregate:" in status

    # MLflow: one parent run with a nested run per stage.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["shadowllm"], output_format="list")
    stages = {r.data.tags.get("dvc_stage") for r in runs if r.data.tags.get("shadowllm_role") == "stage"}
    assert {"collect", "aggregate", "train", "evaluate"} <= stages
