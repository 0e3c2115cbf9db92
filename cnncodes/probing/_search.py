"""Layer sweeps: a linear probe per (tap, pooling, normalizer, classifier), compared honestly, best one picked.

Protocol
--------
* A stratified held-out test split of *images* (default 25 %, fixed seed), or a separate test store, is used once, for
  the final numbers only. Selection uses cross-validation on the training images only.
* Every candidate is evaluated on the same folds (stratified k-fold over images, so the augmented views of one image
  never straddle folds; training uses every view, validation and test the plain view).
* C is chosen coarse-to-fine on a log grid, after CLIP's linear-probe protocol (Radford et al. 2021, "Learning
  Transferable Visual Models From Natural Language Supervision", appendix A.3: the L2 strength is swept "over the
  range between 10^-6 and 10^6, with 96 logarithmically spaced steps" by a parametric binary search). One value per
  decade, ascending and warm-started, stopped once CV accuracy has fallen twice past its best; then a binary search
  around the best: the values 1/2 decade either side, then 1/4, ... down to 1/``c_steps_per_decade`` decade, each
  round around the best so far, each fit warm-started from the nearest C solved. The default, 2 steps per decade, is
  half-decade refinement (typically 6 to 9 fits per fold); ``c_min=1e-6, c_max=1e6, c_steps_per_decade=8`` resolves
  C to CLIP's 1/8 decade (its 97-value grid) with at most 13 + 6 fits per fold instead of 97. A C on the edge of the
  grid is flagged.
* Fast path: features are normalized once per fold; all folds are solved in one batched L-BFGS (each fold with its
  own curvature, step and stopping test); when codes have more dimensions than training rows the solver works in
  the span of the rows (one Cholesky factorization of the Gram matrix per fold serves every C and both losses).
* With views, test accuracy is reported on plain views and with test-time augmentation (decision functions averaged
  over an image's views).
* Arrays whose in-memory fit would exceed ``max_memory`` (float32 training rows plus one normalized copy per fold)
  are fitted out of core: chunks streamed from the store into
  :class:`~sklearn.linear_model.SGDClassifier` ``partial_fit`` (hinge loss for ``linsvc``, log loss for ``logreg``).

Work is spread with joblib over (tap, pooling) tasks, largest first, in threads unless a joblib backend is chosen
(loky processes and Dask work too); narrow arrays, whose searches are bound by per-operation overhead under the GIL,
are packed into tasks that search them one after the other. Codes may be any
array-like with ``shape`` and NumPy indexing: in-memory arrays, memmaps, or a store's lazy handles, which pickle as
a path so workers read the codes themselves instead of receiving a copy.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Container, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from joblib import Parallel, delayed, parallel_config
from joblib.parallel import get_active_backend
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit, train_test_split
from tqdm.auto import tqdm

from ..errors import MissingExtraError, ParameterError, SchedulerError
from ._fewshot import check_shots, evaluate_few_shot
from ._knn import evaluate_knn
from ._linear import _SPAN_FACTOR, ProblemStack, fit_paths
from ._multilabel import MultilabelStratifiedFolds, check_multilabel_split, evaluate_multilabel, stratified_subsets
from ._probes import PATH_LOSS, make_classifier, make_probe
from ._results import COSTS, Split, SweepConfig, SweepResult, SweepRow, best_of
from ._scoring import PENDING_TEST, Fitted, c_grid, load_rows, metrics_from_scores, normalized_folds, pack_hits
from ._stats import annotate_rows, fold_sizes, pick_cheapest, probe_bytes, row_evidence, stability
from ._streaming import chunk_rows_for, decision_in_chunks, evaluate_streaming
from ._transfer import array_scores, images_within, rows_within, subsample
from ._triage import transfer_record, triaged_search

__all__ = ["sweep_codes", "split_images", "evaluate_codes", "joblib_backend", "config_from"]


def split_images(
    labels: np.ndarray, views: int, config: SweepConfig, *, test_rows: int | None = None, test_views: int = 0
) -> Split:
    """Stratified split by image: held-out test images (unless a separate test set of ``test_rows`` rows is given)
    and CV folds on the rest. Multi-label ``labels`` (rows x classes) are stratified per class (iteratively).

    ``labels`` has one entry per row (image-major, ``views + 1`` rows per image); augmented views of an image always
    land on the same side of every split, and validation and test use plain views only.
    """
    per = views + 1
    labels = np.asarray(labels)
    if len(labels) % per:
        raise ParameterError(f"{len(labels)} rows is not a whole number of images with views={views}.")
    labels = labels[::per]
    if labels.ndim == 2:  # multi-label: stratified per class (check_multilabel_split checks every class's coverage)
        images = np.arange(len(labels))
        if test_rows is None:
            side = stratified_subsets(labels, [config.test_size, 1 - config.test_size], config.seed)
            train_img, test_img = np.flatnonzero(side == 1), np.flatnonzero(side == 0)
            test, test_views = (test_img[:, None] * per + np.arange(per)).ravel(), views
        else:
            train_img, test = images, np.arange(test_rows)
        folds = MultilabelStratifiedFolds(config.folds, config.val_size, config.seed)
        return _fold_split(train_img, labels[train_img], folds, per, test, views, test_views)
    if (labels < 0).any():
        raise ParameterError("some images are unlabeled (label -1); a sweep needs labels (ImageFolder, CSV with "
                             "labels, or labels=).")  # fmt: skip
    images = np.arange(len(labels))
    counts = np.bincount(labels)
    held_out = test_rows is None
    if held_out and counts[counts > 0].min() < 2:
        rare = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))[:5]]
        raise ParameterError(f"classes {rare} have a single image; a stratified held-out test split needs at least 2 "
                             "per class. Add images, drop those classes, or give a separate test set (--test).")  # fmt: skip
    if held_out:
        n_test = int(round(config.test_size * len(labels)))
        if not len(counts[counts > 0]) <= n_test <= len(labels) - len(counts[counts > 0]):
            raise ParameterError(f"test_size={config.test_size} holds out {n_test} of {len(labels)} images, but every one "
                                 f"of the {int((counts > 0).sum())} classes needs an image on each side; choose a "
                                 "test_size between those bounds.")  # fmt: skip
    if test_rows is None:
        train_img, test_img = train_test_split(
            images, test_size=config.test_size, stratify=labels, random_state=config.seed
        )
        train_img.sort()
        test_img.sort()
        test, test_views = (test_img[:, None] * per + np.arange(per)).ravel(), views
    else:
        train_img, test = images, np.arange(test_rows)
    y_train = labels[train_img]
    counts = np.bincount(y_train)
    smallest = counts[counts > 0].min()
    if config.val_size is not None:
        n_val = int(np.ceil(config.val_size * len(train_img)))
        n_cls = int((np.bincount(y_train) > 0).sum())
        if not n_cls <= n_val <= len(train_img) - n_cls:
            raise ParameterError(f"val_size={config.val_size} gives {n_val} validation images of {len(train_img)}, but "
                                 f"each of the {n_cls} classes needs one on each side; choose a larger or smaller "
                                 "--val-size, or k-fold (--folds).")  # fmt: skip
        splitter: Any = StratifiedShuffleSplit(n_splits=1, test_size=config.val_size, random_state=config.seed)
    else:
        if smallest < config.folds:
            raise ParameterError(f"the smallest class has {smallest} training images, fewer than folds={config.folds}; "
                                 "lower --folds.")  # fmt: skip
        splitter = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    return _fold_split(train_img, y_train, splitter, per, test, views, test_views)


def _fold_split(train_img: np.ndarray, y_train: np.ndarray | None, splitter: Any, per: int, test: np.ndarray,
                views: int, test_views: int) -> Split:  # fmt: skip
    """The Split of training images ``train_img`` into ``splitter``'s folds: fit rows every view, validation plain."""
    fold_rows = []
    for fit_idx, val_idx in splitter.split(train_img, y_train):
        fit_rows = (train_img[fit_idx][:, None] * per + np.arange(per)).ravel()  # every view of fit images
        val_rows = train_img[val_idx] * per  # plain views only
        fold_rows.append((np.sort(fit_rows), np.sort(val_rows)))
    train_rows = (train_img[:, None] * per + np.arange(per)).ravel()
    return Split(train_rows, fold_rows, test, views, test_views)


