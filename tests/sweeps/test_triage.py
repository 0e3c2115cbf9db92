"""Transferability scores in every sweep, checked against the measured CV accuracy; triage that searches only the
arrays the most trustworthy score ranks highest, never reading the test rows before its final numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import kendalltau

import cnncodes
from cnncodes import SweepConfig
from cnncodes.cli import main
from cnncodes.errors import ParameterError
from cnncodes.probing import split_images
from cnncodes.probing._transfer import array_scores, calibrate, log_error
from cnncodes.sweeps import write_report
from cnncodes.sweeps._report import summary_lines
from helpers import make_code_store, row_facts

N, K, ARRAYS = 240, 3, 10


def _graded(seed: int = 0, prefix: str = "a") -> dict[str, np.ndarray]:
    """Ten arrays of one task, their signal growing with the index, of varied widths."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % K
    centre = np.eye(K)[y]
    return {f"{prefix}{i}": np.hstack([(0.15 + 0.25 * i) * centre + rng.normal(size=(N, K)),
                                       rng.normal(size=(N, 2 + 3 * (i % 4)))]) for i in range(ARRAYS)}  # fmt: skip


Y = np.arange(N) % K
CONFIG = SweepConfig(probes=("logreg",), folds=3)


@pytest.fixture(scope="module")
def arrays():
    return _graded()


@pytest.fixture(scope="module")
def full(arrays):
    return cnncodes.sweep_codes(arrays, Y, CONFIG)


@pytest.mark.slow
def test_every_row_carries_its_arrays_scores_and_the_sweep_says_how_well_each_ranked(arrays, full):
    split = split_images(Y, 0, CONFIG)
    plain = split.train_rows
    folds = [(np.searchsorted(plain, f), np.searchsorted(plain, v)) for f, v in split.folds]
    for row in full.rows:  # the sweep's scores are the scores of the array's training images, on the sweep's folds
        direct = array_scores(arrays[row.tap][plain].astype(np.float32), Y[plain], folds, seed=CONFIG.seed)
        for name, (value, _) in direct.items():
            assert getattr(row, f"score_{name}") == pytest.approx(value, rel=1e-9)
    record = full.data["transferability"]
    measured = {t: max(r.cv_accuracy for r in full.rows if r.tap == t) for t in arrays}
    for name in ("knn", "logme", "hscore", "ridge"):
        score = {t: next(getattr(r, f"score_{name}") for r in full.rows if r.tap == t) for t in arrays}
        keys = list(arrays)
        tau = kendalltau([score[t] for t in keys], [measured[t] for t in keys]).statistic
        assert record[name]["kendall_tau"] == pytest.approx(tau) and record[name]["arrays"] == ARRAYS
        rank = 1 + sum(score[t] >= score[full.best.tap] for t in keys if t != full.best.tap)
        assert record[name]["best_rank"] == rank
        assert record[name]["best_in_top"] == {"1": rank <= 1, "3": rank <= 3, "5": rank <= 5}
        assert record[name]["seconds"] > 0 and record[name]["kendall_tau"] > 0.5  # graded arrays: an easy ranking
    assert any("scores against the measured CV" in line for line in summary_lines(full))


