"""A sweep's answer with its uncertainty and its cost: intervals on every number, paired tests against the best row,
the cheapest row statistically as good, and stability over redrawn splits (on codes in memory; the store route and
its measured costs are in test_sweep.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import cnncodes
from cnncodes import SweepConfig
from cnncodes.errors import ParameterError
from cnncodes.probing._stats import unpack_hits

N, K = 240, 3


@pytest.fixture(scope="module")
def codes():
    """Four arrays of one task: a strong wide one, a nearly as strong narrow one, a weak one and noise."""
    rng = np.random.default_rng(0)
    y = np.arange(N) % K
    centre = np.eye(K)[y]
    arrays = {
        "deep": np.hstack([2.2 * centre + rng.normal(size=(N, K)), rng.normal(size=(N, 13))]),
        "early": 2.1 * centre + rng.normal(size=(N, K)),
        "weak": 0.6 * centre + rng.normal(size=(N, K)),
        "noise": rng.normal(size=(N, 8)),
    }
    costs = {"deep": {"flops": 900}, "early": {"flops": 200}, "weak": {"flops": 100}, "noise": {"flops": 50}}
    return arrays, y, costs


@pytest.fixture(scope="module")
def result(codes):
    arrays, y, costs = codes
    return cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4), costs=costs)


def test_every_number_has_an_interval_around_it(result):
    for row in result.rows:
        for name in ("cv", "test_accuracy", "test_balanced_accuracy", "test_macro_f1"):
            value = row.cv_accuracy if name == "cv" else getattr(row, name)
            low, high = getattr(row, f"{name}_ci")
            assert 0 <= low <= value <= high <= 1, (row.tap, name, low, value, high)
    n = result.data["n_test_images"]
    for row in result.rows:  # Wilson at the row's own count of right answers
        hits = unpack_hits(row.test_hits, n)
        assert hits.mean() == pytest.approx(row.test_accuracy)
        expected = stats.binomtest(int(hits.sum()), n).proportion_ci(0.95, method="wilson")
        assert row.test_accuracy_ci == pytest.approx([expected.low, expected.high])


def test_cv_interval_is_the_corrected_resampled_t(result):
    """(1/k + n_val/n_fit) s^2 with k - 1 degrees of freedom, by hand from the row's folds."""
    row = result.best
    folds = np.asarray(row.cv_folds)
    k = len(folds)
    n_fit, n_val = result.data["fold_sizes"]
    assert n_fit + n_val == pytest.approx(result.data["n_train_images"])
    half = stats.t.ppf(0.975, k - 1) * np.sqrt((1 / k + n_val / n_fit) * folds.var(ddof=1))
    assert row.cv_accuracy == pytest.approx(folds.mean())
    assert row.cv_ci == pytest.approx([max(0, folds.mean() - half), min(1, folds.mean() + half)])


def test_paired_tests_against_the_best(result):
    n = result.data["n_test_images"]
    best = unpack_hits(result.best.test_hits, n)
    assert result.best.p_cv is None and result.best.p_test is None
    others = [r for r in result.rows if r is not result.best]
    for row in others:
        hits = unpack_hits(row.test_hits, n)
        b, c = int((best & ~hits).sum()), int((~best & hits).sum())
        expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
        assert row.p_test == pytest.approx(expected, rel=1e-12)  # exact McNemar is binomtest on discordant pairs
        # out of fold: every training image validated once; one-sided (the best is right more often)
        n_val = result.data["n_train_images"]
        oof_best, oof = unpack_hits(result.best.cv_hits, n_val), unpack_hits(row.cv_hits, n_val)
        b, c = int((oof_best & ~oof).sum()), int((~oof_best & oof).sum())
        expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
        assert row.p_cv_images == pytest.approx(expected, rel=1e-12)
        assert np.mean(oof) == pytest.approx(row.cv_accuracy, abs=1 / n_val)  # folds of near-equal size
        assert row.p_cv_holm >= row.p_cv and row.p_test_holm >= row.p_test
    by_tap = {r.tap: r for r in result.rows}
    assert by_tap["noise"].p_cv < 0.01 and by_tap["noise"].p_test_holm < 0.01  # chance level is worse, surely
    # Holm's step-down over the three rows tested
    raw = np.array([r.p_cv for r in others])
    order = np.argsort(raw)
    adjusted = np.maximum.accumulate(np.minimum(1, raw[order] * (len(raw) - np.arange(len(raw)))))
    assert [r.p_cv_holm for r in np.array(others)[order]] == pytest.approx(adjusted)


