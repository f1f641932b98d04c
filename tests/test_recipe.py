"""The predictor training recipe (issue 9 items 4 and 5): the default recipe in params.yaml beats the
static train-mean ranking on learnable targets and on heavy-tailed ones, model selection never reads
the held-out rows, target transforms keep rankings, ridge is the closed-form solution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.predictors import build
from pipeline.predictors.fit import (
    FitResult,
    evaluate,
    evaluate_train_mean,
    fit,
    selection_split,
    split_indices,
)
from pipeline.predictors.params import TrainParams
from pipeline.predictors.ridge import Ridge, _features
from pipeline.predictors.targets import TARGET_TRANSFORMS
from pipeline.ranking import Spearman, spearman_joint, spearman_per_layer
from tests.conftest import section_params

DIMS = {"arch": "llama", "n_layers": 3, "n_heads": 8, "n_kv_heads": 2, "head_dim": 4, "hidden": 32, "ffn_dim": 24}
SMALL = {"hidden_heads": 64, "hidden_neurons": 64, "rank_heads": 0, "rank_neurons": 0}
RHO = ("spearman_joint", "spearman_per_layer")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def default_recipe(**change) -> TrainParams:
    """The recipe exactly as params.yaml `train:` sets it (widths aside: the tests use small MLPs)."""
    return section_params(TrainParams, **change)


def _minmax(y: np.ndarray) -> np.ndarray:
    lo = y.min(-1, keepdims=True)
    return ((y - lo) / (y.max(-1, keepdims=True) - lo)).astype(np.float32)


def synthetic(n: int = 400, heavy: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features like real activations: large fixed per-channel offsets, a small per-example signal
    (so every per-example min-max vector looks alike). Target z = a static per-unit part (what the
    train mean captures) + a linear function of the signal (what only a predictor can add) + noise;
    the score is z, or exp(heavy · z) (a heavy-tailed score), min-max per layer like real targets."""
    rng = np.random.default_rng(seed)
    e = DIMS["n_heads"] * DIMS["head_dim"]
    sig = rng.normal(size=(n, e))
    x = (rng.normal(scale=4.0, size=e) + 0.2 * sig).astype(np.float32)
    out = []
    for u in (DIMS["n_heads"], DIMS["ffn_dim"]):
        z = (
            rng.normal(size=(DIMS["n_layers"], u))
            + (sig @ rng.normal(size=(e, DIMS["n_layers"] * u)) / np.sqrt(e)).reshape(n, DIMS["n_layers"], u)
            + 0.5 * rng.normal(size=(n, DIMS["n_layers"], u))
        )
        out.append(_minmax(np.exp(heavy * z) if heavy else z))
    return x, out[0], out[1]


def _train_and_score(x, yh, yn, settings: TrainParams):
    train, val = split_indices(len(x), 0.2, 0)
    torch.manual_seed(0)
    pred = build("shadowllm", "plainact", DIMS, SMALL)
    res = fit(pred, x, yh, yn, train, settings)
    return (evaluate(pred, x[val], yh[val], yn[val], [0.5]), evaluate_train_mean(yh, yn, train, val, [0.5]), res)


def test_default_recipe_beats_the_train_mean_on_a_learnable_target():
    got, mean, _ = _train_and_score(*synthetic(), default_recipe())
    for unit in ("heads", "neurons"):
        for key in RHO:
            assert got[unit][key] > mean[unit][key] + 0.1, (unit, key, got[unit][key], mean[unit][key])


def test_default_recipe_ranks_heavy_tailed_targets_at_least_as_well_as_the_train_mean():
    x, yh, yn = synthetic(heavy=3.0)
    assert np.median(yn) < 0.01 and np.percentile(yn, 99) > 0.1  # like fisher neurons: median 0.0012, p99 0.115
    got, mean, _ = _train_and_score(x, yh, yn, default_recipe())
    for unit in ("heads", "neurons"):
        for key in RHO:
            assert got[unit][key] >= mean[unit][key], (unit, key, got[unit][key], mean[unit][key])


@pytest.mark.parametrize("transform", ["log", "rank"])
def test_log_and_rank_targets_rank_heavy_tailed_scores_better_than_mse_on_raw_scores(transform):
    x, yh, yn = synthetic(heavy=3.0)
    raw, _, _ = _train_and_score(x, yh, yn, default_recipe(target_transform="none"))
    got, _, _ = _train_and_score(x, yh, yn, default_recipe(target_transform=transform))
    for key in RHO:
        assert got["neurons"][key] > raw["neurons"][key] + 0.03, (key, got["neurons"][key], raw["neurons"][key])


@pytest.mark.parametrize("transform", sorted(TARGET_TRANSFORMS))
def test_target_transforms_keep_every_ranking(transform):
    _, yh, _ = synthetic(n=20, heavy=3.0)
    t = TARGET_TRANSFORMS[transform](yh)
    assert t.shape == yh.shape and t.dtype == np.float32 and t.min() >= 0 and t.max() <= 1
    assert spearman_joint(t, yh) == pytest.approx(1.0) and spearman_per_layer(t, yh) == pytest.approx(1.0)


