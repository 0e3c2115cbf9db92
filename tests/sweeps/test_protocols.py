"""Sweeps of several stores, `compare`, and the literature's protocols: the kNN baseline and few-shot rows."""

import json
import os
import shutil

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import cnncodes
from cnncodes.cli import main
from cnncodes.deploy import read_bundle
from cnncodes.probing import KNN_KS, PROTOCOLS, SweepConfig, draw_shots, make_probe, split_images
from cnncodes.sweeps import compare, make_split, sweep, write_report
from helpers import SYNTHETIC_MODEL, make_code_store, row_facts


def _model(name):
    return {**SYNTHETIC_MODEL, "spec": f"module:{name}"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same 120 images "from two backbones": b's taps are wider and separate the classes better at `late`."""
    root = tmp_path_factory.mktemp("stores")
    a = make_code_store(root / "a", n_images=120, seed=0, model=_model("net_a"))
    b = make_code_store(root / "b", n_images=120, seed=5, dims={"early": 4, "mid": 3, "late": 16},
                        model=_model("net_b"))  # fmt: skip
    return a, b


def _plain(rows):
    return [row_facts(r, "backbone") for r in rows]


@pytest.mark.slow
def test_a_sweep_of_two_stores_is_both_single_sweeps_and_picks_the_better_best(stores, tmp_path):
    a, b = stores
    both = sweep([a, b], SweepConfig(probes=("logreg",), folds=3), progress=False)
    alone = [sweep(s, SweepConfig(probes=("logreg",), folds=3), progress=False) for s in stores]
    assert _plain(both.rows) == _plain(alone[0].rows) + _plain(alone[1].rows)  # one split for all
    assert {r.backbone for r in both.rows} == {"module:net_a", "module:net_b"}
    better = max(alone, key=lambda r: (r.best.cv_accuracy, -r.best.dims))
    assert _plain([both.best]) == _plain([better.best])
    assert both.data["stores"] == {"module:net_a": str(a.path), "module:net_b": str(b.path)}
    assert both.data["split_digest"] == alone[0].data["split_digest"] == alone[1].data["split_digest"]
    # the saved probe describes the winning store's codes
    assert both.extractor["model"]["spec"] == f"module:{both.best.backbone.split(':')[1]}"


@pytest.mark.slow
def test_cli_sweeps_several_stores_into_one_table_plot_and_bundle(stores, tmp_path, capsys):
    a, b = stores
    out = tmp_path / "both"
    assert main(["sweep", str(a.path), str(b.path), "--out", str(out), "--probes", "logreg", "--folds", "3",
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "module:net_a mid" in printed and "module:net_b late" in printed
    best = json.loads((out / "best.json").read_text())
    assert f"best: {best['backbone']} / {best['tap']}" in printed
    assert (out / "sweep.png").stat().st_size > 0
    bundle = read_bundle(out / "best_probe.zip")
    assert bundle.extractor.model["spec"] == best["backbone"] and bundle.extractor.tap == best["tap"]


@pytest.mark.slow
def test_compare_joins_sweeps_written_before_into_the_same_best(stores, tmp_path, capsys):
    a, b = stores
    dirs = []
    for store in stores:
        dirs.append(tmp_path / store.path.name)
        write_report(sweep(store, SweepConfig(probes=("logreg",), folds=3), progress=False), dirs[-1], plot=False)
    joined = compare(dirs)
    both = sweep([a, b], SweepConfig(probes=("logreg",), folds=3), progress=False)
    timings = ("fit_seconds", "backbone", "latency_ms_batch1", "latency_ms_batch64")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timings} for r in rows]  # noqa: E731
    # the paired tests too: compare recomputes them against the joint best from the saved folds and per-image hits
    assert strip(joined.to_dict()["rows"]) == strip(both.to_dict()["rows"])
    assert any(r.p_test is not None and r.backbone != joined.best.backbone for r in joined.rows)
    assert joined.best.key == both.best.key
    assert main(["compare", *map(str, dirs), "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp" / "best.json").read_text())["tap"] == both.best.tap
    assert (tmp_path / "cmp" / "sweep.png").exists()
    # a backbone met twice (the same sweep copied) gets its directory's name appended
    shutil.copytree(dirs[0], tmp_path / "again")
    twice = compare([dirs[0], tmp_path / "again", dirs[1]])
    assert [*dict.fromkeys(r.backbone for r in twice.rows)] == ["module:net_a", "module:net_a (again)", "module:net_b"]


@pytest.mark.slow
def test_sweeps_of_other_images_or_splits_are_refused(stores, tmp_path):
    a, _ = stores
    renamed = make_code_store(tmp_path / "renamed", n_images=120, model=_model("net_c"),
                              source_names=[f"img{i}.png" if i != 7 else "other.png" for i in range(120)])  # fmt: skip
    with pytest.raises(ValueError, match=r"differ at image 7: 'other.png' vs 'img7.png'"):
        sweep([a, renamed], SweepConfig(probes=("logreg",), folds=3), progress=False)
    fewer = make_code_store(tmp_path / "fewer", n_images=90, model=_model("net_d"))
    with pytest.raises(ValueError, match="hold 90 and 120 images"):
        sweep([a, fewer], SweepConfig(probes=("logreg",), folds=3), progress=False)
    relative = os.path.relpath(a.path)  # one store by two spellings
    with pytest.raises(ValueError, match="is given twice"):
        sweep([a, relative], SweepConfig(probes=("logreg",), folds=3), progress=False)
    b = stores[1]
    with pytest.raises(ValueError, match="holds codes of another model"):  # test stores given in the wrong order
        sweep([a, b], SweepConfig(probes=("logreg",), folds=3), test=[b, a], progress=False)
    same_images = make_code_store(tmp_path / "same", n_images=120, seed=9, model=_model("net_a"))
    with pytest.raises(ValueError, match="holds 120 of the training images"):
        sweep(a, SweepConfig(probes=("logreg",), folds=3), test=same_images, progress=False)
    one, other = tmp_path / "seed0", tmp_path / "seed1"
    write_report(sweep(a, SweepConfig(probes=("logreg",), folds=3), progress=False), one, plot=False)
    write_report(sweep(a, SweepConfig(probes=("logreg",), folds=3, seed=1), progress=False), other, plot=False)
    with pytest.raises(ValueError, match="split differently"):
        compare([one, other])
    with pytest.raises(ValueError, match="has no results.json"):
        compare([one, tmp_path])
    with pytest.raises(ValueError, match="is given twice"):
        compare([one, tmp_path / "." / "seed0"])
    results = json.loads((one / "results.json").read_text())
    for edit, words in ((lambda r: r.update(data=[]), "lacks rows, data"),
                        (lambda r: r["rows"][0].update(cv_accuracy="high"), "row 1: cv_accuracy is 'high'"),
                        (lambda r: r["rows"][0].update(dims="x"), "row 1: dims is 'x'"),
                        (lambda r: r["rows"][0].update(protocol="zzz"), "protocol 'zzz'"),
                        (lambda r: r["rows"].__setitem__(0, None), "row 1 is None")):  # fmt: skip
        damaged = json.loads(json.dumps(results))
        edit(damaged)
        (other / "results.json").write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=words):
            compare([one, other])


