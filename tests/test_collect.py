"""collect: shards, resume after a kill, run isolation, non-finite detection, trace reader, the manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import collect as C
from pipeline.models.adapters import resolve
from pipeline.scoring import ScoreSettings, pad_batch
from pipeline.traces import MANIFEST, TraceError, Traces
from tests.conftest import section_params, tiny_model

CRITS = ["plainact", "fisher", "l2_norm", "jacov"]


def _seqs(n=7):
    g = torch.Generator().manual_seed(0)
    return [
        C.Sequence(f"t/{i}", "t", tuple(torch.randint(0, 96, (int(5 + i % 4),), generator=g).tolist()), 2)
        for i in range(n)
    ]


def _meta(model, layout):
    return {"model": {"id": "tiny", "fingerprint": "abc", "dims": layout.dims()}}


def _run(tmp_path, model, **kw):
    layout = resolve(model)
    settings = section_params(C.CollectParams, criteria=CRITS, batch_size=2, shard_size=3, **kw)
    return C.collect(model, layout, _seqs(), tmp_path, settings, _meta(model, layout), progress=False)


def test_traces_have_one_row_per_example_and_right_shapes(tmp_path):
    model = tiny_model("llama")
    stats = _run(tmp_path, model)
    assert stats.examples == 7 and stats.shards_written == 3 and stats.bytes_written > 0
    tr = Traces.open(tmp_path)
    assert sorted(tr.column("example_id")) == sorted(f"t/{i}" for i in range(7))
    assert tr.scores("plainact", "heads").shape == (7, 3, 4)
    assert tr.scores("fisher", "neurons").shape == (7, 3, 48)
    assert tr.array("feat_l0").shape == (7, 32) and tr.array("feat_layers").shape == (7, 3 * 32)
    assert tr.meta["model"]["dims"]["kv_group"] == [0, 0, 1, 1]
    assert "jacov_neurons" not in tr.table(["example_id"]).schema.names
    assert np.isfinite(tr.scores("jacov", "heads")).all()


def test_killed_run_resumes_without_duplicates(tmp_path, monkeypatch):
    model = tiny_model("opt")
    full = tmp_path / "full"
    _run(full, model)
    reference = Traces.open(full)

    calls = {"n": 0}
    real = C.score_batch

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # first batch of the second shard
            raise KeyboardInterrupt
        return real(*a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(C, "score_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(part, model)
    assert [p.name for p in sorted(part.glob("*.parquet"))] == ["part-00000.parquet"]
    assert not list(part.glob(".*tmp"))
    assert not (part / MANIFEST).exists()
    with pytest.raises(
        TraceError, match=r"incomplete trace set: 1 of 3 shards \(missing part-00001.parquet, part-00002"
    ):
        Traces.open(part)
    monkeypatch.setattr(C, "score_batch", real)
    stats = _run(part, model)
    assert stats.shards_reused == 1 and stats.shards_written == 2 and stats.examples == 4
    resumed = Traces.open(part)
    ids = resumed.column("example_id")
    assert len(ids) == len(set(ids)) == 7
    order_ref = np.argsort(reference.column("example_id"))
    order_res = np.argsort(ids)
    np.testing.assert_allclose(
        resumed.scores("plainact", "heads")[order_res], reference.scores("plainact", "heads")[order_ref], rtol=1e-6
    )


def test_shards_of_another_run_are_discarded(tmp_path):
    model = tiny_model("gemma")
    _run(tmp_path, model)
    stats = _run(tmp_path, model, storage="float32")  # different params: nothing reused
    assert stats.shards_reused == 0 and stats.shards_written == 3
    assert Traces.open(tmp_path).meta["storage"] == "float32"


def test_non_finite_gradient_names_the_example_and_writes_nothing(tmp_path):
    model = tiny_model("llama")
    layout = resolve(model)
    with torch.no_grad():
        layout.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(C.NonFiniteError, match="example\\(s\\) t/"):
        _run(tmp_path, model)
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*"))


def test_sequence_rejects_empty_target():
    with pytest.raises(ValueError, match="n_target"):
        C.Sequence("x", "t", (1, 2, 3), 3)
    s = C.mc_sequence("x", "t", list(range(10)), [11, 12], max_tokens=5)
    assert s.input_ids == (7, 8, 9, 11, 12) and s.n_target == 2


def test_float16_storage_keeps_tiny_and_huge_scores(tmp_path):
    from pipeline.traces import write_manifest, write_shard

    vals = np.array([[1e-10, 3e-11, 2e-12], [1e5, -2.5e5, 7.0]], dtype=np.float64)
    dims = {"n_layers": 1, "n_heads": 3, "ffn_dim": 3}
    meta = {"schema_version": 2, "params_hash": "h", "criteria": ["x"], "model": {"dims": dims}}
    write_shard(tmp_path / "part-00000.parquet", {"example_id": ["a", "b"], "x_heads": vals}, meta, "float16")
    write_manifest(tmp_path)
    back = Traces.open(tmp_path).scores("x", "heads").reshape(2, 3)
    np.testing.assert_allclose(back[0, :2], vals[0, :2], rtol=1e-3)
    np.testing.assert_allclose(back[1, :2], vals[1, :2], rtol=1e-3)


def test_all_layer_scoring_equals_layer_by_layer():
    from pipeline import criteria as crit
    from pipeline.hooks import UnitCapture

    model = tiny_model("gemma")
    layout = resolve(model)
    seqs = _seqs(3)
    out = C.score_batch(model, layout, seqs, ScoreSettings(("plainact", "nwot"), False))
    ids, valid, labels = pad_batch(seqs, torch.device("cpu"))
    with UnitCapture(model, layout) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=valid.long())
    for l in range(layout.n_layers):
        a = cap.heads(cap.raw_heads[l]).float()
        u = crit.UnitBatch(a=a, g=None, valid=valid, labels=labels)
        np.testing.assert_allclose(
            out["nwot_heads"][:, l * 4 : (l + 1) * 4], crit.get("nwot").heads(u).numpy(), rtol=1e-5
        )


def test_a_code_change_invalidates_resumed_shards(tmp_path, monkeypatch):
    model = tiny_model("llama")
    _run(tmp_path, model)
    again = _run(tmp_path, model)
    assert again.shards_reused == 3 and again.resume_line() == "3 shards reused"
    monkeypatch.setattr(C, "code_hash", lambda *a, **k: "edited-criteria")
    stats = _run(tmp_path, model)
    assert stats.shards_reused == 0 and stats.shards_written == 3
    assert stats.resume_line() == "0 shards reused, discarded 3 code changed"
    assert Traces.open(tmp_path).meta["code_hash"] == "edited-criteria"


def test_code_hash_follows_the_content_of_the_files_that_make_traces(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "criteria.py").write_text("a = 1\n")
    (tmp_path / "data" / "t.yaml").write_text("x: 1\n")
    files = ("criteria.py", "data")
    h0 = C.code_hash(files, tmp_path)
    assert C.code_hash(files, tmp_path) == h0
    (tmp_path / "data" / "t.yaml").write_text("x: 2\n")
    h1 = C.code_hash(files, tmp_path)
    (tmp_path / "criteria.py").write_text("a = 2\n")
    assert len({h0, h1, C.code_hash(files, tmp_path)}) == 3
    # the real list names files that exist: a renamed module must not silently drop out of the hash
    assert all((C._PKG / f).exists() for f in C.CODE_FILES)


def test_features_are_read_at_the_last_context_token(tmp_path):
    """Trace features = layer-0 head outputs / layer inputs at the token before the first target."""
    from pipeline.hooks import UnitCapture

    model = tiny_model("llama")
    layout = resolve(model)
    mc = C.mc_sequence("m", "t", [5, 6, 7, 8], [9, 10], max_tokens=64)
    txt = C.text_sequence("w", "t", [3, 4, 5, 6, 7])
    assert (mc.feature_pos, txt.feature_pos) == (3, 3)
    out = C.score_batch(model, layout, [mc, txt], ScoreSettings(("plainact",), True))
    assert out["feat_pos"].tolist() == [3, 3]
    for b, s in enumerate([mc, txt]):
        ids = torch.tensor([s.input_ids[: s.feature_pos + 1]])  # the context alone: causal, same features
        with UnitCapture(model, layout, layer_inputs=True) as cap, torch.no_grad():
            model(input_ids=ids)
        np.testing.assert_allclose(
            out["feat_l0"][b], cap.heads(cap.raw_heads[0])[0, -1].flatten().numpy(), rtol=1e-4, atol=1e-6
        )
        layers = torch.stack([h[0, -1] for h in cap.layer_inputs]).flatten().numpy()
        np.testing.assert_allclose(out["feat_layers"][b], layers, rtol=1e-4, atol=1e-6)


def test_float16_row_spanning_1e12_to_1_across_layers_keeps_every_layers_ranks(tmp_path):
    from pipeline.traces import write_manifest, write_shard

    rng = np.random.default_rng(0)
    L, U = 4, 64
    row = np.concatenate([rng.permutation(U) / U + 0.5 for _ in range(L)]) * np.repeat([1e-12, 1e-9, 1e-6, 1.0], U)
    dims = {"n_layers": L, "n_heads": U, "ffn_dim": U}
    meta = {"schema_version": 2, "params_hash": "h", "criteria": ["x"], "model": {"dims": dims}}
    write_shard(tmp_path / "part-00000.parquet", {"example_id": ["a"], "x_heads": row[None]}, meta, "float16")
    write_manifest(tmp_path)
    back = Traces.open(tmp_path).scores("x", "heads")[0]
    want = row.reshape(L, U)
    for l in range(L):
        assert len(np.unique(back[l])) == U, f"layer {l} has ties"
        assert (np.argsort(back[l]) == np.argsort(want[l])).all()
        np.testing.assert_allclose(back[l], want[l], rtol=1e-3)


def _flip(path, n=1000, at=0.5, value=0):
    """Overwrite `n` bytes of `path` in the middle (a data page) with `value`."""
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i : i + n] = bytes([value]) * n
    path.write_bytes(bytes(b))


def _flip_page(path, column="plainact_heads.list.element", n=10):
    """Overwrite the last `n` bytes of `column`'s (one) data page: past its header, inside its CRC."""
    import pyarrow.parquet as pq

    rg = pq.read_metadata(path).row_group(0)
    c = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == column)
    end = c.data_page_offset + c.total_compressed_size
    b = bytearray(path.read_bytes())
    b[end - n : end] = bytes(x ^ 0xFF for x in b[end - n : end])
    path.write_bytes(bytes(b))


