"""Task registry, mirror loading, prompts (hand-checked against lm-eval 0.4 conventions), split, few-shot."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.data.split import Split, fewshot_prefix, split_examples, with_fewshot
from pipeline.data.tasks import (
    DataError,
    Example,
    check_tasks,
    get_task,
    list_tasks,
    load_examples,
    load_text,
)

MIRROR = Path(os.environ.get("SHADOWLLM_DATA_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"data mirror {MIRROR} absent")

COUNTS = {
    "piqa": 1838,
    "copa": 100,
    "winogrande": 1267,
    "rte": 277,
    "hellaswag": 10042,
    "arc_easy": 570,
    "openbookqa": 500,
    "lambada": 5153,
}
N_CHOICES = {"piqa": 2, "copa": 2, "winogrande": 2, "rte": 2, "hellaswag": 4, "openbookqa": 4, "lambada": 1}


# Mirror-driven tests run on the registered tasks the mirror has data for; any other task (one just added,
# say) is skipped with a reason, so adding a task YAML never turns this module red (issue 9).


def no_data_reason(task: str, split: str | None = None) -> str | None:
    """Why `task` (its `split`, default the mirror's) cannot be read from the mirror, or None when it can."""
    if not MIRROR.is_dir():
        return f"data mirror {MIRROR} absent"
    path = MIRROR / get_task(task).mirror_file(split)
    return None if path.is_file() else f"task '{task}' has no data in the mirror ({path} absent)"


def require_data(task: str, split: str | None = None) -> None:
    reason = no_data_reason(task, split)
    if reason:
        pytest.skip(reason)


def mirrored_tasks() -> list[str]:
    """Registered tasks whose default split is in the mirror."""
    return [t for t in list_tasks() if no_data_reason(t) is None]


class Loaded(dict):
    """Examples by task for every mirrored non-perplexity task; asking for any other task skips the test."""

    def __missing__(self, task: str) -> list[Example]:
        pytest.skip(no_data_reason(task) or f"task '{task}' is not a mirrored multiple-choice task")


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    if not MIRROR.is_dir():
        pytest.skip(f"data mirror {MIRROR} absent")
    return Loaded({t: load_examples(t, MIRROR) for t in mirrored_tasks() if get_task(t).kind != "perplexity"})


def test_registry_lists_every_task():
    assert set(list_tasks()) >= {
        "wikitext2",
        "piqa",
        "copa",
        "openbookqa",
        "winogrande",
        "rte",
        "hellaswag",
        "arc_easy",
        "lambada",
    }
    assert get_task("wikitext2").kind == "perplexity"
    assert get_task("lambada").kind == "loglikelihood"
    for t in COUNTS:
        if t != "lambada":
            assert get_task(t).kind == "multiple_choice"
    assert get_task("arc_easy").split == "validation" and get_task("openbookqa").split == "validation"
    assert get_task("arc_easy").hub_name == "ARC-Easy"


@pytest.mark.parametrize("task", list_tasks())
def test_mirror_data_well_formed(task, loaded):
    """Every registered task with mirror data: ids in order, golds in range, known counts and choice numbers."""
    if get_task(task).kind == "perplexity":
        require_data(task)
        assert load_text(task, MIRROR).strip()
        return
    exs = loaded[task]
    assert exs, task
    if task in COUNTS:
        assert len(exs) == COUNTS[task], task
    assert [e.id for e in exs] == [f"{task}/{i}" for i in range(len(exs))]
    for e in exs:
        assert e.task == task
        assert len(e.contexts) == len(e.continuations) >= 1
        assert 0 <= e.gold < len(e.contexts)
        if task in N_CHOICES:
            assert len(e.contexts) == N_CHOICES[task], e.id
        if task in COUNTS:
            assert e.shared_context == (task != "winogrande"), e.id
    if task == "arc_easy":
        assert {len(e.contexts) for e in exs} <= {3, 4, 5}


def test_other_splits_load():
    for task, split, n in (("arc_easy", "test", 2376), ("openbookqa", "test", 500)):
        require_data(task, split)
        assert len(load_examples(task, MIRROR, split=split)) == n


# ----------------------------------------------------------- prompts, written by hand from the raw JSON


@needs_mirror
def test_piqa_prompt(loaded):
    e = loaded["piqa"][0]
    assert e.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",) * 2
    assert e.continuations == (
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
        "you will also need to supply it with a water bottle and a food dish.",
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
        "you will also need to supply it with a water bottle and a food dish.",
    )
    assert e.gold == 0
    assert loaded["piqa"][1].continuations == (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin ")
    assert loaded["piqa"][1].gold == 1


@needs_mirror
def test_copa_prompt(loaded):
    e = loaded["copa"][0]  # effect
    assert e.contexts == ("The man turned on the faucet therefore",) * 2
    # lm-eval 0.4: choice = " " + lower-first(choice), then target_delimiter " " -> two spaces.
    assert e.continuations == ("  the toilet filled with water.", "  water flowed from the spout.")
    assert e.gold == 1
    e = loaded["copa"][4]  # cause
    assert e.contexts[0] == "The hamburger meat browned because"
    assert e.continuations == ("  the cook froze it.", "  the cook grilled it.") and e.gold == 1


@needs_mirror
def test_winogrande_partial_scoring(loaded):
    e = loaded["winogrande"][0]
    assert e.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert e.continuations == (" always got the easier cases.",) * 2
    assert e.gold == 1 and not e.shared_context
    assert loaded["winogrande"][1].gold == 0


@needs_mirror
def test_rte_prompt(loaded):
    e = loaded["rte"][0]
    assert e.contexts[0] == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at "
        "age 44, according to the Christopher Reeve Foundation.\nQuestion: Christopher "
        "Reeve had an accident. True or False?\nAnswer:"
    )
    assert e.continuations == (" True", " False")
    assert e.gold == 1  # label 1 = not entailment = False
    assert loaded["rte"][1].gold == 0  # label 0 = entailment = True


@needs_mirror
def test_hellaswag_prompt_and_preprocess(loaded):
    e = loaded["hellaswag"][0]
    assert e.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert e.continuations == (
        " is using wrap to wrap a pair of skis.",
        " is ripping level tiles off.",
        " is holding a rubik's cube.",
        " starts pulling up roofing on a roof.",
    )
    assert e.gold == 3
    e = loaded["hellaswag"][3243]  # WikiHow: [header]/[step] dropped, " [title]" -> ". ", double spaces squashed
    assert e.contexts[0] == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. "
        "This job requires a high school diploma or equivalent, so make sure to apply yourself and finish "
        "school. If your high school offers these classes, take art, design, and sewing to familiarize "
        "yourself with foundational concepts in fashion."
    )
    # "[substeps] Many ..." -> " Many ..." after removal (strip came first); plus the target delimiter.
    assert e.continuations[0] == (
        "  Many high schools have classes offered for their students who do not have a high school diploma, "
        "so be sure to register to take these classes and find a job in your field.. Search for entry-level "
        "positions in fashion industries."
    )


