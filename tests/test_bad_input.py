"""Bad input gives one clear line naming the parameter, before any model is loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import pipeline.models.loading as loading
from stages.collect import cli as collect_cli

REPO = Path(__file__).resolve().parents[1]
# params.yaml's ../shared/data; a git worktree under /work/wt/<name> finds it one level further up
MIRROR = next(
    (d for d in (REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data") if d.is_dir()),
    REPO.parent / "shared" / "data",
)


@pytest.fixture
def params(tmp_path):
    """Valid params on a tiny local llama checkpoint (saved from config, no download)."""
    from tests.conftest import tiny_model

    ckpt = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(ckpt)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"]["id"] = str(ckpt)
    p["data"]["mirror_dir"] = str(MIRROR)
    return p


def _run(tmp_path, params, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(loading, "load_model", no_load)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(
        collect_cli, ["--params", str(path), "--out", str(tmp_path / "tr"), "--metrics", str(tmp_path / "m.json")]
    )
    assert res.exit_code != 0, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.output
    assert not (tmp_path / "tr").exists()
    return lines[0]


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no data mirror")
@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda p: p["collect"].__setitem__("criteria", ["plainact", "magic"]), "unknown criterion 'magic'"),
        (
            lambda p: p["collect"].__setitem__("tasks", ["piqa", "trivia"]),
            "unknown task 'trivia' (params: collect.tasks)",
        ),
        (lambda p: p["model"].__setitem__("id", "/nonexistent/model"), "model path not found"),
        (lambda p: p["data"].__setitem__("calib_fraction", 1.5), "data.calib_fraction must be < 1.0, got 1.5"),
        (lambda p: p["collect"].__setitem__("n_per_task", 0), "collect.n_per_task must be >= 1"),
        (
            lambda p: p["model"].__setitem__("dtype", "float8"),
            "model.dtype must be one of 'float32', 'float16', 'bfloat16'",
        ),
        (lambda p: p["collect"].__setitem__("storage", "int8"), "collect.storage must be one of 'float16', 'float32'"),
        (
            lambda p: p["collect"].__setitem__("n_per_tsk", 3),
            "unknown parameter collect.n_per_tsk (did you mean 'n_per_task'?)",
        ),
        (lambda p: p["collect"].pop("seed"), "missing parameter collect.seed"),
        (lambda p: p["model"].__setitem__("trust_remote_code", "yes"), "model.trust_remote_code must be true or false"),
        (lambda p: p["collect"].__setitem__("batch_size", 2.5), "collect.batch_size must be an integer, got 2.5"),
        # quoted booleans and non-integers are refused, not read as truthy strings or truncated (issue 13 item 5)
        (
            lambda p: p["model"].__setitem__("trust_remote_code", "false"),
            "parameter model.trust_remote_code must be true or false, got 'false'",
        ),
        (
            lambda p: p["collect"].__setitem__("layer_inputs", "no"),
            "parameter collect.layer_inputs must be true or false, got 'no'",
        ),
        (
            lambda p: p["collect"].__setitem__("shard_size", 4.7),
            "parameter collect.shard_size must be an integer, got 4.7",
        ),
        (lambda p: p["model"].__setitem__("id", "models/nope"), "model path not found: models/nope (params: model.id)"),
    ],
)
def test_bad_params(tmp_path, params, monkeypatch, edit, expected):
    edit(params)
    assert expected in _run(tmp_path, params, monkeypatch)


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no data mirror")
def test_unknown_architecture(tmp_path, params, monkeypatch):
    cfg = Path(params["model"]["id"]) / "config.json"
    cfg.write_text(cfg.read_text().replace('"model_type": "llama"', '"model_type": "gpt2"'))
    assert "unknown architecture 'gpt2' (params: model)" in _run(tmp_path, params, monkeypatch)


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no data mirror")
@pytest.mark.parametrize("content", [None, ""])
def test_missing_or_empty_mirror_file(tmp_path, params, monkeypatch, content):
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "copa", mirror / "copa")
    (mirror / "piqa").mkdir()
    if content is not None:
        (mirror / "piqa" / "piqa_validation.jsonl").write_text(content)
    params["data"]["mirror_dir"] = str(mirror)
    params["collect"]["tasks"] = ["copa", "piqa"]
    line = _run(tmp_path, params, monkeypatch)
    assert "piqa" in line and "data.mirror_dir" in line
