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
from pathlib import Path
from typing import Any

import numpy as np

from .._labels import label_text
from ..errors import ParameterError
from ..probing import (
    CONCAT_SEP,
    ConcatenatedCodes,
    Split,
    SweepConfig,
    SweepResult,
    concat_name,
    split_images,
    sweep_codes,
)
from ..store import CodeStore

__all__ = ["sweep", "make_split", "check_same_images", "check_test_stores", "backbone_names", "extractor_of"]


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
    store: CodeStore | str | os.PathLike | Sequence[CodeStore | str | os.PathLike],
    *,
    test: CodeStore | str | os.PathLike | Sequence[CodeStore | str | os.PathLike] | None = None,
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
    c_steps_per_decade: int = 2,
    jobs: int = 1,
    max_memory: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    backend: str | None = None,
    scheduler: str | None = None,
    shots: Sequence[int] = (),
    draws: int = 5,
    concat: Iterable[str] | str | None = None,
) -> SweepResult:
    """Evaluate linear probes on every (tap, pooling) of one or several code stores and pick the best extraction point.

    Parameters
    ----------
    store : CodeStore or path, or a sequence of them
        Several stores must hold the same images in the same order (from different backbones or input sizes): they
        share one split, and the best (backbone, tap, pooling, probe) is picked over all of them.
    test : CodeStore or path (a sequence matching ``store``), optional
        A separate test store; otherwise ``test_size`` of the images are held out (stratified, ``seed``).
    probes : sequence of str, default=("logreg", "linsvc")
        Any of ``logreg``, ``linsvc``, ``sgd``, ``sgd-log``; ``knn`` adds the kNN baseline rows.
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
    c_steps_per_decade : int, default=2
        C resolution: one C per decade, then a binary search around the best down to 1/N decade (CLIP's protocol:
        ``c_min=1e-6, c_max=1e6, c_steps_per_decade=8``; see :class:`cnncodes.probing.SweepConfig`).
    jobs : int, default=1
        joblib workers (``-1``: all cores, or every Dask worker thread). Runs under the active joblib backend, so
        ``with joblib.parallel_config(backend="dask"):`` spreads it over a Dask cluster.
    max_memory : int, optional
        Bytes per task; arrays whose in-memory fit needs more (their rows, a normalized copy per fold, the solver's
        copies: docs/scaling.md) are fitted out of core by streaming; kNN and multi-label rows over it are refused.
    device : str, default="cpu"
        Torch device of the path solver.
    progress : bool, default=True
    backend : {"dask"}, optional
        Run on a Dask cluster (the ``dask`` extra); default: the active joblib backend.
    scheduler : str, optional
        With ``backend="dask"``: the scheduler address (``tcp://host:8786``) or a scheduler JSON file; default: a
        local cluster. Workers read the store by its path, so it must be on storage they share.
    shots : sequence of int, optional
        Few-shot rows for these numbers of training images per class.
    draws : int, default=5
        Subsets drawn per shot count.
    concat : str or iterable of str, optional
        Add candidates that join several taps' codes side by side, per pooling: ``"last:K"`` for each store's K
        deepest taps (after the ``taps`` filter), or an explicit ``"layer3+layer4"``. Their rows are named
        ``layer3+layer4``; a probe bundle of one computes every part again in one forward pass.

    Returns
    -------
    SweepResult
        Equal on any backend: tasks are seeded and independent of where they run. Every row names its ``backbone``
        (``data["stores"]`` maps each to its store); ``extractor`` describes the best row's store.

    See Also
    --------
    cnncodes.sweep_codes : the same sweep on arrays in memory.
    cnncodes.sweeps.compare : join the results of sweeps written before.
    """
    stores = [_open(s) for s in _as_list(store)]
    test_stores = None if test is None else [_open(t) for t in _as_list(test)]
    if test_stores is not None and len(test_stores) != len(stores):
        raise ParameterError(f"{len(stores)} stores but {len(test_stores)} test stores; give one test store per store, "
                             "in the same order.")  # fmt: skip
    seen: dict[Path, CodeStore] = {}
    for st in stores:
        if seen.setdefault(st.path.resolve(), st) is not st:
            raise ParameterError(f"{st.path} is given twice (as {seen[st.path.resolve()].path}); give each store once.")
    if test_stores is not None:
        check_test_stores(stores, test_stores)
    check_same_images(stores)
    if test_stores is not None:
        check_same_images(test_stores)
    names = backbone_names(stores)
    wanted_taps, wanted_pools = _names(taps), _names(poolings)
    codes, test_codes, depth = {}, {}, {}
    for name, st, te in zip(names, stores, test_stores or [None] * len(stores)):
        keys = [(t, p) for t, p in st.keys()
                if (wanted_taps is None or t in wanted_taps) and (wanted_pools is None or p in wanted_pools)]  # fmt: skip
        if not keys:
            raise ParameterError(f"nothing to sweep: {st.path} holds {st.keys()} and the filter kept none.")
        if te is not None:
            _check_test_classes(st, te)
            missing = [k for k in keys if k not in set(te.keys())]
            if missing:
                raise ParameterError(f"test store {te.path} lacks {missing[:3]}; extract it with the same "
                                     "--taps/--poolings.")  # fmt: skip
        for k in keys:  # every array's file and header checked before any work, naming a damaged one
            st.codes(*k)
            codes[(name, *k)] = st.lazy(*k)
            if te is not None:
                te.codes(*k)
                test_codes[(name, *k)] = te.lazy(*k)
        depth.update({(name, a["tap"], a["pooling"]): int(a.get("depth", -1)) for a in st.arrays})
        for taps_joined in concat_groups(st, _specs(concat), [t for t, _ in keys], several=len(stores) > 1):
            common = [p for p in dict.fromkeys(p for t, p in keys if t == taps_joined[0])
                      if all((t, p) in keys for t in taps_joined)]  # fmt: skip
            if not common:
                raise ParameterError(f"--concat {concat_name(taps_joined)}: {st.path} holds those taps under no common "
                                     "pooling; codes are joined per pooling, so extract them with one (--poolings avg).")  # fmt: skip
            for pool in common:
                key = (name, concat_name(taps_joined), pool)
                codes[key] = ConcatenatedCodes([st.lazy(t, pool) for t in taps_joined])
                if te is not None:
                    test_codes[key] = ConcatenatedCodes([te.lazy(t, pool) for t in taps_joined])
                depth[key] = max(depth[(name, t, pool)] for t in taps_joined)
    for spec in _specs(concat):
        if not spec.startswith("last:") and not any(concat_groups(st, [spec], st.taps, several=True) for st in stores):
            raise ParameterError(f"--concat {spec}: no store swept has all of those taps; check the names against "
                                 "cnncodes layers or the stores' manifests.")  # fmt: skip
    first, first_test = stores[0], None if test_stores is None else test_stores[0]
    result = sweep_codes(
        codes,
        np.asarray(first.labels),
        test=test_codes or None,
        test_labels=None if first_test is None else np.asarray(first_test.labels),
        views=first.views,
        test_views=0 if first_test is None else first_test.views,
        classes=first.classes,
        depths=depth,
        sources=first.sources,
        test_sources=None if first_test is None else first_test.sources,
        probes=probes, normalizers=normalizers, folds=folds, val_size=val_size, test_size=test_size, seed=seed,
        c_min=c_min, c_max=c_max, c_steps_per_decade=c_steps_per_decade, jobs=jobs, max_memory=max_memory,
        device=device, progress=progress,
        backend=backend, scheduler=scheduler, shots=shots, draws=draws,
    )  # fmt: skip
    best = result.best
    at = names.index(best.backbone)
    result.data.update(
        store=str(stores[at].path),
        test_store=str(test_stores[at].path) if test_stores else None,
        stores={n: str(s.path) for n, s in zip(names, stores)},
    )
    result.extractor = extractor_of(stores[at], best.tap, best.pooling)
    return result