def test_knn_rows_equal_scikit_learn_on_the_same_folds(stores):
    a, _ = stores
    result = sweep(a, SweepConfig(probes=("logreg", "knn"), folds=3), taps="mid", progress=False)
    knn = next(r for r in result.rows if r.probe == "knn")
    assert knn.protocol == "knn" and knn.C is None and knn.k in KNN_KS
    assert result.best.probe == "logreg", "the kNN baseline is reported, never picked"
    split = split_images(np.asarray(a.labels), 0, SweepConfig(folds=3))
    X, y = np.asarray(a.codes("mid", "avg"), dtype=np.float32), np.asarray(a.labels)
    folds = [(np.searchsorted(split.train_rows, f), np.searchsorted(split.train_rows, v)) for f, v in split.folds]
    ks = [k for k in KNN_KS if k <= min(len(f) for f, _ in folds)]  # 60 fit images per fold: k = 100 is left out
    assert ks == [10, 20, 50]
    cv = [cross_val_score(make_pipeline(StandardScaler(), KNeighborsClassifier(k, metric="cosine")),
                          X[split.train_rows], y[split.train_rows], cv=folds).mean() for k in ks]  # fmt: skip
    assert knn.k == ks[int(np.argmax(cv))] and knn.cv_accuracy == pytest.approx(max(cv))
    direct = make_pipeline(StandardScaler(), KNeighborsClassifier(knn.k, metric="cosine"))
    direct.fit(X[split.train_rows], y[split.train_rows])
    assert knn.test_accuracy == pytest.approx(direct.score(X[split.test_rows], y[split.test_rows]))
    assert json.loads(json.dumps(result.to_dict()))["protocols"]["knn"] == PROTOCOLS["knn"]


