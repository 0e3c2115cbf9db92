"""Transferability scores against independent references: LogME against the Gaussian marginal likelihood (scipy) at
its maximum (scipy.optimize), the H-score against scikit-learn's Ledoit-Wolf covariance, the kNN score against
scikit-learn's KNeighborsClassifier; narrow and wide codes (the two Gram routes); ridge against scikit-learn's RidgeClassifier; the triage calibration against scipy and by simulation."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import kendalltau, multivariate_normal, weightedtau
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import RidgeClassifier
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from cnncodes.errors import ParameterError
from cnncodes.probing import _transfer
from cnncodes.probing._transfer import (
    RIDGE_GRID,
    agreement,
    array_scores,
    calibrate,
    hscore,
    knn_accuracy,
    ledoit_wolf_shrinkage,
    log_error,
    logme,
    probe_subset,
    ridge_accuracy,
    rows_within,
    subsample,
)


def _data(n, d, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.normal(size=(n, d)) + 0.8 * np.eye(classes, d)[y] * 3
    return X, y


def _evidence(F, t, alpha, beta):
    """log p(t | F, alpha, beta), t ~ N(0, FF'/alpha + I/beta): the closed form LogME maximizes, computed directly."""
    n = len(t)
    return multivariate_normal(np.zeros(n), F @ F.T / alpha + np.eye(n) / beta).logpdf(t)


@pytest.mark.parametrize("n,d", [(12, 3), (8, 20)], ids=["narrow", "wide"])
def test_logme_is_the_maximum_evidence_of_the_closed_form(n, d):
    """A tiny worked case: per class, the maximum over (alpha, beta) of the Gaussian marginal likelihood, found by
    scipy's optimizer on the closed form, divided by n and averaged over the one-hot targets, equals LogME to 1e-6."""
    F, y = _data(n, d)
    per_class = []
    for c in range(3):
        t = (y == c).astype(float)
        fit = minimize(lambda p: -_evidence(F, t, math.exp(p[0]), math.exp(p[1])), x0=[0.0, 0.0],  # noqa: B023
                       method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})  # fmt: skip
        per_class.append(-fit.fun / n)
    assert logme(F, y) == pytest.approx(np.mean(per_class), abs=1e-6)


def test_logme_of_a_multilabel_matrix_averages_its_columns():
    F, y = _data(15, 4)
    Y = np.stack([y == 0, y != 2], 1).astype(int)
    cols = [logme(F, Y[:, [j]]) for j in range(2)]
    assert logme(F, Y) == pytest.approx(np.mean(cols), rel=1e-9)


def _hscore_direct(X, y):
    """tr(cov_a^-1 (1 - a) cov(E[f|y])) with scikit-learn's Ledoit-Wolf estimate and the class means."""
    lw = LedoitWolf().fit(X)
    Xc = X - X.mean(0)
    between = sum((y == c).mean() * np.outer(Xc[y == c].mean(0), Xc[y == c].mean(0)) for c in np.unique(y))
    return (1 - lw.shrinkage_) * np.trace(np.linalg.solve(lw.covariance_, between)), lw.shrinkage_


@pytest.mark.parametrize("n,d", [(40, 6), (15, 50)], ids=["narrow", "wide"])
def test_hscore_equals_the_formula_with_sklearns_ledoit_wolf(n, d):
    X, y = _data(n, d, seed=1)
    expected, shrink = _hscore_direct(X, y)
    Xc = X - X.mean(0)
    lam = np.linalg.eigvalsh(Xc.T @ Xc if d <= n else Xc @ Xc.T)
    import torch

    assert ledoit_wolf_shrinkage(torch.tensor((Xc**2).sum(1)), float((lam**2).sum()), n, d) == pytest.approx(
        shrink, rel=1e-9
    )
    assert hscore(X, y) == pytest.approx(expected, rel=1e-8)
    # the factorization and the eigendecomposition are the same number
    assert hscore(X, y, route="solve") == pytest.approx(hscore(X, y, route="eig"), rel=1e-10)