def extractor_of(store: CodeStore, tap: str, pooling: str) -> dict:
    """How ``store`` computed its codes at (tap, pooling): what a probe bundle needs to compute them again.

    A concatenated candidate (``layer3+layer4``) lists its ``taps``; ``relu`` is then one flag per tap when they
    differ."""
    taps = tap.split(CONCAT_SEP)
    entries = [next(a for a in store.arrays if a["tap"] == t and a["pooling"] == pooling) for t in taps]
    rectified = [bool(e["rectified"]) for e in entries]
    out = {
        "model": store.manifest.get("model", {}),
        "tap": tap,
        "pooling": pooling,
        "relu": rectified[0] if len(set(rectified)) == 1 else rectified,
        "code_dtype": str(np.result_type(*[e["dtype"] for e in entries])),
        "dims": int(sum(e["shape"][1] for e in entries)),
        "numerics": (store.manifest.get("config") or {}).get("numerics"),
    }
    if len(taps) > 1:
        out["taps"] = taps
    return out


def concat_groups(
    store: CodeStore, specs: list[str], taps: list[str], *, several: bool = False
) -> list[tuple[str, ...]]:
    """The tap tuples ``specs`` name in ``store``: ``last:K`` (the K deepest of ``taps``) or ``a+b`` (explicit)."""
    order = {a["tap"]: int(a.get("depth", -1)) for a in store.arrays}
    present = sorted(dict.fromkeys(taps), key=lambda t: order[t])
    groups = []
    for spec in specs:
        if spec.startswith("last:"):
            try:
                k = int(spec[5:])
            except ValueError:
                k = 0
            if not 2 <= k <= len(present):
                raise ParameterError(f"--concat {spec}: give last:K with K from 2 to the {len(present)} taps swept in "
                                     f"{store.path}.")  # fmt: skip
            groups.append(tuple(present[-k:]))
            continue
        parts = tuple(t.strip() for t in spec.split(CONCAT_SEP))
        if len(parts) < 2 or len(set(parts)) != len(parts):
            raise ParameterError(f"--concat {spec!r}: give last:K or two or more distinct taps joined by "
                                 f"{CONCAT_SEP!r} (layer3{CONCAT_SEP}layer4).")  # fmt: skip
        missing = [t for t in parts if t not in present]
        if missing and not several:
            raise ParameterError(f"--concat {spec}: {store.path} has no swept tap {missing[0]!r}; its taps are "
                                 f"{present}.")  # fmt: skip
        if not missing:
            groups.append(tuple(sorted(parts, key=lambda t: order[t])))
    return list(dict.fromkeys(groups))


