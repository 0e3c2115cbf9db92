"""Concatenated candidates: several taps' codes side by side, swept, bundled, predicted and exported."""

import numpy as np
import pytest
import torch

import cnncodes
from cnncodes.deploy import ProbeBundle, bundle_from_pipeline, export_probe, read_bundle, save_bundle
from cnncodes.probing import ConcatenatedCodes, SweepConfig, make_probe
from cnncodes.sweeps import extractor_of, sweep
from helpers import make_code_store, make_tiny_backbone, row_facts, write_image_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_code_store(tmp_path_factory.mktemp("codes") / "s", n_images=90)


def _plain(row):
    return row_facts(row, "tap", "depth", "backbone")


def test_a_concatenated_candidate_equals_a_sweep_of_the_joined_codes(store):
    joined = ConcatenatedCodes([store.lazy("mid", "avg"), store.lazy("late", "avg")])
    by_hand = np.hstack([np.asarray(store.codes("mid", "avg")), np.asarray(store.codes("late", "avg"))])
    np.testing.assert_array_equal(joined[np.arange(90)], by_hand)
    assert joined.shape == by_hand.shape and np.asarray(joined).dtype == by_hand.dtype
    result = sweep(store, SweepConfig(probes=("logreg",), folds=3), concat="last:2,early+late", progress=False)
    rows = {r.tap: r for r in result.rows}
    assert set(rows) == {"early", "mid", "late", "mid+late", "early+late"}
    assert rows["mid+late"].dims == 12 + 8 and rows["mid+late"].depth == rows["late"].depth
    in_memory = cnncodes.sweep_codes({("x", "avg"): by_hand}, np.asarray(store.labels),
                                     SweepConfig(probes=("logreg",), folds=3), classes=store.classes)  # fmt: skip
    assert _plain(in_memory.rows[0]) == _plain(rows["mid+late"])


def test_concat_specs_are_checked_before_any_work(store):
    for spec, words in (("last:9", "last:K with K from 2 to the 3 taps"), ("last:x", "last:K"),
                        ("mid+nope", "has no swept tap 'nope'"), ("mid", "two or more distinct taps"),
                        ("mid+mid", "two or more distinct taps")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            sweep(store, SweepConfig(probes=("logreg",), folds=3), concat=spec, progress=False)


@pytest.mark.slow
def test_a_concatenated_bundle_predicts_and_exports_like_its_probe(tmp_path):
    images = write_image_folder(tmp_path / "images", n=30)
    # --relu never: `add` stays raw although --relu auto would rectify it (the network feeds it to a ReLU)
    store = cnncodes.extract(images, out=tmp_path / "codes", model=make_tiny_backbone(), taps="stem,relu,add",
                             poolings="avg", relu="never", batch_size=8, workers=0, progress=False)  # fmt: skip
    taps = ("stem", "relu", "add")  # codes raw, rectified by the network, raw: relu is one flag per tap
    spec = extractor_of(store, "+".join(taps), "avg")
    assert spec["taps"] == list(taps) and spec["relu"] == [False, True, False]
    X = np.hstack([np.asarray(store.codes(t, "avg"), dtype=np.float32) for t in taps])
    probe = make_probe("logreg", "standard", 1.0).fit(X, np.asarray(store.labels))
    path = save_bundle(bundle_from_pipeline(probe, spec, store.classes), tmp_path / "joined.zip")
    bundle = read_bundle(path)
    assert isinstance(bundle, ProbeBundle) and bundle.extractor.taps == taps and bundle.extractor.dims == X.shape[1]
    deployed = cnncodes.load_bundle(path, backbone=make_tiny_backbone())
    np.testing.assert_allclose(deployed.decision_function(str(images)), probe.decision_function(X), atol=1e-4)
    exported = export_probe(deployed, tmp_path / "joined.pt2")
    module = torch.export.load(exported).module()
    x = torch.randn(3, 3, 32, 32)
    eager = deployed.bundle.decision_function_codes(
        np.hstack([deployed.extractor.net(x)[t]["avg"].detach().numpy() for t in taps])
    )  # fmt: skip
    np.testing.assert_allclose(module(x).detach().numpy(), eager, atol=1e-4)
    # a bundle whose per-tap flags contradict the network is refused before any image
    import dataclasses

    wrong = dataclasses.replace(bundle.extractor, relu=(True, True, False))
    with pytest.raises(ValueError, match=r"\(stem: rectified, relu: rectified, add: raw\) are rectified in a way no"):
        cnncodes.deploy.DeployedProbe(dataclasses.replace(bundle, extractor=wrong), backbone=make_tiny_backbone())