def test_a_killed_rerun_leaves_no_manifest_of_the_old_run(tmp_path, monkeypatch):
    model = tiny_model("llama")
    _run(tmp_path, model)
    assert (tmp_path / MANIFEST).is_file()
    real = C.score_batch
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(C, "score_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, model, storage="float32")  # new params: old shards go, one new shard written
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(TraceError, match=r"1 of 3 shards \(missing part-00001.parquet, part-00002.parquet\); rerun"):
        Traces.open(tmp_path)


def test_deleted_extra_or_corrupt_shards_are_refused(tmp_path):
    model = tiny_model("llama")
    _run(tmp_path, model)
    good = {p.name: p.read_bytes() for p in tmp_path.glob("part-*.parquet")}
    shard = tmp_path / "part-00001.parquet"

    shard.unlink()
    with pytest.raises(TraceError, match=r"2 of 3 shards \(missing part-00001.parquet\)"):
        Traces.open(tmp_path)
    shard.write_bytes(good[shard.name])
    Traces.open(tmp_path)

    (tmp_path / "part-00003.parquet").write_bytes(good["part-00000.parquet"])
    with pytest.raises(TraceError, match="shards not in manifest.json: part-00003.parquet"):
        Traces.open(tmp_path)
    (tmp_path / "part-00003.parquet").unlink()

    (tmp_path / "part-00002.parquet").write_bytes(good["part-00000.parquet"])  # a whole shard, not this one
    with pytest.raises(TraceError, match="part-00002.parquet: content differs from its sha256"):
        Traces.open(tmp_path)
    (tmp_path / "part-00002.parquet").write_bytes(good["part-00002.parquet"])

    _flip(shard)
    with pytest.raises(TraceError, match="part-00001.parquet: content differs") as e:
        Traces.open(tmp_path)
    assert "\n" not in str(e.value)


def test_page_checksums_catch_corruption_inside_a_shard(tmp_path):
    """Past the manifest (a shard changed after `Traces.open`), every read checks each page's CRC."""
    model = tiny_model("llama")
    _run(tmp_path, model)
    tr = Traces.open(tmp_path)
    shard = tmp_path / "part-00001.parquet"
    _flip_page(shard)
    with pytest.raises(
        TraceError, match=r"part-00001.parquet: corrupt shard \(.*CRC.*\); rerun the collect stage"
    ) as e:
        tr.scores("plainact", "heads")
    assert "\n" not in str(e.value)


def test_a_corrupt_shard_is_not_reused_by_a_rerun(tmp_path):
    model = tiny_model("llama")
    _run(tmp_path, model)
    _flip_page(tmp_path / "part-00001.parquet")
    stats = _run(tmp_path, model)
    assert stats.shards_reused == 2 and stats.shards_written == 1
    assert stats.resume_line() == "2 shards reused, discarded 1 corrupt"
    assert len(Traces.open(tmp_path).column("example_id")) == 7


@pytest.mark.parametrize(
    "criteria, cudnn, only_math",
    [(("plainact",), False, False), (("grasp",), False, True), (("l2_norm",), True, False)],
)
def test_a_differentiated_pass_never_runs_cudnn_attention(monkeypatch, criteria, cudnn, only_math):
    """cuDNN's SDPA backward returns NaN dQ for masked batches padded to 64 mod 128 (pytorch#196678): every pass
    that collect (or the oracle) differentiates runs with that backend off; a forward-only pass keeps it."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").float().eval()
    C.score_batch(model, resolve(model), _seqs(3), ScoreSettings(criteria, False))
    assert seen, "the tiny model did not call scaled_dot_product_attention"
    assert {c for c, _ in seen} == {cudnn}
    assert {f for _, f in seen} == {not only_math}
    assert torch.backends.cuda.cudnn_sdp_enabled(), "the backend flags were not restored"
