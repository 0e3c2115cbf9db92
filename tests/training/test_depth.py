"""The freeze-depth sweep: every cut is probed and fine-tuned on the same test images, the best is chosen on
validation only, and the report round-trips."""

from __future__ import annotations

import csv
import json

import pytest
from scipy import stats

from cnncodes.network import list_taps
from cnncodes.probing._scoring import unpack_hits
from cnncodes.training import FinetuneConfig, depth
from helpers import make_images, make_tiny_backbone


@pytest.mark.slow
def test_depth_probes_and_fine_tunes_every_stage_and_marks_the_best_on_validation(tmp_path):
    backbone = make_tiny_backbone()
    images, labels = make_images(36)
    from cnncodes.images import ArraySource

    source = ArraySource(images, labels)
    rows = depth(source, out=tmp_path, model=backbone, views=1, config=FinetuneConfig(epochs=2, batch_size=6),
                 batch_size=6, progress=False)  # fmt: skip
    stages = [t.name for t in list_taps(backbone).select("stages")]
    assert [r.cut for r in rows] == stages
    assert [r.best for r in rows].count(True) == 1
    best = max(rows, key=lambda r: r.finetune_val_accuracy)
    assert best.best  # chosen by validation, never by test
    assert all(r.cache_bytes > 0 and r.train_seconds >= 0 for r in rows)
    # intervals around every number; each cut's fine-tuned top tested against the best cut's on the same images
    for r in rows:
        for value, ci in ((r.finetune_val_accuracy, r.finetune_val_ci), (r.finetune_test_accuracy, r.finetune_test_ci),
                          (r.linear_test_accuracy, r.linear_test_ci), (r.linear_cv_accuracy, r.linear_cv_ci)):  # fmt: skip
            assert ci[0] <= value <= ci[1]
        assert r.trainable_params > 0
    n_test = len(rows[0].test_hits) * 4  # whole bytes of bits: the padding is equal for every cut
    ref = unpack_hits(best.test_hits, n_test)
    for r in rows:
        if r is best:
            assert r.p_test is None and r.p_val is None
            continue
        hits = unpack_hits(r.test_hits, n_test)
        b, c = int((ref & ~hits).sum()), int((~ref & hits).sum())
        assert r.p_test == pytest.approx(1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue)
        assert r.p_test_holm >= r.p_test and r.p_val_holm >= r.p_val
    # deployed cost: the probe runs the network up to the cut, the fine-tuned model that and the trained top, which
    # is the rest of the network: the same FLOPs at every cut, never fewer than the probe's
    flops = [r.linear_flops for r in rows]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert len({r.finetune_flops for r in rows}) == 1 and rows[-1].finetune_flops >= flops[-1]
    assert json.loads((tmp_path / "depth.json").read_text())[0]["cut"] == stages[0]
    with open(tmp_path / "depth.csv") as f:
        assert [r["cut"] for r in csv.DictReader(f)] == stages
    assert (tmp_path / "depth.png").stat().st_size > 0
    again = depth(source, out=tmp_path, model=backbone, views=1, config=FinetuneConfig(epochs=2, batch_size=6),
                  batch_size=6, progress=False)  # fmt: skip
    assert [r.finetune_test_accuracy for r in again] == [r.finetune_test_accuracy for r in rows]
    from cnncodes.training import depth_of_stores

    stores = [tmp_path / "cache"]  # the same comparison over the store extracted beforehand
    by_hand = depth_of_stores(stores, out=tmp_path / "by_hand", backbone=backbone,
                              config=FinetuneConfig(epochs=2, batch_size=6), progress=False)  # fmt: skip
    assert [(r.cut, r.linear_test_accuracy, r.finetune_test_accuracy) for r in by_hand] == [
        (r.cut, r.linear_test_accuracy, r.finetune_test_accuracy) for r in rows
    ]


def test_the_sweep_and_the_fine_tuning_hold_out_the_same_test_images(tmp_path):
    import numpy as np

    from cnncodes.probing import SweepConfig
    from cnncodes.sweeps import make_split
    from helpers import make_code_store

    store = make_code_store(tmp_path / "s", n_images=90, views=2)
    for seed in (0, 3):
        swept = make_split(store, config=SweepConfig(seed=seed, test_size=0.25))
        tuned = make_split(store, config=SweepConfig(seed=seed, test_size=0.25, val_size=0.2, folds=2))
        np.testing.assert_array_equal(np.sort(swept.test_rows), np.sort(tuned.test_rows))


def test_depth_refuses_a_tap_that_is_not_a_cut(tmp_path):
    backbone = make_tiny_backbone()
    inside = next(t.name for t in list_taps(backbone).taps if not t.main_path)
    images, labels = make_images(12)
    from cnncodes.images import ArraySource

    with pytest.raises(Exception, match=f"{inside} cannot be cut at"):
        depth(ArraySource(images, labels), out=tmp_path, model=backbone, cuts=[inside], progress=False)


