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
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._labels import label_text
from ..errors import CnncodesError, ParameterError
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
from ..probing._search import config_from
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
    config: SweepConfig | None = None,
    *,
    test: CodeStore | str | os.PathLike | Sequence[CodeStore | str | os.PathLike] | None = None,
    taps: Iterable[str] | str | None = None,
    poolings: Iterable[str] | str | None = None,
    concat: Iterable[str] | str | None = None,
    costs: bool = True,
    latency: bool = True,
    jobs: int = 1,
    progress: bool = True,
    backend: str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> SweepResult:
    """Evaluate linear probes on every (tap, pooling) of one or several code stores and pick the best extraction point.

    Parameters
    ----------
    store : CodeStore or path, or a sequence of them
        Several stores must hold the same images in the same order (from different backbones or input sizes): they
        share one split, and the best (backbone, tap, pooling, probe) is picked over all of them.
    config : SweepConfig, optional
        How every candidate is fitted, scored, compared and picked: probes, normalizers, folds, test size, seed, the C
        grid, ``pick`` (``best`` or ``cheapest``), ``tolerance``, ``repeats``... Default ``SweepConfig()``.
    test : CodeStore or path (a sequence matching ``store``), optional
        A separate test store; otherwise ``config.test_size`` of the images are held out (stratified, seeded).
    taps, poolings : str or iterable of str, optional
        Restrict the sweep to these (the names :func:`cnncodes.extract` stored; comma-separated strings welcome).
    concat : str or iterable of str, optional
        Add candidates that join several taps' codes side by side, per pooling: ``"last:K"`` for each store's K
        deepest taps (after the ``taps`` filter), or an explicit ``"layer3+layer4"``. Their rows are named
        ``layer3+layer4``; a probe bundle of one computes every part again in one forward pass.
    costs : bool, default=True
        Count every row's forward FLOPs and running parameters up to its tap (torch's ``FlopCounterMode`` on the
        early-exit network a bundle runs, built from the store's model spec with random weights: no download).
    latency : bool, default=True
        Also time that network per image at batch 1 and 64 on this machine (the store's extraction device where it
        is here, else the CPU).
    jobs : int, default=1
        joblib workers (``-1``: all cores, or every Dask worker thread). Runs under the active joblib backend, so
        ``with joblib.parallel_config(backend="dask"):`` spreads it over a Dask cluster.
    progress : bool, default=True
    backend : {"dask"}, optional
        Run on a Dask cluster (the ``dask`` extra); default: the active joblib backend.
    scheduler : str, optional
        With ``backend="dask"``: the scheduler address (``tcp://host:8786``) or a scheduler JSON file; default: a
        local cluster. Workers read the store by its path, so it must be on storage they share.
    **options
        Deprecated: :class:`~cnncodes.probing.SweepConfig` fields as keywords (``probes=``, ``folds=``...). Pass
        ``config=SweepConfig(...)`` instead; the keywords go in the next release.

    Returns
    -------
    SweepResult
        Equal on any backend: tasks are seeded and independent of where they run. Every row names its ``backbone``
        (``data["stores"]`` maps each to its store), carries its intervals, paired tests against the best row and
        costs; ``extractor`` describes the chosen row's store.

    See Also
    --------
    cnncodes.sweep_codes : the same sweep on arrays in memory.
    cnncodes.sweeps.compare : join the results of sweeps written before.
    """
    config = config_from(config, options, "sweep")
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
    # FLOPs (fast) of every array now, so a cheapest pick is refused before any work when they cannot be counted;
    # latency (a timed forward pass per tap) only of the arrays searched, which triage makes a few
    built: dict[str, Any] = {}  # each store's rebuilt model, shared by the FLOPs and the later latency
    measured = _measure_costs(stores, names, codes, latency=False, built=built) if costs else {}
    timed = costs and latency and any("flops" in c for c in measured.values())  # the model could be rebuilt
    late = (lambda keys: _measure_costs(stores, names, {k: codes[k] for k in keys}, latency=True, built=built,
                                        flops=measured)) if timed else None  # fmt: skip

    result = sweep_codes(
        codes,
        np.asarray(first.labels),
        config,
        test=test_codes or None,
        test_labels=None if first_test is None else np.asarray(first_test.labels),
        views=first.views,
        test_views=0 if first_test is None else first_test.views,
        classes=first.classes,
        depths=depth,
        sources=first.sources,
        test_sources=None if first_test is None else first_test.sources,
        costs=measured,
        late_costs=late,
        jobs=jobs,
        progress=progress,
        backend=backend,
        scheduler=scheduler,
    )
    built.clear()  # the rebuilt models are not kept past the sweep
    chosen = result.chosen
    at = names.index(chosen.backbone)
    result.data.update(
        store=str(stores[at].path),
        test_store=str(test_stores[at].path) if test_stores else None,
        stores={n: str(s.path) for n, s in zip(names, stores)},
    )
    result.extractor = extractor_of(stores[at], chosen.tap, chosen.pooling)
    return result


