"""Sweeps: honest protocol, output files, views without leakage, joblib backends, out-of-core under a memory cap."""

import json
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest

from cnncodes.cli import main
from cnncodes.deploy import read_bundle
from cnncodes.probing import SweepConfig
from cnncodes.sweeps import format_table, make_split, sweep, write_report
from helpers import TESTS, make_code_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_code_store(tmp_path_factory.mktemp("codes") / "s")


@pytest.mark.slow
def test_sweep_picks_the_informative_tap_by_cv_only(store):
    result = sweep(store, SweepConfig(probes=("logreg", "linsvc"), folds=3), progress=False)
    assert len(result.rows) == 3 * 2
    assert result.best.tap == "mid" and result.best.test_accuracy > 0.9
    late = [r for r in result.rows if r.tap == "late"]
    assert all(r.cv_accuracy < 0.6 for r in late), "an uninformative tap must not look good"
    for r in result.rows:
        assert r.C > 0 and r.n_fits >= 3 * 4 and r.fit_seconds >= 0
    best = max(result.rows, key=lambda r: (r.cv_accuracy, -r.dims))
    assert (best.tap, best.probe) == (result.best.tap, result.best.probe)
    assert "* mid" in format_table(result)


def test_split_is_stratified_by_image_and_test_is_disjoint(store):
    split = make_split(store, config=SweepConfig(folds=4, test_size=0.25, seed=3))
    test_images = set(split.test_rows.tolist())
    assert not test_images & set(split.train_rows.tolist())
    assert len(split.test_rows) == round(0.25 * store.rows) or abs(len(split.test_rows) - 0.25 * store.rows) <= 1
    for fit_rows, val_rows in split.folds:
        assert not set(fit_rows.tolist()) & set(val_rows.tolist())
        assert set(fit_rows.tolist()) | set(val_rows.tolist()) == set(split.train_rows.tolist())


def test_views_never_straddle_folds_and_tta_is_reported(tmp_path):
    store = make_code_store(tmp_path / "v", n_images=90, views=2)
    split = make_split(store, config=SweepConfig(folds=3))
    groups = store.groups
    for fit_rows, val_rows in split.folds:
        assert not set(groups[fit_rows]) & set(groups[val_rows]), "an image's views leaked across folds"
        assert (store.view_index[val_rows] == 0).all() and set(store.view_index[fit_rows]) == {0, 1, 2}
    result = sweep(store, SweepConfig(probes=("logreg",), folds=3), progress=False)
    assert all(r.test_tta_accuracy is not None for r in result.rows)
    assert len(result.test_predictions["sources"]) == len(split.test_rows) // 3