@needs_mirror
def test_arc_and_openbookqa_prompts(loaded):
    e = loaded["arc_easy"][0]
    assert e.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert e.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert e.gold == 0
    e = loaded["arc_easy"][8]  # numeric labels "1".."4", answerKey "1"
    assert e.contexts[0].startswith("Question: A green plant absorbs light.") and e.gold == 0
    e = loaded["openbookqa"][0]
    assert e.contexts[0] == (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as"
    )
    assert e.continuations == (" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals")
    assert e.gold == 0
    assert loaded["openbookqa"][1].gold == 3


@needs_mirror
def test_lambada_last_word(loaded):
    e = loaded["lambada"][0]
    assert e.continuations == (" signs",) and e.gold == 0
    assert e.contexts[0].endswith("his mouth curved in a confident grin, I don't care about")


def test_wikitext_text():
    require_data("wikitext2")
    text = load_text("wikitext2", MIRROR)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    raw = (MIRROR / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:-1]
    assert text.count("\n\n") >= len(raw) - 1
    assert len(raw) == 4358
    with pytest.raises(DataError, match="load_text"):
        load_examples("wikitext2", MIRROR)
    with pytest.raises(DataError, match="load_examples"):
        load_text("piqa", MIRROR)


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_task_names_param_and_known():
    with pytest.raises(DataError, match=r"unknown task 'nope' \(params: tasks\); known: .*piqa"):
        get_task("nope")
    with pytest.raises(DataError, match=r"params: collect\.tasks"):
        check_tasks(["piqa", "nope"], MIRROR, param="collect.tasks")
    with pytest.raises(DataError, match="unknown task"):
        load_examples("nope", MIRROR)


def _fake_mirror(tmp_path: Path, task: str, content: bytes | None) -> Path:
    rel = get_task(task).mirror_file()
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        (tmp_path / rel).write_bytes(content)
    return tmp_path


def test_missing_mirror_file(tmp_path):
    mirror = _fake_mirror(tmp_path, "piqa", None)
    with pytest.raises(DataError, match=r"piqa_validation\.jsonl.*data\.mirror_dir"):
        load_examples("piqa", mirror)
    with pytest.raises(DataError, match=r"piqa_validation\.jsonl.*data\.mirror_dir"):
        check_tasks(["piqa"], mirror)
    with pytest.raises(DataError, match=r"data\.mirror_dir"):
        load_examples("piqa", tmp_path / "does-not-exist")
    with pytest.raises(DataError, match=r"split 'train'.*param split"):
        load_examples("piqa", mirror, split="train")


