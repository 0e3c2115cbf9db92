"""The statistics of a layer sweep: an interval on every reported number, and paired tests of each row against the best.

Pure functions on NumPy arrays (no IO, no torch). Every test and interval SciPy has comes from :mod:`scipy.stats`;
only the Nadeau-Bengio variance correction and Holm's step-down are written here.

Intervals
---------
* **Test accuracy: Wilson score interval** (Wilson 1927, "Probable inference, the law of succession, and statistical
  inference", JASA 22), via ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. Test hits of one fixed
  probe are Bernoulli draws; Wilson's interval keeps close to nominal coverage near 0 and 1, where probes' accuracies
  live and the Wald interval undercovers (Brown, Cai & DasGupta 2001, "Interval estimation for a binomial
  proportion", Statistical Science 16), and unlike Clopper-Pearson it is not needlessly wide.
* **Balanced accuracy, macro F1, mAP: percentile bootstrap over test images** (Efron & Tibshirani 1993, "An
  Introduction to the Bootstrap", ch. 13), via ``scipy.stats.bootstrap(..., paired=True, method="percentile")``. These
  metrics are ratios of counts with no closed-form variance; resampling whole images keeps every image's label and
  prediction together. Percentile rather than BCa: BCa's jackknife evaluates the statistic once per left-out image,
  O(n^2) work (12,500 test images, 50,000 at ImageNet scale: far too slow for 60 rows x 3 metrics), while for these
  smooth metrics at n >= 100 the percentile interval is within about one point of nominal coverage
  (``test_stats.py`` measures 94.3 % for macro F1 and 94.6 % for balanced accuracy at n = 450, 10 classes).
* **CV score: Nadeau-Bengio corrected resampled t** (Nadeau & Bengio 2003, "Inference for the generalization error",
  Machine Learning 52, eq. 12 and section 5). The k fold scores share training images, so they are positively
  correlated and the naive variance s^2/k is too small; Nadeau and Bengio replace it by (1/k + n_val/n_fit) s^2, with
  a t on k - 1 degrees of freedom. Bouckaert & Frank (2004, "Evaluating the replicability of significance tests for
  comparing learning algorithms", PAKDD) apply the same formula to r repeats of k-fold CV with k = r*k folds. The
  target is the expected score of the *procedure* trained on n_fit images, not of one fitted probe.

Paired tests against the best row (one p-value per row, then Holm's adjustment)
-------------------------------------------------------------------------------
* **CV folds: one-sided corrected paired t** on the fold differences best - row, same corrected variance; the folds
  are the same for every row, so the differences cancel what the rows share. And a **one-sided exact McNemar test on
  the out-of-fold predictions** (every training image is validated once, by the fold that left it out): the t has k - 1
  degrees of freedom and little power with 5 folds, the image-level test has the power of every image but sees only
  the images' variance, not the training sets'. A row counts as statistically as good as the best (a candidate of the
  ``cheapest`` pick) only when neither rejects.
* **Test accuracy: exact McNemar test** (McNemar 1947, Psychometrika 12), the two-sided binomial test on the
  discordant images, ``scipy.stats.binomtest(b, b + c, 0.5)``: the test SimCLR uses to compare linear probes on the
  same test images (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
  appendix B.8). Exact, so valid for the few discordant images two good probes have.
* **Multi-label mAP: paired bootstrap** over test images (the same resampled images for both rows), one-sided
  p = (1 + #{resamples with mAP_best - mAP_row <= 0}) / (1 + n_resamples) (Davison & Hinkley 1997, "Bootstrap Methods
  and their Application", eq. 4.11: the +1 keeps the p-value valid).
* **Multiplicity: Holm's step-down** (Holm 1979, "A simple sequentially rejective multiple test procedure",
  Scandinavian Journal of Statistics 6). Controls the family-wise error rate over the rows for any dependence between
  the tests, which rows computed on the same images certainly have, and is uniformly more powerful than Bonferroni.
* **Rank agreement across redrawn splits:** Kendall's tau-b and Spearman's rho between the rows' CV scores of every
  pair of repeats (``scipy.stats.kendalltau``, ``scipy.stats.spearmanr``), averaged: does a redrawn split reorder the
  rows?

Rows
----
:func:`annotate_rows` fills a sweep's rows with all of the above (:class:`Evidence` is what each row's task handed
back); :func:`pick_cheapest` is the ``cheapest`` pick; :func:`stability` reads the redrawn splits of ``repeats``.

Metrics
-------
:func:`balanced_accuracy`, :func:`macro_f1` and :func:`mean_average_precision` equal scikit-learn's
``balanced_accuracy_score``, ``f1_score(average="macro")`` and ``average_precision_score`` (per class, averaged over
classes with a positive) on one sample, and are vectorized over leading axes so one call scores every bootstrap
resample.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

from ..errors import ParameterError
from ._results import Split, SweepConfig, SweepRow, best_of
from ._scoring import pack_hits, unpack_hits

__all__ = [
    "CONFIDENCE",
    "wilson_interval",
    "balanced_accuracy",
    "macro_f1",
    "mean_average_precision",
    "bootstrap_interval",
    "corrected_t_interval",
    "corrected_paired_t",
    "mcnemar_exact",
    "paired_bootstrap_map",
    "holm",
    "rank_agreement",
    "Evidence",
    "row_evidence",
    "saved_evidence",
    "fold_sizes",
    "annotate_rows",
    "compare_with_best",
    "equal_to_best",
    "pick_cheapest",
    "probe_bytes",
    "stability",
]

CONFIDENCE = 0.95

# Elements of one (batch, n) gather that a vectorized metric call may hold at once: 2**22 int64 = 32 MiB per array.
_CHUNK_ELEMENTS = 2**22
# mAP sorts and keeps several (batch, K, n) intermediates per resample; a smaller budget keeps it near 100 MiB.
_MAP_CHUNK_ELEMENTS = 2**21


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float, np.floating)) and 0 < confidence < 1):
        raise ParameterError(f"confidence must be a level strictly between 0 and 1 (e.g. 0.95), got {confidence!r}.")
    return float(confidence)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion, e.g. test accuracy from ``successes`` hits out of ``n`` images.

    Parameters
    ----------
    successes : int
        Number of successes (correct test images), ``0 <= successes <= n``.
    n : int
        Number of trials (test images), at least 1.
    confidence : float, default=0.95
        Confidence level of the two-sided interval.

    Returns
    -------
    low, high : float
        ``scipy.stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")``.

    References
    ----------
    Wilson (1927), JASA 22; Brown, Cai & DasGupta (2001), Statistical Science 16.
    """
    n = _check_count("n (the number of test images)", n, 1)
    successes = _check_count("successes", successes, 0)
    if successes > n:
        raise ParameterError(f"successes must be at most n, got successes={successes} > n={n}.")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=_check_confidence(confidence), method="wilson")
    return float(ci.low), float(ci.high)