@pytest.mark.parametrize("triage", [3, 0.3, "auto"])
def test_triage_searches_the_top_of_the_trusted_score_and_reports_the_rest(arrays, full, triage):
    result = cnncodes.sweep_codes(arrays, Y, SweepConfig(probes=("logreg",), folds=3, triage=triage))
    record = result.data["triage"]
    searched = [a["tap"] for a in record["searched"]]
    skipped = [a["tap"] for a in record["skipped"]]
    assert sorted(searched + skipped) == sorted(arrays) and not set(searched) & set(skipped)
    assert {r.tap for r in result.rows} == set(searched), "only searched arrays have rows"
    assert skipped or triage == "auto"
    probe = [a["tap"] for a in record["probe_subset"]]
    assert set(probe) <= set(searched) and len(probe) == max(4, math.ceil(0.2 * ARRAYS))
    chosen = record["score"]
    measured = {t: max(r.cv_accuracy for r in full.rows if r.tap == t) for t in arrays}
    score = {t: next(getattr(r, f"score_{chosen}") for r in full.rows if r.tap == t) for t in arrays}
    ranked = sorted(arrays, key=lambda t: -score[t])
    loo = {n: t["loo_rmse"] for n, t in record["probe_trust"].items()}
    assert loo[chosen] == min(loo.values())  # trusted: the smallest leave-one-out error of its line on the probe
    if triage != "auto":  # its top K
        assert record["window"] == (3 if triage == 3 else math.ceil(0.3 * ARRAYS))
        assert set(searched) == set(probe) | set(ranked[: record["window"]])
    else:  # auto stops when no skipped array's 95 % bound reaches the best + 0.3 points, by the score of its last round
        last = record["rounds"][-1]
        assert last["could_hold_the_best"] == 0 and last["score"] == chosen
        assert last["best_cv"] == max(measured[t] for t in searched) == result.best.cv_accuracy
        fit = calibrate(chosen, score, {t: measured[t] for t in searched}, len(split_images(Y, 0, CONFIG).train_rows))
        target = log_error(last["best_cv"] + 0.003, fit.images)
        assert all(fit.upper(score[t], 0.95) < target for t in skipped)
        for a in record["skipped"]:
            assert a["predicted_cv"] == pytest.approx(1 - math.exp(-fit.predict(score[a["tap"]])) + 0.5 / fit.images)
    # the rows searched are the full sweep's rows, their test numbers read afterwards equal to those read at once
    by_key = {r.key: r for r in full.rows}
    for row in result.rows:
        assert row_facts(row, "fit_seconds", "p_cv", "p_cv_holm", "p_cv_images", "p_cv_images_holm", "p_test",
                         "p_test_holm") == row_facts(by_key[row.key], "fit_seconds", "p_cv", "p_cv_holm",
                                                     "p_cv_images", "p_cv_images_holm", "p_test", "p_test_holm")  # fmt: skip
    assert result.best.key == full.best.key  # graded arrays: the score's top holds the best
    assert (record["skipped_fit_seconds_estimate"] > 0) == bool(skipped) and record["score_seconds"] > 0
    np.testing.assert_array_equal(result.test_predictions["predicted"], full.test_predictions["predicted"])
    text = "\n".join(summary_lines(result))
    assert f"searched {len(searched)} of {ARRAYS} arrays" in text
    assert (f"skipped {len(skipped)}" in text) == bool(skipped)


class _Guarded:
    """Codes whose test rows raise until unlocked: what a triaged sweep may read before its final numbers."""

    def __init__(self, array: np.ndarray, test_rows: np.ndarray, lock: dict) -> None:
        self.array, self.test, self.lock = array, set(test_rows.tolist()), lock
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, index):
        rows = np.arange(len(self.array))[index]
        if self.lock["locked"] and self.test & set(np.atleast_1d(rows).tolist()):
            raise RuntimeError("a test row was read before the final numbers")
        return self.array[index]


@pytest.mark.slow
def test_a_triaged_sweep_reads_the_test_rows_only_for_its_final_numbers(arrays, full, monkeypatch):
    from cnncodes.probing import _search

    test_rows = split_images(Y, 0, CONFIG).test_rows
    lock = {"locked": True}
    guarded = {k: _Guarded(v, test_rows, lock) for k, v in arrays.items()}
    config = SweepConfig(probes=("logreg",), folds=3, triage="auto")
    with pytest.raises(RuntimeError, match="before the final numbers"):  # the lock holds: somebody must open it
        cnncodes.sweep_codes(guarded, Y, config)
    final = _search.score_on_test

    def unlock_then_score(*args, **kwargs):
        lock["locked"] = False
        return final(*args, **kwargs)

    monkeypatch.setattr(_search, "score_on_test", unlock_then_score)
    lock["locked"] = True
    result = cnncodes.sweep_codes(guarded, Y, config)
    assert result.best.key == full.best.key and not lock["locked"]