def test_empty_dataset(tmp_path):
    mirror = _fake_mirror(tmp_path, "copa", b"")
    with pytest.raises(DataError, match=r"empty dataset for task 'copa'.*copa_validation\.jsonl"):
        load_examples("copa", mirror)
    with pytest.raises(DataError, match="empty"):
        check_tasks(["copa"], mirror)
    mirror = _fake_mirror(tmp_path, "hellaswag", gzip.compress(b"\n"))
    with pytest.raises(DataError, match="empty dataset for task 'hellaswag'"):
        load_examples("hellaswag", mirror)
    mirror = _fake_mirror(tmp_path, "wikitext2", b"\n \n")
    with pytest.raises(DataError, match="empty dataset for task 'wikitext2'"):
        load_text("wikitext2", mirror)


def test_bad_rows(tmp_path):
    mirror = _fake_mirror(tmp_path, "piqa", b'{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}\n')
    with pytest.raises(DataError, match=r"piqa' example 0.*out of range"):
        load_examples("piqa", mirror)
    mirror = _fake_mirror(tmp_path, "piqa", b'{"goal": "g", "sol1": "a"}\n')
    with pytest.raises(DataError, match=r"piqa' example 0.*cannot render"):
        load_examples("piqa", mirror)
    mirror = _fake_mirror(tmp_path, "piqa", b'{"goal": \n')
    with pytest.raises(DataError, match=r"piqa_validation\.jsonl:1: bad JSON"):
        load_examples("piqa", mirror)


def test_small_mirror_roundtrip(tmp_path):
    rows = [
        {
            "premise": "It rained.",
            "choice1": "The grass got wet.",
            "choice2": "X.",
            "question": "effect",
            "idx": 0,
            "label": 0,
        }
    ]
    mirror = _fake_mirror(tmp_path, "copa", "".join(json.dumps(r) + "\n" for r in rows).encode())
    check_tasks(["copa"], mirror)
    (e,) = load_examples("copa", mirror)
    assert e == Example("copa/0", "copa", ("It rained therefore",) * 2, ("  the grass got wet.", "  x."), 0)


@needs_mirror
def test_check_tasks_on_mirror():
    check_tasks(mirrored_tasks(), MIRROR)
    for task in set(list_tasks()) - set(mirrored_tasks()):  # a task without data is a clear error, not a crash
        with pytest.raises(DataError, match=rf"missing mirror file .*'{task}'"):
            check_tasks([task], MIRROR)
    with pytest.raises(DataError, match="list"):
        check_tasks("piqa", MIRROR)


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(DataError, match=r"datasets.*data\.mirror_dir"):
        load_examples("piqa", None)
    with pytest.raises(DataError, match=r"data\.mirror_dir"):
        check_tasks(["piqa"], None)


