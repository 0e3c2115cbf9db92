"""Training the top on cached activations is the same as freezing the layers below the cut: both routes give the same
losses and weights. Also: the top of a cut reproduces the model, cuts that are not cuts are refused, runs repeat."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cnncodes
from cnncodes.cli import main
from cnncodes.errors import ParameterError, StoreError
from cnncodes.images import as_source
from cnncodes.network import CodeExtractor, cut_points, list_taps, top_above
from cnncodes.training import CachedActivations, FinetuneConfig, LiveActivations, build_model, finetune, train
from helpers import make_images, make_tiny_backbone

VIEWS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A float32 store of the raw activations at a cut, with seeded views: what `cnncodes finetune` reads."""
    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(36)
    store = cnncodes.extract(images, labels=labels, out=tmp_path_factory.mktemp("cache") / "s", model=backbone,
                             taps=cut, poolings="none", relu="never", views=VIEWS, seed=3, dtype="float32",
                             batch_size=6, workers=0, progress=False)  # fmt: skip
    return backbone, cut, images, labels, store


def test_the_top_of_every_cut_reproduces_the_model():
    backbone = make_tiny_backbone()
    catalogue = list_taps(backbone)
    x = torch.randn(3, 3, catalogue.input_size, catalogue.input_size)
    cuts = cut_points(backbone, catalogue)
    assert cuts and {t.name for t in catalogue.select("stages")} <= set(cuts)
    for cut in cuts:
        top = top_above(backbone, cut, catalogue)
        extractor = CodeExtractor(backbone, [cut], "none", relu="never", catalogue=catalogue)
        with torch.no_grad():
            activation = extractor(x)[cut]["none"].reshape(3, *catalogue[cut].shape)
            logits = backbone.model.get_submodule(top.classifier)(top.body.eval()(activation))
            torch.testing.assert_close(logits, backbone.model(x), rtol=0, atol=0)
        assert all(p.requires_grad for p in top.body.parameters())
        assert not any(p.requires_grad for p in backbone.model.parameters())  # the backbone stays frozen


def test_a_tap_inside_a_residual_branch_is_not_a_cut():
    backbone = make_tiny_backbone()
    inside = next(t.name for t in list_taps(backbone).taps if not t.main_path)
    with pytest.raises(ParameterError, match=f"'{inside}' is not a cut .* which bypasses it. Cut at one of"):
        top_above(backbone, inside)


@pytest.mark.parametrize("head", [False, True], ids=["top", "head"])
@pytest.mark.slow
def test_training_on_the_cache_equals_training_with_the_frozen_layers_live(cache, head):
    backbone, cut, images, labels, store = cache
    config = FinetuneConfig(head=head, epochs=3, batch_size=6, hidden=8, patience=5, seed=1)
    fit, val = np.arange(0, 24), np.arange(24, 36)
    runs = {}
    for route in ("cache", "live"):
        if route == "cache":
            feed = CachedActivations(store.codes(cut, "none"), VIEWS, list_taps(backbone)[cut].shape)
        else:  # decode, augment with the same seeded views, run the frozen layers below the cut in eval mode
            extractor = CodeExtractor(backbone, [cut], "none", relu="never")
            feed = LiveActivations(as_source(images), extractor, backbone.preprocessing, 3, ("crop", "flip"),
                                   torch.device("cpu"))  # fmt: skip
        model = build_model(backbone, cut, 3, config)
        runs[route] = train(model, feed, labels, fit=fit, val=val, test=None, views=VIEWS, config=config)
    cached, live = runs["cache"], runs["live"]
    assert [h["view"] for h in cached.history] == [1, 2, 1]  # epoch e reads view 1 + e mod K
    for a, b in zip(cached.history, live.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_accuracy"] == b["val_accuracy"]
    for (name, a), (_, b) in zip(cached.model.state_dict().items(), live.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_finetune_runs_repeat_and_score_the_sweeps_test_split(cache, tmp_path):
    backbone, cut, _, _, store = cache
    config = FinetuneConfig(epochs=2, batch_size=6, seed=0)
    a = finetune(store, cut, backbone=backbone, config=config, out=tmp_path / "a", progress=False)
    b = finetune(store, cut, backbone=backbone, config=config, progress=False)
    assert a.history == b.history and a.test_accuracy == b.test_accuracy
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    saved = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert saved["cut"] == cut and saved["test_accuracy"] == a.test_accuracy and saved["config"]["seed"] == 0
    split = cnncodes.sweeps.make_split(
        store, config=cnncodes.SweepConfig(val_size=0.2, test_size=0.25, seed=0, folds=2)
    )
    assert 0 < len(np.unique(split.test_rows // (VIEWS + 1))) < store.rows // (VIEWS + 1)


def test_a_store_without_raw_activations_at_the_cut_is_refused(tmp_path):
    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(12)
    kw = dict(labels=labels, model=backbone, taps=cut, batch_size=6, workers=0, progress=False)
    pooled = cnncodes.extract(images, out=tmp_path / "pooled", poolings="avg", **kw)
    with pytest.raises(StoreError, match=f"no unpooled activations of '{cut}'.*--poolings none --relu never"):
        finetune(pooled, cut, backbone=backbone, progress=False)
    pre_activation = next(t.name for t in list_taps(backbone).taps if t.relu_applied("auto") and t.main_path)
    kw["taps"] = pre_activation
    rectified = cnncodes.extract(images, out=tmp_path / "rect", poolings="none", relu="auto", **kw)
    with pytest.raises(StoreError, match="read them raw. Extract them with --relu never"):
        finetune(rectified, pre_activation, backbone=backbone, progress=False)


@pytest.mark.slow
def test_the_cli_trains_on_a_store_and_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    images = tmp_path / "imgs"
    from helpers import write_image_folder

    write_image_folder(images, n=18)
    store = tmp_path / "s"
    assert main(["extract", str(images), "--model", "resnet18:none", "--input-size", "32", "--taps", "layer3.1.relu_1",
                 "--poolings", "none", "--relu", "never", "--views", "1", "--out", str(store), "--quiet"]) == 0  # fmt: skip
    assert main(["finetune", str(store), "--cut", "layer3.1.relu_1", "--out", str(tmp_path / "ft"), "--epochs", "2",
                 "--batch-size", "4", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "cut layer3.1.relu_1: trained the layers above it for 2 epochs" in out
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["cut"] == "layer3.1.relu_1"
    assert main(["finetune", str(store), "--cut", "layer3.0.bn1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no unpooled activations of 'layer3.0.bn1'" in err
    assert (
        main(["finetune", str(store), "--cut", "layer3.1.relu_1", "--out", str(tmp_path / "x"), "--epochs", "0"]) == 2
    )
    assert "--epochs" in capsys.readouterr().err
