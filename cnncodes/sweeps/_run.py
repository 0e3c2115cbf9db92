"""`sweep`: a linear probe per (tap, pooling, normalizer, probe) of a code store, compared honestly, best one picked.

Protocol (see :mod:`cnncodes.probing` for how each candidate is fitted)
-----------------------------------------------------------------------
* A stratified held-out test split of *images* (default 25 %, fixed seed), or a separate test store, is used once, for
  the final numbers only. Selection uses cross-validation on the training images only.
* Every candidate is evaluated on the same folds (stratified k-fold over images, so the augmented views of one image
  never straddle folds; training uses every view, validation and test the plain view).
* Arrays whose in-memory fit would exceed ``max_memory`` are fitted out of core, streamed from the store.

This module only opens stores and describes them; the work is :func:`cnncodes.probing.sweep_codes`, given the store's
arrays as lazy handles that workers (loky processes or Dask workers on shared storage) open by path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import ParameterError
from ..probing import Split, SweepConfig, SweepResult, split_images, sweep_codes
from ..store import CodeStore

__all__ = ["sweep", "make_split"]


def _open(store: CodeStore | str | os.PathLike) -> CodeStore:
    return store if isinstance(store, CodeStore) else CodeStore(store)


def _check_test_classes(store: CodeStore, test: CodeStore | None) -> None:
    if test is not None and test.classes != store.classes:
        raise ParameterError(f"test store {test.path} has classes {test.classes[:5]}..., the train store "
                             f"{store.classes[:5]}...; they must match.")  # fmt: skip


def make_split(store: CodeStore, *, test: CodeStore | None = None, config: SweepConfig | None = None) -> Split:
    """The split a sweep of ``store`` uses: by image, stratified, seeded (see :func:`cnncodes.probing.split_images`)."""
    config = config or SweepConfig()
    _check_test_classes(store, test)
    return split_images(np.asarray(store.labels), store.views, config, test_rows=None if test is None else test.rows,
                        test_views=0 if test is None else test.views)  # fmt: skip


def sweep(
    store: CodeStore | str | os.PathLike,
    *,
    test: CodeStore | str | os.PathLike | None = None,
    probes: Sequence[str] = ("logreg", "linsvc"),
    normalizers: Sequence[str] = ("standard",),
    taps: Iterable[str] | str | None = None,
    poolings: Iterable[str] | str | None = None,
    folds: int = 5,
    val_size: float | None = None,
    test_size: float = 0.25,
    seed: int = 0,
    c_min: float = 1e-4,
    c_max: float = 1e4,
    jobs: int = 1,
    max_memory: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    backend: str | None = None,
    scheduler: str | None = None,
) -> SweepResult:
    """Evaluate linear probes on every (tap, pooling) of a code store and pick the best extraction point.

    Parameters
    ----------
    store : CodeStore or path
    test : CodeStore or path, optional
        A separate test store; otherwise ``test_size`` of the images are held out (stratified, ``seed``).
    probes : sequence of str, default=("logreg", "linsvc")
        Any of ``logreg``, ``linsvc``, ``sgd``, ``sgd-log``.
    normalizers : sequence of str, default=("standard",)
        Any of ``standard``, ``l2``, ``power``, ``none``.
    taps, poolings : str or iterable of str, optional
        Restrict the sweep to these (the names :func:`cnncodes.extract` stored; comma-separated strings welcome).
    folds : int, default=5
        Stratified k-fold over training images.
    val_size : float, optional
        Use one stratified validation split of this fraction instead of k-fold.
    test_size : float, default=0.25
    seed : int, default=0
    c_min, c_max : float
        C grid bounds.
    jobs : int, default=1
        joblib workers (``-1``: all cores, or every Dask worker thread). Runs under the active joblib backend, so
        ``with joblib.parallel_config(backend="dask"):`` spreads it over a Dask cluster.
    max_memory : int, optional
        Bytes per task; arrays whose in-memory fit needs more (float32 training rows x (folds + 1)) are fitted out
        of core by streaming.
    device : str, default="cpu"
        Torch device of the path solver.
    progress : bool, default=True
    backend : {"dask"}, optional
        Run on a Dask cluster (the ``dask`` extra); default: the active joblib backend.
    scheduler : str, optional
        With ``backend="dask"``: the scheduler address (``tcp://host:8786``) or a scheduler JSON file; default: a
        local cluster. Workers read the store by its path, so it must be on storage they share.

    Returns
    -------
    SweepResult
        Equal on any backend: tasks are seeded and independent of where they run.

    See Also
    --------
    cnncodes.sweep_codes : the same sweep on arrays in memory.
    """
    store = _open(store)
    test_store = None if test is None else _open(test)
    if test_store is not None and test_store.path.resolve() == store.path.resolve():
        raise ParameterError(f"the test store {test_store.path} is the training store: every test image would be a "
                             "training image. Give a store of other images, or leave --test out for a held-out split.")  # fmt: skip
    wanted_taps, wanted_pools = _names(taps), _names(poolings)
    available = store.keys()
    keys = [
        (t, p) for t, p in available
        if (wanted_taps is None or t in wanted_taps) and (wanted_pools is None or p in wanted_pools)
    ]  # fmt: skip
    if not keys:
        raise ParameterError(f"nothing to sweep: {store.path} holds {store.keys()} and the filter kept none.")
    if test_store is not None:
        _check_test_classes(store, test_store)
        test_keys = set(test_store.keys())
        missing = [k for k in keys if k not in test_keys]
        if missing:
            raise ParameterError(f"test store {test_store.path} lacks {missing[:3]}; extract it with the same "
                                 "--taps/--poolings.")  # fmt: skip
    for k in keys:  # every array's file and header checked before any work, naming a damaged one
        store.codes(*k)
        if test_store is not None:
            test_store.codes(*k)
    depth = {(a["tap"], a["pooling"]): int(a.get("depth", -1)) for a in store.arrays}
    result = sweep_codes(
        {k: store.lazy(*k) for k in keys},
        np.asarray(store.labels),
        test=None if test_store is None else {k: test_store.lazy(*k) for k in keys},
        test_labels=None if test_store is None else np.asarray(test_store.labels),
        views=store.views,
        test_views=0 if test_store is None else test_store.views,
        classes=store.classes,
        depths=depth,
        sources=store.sources,
        test_sources=None if test_store is None else test_store.sources,
        probes=probes, normalizers=normalizers, folds=folds, val_size=val_size, test_size=test_size, seed=seed,
        c_min=c_min, c_max=c_max, jobs=jobs, max_memory=max_memory, device=device, progress=progress,
        backend=backend, scheduler=scheduler,
    )  # fmt: skip
    result.data.update(store=str(store.path), test_store=str(test_store.path) if test_store else None)
    best = result.best
    entry = next(a for a in store.arrays if a["tap"] == best.tap and a["pooling"] == best.pooling)
    result.extractor = {
        "model": store.manifest.get("model", {}),
        "tap": best.tap,
        "pooling": best.pooling,
        "relu": bool(entry["rectified"]),
        "code_dtype": entry["dtype"],
        "dims": int(entry["shape"][1]),
        "numerics": (store.manifest.get("config") or {}).get("numerics"),
    }
    return result


def _names(value: Iterable[str] | str | None) -> set[str] | None:
    if value is None:
        return None
    return {n.strip() for n in value.split(",")} if isinstance(value, str) else {str(n) for n in value}