def _refinements(steps_per_decade: int) -> list[int]:
    """Half-widths of the refinement rounds, in lattice steps of 1/``steps_per_decade`` decade: half a decade first,
    then halved (rounded up) down to one step. 8 per decade: 4, 2, 1 (1/2, 1/4, 1/8 decade); 2: 1; 1: none."""
    widths, h = [], steps_per_decade // 2
    while h >= 1:
        widths.append(h)
        h = (h + 1) // 2 if h > 1 else 0
    return widths


def _refine(best: int, width: int, last: int, done: Container[int]) -> list[int]:
    """The lattice indices ``width`` steps either side of ``best`` that lie in ``[0, last]`` and are not yet fitted."""
    return [i for i in (best - width, best + width) if 0 <= i <= last and i not in done]


def _best(scores: Mapping[Any, list[float]]) -> Any:
    """The key with the best mean CV accuracy; ties go to the smaller C (stronger regularization)."""
    return max(scores, key=lambda c: (np.mean(scores[c]), -c))


def _path_search(stack, val_data, loss, lattice, steps, tol, max_iter, patience=1):
    """C chosen coarse-to-fine on ``lattice`` (``steps`` values per decade, the coarse grid every ``steps``-th).

    The coarse pass goes up one value per decade, warm-started, and stops once CV accuracy has fallen for
    ``patience`` + 1 steps past its best. Then a binary search: the two values half a decade either side of the best,
    then a quarter, ... down to one lattice step, each round around the best so far; every fit is warm-started from
    the nearest C already solved, and its L-BFGS from the curvature of the fit before.

    Returns ``{C: [accuracy per fold]}``, ``{C: fold states}`` (solutions in each fold's solve coordinates) and
    ``{C: out-of-fold hits}`` (every validation image, fold after fold).
    """
    scores: dict[int, list[float]] = {}
    states: dict[int, list] = {}
    hits: dict[int, np.ndarray] = {}  # out-of-fold correctness, the folds' validation images one after the other
    memory: dict = {}  # L-BFGS curvature carried from each fit to the next

    def fit_at(i: int, inits: list | None) -> list:
        paths = fit_paths(stack, None, stack.n_classes, [lattice[i]], loss, inits=inits, tol=tol, max_iter=max_iter,
                          coefs=False, memory=memory)  # fmt: skip
        right = []
        for (Z_val, y_val), path in zip(val_data, paths):
            A, b = path.states[0]
            right.append((Z_val @ A + b).argmax(1).cpu().numpy() == y_val)
        scores[i] = [float(r.mean()) for r in right]
        hits[i] = np.concatenate(right)
        states[i] = [path.states[0] for path in paths]
        return states[i]

    current, best, worse = None, None, 0
    for i in range(0, len(lattice), steps):
        current = fit_at(i, current)
        if best is None or np.mean(scores[i]) > np.mean(scores[best]):
            best, worse = i, 0
        else:
            worse += 1
            if worse > patience:
                break
    for width in _refinements(steps):
        for i in _refine(_best(scores), width, len(lattice) - 1, scores):
            fit_at(i, states[min(states, key=lambda j: (abs(j - i), j))])  # nearest solved C, the smaller on ties
    return ({lattice[i]: v for i, v in scores.items()}, {lattice[i]: v for i, v in states.items()},
            {lattice[i]: v for i, v in hits.items()})  # fmt: skip


def _mean_solution(stack, fold_states) -> tuple[np.ndarray, np.ndarray]:
    """The folds' mean solution in feature space (d, K), (K,): a warm start for the final refit."""
    coefs = [basis.to_features(A).float().cpu().numpy() for basis, (A, _) in zip(stack.bases, fold_states)]
    return np.mean(coefs, 0), np.mean([b.float().cpu().numpy() for _, b in fold_states], 0)


def _sgd_search(folds_raw, name, lattice, steps, seed):
    """CV accuracy of SGD probes: the whole coarse grid, then the binary search of :func:`_path_search` (no warm
    starts)."""
    scores: dict[int, list[float]] = {}
    hits: dict[int, list[np.ndarray]] = {}

    def run(indices):
        for X_fit, y_fit, X_val, y_val in folds_raw:
            for i in indices:
                clf = make_classifier(name, lattice[i], n_samples=len(y_fit), random_state=seed).fit(X_fit, y_fit)
                right = clf.predict(X_val) == y_val
                scores.setdefault(i, []).append(float(right.mean()))
                hits.setdefault(i, []).append(right)

    run(range(0, len(lattice), steps))
    for width in _refinements(steps):
        run(_refine(_best(scores), width, len(lattice) - 1, scores))
    return {lattice[i]: v for i, v in scores.items()}, {lattice[i]: np.concatenate(v) for i, v in hits.items()}


def evaluate_codes(
    codes: Any,
    labels: np.ndarray,
    test_codes: Any,
    test_labels: np.ndarray,
    split: Split,
    config: SweepConfig,
    *,
    tap: str,
    pooling: str,
    depth: int = -1,
    n_classes: int | None = None,
    test_now: bool = True,
) -> list[tuple[SweepRow, Fitted]]:
    """Every probe x normalizer on one array of codes: C chosen by CV on the training rows, then refit and tested.

    ``codes``/``test_codes`` are (rows, dims) array-likes (the same object when the test images are held out of it).
    Runs in a joblib worker; out of core when the fit would exceed ``config.max_memory``. ``test_now=False`` leaves
    the test rows unread: the rows' test numbers are NaN until :func:`score_on_test` fills them in.
    """
    with _torch_threads(config.threads):
        return _evaluate(codes, labels, test_codes, test_labels, split, config, tap=tap, pooling=pooling, depth=depth,
                         n_classes=n_classes, test_now=test_now)  # fmt: skip


