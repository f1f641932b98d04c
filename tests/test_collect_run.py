"""The `collect` stage's records (pipeline/collect_run.py): what it checks before any weights are read, the
trace metadata handed to `collect` (hashed into every shard), split.json, the metrics JSON and its last line."""

from __future__ import annotations

import pytest

from pipeline import collect_run
from pipeline.calibration import CalibrationPlan
from pipeline.collect import CollectParams, CollectStats
from pipeline.errors import UserError
from pipeline.models.adapters import resolve
from pipeline.models.loading import Loaded
from pipeline.params import DataParams, ModelParams, load
from pipeline.scoring import Sequence
from tests.conftest import tiny_model
from tests.test_bad_input import MIRROR, REPO

PLAN = CalibrationPlan(
    tasks=("copa",),
    mirror_dir="/mirror",
    n_per_task=2,
    calib_fraction=0.5,
    seed=3,
    num_fewshot=1,
    max_tokens=32,
    add_bos=True,
)
SPLITS = [{"task": "copa", "pool": 50, "calibration": 2}]


def _loaded() -> Loaded:
    model = tiny_model("llama")
    return Loaded(model, None, resolve(model), "fp0", 1.23456)


def test_checked_params_refuses_an_unknown_task_naming_collect_tasks():
    params = load(REPO / "params.yaml")
    params["collect"]["tasks"] = ["copa", "nope"]
    with pytest.raises(UserError, match=r"unknown task 'nope' \(params: collect\.tasks\)"):
        collect_run.checked_params(params)


def test_checked_params_are_the_model_data_and_collect_sections():
    if not MIRROR.is_dir():
        pytest.skip("no data mirror")
    params = load(REPO / "params.yaml")
    params["data"]["mirror_dir"] = str(MIRROR)
    params["collect"]["tasks"] = ["copa"]
    mp, dp, cp = collect_run.checked_params(params)
    assert mp == ModelParams.from_params(params) and dp == DataParams.from_params(params)
    assert cp == CollectParams.from_params(params) and list(cp.tasks) == ["copa"]


def test_the_plan_resolves_add_bos_against_the_tokenizer():
    params = load(REPO / "params.yaml")
    params["model"]["add_bos"] = False
    mp, dp, cp = ModelParams.from_params(params), DataParams.from_params(params), CollectParams.from_params(params)
    assert collect_run.calibration_plan(mp, dp, cp, tokenizer=None) == CalibrationPlan.of(dp, cp, add_bos=False)


def test_trace_meta_is_the_model_record_the_plan_less_its_mirror_and_the_splits():
    m, mp = _loaded(), ModelParams.from_params(load(REPO / "params.yaml"))
    meta = collect_run.trace_meta(m, mp, PLAN, SPLITS)
    assert meta == {
        "model": m.meta(mp),
        "calibration": {
            "tasks": ("copa",),
            "n_per_task": 2,
            "calib_fraction": 0.5,
            "seed": 3,
            "num_fewshot": 1,
            "max_tokens": 32,
            "add_bos": True,
        },
        "splits": SPLITS,
    }
    assert list(meta["calibration"]) == [k for k in PLAN.__dataclass_fields__ if k != "mirror_dir"]


def test_split_record_and_metrics_and_summary():
    assert collect_run.split_record(PLAN, SPLITS) == {"seed": 3, "calib_fraction": 0.5, "tasks": SPLITS}
    stats = CollectStats(examples=2, tokens=10, seconds=2.0, bytes_written=3_000_000, shards_written=1, shards_reused=1)
    seqs = [Sequence("a", "copa", (1, 2, 3), 1), Sequence("b", "copa", (1, 2, 3, 4, 5), 1)]
    metrics = collect_run.run_metrics(stats, _loaded(), seqs)
    extra = {"load_seconds": 1.235, "model_fingerprint": "fp0", "examples_total": 2, "tokens_total": 8}
    assert metrics == {**stats.metrics(), **extra} and list(metrics) == [*stats.metrics(), *extra]
    assert collect_run.numeric(metrics) == {k: v for k, v in metrics.items() if k != "model_fingerprint"}
    assert collect_run.summary(stats, metrics, "data/traces") == (
        "collect: 2 examples (1 shards reused), 1.00 ex/s, 5 tok/s, 3.0 MB -> data/traces"
    )