def test_several_backbones_are_triaged_in_one_ranking(arrays):
    weak = {
        ("weak", t, "avg"): v[:, :3] * 0.2 + np.random.default_rng(1).normal(size=(N, 3)) for t, v in arrays.items()
    }
    strong = {("strong", t, "avg"): v for t, v in arrays.items()}
    result = cnncodes.sweep_codes(weak | strong, Y, SweepConfig(probes=("logreg",), folds=3, triage=4))
    record = result.data["triage"]
    assert record["arrays"] == 2 * ARRAYS
    probe = {(a["backbone"], a["tap"]) for a in record["probe_subset"]}
    top = {a["backbone"] for a in record["searched"] if (a["backbone"], a["tap"]) not in probe}
    assert top == {"strong"}, "the window runs over one ranking of every (backbone, tap, pooling)"
    assert {a["backbone"] for a in record["skipped"]} == {"weak", "strong"}
    assert result.best.backbone == "strong"


@pytest.mark.slow
def test_triage_and_scores_are_checked(arrays):
    for bad, match in ((0, "at least one array"), (1.5, "in \\(0, 1\\)"), ("many", "--triage auto"),
                       (True, "--triage 8")):  # fmt: skip
        with pytest.raises(ParameterError, match=match):
            SweepConfig(triage=bad)
    with pytest.raises(ParameterError, match="scores=\\(\\) measures none"):
        SweepConfig(triage="auto", scores=())
    with pytest.raises(ParameterError, match="unknown score 'leep'"):
        SweepConfig(scores=("knn", "leep"))
    assert SweepConfig(triage="8").triage == 8 and SweepConfig(triage="0.25").triage == 0.25
    none = cnncodes.sweep_codes(arrays, Y, SweepConfig(probes=("logreg",), folds=3, scores=()))
    assert "transferability" not in none.data and all(r.score_knn is None for r in none.rows)
    multi = np.stack([Y == 0, Y != 1], 1).astype(int)
    with pytest.raises(ParameterError, match="multi-label sweep searches every array"):
        cnncodes.sweep_codes(arrays, multi, SweepConfig(probes=("logreg",), folds=3, triage=2), classes=["a", "b"])


@pytest.mark.slow
def test_store_sweep_writes_the_scores_plot_and_the_triage_through_the_cli(tmp_path, capsys):
    store = make_code_store(tmp_path / "s")
    assert main([
        "sweep", str(store.path), "--out", str(tmp_path / "out"), "--probes", "logreg", "--folds", "3", "--triage",
        "2", "--quiet", "--no-latency",
    ]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "triage (2): searched" in out and (tmp_path / "out" / "scores.png").stat().st_size > 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["data"]["triage"]["rule"].startswith("Scores first") and "knn" in data["data"]["transferability"]
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"score_knn", "score_logme", "score_hscore", "score_ridge"} <= set(header)
    assert main(["sweep", str(store.path), "--out", str(tmp_path / "o2"), "--triage", "lots"]) == 2
    assert "--triage" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_a_triaged_sweep_round_trips(arrays, tmp_path):
    result = cnncodes.sweep_codes(arrays, Y, SweepConfig(probes=("logreg",), folds=3, triage=2))
    paths = write_report(result, tmp_path)
    assert "scores.png" in paths
    saved = json.loads(paths["results.json"].read_text())
    assert len(saved["rows"]) == len(result.rows) and saved["data"]["triage"]["window"] == 2
    assert all(r["score_logme"] is not None for r in saved["rows"])