@pytest.mark.slow
def test_report_files_and_bundle_round_trip(store, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    result = sweep(store, SweepConfig(probes=("logreg",), folds=3), progress=False)
    previous = matplotlib.get_backend()
    plt.switch_backend("pdf")  # a caller's own backend, e.g. a notebook's
    try:
        paths = write_report(result, tmp_path)
        assert matplotlib.get_backend() == "pdf", "writing a report switched the caller's matplotlib backend"
        assert plt.get_fignums() == [], "writing a report left figures open in the caller's session"
    finally:
        plt.switch_backend(previous)
    for name in ("results.csv", "results.json", "best.json", "sweep.png", "test_predictions.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    best = json.loads((tmp_path / "best.json").read_text())
    assert {"tap", "pooling", "probe", "C", "cv_accuracy", "test_accuracy"} <= set(best)
    assert len((tmp_path / "results.csv").read_text().strip().splitlines()) == 1 + len(result.rows)
    from cnncodes.deploy import save_probe

    bundle = read_bundle(save_probe(result, tmp_path))
    rows = [store.sources.index(s) for s in result.test_predictions["sources"]]
    X = np.asarray(store.codes(result.best.tap, result.best.pooling))[rows]
    np.testing.assert_array_equal(bundle.predict_codes(X), result.test_predictions["predicted"])
    np.testing.assert_allclose(
        bundle.decision_function_codes(X), result.test_predictions["scores"], rtol=1e-5, atol=1e-5
    )
    assert paths["sweep.png"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_any_joblib_backend_gives_the_same_result(store):
    local = sweep(store, SweepConfig(probes=("logreg",), folds=3), progress=False)
    with joblib.parallel_config(backend="threading", n_jobs=2):
        threaded = sweep(store, SweepConfig(probes=("logreg",), folds=3), jobs=2, progress=False)
    assert [r.C for r in local.rows] == [r.C for r in threaded.rows]
    assert local.best.tap == threaded.best.tap


@pytest.mark.slow
def test_cli_sweep_writes_everything(store, tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                str(store.path),
                "--out",
                str(tmp_path),
                "--probes",
                "logreg,sgd",
                "--folds",
                "3",
                "--jobs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "best: mid" in out
    assert {"results.csv", "best.json", "sweep.png", "best_probe.zip"} <= {p.name for p in tmp_path.iterdir()}


def test_errors_say_what_to_change(store, tmp_path):
    with pytest.raises(ValueError, match="lower --folds"):
        make_split(store, config=SweepConfig(folds=60))
    with pytest.raises(ValueError, match="unknown probe"):
        sweep(store, SweepConfig(probes=("svm",)), progress=False)


OOC_SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, {tests!r})
import numpy as np
from helpers import make_code_store
from cnncodes.probing import SweepConfig
from cnncodes.sweeps import sweep
store = make_code_store({path!r}, n_images=3000, dims={{"early": 4, "mid": 2048, "late": 4}})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = sweep(store, SweepConfig(probes=("linsvc",), folds=3, max_memory={cap}), taps=["mid"], progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grew_kib": peak - base, "solver": result.rows[0].solver, "acc": result.best.test_accuracy}}))
"""


@pytest.mark.slow
def test_out_of_core_fit_stays_under_its_memory_cap(tmp_path):
    array_mib = 3000 * 2048 * 4 / 2**20  # 23 MiB of float32 codes for the 'mid' tap
    cap = 4 * 2**20
    tests = str(TESTS)
    # make the store first in its own process so its creation does not count towards the peak
    out = subprocess.run([sys.executable, "-c", OOC_SCRIPT.format(tests=tests, path=str(tmp_path / "big"), cap=cap)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    streamed = json.loads(out.stdout.strip().splitlines()[-1])
    assert streamed["solver"] == "sgd-stream" and streamed["acc"] > 0.9
    grew_mib = streamed["grew_kib"] / 1024
    assert grew_mib < array_mib / 2, f"out-of-core fit grew resident memory by {grew_mib:.1f} MiB"


def _without_timings(rows):
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]


@pytest.mark.slow
def test_sweep_on_a_dask_local_cluster_equals_the_local_sweep(store, tmp_path):
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    args = ["--probes", "logreg,linsvc,sgd", "--folds", "3", "--jobs", "2", "--quiet"]
    assert main(["sweep", str(store.path), "--out", str(tmp_path / "local"), *args]) == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:  # fmt: skip
        assert main(["sweep", str(store.path), "--out", str(tmp_path / "dask"), "--backend", "dask",
                     "--scheduler", cluster.scheduler_address, *args]) == 0  # fmt: skip
        with distributed.Client(cluster), joblib.parallel_config(backend="dask"):  # the Python API route
            api = sweep(store, SweepConfig(probes=("logreg", "linsvc", "sgd"), folds=3), jobs=2, progress=False)
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    on_dask = json.loads((tmp_path / "dask" / "results.json").read_text())
    assert (tmp_path / "dask" / "best.json").read_bytes() == (tmp_path / "local" / "best.json").read_bytes()
    assert _without_timings(on_dask["rows"]) == _without_timings(local["rows"])
    assert _without_timings(api.to_dict()["rows"]) == _without_timings(local["rows"])
    assert (tmp_path / "dask" / "test_predictions.csv").read_text() == (
        tmp_path / "local" / "test_predictions.csv"
    ).read_text()


@pytest.mark.slow
def test_dask_backend_errors_say_what_to_do(store, tmp_path, capsys):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    import dask

    with pytest.raises(ValueError, match="needs backend='dask'"):
        sweep(store, scheduler="tcp://127.0.0.1:1", progress=False)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert (
            main(
                [
                    "sweep",
                    str(store.path),
                    "--out",
                    str(tmp_path),
                    "--backend",
                    "dask",
                    "--scheduler",
                    "tcp://127.0.0.1:9",
                    "--quiet",
                ]
            )
            == 2
        )
    assert "cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'" in capsys.readouterr().err


@pytest.mark.slow
def test_top5_accuracy_per_class_recall_and_the_confusion_matrix(tmp_path):
    import cnncodes
    from helpers import make_code_store

    many = make_code_store(tmp_path / "many", n_images=240, n_classes=8)
    result = cnncodes.sweep(many, SweepConfig(probes=("logreg",), folds=2), progress=False)
    for row in result.rows:
        assert row.test_accuracy <= row.test_top5_accuracy <= 1.0
        # balanced accuracy is the mean per-class recall: two routes to one number
        assert np.mean(list(row.test_class_recall.values())) == pytest.approx(row.test_balanced_accuracy)
    paths = cnncodes.write_report(result, tmp_path / "report")
    saved = json.loads(paths["results.json"].read_text())["rows"][0]
    assert set(saved["test_class_recall"]) == set(many.classes)  # by class name
    assert paths["confusion.png"].stat().st_size > 0
    assert "test_top5_accuracy" in paths["results.csv"].read_text().splitlines()[0]
    few_store = make_code_store(tmp_path / "few", n_images=60)
    few = cnncodes.sweep(few_store, SweepConfig(probes=("logreg",), folds=2), progress=False)
    assert few.rows[0].test_top5_accuracy is None and "test_top5_accuracy" not in few.rows[0].to_dict()


def test_the_deprecated_config_keywords_still_work_and_warn():
    import cnncodes

    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    codes = {"informative": rng.normal(size=(90, 8)) + y[:, None], "noise": rng.normal(size=(90, 8))}
    with pytest.warns(DeprecationWarning, match="SweepConfig"):
        old = cnncodes.sweep_codes(codes, y, probes=("logreg",), folds=3)
    new = cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg",), folds=3))
    assert old.config == new.config
    assert old.best.key == new.best.key
    assert [(r.key, r.cv_accuracy) for r in old.rows] == [(r.key, r.cv_accuracy) for r in new.rows]


def test_a_figure_draws_names_that_are_not_utf8_as_escapes(tmp_path):
    from sklearn.metrics import ConfusionMatrixDisplay

    from cnncodes._figures import new_figure, save_figure, shown

    odd = os.fsdecode(b"cl\xe9")  # a class folder written by a Latin-1 tool
    fig, ax = new_figure(3, 3)
    ConfusionMatrixDisplay.from_predictions([0, 1], [0, 1], display_labels=[odd, "b"], ax=ax, colorbar=False)
    ax.set_title(f"{odd} / avg")
    ax.set_yticks([0, 1], labels=[odd, "b"])
    assert save_figure(fig, tmp_path / "c.png", dpi=40).stat().st_size > 0
    drawn = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()] + [ax.get_title()]
    assert drawn == ["cl\\xe9", "b", "cl\\xe9", "b", "cl\\xe9 / avg"]
    assert shown("\ud800x") == "\\ud800x"  # a lone surrogate no file name holds: escaped, not a crash