def _specs(value: Iterable[str] | str | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def check_same_images(stores: Sequence[CodeStore]) -> None:
    """Stores swept together must hold the same images, labels and views in the same order; the first difference is
    named."""
    first = stores[0]
    for other in stores[1:]:
        where = f"{other.path} and {first.path}"
        if other.views != first.views:
            raise ParameterError(f"{where} hold {other.views} and {first.views} augmented views per image; stores "
                                 "swept together need the same --views and --seed.")  # fmt: skip
        if other.classes != first.classes:
            raise ParameterError(f"{where} name their classes differently ({other.classes[:5]} vs "
                                 f"{first.classes[:5]}); extract both from the same source.")  # fmt: skip
        a, b = first.sources, other.sources
        if a != b:
            i = next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), min(len(a), len(b)))
            if i == min(len(a), len(b)):
                raise ParameterError(f"{where} hold {len(b)} and {len(a)} images; stores swept together must hold the "
                                     f"same images (image {i} is in only one). Extract both from the same source.")  # fmt: skip
            raise ParameterError(f"{where} differ at image {i}: {b[i]!r} vs {a[i]!r}; stores swept together must hold "
                                 "the same images in the same order. Extract both from the same source.")  # fmt: skip
        la, lb = np.asarray(first.labels), np.asarray(other.labels)
        if la.ndim != lb.ndim:
            multi, single = (first, other) if la.ndim == 2 else (other, first)
            raise ParameterError(f"{multi.path} is multi-label (cat;dog labels) but {single.path} is not; stores swept "
                                 "together must label their images the same way. Extract both from the same source.")  # fmt: skip
        if not np.array_equal(la, lb):
            row = int(np.flatnonzero((la != lb).reshape(len(la), -1).any(1))[0])
            image = row // (first.views + 1)
            raise ParameterError(f"{where} label image {image} ({first.sources[image]!r}) as "
                                 f"{label_text(lb[row], first.classes)!r} and {label_text(la[row], first.classes)!r}; "
                                 "extract both from the same source.")  # fmt: skip


def check_test_stores(stores: Sequence[CodeStore], tests: Sequence[CodeStore]) -> None:
    """Test store i must hold codes of the same model (spec, weights, preprocessing) as store i, and none of the
    training images: anything else scores the probe on codes it was not trained for, or on its own training data."""
    for store, test in zip(stores, tests):
        if test.path.resolve() == store.path.resolve():
            raise ParameterError(f"the test store {test.path} is the training store: every test image would be a "
                                 "training image. Give a store of other images, or leave --test out for a held-out "
                                 "split.")  # fmt: skip
        if (test.manifest.get("model") or {}) != (store.manifest.get("model") or {}):
            raise ParameterError(f"the test store {test.path} holds codes of another model or input size than "
                                 f"{store.path} (compare their manifests' model); give each store's test store in the "
                                 "same order as the stores.")  # fmt: skip
        shared = set(test.sources) & set(store.sources)
        if shared:
            first = next(s for s in test.sources if s in shared)
            raise ParameterError(f"the test store {test.path} holds {len(shared)} of the training images of "
                                 f"{store.path} (first {first!r}); a test set must hold other images.")  # fmt: skip


def backbone_names(stores: Sequence[CodeStore]) -> list[str]:
    """A short distinct name per store: its model spec, with the input size or the directory when those repeat."""

    def spec(st: CodeStore) -> str:
        model = st.manifest.get("model") or {}
        return str(model.get("spec") or st.path.name)

    def size(st: CodeStore) -> str:
        pre = (st.manifest.get("model") or {}).get("preprocessing") or {}
        return f"{spec(st)}@{pre.get('input_size', '?')}px"

    for name in (spec, size, lambda st: f"{size(st)}:{st.path.name}", lambda st: str(st.path)):
        names = [name(st) for st in stores]
        if len(set(names)) == len(names):
            return names
    raise ParameterError(f"the same store is given twice: {[str(s.path) for s in stores]}; give each once.")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _names(value: Iterable[str] | str | None) -> set[str] | None:
    if value is None:
        return None
    return {n.strip() for n in value.split(",")} if isinstance(value, str) else {str(n) for n in value}
