"""What every probe search shares: the C grid, test metrics from decision scores, and a fitted candidate."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, top_k_accuracy_score
from sklearn.pipeline import Pipeline

from ..errors import ParameterError
from ._probes import make_normalizer

__all__ = [
    "c_grid",
    "metrics_from_scores",
    "Fitted",
    "PENDING_TEST",
    "normalized_folds",
    "load_rows",
    "pack_hits",
    "unpack_hits",
]


def c_grid(c_min: float = 1e-4, c_max: float = 1e4, steps_per_decade: int = 1) -> list[float]:
    """The log grid of C from ``c_min`` to ``c_max``: ``steps_per_decade`` values per decade (the coarse grid: one).

    The range is split into a whole number of (near-)decades, so the grid with ``steps_per_decade=s`` holds the coarse
    grid as every s-th value: the lattice on which the sweep's search refines C.
    """
    if not 0 < c_min < c_max:
        raise ParameterError(f"need 0 < c_min < c_max, got c_min={c_min}, c_max={c_max}.")
    lo, hi = math.log10(c_min), math.log10(c_max)
    decades = max(int(round(hi - lo)), 1)
    return [float(10**v) for v in np.linspace(lo, hi, decades * int(steps_per_decade) + 1)]


@dataclass
class Fitted:
    """What a task hands back besides its rows: the refit probe and its plain-view test predictions (None while the
    test rows are not yet read: a triaged sweep reads them last)."""

    estimator: Pipeline
    predicted: np.ndarray | None
    scores: np.ndarray | None


#: The test numbers of a row whose test rows are not read yet (``evaluate_codes(..., test_now=False)``).
PENDING_TEST = {"test_accuracy": float("nan"), "test_balanced_accuracy": None, "test_macro_f1": float("nan")}


def metrics_from_scores(
    scores: np.ndarray, y_rows: np.ndarray, views: int, classes: np.ndarray
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
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
        # recall of every class the test split holds, by class label
        "test_class_recall": {int(c): float(np.mean(pred[y == c] == c)) for c in np.unique(y)},
    }
    if plain.ndim == 2 and len(classes) > 5:
        metrics["test_top5_accuracy"] = float(top_k_accuracy_score(y, plain, k=5, labels=classes))
    if views:
        tta = scores.reshape(len(y), per, *scores.shape[1:]).mean(1)
        metrics["test_tta_accuracy"] = float(accuracy_score(y, predict(tta)))
    return metrics, pred, plain


def load_rows(codes: Any, rows: np.ndarray, what: str) -> np.ndarray:
    """``codes[rows]`` as float32 in memory, refused if not finite (see :func:`check_finite`)."""
    return check_finite(np.asarray(codes[rows], dtype=np.float32), rows, what)


def check_finite(X: np.ndarray, rows: np.ndarray, what: str) -> np.ndarray:
    """Refuse codes holding NaN or infinity, naming the row: no probe can be fitted or scored on them."""
    bad = ~np.isfinite(X).all(axis=1) if X.ndim == 2 else ~np.isfinite(X)
    if bad.any():
        row = int(np.asarray(rows)[np.flatnonzero(bad)[0]])
        raise ParameterError(f"the codes of {what} hold NaN or infinite values (first at row {row}). A float16 store "
                             "overflows above 65504: re-extract with --dtype float32; otherwise the store is damaged: "
                             "re-extract it with --overwrite.")  # fmt: skip
    return X


def normalized_folds(
    normalizer: str, X_train: np.ndarray, y_train: np.ndarray, split: Any
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(X_fit, y_fit, X_val, y_val)`` of every CV fold of ``split``, the normalizer fitted on the fold's fit rows.

    ``X_train``/``y_train`` hold ``split.train_rows`` in order (sorted), so a row's position is a binary search away.
    """
    for fit_rows, val_rows in split.folds:
        fit_i = np.searchsorted(split.train_rows, fit_rows)
        val_i = np.searchsorted(split.train_rows, val_rows)
        X_fit, X_val = X_train[fit_i], X_train[val_i]
        step = make_normalizer(normalizer)
        if step != "passthrough":
            step.fit(X_fit)
            X_fit, X_val = (step.transform(X).astype(np.float32, copy=False) for X in (X_fit, X_val))
        yield X_fit, y_train[fit_i], X_val, y_train[val_i]


def pack_hits(hits: np.ndarray) -> str:
    """Per-image correctness as hex of packed bits: how a row carries its out-of-fold and test hits into
    ``results.json``, for paired tests of sweeps joined later."""
    return np.packbits(np.asarray(hits, dtype=bool)).tobytes().hex()


def unpack_hits(text: str, n: int) -> np.ndarray:
    """The inverse of :func:`pack_hits` for ``n`` images; a ValueError when ``text`` does not hold ``n`` bits."""
    if len(text) != 2 * ((n + 7) // 8):
        raise ValueError(f"{len(text) // 2} bytes of hits, not the {(n + 7) // 8} of {n} images")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))
    return bits[:n].astype(bool)