_THREADS_LOCK = threading.Lock()
_THREADS_HELD = {"tasks": 0, "before": 0}


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Torch intra-op threads for one task (0: leave them). Tasks may be threads of one process, so the caller's
    setting comes back when the last of the concurrent tasks ends, not when the first does."""
    if not threads:
        yield
        return
    import torch

    with _THREADS_LOCK:
        if _THREADS_HELD["tasks"] == 0:
            _THREADS_HELD["before"] = torch.get_num_threads()
        _THREADS_HELD["tasks"] += 1
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_HELD["tasks"] -= 1
            if _THREADS_HELD["tasks"] == 0:
                torch.set_num_threads(_THREADS_HELD["before"])


def _evaluate(codes: Any, labels: np.ndarray, test_codes: Any, test_labels: np.ndarray, split: Split,
              config: SweepConfig, *, tap: str, pooling: str, depth: int, n_classes: int | None,
              test_now: bool = True) -> list[tuple[SweepRow, Fitted]]:  # fmt: skip
    labels = np.asarray(labels)
    test_labels = np.asarray(test_labels)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    if config.max_memory is not None and _fit_bytes(codes.shape[1], split) > config.max_memory:
        return evaluate_streaming(
            codes,
            labels,
            test_codes,
            test_labels,
            split,
            config,
            tap=tap,
            pooling=pooling,
            depth=depth,
            n_classes=n_classes,
            test_now=test_now,
        )
    X_train = load_rows(codes, split.train_rows, f"{tap}/{pooling}")
    y_train = labels[split.train_rows]
    X_test = load_rows(test_codes, split.test_rows, f"{tap}/{pooling} (test)") if test_now else None
    y_test = test_labels[split.test_rows]
    steps = config.c_steps_per_decade
    lattice = c_grid(config.c_min, config.c_max, steps)
    out = []
    for norm in config.normalizers:
        started = time.perf_counter()
        folds_raw = list(normalized_folds(norm, X_train, y_train, split))
        stack = None
        prep_s = time.perf_counter() - started
        for probe in config.probes:
            t0 = time.perf_counter()
            if probe in PATH_LOSS:
                if stack is None:  # one basis per fold serves every C of both losses
                    t_basis = time.perf_counter()
                    stack = ProblemStack([f[0] for f in folds_raw], [f[1] for f in folds_raw], n_classes, config.device)
                    val_data = [(basis.project(f[2]), f[3]) for basis, f in zip(stack.bases, folds_raw)]
                    prep_s += time.perf_counter() - t_basis
                scores, states, fold_hits = _path_search(
                    stack,
                    val_data,
                    PATH_LOSS[probe],
                    lattice,
                    steps,
                    config.cv_tol,
                    config.cv_max_iter,
                )
            else:
                (scores, fold_hits), states = _sgd_search(folds_raw, probe, lattice, steps, config.seed), {}
            best_c = _best(scores)
            estimator = make_probe(
                probe, norm, best_c, n_samples=len(y_train), random_state=config.seed, device=config.device
            )
            if best_c in states and n_classes > 2:
                clf = estimator.named_steps["classify"]
                clf.set_params(warm_start=True)
                coef, intercept = _mean_solution(stack, states[best_c])
                clf.coef_, clf.intercept_ = coef.T, intercept
            estimator.fit(X_train, y_train)
            metrics, pred, plain_scores = (
                metrics_from_scores(estimator.decision_function(X_test), y_test, split.test_views, estimator.classes_)
                if test_now else (dict(PENDING_TEST), None, None)
            )  # fmt: skip
            cv = scores[best_c]
            row = SweepRow(
                tap=tap,
                pooling=pooling,
                depth=int(depth),
                dims=int(codes.shape[1]),
                normalizer=norm,
                probe=probe,
                solver="path" if probe in PATH_LOSS else "sgd",
                C=float(best_c),
                C_at_edge=bool(best_c <= config.c_min * 1.0001 or best_c >= config.c_max * 0.9999),
                n_fits=int(sum(len(v) for v in scores.values())),
                cv_accuracy=float(np.mean(cv)),
                cv_std=float(np.std(cv)),
                **metrics,
                cv_folds=[float(v) for v in cv],
                cv_hits=pack_hits(fold_hits[best_c]),
                fit_seconds=float(time.perf_counter() - t0 + prep_s / len(config.probes)),
            )
            out.append((row, Fitted(estimator, pred, plain_scores)))
    return out


def _rows_bytes(dims: int, split: Split) -> int:
    """Bytes of ``dims``-dim float32 training and test rows, a normalized copy of the training rows per fold and one
    for the refit."""
    train = len(split.train_rows)
    return 4 * dims * (train + len(split.test_rows) + (len(split.folds) + 1) * train)


def _fit_bytes(dims: int, split: Split) -> int:
    """Bytes an in-memory search of ``dims``-dim codes holds at its peak: :func:`_rows_bytes`, and the solver's copies
    of every fold's fit rows and of the refit's rows (the stack's ``Z`` and ``ZT``; in the span of the rows, when the
    codes are wider than ``_SPAN_FACTOR`` times them, rows x rows: those two, the basis' float32 and float64 factors,
    and once the float64 copy of the rows a factor is built from)."""

    def kept(n: int) -> int:  # float32 words the solver keeps for a problem of n rows
        return 5 * n * n if dims > _SPAN_FACTOR * n else 2 * n * dims

    fit, train = max(len(rows) for rows, _ in split.folds), len(split.train_rows)
    built = 2 * train * dims if dims > _SPAN_FACTOR * fit else 0  # transient, one problem at a time
    return _rows_bytes(dims, split) + 4 * (len(split.folds) * kept(fit) + kept(train) + built)


def _check_in_memory(what: str, fix: str, keys: Sequence[Hashable], dims: Mapping[Hashable, int], split: Split,
                     config: SweepConfig) -> None:  # fmt: skip
    """Refuse, before any work, rows that hold every training row in memory beyond ``config.max_memory``."""
    for k in keys:
        need = _rows_bytes(dims[k], split)
        if config.max_memory is not None and need > config.max_memory:
            name = " / ".join(part for part in _candidate_name(k) if part)
            raise ParameterError(f"{what} hold every training row in memory: {name} needs about "
                                 f"{need / 2**20:.1f} MiB, over max_memory="
                                 f"{config.max_memory} bytes (--max-memory). Raise it, or {fix}.")  # fmt: skip


@contextmanager
def joblib_backend(backend: str | None, scheduler: str | None) -> Iterator[None]:
    """``None``: the active joblib backend. ``"dask"``: a client to ``scheduler`` (address or scheduler file) or to a
    local cluster, closed afterwards."""
    if backend is None:
        if scheduler is not None:
            raise ParameterError(f"scheduler={scheduler!r} needs backend='dask' (--backend dask).")
        yield
        return
    if backend != "dask":
        raise ParameterError(f"backend={backend!r}; use 'dask', or leave it unset for the active joblib backend.")
    try:
        from distributed import Client
    except ImportError:
        raise MissingExtraError("backend='dask' needs dask.distributed: pip install 'cnncodes[dask]'.") from None
    if scheduler is None:
        client = Client(processes=True, dashboard_address=None)
    else:
        if scheduler.endswith(".json") and not os.path.isfile(scheduler):
            raise SchedulerError(f"the scheduler file {scheduler!r} does not exist; give the file `dask scheduler "
                                 "--scheduler-file` wrote, or a tcp://HOST:PORT address.")  # fmt: skip
        try:  # waits distributed.comm.timeouts.connect (Dask config)
            client = Client(scheduler_file=scheduler) if scheduler.endswith(".json") else Client(scheduler)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError/KeyError: a malformed address or file
            raise SchedulerError(
                f"cannot reach the Dask scheduler at {scheduler!r} ({exc}). Start one (`dask scheduler`) and give its "
                "tcp://HOST:PORT address, or a scheduler JSON file, or leave --scheduler out for a local cluster."
            ) from None
    try:
        with parallel_config(backend="dask"):
            yield
    finally:
        client.close()  # also stops the local cluster it started


def sweep_codes(
    codes: Mapping[Hashable, Any],
    labels: Any,
    config: SweepConfig | None = None,
    *,
    test: Mapping[Hashable, Any] | None = None,
    test_labels: Any = None,
    views: int = 0,
    test_views: int = 0,
    classes: Sequence[str] | None = None,
    depths: Mapping[Hashable, int] | None = None,
    sources: Sequence[str] | None = None,
    test_sources: Sequence[str] | None = None,
    costs: Mapping[Hashable, Mapping[str, Any]] | None = None,
    late_costs: Callable[[list[Hashable]], Mapping[Hashable, Mapping[str, Any]]] | None = None,
    jobs: int = 1,
    progress: bool = False,
    backend: str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> SweepResult:
    """Probe every array of codes in memory and pick the best: arrays and labels in, a :class:`SweepResult` out.

    The store-based :func:`cnncodes.sweep` calls this with the store's arrays; use it directly for codes you hold
    yourself (from :class:`cnncodes.CNNCodes`, another library, or a store's arrays you filtered).

    Parameters
    ----------
    codes : mapping of key to array-like of shape (n_rows, dims)
        One array per candidate. A key is a tap name, a ``(tap, pooling)`` pair, or a ``(backbone, tap, pooling)``
        triple when the codes come from several models of the same images. Rows are image-major with
        ``views + 1`` rows per image (view 0 plain).
    labels : array-like of int or str, shape (n_rows,)
        Class of every row; strings are mapped to sorted class names.
    config : SweepConfig, optional
        How every candidate is fitted, scored, compared and picked (probes, folds, C grid, ``pick``, ``repeats``...);
        default ``SweepConfig()``.
    test, test_labels : optional
        A separate test set with the same keys (otherwise ``test_size`` of the images are held out, stratified).
    views, test_views : int, default=0
        Augmented views per image in ``codes`` and in ``test``.
    classes : list of str, optional
        Class names of integer labels.
    depths : mapping of key to int, optional
        Forward-order position of each tap (for tables and plots).
    sources, test_sources : list of str, optional
        One id per image, for the test predictions.
    costs : mapping of key to dict, optional
        What each array costs when deployed: ``flops`` (forward FLOPs per image up to its tap), and optionally
        ``params``, ``latency_ms_batch1``, ``latency_ms_batch64``, ``code_bytes``. ``config.pick="cheapest"`` needs
        ``flops`` for every array; :func:`cnncodes.sweep` measures them for a store.
    late_costs : callable, optional
        ``late_costs(keys)`` -> costs of those keys, called once with the arrays actually searched (a triaged sweep
        skips the rest) and merged over ``costs``: for what is slow to measure, such as latency.
    jobs : int, default=1
        joblib workers (``-1``: all cores); runs under the active joblib backend.
    progress : bool, default=False
    backend, scheduler
        ``backend="dask"`` runs the tasks on a Dask cluster (the ``dask`` extra): ``scheduler`` is its address or
        scheduler file, default a local cluster.
    **options
        Deprecated: :class:`SweepConfig` fields as keywords (``probes=``, ``folds=``...), which build the config. Pass
        ``config=SweepConfig(...)`` instead; the keywords go in the next release.

    Returns
    -------
    SweepResult
        Equal on any backend: tasks are seeded and independent of where they run. Every row carries its intervals and
        its paired tests against the best row (see ``SweepResult.to_dict()["statistics"]``).

    Examples
    --------
    >>> import numpy as np, cnncodes
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(60) % 3
    >>> codes = {"good": rng.normal(size=(60, 5)) + y[:, None], "noise": rng.normal(size=(60, 5))}
    >>> cnncodes.sweep_codes(codes, y, cnncodes.SweepConfig(probes=("logreg",), folds=3)).best.tap
    'good'
    """
    if type(jobs) is not int or jobs == 0 or jobs < -1 or jobs > 4096:
        raise ParameterError(
            f"jobs={jobs!r}; use 1 to 4096 workers, or -1 for all cores (or every Dask worker thread)."
        )
    config = config_from(config, options, "sweep_codes")
    n_jobs = jobs if jobs != -1 else (os.cpu_count() or 1)
    config = replace(config, threads=max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else 0)
    keys = list(codes)
    if not keys:
        raise ParameterError("codes is empty: give at least one array of codes.")
    y, class_names = _encode_labels(labels, classes, "labels")
    arrays = {k: _check_codes(codes[k], len(y), f"codes[{k!r}]") for k in keys}
    if test is None:
        if test_labels is not None:
            raise ParameterError("test_labels given without test codes; pass test= too, or leave both out.")
        test_arrays, y_test = arrays, y
    else:
        if test_labels is None:
            raise ParameterError("test codes given without test_labels.")
        missing = [k for k in keys if k not in test]
        if missing:
            raise ParameterError(f"the test codes lack {missing[:3]}; give test arrays for every key of codes.")
        y_test, _ = _encode_labels(test_labels, class_names, "test_labels")
        test_arrays = {k: _check_codes(test[k], len(y_test), f"test[{k!r}]") for k in keys}
    if (y.ndim == 2) != (y_test.ndim == 2):
        raise ParameterError("labels and test_labels must both be multi-label (0/1 matrices) or both single-label.")
    if not set(config.probes) - {"knn"}:
        raise ParameterError("probes=['knn'] alone: the kNN row is a baseline next to linear probes, which the sweep "
                             "picks its best from; add logreg, linsvc or sgd.")  # fmt: skip
    costs = _check_costs(costs, keys, config)
    job = _Job(arrays, test_arrays, y, y_test, class_names, {k: _candidate_name(k) for k in keys},
               {k: int((depths or {}).get(k, -1)) for k in keys}, views, test_views,
               None if test is None else len(y_test), jobs, progress)  # fmt: skip
    with joblib_backend(backend, scheduler):
        split, results, (scored, score_sample), triage = _search_all(job, config)
        searched = list(dict.fromkeys(job.key_of[(r.backbone, r.tap, r.pooling)] for r, _ in results))
        redrawn = [_sweep_split(job, replace(config, seed=config.seed + r), extras=False, keys=searched)
                   for r in range(1, config.repeats)]  # fmt: skip
    rows = [r for r, _ in results]
    if late_costs is not None:
        late = _check_costs(late_costs(searched), keys, replace(config, pick="best"))
        costs = {k: {**costs.get(k, {}), **late.get(k, {})} for k in set(costs) | set(late)}
    _attach_costs(results, job, costs)
    best_row = best_of(rows)
    per = split.test_views + 1
    plain_rows = split.test_rows[::per]
    sizes = fold_sizes(split, views)
    evidence = {id(r): row_evidence(r, f, y_test[plain_rows]) for r, f in results}
    annotate_rows(rows, [evidence[id(r)] for r in rows], best_row, sizes, config)
    # one validation split has no folds to test on: without a tolerance, no row is shown equal to the best
    testable = config.val_size is None or config.tolerance is not None
    cheapest = pick_cheapest(rows, best_row, config) if costs and testable else None
    data = {"n_train_images": int(len(split.train_rows) // (views + 1)), "n_test_images": int(len(plain_rows)),
            "views": views, "test_views": split.test_views, "multilabel": y.ndim == 2,
            "split_digest": _split_digest(split, y, y_test, sources, test_sources if test is not None else None),
            "fold_sizes": list(sizes)}  # fmt: skip
    if redrawn:
        data["stability"] = stability(rows, [[r for r, _ in res] for _, res in redrawn])
    if config.scores:
        data["transferability"] = transfer_record(rows, best_row, scored, {k: job.names[k] for k in keys}, config)
        data["transferability"]["sample"] = score_sample  # the training images the scores read, one set for all
    if triage is not None:
        data["triage"] = triage
    chosen = cheapest if config.pick == "cheapest" and cheapest is not None else best_row
    fit = next(f for r, f in results if r is chosen)
    ids = test_sources if test is not None else sources
    predictions = {
        "sources": [ids[r // per] if ids is not None else str(r // per) for r in plain_rows],
        "labels": y_test[plain_rows],
        "predicted": fit.predicted,
        "scores": fit.scores,
    }
    return SweepResult(rows, best_row, fit.estimator, predictions, class_names, config, data, cheapest=cheapest)


def config_from(config: SweepConfig | None, options: Mapping[str, Any], where: str) -> SweepConfig:
    """``config``, or one built from the deprecated keyword arguments of ``where`` (with a DeprecationWarning)."""
    if config is not None and not isinstance(config, SweepConfig):
        raise ParameterError(f"{where}: config must be a SweepConfig, got {type(config).__name__}; pass "
                             "config=cnncodes.SweepConfig(probes=('logreg',), folds=3).")  # fmt: skip
    if not options:
        return config or SweepConfig()
    known = {f.name for f in fields(SweepConfig)} - {"threads"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    warnings.warn(f"{where}({', '.join(f'{k}=' for k in options)}) is deprecated and goes in the next release: pass "
                  f"config=cnncodes.SweepConfig({', '.join(f'{k}=...' for k in options)}) instead.", DeprecationWarning,
                  stacklevel=3)  # fmt: skip
    values = {k: tuple(v) if k in ("probes", "normalizers", "shots") and not isinstance(v, (str, int)) else v
              for k, v in options.items()}  # fmt: skip
    return replace(config or SweepConfig(), **values)


@dataclass
class _Job:
    """What every draw of a sweep's split shares: the arrays, labels, names and how to run the tasks."""

    arrays: dict[Hashable, Any]
    test_arrays: dict[Hashable, Any]
    y: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    names: dict[Hashable, tuple[str, str, str]]
    depth_of: dict[Hashable, int]
    views: int
    test_views: int
    test_rows: int | None  # rows of a separate test set, or None when the test images are held out
    jobs: int
    progress: bool

    def where(self, k: Hashable) -> dict[str, Any]:
        backbone, tap, pooling = self.names[k]
        return {"tap": tap, "pooling": pooling, "depth": self.depth_of[k], "backbone": backbone}

    def what(self, k: Hashable) -> str:
        """How errors name array ``k``: ``tap/pooling``, as the probes' own loaders do, the backbone first when the
        sweep has several."""
        backbone, tap, pooling = self.names[k]
        several = len({name[0] for name in self.names.values()}) > 1
        return f"{backbone} {tap}/{pooling}" if several and backbone else f"{tap}/{pooling}"

    @property
    def key_of(self) -> dict[tuple[str, str, str], Hashable]:
        """The key of codes of a row's (backbone, tap, pooling)."""
        return {name: k for k, name in self.names.items()}


def _sweep_split(job: _Job, config: SweepConfig, *, extras: bool,
                 keys: Sequence[Hashable] | None = None) -> tuple[Split, list[tuple[SweepRow, Any]]]:  # fmt: skip
    """Split the images by ``config.seed`` and evaluate every candidate of ``keys`` (default all) on that split: the
    rows in the order of the codes, each with its fitted probe (``None`` for few-shot rows). ``extras=False`` leaves
    out the kNN and few-shot rows (a redrawn split of ``repeats`` compares the rows that compete for the best)."""
    keys = list(job.arrays) if keys is None else list(keys)
    split = _split_checked(job, config, extras=extras)
    results = _linear_results(job, config, split, keys)
    if extras:
        results += _extra_results(job, config, split, keys, results)
    return split, _in_order(job, results)


def _split_checked(job: _Job, config: SweepConfig, *, extras: bool) -> Split:
    """The split of ``config.seed``, with what the protocols asked for checked on it before any work."""
    keys, y, y_test = list(job.arrays), job.y, job.y_test
    split = split_images(y, job.views, config, test_rows=job.test_rows, test_views=job.test_views)
    if y.ndim == 1:
        present = [job.class_names[int(c)] for c in np.unique(y[split.train_rows]) if 0 <= c < len(job.class_names)]
        if len(present) < 2:
            raise ParameterError(f"the training images hold {len(present)} class ({', '.join(present) or 'none'}); a probe needs at "
                                 "least 2. Add images of another class (one sub-folder per class, or a label column "
                                 "in the CSV); nothing was computed.")  # fmt: skip
    if y.ndim == 2:
        if "knn" in config.probes or config.shots:
            raise ParameterError("the kNN and few-shot rows are single-label protocols; a multi-label sweep (a CSV "
                                 "with cat;dog labels) takes linear probes only: drop knn and --shots.")  # fmt: skip
        check_multilabel_split(y, split, job.class_names, y_test)
    if extras and config.shots:
        check_shots(config.shots, y, split, job.class_names)
    dims = {k: int(job.arrays[k].shape[1]) for k in keys}
    if extras and "knn" in config.probes:  # a kNN classifier is its training rows
        _check_in_memory("kNN baseline rows", "drop knn from --probes", keys, dims, split, config)
    if y.ndim == 2:  # scikit-learn's one-vs-rest search fits in memory
        _check_in_memory("multi-label probes", "sweep fewer or narrower arrays (--taps, --poolings)", keys, dims, split,
                         config)  # fmt: skip
    return split


def _linear_results(job: _Job, config: SweepConfig, split: Split, keys: Sequence[Hashable], *,
                    test_now: bool = True, what: str | None = None) -> list[tuple[SweepRow, Any]]:  # fmt: skip
    """The linear (or multi-label) rows of ``keys`` on ``split``, each with its fitted probe."""
    y, y_test, n_classes = job.y, job.y_test, len(job.class_names)
    linear = replace(config, probes=tuple(p for p in config.probes if p != "knn"))
    arrays, test_arrays, where = job.arrays, job.test_arrays, job.where
    if y.ndim == 2:
        tasks = [delayed(evaluate_multilabel)(arrays[k], y, test_arrays[k], y_test, split, linear, **where(k))
                 for k in keys]  # fmt: skip
    else:
        tasks = []
        dims = {k: int(arrays[k].shape[1]) for k in keys}
        for pack in _packs(keys, dims, _in_threads()):
            if len(pack) == 1:  # its arrays as arguments of their own, which joblib's Dask backend scatters
                k = pack[0]
                tasks.append(delayed(_linear_task)(arrays[k], y, test_arrays[k], y_test, split, linear,
                                                   n_classes=n_classes, test_now=test_now, **where(k)))  # fmt: skip
            else:
                candidates = [where(k) | {"codes": arrays[k], "test_codes": test_arrays[k]} for k in pack]
                tasks.append(delayed(_linear_pack)(candidates, y, y_test, split, linear, n_classes=n_classes,
                                                   test_now=test_now))  # fmt: skip
    return _run_tasks(tasks, job.jobs, job.progress, what or f"sweep (seed {config.seed})")


def _extra_results(job: _Job, config: SweepConfig, split: Split, keys: Sequence[Hashable],
                   linear: list[tuple[SweepRow, Any]]) -> list[tuple[SweepRow, Any]]:  # fmt: skip
    """The kNN baseline and few-shot rows of ``keys`` (few-shot rows start from the linear rows' C)."""
    y, y_test, n_classes = job.y, job.y_test, len(job.class_names)
    arrays, test_arrays, where = job.arrays, job.test_arrays, job.where
    linear_config = replace(config, probes=tuple(p for p in config.probes if p != "knn"))
    out: list[tuple[SweepRow, Any]] = []
    if "knn" in config.probes:
        tasks = [delayed(evaluate_knn)(arrays[k], y, test_arrays[k], y_test, split, config, **where(k)) for k in keys]
        out += _run_tasks(tasks, job.jobs, job.progress, "kNN baseline")
    if config.shots:
        full_C: dict[tuple[str, str, str], dict[tuple[str, str], float | None]] = {}
        for row, _ in linear:
            if row.protocol == "linear":
                full_C.setdefault((row.backbone, row.tap, row.pooling), {})[(row.normalizer, row.probe)] = row.C
        shot_tasks = [delayed(evaluate_few_shot)(arrays[k], y, test_arrays[k], y_test, split, linear_config,
                                                 full_C[job.names[k]], evaluate_codes, n_classes=n_classes,
                                                 **where(k))
                      for k in keys]  # fmt: skip
        out += [(row, None) for row in _run_tasks(shot_tasks, job.jobs, job.progress, "few-shot")]
    return out


def _in_order(job: _Job, results: list[tuple[SweepRow, Any]]) -> list[tuple[SweepRow, Any]]:
    """Rows in the order of the codes, then linear before kNN before few-shot, then normalizer and probe."""
    order = {job.names[k]: i for i, k in enumerate(job.arrays)}
    protocol_order = {"linear": 0, "multilabel": 0, "knn": 1, "few-shot": 2}
    return sorted(results, key=lambda rf: (order[(rf[0].backbone, rf[0].tap, rf[0].pooling)],
                                           protocol_order[rf[0].protocol], rf[0].normalizer, rf[0].probe,
                                           rf[0].shots or 0))  # fmt: skip


def _search_all(job: _Job, config: SweepConfig) -> tuple[Split, list[tuple[SweepRow, Any]], tuple[dict, dict],
                                                         dict | None]:  # fmt: skip
    """The first draw of the sweep: every array's scores, then every array searched (or, with ``config.triage``,
    those the scores rank highest), the test rows read last. Returns the split, the rows with their fitted probes,
    every array's scores ``{key: {name: (value, seconds)}}`` with the sample of training images they read, and the
    triage record (None without triage)."""
    keys = list(job.arrays)
    split = _split_checked(job, config, extras=True)
    scored, score_sample = _score_arrays(job, config, split, keys)
    if config.triage is None:
        results = _linear_results(job, config, split, keys, what="sweep")
        results += _extra_results(job, config, split, keys, results)
        return split, _in_order(job, results), (scored, score_sample), None
    if job.y.ndim == 2:
        raise ParameterError("--triage ranks arrays by single-label scores (kNN, H-score); a multi-label sweep "
                             "searches every array: leave --triage out.")  # fmt: skip
    dims = {k: int(job.arrays[k].shape[1]) for k in keys}

    def search(part: list[Hashable]) -> list[tuple[SweepRow, Any]]:
        return _linear_results(job, config, split, part, test_now=False, what=f"triage: {len(part)} arrays")

    images = len({int(r) for _, val in split.folds for r in val})  # the images CV accuracy is measured on
    workers = job.jobs if job.jobs != -1 else (os.cpu_count() or 1)
    results, triage = triaged_search(keys, job.names, dims, scored, search, config, images, workers)
    score_on_test(results, job, split, config)
    searched = list(dict.fromkeys(job.key_of[(r.backbone, r.tap, r.pooling)] for r, _ in results))
    results += _extra_results(job, config, split, searched, results)
    return split, _in_order(job, results), (scored, score_sample), triage


def _score_arrays(job: _Job, config: SweepConfig, split: Split,
                  keys: Sequence[Hashable]) -> tuple[dict[Hashable, dict], dict[str, Any]]:  # fmt: skip
    """Every array's transferability scores on the plain views of the training images, the sweep's folds mapped
    onto them: ``{key: {name: (value, seconds)}}``, and what they read (both empty without ``config.scores``).

    Every array is scored on the same images, so their scores compare: all of them, or one class-stratified sample
    drawn with ``config.seed``, the size the widest array allows (:func:`score_sample_size`)."""
    if not config.scores:
        return {}, {}
    per = split.views + 1
    plain = split.train_rows[split.train_rows % per == 0]
    folds = [(np.searchsorted(plain, fit[fit % per == 0]), np.searchsorted(plain, val)) for fit, val in split.folds]
    y = job.y[plain]
    classes = len(np.unique(y if y.ndim == 1 else [0]))
    size = score_sample_size(len(plain), [int(job.arrays[k].shape[1]) for k in keys], len(split.train_rows),
                             classes, config)  # fmt: skip
    read = {"images": int(min(size, len(plain))), "of": int(len(plain)), "score_images": config.score_images}
    if size < 2 * classes:  # too few within --max-memory for two images a class
        return {k: dict.fromkeys(config.scores, (None, 0.0)) for k in keys}, read | {"images": 0, "scored": False}
    if size < len(plain):
        keep, folds = subsample(y, folds, size, config.seed)
        plain, y = plain[keep], y[keep]
        read["images"] = int(len(plain))
    if min(len(f) for f, _ in folds) == 0:  # a fold left without fit images by the sample
        return {k: dict.fromkeys(config.scores, (None, 0.0)) for k in keys}, read | {"scored": False}
    tasks = [delayed(_score_task)(job.arrays[k], y, plain, folds, k, job.what(k), config) for k in keys]
    return dict(_run_tasks(tasks, job.jobs, job.progress, "scores")), read


def score_sample_size(n: int, dims: Sequence[int], sweep_rows: int, classes: int, config: SweepConfig) -> int:
    """How many of the ``n`` plain training images every array's scores read: within ``config.max_memory`` for the
    widest array (:func:`~cnncodes.probing._transfer.rows_within`), and at most ``config.score_images`` (``"auto"``:
    the most whose cost the widest array's budget allows, :func:`~cnncodes.probing._transfer.images_within`, for the
    ``sweep_rows`` its probes fit on; at least 10 a class); ``n`` when nothing binds."""
    widest = max(dims, default=1)
    size = rows_within(n, widest, config.max_memory)
    cap = images_within(n, widest, sweep_rows) if config.score_images == "auto" else config.score_images
    return min(size, max(cap, 10 * classes)) if cap is not None else size


def _score_task(codes: Any, y: np.ndarray, rows: np.ndarray, folds: list, key: Hashable, what: str,
                config: SweepConfig) -> list[tuple[Hashable, dict]]:  # fmt: skip
    """One array's scores on the training ``rows`` (a list of one item, as every joblib task's)."""
    with _torch_threads(config.threads):
        X = load_rows(codes, rows, what)
        return [(key, array_scores(X, y, folds, config.scores, device=config.device, seed=config.seed))]


def score_on_test(results: list[tuple[SweepRow, Any]], job: _Job, split: Split, config: SweepConfig) -> None:
    """The test numbers of rows searched with ``test_now=False``: each array's test rows read once (in chunks within
    ``config.max_memory``), every row's refit probe scored on them."""
    by_key: dict[Hashable, list[tuple[SweepRow, Any]]] = {}
    for row, fitted in results:
        if fitted is not None and fitted.predicted is None:
            by_key.setdefault(job.key_of[(row.backbone, row.tap, row.pooling)], []).append((row, fitted))
    y_test = job.y_test[split.test_rows]
    for k, items in by_key.items():
        codes = job.test_arrays[k]
        what = f"{job.what(k)} (test)"
        chunk = chunk_rows_for(int(codes.shape[1]), config.max_memory)
        for row, fitted in items:
            scores = decision_in_chunks(fitted.estimator, codes, split.test_rows, chunk, what)
            metrics, fitted.predicted, fitted.scores = metrics_from_scores(scores, y_test, split.test_views,
                                                                           fitted.estimator.classes_)  # fmt: skip
            for name, value in metrics.items():
                setattr(row, name, value)


_COST_FIELDS = tuple(c for c in COSTS if c != "probe_bytes")  # what a caller measures; the probe's is counted here


def _check_costs(costs: Mapping[Hashable, Mapping[str, Any]] | None, keys: list[Hashable],
                 config: SweepConfig) -> dict[Hashable, dict[str, Any]]:  # fmt: skip
    """``costs`` checked against the codes' keys: known fields, numbers; every key's ``flops`` for a cheapest pick."""
    out: dict[Hashable, dict[str, Any]] = {}
    if costs is not None and not isinstance(costs, Mapping):
        raise ParameterError(f"costs must map keys of codes to dicts of costs, got {type(costs).__name__}; pass "
                             "costs={key: {'flops': ...}}.")  # fmt: skip
    for k, entry in (costs or {}).items():
        if not isinstance(entry, Mapping):
            raise ParameterError(f"costs[{k!r}] is {entry!r}, not a dict of costs; pass {{'flops': ...}}.")
        if k not in keys:
            raise ParameterError(f"costs[{k!r}] names no array of codes; its keys are those of codes.")
        bad = sorted(set(entry) - set(_COST_FIELDS))
        if bad:
            raise ParameterError(f"costs[{k!r}] has unknown fields {bad}; use any of {list(_COST_FIELDS)}.")
        for name, value in entry.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                      or not np.isfinite(value) or value < 0):  # fmt: skip
                raise ParameterError(f"costs[{k!r}][{name!r}] is {value!r}; give a non-negative number or None.")
        out[k] = dict(entry)
    if config.pick == "cheapest":
        missing = [k for k in keys if out.get(k, {}).get("flops") is None]
        if missing:
            raise ParameterError(f"pick='cheapest' needs the forward FLOPs of every array, but {missing[0]!r} has none "
                                 "(a store swept from a Python nn.Module cannot be rebuilt to count them). Pass "
                                 "costs={key: {'flops': ...}} to sweep_codes, or use pick='best'.")  # fmt: skip
    return out