def test_cheapest_equal_row_and_the_pick(codes, result):
    """The narrow array is as good as the wide one on the folds and costs less; the weak and noise arrays cost less
    still but are significantly worse, so they are never the cheapest equal row."""
    assert result.best.tap == "deep" or result.best.tap == "early"
    cheap = result.cheapest
    assert cheap.tap == "early"
    assert cheap is result.best or min(cheap.p_cv, cheap.p_cv_images) >= 0.05
    assert result.chosen is result.best  # pick="best" by default
    arrays, y, costs = codes
    picked = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4, pick="cheapest"), costs=costs)
    assert picked.chosen.tap == "early" and picked.best.key == result.best.key
    early = arrays["early"][np.asarray(picked.test_predictions["sources"], dtype=int) * 1]
    assert np.array_equal(picked.estimator.predict(early), picked.test_predictions["predicted"])
    record = picked.best_record()
    assert record["tap"] == "early" and record["pick"] == "cheapest"
    assert record["best"]["tap"] == result.best.tap and record["cheapest"]["tap"] == "early"
    assert record["flops_speedup"] == pytest.approx(result.best.flops / 200)
    json.dumps(picked.to_dict())  # results.json-ready, with the selection and the statistics it used
    assert picked.to_dict()["selection"]["cheapest"]["flops"] == 200


@pytest.mark.slow
def test_tolerance_decides_instead_of_the_test(codes):
    arrays, y, costs = codes
    config = SweepConfig(probes=("logreg",), folds=4, pick="cheapest", tolerance=99.0)
    assert cnncodes.sweep_codes(arrays, y, config, costs=costs).chosen.tap == "noise"  # 99 points: anything goes
    tight = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4, pick="cheapest", tolerance=0.0),
                                 costs=costs)  # fmt: skip
    assert tight.chosen.key == tight.best.key


def test_cheapest_needs_costs_and_folds(codes):
    arrays, y, costs = codes
    with pytest.raises(ParameterError, match="FLOPs of every array"):
        cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4, pick="cheapest"))
    with pytest.raises(ParameterError, match="tolerance"):
        SweepConfig(pick="cheapest", val_size=0.2)
    with pytest.raises(ParameterError, match="costs\\['deep'\\]\\['flops'\\]"):
        cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4), costs={"deep": {"flops": -1}})
    with pytest.raises(ParameterError, match="pick='fastest'"):
        SweepConfig(pick="fastest")
    no_costs = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4))
    assert no_costs.cheapest is None and no_costs.chosen is no_costs.best
    assert "cheapest equal: unknown" in cnncodes.format_table(no_costs)


@pytest.mark.slow
def test_repeats_report_stability(codes):
    arrays, y, costs = codes
    result = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4, repeats=3), costs=costs)
    stable = result.data["stability"]
    assert stable["repeats"] == 3 and len(stable["best_by_repeat"]) == 3
    assert sum(r.p_best for r in result.rows) == pytest.approx(1.0)
    rank = stable["rank_correlation"]
    assert -1 <= rank["kendall_tau"] <= 1 and rank["pairs"] == 3
    for row in result.rows:
        assert row.test_accuracy_repeat_std >= 0
    single = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), folds=4), costs=costs)
    # the first draw is the sweep of seed 0: its rows and choice are unchanged by the redraws
    assert [r.cv_accuracy for r in single.rows] == [r.cv_accuracy for r in result.rows]
    assert "over 3 redrawn splits" in cnncodes.format_table(result)