def test_few_shot_draws_stay_on_the_training_side_and_average_real_fits(stores):
    a, _ = stores
    y = np.asarray(a.labels)
    split = split_images(y, 0, SweepConfig(folds=3))
    for shots in (1, 3):
        for draw in range(3):
            rows = draw_shots(y, split, shots, draw, seed=0)
            assert set(rows) <= set(split.train_rows) and not set(rows) & set(split.test_rows)
            assert np.bincount(y[rows]).tolist() == [shots] * 3
        assert not np.array_equal(draw_shots(y, split, shots, 0, 0), draw_shots(y, split, shots, 1, 0))
        np.testing.assert_array_equal(draw_shots(y, split, shots, 2, 0), draw_shots(y, split, shots, 2, 0))
    result = sweep(a, SweepConfig(probes=("logreg",), folds=3, shots=(1, 3), draws=3), taps="mid", progress=False)
    few = {r.shots: r for r in result.rows if r.protocol == "few-shot"}
    assert set(few) == {1, 3} and all(r.draws == 3 for r in few.values())
    assert few[1].cv_accuracy is None and few[3].cv_accuracy is not None
    full = next(r for r in result.rows if r.protocol == "linear")
    X = np.asarray(a.codes("mid", "avg"), dtype=np.float32)
    by_hand = []
    for draw in range(3):  # one shot: the full sweep's C on each draw, scored on the whole test split
        rows = draw_shots(y, split, 1, draw, seed=0)
        probe = make_probe("logreg", "standard", full.C).fit(X[rows], y[rows])
        by_hand.append(probe.score(X[split.test_rows], y[split.test_rows]))
    assert few[1].test_accuracy == pytest.approx(np.mean(by_hand))
    assert few[1].test_accuracy_std == pytest.approx(np.std(by_hand))
    assert few[1].test_accuracy <= full.test_accuracy + 0.05