def _attach_costs(results: list[tuple[SweepRow, Any]], job: _Job, costs: dict[Hashable, dict[str, Any]]) -> None:
    """Every row's cost: the array's measured costs, its code bytes per image and its probe's bytes."""
    key_of = {job.names[k]: k for k in job.arrays}
    for row, fitted in results:
        k = key_of[(row.backbone, row.tap, row.pooling)]
        entry = costs.get(k, {})
        for name in _COST_FIELDS:
            if entry.get(name) is not None:
                value = entry[name]
                setattr(row, name, int(value) if name in ("flops", "params", "code_bytes") else float(value))
        if row.code_bytes is None:
            dtype = getattr(job.arrays[k], "dtype", None)
            row.code_bytes = int(row.dims * (np.dtype(dtype).itemsize if dtype is not None else 4))
        if fitted is not None and row.protocol != "knn":  # a kNN classifier is its training rows: no probe to size
            row.probe_bytes = probe_bytes(fitted.estimator)


def _candidate_name(key: Hashable) -> tuple[str, str, str]:
    """``(backbone, tap, pooling)`` of a key of ``codes``: a tap, a (tap, pooling) or a (backbone, tap, pooling)."""
    if isinstance(key, tuple) and len(key) in (2, 3):
        parts = [str(p) for p in key]
        return (parts[0], parts[1], parts[2]) if len(parts) == 3 else ("", parts[0], parts[1])
    return ("", str(key), "")


