"""Multi-label rows of a sweep: one-vs-rest linear probes scored by mean average precision (the VOC07 SVM protocol).

Images may show several classes (a 0/1 images x classes indicator). Each class gets its own binary probe whose C is
chosen by CV average precision on the sweep's folds, over every C of the ``--c-range`` lattice at
``--c-steps-per-decade`` (as in the VOC07 linear SVM benchmark of Goyal et al. 2019,
"Scaling and Benchmarking Self-Supervised Visual Representation Learning"); the row's score is the mean over classes
of the average precision on the held-out images (scikit-learn's ``average_precision_score``, not VOC07's 11-point
interpolation). The whole probe is scikit-learn: ``OneVsRestClassifier(GridSearchCV(classifier, C grid))`` after the
normalizer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score
from sklearn.model_selection import GridSearchCV
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline

from ..errors import ParameterError
from ._probes import make_classifier, make_normalizer
from ._results import Split, SweepConfig, SweepRow
from ._scoring import Fitted, c_grid, load_rows

__all__ = ["evaluate_multilabel", "check_multilabel_split", "stratified_subsets", "MultilabelStratifiedFolds"]


def stratified_subsets(Y: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """The subset (an index into ``fractions``) of every image of a 0/1 images x classes matrix ``Y``, by iterative
    stratification (Sechidis, Tsoumakas and Vlahavas 2011, "On the Stratification of Multi-label Data").

    The images of the class with the fewest left to place go first, each to the subset that lacks that class most
    (then the one lacking images most, then at random), so every class is spread over the subsets in proportion to
    ``fractions`` as far as its count allows; scikit-learn's stratified splitters take one label per image.
    """
    rng = np.random.default_rng(seed)
    Y = np.asarray(Y).astype(bool)
    fractions = np.asarray(fractions, dtype=float)
    want = fractions * len(Y)  # images each subset still lacks
    want_class = np.outer(fractions, Y.sum(0))  # (subsets, classes): positives each subset still lacks
    subset = np.full(len(Y), -1)
    left = Y.copy()  # the positives of images not placed yet

    def place(i: int, lacking: np.ndarray) -> None:
        j = np.lexsort((rng.random(len(fractions)), -want, -lacking))[0]
        subset[i] = j
        want[j] -= 1
        want_class[j] -= Y[i]
        left[i] = False

    while left.any():
        counts = left.sum(0)
        rarest = np.flatnonzero(counts == counts[counts > 0].min())[0]
        for i in rng.permutation(np.flatnonzero(left[:, rarest])):
            place(i, want_class[:, rarest])
    for i in rng.permutation(np.flatnonzero(subset < 0)):  # images of no class
        place(i, np.zeros(len(fractions)))
    return subset


class MultilabelStratifiedFolds:
    """A splitter as scikit-learn's (``split(X, Y)`` yields fit and validation positions): ``folds`` folds, or one
    validation part of ``val_size``, of images stratified per class by :func:`stratified_subsets`."""

    def __init__(self, folds: int = 5, val_size: float | None = None, seed: int = 0) -> None:
        self.folds, self.val_size, self.seed = folds, val_size, seed

    def split(self, X: Any, Y: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.val_size is not None:
            side = stratified_subsets(Y, [self.val_size, 1 - self.val_size], self.seed)
            yield np.flatnonzero(side == 1), np.flatnonzero(side == 0)
            return
        part = stratified_subsets(Y, [1 / self.folds] * self.folds, self.seed)
        for f in range(self.folds):
            yield np.flatnonzero(part != f), np.flatnonzero(part == f)


def check_multilabel_split(Y: np.ndarray, split: Split, classes: list[str], Y_test: np.ndarray | None = None) -> None:
    """Every class needs a positive and a negative image in every fold's fit and validation part and in the test
    split, or its average precision (and its probe) is undefined."""
    Y_test = Y if Y_test is None else Y_test
    parts = [("the test split", Y_test[split.test_rows])]
    for i, (fit, val) in enumerate(split.folds):
        parts += [(f"fold {i + 1}'s training part", Y[fit]), (f"fold {i + 1}'s validation part", Y[val])]
    for where, part in parts:
        positives = part.sum(0)
        bad = np.flatnonzero((positives == 0) | (positives == len(part)))
        if len(bad):
            raise ParameterError(f"class {classes[bad[0]]!r} has {'no' if positives[bad[0]] == 0 else 'only'} "
                                 f"positive images in {where}, so its average precision is undefined (the split spreads "
                                 "each class over the folds as far as its images allow); use fewer --folds, a larger "
                                 "--test-size, or more images with and without that class.")  # fmt: skip


def _binary_classifier(probe: str, n_samples: int, seed: int) -> Any:
    """The per-class probe: scikit-learn's liblinear solvers, fast on the small binary problems one class poses."""
    if probe == "logreg":
        return LogisticRegression(solver="liblinear", max_iter=1000)
    return make_classifier(probe, 1.0, backend="sklearn", n_samples=n_samples, random_state=seed)