def _replay(measured: dict, values: dict, images: int, tolerance=None):
    """triaged_search on arrays whose CV accuracies are known: ``search`` returns rows with those accuracies."""
    from cnncodes.probing._results import SweepRow
    from cnncodes.probing._triage import triaged_search

    keys = list(measured)
    searched: list[list] = []

    def search(part):
        searched.append(list(part))
        return [(SweepRow(tap=k, pooling="avg", depth=0, dims=16, normalizer="standard", probe="logreg",
                          solver="path", C=1.0, C_at_edge=False, n_fits=1, cv_accuracy=measured[k], cv_std=0.0,
                          test_accuracy=0.0, test_balanced_accuracy=0.0, test_macro_f1=0.0, fit_seconds=1.0), None)
                 for k in part]  # fmt: skip

    config = SweepConfig(triage="auto", scores=tuple(values), tolerance=tolerance)
    scored = {k: {name: (v[k], 0.0) for name, v in values.items()} for k in keys}
    results, record = triaged_search(keys, {k: ("", k, "avg") for k in keys}, dict.fromkeys(keys, 16), scored,
                                     search, config, images)  # fmt: skip
    return max(r.cv_accuracy for r, _ in results), record, searched


def test_auto_rarely_misses_the_best_on_stores_of_known_truth_and_skips_most_of_them():
    """A simulation with known truth: 30 arrays of 26-99 % accuracy, a ridge-like score (its log-error off by 0.15
    sd and a bias), a kNN-like one (0.4 sd) and a LogME-like one on another scale. Over 100 stores the best found
    is within 0.3 points of the true best in at least 95 %, and well under half the arrays are searched."""
    rng, images, misses, share = np.random.default_rng(0), 1347, 0, []
    for _ in range(100):
        u = rng.uniform(0.3, 4.3, size=30)
        keys = [f"a{i}" for i in range(30)]
        acc = np.clip(1 + 0.5 / images - np.exp(-u) + rng.normal(0, 0.002, 30), 0, 1)
        values = {"ridge": 1 + 0.5 / images - np.exp(-(u - 0.2 + rng.normal(0, 0.15, 30))),
                  "knn": 1 + 0.5 / images - np.exp(-(0.8 * u + rng.normal(0, 0.4, 30))),
                  "logme": 0.3 * u + rng.normal(0, 0.3, 30)}  # fmt: skip
        found, record, rounds = _replay(dict(zip(keys, acc)), {n: dict(zip(keys, v)) for n, v in values.items()},
                                        images)  # fmt: skip
        misses += found < acc.max() - 0.003
        share.append(len(record["searched"]) / 30)
        assert [len(r) for r in rounds[1:]] == [min(2, len(r)) for r in rounds[1:]] and all(len(r) for r in rounds)
        assert record["rounds"][-1]["could_hold_the_best"] == 0 and record["window"] is None
        for a in record["skipped"]:
            assert 0 <= a["predicted_cv"] <= 1
    assert misses <= 5 and np.mean(share) < 0.5


def test_auto_stops_at_a_perfect_best_and_searches_everything_without_a_calibration():
    keys = [f"a{i}" for i in range(10)]
    perfect = dict(zip(keys, [1.0] + [0.9] * 9))
    score = {"knn": dict(zip(keys, np.linspace(1, 0.5, 10)))}
    _, record, rounds = _replay(perfect, score, 500, tolerance=0.0)
    assert len(rounds) == 1 and record["rounds"][-1]["could_hold_the_best"] == 0  # the probe subset found 100 %
    unscored = {"knn": dict.fromkeys(keys)}  # no score to calibrate: every array is searched
    _, record, _ = _replay(dict(zip(keys, np.linspace(0.5, 0.9, 10))), unscored, 500)
    assert not record["skipped"]


def test_a_predicted_accuracy_far_outside_the_calibration_stays_an_accuracy():
    """A skipped array's predicted CV accuracy (results.json) from a line extrapolated far past the arrays it was
    fitted on: at the floor or 1, never an overflow (found on the patches benchmark, where the H-score's line was steep)."""
    from cnncodes.probing._transfer import calibrate
    from cnncodes.probing._triage import _predicted

    fit = calibrate("hscore", {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.5, "b": 0.9, "c": 0.99}, 1000)
    assert fit is not None and fit.slope > 0
    assert (
        _predicted(fit, -1e4) == pytest.approx(0.5 / 1000) and _predicted(fit, 1e4) == 1.0
    )  # half an image: the floor
    assert 0.5 < _predicted(fit, 2.0) < 0.99 and _predicted(fit, None) is None