@pytest.mark.slow
def test_wilson_covers_the_true_accuracy_of_the_probe():
    """Coverage with known truth: 1-d codes of two Gaussian classes, the probe a threshold whose population accuracy
    is exact (normal CDF). Over 200 seeded draws the sweep's 95 % test interval holds it 93 to 97 % of the time."""
    inside = 0
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        y = rng.integers(0, 2, 400)
        x = (y * 1.5 + rng.normal(size=400))[:, None]
        r = cnncodes.sweep_codes({"x": x}, y, SweepConfig(probes=("logreg",), folds=2, seed=seed, resamples=100))
        clf = r.estimator
        scale = clf.named_steps["normalize"]
        w = float(clf.named_steps["classify"].coef_.ravel()[0]) / float(scale.scale_[0])
        b = float(clf.named_steps["classify"].intercept_.ravel()[0]) - w * float(scale.mean_[0])
        t = -b / w  # predicts 1 above t when w > 0
        right1 = stats.norm.sf(t - 1.5) if w > 0 else stats.norm.cdf(t - 1.5)
        right0 = stats.norm.cdf(t) if w > 0 else stats.norm.sf(t)
        truth = 0.5 * (right0 + right1)
        low, high = r.best.test_accuracy_ci
        inside += low <= truth <= high
    assert 0.93 <= inside / 200 <= 0.97


@pytest.mark.slow
def test_baselines_stay_out_of_the_family_and_the_pick(codes):
    """kNN rows are tested against the best but neither adjusted with the rows that compete for it nor marked equal."""
    arrays, y, costs = codes
    result = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg", "knn"), folds=4), costs=costs)
    knn = [r for r in result.rows if r.protocol == "knn"]
    assert knn and all(r.p_test is not None and r.p_cv_holm is None and r.probe_bytes is None for r in knn)
    linear = [r for r in result.rows if r.selectable and r is not result.best]
    raw = np.array([r.p_cv for r in linear])
    order = np.argsort(raw)
    adjusted = np.maximum.accumulate(np.minimum(1, raw[order] * (len(raw) - np.arange(len(raw)))))
    assert [r.p_cv_holm for r in np.array(linear)[order]] == pytest.approx(adjusted)  # Holm over linear rows only
    assert result.cheapest.protocol == "linear"


@pytest.mark.slow
def test_one_validation_split_shows_no_row_equal_without_a_tolerance(codes):
    arrays, y, costs = codes
    result = cnncodes.sweep_codes(arrays, y, SweepConfig(probes=("logreg",), val_size=0.3), costs=costs)
    assert result.cheapest is None and result.chosen is result.best
    assert all(r.p_cv is None for r in result.rows)  # one fold: no paired t
    tolerant = SweepConfig(probes=("logreg",), val_size=0.3, pick="cheapest", tolerance=100.0 - 1e-9)
    assert cnncodes.sweep_codes(arrays, y, tolerant, costs=costs).chosen.tap == "noise"


def test_degenerate_evidence_gives_no_false_certainty():
    """Folds that all score 100 %: the CV interval is Wilson on the out-of-fold hits, not a point; every row scoring
    the same leaves no ranking to correlate (None in strict JSON, not NaN)."""
    y = np.arange(120) % 2
    x = (4.0 * y[:, None] + np.random.default_rng(0).normal(size=(120, 2)) * 0.1).astype(np.float32)
    result = cnncodes.sweep_codes({"a": x, "b": x + 1}, y, SweepConfig(probes=("logreg",), folds=3, repeats=2))
    row = result.best
    assert row.cv_accuracy == 1.0 and row.cv_ci[0] < 1.0 == row.cv_ci[1]
    n = result.data["n_train_images"]
    expected = stats.binomtest(n, n).proportion_ci(0.95, method="wilson")
    assert row.cv_ci == pytest.approx([expected.low, expected.high])
    assert result.data["stability"]["rank_correlation"]["kendall_tau"] is None
    json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert "no pair of draws ranked the rows" in cnncodes.format_table(result)


def test_costs_are_checked_and_reported_as_given(codes):
    arrays, y, _ = codes
    config = SweepConfig(probes=("logreg",), folds=4)
    with pytest.raises(ParameterError, match="not a dict of costs"):
        cnncodes.sweep_codes(arrays, y, config, costs={"deep": 3})
    with pytest.raises(ParameterError, match="unknown fields"):
        cnncodes.sweep_codes(arrays, y, config, costs={"deep": {"gflops": 3}})
    partial = {k: {"flops": 10, "latency_ms_batch1": 1.5} for k in arrays}  # no batch-64 figure
    table = cnncodes.format_table(cnncodes.sweep_codes(arrays, y, config, costs=partial))
    assert "1.5 ms/image at batch 1" in table and "at batch 64" not in table
