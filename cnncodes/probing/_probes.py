"""Probes: plain scikit-learn Pipelines of a normalizer and a linear classifier.

Normalizers: ``standard`` (StandardScaler), ``l2`` (per-sample L2, the protocol of Razavian et al. 2014 and the
FAIR/VISSL SVM benchmark), ``power`` (signed square root, then L2) and ``none``.
Classifiers: ``logreg`` (multinomial logistic regression), ``linsvc`` (linear SVM, squared hinge) and ``sgd``
(hinge loss, streamable with ``partial_fit``; ``sgd-log`` for log loss), and the ``knn`` baseline (cosine similarity,
majority vote of ``n_neighbors``).

``backend="torch"`` (default) uses the L-BFGS solvers of :mod:`cnncodes.linear`; ``backend="sklearn"`` uses
:class:`~sklearn.linear_model.LogisticRegression` and :class:`~sklearn.svm.LinearSVC` (primal or dual chosen from n vs d).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from ..errors import ParameterError
from ._linear import TorchLinearSVC, TorchLogisticRegression

__all__ = ["NORMALIZERS", "CLASSIFIERS", "LINEAR", "make_normalizer", "make_classifier", "make_probe", "signed_sqrt"]

NORMALIZERS = ("standard", "l2", "power", "none")
CLASSIFIERS = ("logreg", "linsvc", "sgd", "sgd-log", "knn")
#: Classifiers with a linear decision function (what a bundle and an export hold).
LINEAR = ("logreg", "linsvc", "sgd", "sgd-log")
#: Loss each classifier optimizes in the fast path solver (sgd has none: it is fitted by scikit-learn).
PATH_LOSS = {"logreg": "multinomial", "linsvc": "squared_hinge"}


def signed_sqrt(X: np.ndarray) -> np.ndarray:
    """Signed power normalization ``sign(x) * sqrt(|x|)``."""
    return np.sign(X) * np.sqrt(np.abs(X))


def make_normalizer(name: str) -> BaseEstimator | str:
    """The normalizer step for ``name`` (``"passthrough"`` for ``none``)."""
    if name == "standard":
        return StandardScaler()
    if name == "l2":
        return Normalizer("l2")
    if name == "power":
        return make_pipeline(FunctionTransformer(signed_sqrt, feature_names_out="one-to-one"), Normalizer("l2"))
    if name == "none":
        return "passthrough"
    raise ParameterError(f"unknown normalizer {name!r}; use one of {list(NORMALIZERS)}.")


def make_classifier(
    name: str,
    C: float = 1.0,
    *,
    backend: str = "torch",
    n_samples: int | None = None,
    random_state: int = 0,
    device: str = "cpu",
    n_neighbors: int = 20,
) -> BaseEstimator:
    """The classifier step. For ``sgd``, ``alpha = 1 / (C * n_samples)`` matches the C scale of the other probes;
    ``knn`` takes ``n_neighbors`` instead of C."""
    if backend not in ("torch", "sklearn"):
        raise ParameterError(f"backend={backend!r}; use 'torch' or 'sklearn'.")
    if name == "logreg":
        return (
            TorchLogisticRegression(C=C, device=device)
            if backend == "torch"
            else LogisticRegression(C=C, max_iter=1000)
        )
    if name == "linsvc":
        return TorchLinearSVC(C=C, device=device) if backend == "torch" else LinearSVC(C=C, dual="auto", max_iter=5000)
    if name in ("sgd", "sgd-log"):
        alpha = 1.0 / (C * (n_samples or 1000))
        return SGDClassifier(loss="hinge" if name == "sgd" else "log_loss", alpha=alpha, random_state=random_state)
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=n_neighbors, metric="cosine", algorithm="brute")
    raise ParameterError(f"unknown classifier {name!r}; use one of {list(CLASSIFIERS)}.")


def make_probe(classifier: str = "logreg", normalizer: str = "standard", C: float = 1.0, **kwargs: object) -> Pipeline:
    """A probe Pipeline ``[("normalize", ...), ("classify", ...)]``.

    Examples
    --------
    >>> make_probe("linsvc", "l2", C=0.1)
    Pipeline(steps=[('normalize', Normalizer()), ('classify', TorchLinearSVC(C=0.1))])
    """
    return Pipeline(
        [("normalize", make_normalizer(normalizer)), ("classify", make_classifier(classifier, C, **kwargs))]
    )
