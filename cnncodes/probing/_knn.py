"""The k-nearest-neighbour baseline row of a sweep: cosine similarity, majority vote, k chosen by the sweep's CV folds.

One neighbour graph per fold (``KNeighborsTransformer`` at the largest k) serves every k, the caching scikit-learn
documents for a k search; the final classifier is a plain ``KNeighborsClassifier`` in the probe Pipeline.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer

from ._probes import make_probe
from ._results import Split, SweepConfig, SweepRow
from ._scoring import Fitted, load_rows, metrics_from_scores, normalized_folds, pack_hits

__all__ = ["KNN_KS", "evaluate_knn"]

#: The neighbour counts searched (DINO's k-NN evaluation reports k = 10, 20, 100, 200 on ImageNet; small datasets
#: rarely have 200 images of a class, so the search stops at 100).
KNN_KS = (10, 20, 50, 100)


def _fold_hits(X_fit: np.ndarray, y_fit: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, ks: list[int]) -> np.ndarray:
    """(ks, validation images): whether each k classifies each validation image right."""
    graph = KNeighborsTransformer(n_neighbors=max(ks), metric="cosine", algorithm="brute").fit(X_fit)
    fit_graph, val_graph = graph.transform(X_fit), graph.transform(X_val)
    return np.array([
        KNeighborsClassifier(n_neighbors=k, metric="precomputed").fit(fit_graph, y_fit).predict(val_graph) == y_val
        for k in ks
    ])  # fmt: skip


def evaluate_knn(
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
    backbone: str = "",
) -> list[tuple[SweepRow, Fitted]]:
    """The kNN row of one array of codes, per normalizer: k by CV over :data:`KNN_KS`, then refit and tested.

    Codes are normalized as the linear probes' are and then compared by cosine similarity; neighbours are the plain
    views of training images (augmented views are not). k values the smallest fold cannot hold are left out.
    """
    labels, test_labels = np.asarray(labels), np.asarray(test_labels)
    # neighbours are training images: plain views only, so k counts images whatever the number of views
    per = split.views + 1
    plain = Split(split.train_rows[split.train_rows % per == 0],
                  [(fit[fit % per == 0], val) for fit, val in split.folds], split.test_rows, split.views,
                  split.test_views)  # fmt: skip
    split = plain
    X_train = load_rows(codes, split.train_rows, f"{tap}/{pooling}")
    y_train = labels[split.train_rows]
    X_test = load_rows(test_codes, split.test_rows, f"{tap}/{pooling} (test)")  # fmt: skip
    y_test = test_labels[split.test_rows]
    # the neighbour graph of a fold's fit rows holds k + 1 neighbours per row (each row counts itself)
    smallest = min(len(fit) for fit, _ in split.folds) - 1
    ks = [k for k in KNN_KS if k <= smallest] or [max(smallest, 1)]
    out = []
    for norm in config.normalizers:
        started = time.perf_counter()
        per_fold = [_fold_hits(*fold, ks) for fold in normalized_folds(norm, X_train, y_train, split)]
        cv = np.array([hits.mean(1) for hits in per_fold])  # (folds, ks)
        best = int(np.argmax(cv.mean(0)))  # first of equals: the smallest k
        estimator = make_probe("knn", norm, n_neighbors=ks[best]).fit(X_train, y_train)
        metrics, pred, plain = metrics_from_scores(
            estimator.predict_proba(X_test), y_test, split.test_views, estimator.classes_
        )
        row = SweepRow(
            tap=tap, pooling=pooling, depth=int(depth), dims=int(codes.shape[1]), normalizer=norm, probe="knn",
            solver="brute-cosine", C=None, C_at_edge=bool(len(ks) > 1 and best == len(ks) - 1), n_fits=cv.size,
            cv_accuracy=float(cv[:, best].mean()), cv_std=float(cv[:, best].std()), **metrics,
            fit_seconds=float(time.perf_counter() - started), backbone=backbone, protocol="knn", k=ks[best],
            cv_folds=[float(v) for v in cv[:, best]], cv_hits=pack_hits(np.concatenate([h[best] for h in per_fold])),
        )  # fmt: skip
        out.append((row, Fitted(estimator, pred, plain)))
    return out
