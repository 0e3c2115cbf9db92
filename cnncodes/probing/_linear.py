"""Linear classifiers solved with L-BFGS in torch: fast C paths on CPU, and the same code on CUDA.

Two losses, each with scikit-learn's objective ``0.5 * ||W||^2 + C * sum(loss)`` (the intercept is not penalized):

* ``multinomial`` -- multinomial logistic regression, as :class:`sklearn.linear_model.LogisticRegression` (a binary
  problem as a two-class softmax with the penalty doubled: exactly scikit-learn's single-logit objective at the same C);
* ``squared_hinge`` -- one-vs-rest L2-SVM, as :class:`sklearn.svm.LinearSVC`'s default loss.

When there are several times more features than samples, the problem is solved exactly in the n-dimensional span of
the training rows (the "dual" trick: the optimum of an L2-penalized linear model lies in that span) using the Gram
matrix, and the weights are mapped back. That is what makes a sweep over 10k-dimensional codes cheap: one Cholesky
factorization of the Gram matrix per fold serves every C. L-BFGS is preconditioned along each problem's leading
principal directions, where correlated codes put most of their curvature, and on the unpenalized intercept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
#: L-BFGS is preconditioned along each problem's leading principal directions: this many (0: none)
_PRECONDITION_RANK = 32
#: a loss's typical curvature per unit of feature variance, for K outputs (softmax near uniform: 1/K; squared hinge:
#: 2 on the rows inside the margin, about half of them)
_CURVATURE = {"multinomial": lambda k: 1.0 / k, "squared_hinge": lambda k: 1.0}


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


#: solve in the span of the rows once the codes have this many times more dimensions than rows. Below it, the float64
#: Gram matrix and its factor cost more than the narrower products save: on 1,078 rows of 1,280 to 10,240 dims (10
#: classes, 5 folds, one CPU thread) the raw features were 1.5x faster at 1,280 dims and even at 5,120.
_SPAN_FACTOR = 4


def _jittered_cholesky(gram: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of a Gram matrix, or None. A relative jitter of 1e-10 on the diagonal keeps a
    rank-deficient one (repeated rows) factorizable; directions that small carry no signal at any C a sweep allows."""
    gram.diagonal().add_(1e-10 * float(gram.diagonal().max().clamp_min(1e-30)))
    chol, info = torch.linalg.cholesky_ex(gram)
    return None if int(info) else chol


