"""The sweep's C search: coarse decades, then a binary search down to 1/``c_steps_per_decade`` decade (CLIP's protocol)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import cnncodes
from cnncodes.cli import main
from cnncodes.probing import SweepConfig, c_grid
from cnncodes.probing._linear import ProblemStack
from cnncodes.probing._search import _path_search, _refinements
from helpers import make_code_store


def _problem(seed: int = 0, n: int = 150, d: int = 30, folds: int = 3):
    """3 classes whose means differ along a direction of large correlated noise, so CV accuracy rises with C (less
    shrinkage towards the class means) and falls again (overfitting): a stack of folds and their validation rows."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    means = 0.3 * rng.normal(size=(3, d)) + 2.0 * np.outer(np.arange(3), v)
    X = (means[y] + rng.normal(size=(n, d)) + 4 * rng.normal(size=(n, 1)) * v).astype(np.float32)
    parts = (np.arange(n) // 3) % folds  # every class in every fold
    fits = [(X[parts != f], y[parts != f]) for f in range(folds)]
    stack = ProblemStack([a for a, _ in fits], [b for _, b in fits], 3)
    val = [(basis.project(X[parts == f]), y[parts == f]) for f, basis in enumerate(stack.bases)]
    return stack, val


def _lattice_steps(C: float, steps: int) -> float:
    """Position of C on the 1/steps-decade lattice from 1 (an integer when C lies on it)."""
    return math.log10(C) * steps


def test_refinement_rounds_halve_from_half_a_decade_to_one_step():
    assert _refinements(1) == []
    assert _refinements(2) == [1]
    assert _refinements(4) == [2, 1]
    assert _refinements(8) == [4, 2, 1]
    assert _refinements(10) == [5, 3, 2, 1]


def test_the_lattice_holds_the_coarse_grid():
    fine = c_grid(1e-6, 1e6, 8)
    assert len(fine) == 97  # CLIP's 96 steps over 12 decades
    np.testing.assert_allclose(fine[::8], c_grid(1e-6, 1e6))
    np.testing.assert_allclose(np.diff(np.log10(fine)), 1 / 8)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_the_refined_c_is_resolved_to_one_lattice_step(steps, seed):
    stack, val = _problem(seed)
    lattice = c_grid(1e-6, 1e6, steps)
    scores, states, _ = _path_search(stack, val, "multinomial", lattice, steps, 2e-3, 30)
    assert set(scores) == set(states)
    positions = sorted(_lattice_steps(C, steps) for C in scores)
    np.testing.assert_allclose(positions, np.round(positions), atol=1e-9)  # every C fitted lies on the lattice
    best = max(scores, key=lambda c: (np.mean(scores[c]), -c))
    at = round(_lattice_steps(best, steps))
    fitted = {round(p) for p in positions}
    assert -6 * steps < at < 0  # the peak is inside the range, so both sides get refined
    # both neighbours one step (1/steps decade) away were fitted: the best is resolved to that spacing
    assert {at - 1, at + 1} <= fitted
    # the coarse pass plus two fits per refinement round, not the whole lattice
    coarse = sum(1 for p in fitted if p % steps == 0)
    assert len(scores) <= coarse + 2 * len(_refinements(steps)) < len(lattice)


def test_one_step_per_decade_means_no_refinement():
    stack, val = _problem()
    scores, _, _ = _path_search(stack, val, "multinomial", c_grid(1e-4, 1e4, 1), 1, 2e-3, 30)
    positions = [math.log10(C) for C in scores]
    np.testing.assert_allclose(positions, np.round(positions), atol=1e-9)  # whole decades only


def test_the_default_refines_half_a_decade_either_side_of_the_best():
    stack, val = _problem()
    scores, _, _ = _path_search(stack, val, "multinomial", c_grid(1e-4, 1e4, 2), 2, 2e-3, 30)
    coarse = [C for C in scores if abs(math.log10(C) - round(math.log10(C))) < 1e-9]
    fine = sorted(set(scores) - set(coarse))
    best = max(coarse, key=lambda c: (np.mean(scores[c]), -c))
    assert len(fine) == 2
    np.testing.assert_allclose(fine, [C for C in (best / 10**0.5, best * 10**0.5) if 1e-4 <= C <= 1e4])


@pytest.mark.parametrize("probe", ["logreg", "sgd"])
def test_a_clip_range_sweep_stays_cheap_and_lands_on_the_eighth_decade_lattice(probe):
    rng = np.random.default_rng(3)
    y = np.arange(90) % 3
    codes = {"a": rng.normal(size=(90, 6)) + y[:, None], "b": rng.normal(size=(90, 6)) + 2 * y[:, None]}
    result = cnncodes.sweep_codes(
        codes, y, SweepConfig(probes=(probe,), folds=3, c_min=1e-6, c_max=1e6, c_steps_per_decade=8)
    )
    assert result.config.c_steps_per_decade == 8
    for row in result.rows:
        assert row.n_fits / 3 <= 25  # per fold: at most 13 coarse + 2 x 3 refinement fits, not 97
        position = _lattice_steps(row.C, 8)
        assert position == pytest.approx(round(position), abs=1e-9)


def test_c_steps_per_decade_is_validated_and_numpy_integers_are_accepted():
    assert SweepConfig(c_steps_per_decade=np.int64(8)).c_steps_per_decade == 8
    assert type(SweepConfig(c_steps_per_decade=np.int32(4)).c_steps_per_decade) is int
    for bad in (0, -2, 1001):
        with pytest.raises(
            cnncodes.ParameterError, match=r"c_steps_per_decade must be 1 to 1000.*--c-steps-per-decade"
        ):
            SweepConfig(c_steps_per_decade=bad)
    for bad in (2.5, "8", True):
        with pytest.raises(cnncodes.ParameterError, match="c_steps_per_decade must be an integer"):
            SweepConfig(c_steps_per_decade=bad)


@pytest.mark.slow
def test_the_cli_runs_clips_c_search_and_records_it(tmp_path):
    store = make_code_store(tmp_path / "s", n_images=90)
    out = tmp_path / "sw"
    args = ["--probes", "logreg", "--folds", "3", "--c-range", "1e-6,1e6", "--c-steps-per-decade", "8", "--quiet"]
    assert main(["sweep", str(store.path), "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["c_steps_per_decade"] == 8
    assert (results["config"]["c_min"], results["config"]["c_max"]) == (1e-6, 1e6)
    for row in results["rows"]:
        assert row["n_fits"] / 3 <= 25
        assert _lattice_steps(row["C"], 8) == pytest.approx(round(_lattice_steps(row["C"], 8)), abs=1e-9)


def test_a_sweep_in_threads_leaves_torch_threads_as_it_found_them():
    import threading

    import torch

    rng = np.random.default_rng(4)
    y = np.arange(60) % 3
    codes = {k: rng.normal(size=(60, 5)) + y[:, None] for k in "abc"}
    before = torch.get_num_threads()
    cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg",), folds=3), jobs=2)  # tasks set one torch thread each
    assert torch.get_num_threads() == before
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]


def test_narrow_arrays_are_packed_into_tasks_no_wider_than_the_widest_array():
    import joblib

    from cnncodes.probing._search import _in_threads, _packs

    dims = {"a": 16, "b": 600, "c": 200, "d": 40, "e": 100, "f": 1280, "g": 64}
    # a pack costs no more than the costliest array, at dims + 256 each (the per-operation overhead)
    assert _packs(list(dims), dims, threads=True) == [["a", "d", "g", "e"], ["c"], ["b"], ["f"]]
    dims = {"a": 200, "b": 100, "c": 150}  # all narrow: packs cost no more than the widest alone
    assert _packs(list(dims), dims, threads=True) == [["b"], ["c"], ["a"]]
    dims = {"a": 10, "b": 20, "c": 300}
    assert _packs(list(dims), dims, threads=True) == [["a", "b"], ["c"]]
    # processes (loky, Dask) have no GIL to share: every array a task
    assert _packs(list(dims), dims, threads=False) == [["a"], ["b"], ["c"]]
    assert _in_threads()  # joblib's default for prefer="threads"
    with joblib.parallel_config(backend="loky"):
        assert not _in_threads()


@pytest.mark.slow
def test_packing_narrow_arrays_changes_the_schedule_not_the_rows(monkeypatch):
    from cnncodes.probing import _search

    rng = np.random.default_rng(5)
    y = np.arange(90) % 3
    codes = {f"t{d}": rng.normal(size=(90, d)) + y[:, None] * rng.normal(size=d) for d in (4, 8, 12, 300)}
    packed = cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg", "linsvc"), folds=3), jobs=2)
    packs = _search._packs(list(codes), {k: v.shape[1] for k, v in codes.items()}, threads=True)
    assert packs == [["t4", "t8"], ["t12"], ["t300"]]
    monkeypatch.setattr(_search, "_NARROW_DIMS", 0)  # every array a task of its own
    alone = cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg", "linsvc"), folds=3), jobs=2)
    assert [(r.tap, r.probe, r.C, r.cv_accuracy, r.test_accuracy) for r in packed.rows] == [
        (r.tap, r.probe, r.C, r.cv_accuracy, r.test_accuracy) for r in alone.rows
    ]


@pytest.mark.slow
def test_knn_and_multilabel_rows_are_refused_up_front_beyond_max_memory():
    """Linear probes stream past --max-memory; a kNN classifier is its training rows and the multi-label search is
    scikit-learn's in memory, so those are refused before any work, naming the array, the option and the fixes."""
    rng = np.random.default_rng(6)
    y = np.arange(90) % 3
    codes = {("resnet18", "layer4", "avg"): rng.normal(size=(90, 50)) + y[:, None]}
    streamed = cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg",), folds=3, max_memory=10_000))
    assert streamed.rows[0].solver == "sgd-stream"
    with pytest.raises(cnncodes.ParameterError, match=r"kNN.*resnet18 / layer4 / avg.*--max-memory.*drop knn"):
        cnncodes.sweep_codes(codes, y, SweepConfig(probes=("logreg", "knn"), folds=3, max_memory=10_000))
    multi = np.stack([y == 0, y == 1, y != 1], 1).astype(int)
    with pytest.raises(cnncodes.ParameterError, match=r"multi-label.*--max-memory.*--taps"):
        cnncodes.sweep_codes(codes, multi, SweepConfig(probes=("logreg",), folds=3, max_memory=10_000))
    config = SweepConfig(probes=("logreg", "knn"), folds=3, max_memory=10**8)
    assert cnncodes.sweep_codes(codes, y, config).best is not None