def test_model_selection_never_reads_the_held_out_rows():
    x, yh, yn = synthetic(n=120)
    train, val = split_indices(len(x), 0.2, 0)
    fit_rows, sel_rows = selection_split(train, default_recipe())
    assert set(fit_rows) | set(sel_rows) == set(train) and not set(fit_rows) & set(sel_rows)
    settings = default_recipe(epochs=4)
    runs = []
    for poison in (False, True):
        xs, hs, ns = x.copy(), yh.copy(), yn.copy()
        if poison:  # the held-out rows are garbage: nothing the fit does may change
            xs[val], hs[val], ns[val] = np.nan, np.nan, np.nan
        torch.manual_seed(0)
        pred = build("shadowllm", "plainact", DIMS, SMALL)
        res = fit(pred, xs, hs, ns, train, settings)
        ridge = Ridge.fit(pred, xs, hs, ns, res, settings)
        runs.append((res, pred.state_dict(), ridge.predict(x[:5])))
    (a, sa, ra), (b, sb, rb) = runs
    assert a.best_epoch == b.best_epoch and a.curves[-1]["val_loss"] == b.curves[-1]["val_loss"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    np.testing.assert_array_equal(ra[1], rb[1])


def test_epoch_zero_is_the_fit_rows_mean_and_the_best_epoch_is_restored():
    x, yh, yn = synthetic(n=200)
    train, _ = split_indices(len(x), 0.2, 0)
    torch.manual_seed(0)
    pred = build("shadowllm", "plainact", DIMS, SMALL)
    res = fit(pred, x, yh, yn, train, default_recipe(epochs=6, lr=0.0, target_transform="none"))
    assert res.best_epoch == {"heads": 0, "neurons": 0}  # lr 0: no epoch improves on the start
    with torch.no_grad():
        h, n = pred(torch.from_numpy(x[:3]))
    np.testing.assert_allclose(h.numpy(), np.broadcast_to(yh[res.fit_rows].mean(0), h.shape), atol=1e-6)
    np.testing.assert_allclose(n.numpy(), np.broadcast_to(yn[res.fit_rows].mean(0), n.shape), atol=1e-6)

    torch.manual_seed(0)
    pred = build("shadowllm", "plainact", DIMS, SMALL)
    res = fit(pred, x, yh, yn, train, default_recipe(epochs=8))
    assert len(res.curves) == 9 and [r["epoch"] for r in res.curves] == list(range(9))
    for unit in ("heads", "neurons"):
        scores = [r[f"val_score_{unit}"] for r in res.curves]
        assert res.best_epoch[unit] == int(np.argmax(scores)) and res.best_score[unit] == max(scores)
    from pipeline.predictors.fit import evaluated, predict, selection_score

    ph, pn = predict(pred, x[res.select_rows])
    keep = evaluated(pred)
    assert selection_score(ph[:, keep], Spearman(yh[res.select_rows][:, keep])) == pytest.approx(
        res.best_score["heads"]
    )
    assert selection_score(pn[:, keep], Spearman(yn[res.select_rows][:, keep])) == pytest.approx(
        res.best_score["neurons"]
    )


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu"])
def test_ridge_is_the_closed_form_solution_on_the_predictor_input(kind):
    rng = np.random.default_rng(0)
    n, e = 60, 32  # more features than fit rows for ShadowLLM's input: the SVD form must still be exact
    feats = {
        "feat_l0": rng.normal(size=(n, e)).astype(np.float32),
        "feat_layers": rng.normal(size=(n, DIMS["n_layers"] * e)).astype(np.float32),
    }
    yh = rng.uniform(size=(n, DIMS["n_layers"], DIMS["n_heads"])).astype(np.float32)
    yn = rng.uniform(size=(n, DIMS["n_layers"], DIMS["ffn_dim"])).astype(np.float32)
    pred = build(kind, "plainact", DIMS, SMALL)
    x = pred.inputs(feats)
    fit_rows, sel_rows = np.arange(25), np.arange(25, 40)
    pred.set_standardisation(x[fit_rows])
    settings = default_recipe(target_transform="none", ridge_alphas=(0.5, 50.0))
    ridge = Ridge.fit(pred, x, yh, yn, FitResult([], {}, {}, fit_rows, sel_rows), settings)
    z = _features(pred, x)
    g = 1 if kind == "dejavu" else 0
    zf = z[fit_rows, g]
    mu = zf.mean(0)
    target = (yh[:, pred.layers].reshape(n, z.shape[1], -1))[fit_rows, g].astype(np.float64)
    a = ridge.alpha["heads"]
    w = np.linalg.solve((zf - mu).T @ (zf - mu) + a * np.eye(e), (zf - mu).T @ (target - target.mean(0)))
    want = (z[40:, g] - mu) @ w + target.mean(0)
    got = ridge.predict(x[40:])[0].reshape(20, z.shape[1], -1)[:, g]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert set(ridge.scores["heads"]) == {0.5, 50.0}