@pytest.mark.slow
def test_cli_records_every_protocol_and_refuses_impossible_shot_counts(stores, tmp_path, capsys):
    a, _ = stores
    out = tmp_path / "out"
    assert main(["sweep", str(a.path), "--out", str(out), "--probes", "logreg,knn", "--shots", "1,2", "--draws", "2",
                 "--folds", "3", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "few-shot test accuracy" in printed and "k=" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["protocols"]) == {"linear", "knn", "few-shot"}
    assert {(r["protocol"], r.get("shots")) for r in results["rows"]} >= {
        ("knn", None),
        ("few-shot", 1),
        ("few-shot", 2),
    }
    assert results["config"]["shots"] == [1, 2] and results["config"]["draws"] == 2
    assert (out / "few_shot.png").stat().st_size > 0
    assert main(["sweep", str(a.path), "--out", str(tmp_path / "x"), "--shots", "0"]) == 2
    assert "argument --shots" in capsys.readouterr().err
    assert main(["sweep", str(a.path), "--out", str(tmp_path / "y"), "--shots", "500", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--shots 500 needs 500 training images per class" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_two_real_backbones_in_one_sweep_match_their_single_sweeps(tmp_path):
    """The issue's check on real networks: the embedded Lite0 and a random resnet18 on the same 150 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.repeat((digits.images[:150] * 15).astype(np.uint8), 4, 1), 4, 2)  # 32 x 32 gray
    stores = [cnncodes.extract(images, labels=digits.target[:150], out=tmp_path / name, model=model, input_size=32,
                               taps="stages", poolings="avg", batch_size=50, workers=0, progress=False)
              for name, model in (("lite", "efficientnet_lite0"), ("r18", "resnet18:none"))]  # fmt: skip
    both = sweep(stores, SweepConfig(probes=("logreg",), folds=3), progress=False)
    assert {r.backbone for r in both.rows} == {"efficientnet_lite0", "resnet18:none"}
    alone = [sweep(s, SweepConfig(probes=("logreg",), folds=3), latency=False, progress=False) for s in stores]
    better = max(alone, key=lambda r: (r.best.cv_accuracy, -r.best.dims))
    assert _plain([both.best]) == _plain([better.best]) and both.best.backbone == better.best.backbone
    assert _plain(both.rows) == _plain(alone[0].rows) + _plain(alone[1].rows)
    # every row's cost, measured on the early-exit network of its tap: the same whichever sweep it is in
    from cnncodes.network import architecture_of, tap_costs

    for backbone, model in (("efficientnet_lite0", "efficientnet_lite0"), ("resnet18:none", "resnet18:none")):
        mine = [r for r in both.rows if r.backbone == backbone]
        counted = tap_costs(architecture_of(model, 32), [r.tap for r in mine])
        assert [(r.flops, r.params) for r in mine] == [
            (counted[(r.tap,)].flops, counted[(r.tap,)].params) for r in mine
        ]
        assert [r.flops for r in mine] == sorted(r.flops for r in mine)  # deeper taps cost more
        assert all(r.latency_ms_batch1 > 0 and r.latency_ms_batch64 > 0 and r.code_bytes == 2 * r.dims for r in mine)
    # paired tests across backbones on the same images, and the cheapest equal row over both
    assert all(r.p_test is not None for r in both.rows if r is not both.best)
    assert both.cheapest is not None and both.cheapest.flops <= both.best.flops
    # a store whose model cannot be rebuilt still sweeps: its rows carry code bytes only, with a warning saying why
    manifest = json.loads((stores[1].path / "manifest.json").read_text())
    manifest["model"]["spec"] = "not_a_model_anywhere"
    (stores[1].path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="could not be measured on 'not_a_model_anywhere'"):
        unknown = sweep(stores[1].path, SweepConfig(probes=("logreg",), folds=3), progress=False)
    assert all(r.flops is None and r.code_bytes == 2 * r.dims for r in unknown.rows) and unknown.cheapest is None
    with pytest.raises(cnncodes.errors.ParameterError, match="forward FLOPs of every array"):
        sweep(stores[1].path, SweepConfig(probes=("logreg",), folds=3, pick="cheapest"), costs=False, progress=False)


@pytest.mark.parametrize("n_images", [18, 90, 100])
def test_knn_fits_folds_of_any_size(tmp_path, n_images):
    """k never exceeds what the smallest fold holds (its neighbour graph counts each row itself)."""
    store = make_code_store(tmp_path / "s", n_images=n_images)
    result = sweep(store, SweepConfig(probes=("logreg", "knn"), folds=3), taps="mid", progress=False)
    knn = next(r for r in result.rows if r.probe == "knn")
    fit_images = min(len(f) for f, _ in make_split(store, config=SweepConfig(folds=3)).folds)
    assert knn.k < fit_images and (knn.k in KNN_KS or knn.k == fit_images - 1)