def _measure_costs(stores: Sequence[CodeStore], names: Sequence[str], codes: dict, *, latency: bool,
                   built: dict[str, Any] | None = None,
                   flops: dict | None = None) -> dict[tuple[str, str, str], dict[str, Any]]:  # fmt: skip
    """Every array's cost: forward FLOPs and running parameters up to its taps, the network's per-image latency at
    batch 1 and 64, and the bytes of one image's codes. A store whose model cannot be rebuilt (a Python module) gets
    its code bytes only. ``built`` keeps each store's rebuilt model between calls; ``flops`` holds costs already
    counted (an earlier call's), which are copied instead of counted again."""
    from ..network import architecture_of

    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, st in zip(names, stores):
        model = st.manifest.get("model") or {}
        size = (model.get("preprocessing") or {}).get("input_size")
        keys = [k for k in codes if k[0] == name]
        itemsize = {(a["tap"], a["pooling"]): np.dtype(a["dtype"]).itemsize for a in st.arrays}
        dims = {(a["tap"], a["pooling"]): int(a["shape"][1]) for a in st.arrays}
        for k in keys:
            parts = [(t, k[2]) for t in k[1].split(CONCAT_SEP)]
            out[k] = {"code_bytes": sum(itemsize[p] * dims[p] for p in parts)}
        try:
            if built is not None and name in built:
                backbone = built[name]  # None: not rebuildable, or it failed (and was warned about) before
            else:
                if built is not None:
                    built[name] = None
                backbone = architecture_of(str(model.get("spec", "")), size)
                if built is not None:
                    built[name] = backbone
            if backbone is None:
                continue
            known = {k: flops[k] for k in keys if flops and "flops" in flops.get(k, {})}
            for k, c in known.items():
                out[k].update(flops=c["flops"], params=c["params"])
            _tap_costs(out, st, keys, backbone, latency=latency, count=len(known) < len(keys))
        except CnncodesError as exc:  # codes need no model: the sweep goes on, knowing only their bytes
            warnings.warn(f"{st.path}: the costs of its taps could not be measured on {model.get('spec')!r} "
                          f"({_one_line(exc)}); its rows have no FLOPs or latency, and --pick cheapest refuses them.",
                          UserWarning, stacklevel=3)  # fmt: skip
    return out


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _tap_costs(out: dict, st: CodeStore, keys: list, backbone: Any, *, latency: bool, count: bool = True) -> None:
    """FLOPs and parameters (with ``count``; otherwise already in ``out``) and (with ``latency``) per-image times of
    the taps of ``keys`` into ``out``."""
    from ..network import measure_latency, resolve_device, tap_costs

    pooled: dict[str, list[tuple[str, ...]]] = {}  # each group of taps once, at a pooling it is stored at
    for group, pool in {tuple(k[1].split(CONCAT_SEP)): k[2] for k in reversed(keys)}.items():
        pooled.setdefault(pool, []).append(group)
    numerics = (st.manifest.get("config") or {}).get("numerics") or {}
    device = "cuda" if numerics.get("device") == "cuda" and resolve_device("auto").type == "cuda" else "cpu"
    counted, timed = {}, {}
    for pool, groups in pooled.items():
        if count:
            counted.update(tap_costs(backbone, groups, pooling=pool))
        if latency:
            timed.update(measure_latency(backbone, groups, pooling=pool, batch_sizes=(1, 64), device=device))
    for k in keys:
        group = tuple(k[1].split(CONCAT_SEP))
        if count:
            out[k].update(flops=counted[group].flops, params=counted[group].params)
        if group in timed:
            out[k].update(latency_ms_batch1=timed[group].get(1), latency_ms_batch64=timed[group].get(64))


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