@pytest.mark.slow
def test_the_matrix_trains_every_recipe_above_every_cut_and_marks_the_best_and_the_cheapest_equal_cell(tmp_path):
    import math

    from cnncodes.images import ArraySource
    from cnncodes.training import RECIPES, format_depth_table

    backbone = make_tiny_backbone()
    images, labels = make_images(36)
    config = FinetuneConfig(epochs=2, batch_size=6, hidden=8)
    rows = depth(ArraySource(images, labels), out=tmp_path, model=backbone, views=1, config=config,
                 recipes="top,block,norms,head", batch_size=6, progress=False)  # fmt: skip
    stages = [t.name for t in list_taps(backbone).select("stages")]
    assert [(r.cut, r.recipe) for r in rows] == [(c, recipe) for c in stages for recipe in RECIPES]
    best = [r for r in rows if r.best]
    assert len(best) == 1 and best[0].finetune_val_accuracy == max(r.finetune_val_accuracy for r in rows)
    cheapest = [r for r in rows if r.cheapest]
    assert len(cheapest) == 1
    low = best[0].finetune_val_ci[0]
    equal = [r for r in rows if r.best or (r.p_val is not None and r.p_val >= 0.05 and r.finetune_val_accuracy >= low)]
    assert cheapest[0] in equal and all(cheapest[0].finetune_flops <= r.finetune_flops for r in equal)
    for cut in stages:  # one linear probe per cut, shown beside every recipe; fewer trained parameters than the top
        cells = {r.recipe: r for r in rows if r.cut == cut}
        assert len({c.linear_test_accuracy for c in cells.values()}) == 1
        assert cells["block"].trainable_params <= cells["top"].trainable_params
        assert cells["norms"].trainable_params <= cells["top"].trainable_params
        assert (
            len({c.linear_flops for c in cells.values()}) == 1
            and cells["head"].finetune_flops > cells["head"].linear_flops
        )
    assert all(r.p_val is not None for r in rows if not r.best and not math.isnan(r.finetune_val_accuracy))
    saved = json.loads((tmp_path / "depth.json").read_text())
    assert [(r["cut"], r["recipe"]) for r in saved] == [(r.cut, r.recipe) for r in rows]
    assert sum(r["cheapest"] for r in saved) == 1 and (tmp_path / "depth.png").stat().st_size > 0
    table = format_depth_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and table[1 + rows.index(best[0])].startswith("*")
    from cnncodes.cli import main

    assert main(["depth", "demo:digits", "--out", str(tmp_path / "x"), "--train", "top,layers"]) == 2
    assert main(["depth", "demo:digits", "--out", str(tmp_path / "x"), "--train", "block", "--head"]) == 2
    assert not (tmp_path / "x" / "cache").exists()  # refused before any extraction


def test_the_best_cell_breaks_ties_of_validation_accuracy_by_validation_cross_entropy():
    from cnncodes.training import DepthRow
    from cnncodes.training._depth import best_cell

    def cell(name, val, loss):
        return DepthRow(name, 0, 0.5, 0.5, val, val, 1, 0.0, 1.0, finetune_val_loss=loss)

    first, sure, unsure, better = (
        cell("a", 0.98, None),
        cell("b", 0.98, 0.10),
        cell("c", 0.98, 0.30),
        cell("d", 0.99, 2),
    )
    assert best_cell([first, unsure, sure]) is sure  # equal accuracy: the lower loss, wherever it stands
    assert best_cell([first, unsure, sure, better]) is better  # accuracy first, the loss only among equals
    assert best_cell([cell("x", 0.9, None), cell("y", 0.9, None)]).cut == "x"  # no losses: the first


def test_the_recommendation_is_never_a_cell_the_validation_images_call_worse():
    from cnncodes.training import DepthRow
    from cnncodes.training._depth import mark_cheapest

    def cell(name, val, flops, p=None, ci=None):
        return DepthRow(name, 0, 0.5, 0.5, val, val, 1, 0.0, 1.0, finetune_val_ci=ci, p_val=p, p_val_holm=1.0,
                        finetune_flops=flops, trainable_params=10)  # fmt: skip

    best = cell("deep", 0.90, 100, ci=[0.85, 0.94])
    best.best = True
    worse = cell("cheap-but-worse", 0.78, 10, p=0.0156)  # Holm over many cells would call it equal (1.0)
    outside = cell("cheap-outside", 0.84, 20, p=0.08)  # not significant, but below the best's interval
    equal = cell("cheap-equal", 0.89, 50, p=0.6)
    rows = [best, worse, outside, equal]
    mark_cheapest(rows)
    assert [r.cut for r in rows if r.cheapest] == ["cheap-equal"]
    for r in rows:
        r.cheapest = False
    mark_cheapest([best, worse])
    assert best.cheapest  # nothing as good: the best itself