def test_knn_accuracy_equals_sklearns_cosine_neighbours_pooled_over_the_folds():
    X, y = _data(90, 7, seed=2)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    best = 0.0
    for k in (10, 20, 50):  # 100 exceeds the 60 fit images of a fold
        right = sum(int((KNeighborsClassifier(k, metric="cosine", algorithm="brute").fit(X[f], y[f]).predict(X[v])
                         == y[v]).sum()) for f, v in folds)  # fmt: skip
        best = max(best, right / len(y))
    assert knn_accuracy(X, y, folds) == pytest.approx(best, abs=1e-12)
    # a cap on queries draws evenly from the folds, seeded
    capped = knn_accuracy(X, y, folds, max_queries=30, seed=3)
    assert capped == knn_accuracy(X, y, folds, max_queries=30, seed=3) and 0 <= capped <= 1


def test_array_scores_rank_informative_codes_above_noise_and_time_themselves():
    X, y = _data(60, 5, seed=4)
    noise = np.random.default_rng(5).normal(size=X.shape)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    good, bad = array_scores(X, y, folds), array_scores(noise, y, folds)
    for name in ("knn", "logme", "hscore", "ridge"):
        assert good[name][0] > bad[name][0] and good[name][1] >= 0
    multi = array_scores(X, np.stack([y == 0, y == 1], 1).astype(int), folds)
    assert multi["knn"][0] is None and multi["hscore"][0] is None and multi["ridge"][0] is None
    assert multi["logme"][0] is not None


@pytest.mark.parametrize("n,d,offset", [(300, 40, 3), (120, 700, 3), (300, 40, 60), (120, 700, 60)],
                         ids=["narrow", "wide", "narrow-far", "wide-far"])  # fmt: skip
def test_float32_codes_score_as_their_float64_copies(n, d, offset):
    """A store's float16/float32 codes take their Gram products in float32: every score equals the float64 route's
    on the same (float16-rounded) values, the accuracies to an image, LogME and the H-score to 1e-5 relative, also
    where the codes' mean is far from zero against their spread (a float32 X'X less n m m' would cancel there)."""
    rng = np.random.default_rng(7)
    y = np.arange(n) % 4
    X = (rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(4, d))[y] + offset).astype(np.float16)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    low, high = array_scores(X.astype(np.float32), y, folds), array_scores(X.astype(np.float64), y, folds)
    for name in ("knn", "ridge"):
        assert abs(low[name][0] - high[name][0]) <= 1.5 / n
    for name in ("logme", "hscore"):
        assert low[name][0] == pytest.approx(high[name][0], rel=1e-5)
    assert logme(X, y) == pytest.approx(logme(X.astype(np.float64), y), rel=1e-5)
    for route in ("solve", "eig"):
        assert hscore(X, y, route=route) == pytest.approx(hscore(X.astype(np.float64), y, route=route), rel=1e-5)


