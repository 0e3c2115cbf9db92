"""Linear classifiers solved with L-BFGS in torch: fast C paths on CPU, and the same code on CUDA.

Two losses, each with scikit-learn's objective ``0.5 * ||W||^2 + C * sum(loss)`` (the intercept is not penalized):

* ``multinomial`` -- multinomial logistic regression, as :class:`sklearn.linear_model.LogisticRegression`;
* ``squared_hinge`` -- one-vs-rest L2-SVM, as :class:`sklearn.svm.LinearSVC`'s default loss.

When there are more features than samples, the problem is solved exactly in the n-dimensional span of the training
rows (the "dual" trick: the optimum of an L2-penalized linear model lies in that span) using the Gram matrix, and the
weights are mapped back. That is what makes a sweep over 10k-dimensional codes cheap: one eigendecomposition per fold
serves every C.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import ParameterError

__all__ = [
    "FeatureBasis",
    "LinearPath",
    "ProblemStack",
    "fit_path",
    "fit_paths",
    "TorchLogisticRegression",
    "TorchLinearSVC",
]

_LOSSES = ("multinomial", "squared_hinge")


@dataclass
class LinearPath:
    """Solutions along a C path: ``coefs[i]`` (d, K) and ``intercepts[i]`` (K,) for ``Cs[i]``.

    ``states[i]`` is the same solution in the solver's coordinates, to warm-start another path on the same basis.
    """

    Cs: list[float]
    coefs: list[np.ndarray]
    intercepts: list[np.ndarray]
    n_iter: list[int]
    states: list[tuple[torch.Tensor, torch.Tensor]]


class FeatureBasis:
    """Coordinates in which to solve: the raw features, or the span of the training rows when d > n.

    Build it once per training set and pass it to :func:`fit_path` for every C path on those rows.
    """

    def __init__(self, X: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> None:
        X = torch.as_tensor(
            np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X, device=device
        ).float()
        n, d = X.shape
        self.X = X
        self.reduced = d > n
        if self.reduced:
            gram = (X @ X.T).double()
            evals, evecs = torch.linalg.eigh(gram)
            keep = evals > evals.max().clamp_min(1e-30) * 1e-10
            inv_sqrt = evecs[:, keep] / evals[keep].sqrt()  # (n, r): Z = X V = U sqrt(L) = gram @ inv_sqrt
            self.Z = (gram @ inv_sqrt).float()
            self.inv_sqrt = inv_sqrt.float()
        else:
            self.Z = X

    def project(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        """New rows (m, d) in solve coordinates (m, r): their scores are ``project(X) @ A + b``."""
        X = torch.as_tensor(
            np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X, device=self.Z.device
        ).float()
        return (X @ self.X.T) @ self.inv_sqrt if self.reduced else X

    def from_features(self, W: torch.Tensor) -> torch.Tensor:
        """Weights on the original features (d, K) -> solve coordinates (their projection onto the span)."""
        if not self.reduced:
            return W
        return self.inv_sqrt.T @ (self.X @ W)

    def to_features(self, A: torch.Tensor) -> torch.Tensor:
        """Weights in solve coordinates -> weights on the original features (d, K)."""
        if not self.reduced:
            return A
        return self.X.T @ (self.inv_sqrt @ A)


class ProblemStack:
    """Several independent problems padded into one batch: (P, n, r) features, row masks and labels.

    Build it once for a set of CV folds and reuse it for every C and both losses.
    """

    def __init__(
        self,
        problems: Sequence[np.ndarray | torch.Tensor | FeatureBasis],
        ys: Sequence[np.ndarray],
        n_classes: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.bases = [p if isinstance(p, FeatureBasis) else FeatureBasis(p, device) for p in problems]
        self.n_classes = n_classes
        device, dtype = self.bases[0].Z.device, self.bases[0].Z.dtype
        n = max(b.Z.shape[0] for b in self.bases)
        r = max(b.Z.shape[1] for b in self.bases)
        self.Z = torch.zeros(len(self.bases), n, r, dtype=dtype, device=device)
        self.mask = torch.zeros(len(self.bases), n, dtype=dtype, device=device)
        self.labels = torch.zeros(len(self.bases), n, dtype=torch.long, device=device)
        for p, (basis, y) in enumerate(zip(self.bases, ys)):
            rows, cols = basis.Z.shape
            self.Z[p, :rows, :cols] = basis.Z
            self.mask[p, :rows] = 1
            self.labels[p, :rows] = torch.as_tensor(np.array(y, dtype=np.int64), device=device)
        self.ZT = self.Z.transpose(1, 2).contiguous()  # the gradient's product reads it row-wise
        self.counts = self.mask.sum(1)
        self._targets: dict[str, torch.Tensor] = {}

    def outputs(self, loss: str) -> int:
        return 1 if (loss == "squared_hinge" and self.n_classes == 2) else self.n_classes

    def targets(self, loss: str) -> torch.Tensor:
        if loss not in self._targets:
            if loss == "multinomial":
                self._targets[loss] = self.labels
            else:
                k = self.outputs(loss)
                onehot = F.one_hot(self.labels, self.n_classes) if k > 1 else (self.labels == 1)[..., None]
                self._targets[loss] = 2 * onehot.to(self.Z.dtype) - 1
        return self._targets[loss]

    def value_and_grad(
        self, W: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, loss: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objective summed over problems and its gradients, in closed form (no autograd graph; these products are
        memory-bound, so the transposed one reads the contiguous copy ``ZT``)."""
        targets = self.targets(loss)
        scores = torch.baddbmm(b[:, None, :], self.Z, W)
        if loss == "multinomial":
            logp = torch.log_softmax(scores, dim=2)
            per_row = -logp.gather(2, targets[..., None])[..., 0]
            dscores = logp.exp()
            dscores.scatter_add_(2, targets[..., None], -torch.ones_like(per_row)[..., None])
        else:
            margin = torch.relu(1.0 - targets * scores)
            per_row = margin.pow(2).sum(2)
            dscores = -2.0 * targets * margin
        value = ((per_row * self.mask).sum(1) / self.counts + 0.5 * lam * (W * W).sum((1, 2))).sum()
        dscores = dscores * (self.mask / self.counts[:, None])[..., None]
        grad_W = torch.baddbmm(lam[:, None, None] * W, self.ZT, dscores)
        return value, grad_W, dscores.sum(1)