class FeatureBasis:
    """Coordinates in which to solve: the raw features, or the span of the training rows when d > 4 n.

    Build it once per training set and pass it to :func:`fit_path` for every C path on those rows. ``span`` forces
    the choice (default: the span once ``d > 4 n``); both give the same solutions.

    In the span, the coordinates are those of a Cholesky factor of the Gram matrix, ``X X^T = Z Z^T``: ``Z`` (n, n)
    reproduces every inner product of the rows, so scores and the penalty are the same as on the raw features
    (``W = X^T Z^{-T} A`` has ``||W|| = ||A||`` and ``X W = Z A``). Any such factor gives the same L-BFGS iterates up
    to a rotation; the Cholesky one costs a tenth of an eigendecomposition.
    """

    def __init__(
        self, X: np.ndarray | torch.Tensor, device: str | torch.device = "cpu", *, span: bool | None = None
    ) -> None:
        X = torch.as_tensor(
            np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X, device=device
        ).float()
        n, d = X.shape
        self.X = X
        self.reduced = d > _SPAN_FACTOR * n if span is None else span
        if self.reduced:
            # float64 products: codes are often rank-deficient (dead channels, few pooled positions), and float32
            # rounding would leave such a Gram matrix indefinite
            Xd = X.double()
            self.chol = _jittered_cholesky(Xd @ Xd.T)
            if self.chol is None:
                raise ParameterError("the Gram matrix of these codes cannot be factorized; check them for NaN or inf.")
            self.Z = self.chol.float()  # float64 factor kept, lower triangular
        else:
            self.Z = X

    def _solve(self, B: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``Z^{-1} B`` (or ``Z^{-T} B``) in float64."""
        L = self.chol.T if transpose else self.chol
        return torch.linalg.solve_triangular(L, B.double(), upper=transpose)

    def project(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        """New rows (m, d) in solve coordinates (m, r): their scores are ``project(X) @ A + b``."""
        X = torch.as_tensor(
            np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X, device=self.Z.device
        ).float()
        if not self.reduced:
            return X
        return self._solve((X @ self.X.T).T, transpose=False).T.float()  # X X_fit^T Z^{-T}

    def from_features(self, W: torch.Tensor) -> torch.Tensor:
        """Weights on the original features (d, K) -> solve coordinates (their projection onto the span)."""
        if not self.reduced:
            return W
        return self._solve(self.X @ W.to(self.X.dtype), transpose=False).to(W.dtype)

    def to_features(self, A: torch.Tensor) -> torch.Tensor:
        """Weights in solve coordinates -> weights on the original features (d, K)."""
        if not self.reduced:
            return A
        return (self.X.T @ self._solve(A, transpose=True).float()).to(A.dtype)


class ProblemStack:
    """Several independent problems padded into one batch: (P, n, r) features, row weights and labels.

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
        self.ZT = self.Z.transpose(1, 2).contiguous()
        self.counts = self.mask.sum(1)
        self.weights = (self.mask / self.counts[:, None])[:, None, :]  # (P, 1, n): each problem's mean over its rows
        self._targets: dict[str, torch.Tensor] = {}
        self._directions: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (k asked, directions, variances)
        self._mean_variance: torch.Tensor | None = None

    def top_directions(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each problem's ``k`` leading principal directions (P, r, k) and the mean square of its rows along them
        (P, k), from a randomized SVD of its rows (computed once per stack; fewer than ``k`` with fewer rows)."""
        if self._directions is None or self._directions[0] != k:
            # randomized subspace iteration (Halko, Martinsson and Tropp 2011) from a seeded generator of its own:
            # torch.svd_lowrank draws from the global RNG, so a sweep's iterates would depend on thread timing
            generator = torch.Generator(device=self.Z.device).manual_seed(0)
            Q = torch.randn(*self.ZT.shape[:2], k, generator=generator, dtype=self.Z.dtype, device=self.Z.device)
            for _ in range(2):
                Q = torch.linalg.qr(self.ZT @ torch.linalg.qr(self.Z @ Q).Q).Q  # (P, r, k), orthonormal
            _, S, Vh = torch.linalg.svd(self.Z @ Q, full_matrices=False)  # Z ~ (Z Q) Q^T = U S (Q Vh^T)^T
            self._directions = (k, Q @ Vh.transpose(1, 2), S.square() / self.counts[:, None])
        return self._directions[1:]

    def mean_variance(self) -> torch.Tensor:
        """Each problem's mean square of its features (P,), over its own rows and columns (computed once)."""
        if self._mean_variance is None:
            dims = torch.tensor([b.Z.shape[1] for b in self.bases], dtype=self.Z.dtype, device=self.Z.device)
            self._mean_variance = self.Z.square().sum((1, 2)) / (self.counts * dims).clamp_min(1)
        return self._mean_variance

    def outputs(self, loss: str) -> int:
        return 1 if (loss == "squared_hinge" and self.n_classes == 2) else self.n_classes

    def targets(self, loss: str) -> torch.Tensor:
        """Class-major targets: labels (P, 1, n) for ``multinomial``, +-1 (P, K, n) for ``squared_hinge``."""
        if loss not in self._targets:
            if loss == "multinomial":
                self._targets[loss] = self.labels[:, None, :]
            else:
                k = self.outputs(loss)
                onehot = F.one_hot(self.labels, self.n_classes) if k > 1 else (self.labels == 1)[..., None]
                self._targets[loss] = (2 * onehot.to(self.Z.dtype) - 1).transpose(1, 2).contiguous()
        return self._targets[loss]

    def value_and_grad(
        self, W: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, loss: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each problem's objective (P,) and the gradients, in closed form (no autograd graph).

        Class-major: ``W`` is (P, K, r), ``b`` (P, K) and the scores (P, K, n). These products have only K columns and
        are memory-bound; in this layout both read a contiguous matrix (``ZT`` forward, ``Z`` backward) with the long
        dimension innermost, three to four times faster on CPU than the row-major (n, K) layout.
        """
        targets = self.targets(loss)
        scores = torch.baddbmm(b[..., None], W, self.ZT)
        if loss == "multinomial":
            logp = torch.log_softmax(scores, dim=1)
            per_row = -logp.gather(1, targets)
            dscores = logp.exp_()
            dscores.scatter_add_(1, targets, -torch.ones_like(per_row))
        else:
            margin = torch.relu(1.0 - targets * scores)
            per_row = margin.square().sum(1, keepdim=True)
            dscores = -2.0 * targets * margin
        value = (per_row * self.weights).sum((1, 2)) + 0.5 * lam * (W * W).sum((1, 2))
        dscores = dscores * self.weights
        grad_W = torch.baddbmm(lam[:, None, None] * W, dscores, self.Z)
        return value, grad_W, dscores.sum(2)


def _lbfgs(
    objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    history: int = 10,
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    scale: torch.Tensor | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Minimize P independent smooth convex problems at once with L-BFGS: ``x`` (P, m) is the start.

    ``objective(x)`` returns every problem's value (P,) and gradient (P, m); one call evaluates all of them (batched
    products). Each problem keeps its own curvature pairs, step length and stopping test (largest gradient entry
    ``<= tol``), so a fold that converges early stops moving while the others go on. The step is backtracked until
    it decreases the objective enough (Armijo): these objectives are strongly convex, so every step's curvature pair
    is usable and no Wolfe search is needed. ``pairs`` and ``scale`` start it with curvature from before.
    ``precondition`` (an SPD map of (P, m)) shapes the initial inverse Hessian, which is then ``scale`` times it.

    Returns the solutions, each problem's number of iterations, and the curvature pairs and scale it ended with.
    """
    P = x.shape[0]
    value, grad = objective(x)
    active = grad.abs().amax(1) > tol
    n_iter = torch.zeros(P, dtype=torch.long, device=x.device)
    flat = torch.zeros_like(n_iter)  # iterations in a row without a decrease
    steps = list(pairs or [])  # (s, y, 1 / s.y); 0 where a pair is unusable
    unscaled = scale is None and not steps  # no idea of the curvature yet: the first step is kept short, see below
    if scale is None:  # initial inverse Hessian s.y / y.y of the latest pair
        scale = torch.ones(P, dtype=x.dtype, device=x.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = grad.clone()
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * (s * q).sum(1)
            q -= alpha[:, None] * y
            alphas.append(alpha)
        q = (q if precondition is None else precondition(q)) * scale[:, None]
        for (s, y, rho), alpha in zip(steps, reversed(alphas)):
            q += (alpha - rho * (y * q).sum(1))[:, None] * s
        direction = torch.where(active[:, None], -q, 0)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0  # rounding can spoil the two-loop product: fall back to steepest descent there
        if bool((uphill & active).any()):
            direction = torch.where((uphill & active)[:, None], -grad, direction)
            slope = (grad * direction).sum(1)
        # the first step without any curvature: as scipy and torch, keep its length near 1
        t = torch.ones(P, dtype=x.dtype, device=x.device)
        if unscaled and not steps:
            t = torch.clamp(1.0 / grad.abs().sum(1).clamp_min(1e-30), max=1.0)
        for _ in range(30):
            x_new = x + t[:, None] * direction
            value_new, grad_new = objective(x_new)
            ok = (value_new <= value + 1e-4 * t * slope) | ~active
            if bool(ok.all()):
                break
            # quadratic interpolation of the step, kept within [0.1, 0.5] of the last one
            curve = value_new - value - t * slope
            shrink = torch.nan_to_num(-slope * t / (2 * curve.clamp_min(1e-30)), nan=0.1).clamp(0.1, 0.5)
            t = torch.where(ok, t, t * shrink)
        stalled = ~ok  # no decrease within float precision: as good as it gets
        x_new = torch.where(stalled[:, None], x, x_new)
        value_new = torch.where(stalled, value, value_new)
        grad_new = torch.where(stalled[:, None], grad, grad_new)
        n_iter += active.long()
        s, y = x_new - x, grad_new - grad
        sy, yy = (s * y).sum(1), (y * (y if precondition is None else precondition(y))).sum(1)
        usable = active & ~stalled & (sy > 1e-10 * yy)
        steps.append((s, y, torch.where(usable, 1.0 / sy.clamp_min(1e-30), 0)))
        steps = steps[-history:]
        scale = torch.where(usable, sy / yy.clamp_min(1e-30), scale)
        # no decrease at all, three times running: the objective has reached float precision (what tolerance_change
        # does in torch's L-BFGS). Once can be a short step whose decrease rounds away while the gradient is large.
        flat = torch.where(value_new >= value, flat + 1, 0)
        x, value, grad = x_new, value_new, grad_new
        active &= ~stalled & (flat < 3) & (grad.abs().amax(1) > tol)
    return x, n_iter, steps, scale


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
    memory: dict | None = None,
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
    memory : dict, optional
        Where the solver keeps its curvature pairs between calls on the same stack: pass an empty dict, then the same
        dict to the next call (a path solved one C at a time) to start it with the last C's curvature, its penalty
        part corrected for the new C, as every C of ``Cs`` after the first is started.

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
    x = torch.zeros(P, k * r + k, dtype=stack.Z.dtype, device=stack.Z.device)  # per problem: W (K, r) then b (K,)
    for p, init in enumerate(inits or []):
        if init is not None:
            x[p, : k * r].view(k, r)[:, : init[0].shape[0]] = init[0].T
            x[p, k * r :] = init[1]
    paths = [LinearPath([], [], [], [], []) for _ in bases]
    penalized = torch.zeros(1, k * r + k, dtype=x.dtype, device=x.device)
    penalized[:, : k * r] = 1
    memory = {} if memory is None else memory  # along Cs, each C starts with the curvature of the one before
    c = _CURVATURE[loss](k)
    directional = _PRECONDITION_RANK > 0 and r > 0
    if directional:
        directions, variances = stack.top_directions(min(_PRECONDITION_RANK, r))
        # a floor of 1e-3 of the largest: codes of lower rank than the directions (dead channels, few positions) would
        # otherwise have ~0 curvature "elsewhere", and the signal directions would be scaled down a millionfold
        variances = variances.clamp_min(1e-3 * variances[:, :1])
        curvature = c * variances  # (P, k): the data term's curvature along each direction
    # scikit-learn solves a binary problem with one logit w; the softmax here has two, w0 = -w1 at the optimum (the loss
    # reads w1 - w0 only), whose penalty |w0|^2 + |w1|^2 is half of |w1 - w0|^2: doubling lam gives sklearn's C exactly
    binary_softmax = 2.0 if loss == "multinomial" and k == 2 else 1.0
    for C in Cs:
        lam = binary_softmax / (float(C) * stack.counts)
        # the weights' curvature "elsewhere" (beyond the leading directions, or on average), which the initial inverse
        # Hessian is scaled to, and the intercept's: c, unpenalized. Strongly regularized, the weights' is lam and
        # the intercept's a hundred times less: unscaled, L-BFGS would crawl along the intercept.
        reference = (curvature[:, -1] if directional else c * stack.mean_variance()) + lam
        intercept = (reference / c)[:, None]
        if directional:
            # the inverse Hessian's shape, ``(c v + lam)^-1`` along each leading direction and that of the smallest
            # one elsewhere: correlated codes put most of their curvature in a few directions, which L-BFGS's ten
            # pairs learn only slowly. Halves the iterations on 448- to 1,280-dim codes; on narrower ones (16 to
            # 320 dims of the digits store) it halved the refits' iterations and brought the CV fits, stopped at
            # their tolerance, closer to their optima.
            shrink = ((curvature[:, -1:] + lam[:, None]) / (curvature + lam[:, None]) - 1)[:, None, :]  # (P, 1, k)

        def precondition(q: torch.Tensor) -> torch.Tensor:
            W = q[:, : k * r]
            if directional:
                W = W.view(P, k, r)
                W = torch.baddbmm(W, (W @ directions) * shrink, directions.transpose(1, 2)).reshape(P, -1)  # noqa: B023
            return torch.cat([W, q[:, k * r :] * intercept], 1)  # noqa: B023

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            W = x[:, : k * r].view(P, k, r)  # class-major, see value_and_grad
            value, grad_W, grad_b = stack.value_and_grad(W, x[:, k * r :], lam, loss)  # noqa: B023
            return value, torch.cat([grad_W.reshape(P, -1), grad_b], 1)

        # no curvature pairs yet: the initial inverse Hessian is the preconditioner over the reference curvature, a
        # Newton step on the model above (the intercept's steps 1 / c, however small the features' scale)
        pairs, scale = [], 1.0 / reference
        if memory:  # the last C's curvature: its data part still holds, its penalty part moves with lambda
            shift = (lam - memory["lam"])[:, None] * penalized
            scale = memory["scale"] * memory["reference"] / reference  # the preconditioner moved with lambda too
            for s_, y_, rho_ in memory["pairs"]:
                y_ = y_ + shift * s_
                sy = (s_ * y_).sum(1)
                pairs.append((s_, y_, torch.where((rho_ != 0) & (sy > 0), 1.0 / sy.clamp_min(1e-30), 0)))
        x, n_iter, pairs, scale = _lbfgs(objective, x, tol=tol, max_iter=max_iter, pairs=pairs, scale=scale,
                                         precondition=precondition)  # fmt: skip
        memory.update(pairs=pairs, scale=scale, lam=lam, reference=reference)
        for p, (basis, path) in enumerate(zip(bases, paths)):
            A = x[p, : k * r].view(k, r)[:, : basis.Z.shape[1]].T.contiguous()
            b = x[p, k * r :].clone()
            path.Cs.append(float(C))
            if coefs:
                path.coefs.append(basis.to_features(A).float().cpu().numpy())
                path.intercepts.append(b.float().cpu().numpy())
            path.n_iter.append(int(n_iter[p]))
            path.states.append((A, b))
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