def _linear_task(codes: Any, labels: np.ndarray, test_codes: Any, test_labels: np.ndarray, split: Split,
                 config: SweepConfig, *, backbone: str, **where: Any) -> list[tuple[SweepRow, Fitted]]:  # fmt: skip
    """:func:`evaluate_codes`, its rows marked with the backbone they come from."""
    out = evaluate_codes(codes, labels, test_codes, test_labels, split, config, **where)
    for row, _ in out:
        row.backbone = backbone
    return out


def _linear_pack(candidates: list[dict[str, Any]], labels: np.ndarray, test_labels: np.ndarray, split: Split,
                 config: SweepConfig, *, n_classes: int, test_now: bool = True) -> list[tuple[SweepRow, Fitted]]:  # fmt: skip
    """:func:`_linear_task` of each candidate in turn (``codes``, ``test_codes``, ``backbone``, ``tap``, ``pooling``,
    ``depth``)."""
    out = []
    for c in candidates:
        out += _linear_task(c["codes"], labels, c["test_codes"], test_labels, split, config, n_classes=n_classes,
                            backbone=c["backbone"], tap=c["tap"], pooling=c["pooling"], depth=c["depth"],
                            test_now=test_now)  # fmt: skip
    return out


#: an array's search costs about this many dims' worth of arithmetic in per-operation overhead, which holds the GIL
#: (on one CPU thread at 1,000 rows and 10 classes: 64 dims take 0.05 s, 512 dims 0.12 s). Arrays narrower than
#: this are overhead-bound: in threads, they are packed into tasks that search them one after the other, since two
#: threads on them run no faster than one and slow down the threads on wide arrays (on the digits store, packing
#: its 7 narrow arrays took the sweep on 2 threads from 0.98 to 0.87 s).
_NARROW_DIMS = 256