def test_new_task_is_one_yaml_file(tmp_path, monkeypatch):
    import pipeline.data.tasks as tasks_mod

    task_dir = tmp_path / "tasks"
    shutil.copytree(tasks_mod.TASK_DIR, task_dir)
    (task_dir / "boolq_like.yaml").write_text(
        "name: boolq_like\nkind: multiple_choice\nmetrics: [acc]\n"
        "mirror: {split: validation, files: {validation: bq/v.jsonl}}\n"
        "hub: {path: super_glue, name: boolq}\n"
        'prompt:\n  context: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\n'
        "  choices: \"['no', 'yes']\"\n  gold: label\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(tasks_mod, "TASK_DIR", task_dir)
    tasks_mod._registry.cache_clear()
    try:
        assert "boolq_like" in list_tasks()
        (tmp_path / "m" / "bq").mkdir(parents=True)
        (tmp_path / "m" / "bq" / "v.jsonl").write_text(
            json.dumps({"passage": "P", "question": "q", "label": 1}) + "\n", encoding="utf-8"
        )
        (e,) = load_examples("boolq_like", tmp_path / "m")
        assert e.contexts[0] == "P\nQuestion: q?\nAnswer:" and e.continuations == (" no", " yes") and e.gold == 1
    finally:
        tasks_mod._registry.cache_clear()


# ------------------------------------------------------------------------------------- split, few-shot


def _toy(task: str = "piqa", n: int = 50) -> list[Example]:
    return [Example(f"{task}/{i}", task, (f"Q{i}:",) * 2, (f" a{i}", f" b{i}"), i % 2) for i in range(n)]


def test_split_disjoint_deterministic_seeded():
    exs = _toy()
    calib, evals, rec = split_examples(exs, calib_fraction=0.3, seed=0)
    assert len(calib) == 15 and len(evals) == 35
    assert not set(rec.calib_ids) & set(rec.eval_ids)
    assert set(rec.calib_ids) | set(rec.eval_ids) == {e.id for e in exs}
    assert [e.id for e in calib] == list(rec.calib_ids) and [e.id for e in evals] == list(rec.eval_ids)
    assert split_examples(exs, calib_fraction=0.3, seed=0)[2] == rec
    assert split_examples(exs, calib_fraction=0.3, seed=1)[2].calib_ids != rec.calib_ids
    # tasks are independent: same seed, other task name -> other permutation
    other = split_examples(_toy("copa"), calib_fraction=0.3, seed=0)[2]
    assert [i.split("/")[1] for i in other.calib_ids] != [i.split("/")[1] for i in rec.calib_ids]
    assert Split.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_split_max_calib_keeps_eval_fixed():
    exs = _toy()
    _, _evals, rec = split_examples(exs, calib_fraction=0.5, seed=3)
    calib_c, _evals_c, rec_c = split_examples(exs, calib_fraction=0.5, seed=3, max_calib=4)
    assert len(calib_c) == 4 and rec_c.calib_ids == rec.calib_ids[:4] and rec_c.eval_ids == rec.eval_ids


def test_split_bad_input():
    with pytest.raises(DataError, match="calib_fraction"):
        split_examples(_toy(), calib_fraction=1.0, seed=0)
    with pytest.raises(DataError, match="empty"):
        split_examples([], calib_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="one task"):
        split_examples(_toy("piqa", 3) + _toy("copa", 3), calib_fraction=0.5, seed=0)


def test_fewshot_never_includes_the_example_itself():
    pool = _toy(n=6)
    for ex in pool:
        for seed in range(20):
            prefix = fewshot_prefix(ex, pool, 5, seed)  # 5 of the 5 others: must be exactly those
            shots = prefix.split("\n\n")[:-1]
            assert len(shots) == 5 and prefix.endswith("\n\n")
            assert f"Q{ex.id.split('/')[1]}:" not in {s.split(" ")[0] for s in shots}
    ex = pool[0]
    prefix = fewshot_prefix(ex, pool, 2, seed=7)
    assert prefix == fewshot_prefix(ex, pool, 2, seed=7)
    for shot in prefix.split("\n\n")[:-1]:  # solved: context + gold continuation
        i = int(shot.split(":")[0][1:])
        assert shot == f"Q{i}:" + (f" a{i}" if i % 2 == 0 else f" b{i}")
    assert fewshot_prefix(ex, pool, 0, 0) == ""
    assert with_fewshot(ex, pool, 2, 7).contexts == tuple(prefix + c for c in ex.contexts)
    with pytest.raises(DataError, match="fewshot"):
        fewshot_prefix(ex, pool, 6, 0)


@needs_mirror
def test_winogrande_fewshot_uses_gold_option(loaded):
    pool = loaded["winogrande"][:3]
    prefix = fewshot_prefix(loaded["winogrande"][5], pool, 1, 0)
    shot = prefix[:-2]
    assert shot in {p.contexts[p.gold] + p.continuations[0] for p in pool}


# ------------------------------------------------------------------- a registered task without data

_ABSENT_TASK_PLUGIN = """
from pathlib import Path
import pipeline.data.tasks as tasks_mod

def pytest_configure(config):
    tasks_mod.TASK_DIR = Path({task_dir!r})
    tasks_mod._registry.cache_clear()
"""


@needs_mirror
def test_a_registered_task_without_mirror_data_is_skipped_not_failed(tmp_path):
    """Issue 9: registering one more task whose data the mirror lacks must leave this module's mirror-driven
    tests passing (the new task skipped, with a reason naming it), not turn them into failures and errors.
    Runs this module in a child pytest whose registry holds every real task plus `absent_task`."""
    import re
    import subprocess
    import sys

    import pipeline.data.tasks as tasks_mod

    task_dir = tmp_path / "tasks"
    shutil.copytree(tasks_mod.TASK_DIR, task_dir)
    (task_dir / "absent_task.yaml").write_text(
        "name: absent_task\nkind: multiple_choice\nmetrics: [acc]\n"
        "mirror: {split: validation, files: {validation: absent_task/validation.jsonl}}\n"
        "hub: {path: nobody/absent_task}\n"
        "prompt:\n  context: \"{{q}}\"\n  choices: \"['a', 'b']\"\n  gold: label\n",
        encoding="utf-8",
    )
    (tmp_path / "absent_task_plugin.py").write_text(_ABSENT_TASK_PLUGIN.format(task_dir=str(task_dir)))
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "SHADOWLLM_DATA_MIRROR": str(MIRROR),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root), os.environ.get("PYTHONPATH", "")]),
    }
    me = "test_a_registered_task_without_mirror_data_is_skipped_not_failed"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "-p",
            "absent_task_plugin",
            "-k",
            f"not {me}",
            __file__,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", out) and not re.search(r"\d+ (failed|errors?)\b", out), out[-4000:]
    assert "absent_task" in out and "no data in the mirror" in out, out[-4000:]  # the skip says why
