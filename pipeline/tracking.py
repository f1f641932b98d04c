"""MLflow tracking, imported lazily so that the library and the GPU path never need mlflow.

One run per stage, nested under a parent run per pipeline execution. The parent is found or
created by its `shadowllm_pipeline` tag: `SHADOWLLM_PIPELINE_RUN` when set, else the git commit plus a
hash of params.yaml and dvc.yaml (`pipeline_key`), so all stages of one `dvc repro` share a parent and a
`dvc exp run -S ...` variant of the same commit gets its own. (Not dvc.lock: `dvc repro` rewrites it after
every stage, which would give each stage its own parent.)

A stage opens its run before its work (`with stage_run(...)` around the body): the run's duration is
the stage's, and an exception inside marks the stage run (and the parent) FAILED. The experiment is
tagged as model development (`mlflow.experimentKind`), so MLflow 3's UI opens on the runs table.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "shadowllm"
PIPELINE_FILES = ("params.yaml", "dvc.yaml")  # with the commit: which pipeline variant a run belongs to
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow 3: runs view, not GenAI


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def pipeline_key(root: str | Path = ".") -> str:
    """The parent run's key: `SHADOWLLM_PIPELINE_RUN`, else '<commit>-<hash of params.yaml, dvc.yaml>'."""
    if os.environ.get("SHADOWLLM_PIPELINE_RUN"):
        return os.environ["SHADOWLLM_PIPELINE_RUN"]
    h = hashlib.sha256()
    for name in PIPELINE_FILES:
        f = Path(root) / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"") + b"\0")
    return f"{_git_commit()}-{h.hexdigest()[:12]}"


def _experiment(mlflow) -> None:
    """Select the experiment, creating it tagged as model development (tagging an existing one lacking it)."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        mlflow.create_experiment(EXPERIMENT, tags={KIND_TAG: KIND})
    elif KIND_TAG not in (exp.tags or {}):
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    mlflow.set_experiment(EXPERIMENT)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def metric_name(key: str) -> str:
    """`key` as MLflow accepts it (alphanumerics, _ - . space : /): a method title such as
    'dejavu-l2_norm (dense inputs)' has parentheses, which MLflow rejects, failing the whole stage."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)


class _NullRun:
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class _Run(_NullRun):
    def __init__(self, mlflow):
        self.mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:6000] for k, v in _flatten(params).items()}
        self.mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {
            metric_name(k): float(v)
            for k, v in _flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            self.mlflow.log_artifacts(str(p), artifact_path=p.name)
        elif p.is_file():
            self.mlflow.log_artifact(str(p))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)


@contextmanager
def stage_run(stage: str, *, tags: dict[str, str] | None = None) -> Iterator[_NullRun]:
    """An MLflow run for one DVC stage, nested under the pipeline run.

    Disabled (a no-op object) when SHADOWLLM_TRACKING=0 or mlflow is not installed."""
    if os.environ.get("SHADOWLLM_TRACKING", "1") == "0":
        yield _NullRun()
        return
    try:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
    except ImportError:
        yield _NullRun()
        return
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    _experiment(mlflow)
    commit = _git_commit()
    pipeline_id = pipeline_key()
    found = mlflow.search_runs(
        filter_string=f"tags.shadowllm_pipeline = '{pipeline_id}' and tags.shadowllm_role = 'pipeline'",
        max_results=1,
        output_format="list",
    )
    short = pipeline_id if len(pipeline_id) <= 24 else f"{pipeline_id[:10]}-{pipeline_id[-12:]}"
    if found:
        parent = mlflow.start_run(run_id=found[0].info.run_id)
    else:
        parent = mlflow.start_run(
            run_name=f"pipeline {short}",
            tags={"shadowllm_pipeline": pipeline_id, "shadowllm_role": "pipeline", "git_commit": commit},
        )
    stage_tags = {"dvc_stage": stage, "git_commit": commit, "shadowllm_role": "stage", **(tags or {})}
    # each run ends FAILED when the stage raised, FINISHED otherwise (mlflow's ActiveRun.__exit__)
    with parent, mlflow.start_run(run_name=stage, nested=True, tags=stage_tags):
        yield _Run(mlflow)
