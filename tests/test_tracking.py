"""Tracking that tells the truth (issue 13 item 7): a stage's MLflow run spans its work and ends FAILED
when the stage fails; the parent run is one per pipeline variant; the experiment opens on the runs view."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from pipeline import tracking
from pipeline.errors import UserError
from tests.test_errors import collect_args  # noqa: F401  (fixture)


def test_pipeline_key_follows_params_and_dvc_yaml_and_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("SHADOWLLM_PIPELINE_RUN", raising=False)
    (tmp_path / "params.yaml").write_text("evaluate: {limit: 6}\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    base = tracking.pipeline_key(tmp_path)
    assert base.startswith(tracking._git_commit() + "-")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {collect: {}}\n")  # repro rewrites it per stage
    assert tracking.pipeline_key(tmp_path) == base
    (tmp_path / "params.yaml").write_text("evaluate: {limit: 300}\n")  # a `dvc exp run -S` variant
    variant = tracking.pipeline_key(tmp_path)
    assert variant != base and variant.split("-")[0] == base.split("-")[0]
    monkeypatch.setenv("SHADOWLLM_PIPELINE_RUN", "sweep-7")
    assert tracking.pipeline_key(tmp_path) == "sweep-7"


def test_stage_runs_span_the_work_and_a_failure_is_failed(tmp_path, monkeypatch, collect_args):
    mlflow = pytest.importorskip("mlflow")
    import pipeline.collect
    from stages.collect import cli

    args = collect_args[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHADOWLLM_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SHADOWLLM_PIPELINE_RUN", raising=False)
    failed_at = []
    real_collect = pipeline.collect.collect

    def dies(*a, **k):
        time.sleep(0.05)
        failed_at.append(int(time.time() * 1000))  # ms, as MLflow stores times
        raise UserError("collect.tasks: boom")

    monkeypatch.setattr(pipeline.collect, "collect", dies)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and res.output.strip().splitlines()[-1] == "Error: collect.tasks: boom"
    monkeypatch.setattr(pipeline.collect, "collect", real_collect)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name(tracking.EXPERIMENT)
    assert exp.tags[tracking.KIND_TAG] == tracking.KIND == "custom_model_development"
    runs = mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])
    stages = [r for r in runs if r.data.tags.get("shadowllm_role") == "stage"]
    parents = [r for r in runs if r.data.tags.get("shadowllm_role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the last stage succeeded
    assert [r.info.status for r in stages] == ["FAILED", "FINISHED"]
    failed, ok = stages
    assert failed.info.start_time < failed_at[0] <= failed.info.end_time  # opened before the work
    assert failed.data.params["collect.n_per_task"] == "2"  # params logged at the start, before the failure
    assert ok.info.end_time - ok.info.start_time > 0 and ok.data.metrics["examples"] == 2
    assert ok.data.tags["model_fingerprint"] == "fp0"
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
