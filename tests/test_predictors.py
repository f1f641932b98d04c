"""Predictors (SPEC §6): learnability, input handling, files, ranking metrics, the train stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.predictors import build, load_predictor, save_predictor
from pipeline.predictors.fit import evaluate, fit, split_indices
from pipeline.predictors.params import TrainParams
from pipeline.predictors.size import cost, layer_params
from pipeline.ranking import spearman_joint, spearman_per_layer, topk_recall
from tests.conftest import section_params
from tests.test_aggregate import FINGERPRINT, _no_tracking, trace_dir, write_params  # noqa: F401 (fixtures)

DIMS = {"arch": "llama", "n_layers": 3, "n_heads": 8, "n_kv_heads": 2, "head_dim": 4, "hidden": 32, "ffn_dim": 24}
SMALL = {"hidden_heads": 16, "hidden_neurons": 16, "rank_heads": 0, "rank_neurons": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threading only adds overhead
    yield
    torch.set_num_threads(n)


def _synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features x ~ N(0, 1) [n, H*D] and targets = a fixed random linear map of x.

    The map's columns sum to zero, so W x = span(x) · W minmax(x): the target's per-example ranking is
    fully determined by the min-max-normalised features the predictor sees (it is learnable)."""
    rng = np.random.default_rng(seed)
    e = DIMS["n_heads"] * DIMS["head_dim"]
    x = rng.normal(size=(n, e)).astype(np.float32)
    wh = rng.normal(size=(e, DIMS["n_layers"] * DIMS["n_heads"])).astype(np.float32)
    wn = rng.normal(size=(e, DIMS["n_layers"] * DIMS["ffn_dim"])).astype(np.float32)
    wh -= wh.mean(0)
    wn -= wn.mean(0)
    yh = (x @ wh / 6).reshape(n, DIMS["n_layers"], DIMS["n_heads"])
    yn = (x @ wn / 6).reshape(n, DIMS["n_layers"], DIMS["ffn_dim"])
    return x, yh, yn


@pytest.mark.parametrize("shuffle", [False, True])
def test_shadowllm_learns_a_linear_target_and_not_a_shuffled_one(shuffle):
    x, yh, yn = _synthetic(800)
    if shuffle:  # break the feature -> target link
        perm = np.random.default_rng(1).permutation(len(x))
        yh, yn = yh[perm], yn[perm]
    train, val = split_indices(len(x), 0.25, seed=0)
    torch.manual_seed(0)
    pred = build("shadowllm", "plainact", DIMS, {**SMALL, "hidden_heads": 128, "hidden_neurons": 128})
    fit(pred, x, yh, yn, train, section_params(TrainParams, epochs=30, lr=1e-2, batch_size=16, target_transform="none"))
    m = evaluate(pred, x[val], yh[val], yn[val], [0.5])
    rho = [m["heads"]["spearman_joint"], m["neurons"]["spearman_joint"]]
    if shuffle:
        assert all(abs(r) < 0.15 for r in rho), rho
    else:
        assert all(r > 0.95 for r in rho), rho