def fit_paths(
    problems: Sequence[np.ndarray | torch.Tensor | FeatureBasis] | ProblemStack,
    ys: Sequence[np.ndarray] | None,
    n_classes: int,
    Cs: list[float],
    loss: str = "multinomial",
    *,
    inits: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    max_iter: int = 300,
    tol: float = 1e-5,
    device: str | torch.device = "cpu",
    coefs: bool = True,
) -> list[LinearPath]:
    """Solve several independent problems (e.g. the CV folds) jointly, one C at a time, warm-starting along ``Cs``.

    Folds share the same C and so a similar curvature; one batched L-BFGS over all of them costs little more than
    one fold, because the matrix products are batched and the optimizer's bookkeeping is paid once.

    Parameters
    ----------
    problems : sequence of ndarray (n_samples, n_features) or FeatureBasis, or a ProblemStack
        Already normalized features of each problem (a ProblemStack already holds the labels: pass ``ys=None``).
    ys : sequence of ndarray of shape (n_samples,)
        Integer labels in ``[0, n_classes)``.
    n_classes : int
    Cs : list of float
        Inverse regularization strengths, solved in this order (ascending is best for warm starts).
    loss : {"multinomial", "squared_hinge"}
    inits : sequence of ``LinearPath.states`` entries, optional
        Warm starts for the first C, one per problem (from paths on the same bases).
    max_iter, tol : L-BFGS limits per C (``tol`` on the gradient of the mean loss).
    device : torch device.
    coefs : bool, default=True
        Map every solution back to feature space (``False`` keeps only ``states``, for speed).

    Returns
    -------
    list of LinearPath, one per problem
    """
    if loss not in _LOSSES:
        raise ParameterError(f"loss={loss!r}; use one of {_LOSSES}.")
    stack = problems if isinstance(problems, ProblemStack) else ProblemStack(problems, ys, n_classes, device)
    bases = stack.bases
    P, _, r = stack.Z.shape
    k = stack.outputs(loss)
    W = torch.zeros(P, r, k, dtype=stack.Z.dtype, device=stack.Z.device)
    b = torch.zeros(P, k, dtype=stack.Z.dtype, device=stack.Z.device)
    for p, init in enumerate(inits or []):
        if init is not None:
            W[p, : init[0].shape[0]] = init[0]
            b[p] = init[1]
    paths = [LinearPath([], [], [], [], []) for _ in bases]
    for C in Cs:
        W = W.detach().clone()
        b = b.detach().clone()
        lam = 1.0 / (float(C) * stack.counts)
        opt = torch.optim.LBFGS(
            [W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12, history_size=20,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure() -> torch.Tensor:  # called by this iteration's optimizer.step only
            value, W.grad, b.grad = stack.value_and_grad(W, b, lam, loss)  # noqa: B023
            return value

        with torch.no_grad():
            opt.step(closure)
        n_iter = int(opt.state[W].get("n_iter", 0))
        for p, (basis, path) in enumerate(zip(bases, paths)):
            A = W[p, : basis.Z.shape[1]].clone()
            path.Cs.append(float(C))
            if coefs:
                path.coefs.append(basis.to_features(A).float().cpu().numpy())
                path.intercepts.append(b[p].float().cpu().numpy())
            path.n_iter.append(n_iter)
            path.states.append((A, b[p].clone()))
    return paths


def fit_path(
    X: np.ndarray | torch.Tensor | FeatureBasis,
    y: np.ndarray,
    n_classes: int,
    Cs: list[float],
    loss: str = "multinomial",
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 300,
    tol: float = 1e-5,
    device: str | torch.device = "cpu",
) -> LinearPath:
    """Fit one linear model per C on one problem; see :func:`fit_paths`."""
    return fit_paths([X], [y], n_classes, Cs, loss, inits=[init], max_iter=max_iter, tol=tol, device=device)[0]


class _TorchLinear(ClassifierMixin, BaseEstimator):
    _loss = "multinomial"

    def __init__(
        self, C: float = 1.0, max_iter: int = 300, tol: float = 1e-4, device: str = "cpu", warm_start: bool = False
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.warm_start = warm_start

    def fit(self, X: np.ndarray, y: np.ndarray) -> _TorchLinear:
        """Fit on features X (n_samples, n_features) and labels y (n_samples,)."""
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], reset=True)
        check_classification_targets(y)
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ParameterError(f"C must be a positive number, got {self.C!r}.")
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ParameterError(f"need at least 2 classes to fit; got 1 class ({self.classes_!r}).")
        basis = FeatureBasis(X, self.device)
        init = None
        k = len(self.classes_)
        if (
            self.warm_start
            and getattr(self, "coef_", None) is not None
            and self.coef_.shape == (k, X.shape[1])
            and k > 2
        ):
            W0 = torch.as_tensor(self.coef_.T, dtype=basis.Z.dtype, device=basis.Z.device)
            init = (
                basis.from_features(W0),
                torch.as_tensor(self.intercept_, dtype=basis.Z.dtype, device=basis.Z.device),
            )
        path = fit_path(basis, encoded, k, [float(self.C)], self._loss, init=init, max_iter=self.max_iter, tol=self.tol)
        coef, intercept = path.coefs[0].T, path.intercepts[0]
        if len(self.classes_) == 2 and coef.shape[0] == 2:  # binary: one row, as scikit-learn reports it
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept.astype(np.float32)
        self.n_iter_ = np.array(path.n_iter)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores: (n_samples, n_classes), or (n_samples,) for two classes."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        index = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
        return self.classes_[index]


class TorchLogisticRegression(_TorchLinear):
    """Multinomial logistic regression, L-BFGS in torch; scikit-learn's objective and API.

    Parameters
    ----------
    C : float, default=1.0
        Inverse regularization strength, as in :class:`sklearn.linear_model.LogisticRegression`.
    max_iter : int, default=300
    tol : float, default=1e-4
        Gradient tolerance of L-BFGS (on the mean loss).
    device : str, default="cpu"
        ``"cuda"`` solves on the GPU.
    warm_start : bool, default=False
        Start from the current ``coef_``/``intercept_`` (multiclass), as scikit-learn's ``warm_start``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (n_classes, n_features), or (1, n_features) for two classes
    intercept_ : ndarray of shape (n_classes,) or (1,)
    n_iter_ : ndarray of shape (1,)

    See Also
    --------
    sklearn.linear_model.LogisticRegression : the reference this matches.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> TorchLogisticRegression(C=10).fit(X, y).score(X, y) > 0.95
    True
    """

    _loss = "multinomial"

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n_samples, n_classes)."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        scores = scores - scores.max(1, keepdims=True)
        e = np.exp(scores)
        return e / e.sum(1, keepdims=True)

    def predict_log_proba(self, X: np.ndarray) -> np.ndarray:
        return np.log(self.predict_proba(X))


class TorchLinearSVC(_TorchLinear):
    """One-vs-rest linear SVM with squared hinge loss, L-BFGS in torch; scikit-learn's objective and API.

    Parameters
    ----------
    C : float, default=1.0
        As in :class:`sklearn.svm.LinearSVC` (whose intercept is penalized; here it is not).
    max_iter : int, default=300
    tol : float, default=1e-4
    device : str, default="cpu"
    warm_start : bool, default=False

    Attributes
    ----------
    classes_, coef_, intercept_, n_iter_ : as :class:`TorchLogisticRegression`.

    See Also
    --------
    sklearn.svm.LinearSVC : the reference this matches.
    """

    _loss = "squared_hinge"