def _packs(keys: Sequence[Hashable], dims: Mapping[Hashable, int], threads: bool) -> list[list[Hashable]]:
    """The keys in tasks: every wide array alone, and in threads (see ``_NARROW_DIMS``) the narrow ones packed in
    order of width, each pack costing no more than the costliest array (cost: dims + ``_NARROW_DIMS``). Processes
    (loky, Dask) run narrow arrays in parallel without contention: there every array is a task."""
    if not threads:
        return [[k] for k in keys]
    cost = {k: dims[k] + _NARROW_DIMS for k in keys}
    cap = max(cost.values())
    packs: list[list[Hashable]] = []
    for k in sorted((k for k in keys if dims[k] < _NARROW_DIMS), key=lambda k: dims[k]):
        if not packs or sum(cost[j] for j in packs[-1]) + cost[k] > cap:
            packs.append([])
        packs[-1].append(k)
    return packs + [[k] for k in keys if dims[k] >= _NARROW_DIMS]


def _in_threads() -> bool:
    """Whether tasks run in threads of this process: joblib's choice for ``prefer="threads"`` unless a backend of
    processes (loky, Dask) is active."""
    backend, _ = get_active_backend(prefer="threads")
    return bool(getattr(backend, "uses_threads", False))


def _run_tasks(tasks: list[Any], jobs: int, progress: bool, what: str) -> list[Any]:
    """Every task's items, under the active joblib backend, with a progress bar over tasks.

    Without a backend chosen (``parallel_config``, Dask), tasks run in threads: they spend their time in torch and
    NumPy kernels that release the GIL, with one torch thread each, and a thread starts at once where a process must
    first import torch. The largest arrays go first, so the longest task does not start last.
    """
    out: list[Any] = []
    tasks = sorted(tasks, key=_task_size, reverse=True)
    failed: _Failed | None = None
    with tqdm(total=len(tasks), desc=what, unit="task", disable=not progress, dynamic_ncols=True) as bar:
        # An error inside a task comes back as a value: raised from the generator, it would leave the other workers
        # running in their threads while the interpreter exits around them (an abort, exit 134). Every task ends
        # first; those still to start after an error return at once. Then the first error is raised, here.
        stop = threading.Event()
        guarded = [(_Guarded(fn, stop), args, kwargs) for fn, args, kwargs in tasks]
        try:
            for part in Parallel(n_jobs=jobs, prefer="threads", return_as="generator_unordered")(guarded):
                if isinstance(part, _Failed):
                    failed = part if failed is None or failed.error is _SKIPPED else failed
                elif failed is None:
                    out.extend(part)
                bar.update(1)
        except BaseException:  # Ctrl-C: the tasks not yet started return at once instead of running on unseen
            stop.set()
            raise
    if failed is not None:
        raise failed.error
    return out


