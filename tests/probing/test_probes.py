"""Probing without a store: probe pipelines, the sweep configuration, and the in-memory sweep against the store one."""

from __future__ import annotations

import numpy as np
import pytest

import cnncodes
from cnncodes.probing import SweepConfig, make_probe
from helpers import make_code_store


def _without_timings(rows):
    return [{k: v for k, v in r.to_dict().items() if k != "fit_seconds"} for r in rows]


@pytest.mark.slow
def test_the_in_memory_sweep_equals_the_store_sweep_on_the_same_codes(tmp_path):
    store = make_code_store(tmp_path / "s", n_images=90)
    from_store = cnncodes.sweep(store, SweepConfig(probes=("logreg", "sgd"), folds=3), progress=False)
    name = from_store.best.backbone  # a store sweep names every row's backbone; in memory, keys may carry one
    assert name == store.manifest["model"]["spec"]
    in_memory = cnncodes.sweep_codes(
        {(name, *k): np.asarray(store.codes(*k)) for k in store.keys()}, np.asarray(store.labels),
        SweepConfig(probes=("logreg", "sgd"), folds=3), classes=store.classes,
        depths={(name, a["tap"], a["pooling"]): a["depth"] for a in store.arrays},
    )  # fmt: skip
    assert _without_timings(in_memory.rows) == _without_timings(from_store.rows)
    assert in_memory.best.key == from_store.best.key
    assert (from_store.best.tap, from_store.best.pooling, from_store.best.probe) == ("mid", "avg", "logreg")
    np.testing.assert_array_equal(in_memory.test_predictions["scores"], from_store.test_predictions["scores"])


def test_string_labels_name_the_classes_and_keys_may_be_plain_names():
    rng = np.random.default_rng(1)
    names = np.array(["cat", "dog", "emu"])[np.arange(60) % 3]
    y = np.arange(60) % 3
    result = cnncodes.sweep_codes({"good": rng.normal(size=(60, 4)) + 2 * y[:, None], "bad": rng.normal(size=(60, 4))},
                                  names, SweepConfig(probes=("logreg",), folds=3))  # fmt: skip
    assert result.classes == ["cat", "dog", "emu"] and result.best.tap == "good" and result.best.pooling == ""


def test_separate_test_codes_are_used_once_for_the_final_numbers():
    rng = np.random.default_rng(2)
    y, y_test = np.arange(60) % 2, np.arange(20) % 2
    codes = {"a": rng.normal(size=(60, 3)) + 3 * y[:, None]}
    test = {"a": rng.normal(size=(20, 3)) + 3 * y_test[:, None]}
    result = cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg",), folds=3), test=test, test_labels=y_test)
    assert result.data["n_test_images"] == 20 and result.data["n_train_images"] == 60
    assert result.best.test_accuracy > 0.9


def test_bad_inputs_name_the_argument_and_what_is_allowed():
    y = np.arange(30) % 3
    with pytest.raises(cnncodes.ParameterError, match=r"unknown probe \['svm'\]; use any of"):
        cnncodes.sweep_codes({"a": np.zeros((30, 2))}, y, SweepConfig(probes=("svm",)))
    with pytest.raises(cnncodes.ParameterError, match=r"codes\['a'\] has shape \(29, 2\); expected \(30, dims\)"):
        cnncodes.sweep_codes({"a": np.zeros((29, 2))}, y)
    with pytest.raises(cnncodes.ParameterError, match="need 1e-12 <= c_min < c_max <= 1e12"):
        SweepConfig(c_min=10, c_max=1)
    with pytest.raises(cnncodes.ParameterError, match="test_labels given without test codes"):
        cnncodes.sweep_codes({"a": np.zeros((30, 2))}, y, test_labels=y)


def test_numpy_scalars_are_accepted_where_numbers_are():
    config = SweepConfig(c_min=np.float32(1e-3), c_max=np.float64(10.0), folds=np.int64(3), test_size=np.float32(0.3))
    assert isinstance(config.c_min, float) and config.c_min == pytest.approx(1e-3)


@pytest.mark.parametrize("normalizer", ["standard", "l2", "power", "none"])
@pytest.mark.parametrize("classifier", ["logreg", "linsvc", "sgd", "sgd-log"])
def test_every_probe_pipeline_fits_and_predicts(classifier, normalizer):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    X = 0.5 * rng.normal(size=(60, 5))
    X[np.arange(60), y] += 3  # one direction per class, so the l2/power normalizers keep the classes apart
    probe = make_probe(classifier, normalizer, C=1.0).fit(X, y)
    assert (probe.predict(X) == y).mean() > 0.8


def test_runaway_job_counts_and_c_ranges_are_refused():
    y = np.arange(30) % 3
    with pytest.raises(cnncodes.ParameterError, match="use 1 to 4096 workers"):
        cnncodes.sweep_codes({"a": np.zeros((30, 2))}, y, jobs=100000)
    for lo, hi in ((1e-300, 1e300), (1e-320, 1.0)):
        with pytest.raises(cnncodes.ParameterError, match="need 1e-12 <= c_min < c_max <= 1e12"):
            SweepConfig(c_min=lo, c_max=hi)