def test_scores_under_a_memory_cap_read_a_stratified_sample_of_the_rows_that_fits(tmp_path, monkeypatch):
    import tracemalloc

    import torch

    from cnncodes import SweepConfig, sweep
    from helpers import make_code_store

    n, d, cap = 3000, 512, 8 * 2**20
    m = rows_within(n, d, cap)
    assert 0 < m < n and rows_within(n, d, None) == n and rows_within(n, 4, 2**40) == n
    assert rows_within(m + 1, d, cap) == m  # the largest that fits
    y = np.repeat([0, 1, 2], [2000, 990, 10])
    folds = [(np.flatnonzero(np.arange(n) % 3 != f), np.flatnonzero(np.arange(n) % 3 == f)) for f in range(3)]
    keep, sub = subsample(y, folds, 300, seed=0)
    assert np.array_equal(np.unique(y[keep], return_counts=True)[1], [199, 99, 1])  # in proportion, none lost
    many = np.repeat(np.arange(100), 3)  # more classes than a proportional share gives each
    assert len(subsample(many, [(np.arange(300), np.arange(0))], 250, seed=0)[0]) <= 250  # never past the size
    for (fit, val), (f, v) in zip(folds, sub):  # the same images on the same side of each fold
        assert np.array_equal(keep[f], np.intersect1d(fit, keep)) and np.array_equal(keep[v], np.intersect1d(val, keep))
    X = np.random.default_rng(0).normal(size=(m, d))
    torch.set_num_threads(1)
    tracemalloc.start()  # numpy's buffers; torch's are not traced, so the float64 copies are counted by hand below
    array_scores(X.astype(np.float32), np.arange(m) % 3, [(np.arange(m)[m // 2 :], np.arange(m)[: m // 2])])
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert numpy_peak + 8 * (2 * m * d + 3 * min(m, d) ** 2) + 4 * (2 * m * d + min(m, d) ** 2) <= cap  # + float32
    store = make_code_store(tmp_path / "codes", n_images=400, dims={"early": 4, "mid": 256, "late": 4})
    result = sweep(store, SweepConfig(probes=("logreg",), folds=2, max_memory=4 * 2**20), taps=["mid", "late"],
                   progress=False)  # fmt: skip
    train, classes = result.data["n_train_images"], len(np.unique(store.labels))
    sample = result.data["transferability"]["sample"]  # one sample for every array, the widest's under the cap
    assert 0 < sample["images"] <= rows_within(train, 256, 4 * 2**20) < train and sample["of"] == train
    assert all(r.score_logme is not None for r in result.rows)
    for cap, read in ((120, 120), (2, 10 * classes)):  # --score-images, with its floor of 10 images a class
        capped = sweep(store, SweepConfig(probes=("logreg",), folds=2, score_images=cap), taps=["late"], progress=False)
        assert capped.data["transferability"]["sample"] == {"images": read, "of": train, "score_images": cap}
        assert all(r.score_knn is not None for r in capped.rows)
    monkeypatch.setattr(_transfer, "SCORE_BUDGET", 100)  # "auto" on a budget small enough to bind at 300 images
    auto = sweep(store, SweepConfig(probes=("logreg",), folds=2), taps=["mid", "late"], progress=False)
    cap = _transfer.images_within(train, 256, train)  # the widest array's: both arrays read the same images
    assert cap < train and cap - classes <= auto.data["transferability"]["sample"]["images"] <= cap
    assert _transfer.images_within(train, 4, train) == train  # the 4-dim array alone would read every image
    whole = sweep(store, SweepConfig(probes=("logreg",), folds=2, score_images=None), taps=["mid"], progress=False)
    assert whole.data["transferability"]["sample"]["images"] == train


def test_images_within_is_the_largest_sample_whose_cost_fits_the_budget():
    for n, d, rows in ((1347, 20480, 6735), (2250, 20480, 2250), (2250, 640, 2250), (2250, 96, 2250), (500, 2000, 500),
                       (37_500, 20_480, 37_500), (300, 700, 300)):  # fmt: skip
        budget = _transfer.SCORE_BUDGET * rows
        m = _transfer.images_within(n, d, rows)
        assert 1 <= m <= n and m * min(m, d) <= budget and (m == n or (m + 1) * min(m + 1, d) > budget)
    assert _transfer.images_within(1347, 20480, 6735) == 1347  # the digits benchmark: every image


def test_agreement_is_scipys_taus_and_counts_ties_against_the_best():
    measured = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5}
    score = {"a": 3.0, "b": 5.0, "c": 3.0, "d": 1.0, "e": None}
    out = agreement(score, measured, "a")
    s, m = [5.0, 3.0, 3.0, 1.0], [0.8, 0.9, 0.7, 0.6]
    assert out["kendall_tau"] == pytest.approx(kendalltau(s, m).statistic)
    assert out["weighted_tau"] == pytest.approx(weightedtau(s, m).statistic)
    assert out["arrays"] == 4 and out["best_rank"] == 3  # b ahead, c tied: counted against it
    assert out["best_in_top"] == {"1": False, "3": True, "5": True}


def test_probe_subset_spans_the_ranking():
    order = list(range(30))
    assert probe_subset(order, 6) == [0, 5, 10, 15, 20, 25]  # one per stratum of the ranking, its top included
    cost = {k: (k * 7) % 5 for k in order}
    cheap = probe_subset(order, 6, cost)
    assert [c // 5 for c in cheap] == list(range(6)) and all(cost[c] == 0 for c in cheap)


@pytest.mark.parametrize("n,d", [(90, 7), (40, 120)], ids=["narrow", "wide"])
def test_ridge_accuracy_equals_sklearns_ridge_classifier_on_each_fold(n, d):
    """Both closed forms (the hat matrix's leave-fold-out identity, and one eigendecomposition per fold) against
    scikit-learn's RidgeClassifier fit on each fold's fit images of the standardized codes, pooled, the best penalty of the grid; a constant
    feature and an offset included."""
    X, y = _data(n, d, seed=6)
    X = X + 5.0
    X[:, 1] = 3.0
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    sd = X.std(0)
    Z = (X - X.mean(0)) / np.where(sd > 1e-9, sd, 1.0)  # standardized over every image, as the score reads them
    unit = np.linalg.eigvalsh(Z.T @ Z).clip(0).sum() / min(n, d)
    per_penalty = [sum(int((RidgeClassifier(alpha=t * unit).fit(Z[f], y[f]).predict(Z[v]) == y[v]).sum())
                       for f, v in folds) / n for t in RIDGE_GRID]  # fmt: skip
    assert len(set(per_penalty)) > 1  # the penalty matters here: the best of the grid is a real choice
    for route in ("hat", "folds"):
        assert ridge_accuracy(X, y, folds, route=route) == pytest.approx(max(per_penalty), abs=1e-12), route
    assert array_scores(X, y, folds, ("ridge",))["ridge"][0] == pytest.approx(max(per_penalty), abs=1e-12)
    assert array_scores(X, y, folds)["ridge"][0] == pytest.approx(max(per_penalty), abs=1e-12)  # with the others


def test_calibration_is_the_least_squares_line_and_its_bound_covers_95_percent():
    """The line on the log-error scale equals scipy's linregress; its one-sided 95 % prediction bound, checked by
    simulation with a known line and noise: a new array lies below it in 95 % of draws."""
    from scipy.stats import linregress

    images = 2000
    acc = dict(enumerate([0.62, 0.71, 0.80, 0.90, 0.95, 0.975]))
    knn = {k: a - 0.03 for k, a in acc.items()}
    fit = calibrate("knn", knn, acc, images)
    line = linregress(log_error(list(knn.values()), images), log_error(list(acc.values()), images))
    assert fit.slope == pytest.approx(line.slope) and fit.intercept == pytest.approx(line.intercept)
    assert fit.dof == 4 and fit.arrays == 6
    assert calibrate("knn", {0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6}, images) is None  # two arrays: no line
    backwards = calibrate("logme", {k: -v for k, v in knn.items()}, acc, images)
    assert backwards.slope == 0 and backwards.dof == 5  # a score that ranks backwards predicts nothing
    rng, covered, draws = np.random.default_rng(3), 0, 4000
    for _ in range(draws):
        x = rng.uniform(0, 3, size=7)
        u = 0.5 + 1.2 * x + rng.normal(0, 0.4, size=7)  # u = log-error accuracy; the last is the array left out
        values, measured = dict(enumerate(x[:6])), dict(enumerate(1 + 0.5 / 10**6 - np.exp(-u[:6])))
        f = calibrate("logme", values, measured, 10**6)  # a million images: the noise floor is negligible
        covered += u[6] <= f.upper(x[6], 0.95)
    assert 0.94 <= covered / draws <= 0.96


def test_ridge_of_constant_codes_is_the_commonest_class_and_multilabel_is_refused():
    y = np.array([0, 0, 1, 2] * 10)
    folds = list(StratifiedKFold(2, shuffle=True, random_state=0).split(y, y))
    for d in (3, 60):  # narrow and wide: no direction to fit, so each fold predicts its commonest fit class
        expected = sum(int((y[v] == np.bincount(y[f]).argmax()).sum()) for f, v in folds) / len(y)
        for route in ("hat", "folds"):
            assert ridge_accuracy(np.full((40, d), 2.5), y, folds, route=route) == expected
    with pytest.raises(ParameterError, match="multi-label store has LogME only"):
        ridge_accuracy(np.ones((40, 3)), np.stack([y == 0, y == 1], 1), folds)


def test_score_images_is_checked_by_name_in_the_config_and_on_the_command_line(capsys):
    from cnncodes import SweepConfig
    from cnncodes.cli import main

    assert SweepConfig(score_images="ALL").score_images is None and SweepConfig().score_images == "auto"
    assert type(SweepConfig(score_images=np.int64(500)).score_images) is int  # JSON-safe in results.json
    for bad in (1, 1.5, True, "some"):
        with pytest.raises(ParameterError, match=r"score_images=.*--score-images auto\|all\|1000"):
            SweepConfig(score_images=bad)
    assert main(["sweep", "codes", "--score-images", "few"]) == 2
    assert "--score-images: 'few' is not auto, all or a number of images >= 2" in capsys.readouterr().err
    assert main(["sweep", "codes", "--score-images", "1"]) == 2
    assert "--score-images: '1' is not auto" in capsys.readouterr().err