class _Failed:
    """What a task raised, carried back as its result."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Guarded:
    """A task that returns its error as a :class:`_Failed` instead of raising it, and returns at once (``_Failed`` of
    nothing new) once ``stop`` is set by another task of its thread pool. ``stop`` is not pickled: a task in another
    process (Dask, loky) runs to its end."""

    def __init__(self, fn: Any, stop: threading.Event) -> None:
        self.fn, self.stop = fn, stop

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.stop is not None and self.stop.is_set():
            return _Failed(_SKIPPED)
        try:
            return self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller, after every worker is done
            if self.stop is not None:
                self.stop.set()
            return _Failed(exc)

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "stop": None}


_SKIPPED = RuntimeError("a task skipped after another task failed")


def _task_size(task: Any) -> int:
    """Values in a delayed task's codes: its first argument, or the arrays of its candidates (0: none)."""
    first = task[1][0] if task[1] else None
    arrays = [c["codes"] for c in first] if isinstance(first, list) else [first]
    return sum(int(np.prod(shape)) for a in arrays if (shape := getattr(a, "shape", None)))


def _split_digest(split: Split, y: np.ndarray, y_test: np.ndarray, sources: Sequence[str] | None,
                  test_sources: Sequence[str] | None) -> str:  # fmt: skip
    """A fingerprint of which images were trained, validated and tested on, with their labels: two sweeps with the
    same digest are comparable row for row (:func:`cnncodes.sweeps.compare`)."""
    h = hashlib.sha256()
    for part in (split.train_rows, split.test_rows, *[r for fold in split.folds for r in fold], y, y_test):
        h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        h.update(b"|")
    for ids in (sources, test_sources):
        h.update("\n".join(ids or ()).encode("utf-8", "surrogatepass"))
        h.update(b"|")
    return "sha256:" + h.hexdigest()


