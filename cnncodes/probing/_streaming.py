"""Out-of-core probes: fit arrays larger than memory by streaming chunks from the store.

Used by the sweep when an array's training rows exceed ``max_memory``. Chunks are contiguous row slices of the codes
(a store's lazy handle reads them with plain file reads), so resident memory stays near the chunk budget whatever the
store size.
Probes become :class:`~sklearn.linear_model.SGDClassifier` fitted with ``partial_fit`` (hinge loss for ``linsvc`` and
``sgd``, log loss for ``logreg`` and ``sgd-log``); ``standard`` statistics come from a first streaming pass with
``StandardScaler.partial_fit``. C is chosen on the first CV fold's validation images (one hold-out, streamed), all C
values being trained in the same passes over the data; they are the coarse grid, one per decade
(``c_steps_per_decade`` is not used here: each round of the in-memory binary search would cost more passes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ._probes import make_normalizer, make_probe
from ._results import Split, SweepConfig, SweepRow
from ._scoring import PENDING_TEST, Fitted, c_grid, check_finite, load_rows, metrics_from_scores, pack_hits

__all__ = ["evaluate_streaming", "STREAM_PROBE", "decision_in_chunks", "chunk_rows_for"]

#: Which streamable classifier stands in for each probe.
STREAM_PROBE = {"logreg": "sgd-log", "sgd-log": "sgd-log", "linsvc": "sgd", "sgd": "sgd"}
_EPOCHS = 5


def _chunks(
    codes: Any, rows: np.ndarray, chunk_rows: int, what: str = "the array"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (codes, row indices) for the sorted ``rows``, reading contiguous store blocks of ``chunk_rows``."""
    rows = np.sort(rows)
    pos = 0
    while pos < len(rows):
        lo = int(rows[pos])
        hi = lo + chunk_rows
        end = int(np.searchsorted(rows, hi))
        block = np.asarray(codes[lo:hi])
        picked = rows[pos:end]
        yield check_finite(block[picked - lo].astype(np.float32, copy=False), picked, what), picked
        pos = end


def decision_in_chunks(estimator: Pipeline, codes: Any, rows: np.ndarray, chunk_rows: int | None,
                       what: str = "the test rows") -> np.ndarray:  # fmt: skip
    """``estimator.decision_function(codes[rows])`` for the sorted ``rows``, read in blocks of ``chunk_rows`` (all at
    once when None); ``what`` names the array in errors."""
    if chunk_rows is None:
        return estimator.decision_function(load_rows(codes, rows, what))
    return np.concatenate([estimator.decision_function(X) for X, _ in _chunks(codes, rows, chunk_rows, what)])


def chunk_rows_for(dims: int, max_memory: int | None) -> int | None:
    """Rows per chunk that keep a float32 chunk, its normalized copy and slack within ``max_memory``."""
    return None if max_memory is None else max(64, int(max_memory) // (dims * 4 * 4))


def evaluate_streaming(
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
) -> list[tuple[SweepRow, Any]]:
    """Out-of-core counterpart of the in-memory evaluation: same result rows, ``solver="sgd-stream"``
    (``test_now=False``: the test rows left unread, as in :func:`~cnncodes.probing.evaluate_codes`)."""
    dims = int(codes.shape[1])
    chunk_rows = chunk_rows_for(dims, config.max_memory)
    classes = np.arange(int(labels.max()) + 1 if n_classes is None else n_classes)
    fit_rows, val_rows = split.folds[0]
    out = []
    for norm in config.normalizers:
        started = time.perf_counter()
        step = make_normalizer(norm)
        if isinstance(step, StandardScaler):
            for X, _ in _chunks(codes, split.train_rows, chunk_rows, f"{tap}/{pooling}"):
                step.partial_fit(X)
        elif step != "passthrough":
            step.fit(np.zeros((1, dims), np.float32))  # stateless (L2, power)

        def transform(X: np.ndarray) -> np.ndarray:
            return X if step == "passthrough" else step.transform(X).astype(np.float32, copy=False)  # noqa: B023 - used in this iteration only

        prep_s = time.perf_counter() - started
        done: set[str] = set()
        for probe in config.probes:
            stand_in = STREAM_PROBE[probe]
            if stand_in in done:
                continue
            done.add(stand_in)
            t0 = time.perf_counter()
            rng = np.random.default_rng(config.seed)
            grid = c_grid(config.c_min, config.c_max)
            models = {
                C: make_probe(stand_in, "none", C, n_samples=len(fit_rows), random_state=config.seed).named_steps[
                    "classify"
                ]
                for C in grid
            }
            for _ in range(_EPOCHS):
                for X, rows in _chunks(codes, fit_rows, chunk_rows):
                    order = rng.permutation(len(rows))
                    Xn = transform(X)[order]
                    for model in models.values():
                        model.partial_fit(Xn, labels[rows][order], classes=classes)
            right: dict[float, list[np.ndarray]] = {C: [] for C in grid}
            for X, rows in _chunks(codes, val_rows, chunk_rows):
                Xn = transform(X)
                for C, model in models.items():
                    right[C].append(model.predict(Xn) == labels[rows])
            val_hits = {C: np.concatenate(v) if v else np.zeros(0, bool) for C, v in right.items()}
            correct = {C: int(v.sum()) for C, v in val_hits.items()}
            best_c = max(grid, key=lambda c: (correct[c], -c))
            final = make_probe(
                stand_in, "none", best_c, n_samples=len(split.train_rows), random_state=config.seed
            ).named_steps["classify"]
            for _ in range(_EPOCHS):
                for X, rows in _chunks(codes, split.train_rows, chunk_rows):
                    order = rng.permutation(len(rows))
                    final.partial_fit(transform(X)[order], labels[rows][order], classes=classes)
            estimator = Pipeline([("normalize", step), ("classify", final)])
            if test_now:
                metrics, pred, plain = metrics_from_scores(
                    decision_in_chunks(estimator, test_codes, split.test_rows, chunk_rows, f"{tap}/{pooling} (test)"),
                    test_labels[split.test_rows],
                    split.test_views, final.classes_
                )  # fmt: skip
            else:
                metrics, pred, plain = dict(PENDING_TEST), None, None
            row = SweepRow(
                tap=tap,
                pooling=pooling,
                depth=int(depth),
                dims=dims,
                normalizer=norm,
                probe=stand_in,
                solver="sgd-stream",
                C=float(best_c),
                C_at_edge=bool(best_c in (grid[0], grid[-1])),
                n_fits=len(grid) + 1,
                cv_accuracy=correct[best_c] / max(1, len(val_rows)),
                cv_std=0.0,
                **metrics,
                cv_folds=[correct[best_c] / max(1, len(val_rows))],  # one validation split: no paired t
                cv_hits=pack_hits(val_hits[best_c]),
                fit_seconds=float(time.perf_counter() - t0 + prep_s),
            )
            out.append((row, Fitted(estimator, pred, plain)))
    return out
