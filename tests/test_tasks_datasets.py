"""The mirror is read through `datasets` (issue 13 item 9): the `json` / `text` builders and their Arrow cache,
with the same task YAMLs, the same rendered examples and the same one-line errors as the plain JSON reader."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from pipeline.data.tasks import DataError, check_tasks, get_task, list_tasks, load_examples, load_text

MIRROR = Path(os.environ.get("SHADOWLLM_DATA_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"data mirror {MIRROR} absent")

# Every mirror file rendered by the plain JSON reader before the change (commit 50562d7): (number of examples,
# sha256[:16] of all of them as JSON [id, contexts, continuations, gold]); WikiText: (characters, sha256[:16]).
FROZEN = {
    "arc_easy:test": (2376, "402a078e262e0632"),
    "arc_easy:validation": (570, "49ae627649047a78"),
    "copa:validation": (100, "45d5ab176c13b186"),
    "hellaswag:validation": (10042, "b1d7a82da7fe94b0"),  # .jsonl.gz
    "lambada:test": (5153, "18aadf6ecf28e6c6"),
    "openbookqa:test": (500, "fd5ea0b478c0b87a"),
    "openbookqa:validation": (500, "1c8787546e0069d4"),
    "piqa:validation": (1838, "0a6b306d9922b1a4"),
    "rte:validation": (277, "6f208a0474a024d7"),
    "winogrande:validation": (1267, "ab76f18416a98dbb"),
    "wikitext2:test": (1294336, "696cca6b65a171b0"),
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "ds-cache"
    monkeypatch.setenv("SHADOWLLM_DATASETS_CACHE", str(d))  # pipeline.data.tasks.CACHE_ENV
    return d


def _spy(monkeypatch) -> list[tuple]:
    import datasets

    calls, real = [], datasets.load_dataset

    def spy(path, *a, **kw):
        calls.append((path, kw.get("data_files"), kw.get("cache_dir")))
        return real(path, *a, **kw)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def _mirror(tmp_path: Path, task: str, content: bytes) -> Path:
    rel = get_task(task).mirror_file()
    (tmp_path / "m" / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "m" / rel).write_bytes(content)
    return tmp_path / "m"


COPA_ROW = {
    "premise": "It rained.",
    "choice1": "The grass got wet.",
    "choice2": "X.",
    "question": "effect",
    "idx": 0,
    "label": 0,
}


def test_mirror_json_is_loaded_with_the_datasets_json_builder_into_the_cache_dir(tmp_path, cache, monkeypatch):
    calls = _spy(monkeypatch)
    mirror = _mirror(tmp_path, "copa", (json.dumps(COPA_ROW) + "\n").encode())
    (e,) = load_examples("copa", mirror)
    assert e.contexts == ("It rained therefore",) * 2 and e.continuations == ("  the grass got wet.", "  x.")
    assert calls == [("json", str(mirror / "copa" / "copa_validation.jsonl"), str(cache))]
    assert list(cache.rglob("*.arrow")), "the rows live in an Arrow file under the cache dir"


def test_gzipped_mirror_json_is_read_by_datasets(tmp_path, cache, monkeypatch):
    calls = _spy(monkeypatch)
    row = {"activity_label": "X", "ctx_a": "A man.", "ctx_b": "he", "endings": ["a", "b", "c", "d"], "label": "2"}
    mirror = _mirror(tmp_path, "hellaswag", gzip.compress((json.dumps(row) + "\n").encode()))
    (e,) = load_examples("hellaswag", mirror)
    assert e.gold == 2 and len(e.continuations) == 4
    assert [c[0] for c in calls] == ["json"]


def test_mirror_text_is_loaded_with_the_datasets_text_builder(tmp_path, cache, monkeypatch):
    calls = _spy(monkeypatch)
    mirror = _mirror(tmp_path, "wikitext2", b" = T = \n \n a b . \n")
    assert load_text("wikitext2", mirror) == " = T = \n\n\n\n\n a b . \n"  # rows " = T = \n", "", " a b . \n"
    assert [c[0] for c in calls] == ["text"]


def test_errors_stay_one_line_and_name_the_file(tmp_path, cache):
    mirror = _mirror(tmp_path, "piqa", b'{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": \n')
    with pytest.raises(DataError, match=r"piqa_validation\.jsonl:2: bad JSON"):
        load_examples("piqa", mirror)
    for content in (b"", b"\n\n"):
        mirror = _mirror(tmp_path, "copa", content)
        with pytest.raises(DataError, match=r"^empty dataset for task 'copa': .*copa_validation\.jsonl has no rows"):
            load_examples("copa", mirror)
    mirror = _mirror(tmp_path, "piqa", b"\xff\xfe not utf-8\n")
    with pytest.raises(DataError, match=r"piqa_validation\.jsonl: unreadable"):
        load_examples("piqa", mirror)
    (tmp_path / "m" / "piqa" / "piqa_validation.jsonl").unlink()
    with pytest.raises(DataError, match=r"^missing mirror file .*piqa_validation\.jsonl for task 'piqa' \(param "):
        load_examples("piqa", tmp_path / "m")


def test_mirror_without_datasets_is_a_clear_error(tmp_path, cache, monkeypatch):
    mirror = _mirror(tmp_path, "copa", (json.dumps(COPA_ROW) + "\n").encode())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(DataError, match=r"'datasets' package is not installed.*param data\.mirror_dir"):
        load_examples("copa", mirror)
    with pytest.raises(DataError, match=r"copa are read with 'datasets' and the 'datasets' package is not installed"):
        check_tasks(["copa"], mirror)  # the preflight, before any weights are read


@needs_mirror
def test_every_mirror_file_renders_exactly_as_the_plain_json_reader_did(cache):
    seen = {}
    for name in list_tasks():
        spec = get_task(name)
        for split in sorted(spec.mirror_files):
            if not (MIRROR / spec.mirror_file(split)).is_file():
                continue
            if spec.kind == "perplexity":
                text = load_text(name, MIRROR, split=split)
                seen[f"{name}:{split}"] = (len(text), _sha(text))
            else:
                ex = load_examples(name, MIRROR, split=split)
                blob = json.dumps([[e.id, e.contexts, e.continuations, e.gold] for e in ex], ensure_ascii=False)
                seen[f"{name}:{split}"] = (len(ex), _sha(blob))
    assert {k: seen.get(k) for k in FROZEN} == FROZEN