def _encode_labels(labels: Any, classes: Sequence[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names; string labels are mapped onto ``classes`` (default: sorted). A 2-d 0/1 matrix
    is multi-label: one column per class."""
    y = np.asarray(labels)
    if y.ndim == 2 and len(y):
        names = list(classes) if classes is not None else [str(c) for c in range(y.shape[1])]
        if y.dtype.kind not in "biu" or y.shape[1] != len(names) or not np.isin(y, (0, 1)).all():
            raise ParameterError(f"{what}: multi-label labels must be a 0/1 matrix of shape (rows, {len(names)} "
                                 f"classes), got {y.dtype} {y.shape}.")  # fmt: skip
        return y.astype(np.int64), names
    if y.dtype.kind in "iu" and y.size and y.min() < 0:
        raise ParameterError(f"{what}: some images are unlabeled (label -1); a sweep needs labels (ImageFolder, CSV "
                             "with labels, or labels=).")  # fmt: skip
    if y.ndim != 1 or len(y) == 0:
        raise ParameterError(f"{what} must be a non-empty 1-d array of class labels, got shape {y.shape}.")
    if y.dtype.kind in "iu":
        names = list(classes) if classes is not None else [str(c) for c in range(int(y.max()) + 1)]
        if y.min() < 0 or y.max() >= len(names):
            raise ParameterError(f"{what} range from {y.min()} to {y.max()} but there are {len(names)} classes.")
        return y.astype(np.int64), names
    if y.dtype.kind not in "UO":
        raise ParameterError(f"{what} must be integers or strings, got dtype {y.dtype}.")
    text = y.astype(str)
    names = list(classes) if classes is not None else sorted(set(text))
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise ParameterError(f"{what} holds classes {unknown[:5]} not among {names[:10]}.")
    return np.array([index[t] for t in text], dtype=np.int64), names


def _check_codes(array: Any, rows: int, what: str) -> Any:
    shape = getattr(array, "shape", None)
    if shape is None:
        array = np.asarray(array)
        shape = array.shape
    if len(shape) != 2 or shape[0] != rows:
        raise ParameterError(f"{what} has shape {tuple(shape)}; expected ({rows}, dims): one row per label.")
    return array