def test_split_is_seeded_and_disjoint():
    a = split_indices(50, 0.2, 3)
    b = split_indices(50, 0.2, 3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 50
    assert not np.array_equal(split_indices(50, 0.2, 4)[1], a[1])


def test_input_is_normalised_inside_forward():
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    for kind, inp in (("shadowllm", x), ("dejavu", x.view(5, 1, 32).expand(5, 3, 32))):
        pred = build(kind, "plainact", DIMS, SMALL).eval()
        pred.set_standardisation(np.random.default_rng(0).normal(size=(20, *inp.shape[1:])).astype(np.float32))
        assert not torch.allclose(pred.in_std, torch.ones_like(pred.in_std))
        with torch.no_grad():
            a, b = pred(inp), pred(3.0 * inp + 7.0)  # per-example min-max removes any positive affine map
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu", "dejavu_lookahead"])
def test_standardisation_is_stored_and_applied_on_raw_features(tmp_path, kind):
    """The evaluate stage calls a loaded predictor on raw features: its training-view forward, its
    predict calls and its reloaded copy must all apply the same stored per-feature statistics."""
    rng = np.random.default_rng(0)
    feats = {
        "feat_l0": (rng.normal(size=(30, 32)) * rng.uniform(0.1, 9, 32) + rng.normal(size=32) * 5).astype(np.float32),
        "feat_layers": (rng.normal(size=(30, 3 * 32)) * 3 + 1).astype(np.float32),
    }
    torch.manual_seed(0)
    pred = build(kind, "plainact", DIMS, SMALL)
    x = pred.inputs(feats)
    pred.set_standardisation(x)
    z = pred.normalise(torch.from_numpy(x).reshape(30, *pred.in_mean.shape))
    torch.testing.assert_close(z.mean(0), torch.zeros_like(z[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones_like(z[0]), atol=1e-4, rtol=0)
    save_predictor(pred, tmp_path / "p", {"model_fingerprint": "fp"})
    back = load_predictor(tmp_path / "p")
    torch.testing.assert_close(back.in_mean, pred.in_mean, rtol=0, atol=0)
    torch.testing.assert_close(back.in_std, pred.in_std, rtol=0, atol=0)
    with torch.no_grad():
        h, n = back(torch.from_numpy(x))
        l = back.layers[-1]
        if kind == "shadowllm":
            hl, nl = back.predict_layer(l, torch.from_numpy(x))
        else:
            hl, nl = back.predict_layer(l, torch.from_numpy(x[:, -1]))
        torch.testing.assert_close(hl, h[:, -1])
        torch.testing.assert_close(nl, n[:, -1])
        torch.testing.assert_close(pred.eval()(torch.from_numpy(x))[0], h)


def test_shadowllm_shapes_and_layer_slice():
    pred = build("shadowllm", "plainact", DIMS, {**SMALL, "rank_neurons": 4}).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        h, n = pred.predict_all(x)
        assert h.shape == (2, 7, 3, 8) and n.shape == (2, 7, 3, 24)
        h1, n1 = pred.predict_layer(1, x)
    torch.testing.assert_close(h1, h[..., 1, :])
    torch.testing.assert_close(n1, n[..., 1, :])
    assert pred.input_kind == "l0_heads" and pred.layers == [0, 1, 2]
    assert pred.neurons.down.shape == (1, 16, 4)  # low-rank output factor


def test_dejavu_reads_own_layer_and_lookahead_reads_previous_layer():
    feats = {"feat_layers": np.random.default_rng(0).normal(size=(4, 3 * 32)).astype(np.float32)}
    per_layer = build("dejavu", "l2_norm", DIMS, SMALL).eval()
    ahead = build("dejavu_lookahead", "l2_norm", DIMS, SMALL).eval()
    assert per_layer.layers == [0, 1, 2] and ahead.layers == [1, 2]
    layer_in = feats["feat_layers"].reshape(4, 3, 32)
    np.testing.assert_array_equal(per_layer.inputs(feats), layer_in)
    np.testing.assert_array_equal(ahead.inputs(feats), layer_in[:, :2])  # layer l <- input of layer l-1
    with torch.no_grad():
        full_h, full_n = ahead(torch.from_numpy(ahead.inputs(feats)))
        h2, n2 = ahead.predict_layer(2, torch.from_numpy(layer_in[:, 1]))  # layer 2 from layer 1's input
        torch.testing.assert_close(h2, full_h[:, 1])
        torch.testing.assert_close(n2, full_n[:, 1])
        # perturbing layer 2's own input does not change the look-ahead prediction for layer 2
        moved = feats["feat_layers"].reshape(4, 3, 32).copy()
        moved[:, 2] += np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
        torch.testing.assert_close(
            ahead(torch.from_numpy(ahead.inputs({"feat_layers": moved.reshape(4, -1)})))[0], full_h
        )
        h2_own, _ = per_layer.predict_layer(2, torch.from_numpy(layer_in[:, 2]))
        torch.testing.assert_close(h2_own, per_layer(torch.from_numpy(layer_in))[0][:, 2])
    with pytest.raises(ValueError, match="no predictor for layer 0"):
        ahead.predict_layer(0, torch.zeros(32))


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu_lookahead"])
def test_save_load_round_trip_and_fingerprint_refusal(tmp_path, kind):
    torch.manual_seed(0)
    pred = build(kind, "fisher", DIMS, {**SMALL, "rank_heads": 3}).eval()
    save_predictor(pred, tmp_path / "p", {"model_fingerprint": "fp-A", "trace_params_hash": "t", "metrics": {"x": 1.0}})
    back = load_predictor(tmp_path / "p", model_fingerprint="fp-A")
    assert back.kind == kind and back.criterion == "fisher" and back.widths == pred.widths
    for k, v in pred.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["model_fingerprint"] == "fp-A" and cfg["n_params"] == pred.n_params()
    with pytest.raises(ValueError, match="fp-A.*fp-B"):
        load_predictor(tmp_path / "p", model_fingerprint="fp-B")


@pytest.mark.parametrize("damage", ["flip", "truncate", "old_config"])
def test_a_corrupt_truncated_or_unchecked_predictor_is_refused_by_name(tmp_path, damage):
    from pipeline.errors import UserError
    from pipeline.predictors.store import PredictorError

    pred = build("shadowllm", "fisher", DIMS, SMALL).eval()
    save_predictor(pred, tmp_path / "p", {"model_fingerprint": "fp"})
    weights, config = tmp_path / "p" / "model.safetensors", tmp_path / "p" / "config.json"
    cfg = json.loads(config.read_text())
    assert len(cfg["weights_sha256"]) == 64
    b = bytearray(weights.read_bytes())
    if damage == "flip":
        b[len(b) // 2 : len(b) // 2 + 1000] = bytes(x ^ 0xFF for x in b[len(b) // 2 : len(b) // 2 + 1000])
        weights.write_bytes(bytes(b))
        want = f"{weights}: content differs from weights_sha256 in config.json (corrupt or truncated); rerun the train"
    elif damage == "truncate":
        weights.write_bytes(bytes(b[: len(b) // 2]))
        want = f"{weights}: content differs from weights_sha256"
    else:
        del cfg["weights_sha256"]
        config.write_text(json.dumps(cfg))
        want = f"{config}: no weights_sha256 (saved by an older version); rerun the train stage"
    with pytest.raises(PredictorError) as e:
        load_predictor(tmp_path / "p", model_fingerprint="fp")
    assert isinstance(e.value, UserError) and want in str(e.value) and "\n" not in str(e.value)


def test_ranking_metrics_by_hand():
    true = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    assert spearman_joint(true, true) == pytest.approx(1.0)
    assert spearman_joint(-true, true) == pytest.approx(-1.0)
    pred = np.array([[[1.0, 2.0, 4.0, 3.0]]])  # d² = 0+0+1+1 -> ρ = 1 - 6·2/(4·15) = 0.8
    assert spearman_joint(pred, true) == pytest.approx(0.8)
    # two layers: joint ranks 8 units together; per-layer averages the two layers' ρ
    t2 = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    p2 = np.array([[[2.0, 1.0], [3.0, 4.0]]])
    assert spearman_per_layer(p2, t2) == pytest.approx(0.0)  # (-1 + 1) / 2
    assert spearman_joint(p2, t2) == pytest.approx(0.8)
    # sparsity 0.5 keeps 2 of 4: true {2, 3}, predicted {2, 3} -> 1; pred2 keeps {0, 3} -> 0.5
    assert topk_recall(pred, true, 0.5) == pytest.approx(1.0)
    assert topk_recall(np.array([[[5.0, 0.0, 1.0, 9.0]]]), true, 0.5) == pytest.approx(0.5)
    # local scope: top-1 of each layer of t2 (units 1 and 1); p2 picks unit 0 then 1 -> 0.5
    assert topk_recall(p2, t2, 0.5, scope="local") == pytest.approx(0.5)


def test_numpy_ranks_equal_scipy_average_ranks_ties_signed_zeros_nan_rows_and_any_shape():
    from scipy.stats import rankdata

    from pipeline.ranking import numpy_ranks

    rng = np.random.default_rng(5)
    cases = [
        rng.integers(0, 5, size=(30, 40)).astype(np.float32),  # many ties
        rng.integers(0, 5, size=(4, 3, 7)),  # ints, 3-D
        np.round(rng.normal(size=(8, 500)), 1),
        np.zeros((3, 6)),  # one run per row
        np.array([[0.0, -0.0, 1.0, -0.0]]),  # signed zeros tie
        rng.normal(size=17),  # 1-D
    ]
    for x in cases:
        assert np.array_equal(numpy_ranks(x), rankdata(x, axis=-1)), x.shape
    x = rng.normal(size=(3, 6))
    x[1, 2] = np.nan
    got, ref = numpy_ranks(x), rankdata(x, axis=-1)
    assert np.isnan(got[1]).all() and np.isnan(ref[1]).all() and np.array_equal(got[[0, 2]], ref[[0, 2]])


def test_ranks_average_ties_like_scipy_on_either_backend():
    """`sorted_ranks` (the accelerator path) and `average_ranks` equal scipy's average ranks, ties
    included; `Spearman` (targets ranked once) gives the functions' ρ; constant or non-finite rows are nan."""
    from scipy.stats import rankdata

    from pipeline.ranking import Spearman, average_ranks, sorted_ranks

    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(20, 11)).astype(np.float32)  # many ties
    ref = rankdata(x, axis=-1)
    assert np.array_equal(sorted_ranks(torch.from_numpy(x)).numpy(), ref)
    assert np.array_equal(average_ranks(torch.from_numpy(x)).numpy(), ref)
    p, t = rng.normal(size=(6, 3, 5)), rng.integers(0, 3, size=(6, 3, 5)).astype(np.float64)
    t[0, 0] = 1.0  # a constant layer: no per-layer ρ for it
    s = Spearman(t)
    assert s.joint(p) == pytest.approx(spearman_joint(p, t)) and s.per_layer(p) == pytest.approx(
        spearman_per_layer(p, t)
    )
    rows = t.reshape(-1, 5)
    by_hand = [np.corrcoef(rankdata(a), rankdata(b))[0, 1] for a, b in zip(p.reshape(-1, 5), rows) if b.std() > 0]
    assert s.per_layer(p) == pytest.approx(np.mean(by_hand))
    bad = p.copy()
    bad[1, 0, 0] = np.nan
    assert s.joint(bad) == pytest.approx(np.mean([spearman_joint(p[i : i + 1], t[i : i + 1]) for i in (0, 2, 3, 4, 5)]))


def test_layer_params_counts_gqa_and_gating():
    d = {"arch": "llama", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "hidden": 32, "ffn_dim": 48}
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48
    assert layer_params(d) == 2 * per_layer
    assert layer_params({**d, "arch": "opt", "n_kv_heads": 4}) == 2 * (4 * 32 * 32 + 2 * 32 * 48)
    c = cost(1000, 4000, {"dims": d, "parameters": 100_000})  # the trace's recorded total wins
    assert c["share_of_model"] == pytest.approx(0.01) and c["share_of_layers"] == pytest.approx(1000 / layer_params(d))
    assert cost(1000, 4000, {"dims": d})["model_params"] == layer_params(d)


# ---- the stages end to end -----------------------------------------------------------------------

TRAIN = {
    "kinds": ["shadowllm", "dejavu", "dejavu_lookahead"],
    "widths": {
        k: {"hidden_heads": 16, "hidden_neurons": 32, "rank_heads": 0, "rank_neurons": 8}
        for k in ("shadowllm", "dejavu", "dejavu_lookahead")
    },
    "epochs": 3,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "batch_size": 16,
    "val_fraction": 0.25,
    "seed": 0,
    "device": "cpu",
    "sparsities": [0.3, 0.5, 0.7],
    "standardize": True,
    "target_transform": "rank",
    "select_fraction": 0.15,
    "ridge_alphas": [1.0, 100.0],
}
AGG = {"targets": ["plainact", "l2_norm"], "heatmap": "plainact", "target_dtype": "float32"}


@pytest.fixture(scope="module")
def scores_dir(trace_dir, tmp_path_factory) -> Path:
    from pipeline import aggregate as agg

    out = tmp_path_factory.mktemp("scores")
    agg.aggregate(agg.open_traces(trace_dir), agg.AggregateParams.from_mapping(AGG, "aggregate"), out)
    return out


def _train(tmp_path: Path, trace_dir: Path, scores_dir: Path, **train):
    from stages.train import cli

    params = write_params(tmp_path / "params.yaml", aggregate=train.pop("aggregate", AGG), train={**TRAIN, **train})
    return CliRunner().invoke(
        cli,
        [
            "--params",
            str(params),
            "--traces",
            str(trace_dir),
            "--scores",
            str(scores_dir),
            "--out",
            str(tmp_path / "pred"),
            "--metrics",
            str(tmp_path / "metrics.json"),
            "--plots",
            str(tmp_path / "plots"),
        ],
    )


def test_train_stage_end_to_end(tmp_path, trace_dir, scores_dir):
    res = _train(tmp_path, trace_dir, scores_dir)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics_tables.json").read_text())  # the full tables (default path)
    headline = json.loads((tmp_path / "metrics.json").read_text())  # DVC metrics: a few figures per predictor
    assert headline["split"] == {"n_train": 48, "n_val": 16}
    for c in AGG["targets"]:
        for k in TRAIN["kinds"]:
            h, m = headline["predictors"][c][k], metrics["predictors"][c][k]
            assert h == {
                "heads": {key: m["heads"][key] for key in ("spearman_joint", "recall_global_s50")},
                "neurons": {key: m["neurons"][key] for key in ("spearman_joint", "recall_global_s50")},
                "params": m["size"]["params"],
            }
            assert headline["ridge"][c][k]["heads"] == {
                "spearman_joint": metrics["ridge"][c][k]["heads"]["spearman_joint"]
            }
        assert set(headline["train_mean"][c]["neurons"]) == {"spearman_joint"}
    assert len(json.dumps(headline)) < len(json.dumps(metrics)) / 3
    assert metrics["split"] == {
        "n_train": 48,
        "n_val": 16,
        "seed": 0,
        "n_fit": 41,
        "n_select": 7,
        "val_example_order": metrics["split"]["val_example_order"],
    }
    for c in AGG["targets"]:
        for k in TRAIN["kinds"]:
            m = metrics["predictors"][c][k]
            for unit in ("heads", "neurons"):
                assert -1 <= m[unit]["spearman_joint"] <= 1 and 0 <= m[unit]["recall_global_s50"] <= 1
            assert m["size"]["params"] > 0 and m["size"]["share_of_model"] > 0
            pred = load_predictor(tmp_path / "pred" / f"{k}-{c}", model_fingerprint=FINGERPRINT)
            assert pred.kind == k and pred.criterion == c
            curves = (tmp_path / "plots" / f"{k}-{c}.csv").read_text().splitlines()
            assert curves[0].startswith("epoch,") and len(curves) == 2 + TRAIN["epochs"]  # header, epochs 0..E
            r = metrics["ridge"][c][k]
            assert -1 <= r["heads"]["spearman_joint"] <= 1 and set(r["alpha"]) == {"heads", "neurons"}
            assert (
                0 <= min(m["train"]["best_epoch"].values()) <= max(m["train"]["best_epoch"].values()) <= TRAIN["epochs"]
            )
            assert (tmp_path / "plots" / f"{k}-{c}.png").is_file()
        assert 0 <= metrics["train_mean"][c]["heads"]["recall_local_s30"] <= 1
    assert (
        metrics["predictors"]["plainact"]["dejavu"]["size"]["params"]
        > metrics["predictors"]["plainact"]["dejavu_lookahead"]["size"]["params"]
    )  # L vs L-1 per-layer MLPs
    report = (tmp_path / "pred" / "report.md").read_text()
    assert report.count("| plainact |") == 7 and "train mean" in report and "| l2_norm | dejavu_lookahead |" in report
    assert "| plainact | *ridge on shadowllm input* |" in report and "does not beat both baselines" in report


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kinds": ["shadowllm", "magic"]}, "train.kinds: unknown predictor kind 'magic'"),
        ({"sparsities": [0.5, 1.0]}, "train.sparsities must be < 1.0, got 1.0"),
        ({"aggregate": {**AGG, "targets": ["jacov"]}}, "aggregate.targets: criterion 'jacov' is static-only"),
        ({"aggregate": {**AGG, "targets": ["fisher"]}}, "aggregate.targets: no targets for 'fisher'"),
        ({"widths": {"shadowllm": {"hidden_heads": 8}}}, "train.widths"),
        ({"epochs": 0}, "train.epochs must be >= 1, got 0"),
        ({"standardize": "yes"}, "train.standardize must be true or false"),
        ({"target_transform": "sqrt"}, "train.target_transform must be one of none, log, rank"),
        ({"select_fraction": 0.0}, "train.select_fraction must be > 0"),
        ({"ridge_alphas": [1.0, -1.0]}, "train.ridge_alphas must be > 0.0, got -1.0"),
        (
            {"widths": {**TRAIN["widths"], "shadowllm": {**TRAIN["widths"]["shadowllm"], "hiden_heads": 8}}},
            "unknown parameter train.widths.shadowllm.hiden_heads (did you mean 'hidden_heads'?)",
        ),
        ({"widths": {**TRAIN["widths"], "magic": SMALL}}, "train.widths: unknown predictor kind 'magic'"),
        ({"kinds": ["dejavu", "dejavu"]}, "train.kinds has duplicates"),
        ({"device": "tpu"}, "train.device must be 'cpu' or 'cuda[:N]'"),
        ({"seeed": 1}, "unknown parameter train.seeed (did you mean 'seed'?)"),
    ],
)
def test_train_stage_bad_params(tmp_path, trace_dir, scores_dir, change, message):
    res = _train(tmp_path, trace_dir, scores_dir, **change)
    assert res.exit_code == 1 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "pred").exists() and not (tmp_path / "metrics.json").exists()


def test_train_params_have_no_code_defaults_and_kinds_carry_their_features():
    """Every key of `train:` (and of each kind's widths) is required: params.yaml is their one source;
    each registered kind names the trace column it reads."""
    from pipeline.params import ParamError, schema_defaults
    from pipeline.predictors import PREDICTORS, PredictorWidths

    p = section_params(TrainParams)
    assert not schema_defaults(TrainParams) and not schema_defaults(PredictorWidths)
    for key in TRAIN:
        with pytest.raises(ParamError, match=f"missing parameter train.{key}"):
            TrainParams.from_mapping({k: v for k, v in TRAIN.items() if k != key}, "train")
    assert set(p.kinds) <= set(PREDICTORS) and {PREDICTORS[k].feature_column for k in p.kinds} <= {
        "feat_l0",
        "feat_layers",
    }
    with pytest.raises(ParamError, match="missing parameter widths of dejavu.rank_heads"):
        build("dejavu", "plainact", DIMS, {"hidden_heads": 4, "hidden_neurons": 4, "rank_neurons": 0})
    with pytest.raises(ValueError, match="unknown predictor kind 'magic'"):
        build("magic", "plainact", DIMS, SMALL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranks_on_cuda_equal_scipy():
    from scipy.stats import rankdata

    from pipeline.ranking import Spearman, average_ranks

    rng = np.random.default_rng(4)
    x = rng.integers(0, 50, size=(64, 4000)).astype(np.float32)
    assert np.array_equal(average_ranks(torch.from_numpy(x).cuda()).cpu().numpy(), rankdata(x, axis=-1))
    p, t = rng.normal(size=(8, 4, 300)).astype(np.float32), x[:8, :1200].reshape(8, 4, 300)
    s = Spearman(t, "cuda")
    assert s.joint(p) == pytest.approx(spearman_joint(p, t), abs=1e-12)
    assert s.per_layer(p) == pytest.approx(spearman_per_layer(p, t), abs=1e-12)