def _check_labels(y: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    y, pred = np.asarray(y), np.asarray(pred)
    n_classes = _check_count("n_classes", n_classes, 1)
    if y.shape != pred.shape or y.ndim == 0 or y.shape[-1] == 0:
        raise ParameterError(
            f"y and pred must be label arrays of the same shape (..., n) with n >= 1, got {y.shape} and {pred.shape}."
        )
    for name, a in (("y", y), ("pred", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ParameterError(
                f"{name} must hold integer class indices, got dtype {a.dtype}; encode the labels first."
            )
        if a.min() < 0 or a.max() >= n_classes:
            raise ParameterError(
                f"{name} holds labels in [{a.min()}, {a.max()}], outside [0, n_classes={n_classes}); "
                "pass the number of classes of the whole label set."
            )
    return y, pred, n_classes


def _class_counts(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample class counts (true, predicted, true positives), each of shape (..., k), by offset ``bincount``.

    Few classes (k^2 <= 2n): one bincount of the codes y*k + pred per sample gives the confusion matrix, whose row sums,
    column sums and diagonal are the three counts (8 ms for 2000 x 450 labels, against 25 ms for three bincounts).
    Many classes: three bincounts over k bins each, so the work stays O(n) per sample, never O(k^2).
    Memory stays bounded: chunks of samples of at most 2**22 elements, never an (..., n, k) one-hot.
    """
    lead, n = y.shape[:-1], y.shape[-1]
    y2, p2 = y.reshape(-1, n), pred.reshape(-1, n)
    rows = y2.shape[0]
    out = np.empty((3, rows, k), dtype=np.int64)
    confusion = k * k <= 2 * n
    bins = k * k if confusion else k
    step = max(1, _CHUNK_ELEMENTS // max(n, bins))
    for start in range(0, rows, step):
        yc, pc = y2[start : start + step], p2[start : start + step]
        m = yc.shape[0]
        offset = (np.arange(m, dtype=np.int64) * bins)[:, None]
        if confusion:
            code = yc.astype(np.intp)  # in place from here: a third of the temporaries of y * k + pred + offset
            code *= k
            code += pc
            code += offset
            c = np.bincount(code.ravel(), minlength=m * bins).reshape(m, k, k)
            out[0, start : start + m] = c.sum(axis=2)
            out[1, start : start + m] = c.sum(axis=1)
            out[2, start : start + m] = np.einsum("mkk->mk", c)
        else:
            yi, pi = (yc + offset).ravel(), (pc + offset).ravel()
            out[0, start : start + m] = np.bincount(yi, minlength=m * bins).reshape(m, k)
            out[1, start : start + m] = np.bincount(pi, minlength=m * bins).reshape(m, k)
            hits = np.bincount(yi, weights=(yc == pc).ravel(), minlength=m * bins)
            out[2, start : start + m] = hits.reshape(m, k).astype(np.int64)
    true, predicted, tp = (a.reshape(*lead, k) for a in out)
    return true, predicted, tp


def _mean_over(values: np.ndarray, present: np.ndarray) -> np.ndarray | float:
    total = np.where(present, values, 0.0).sum(axis=-1) / present.sum(axis=-1)
    return float(total) if total.ndim == 0 else total


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray | float:
    """Balanced accuracy: the mean recall over the classes present in ``y``, vectorized along the last axis.

    Equals :func:`sklearn.metrics.balanced_accuracy_score` on 1-d input, which also averages over the classes of
    ``y_true`` only (a class only predicted has no recall).

    Parameters
    ----------
    y, pred : ndarray of int of shape (..., n)
        True and predicted class indices in ``[0, n_classes)``; the samples are on the last axis.
    n_classes : int
        Number of classes of the label set.

    Returns
    -------
    float or ndarray of shape (...)
        One balanced accuracy per leading index.

    References
    ----------
    Brodersen et al. (2010), "The balanced accuracy and its posterior distribution", ICPR.
    """
    y, pred, k = _check_labels(y, pred, n_classes)
    true, _, tp = _class_counts(y, pred, k)
    present = true > 0
    return _mean_over(tp / np.maximum(true, 1), present)


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray | float:
    """Macro F1: the unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN), vectorized along the last axis.

    The mean runs over the classes present in ``y`` *or* ``pred``, as :func:`sklearn.metrics.f1_score` with
    ``average="macro"`` does (its labels are those of both arrays); a present class with no true positive scores 0.
    No class present in the mean has 2 TP + FP + FN = 0, so sklearn's ``zero_division`` never applies.

    Parameters
    ----------
    y, pred : ndarray of int of shape (..., n)
        True and predicted class indices in ``[0, n_classes)``; the samples are on the last axis.
    n_classes : int
        Number of classes of the label set.

    Returns
    -------
    float or ndarray of shape (...)
        One macro F1 per leading index.
    """
    y, pred, k = _check_labels(y, pred, n_classes)
    true, predicted, tp = _class_counts(y, pred, k)
    denominator = true + predicted  # = 2 TP + FP + FN
    present = denominator > 0
    return _mean_over(2 * tp / np.maximum(denominator, 1), present)


def mean_average_precision(Y: np.ndarray, S: np.ndarray) -> np.ndarray | float:
    """Multi-label mAP: mean over classes with a positive of the uninterpolated average precision.

    Per class, AP = sum over distinct score thresholds t (descending) of (R(t) - R(t_prev)) P(t), precision and recall
    of the images scoring >= t: the step-wise area of :func:`sklearn.metrics.average_precision_score`, with tied
    scores entering together at one threshold as sklearn's ``precision_recall_curve`` groups them. Classes without a
    positive image have no AP and are left out of the mean; with none at all the result is NaN.

    Parameters
    ----------
    Y : ndarray of shape (..., n, K)
        0/1 (or bool) label indicators; images on axis -2, classes on the last axis.
    S : ndarray of shape (..., n, K)
        Finite decision scores, higher meaning more likely positive.

    Returns
    -------
    float or ndarray of shape (...)
        One mAP per leading index.

    References
    ----------
    Everingham et al. (2010), "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 88 (AP per class, mean over
    classes); sklearn's ``average_precision_score`` (no interpolation).
    """
    Y, S = np.asarray(Y), np.asarray(S, dtype=float)
    if Y.shape != S.shape or Y.ndim < 2 or Y.shape[-2] == 0:
        raise ParameterError(
            f"Y and S must have the same shape (..., n_images, n_classes) with n_images >= 1, "
            f"got {Y.shape} and {S.shape}."
        )
    if not np.isin(Y, (0, 1)).all():
        raise ParameterError("Y must hold 0/1 label indicators; binarize multi-label targets first.")
    if not np.isfinite(S).all():
        raise ParameterError("S holds NaN or infinite scores; every image needs a finite score for every class.")
    y = np.moveaxis(Y.astype(bool), -1, -2)  # (..., K, n): sort each class's images
    s = np.moveaxis(S, -1, -2)
    order = np.argsort(-s, axis=-1, kind="stable")
    s = np.take_along_axis(s, order, axis=-1)
    tp = np.cumsum(np.take_along_axis(y, order, axis=-1), axis=-1, dtype=np.int64)
    n = s.shape[-1]
    end = np.ones(s.shape, dtype=bool)  # last image of each run of tied scores: the thresholds
    end[..., :-1] = s[..., 1:] != s[..., :-1]
    # true positives at the previous threshold: running max of tp at thresholds (tp is non-decreasing), shifted by one
    at_end = np.maximum.accumulate(np.where(end, tp, 0), axis=-1)
    previous = np.zeros_like(tp)
    previous[..., 1:] = at_end[..., :-1]
    precision = tp / np.arange(1, n + 1)
    area = np.where(end, (tp - previous) * precision, 0.0).sum(axis=-1)
    positives = tp[..., -1]
    has_positive = positives > 0
    ap = area / np.maximum(positives, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _mean_over(ap, has_positive)


def _narrowest(a: np.ndarray) -> np.ndarray:
    """An integer array in the narrowest integer dtype that holds its values (unchanged): SciPy gathers every
    resample, and moving int8 labels instead of int64 ones cuts that copy eightfold."""
    if a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        return a
    lo, hi = int(a.min()), int(a.max())
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return a.astype(dtype) if np.dtype(dtype).itemsize < a.dtype.itemsize else a
    return a


def bootstrap_interval(
    statistic: Callable[..., np.ndarray | float],
    data: tuple[np.ndarray, ...],
    *,
    seed: int,
    n_resamples: int = 2000,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a test-set metric, resampling whole test images.

    Wraps ``scipy.stats.bootstrap(data, statistic, paired=True, vectorized=True, axis=-1, method="percentile")``.

    Parameters
    ----------
    statistic : callable
        ``statistic(*arrays)``, vectorized: the images are on the last axis of each array and the result has the
        shape of the leading axes. SciPy hands it the arrays resampled with a resample axis inserted just before the
        images axis: a sample of shape (n,) arrives as (batch, n), one of shape (K, n) as (K, batch, n). Pass
        multi-label arrays transposed, images last (see Examples).
    data : tuple of ndarray
        The paired samples (labels, predictions, scores...), all with the same number ``n >= 2`` of images on the
        last axis.
    seed : int
        Seed of the resampling (``np.random.default_rng(seed)``): the interval is reproducible.
    n_resamples : int, default=2000
        Number of bootstrap resamples.
    confidence : float, default=0.95
        Confidence level of the two-sided interval.

    Returns
    -------
    low, high : float
        The ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the bootstrap distribution. A
        degenerate sample (every resample scores the same, e.g. a perfect probe) returns ``(value, value)``.

    Notes
    -----
    Percentile, not BCa: BCa's jackknife needs one statistic evaluation per left-out image, O(n^2) work that is too
    slow at 12,500-50,000 test images; the percentile interval's coverage for these smooth metrics at n >= 100 is
    within about a point of nominal (``tests/probing/test_stats.py``: 94.3-94.6 % at n = 450). Resamples are drawn in batches of at most 2**22 gathered
    elements, so memory stays bounded at any n. Measured on a 2-core VM: macro F1 of 450 images and 10 classes, 2000
    resamples, 33 ms per call, of which 23 ms are SciPy's own resampling (index draw and gathers, the floor for any
    statistic) and 10 ms the metric; 0.9 s at 12,500 images (1.2 s with 1,000 classes). Integer arrays are narrowed to
    the smallest integer dtype holding their values before resampling (int64 labels gathered as int8: 40 ms -> 33 ms).

    References
    ----------
    Efron & Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13.

    Examples
    --------
    >>> low, high = bootstrap_interval(lambda y, p: macro_f1(y, p, 10), (y_test, predicted), seed=0)  # doctest: +SKIP
    >>> low, high = bootstrap_interval(                                                              # doctest: +SKIP
    ...     lambda yt, st: mean_average_precision(np.moveaxis(yt, 0, -1), np.moveaxis(st, 0, -1)),
    ...     (Y_test.T, scores.T), seed=0)
    """
    arrays = tuple(np.asarray(a) for a in data)
    if not arrays or any(a.ndim == 0 for a in arrays) or len({a.shape[-1] for a in arrays}) != 1:
        raise ParameterError(
            f"data must be a non-empty tuple of arrays with the images on the last axis, all of the same length; got "
            f"shapes {[a.shape for a in arrays]}."
        )
    n = arrays[0].shape[-1]
    if n < 2:
        raise ParameterError(f"the bootstrap needs at least 2 test images, got {n}.")
    n_resamples = _check_count("n_resamples", n_resamples, 1)
    confidence = _check_confidence(confidence)
    arrays = tuple(_narrowest(a) for a in arrays)

    def vectorized(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(statistic(*resampled), dtype=float)

    per_resample = sum(a.size for a in arrays)  # one batch of resamples gathers at most 2**22 elements
    batch = max(1, min(n_resamples, _CHUNK_ELEMENTS // per_resample))
    with warnings.catch_warnings():
        # scipy warns (under BCa's name) when a quantile is NaN; handled below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            arrays,
            vectorized,
            n_resamples=n_resamples,
            batch=batch,
            vectorized=True,
            paired=True,
            axis=-1,
            confidence_level=confidence,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
    distribution = np.asarray(result.bootstrap_distribution, dtype=float)
    finite = distribution[np.isfinite(distribution)]
    if finite.size == 0:
        raise ParameterError(
            "the statistic is NaN on every bootstrap resample (e.g. mAP with no positive label); "
            "check the labels passed in data."
        )
    if finite.min() == finite.max():
        value = float(finite[0])
        return value, value
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):  # a few NaN resamples: the same percentiles of the others
        alpha = (1 - confidence) / 2
        low, high = (float(v) for v in np.quantile(finite, [alpha, 1 - alpha]))
    return low, high


def _fold_array(name: str, scores: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(scores, dtype=float)
    if a.ndim != 1 or a.size < 2:
        raise ParameterError(
            f"{name} must be a 1-d array of at least 2 fold scores, got shape {a.shape}; the corrected t needs k >= 2 "
            "folds (use folds >= 2 rather than one validation split)."
        )
    if not np.isfinite(a).all():
        raise ParameterError(f"{name} holds NaN or infinite fold scores: {a.tolist()}.")
    return a


def _correction(n_fit: int, n_val: int, k: int) -> float:
    n_fit = _check_count("n_fit (training images per fold)", n_fit, 1)
    n_val = _check_count("n_val (validation images per fold)", n_val, 1)
    return 1.0 / k + n_val / n_fit


def corrected_t_interval(
    fold_scores: Sequence[float] | np.ndarray, n_fit: int, n_val: int, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Mean CV score with the Nadeau-Bengio corrected resampled t interval.

    With k fold scores of mean m and sample variance s^2 (ddof=1), the interval is
    m +- t_{k-1, (1+confidence)/2} sqrt((1/k + n_val/n_fit) s^2), clipped to [0, 1]. The n_val/n_fit term accounts
    for the correlation between folds that share training images. For r repeats of k-fold CV pass all r*k fold
    scores: the same formula with k = r*k (Bouckaert & Frank 2004).

    Parameters
    ----------
    fold_scores : array-like of shape (k,)
        Score of every fold (accuracies in [0, 1]).
    n_fit, n_val : int
        Training and validation images per fold (for k-fold CV on n images, about n (k-1)/k and n/k).
    confidence : float, default=0.95
        Confidence level of the two-sided interval.

    Returns
    -------
    mean, low, high : float
        ``(m, m, m)`` when every fold scored the same.

    Notes
    -----
    The interval targets the expected score of the learning procedure trained on n_fit images. For a single k-fold
    split Nadeau and Bengio's n_val/n_fit = 1/(k-1) overstates the correlation of a stable learner's folds, so the
    interval is conservative there: ``test_stats.py`` measures 97 % coverage of a 95 % interval for a nearest-mean
    classifier in 50 dimensions with 5 folds (98 % in 10 dimensions, 98.5 % with 10 folds), against 95.3 % under 10
    repeats of 5-fold CV, the repeated resampling the correction was derived for.

    References
    ----------
    Nadeau & Bengio (2003), "Inference for the generalization error", Machine Learning 52, 239-281, eq. 12;
    Bouckaert & Frank (2004), PAKDD, LNCS 3056.
    """
    scores = _fold_array("fold_scores", fold_scores)
    k = scores.size
    factor = _correction(n_fit, n_val, k)
    confidence = _check_confidence(confidence)
    m = float(scores.mean())
    spread = float(np.ptp(scores))
    if spread <= 1e-12 * max(1.0, abs(m)):
        return m, m, m
    half = float(stats.t.ppf((1 + confidence) / 2, k - 1)) * math.sqrt(factor * scores.var(ddof=1))
    return m, max(0.0, m - half), min(1.0, m + half)


def corrected_paired_t(
    best_folds: Sequence[float] | np.ndarray, row_folds: Sequence[float] | np.ndarray, n_fit: int, n_val: int
) -> float:
    """One-sided p-value that the best row's expected CV score exceeds a row's (corrected resampled paired t).

    On the fold differences d = best - row (the same folds for both rows): t = mean(d) / sqrt((1/k + n_val/n_fit)
    s_d^2), p = ``scipy.stats.t.sf(t, k - 1)``.

    Parameters
    ----------
    best_folds, row_folds : array-like of shape (k,)
        Fold scores of the best row and of the row, fold by fold on the same folds.
    n_fit, n_val : int
        Training and validation images per fold.

    Returns
    -------
    float
        The p-value: 1.0 when every difference is zero; with every difference equal and nonzero (no variance),
        0.0 when the best is ahead, 1.0 when it is behind.

    References
    ----------
    Nadeau & Bengio (2003), Machine Learning 52, section 5 (the corrected resampled t test); Bouckaert & Frank (2004).
    """
    best, row = _fold_array("best_folds", best_folds), _fold_array("row_folds", row_folds)
    if best.shape != row.shape:
        raise ParameterError(
            f"best_folds and row_folds must score the same folds, got {best.size} and {row.size} scores."
        )
    d = best - row
    k = d.size
    factor = _correction(n_fit, n_val, k)
    m = float(d.mean())
    scale = max(1e-12, float(np.abs(d).max()))
    if float(np.ptp(d)) <= 1e-12 * max(1.0, scale):  # no variance: the sign decides
        if abs(m) <= 1e-12:
            return 1.0
        return 0.0 if m > 0 else 1.0
    t = m / math.sqrt(factor * d.var(ddof=1))
    return float(stats.t.sf(t, k - 1))


def mcnemar_exact(hits_best: np.ndarray, hits_row: np.ndarray, alternative: str = "two-sided") -> float:
    """Exact McNemar test of two probes' paired per-image correctness on the same test images.

    With b images only the best gets right and c images only the row gets right, the p-value is the two-sided
    binomial test of b successes in b + c trials at 1/2, ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``;
    ``alternative="greater"`` is the one-sided test that the best is right more often (b > c).

    Parameters
    ----------
    hits_best, hits_row : ndarray of bool of shape (n,)
        Whether each test image is classified correctly, in the same image order.

    Returns
    -------
    float
        The two-sided p-value; 1.0 when the probes never disagree (b + c = 0).

    References
    ----------
    McNemar (1947), Psychometrika 12; Chen et al. (2020), SimCLR, appendix B.8.
    """
    best, row = np.asarray(hits_best), np.asarray(hits_row)
    if best.shape != row.shape or best.ndim != 1 or best.size == 0:
        raise ParameterError(
            f"hits_best and hits_row must be 1-d arrays over the same test images, got shapes {best.shape} and "
            f"{row.shape}."
        )
    if best.dtype != bool or row.dtype != bool:
        raise ParameterError(f"hits must be boolean (prediction == label), got dtypes {best.dtype} and {row.dtype}.")
    if alternative not in ("two-sided", "greater"):
        raise ParameterError(f"alternative={alternative!r}; use 'two-sided' or 'greater' (the best is better).")
    b = int(np.count_nonzero(best & ~row))
    c = int(np.count_nonzero(row & ~best))
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5, alternative=alternative).pvalue)


def paired_bootstrap_map(
    Y: np.ndarray, S_best: np.ndarray, S_row: np.ndarray, *, seed: int, n_resamples: int = 2000
) -> float:
    """One-sided paired bootstrap p-value that the best row's test mAP exceeds a row's.

    Each resample draws n test images with replacement and scores both rows on the same images;
    p = (1 + #{resamples with mAP_best - mAP_row <= 0}) / (1 + n_resamples). A resample whose mAP is undefined
    (no positive label at all) counts against the best.

    Parameters
    ----------
    Y : ndarray of shape (n, K)
        0/1 test label indicators.
    S_best, S_row : ndarray of shape (n, K)
        Decision scores of the best row and of the row.
    seed : int
        Seed of the resampling (``np.random.default_rng(seed)``).
    n_resamples : int, default=2000
        Number of bootstrap resamples.

    Returns
    -------
    float
        The p-value, in ``[1 / (1 + n_resamples), 1]``; 1.0 for identical score arrays.

    References
    ----------
    Davison & Hinkley (1997), "Bootstrap Methods and their Application", section 4.4 and eq. 4.11.
    """
    Y, best, row = np.asarray(Y), np.asarray(S_best, dtype=float), np.asarray(S_row, dtype=float)
    if Y.ndim != 2 or Y.shape != best.shape or Y.shape != row.shape or Y.shape[0] < 2:
        raise ParameterError(
            f"Y, S_best and S_row must have the same shape (n_images, n_classes) with n_images >= 2, got {Y.shape}, "
            f"{best.shape} and {row.shape}."
        )
    n_resamples = _check_count("n_resamples", n_resamples, 1)
    mean_average_precision(Y, best), mean_average_precision(Y, row)  # validates labels and scores
    if np.array_equal(best, row):
        return 1.0
    rng = np.random.default_rng(seed)
    n = Y.shape[0]
    step = max(1, _MAP_CHUNK_ELEMENTS // Y.size)
    not_ahead = 0
    for start in range(0, n_resamples, step):
        idx = rng.integers(0, n, size=(min(step, n_resamples - start), n))
        Yb = Y[idx]
        diff = np.asarray(mean_average_precision(Yb, best[idx])) - np.asarray(mean_average_precision(Yb, row[idx]))
        not_ahead += int(np.count_nonzero(~(diff > 0)))  # NaN (undefined mAP) counts as not ahead
    return (1 + not_ahead) / (1 + n_resamples)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order.

    With the m defined p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    min(1, max_{j <= i} (m - j + 1) p_(j)). Rejecting every hypothesis whose adjusted p-value is <= alpha is Holm's
    procedure at level alpha, which controls the family-wise error rate under any dependence.

    Parameters
    ----------
    pvalues : array-like of shape (m,)
        p-values in [0, 1]; NaN marks a row with no test (the best row itself), left NaN and not counted in m.

    Returns
    -------
    ndarray of shape (m,)
        Adjusted p-values.

    References
    ----------
    Holm (1979), "A simple sequentially rejective multiple test procedure", Scandinavian Journal of Statistics 6,
    65-70.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ParameterError(f"pvalues must be a 1-d array, got shape {p.shape}.")
    defined = ~np.isnan(p)
    q = p[defined]
    if ((q < 0) | (q > 1)).any():
        raise ParameterError(f"p-values must lie in [0, 1] (or be NaN for no test), got {q[(q < 0) | (q > 1)]}.")
    m = q.size
    order = np.argsort(q, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(q[order] * (m - np.arange(m))))
    out = np.full(p.shape, np.nan)
    out[defined] = adjusted
    return out


def rank_agreement(scores_by_repeat: np.ndarray) -> dict[str, float]:
    """How well R redrawn splits agree on the order of the rows: mean Kendall tau-b and Spearman rho over pairs.

    Parameters
    ----------
    scores_by_repeat : ndarray of shape (repeats, rows)
        CV score of every row under every redrawn split. NaN scores (a row missing from a repeat) are left out of the
        pairs they belong to.

    Returns
    -------
    dict
        ``{"kendall_tau": float, "spearman": float, "pairs": int}``: the means over the pairs of repeats where both
        correlations are defined, and the number of such pairs. A pair where one repeat scores every row the same
        (or fewer than 2 rows are scored in both) has no defined correlation and is skipped; with no defined pair both
        means are NaN and ``pairs`` is 0.

    References
    ----------
    Kendall (1945), "The treatment of ties in ranking problems", Biometrika 33 (tau-b); Spearman (1904).
    """
    scores = np.asarray(scores_by_repeat, dtype=float)
    if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 2:
        raise ParameterError(
            f"scores_by_repeat must have shape (repeats, rows) with at least 2 repeats and 2 rows, got {scores.shape}; "
            "rank agreement needs repeats >= 2."
        )
    taus, rhos = [], []
    for a, b in itertools.combinations(range(scores.shape[0]), 2):
        both = ~(np.isnan(scores[a]) | np.isnan(scores[b]))
        x, y = scores[a, both], scores[b, both]
        if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # undefined: skip rather than let scipy warn
            continue
        taus.append(float(stats.kendalltau(x, y).statistic))
        rhos.append(float(stats.spearmanr(x, y).statistic))
    if not taus:
        return {"kendall_tau": math.nan, "spearman": math.nan, "pairs": 0}
    return {"kendall_tau": float(np.mean(taus)), "spearman": float(np.mean(rhos)), "pairs": len(taus)}


@dataclass
class Evidence:
    """What a row's intervals and paired tests are computed from, on the plain test views and the CV folds."""

    folds: np.ndarray | None  # the score of every CV fold at the row's chosen C or k
    cv_hits: np.ndarray | None = None  # out-of-fold correctness of every validation image, fold after fold
    hits: np.ndarray | None = None  # per test image: predicted exactly right (multi-label: the whole label set)
    y: np.ndarray | None = None  # true labels of the test images (n,) or (n, classes) for multi-label
    predicted: np.ndarray | None = None  # predicted labels (n,) or 0/1 (n, classes)
    scores: np.ndarray | None = None  # multi-label: decision scores (n, classes)


def row_evidence(row: SweepRow, fitted: Any, y_plain: np.ndarray) -> Evidence:
    """The evidence a task handed back for ``row``: its fold scores and its fitted probe's test predictions (few-shot
    rows, averaged over draws, have neither)."""
    saved = saved_evidence(row, len(y_plain))
    if fitted is None:
        return saved
    y, predicted = np.asarray(y_plain), np.asarray(fitted.predicted)
    same = predicted == y
    hits = same.all(axis=1) if same.ndim == 2 else same
    scores = np.asarray(fitted.scores, dtype=float) if row.protocol == "multilabel" else None
    return replace(saved, hits=hits, y=y, predicted=predicted, scores=scores)


def saved_evidence(row: SweepRow, n_test: int) -> Evidence:
    """The evidence a row read back from ``results.json`` carries: its fold scores and per-image test hits."""
    folds = None if row.cv_folds is None else np.asarray(row.cv_folds, dtype=float)
    cv_hits = None if row.cv_hits is None else unpack_hits(row.cv_hits, len(row.cv_hits) * 4)
    hits = None if row.test_hits is None else unpack_hits(row.test_hits, n_test)
    return Evidence(folds, cv_hits, hits)


def fold_sizes(split: Split, views: int) -> tuple[int, int]:
    """Images fitted and validated per fold (the folds' mean, rounded: they differ by one image at most): the n_fit
    and n_val of the Nadeau-Bengio correction."""
    per = views + 1
    return (int(round(np.mean([len(fit) / per for fit, _ in split.folds]))),
            int(round(np.mean([len(val) for _, val in split.folds]))))  # fmt: skip


def annotate_rows(rows: Sequence[SweepRow], evidence: Sequence[Evidence], best: SweepRow,
                  sizes: tuple[int, int], config: SweepConfig) -> None:  # fmt: skip
    """Fill every row's intervals and its paired tests against ``best``, in place (see ``STATISTICS``)."""
    level = 1 - config.alpha
    n_fit, n_val = sizes
    for row, ev in zip(rows, evidence):
        row.cv_ci = _cv_interval(row, ev, sizes, level)
        if ev.predicted is None or ev.hits is None:
            continue
        hits = ev.hits
        n = len(hits)
        row.test_hits = pack_hits(hits)
        row.test_accuracy_ci = list(wilson_interval(int(hits.sum()), n, level))
        for name in ("test_top5_accuracy", "test_tta_accuracy"):
            value = getattr(row, name)
            if value is not None:
                setattr(row, f"{name}_ci", list(wilson_interval(int(round(value * n)), n, level)))
        if n < 2:  # one test image: nothing to resample
            continue
        resampled = dict(seed=config.seed, n_resamples=config.resamples, confidence=level)
        if row.protocol == "multilabel":
            row.test_map_ci = _defined(bootstrap_interval(_map_statistic, (ev.y.T, ev.scores.T), **resampled))
            continue
        k = int(max(ev.y.max(), ev.predicted.max())) + 1
        for name, metric in (("test_balanced_accuracy", balanced_accuracy), ("test_macro_f1", macro_f1)):
            statistic = _labels_statistic(metric, k)
            setattr(row, f"{name}_ci", _defined(bootstrap_interval(statistic, (ev.y, ev.predicted), **resampled)))
    compare_with_best(rows, evidence, best, sizes, config)


def _cv_interval(row: SweepRow, ev: Evidence, sizes: tuple[int, int], level: float) -> list[float] | None:
    """The CV score's interval: the corrected resampled t over the folds; Wilson on the pooled out-of-fold hits of a
    single-label row where the folds cannot give one (one validation split, or folds that all scored the same: a
    zero-width t interval would claim a certainty that a few validation images do not have)."""
    n_fit, n_val = sizes
    if ev.folds is None or not len(ev.folds):
        return None
    if len(ev.folds) >= 2 and np.ptp(ev.folds) > 1e-12:
        _, low, high = corrected_t_interval(ev.folds, n_fit, n_val, level)
        return [low, high]
    if row.protocol == "multilabel":  # mAP is no proportion: no Wilson interval for it
        return None
    if ev.cv_hits is not None and len(ev.folds) >= 2:
        n = int(round(n_val * len(ev.folds)))  # every training image validated once (the hits are padded to bytes)
        return list(wilson_interval(int(ev.cv_hits[:n].sum()), n, level))
    return list(wilson_interval(int(round(ev.folds[0] * n_val)), n_val, level))


def _defined(interval: tuple[float, float]) -> list[float] | None:
    """A bootstrap interval, or None where every resample gave the same value (no spread to report, not certainty)."""
    low, high = interval
    return None if high - low <= 1e-12 else [low, high]


def _labels_statistic(metric: Any, k: int) -> Any:
    def statistic(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return metric(y, pred, k)

    return statistic


def _map_statistic(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """mAP of resampled images: ``(classes, resamples, images)`` in, as :func:`bootstrap_interval` hands them."""

    return mean_average_precision(np.moveaxis(Y, 0, -1), np.moveaxis(S, 0, -1))


def compare_with_best(rows: Sequence[SweepRow], evidence: Sequence[Evidence], best: SweepRow,
                      sizes: tuple[int, int], config: SweepConfig) -> None:  # fmt: skip
    """Every row's paired tests against ``best`` on the same folds and test images, in place: ``p_cv`` (one-sided
    corrected paired t on the fold scores), ``p_cv_images`` (one-sided exact McNemar on the out-of-fold predictions)
    and ``p_test`` (two-sided exact McNemar on the test images; mAP: a one-sided paired bootstrap). Holm-adjusted over
    the rows that compete for the best (kNN rows are tested, not adjusted; few-shot rows have no paired evidence).

    The best was chosen on these same folds, so the CV tests are biased toward "the best is better": a row of equal
    quality is rejected more often than alpha (one simulation of 12 equal rows: 24 %). That errs on the safe side for
    the cheapest pick (fewer rows pass as equal) and against claims that a row is worse; ``p_test``, on test images
    the choice never saw, has no such bias."""

    n_fit, n_val = sizes
    at = next(i for i, r in enumerate(rows) if r is best)
    ref = evidence[at]
    for row in rows:
        for name in _P_VALUES:
            setattr(row, name, None)
            setattr(row, f"{name}_holm", None)
    for row, ev in zip(rows, evidence):
        if row is best or not (row.selectable or row.protocol == "knn"):
            continue
        if ev.folds is not None and ref.folds is not None and len(ev.folds) == len(ref.folds) >= 2:
            row.p_cv = float(corrected_paired_t(ref.folds, ev.folds, n_fit, n_val))
        if ev.cv_hits is not None and ref.cv_hits is not None and len(ev.cv_hits) == len(ref.cv_hits):
            # the same images in the same order (the folds' validation images): the padding bits are equal too
            row.p_cv_images = float(mcnemar_exact(ref.cv_hits, ev.cv_hits, alternative="greater"))
        if row.protocol == "multilabel" or best.protocol == "multilabel":  # mAP: a paired bootstrap of the scores
            if ev.scores is not None and ref.scores is not None and ev.scores.shape == ref.scores.shape:
                row.p_test = float(paired_bootstrap_map(ref.y, ref.scores, ev.scores, seed=config.seed,
                                                        n_resamples=config.resamples))  # fmt: skip
        elif ev.hits is not None and ref.hits is not None and len(ev.hits) == len(ref.hits):
            row.p_test = float(mcnemar_exact(ref.hits, ev.hits))
    family = [r for r in rows if r.selectable]  # the rows that compete for the best; kNN rows are baselines
    for name in _P_VALUES:
        values = np.array([np.nan if getattr(r, name) is None else getattr(r, name) for r in family], dtype=float)
        if np.isfinite(values).any():
            for row, p in zip(family, holm(values)):
                if np.isfinite(p):
                    setattr(row, f"{name}_holm", float(p))


_P_VALUES = ("p_cv", "p_cv_images", "p_test")


def equal_to_best(row: SweepRow, best: SweepRow, config: SweepConfig) -> bool:
    """Whether ``row`` counts as statistically as good as ``best`` on the CV folds (or within the tolerance)."""
    if row is best or row.key == best.key:
        return True
    if config.tolerance is not None:
        return row.score is not None and best.score is not None and row.score >= best.score - config.tolerance / 100
    tests = [p for p in (row.p_cv, row.p_cv_images) if p is not None]
    return bool(tests) and min(tests) >= config.alpha


def pick_cheapest(rows: Sequence[SweepRow], best: SweepRow, config: SweepConfig) -> SweepRow | None:
    """The selectable row with the lowest forward FLOPs among those equal to the best (ties: the higher CV score,
    then fewer dimensions); None when no row's FLOPs are known."""
    candidates = [r for r in rows if r.selectable and r.flops is not None and equal_to_best(r, best, config)]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.flops, -(r.score or 0.0), r.dims))


def probe_bytes(estimator: Any) -> int:
    """Bytes of a fitted probe's learned arrays, as a bundle stores them (float32): the normalizer's statistics and
    the linear layer's weights and biases."""
    total = 0
    for _, step in getattr(estimator, "steps", [("", estimator)]):
        inner = [getattr(e, "best_estimator_", e) for e in getattr(step, "estimators_", [step])]
        for part in inner:
            for name in ("mean_", "scale_", "coef_", "intercept_"):
                value = getattr(part, name, None)
                if isinstance(value, np.ndarray):
                    total += 4 * value.size
    return int(total)


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    """NaN as None: results.json is strict JSON (no pair of draws ranked anything when every row scored the same)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}


def stability(rows: Sequence[SweepRow], redrawn: Sequence[Sequence[SweepRow]]) -> dict[str, Any]:
    """Fill every row's stability over the redrawn splits (its test accuracy's mean and std, ``p_best``) and return
    the rank agreement of the draws: ``{"repeats", "rank_correlation": {kendall_tau, spearman, pairs}, "rows"}``."""

    draws = [list(rows), *[list(r) for r in redrawn]]
    by_key = [{r.key: r for r in draw} for draw in draws]
    shared = [r for r in rows if r.selectable and all(r.key in d for d in by_key)]
    winners = [best_of(draw).key for draw in draws]
    for row in shared:
        accuracies = np.array([d[row.key].test_accuracy for d in by_key], dtype=float)
        row.test_accuracy_mean = float(accuracies.mean())
        row.test_accuracy_repeat_std = float(accuracies.std(ddof=1))
        row.p_best = winners.count(row.key) / len(draws)
    scores = np.array([[d[r.key].score for r in shared] for d in by_key], dtype=float)
    return {
        "repeats": len(draws),
        "seeds": "seed + r for r in range(repeats)",
        "rank_correlation": _finite(rank_agreement(scores)) if len(shared) >= 2 else None,
        "best_by_repeat": [" / ".join(str(p) for p in key if p not in ("", None)) for key in winners],
    }
