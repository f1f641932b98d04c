"""Clear errors everywhere (issue 13 item 6): invalid YAML, unknown `--set` keys, `--set` on every stage,
a user error after the model loads is one line (a traceback with SHADOWLLM_DEBUG=1), a capped
`collect.n_per_task` is said."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.params import ParamError, load, set_override
from tests.test_bad_input import MIRROR, REPO


def _one_line(res) -> str:
    assert res.exit_code != 0, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return lines[0]


# ---- params.yaml and --set ----------------------------------------------------------------------------


def test_invalid_yaml_in_the_params_file_names_the_file_line_and_column(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  id: x\n   dtype: float32\n")
    with pytest.raises(ParamError) as e:
        load(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: invalid YAML at line 3, column 9: ") and "mapping" in msg


def test_invalid_yaml_in_a_set_value_names_the_assignment():
    params = load(REPO / "params.yaml")
    with pytest.raises(ParamError) as e:
        set_override(params, "evaluate.sparsities=[0.3, 0.5")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--set 'evaluate.sparsities=[0.3, 0.5': invalid YAML value at line 1")


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("evalute.sparsities=[0.3]", "unknown parameter evalute (did you mean 'evaluate'?)"),
        ("evaluate.sparsitys=[0.3]", "unknown parameter evaluate.sparsitys (did you mean 'sparsities'?)"),
        ("evaluate.perplexity.seq=8", "unknown parameter evaluate.perplexity.seq (did you mean 'seq_len'?)"),
        ("evaluate.limit.piqa=3", "parameter evaluate.limit is not a mapping"),
    ],
)
def test_set_refuses_a_key_path_that_is_not_in_the_params(assignment, expected):
    params = load(REPO / "params.yaml")
    before = yaml.safe_dump(params)
    with pytest.raises(ParamError, match=re.escape(expected)):
        set_override(params, assignment)
    assert yaml.safe_dump(params) == before  # nothing created


def test_set_replaces_existing_values_mappings_included():
    params = load(REPO / "params.yaml")
    set_override(params, "evaluate.limit={piqa: 3, copa: 2}")
    set_override(params, "evaluate.limit.piqa=5")
    set_override(params, "evaluate.perplexity.seq_len=64")
    assert params["evaluate"]["limit"] == {"piqa": 5, "copa": 2} and params["evaluate"]["perplexity"]["seq_len"] == 64


STAGES = {  # command -> the arguments it needs besides --set
    "collect": ["--out", "{tmp}/tr", "--metrics", "{tmp}/m.json"],
    "aggregate": ["--traces", "{tmp}/tr", "--out", "{tmp}/sc"],
    "train": ["--traces", "{tmp}/tr", "--scores", "{tmp}/sc", "--out", "{tmp}/p", "--metrics", "{tmp}/m.json",
              "--plots", "{tmp}/pl"],
    "evaluate": ["--out", "{tmp}/ev"],
    "benchmark": ["--out-dir", "{tmp}/b", "--metrics-file", "{tmp}/b.json"],
    "prepare-model": [],  # no --name / --out: the model comes from params.yaml's model.id
    "bench-collect": [],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_stage_reading_params_takes_set_and_refuses_a_misspelt_key(tmp_path, command):
    from stages.cli import STAGES as MODULES

    cli = importlib.import_module(MODULES[command]).cli
    args = [a.format(tmp=tmp_path) for a in STAGES[command]]
    res = CliRunner().invoke(cli, ["--params", str(REPO / "params.yaml"), *args, "--set", "evalute.limit=3"])
    assert _one_line(res).startswith("Error: unknown parameter evalute (did you mean 'evaluate'?)")
    assert not any(tmp_path.iterdir())


# ---- errors after the model has loaded -----------------------------------------------------------------


@pytest.fixture
def collect_args(tmp_path, monkeypatch):
    """`shadowllm collect` on COPA with the tiny llama and a character tokenizer (no weights read from disk);
    `loaded` records that the model was opened."""
    import pipeline.models.loading as loading
    from pipeline.models.adapters import resolve
    from tests.conftest import tiny_model
    from tests.test_evaluate import CharTokenizer

    if not MIRROR.is_dir():
        pytest.skip("no data mirror")
    model, loaded = tiny_model("llama"), []

    def open_model(mp):
        loaded.append(mp.id)
        return loading.Loaded(model, CharTokenizer(), resolve(model), "fp0", 0.0)

    monkeypatch.setattr(loading, "open_model", open_model)
    monkeypatch.setattr(loading, "check_model", lambda mp: None)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"].update(id="tiny", add_bos=False)
    p["data"]["mirror_dir"] = str(MIRROR)
    p["collect"].update(tasks=["copa"], n_per_task=2, criteria=["plainact"], max_tokens=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    args = ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "tr"), "--metrics", str(tmp_path / "m")]
    return args + ["--no-progress"], loaded


def _fail_after_load(monkeypatch, loaded):
    import pipeline.collect

    def refuse(*a, **k):
        assert loaded, "the failure must come after the model loaded"
        raise UserError("template of task 'copa' names a missing field 'premise2' (params: collect.tasks)")

    monkeypatch.setattr(pipeline.collect, "collect", refuse)


def test_a_user_error_after_the_model_loads_is_one_line(collect_args, monkeypatch):
    from stages.collect import cli

    args, loaded = collect_args
    _fail_after_load(monkeypatch, loaded)
    monkeypatch.delenv("SHADOWLLM_DEBUG", raising=False)
    res = CliRunner().invoke(cli, args)
    assert _one_line(res) == "Error: template of task 'copa' names a missing field 'premise2' (params: collect.tasks)"


def test_shadowllm_debug_keeps_the_traceback(collect_args, monkeypatch):
    from stages.collect import cli

    args, loaded = collect_args
    _fail_after_load(monkeypatch, loaded)
    monkeypatch.setenv("SHADOWLLM_DEBUG", "1")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and isinstance(res.exception, UserError)


def test_collect_says_which_tasks_have_fewer_calibration_examples_than_n_per_task(collect_args, tmp_path):
    from stages.collect import cli

    # COPA: 100 examples, calib_fraction 0.5 -> a pool of 50: 80 (the default) cannot be met, 2 can
    res = CliRunner().invoke(cli, [*collect_args[0], "--set", "collect.n_per_task=60"])
    assert res.exit_code == 0, res.output
    capped = [line for line in res.output.splitlines() if "fewer than collect.n_per_task" in line]
    assert capped == [
        "collect: copa has 50 calibration examples (data.calib_fraction 0.5 of 100), "
        "fewer than collect.n_per_task 60: using 50"
    ]
