"""Layer sweeps: a linear probe per (tap, pooling, normalizer, classifier), compared honestly, best one picked.

Protocol
--------
* A stratified held-out test split of *images* (default 25 %, fixed seed), or a separate test store, is used once, for
  the final numbers only. Selection uses cross-validation on the training images only.
* Every candidate is evaluated on the same folds (stratified k-fold over images, so the augmented views of one image
  never straddle folds; training uses every view, validation and test the plain view).
* C is chosen coarse-to-fine on a log grid (CLIP's linear-probe protocol): one pass per decade, ascending and
  warm-started, stopped once CV accuracy has fallen twice past its best, then half-decade refinement around the best
  (typically 6 to 9 fits per fold instead of 100). A C on the edge
  of the grid is flagged.
* Fast path: features are normalized once per fold, and when codes have more dimensions than training rows the solver
  works in the span of the rows (one eigendecomposition per fold serves every C and both losses).
* With views, test accuracy is reported on plain views and with test-time augmentation (decision functions averaged
  over an image's views).
* Arrays whose in-memory fit would exceed ``max_memory`` (float32 training rows plus one normalized copy per fold)
  are fitted out of core: chunks streamed from the store into
  :class:`~sklearn.linear_model.SGDClassifier` ``partial_fit`` (hinge loss for ``linsvc``, log loss for ``logreg``).

Work is spread with joblib over (tap, pooling) tasks. Tasks carry the store *path*, so workers open the memory-mapped
arrays themselves, with no copy shipped per worker; any joblib backend (loky, threads, Dask) works.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from joblib import Parallel, delayed, parallel_config
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit, train_test_split
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from .linear import ProblemStack, fit_paths
from .probes import CLASSIFIERS, NORMALIZERS, PATH_LOSS, make_classifier, make_normalizer, make_probe
from .store import CodeStore

__all__ = ["SweepResult", "Split", "sweep", "make_split", "c_grid"]


def c_grid(c_min: float = 1e-4, c_max: float = 1e4) -> list[float]:
    """The coarse grid: one value per decade from ``c_min`` to ``c_max``."""
    if not 0 < c_min < c_max:
        raise ValueError(f"need 0 < c_min < c_max, got c_min={c_min}, c_max={c_max}.")
    lo, hi = math.log10(c_min), math.log10(c_max)
    n = int(round(hi - lo)) + 1
    return [float(10 ** v) for v in np.linspace(lo, hi, max(n, 2))]


@dataclass
class Split:
    """Rows of a store for training, CV folds and testing (all row indices into the store)."""

    train_rows: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]  # (fit rows, validation rows) in store row space
    test_rows: np.ndarray  # rows of the test store (or of the same store), all views
    views: int
    test_views: int


@dataclass
class SweepResult:
    """What a sweep found.

    Attributes
    ----------
    rows : list of dict
        One per (tap, pooling, normalizer, probe): dims, C, CV accuracy mean/std, test metrics, fit seconds.
    best : dict
        The row with the best CV accuracy (ties: fewer dimensions).
    estimator : Pipeline
        The best probe refit on every training row.
    test_predictions : dict
        ``sources``, ``labels``, ``predicted`` and ``scores`` of the best probe on the plain test views.
    classes : list of str
    """

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    estimator: Pipeline
    test_predictions: dict[str, Any]
    classes: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    extractor: dict[str, Any] = field(default_factory=dict)


def make_split(store: CodeStore, *, test: CodeStore | None = None, test_size: float = 0.25, folds: int = 5, val_size: float | None = None, seed: int = 0) -> Split:
    """Stratified split by image: held-out test images (unless ``test`` is given) and CV folds on the rest."""
    per = store.views + 1
    labels = np.asarray(store.labels)[::per]
    if (labels < 0).any():
        raise ValueError(f"{store.path} has unlabeled images; a sweep needs labels (ImageFolder, CSV with labels, or labels=).")
    counts = np.bincount(labels)
    images = np.arange(len(labels))
    if test is None:
        if not 0 < test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
        train_img, test_img = train_test_split(images, test_size=test_size, stratify=labels, random_state=seed)
        train_img.sort()
        test_img.sort()
        test_rows, test_views = (test_img[:, None] * per + np.arange(per)).ravel(), store.views
    else:
        if test.classes != store.classes:
            raise ValueError(f"test store {test.path} has classes {test.classes[:5]}..., the train store {store.classes[:5]}...; they must match.")
        train_img, test_rows, test_views = images, np.arange(test.rows), test.views
    y_train = labels[train_img]
    smallest = np.bincount(y_train, minlength=len(counts))[np.bincount(y_train, minlength=len(counts)) > 0].min()
    if val_size is not None:
        splitter: Any = StratifiedShuffleSplit(n_splits=1, test_size=val_size, random_state=seed)
    else:
        if smallest < folds:
            raise ValueError(f"the smallest class has {smallest} training images, fewer than folds={folds}; lower --folds.")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_rows = []
    for fit_idx, val_idx in splitter.split(train_img, y_train):
        fit_rows = (train_img[fit_idx][:, None] * per + np.arange(per)).ravel()  # every view of fit images
        val_rows = train_img[val_idx] * per  # plain views only
        fold_rows.append((np.sort(fit_rows), np.sort(val_rows)))
    train_rows = (train_img[:, None] * per + np.arange(per)).ravel()
    return Split(train_rows, fold_rows, test_rows, store.views, test_views)


def _load(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(codes[rows], dtype=np.float32)


def _normalize(name: str, X_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    step = make_normalizer(name)
    if step == "passthrough":
        return [X_fit, *others]
    step.fit(X_fit)
    return [step.transform(X).astype(np.float32, copy=False) for X in (X_fit, *others)]


def _refine(best: float, grid: Sequence[float], c_min: float, c_max: float) -> list[float]:
    fine = [best * 10**s for s in (-0.5, 0.5)]
    return sorted(c for c in fine if c_min <= c <= c_max and all(abs(math.log10(c / g)) > 1e-9 for g in grid))


def _path_search(stack, val_data, loss, coarse, c_min, c_max, device, tol, max_iter, patience=1):
    """CV accuracy along the coarse grid (ascending, warm-started, stopped once accuracy has fallen for
    ``patience`` steps past its best) and then the refined grid.

    Returns ``{C: [accuracy per fold]}`` and ``{C: fold states}`` (solutions in each fold's solve coordinates).
    """
    scores: dict[float, list[float]] = {}
    states: dict[float, list] = {}

    def fit_at(C: float, inits: list | None) -> list:
        paths = fit_paths(stack, None, stack.n_classes, [C], loss, inits=inits, tol=tol, max_iter=max_iter, coefs=False)
        for (Z_val, y_val), path in zip(val_data, paths):
            A, b = path.states[0]
            scores.setdefault(C, []).append(float(((Z_val @ A + b).argmax(1).cpu().numpy() == y_val).mean()))
        states[C] = [path.states[0] for path in paths]
        return states[C]

    current, best, worse = None, None, 0
    for C in coarse:
        current = fit_at(C, current)
        if best is None or np.mean(scores[C]) > np.mean(scores[best]):
            best, worse = C, 0
        else:
            worse += 1
            if worse > patience:
                break
    fine = _refine(best, coarse, c_min, c_max)
    if fine:
        start = max([c for c in states if c <= fine[0]] or [min(states)])
        inits = states[start]
        for C in fine:
            inits = fit_at(C, inits)
    return scores, states


def _mean_solution(stack, fold_states) -> tuple[np.ndarray, np.ndarray]:
    """The folds' mean solution in feature space (d, K), (K,): a warm start for the final refit."""
    coefs = [basis.to_features(A).float().cpu().numpy() for basis, (A, _) in zip(stack.bases, fold_states)]
    return np.mean(coefs, 0), np.mean([b.float().cpu().numpy() for _, b in fold_states], 0)


def _sgd_search(folds_raw, name, coarse, c_min, c_max, seed):
    scores: dict[float, list[float]] = {}

    def run(Cs):
        for X_fit, y_fit, X_val, y_val in folds_raw:
            for C in Cs:
                clf = make_classifier(name, C, n_samples=len(y_fit), random_state=seed).fit(X_fit, y_fit)
                scores.setdefault(C, []).append(float((clf.predict(X_val) == y_val).mean()))

    run(coarse)
    best = max(coarse, key=lambda c: (np.mean(scores[c]), -c))
    run(_refine(best, coarse, c_min, c_max))
    return scores


def metrics_from_scores(scores: np.ndarray, y_rows: np.ndarray, views: int, classes: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Test metrics from decision scores of every test row (image-major, ``views + 1`` rows per image)."""
    per = views + 1
    plain = scores[::per]
    y = y_rows[::per]

    def predict(s: np.ndarray) -> np.ndarray:
        return classes[(s > 0).astype(int)] if s.ndim == 1 else classes[s.argmax(1)]

    pred = predict(plain)
    metrics = {
        "test_accuracy": float(accuracy_score(y, pred)),
        "test_balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "test_macro_f1": float(f1_score(y, pred, average="macro")),
    }
    if views:
        tta = scores.reshape(len(y), per, *scores.shape[1:]).mean(1)
        metrics["test_tta_accuracy"] = float(accuracy_score(y, predict(tta)))
    return metrics, pred, plain


def _evaluate_array(
    store_path: str, tap: str, pooling: str, split: Split, test_path: str | None, cfg: dict[str, Any]
) -> list[dict[str, Any]]:
    """All probes for one (tap, pooling): runs in a joblib worker, reading the store by path."""
    if cfg["threads"]:
        import torch

        torch.set_num_threads(cfg["threads"])
    store = CodeStore(store_path)
    test_store = CodeStore(test_path) if test_path else store
    codes = store.codes(tap, pooling)
    labels = np.asarray(store.labels)
    entry = next(a for a in store.arrays if a["tap"] == tap and a["pooling"] == pooling)
    n_classes = len(store.classes)
    # in memory: the float32 training rows plus one normalized copy per fold
    nbytes = len(split.train_rows) * codes.shape[1] * 4 * (len(split.folds) + 1)
    if cfg["max_memory"] is not None and nbytes > cfg["max_memory"]:
        from .streaming import evaluate_streaming

        return evaluate_streaming(store, test_store, tap, pooling, split, cfg)
    X_train = _load(codes, split.train_rows)
    y_train = labels[split.train_rows]
    X_test = _load(test_store.codes(tap, pooling), split.test_rows)
    y_test = np.asarray(test_store.labels)[split.test_rows]
    coarse = c_grid(cfg["c_min"], cfg["c_max"])
    out = []
    for norm in cfg["normalizers"]:
        started = time.perf_counter()
        folds_raw = []
        for fit_rows, val_rows in split.folds:
            # train_rows is sorted, so a row's position in X_train is a binary search away
            fit_i = np.searchsorted(split.train_rows, fit_rows)
            val_i = np.searchsorted(split.train_rows, val_rows)
            X_fit, X_val = _normalize(norm, X_train[fit_i], X_train[val_i])
            folds_raw.append((X_fit, y_train[fit_i], X_val, y_train[val_i]))
        stack = None
        prep_s = time.perf_counter() - started
        for probe in cfg["probes"]:
            t0 = time.perf_counter()
            if probe in PATH_LOSS:
                if stack is None:  # one basis per fold serves every C of both losses
                    t_basis = time.perf_counter()
                    stack = ProblemStack([f[0] for f in folds_raw], [f[1] for f in folds_raw], n_classes, cfg["device"])
                    val_data = [(basis.project(f[2]), f[3]) for basis, f in zip(stack.bases, folds_raw)]
                    prep_s += time.perf_counter() - t_basis
                scores, states = _path_search(stack, val_data, PATH_LOSS[probe], coarse, cfg["c_min"], cfg["c_max"], cfg["device"], cfg["cv_tol"], cfg["cv_max_iter"])
            else:
                scores, states = _sgd_search(folds_raw, probe, coarse, cfg["c_min"], cfg["c_max"], cfg["seed"]), {}
            best_c = max(scores, key=lambda c: (np.mean(scores[c]), -c))
            estimator = make_probe(probe, norm, best_c, n_samples=len(y_train), random_state=cfg["seed"], device=cfg["device"])
            if best_c in states and n_classes > 2:
                clf = estimator.named_steps["classify"]
                clf.set_params(warm_start=True)
                coef, intercept = _mean_solution(stack, states[best_c])
                clf.coef_, clf.intercept_ = coef.T, intercept
            estimator.fit(X_train, y_train)
            metrics, pred, plain_scores = metrics_from_scores(estimator.decision_function(X_test), y_test, split.test_views, estimator.classes_)
            cv = scores[best_c]
            out.append(
                {
                    "tap": tap,
                    "depth": int(entry.get("depth", -1)),
                    "pooling": pooling,
                    "dims": int(codes.shape[1]),
                    "normalizer": norm,
                    "probe": probe,
                    "solver": "path" if probe in PATH_LOSS else "sgd",
                    "C": float(best_c),
                    "C_at_edge": bool(best_c <= cfg["c_min"] * 1.0001 or best_c >= cfg["c_max"] * 0.9999),
                    "n_fits": int(sum(len(v) for v in scores.values())),
                    "cv_accuracy": float(np.mean(cv)),
                    "cv_std": float(np.std(cv)),
                    **metrics,
                    "fit_seconds": float(time.perf_counter() - t0 + prep_s / len(cfg["probes"])),
                    "_estimator": estimator,
                    "_pred": pred,
                    "_scores": plain_scores,
                }
            )
    return out


class MissingExtraError(ImportError):
    """An optional dependency (a cnncodes extra) is not installed."""


@contextmanager
def _joblib_backend(backend: str | None, scheduler: str | None) -> Iterator[None]:
    """``None``: the active joblib backend. ``"dask"``: a client to ``scheduler`` (address or scheduler file) or to a
    local cluster, closed afterwards."""
    if backend is None:
        if scheduler is not None:
            raise ValueError(f"scheduler={scheduler!r} needs backend='dask' (--backend dask).")
        yield
        return
    if backend != "dask":
        raise ValueError(f"backend={backend!r}; use 'dask', or leave it unset for the active joblib backend.")
    try:
        from distributed import Client
    except ImportError:
        raise MissingExtraError("backend='dask' needs dask.distributed: pip install 'cnncodes[dask]'.") from None
    if scheduler is None:
        client = Client(processes=True, dashboard_address=None)
    elif scheduler.endswith(".json") and os.path.isfile(scheduler):
        client = Client(scheduler_file=scheduler)
    else:
        try:
            client = Client(scheduler)  # waits distributed.comm.timeouts.connect (Dask config)
        except OSError as exc:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({exc}). Start one (`dask scheduler`) and give its "
                "tcp://HOST:PORT address, or a scheduler JSON file, or leave --scheduler out for a local cluster."
            ) from None
    try:
        with parallel_config(backend="dask"):
            yield
    finally:
        client.close()  # also stops the local cluster it started


def sweep(
    store: CodeStore | str | os.PathLike,
    *,
    test: CodeStore | str | os.PathLike | None = None,
    probes: Sequence[str] = ("logreg", "linsvc"),
    normalizers: Sequence[str] = ("standard",),
    taps: Iterable[str] | None = None,
    poolings: Iterable[str] | None = None,
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
    taps, poolings : iterables of str, optional
        Restrict the sweep to these.
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
    """
    store = store if isinstance(store, CodeStore) else CodeStore(store)
    test_store = None if test is None else (test if isinstance(test, CodeStore) else CodeStore(test))
    for name, allowed, given in (("probe", CLASSIFIERS, probes), ("normalizer", NORMALIZERS, normalizers)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ValueError(f"unknown {name} {bad or given!r}; use any of {list(allowed)}.")
    keys = [
        (t, p) for t, p in store.keys() if (taps is None or t in set(taps)) and (poolings is None or p in set(poolings))
    ]
    if not keys:
        raise ValueError(f"nothing to sweep: {store.path} holds {store.keys()} and the filter kept none.")
    if test_store is not None:
        missing = [k for k in keys if k not in test_store.keys()]
        if missing:
            raise ValueError(f"test store {test_store.path} lacks {missing[:3]}; extract it with the same --layers/--pool.")
    split = make_split(store, test=test_store, test_size=test_size, folds=folds, val_size=val_size, seed=seed)
    n_jobs = jobs if jobs != -1 else (os.cpu_count() or 1)
    cfg = {
        "probes": list(probes),
        "normalizers": list(normalizers),
        "c_min": c_min,
        "c_max": c_max,
        "seed": seed,
        "device": device,
        "max_memory": max_memory,
        "cv_tol": 2e-3,  # selection needs accuracies, not exact optima (warm-started, early-stopped); the refit is tight
        "cv_max_iter": 30,
        "threads": max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else 0,
    }
    tasks = (
        delayed(_evaluate_array)(str(store.path), t, p, split, str(test_store.path) if test_store else None, cfg)
        for t, p in keys
    )
    rows: list[dict[str, Any]] = []
    with _joblib_backend(backend, scheduler), tqdm(total=len(keys), desc="sweep", unit="array", disable=not progress, dynamic_ncols=True) as bar:
        for result in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
            rows.extend(result)
            bar.update(1)
    order = {k: i for i, k in enumerate(keys)}
    rows.sort(key=lambda r: (order[(r["tap"], r["pooling"])], r["normalizer"], r["probe"]))
    best = max(rows, key=lambda r: (r["cv_accuracy"], -r["dims"]))
    estimator, pred, scores = best.pop("_estimator"), best.pop("_pred"), best.pop("_scores")
    for r in rows:
        for k in ("_estimator", "_pred", "_scores"):
            r.pop(k, None)
    source = test_store or store
    per = split.test_views + 1
    plain_rows = split.test_rows[::per]
    test_predictions = {
        "sources": [source.sources[r // per] for r in plain_rows],
        "labels": np.asarray(source.labels)[plain_rows],
        "predicted": pred,
        "scores": scores,
    }
    config = {
        "store": str(store.path),
        "test_store": str(test_store.path) if test_store else None,
        "test_size": test_size if test_store is None else None,
        "folds": folds if val_size is None else None,
        "val_size": val_size,
        "seed": seed,
        "c_range": [c_min, c_max],
        "n_train_images": int(len(split.train_rows) // (split.views + 1)),
        "n_test_images": int(len(plain_rows)),
        "views": split.views,
    }
    best = {**best, **{k: config[k] for k in ("store", "n_train_images", "n_test_images")}}
    entry = next(a for a in store.arrays if a["tap"] == best["tap"] and a["pooling"] == best["pooling"])
    extractor = {
        "model": store.manifest.get("model", {}),
        "tap": best["tap"],
        "pooling": best["pooling"],
        "relu": bool(entry["rectified"]),
        "code_dtype": entry["dtype"],
        "dims": int(entry["shape"][1]),
    }
    return SweepResult(rows, best, estimator, test_predictions, store.classes, config, extractor)