def _search_grid(probe: str, grid: list[float], n_samples: int) -> dict[str, list[float]]:
    if probe in ("sgd", "sgd-log"):  # SGD is parametrized by alpha = 1 / (C n), as make_classifier maps it
        return {"alpha": [1.0 / (C * n_samples) for C in grid]}
    return {"C": grid}


def evaluate_multilabel(
    codes: Any,
    Y: np.ndarray,
    test_codes: Any,
    Y_test: np.ndarray,
    split: Split,
    config: SweepConfig,
    *,
    tap: str,
    pooling: str,
    depth: int = -1,
    backbone: str = "",
) -> list[tuple[SweepRow, Fitted]]:
    """One row per (normalizer, linear probe): per-class C by CV average precision, refit, test mAP."""
    X_train = load_rows(codes, split.train_rows, f"{tap}/{pooling}")
    Y_train = np.asarray(Y)[split.train_rows]
    X_test = load_rows(test_codes, split.test_rows, f"{tap}/{pooling} (test)")  # fmt: skip
    per = split.test_views + 1
    Y_plain = np.asarray(Y_test)[split.test_rows][::per]
    folds = [(np.searchsorted(split.train_rows, f), np.searchsorted(split.train_rows, v)) for f, v in split.folds]
    # the lattice the single-label search refines on
    grid = c_grid(config.c_min, config.c_max, config.c_steps_per_decade)
    out = []
    for norm in config.normalizers:
        for probe in config.probes:
            started = time.perf_counter()
            base = _binary_classifier(probe, len(X_train), config.seed)
            search = GridSearchCV(base, _search_grid(probe, grid, len(X_train)), scoring="average_precision", cv=folds,
                                  error_score="raise")  # fmt: skip
            estimator = Pipeline([("normalize", make_normalizer(norm)), ("classify", OneVsRestClassifier(search))])
            estimator.fit(X_train, Y_train)
            per_class = estimator.named_steps["classify"].estimators_
            chosen = [s.best_params_.get("C") or 1.0 / (s.best_params_["alpha"] * len(X_train)) for s in per_class]
            cv_ap = np.array([s.best_score_ for s in per_class])
            # each fold's mAP at every class's chosen C: what the paired test on the folds pairs
            fold_map = [float(np.mean([s.cv_results_[f"split{i}_test_score"][s.best_index_] for s in per_class]))
                        for i in range(len(folds))]  # fmt: skip
            scores = estimator.decision_function(X_test)[::per]
            predicted = (scores > 0).astype(np.int64)
            ap = average_precision_score(Y_plain, scores, average=None)
            row = SweepRow(
                tap=tap, pooling=pooling, depth=int(depth), dims=int(codes.shape[1]), normalizer=norm, probe=probe,
                solver="one-vs-rest", C=float(np.exp(np.mean(np.log(chosen)))),
                C_at_edge=any(c <= config.c_min * 1.0001 or c >= config.c_max * 0.9999 for c in chosen),
                n_fits=len(per_class) * (len(grid) * len(folds) + 1), cv_accuracy=None, cv_std=None,
                test_accuracy=float(accuracy_score(Y_plain, predicted)), test_balanced_accuracy=None,
                test_macro_f1=float(f1_score(Y_plain, predicted, average="macro", zero_division=0)),
                fit_seconds=float(time.perf_counter() - started), backbone=backbone, protocol="multilabel",
                cv_map=float(cv_ap.mean()), cv_map_std=float(cv_ap.std()), test_map=float(np.mean(ap)),
                test_class_ap={c: float(v) for c, v in enumerate(ap)},
                class_C={c: float(v) for c, v in enumerate(chosen)},
                cv_folds=fold_map,
            )  # fmt: skip
            out.append((row, Fitted(estimator, predicted, scores)))
    if not out:
        raise ParameterError("no linear probe to fit one-vs-rest; give logreg, linsvc or sgd.")
    return out
