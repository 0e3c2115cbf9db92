"""Multi-label sources: a CSV with `cat;dog` labels, one-vs-rest probes scored by mAP, and their bundle."""

import csv
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import StandardScaler

import cnncodes
from cnncodes.cli import main
from cnncodes.deploy import read_bundle
from cnncodes.images import open_source
from cnncodes.probing import SweepConfig, c_grid, split_images
from helpers import make_images, make_tiny_backbone

TAGS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """60 images; an image shows a colour when that channel is dimmed, and may show two (a CSV of `red;blue`)."""
    root = tmp_path_factory.mktemp("tagged")
    rng = np.random.default_rng(3)
    images, _ = make_images(60, 20, seed=3)
    present = np.zeros((60, 3), dtype=int)
    rows = ["path,label"]
    for i, img in enumerate(images):
        tags = [k for k in range(3) if rng.random() < 0.45] or [int(rng.integers(3))]
        img = img.copy()
        img[..., tags] //= 4
        present[i, tags] = 1
        Image.fromarray(img).save(root / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{';'.join(TAGS[k] for k in tags)}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    store = cnncodes.extract(root / "tags.csv", out=root / "codes", model=make_tiny_backbone(), taps="stages",
                             poolings="avg", batch_size=16, workers=0, progress=False)  # fmt: skip
    return root, store, present


def test_a_csv_of_label_sets_becomes_an_indicator_matrix_in_the_store(tagged):
    root, store, present = tagged
    source = open_source(str(root / "tags.csv"))
    assert source.multilabel and source.classes == sorted(TAGS)
    order = [sorted(TAGS).index(t) for t in TAGS]  # columns follow the sorted class names
    np.testing.assert_array_equal(source.labels[:, order], present)
    assert store.multilabel and store.classes == sorted(TAGS)
    np.testing.assert_array_equal(np.asarray(store.labels), source.labels)
    (root / "bad.csv").write_text("00.png,red;;blue\n")
    with pytest.raises(ValueError, match="bad.csv line 1: label 'red;;blue' has an empty class name"):
        open_source(str(root / "bad.csv"))


@pytest.mark.slow
def test_multilabel_sweep_scores_map_as_scikit_learn_computes_it(tagged):
    _, store, _ = tagged
    result = cnncodes.sweep(store, SweepConfig(probes=("logreg",), folds=3), progress=False)
    assert {r.protocol for r in result.rows} == {"multilabel"} and result.data["multilabel"]
    best = result.best
    assert best.cv_map == max(r.cv_map for r in result.rows)
    # second route: scikit-learn's own search for one class on the same folds and C grid, then its test AP
    Y = np.asarray(store.labels)
    split = split_images(Y, 0, SweepConfig(folds=3))
    X = np.asarray(store.codes(best.tap, best.pooling), dtype=np.float32)
    scaler = StandardScaler().fit(X[split.train_rows])
    folds = [(np.searchsorted(split.train_rows, f), np.searchsorted(split.train_rows, v)) for f, v in split.folds]
    for k in range(3):
        search = GridSearchCV(LogisticRegression(solver="liblinear", max_iter=1000), {"C": c_grid(1e-4, 1e4, 2)},
                              scoring="average_precision", cv=folds).fit(scaler.transform(X[split.train_rows]),
                                                                         Y[split.train_rows, k])  # fmt: skip
        assert best.class_C[k] == pytest.approx(search.best_params_["C"])
        ap = average_precision_score(
            Y[split.test_rows, k], search.decision_function(scaler.transform(X[split.test_rows]))
        )
        assert best.test_class_ap[k] == pytest.approx(ap, abs=1e-6)
    assert best.test_map == pytest.approx(np.mean(list(best.test_class_ap.values())))
    with pytest.raises(ValueError, match="single-label protocols"):
        cnncodes.sweep(store, SweepConfig(probes=("logreg", "knn"), folds=3), progress=False)


@pytest.mark.slow
def test_the_multilabel_bundle_predicts_label_sets_like_the_sweep(tagged, tmp_path, capsys):
    root, store, _ = tagged
    out = tmp_path / "sweep"
    assert main(["sweep", str(store.path), "--out", str(out), "--probes", "logreg,linsvc", "--folds", "3",
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "CV mAP" in printed and "test mAP" in printed
    assert not (out / "confusion.png").exists(), "a confusion matrix needs one class per image"
    results = json.loads((out / "results.json").read_text())
    assert "multilabel" in results["protocols"]
    assert set(results["rows"][0]["test_class_ap"]) == set(TAGS)
    with open(out / "test_predictions.csv") as f:
        expected = {row["path"]: row["predicted"] for row in csv.DictReader(f)}
    bundle = read_bundle(out / "best_probe.zip")
    assert bundle.multilabel and bundle.arrays["coef"].shape[0] == 3
    probe = cnncodes.load_bundle(out / "best_probe.zip", backbone=make_tiny_backbone())
    predicted = {row["path"]: row["predicted"] for row in probe.predict_source(str(root / "tags.csv"))}
    assert expected and all(predicted[p] == v for p, v in expected.items())
    scores = probe.decision_function(str(root / "tags.csv"))
    names = probe.predict(str(root / "tags.csv"))
    assert scores.shape == (60, 3) and all(";".join(c for c, s in zip(probe.classes, row) if s > 0) == n
                                           for row, n in zip(scores, names))  # fmt: skip
    if bundle.has_proba:  # logreg: independent per-class sigmoids
        np.testing.assert_allclose(probe.predict_proba(str(root / "tags.csv")), 1 / (1 + np.exp(-scores)), rtol=1e-5)
    # a flag of the wrong type is refused
    with zipfile.ZipFile(out / "best_probe.zip") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["bundle.json"])
    meta["multilabel"] = "yes"
    members["bundle.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(ValueError, match="multilabel is 'yes'"):
        read_bundle(tmp_path / "bad.zip")


def test_single_label_tools_refuse_a_multilabel_store_before_any_work(tagged, tmp_path):
    root, store, _ = tagged
    with pytest.raises(ValueError, match="is multi-label .* fine-tuning trains a single-label classifier"):
        cnncodes.finetune(store, "relu", out=tmp_path / "ft")
    with pytest.raises(ValueError, match="is multi-label .* the depth sweep fine-tunes single-label"):
        cnncodes.depth(str(root / "tags.csv"), out=tmp_path / "depth", model=make_tiny_backbone())
    assert not (tmp_path / "ft").exists() and not (tmp_path / "depth").exists()


def test_stores_swept_together_must_label_their_images_alike(tagged, tmp_path):
    root, store, present = tagged
    lines = (root / "tags.csv").read_text().splitlines()
    single = ["path,label"] + [f"{line.split(',')[0]},{line.split(',')[1].split(';')[0]}" for line in lines[1:]]
    (root / "single.csv").write_text("\n".join(single) + "\n")
    changed = lines[:3] + [lines[3].split(",")[0] + ",red;green;blue"] + lines[4:]
    assert changed[3] != lines[3]
    (root / "changed.csv").write_text("\n".join(changed) + "\n")
    kw = dict(model=make_tiny_backbone(), taps="stages", poolings="avg", batch_size=16, workers=0, progress=False)
    one = cnncodes.extract(root / "single.csv", out=tmp_path / "single", input_size=24, **kw)
    two = cnncodes.extract(root / "changed.csv", out=tmp_path / "changed", input_size=24, **kw)
    with pytest.raises(ValueError, match="is multi-label .* but .*single is not"):
        cnncodes.sweep([store, one], SweepConfig(probes=("logreg",), folds=3), progress=False)
    with pytest.raises(ValueError, match=r"label image 2 \('.*02.png'\) as 'blue;green;red' and"):
        cnncodes.sweep([store, two], SweepConfig(probes=("logreg",), folds=3), progress=False)


@pytest.mark.slow
def test_a_multilabel_probe_exports_with_its_large_scores(tagged, tmp_path):
    _, store, _ = tagged
    result = cnncodes.sweep(store, SweepConfig(probes=("linsvc",), folds=3, c_max=1e4), progress=False)
    path = cnncodes.save_probe(result, tmp_path)
    probe = cnncodes.load_bundle(path, backbone=make_tiny_backbone())
    exported = cnncodes.export_probe(probe, tmp_path / "m.pt2")
    x = torch.randn(3, 3, 32, 32)
    module = torch.export.load(exported).module()
    eager = probe.bundle.decision_function_codes(probe.extractor.net(x)[result.best.tap][result.best.pooling].numpy())
    assert module(x).shape == (3, 3)
    np.testing.assert_allclose(module(x).detach().numpy(), eager, rtol=1e-4, atol=1e-4 * np.abs(eager).max())


def test_multilabel_splits_spread_every_class_over_the_folds():
    """Iterative stratification: a class of 10 images among 200 lands 2 to a fold and 2 or 3 in the test split, where
    scikit-learn's shuffled KFold (one label per image, so unstratified here) leaves folds without it."""
    from sklearn.model_selection import KFold

    from cnncodes.probing._multilabel import check_multilabel_split, stratified_subsets

    rng = np.random.default_rng(0)
    Y = (rng.random((200, 4)) < [0.5, 0.3, 0.1, 0.0]).astype(int)
    Y[rng.choice(200, 10, replace=False), 3] = 1  # the rare class
    parts = stratified_subsets(Y, [0.2] * 5, seed=0)
    for c in range(4):  # every class within one image of its share in every part
        assert np.abs(np.bincount(parts[Y[:, c] == 1], minlength=5) - Y[:, c].sum() / 5).max() <= 1
    assert np.abs(np.bincount(parts, minlength=5) - 40).max() <= 4
    np.testing.assert_array_equal(parts, stratified_subsets(Y, [0.2] * 5, seed=0))  # seeded

    config = SweepConfig(folds=5, test_size=0.25, seed=1)
    split = split_images(Y, 0, config)
    check_multilabel_split(Y, split, ["a", "b", "c", "rare"])  # every part has positives and negatives of each
    assert {2, 3} >= {int(Y[split.test_rows, 3].sum())}
    assert sorted(np.concatenate([split.train_rows, split.test_rows])) == list(range(200))
    for fit, val in split.folds:
        assert not set(fit) & set(val) and len(fit) + len(val) == len(split.train_rows)
    spreads = {"stratified": [], "KFold": []}  # the rare class's most minus fewest images in a fold, per seed
    for seed in range(10):
        folds = split_images(Y, 0, SweepConfig(folds=5, seed=seed)).folds
        spreads["stratified"].append(np.ptp([Y[v, 3].sum() for _, v in folds]))
        shuffled = KFold(5, shuffle=True, random_state=seed).split(split.train_rows)
        spreads["KFold"].append(np.ptp([Y[split.train_rows[v], 3].sum() for _, v in shuffled]))
    assert max(spreads["stratified"]) <= 1 and np.mean(spreads["KFold"]) > 1.5
    held = split_images(Y, 0, SweepConfig(val_size=0.3, seed=1))  # one validation part, stratified too
    ((fit, val),) = held.folds
    assert abs(Y[val, 3].sum() - 0.3 * Y[held.train_rows, 3].sum()) <= 1
