"""Transferability scores: cheap rankings of arrays of codes before their probes are searched, and how far each can be
trusted, measured against the sweep's own cross-validated accuracies.

Scores (each on the plain views of the training images only; the test images are never read)
--------------------------------------------------------------------------------------------------
* ``knn``: cosine k-nearest-neighbour accuracy on the sweep's CV folds (majority vote of the fold's fit images, k over
  :data:`~cnncodes.probing.KNN_KS`, the best pooled accuracy). A plain kNN accuracy beat 23 transferability metrics
  over 42,000 runs (Sorkhei et al. 2025, arXiv 2503.18528).
* ``logme``: the log maximum evidence, per image, of a Bayesian linear regression of each one-hot class target on the
  codes, averaged over classes (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", Algorithm 1: the fixed point gamma = sum beta s_i / (alpha + beta s_i), alpha = gamma / m'm,
  beta = (n - gamma) / ||Fm - y||^2, iterated here to a relative change of 1e-10).
* ``hscore``: the shrinkage H-score tr(cov_a(f)^-1 (1 - a) cov(E[f | y])) (Bao et al. 2019, "An information-theoretic
  approach to transferability in task transfer learning"; regularized by Ibrahim, Ponomareva and Mazumder 2022,
  "Newer is not always better: rethinking transferability metrics"), cov_a = (1 - a) cov(f) + a tr(cov(f))/d I with a
  the Ledoit-Wolf shrinkage, both covariances with 1/n. Chosen as the third score because it is closed form (no
  iteration, no parameter to tune: TransRate needs a quantization eps, NCTI a PCA dimension, SFDA a regularized
  projection and a self-challenging step), it comes from the same Gram matrix as LogME (and one Cholesky
  factorization, a twentieth of an eigendecomposition's time at 1,347 images), its shrinkage keeps
  it defined when codes are wider than there are images (the plain H-score inverts a singular covariance there), and
  its authors report it correlates with transfer accuracy far better than the plain H-score.
* ``ridge``: the CV accuracy, on the sweep's folds, of a least-squares (ridge) one-vs-rest linear classifier with an
  intercept on the codes standardized over the training images (labels unused; the sweep's ``standard``
  normalizer fits its statistics per fold), each fold fit on its fit images, at the best of :data:`RIDGE_GRID`
  penalties (times the mean of the min(n, d) eigenvalues of the codes' scatter that can be nonzero). It is a linear
  probe like those the sweep searches, fit in closed form from one eigendecomposition (the block leave-fold-out
  identity of the hat matrix gives every fold and every penalty exactly), and it is read in accuracy points, the
  unit ``triage="auto"`` bounds. (Rifkin and Klautau 2004 found one-vs-rest least squares as accurate as SVMs.)

Cost: one Gram matrix per array, the d x d matrix X'X when codes are narrower than the images and the n x n matrix
XX' when they are wider, so O(n d min(n, d)), one eigendecomposition of size min(n, d) (raw codes, for LogME) and one
Cholesky factorization (centered codes, for the H-score); ridge takes the Gram matrix and eigendecomposition of the standardized codes, then
O(n n_val min(n, d)) per penalty, or, for codes much narrower than there are images, one eigendecomposition of size
d per fold. The kNN score compares at most ``max_queries`` validation images with their fold's fit
images: O(q n d). Everything runs in torch on the sweep's device, in float64 but for the Gram products of a store's
float16 or float32 codes, which run in float32 (no coarser than the codes themselves).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ParameterError

__all__ = [
    "SCORES",
    "SCORE_BUDGET",
    "images_within",
    "logme",
    "hscore",
    "knn_accuracy",
    "ridge_accuracy",
    "array_scores",
    "agreement",
    "probe_subset",
    "calibrate",
    "Calibration",
    "log_error",
]

#: The transferability scores a sweep measures, in the order they are reported.
SCORES = ("knn", "logme", "hscore", "ridge")

#: Penalties of the ``ridge`` score, in units of the mean of the min(n, d) eigenvalues of the standardized codes'
#: scatter that can be nonzero (decades; half decades cost twice as much and moved no array's score on the digits
#: store by more than 3 of its 1,347 images).
RIDGE_GRID = tuple(10.0**k for k in range(-5, 2))

#: Scores that are accuracies on the folds (fractions of images right): ``triage="auto"`` reads them on the same
#: log-error scale as the measured CV accuracy.
ACCURACY_SCORES = frozenset({"knn", "ridge"})

#: What each score is, for results.json.
SCORE_TEXT = {
    "knn": "cosine kNN accuracy on the sweep's CV folds (plain views of the training images; k over 10, 20, 50, 100, "
           "the best pooled accuracy; at most max_queries validation images, spread over the folds)",
    "logme": "LogME (You et al. 2021): log maximum evidence per image of a Bayesian linear regression of each one-hot "
             "class on the raw codes, averaged over classes",
    "hscore": "shrinkage H-score (Bao et al. 2019; Ibrahim et al. 2022): tr(cov_a(f)^-1 (1 - a) cov(E[f|y])), a the "
              "Ledoit-Wolf shrinkage of the centered codes",
    "ridge": "CV accuracy on the sweep's folds of a one-vs-rest least-squares (ridge) classifier with an intercept on "
             "the codes standardized over the training images, the best of 7 penalties from 1e-5 to 10 times the mean "
             "of the min(n, d) eigenvalues of their scatter",
}  # fmt: skip

_KS = (10, 20, 50, 100)


def _tensor(X: Any, device: Any):
    import torch

    return torch.as_tensor(np.asarray(X), dtype=torch.float64, device=device)


def _single(X: Any) -> bool:
    """Whether codes ``X`` carry single precision or less (a store's float16 or float32 codes): their Gram products
    then run in float32 (half the time of float64, and no coarser than the codes: float32 sums of d products err
    by about 1e-7 sqrt(d) relative, float16 codes by 5e-4 each), and everything after them in float64."""
    dtype = np.asarray(X).dtype
    return dtype.kind == "f" and dtype.itemsize < 8


def _eig(X, gram=None):
    """Eigenvalues (clamped at 0) and eigenvectors of X'X (codes no wider than the rows) or of XX' (wider); ``gram``
    is that matrix when it is already computed."""
    import torch

    wide = X.shape[1] > X.shape[0]
    lam, Q = torch.linalg.eigh(gram if gram is not None else _gram(X))
    return lam.clamp_min(0), Q, wide


def _gram(X, single: bool = False):
    """X'X (codes no wider than the rows) or XX' (wider): the one O(n d min(n, d)) product every score shares;
    in IEEE float32 for ``single`` codes (see :func:`_single`; never TF32 on CUDA), returned in float64."""
    if not single:
        return X @ X.T if X.shape[1] > X.shape[0] else X.T @ X
    A = X.float()
    with _ieee_float32(A.device):
        return (A @ A.T if X.shape[1] > X.shape[0] else A.T @ A).to(X.dtype)


_IEEE_LOCK = threading.Lock()
_ieee_users: list = [0, None]  # blocks inside _ieee_float32 (score tasks may run in threads), the setting they found


@contextmanager
def _ieee_float32(device) -> Iterator[None]:
    """float32 matmuls in IEEE precision for a block: on CUDA they may otherwise run in TF32 (a 10-bit mantissa),
    as ``torch.set_float32_matmul_precision("high")`` allows (``network.precision`` does the same for extraction).
    The setting is the process's: counted across threads, set by the first block in and restored by the last out."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    with _IEEE_LOCK:
        if _ieee_users[0] == 0:
            _ieee_users[1], matmul.fp32_precision = matmul.fp32_precision, "ieee"
        _ieee_users[0] += 1
    try:
        yield
    finally:
        with _IEEE_LOCK:
            _ieee_users[0] -= 1
            if _ieee_users[0] == 0:
                matmul.fp32_precision = _ieee_users[1]


def _uncentered_gram(X, Gc, Xc=None):
    """The Gram matrix of X from ``Gc``, that of the centered codes X - 1m', in float64: X'X = Gc + n m m',
    XX' = Gc + a1' + 1a' + |m|^2 11' with a = (X - 1m') m (``Xc`` when given). Exact algebra, so a float32 ``Gc`` is as good as float32
    products of codes centred in float64 (a float32 X'X of codes whose mean is large against their spread buries
    the spread's small eigenvalues under the rounding of the mean's one large one)."""
    n = X.shape[0]
    m = X.mean(0)
    if X.shape[1] > n:
        a = (Xc if Xc is not None else X - m) @ m
        return Gc + a[:, None] + a[None, :] + (m @ m)
    return Gc + n * (m[:, None] * m[None, :])


def _targets(y: np.ndarray, device: Any):
    """One 0/1 column per class: one-hot of integer labels, or a multi-label matrix as given."""
    import torch

    y = np.asarray(y)
    Y = y if y.ndim == 2 else (y[:, None] == np.arange(int(y.max()) + 1)[None]).astype(np.float64)
    return torch.as_tensor(Y, dtype=torch.float64, device=device)


def _projected(X, Y, lam, Q, wide):
    """Per eigen-direction i and target c, h_ic = ((F V)_i' y_c)^2, the squared projection of the target on the i-th
    principal direction scaled by its singular value, whichever side the eigendecomposition was taken on."""
    if wide:  # Q = U, the left singular vectors: (U'y)^2 s^2
        return lam[:, None] * (Q.T @ Y) ** 2
    return (Q.T @ (X.T @ Y)) ** 2  # Q = V: (V'F'y)^2


def logme(X: Any, y: Any, *, device: Any = "cpu", tol: float = 1e-10, max_iter: int = 1000) -> float:
    """LogME of codes ``X`` (n, d) for labels ``y`` (n,) of int, or a (n, classes) 0/1 matrix (multi-label).

    The evidence of y = F w + e, w ~ N(0, I / alpha), e ~ N(0, I / beta), at the alpha and beta that maximize it,
    divided by n and averaged over the one-hot class targets. Raw codes, as published (no centering, no intercept).
    """
    single = _single(X)
    X = _tensor(X, device)
    Xc = X - X.mean(0)
    return _logme_of(X, _targets(y, device), _uncentered_gram(X, _gram(Xc, single), Xc), tol, max_iter)


def _logme_of(X, Y, gram, tol: float = 1e-10, max_iter: int = 1000) -> float:
    Y = Y[:, Y.sum(0) > 0]  # a class with no image here has no target to explain (an all-zero column is degenerate)
    lam, Q, wide = _eig(X, gram)
    return float(_logme(lam, _projected(X, Y, lam, Q, wide), (Y**2).sum(0), *X.shape, tol, max_iter).mean())


def _logme(lam, h, yy, n: int, d: int, tol: float, max_iter: int):
    """The evidence per image of every target column (see :func:`logme`), from the spectrum ``lam`` of F'F (or FF')
    and the projections ``h``; the eigenvalues not in ``lam`` (d - len(lam) of them) are zero."""
    import torch

    alpha = torch.ones(h.shape[1], dtype=lam.dtype, device=lam.device)
    beta = torch.ones_like(alpha)
    L = lam[:, None]

    def terms(alpha, beta):
        t = alpha + beta * L
        gamma = (beta * L / t).sum(0)
        mm = (beta**2 * h / t**2).sum(0)  # m'm
        res = (yy - (h * beta * (2 * alpha + beta * L) / t**2).sum(0)).clamp_min(1e-300)  # ||Fm - y||^2
        return t, gamma, mm, res

    for _ in range(max_iter):
        _, gamma, mm, res = terms(alpha, beta)
        new_alpha = (gamma / mm.clamp_min(1e-300)).clamp(1e-12, 1e12)
        new_beta = ((n - gamma) / res).clamp(1e-12, 1e12)
        change = torch.maximum((new_alpha / alpha - 1).abs().max(), (new_beta / beta - 1).abs().max())
        alpha, beta = new_alpha, new_beta
        if change < tol:
            break
    t, _, mm, res = terms(alpha, beta)
    log_det = torch.log(t).sum(0) + (d - len(lam)) * torch.log(alpha)
    evidence = (n * torch.log(beta) + d * torch.log(alpha) - n * math.log(2 * math.pi) - beta * res - alpha * mm
                - log_det) / 2  # fmt: skip
    return evidence / n


def ledoit_wolf_shrinkage(sq_norms, scatter_sq: float, n: int, d: int) -> float:
    """The Ledoit-Wolf shrinkage of centered codes from their rows' squared norms and ``scatter_sq``, the squared
    Frobenius norm of X'X (equally of XX', the sum of their squared eigenvalues): the formula of scikit-learn's
    ``ledoit_wolf_shrinkage``, whose sums are both available from either Gram matrix."""
    mu = float(sq_norms.sum()) / (n * d)
    delta_ = float(scatter_sq) / n**2  # ||X'X||_F^2 / n^2
    beta = (float((sq_norms**2).sum()) / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * float(sq_norms.sum()) / n + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else beta / delta


def hscore(X: Any, y: Any, *, device: Any = "cpu", route: str | None = None) -> float:
    """The shrinkage H-score of codes ``X`` (n, d) for integer labels ``y`` (n,); see the module docstring.
    ``route`` ("solve" or "eig") forces one of the two exact computations of :func:`_hscore`."""
    single = _single(X)
    X = _tensor(X, device)
    Xc = X - X.mean(0)
    return _hscore(Xc, np.asarray(y), device, _gram(Xc, single), route=route, single=single)


def _hscore(Xc, y: np.ndarray, device: Any, gram=None, route: str | None = None, single: bool = False) -> float:
    """The shrinkage H-score of the centered codes ``Xc``, whose Gram matrix (:func:`_gram`) is ``gram`` when it is
    already known.

    With C = Xc'Xc, t = (1 - a) / n and s = a tr(C) / (n d), cov_a = t C + s I and the score is
    (1 - a) tr(M' cov_a^-1 M) / n with M = Xc' E D^-1/2 (E the one-hot classes, D their counts), so
    X'PX = M M' for P the class-mean projection. ``solve``: one Cholesky factorization of t C + s I (d x d), or,
    for codes wider than the images, of t XcXc' + s I (n x n), since M' cov_a^-1 M = B' K (t K + s I)^-1 B with
    K = XcXc' and M = Xc'B: O(min(n, d)^3 / 3). ``eig``: an eigendecomposition, whose directions of zero variance
    a pseudo-inverse drops; taken where s is too small for a well-conditioned factorization (the shrinkage is 0
    or nearly: cov_a is then singular or nearly) or the factorization fails. A ``single`` (float32) ``gram`` is
    trusted to 1e-6 of its scale, not 1e-10: both cuts widen to match."""
    import torch

    n, d = Xc.shape
    G = gram if gram is not None else _gram(Xc)
    E = _targets(y, device)
    counts = E.sum(0)
    E = E[:, counts > 0] / counts[counts > 0].sqrt()  # E D^-1/2
    sq_norms = (Xc**2).sum(1)
    shrink = ledoit_wolf_shrinkage(sq_norms, float((G**2).sum()), n, d)
    mu = float(sq_norms.sum()) / (n * d)
    t, s = (1 - shrink) / n, shrink * mu
    wide = d > n
    # M = Xc'B = Xc'(B - 1 b') for any b: with B centred, the constant direction, which K annihilates exactly but a
    # rounded K only nearly, adds nothing to either route (uncentred, it adds |B'1|^2 e / (t e + s))
    B = E - E.mean(0) if wide else E
    floor = 1e-6 if single else 1e-10  # the relative error of the Gram matrix's entries, with a margin
    if route is None:
        route = "solve" if s > floor * (t * n * d * mu + s) else "eig"  # cond(t C + s I) <= (t tr C + s) / s
    if route == "solve":
        A = t * G + s * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            rhs = G @ B if wide else Xc.T @ B  # K B, or M = Xc'B
            value = (torch.cholesky_solve(rhs, L) * (B if wide else rhs)).sum()
            return float((1 - shrink) * value / n) if torch.isfinite(value) else float("nan")
    lam, Q, _ = _eig(Xc, G)
    W2 = (lam[:, None] * (Q.T @ B) ** 2) if wide else (Q.T @ (Xc.T @ B)) ** 2
    denom = (1 - shrink) * lam / n + shrink * mu  # eigenvalues of cov_a along the directions the class means span
    keep = denom > floor * 1e-2 * float(denom.max().clamp_min(1e-300))  # pseudo-inverse of a singular covariance
    value = (W2.sum(1)[keep] / (n * denom[keep])).sum()
    return float((1 - shrink) * value) if torch.isfinite(value) else float("nan")


def knn_accuracy(X: Any, y: Any, folds: Sequence[tuple[np.ndarray, np.ndarray]], *, ks: Sequence[int] = _KS,
                 max_queries: int = 4096, seed: int = 0, device: Any = "cpu") -> float:  # fmt: skip
    """Cosine kNN accuracy of codes ``X`` (n, d) on ``folds`` (fit and validation positions into X): every validation
    image is classified by the majority of its k most similar fit images of its fold (ties: the smaller class, as
    scikit-learn's ``KNeighborsClassifier``), pooled over the folds, the best of ``ks`` (those the smallest fold can
    hold). At most ``max_queries`` validation images, drawn evenly from the folds with ``seed``."""

    single = _single(X)
    X = _tensor(X, device)
    return _knn_of(X, np.asarray(y), folds, None, ks, max_queries, seed, device, single)


def _knn_of(X, y: np.ndarray, folds, gram, ks: Sequence[int] = _KS, max_queries: int = 4096, seed: int = 0,
            device: Any = "cpu", single: bool = False) -> float:  # fmt: skip
    """:func:`knn_accuracy` of the tensor ``X``; ``gram`` (XX', when known) gives the similarities without another
    product: cos(i, j) = G_ij / (|x_i| |x_j|); otherwise they are products in float32 for ``single`` codes."""
    import torch

    norms = X.norm(dim=1).clamp_min(1e-300)
    X = X / norms[:, None]
    X = X.float() if single else X
    cosine = None if gram is None else gram / (norms[:, None] * norms[None, :])
    labels = torch.as_tensor(y, device=device)
    n_classes = int(y.max()) + 1
    total = sum(len(v) for _, v in folds)
    rng = np.random.default_rng(seed)
    smallest = min(len(f) for f, _ in folds)
    usable = [k for k in ks if k <= smallest] or [max(1, smallest)]
    hits = torch.zeros(len(usable), dtype=torch.float64, device=device)
    asked = 0
    for fit, val in folds:
        take = len(val) if total <= max_queries else max(1, round(max_queries * len(val) / total))
        val = np.sort(rng.choice(val, size=min(take, len(val)), replace=False)) if take < len(val) else val
        fit_t = torch.as_tensor(np.asarray(fit), device=device)
        for start in range(0, len(val), 1024):
            q = torch.as_tensor(np.asarray(val[start : start + 1024]), device=device)
            if cosine is not None:
                sims = cosine[q][:, fit_t]
            else:
                with _ieee_float32(X.device):  # for single codes: never TF32 on CUDA
                    sims = (X[q] @ X[fit_t].T).double()
            near = sims.topk(max(usable), dim=1).indices
            votes = labels[fit_t][near]  # (queries, k_max), nearest first
            for j, k in enumerate(usable):
                counts = torch.nn.functional.one_hot(votes[:, :k], n_classes).sum(1)
                hits[j] += (counts.argmax(1) == labels[q]).sum()
        asked += len(val)
    return float((hits / asked).max())


def ridge_accuracy(X: Any, y: Any, folds: Sequence[tuple[np.ndarray, np.ndarray]], *,
                   grid: Sequence[float] = RIDGE_GRID, device: Any = "cpu", route: str | None = None) -> float:  # fmt: skip
    """The ``ridge`` score of codes ``X`` (n, d), integer labels ``y`` (n,), on ``folds`` (fit and validation
    positions into X): pooled over the folds, the accuracy of the class whose least-squares one-vs-rest output is
    highest, on the codes standardized over all of X (labels unused; the sweep's ``standard`` normalizer takes its
    statistics per fold instead), each fold fit on its fit images with an unpenalized intercept
    (scikit-learn's ``RidgeClassifier``, up to its -1/1 targets, which pick the same class), at the best penalty of
    ``grid`` times the mean of the min(n, d) eigenvalues of their scatter that can be nonzero. ``route`` ("hat" or
    "folds") forces one of the two exact computations (see :func:`_ridge_of`); by default the cheaper."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ParameterError(f"ridge_accuracy takes one integer label per row, got labels of shape {y.shape}; a "
                             "multi-label store has LogME only.")  # fmt: skip
    single = _single(X)
    Z = _standardized(_tensor(X, device))
    return _ridge_of(Z, y, folds, _eig(Z, _gram(Z, single)), grid, route)


def _standardized(X):
    """X scaled to zero mean and unit variance per feature over its rows (1/n, as scikit-learn's
    ``StandardScaler``, the sweep's default normalizer; a feature that does not vary is only centred)."""
    sd = X.std(0, correction=0)
    return (X - X.mean(0)) / sd.masked_fill(sd <= 1e-12 * float(sd.max().clamp_min(1e-300)), 1.0)


def _ridge_of(Xc, y: np.ndarray, folds, eig, grid: Sequence[float] = RIDGE_GRID, route: str | None = None) -> float:
    """:func:`ridge_accuracy` of the centred (standardized) codes ``Xc`` whose :func:`_eig` is ``eig``.

    Two exact routes to the same numbers. ``hat``: with Xc'Xc = V diag(e) V' (or Xc Xc' = U diag(e) U'), the ridge
    fit with an intercept on every training image has the hat matrix H = 11'/n + P diag(w) P' (P = Xc V and
    w = 1 / (e + p), or P = U and w = e / (e + p), p the penalty), and deleting a fold's rows leaves its residuals
    (I - H_vv)^-1 r_v (the block form of the leave-one-out identity, exact for any quadratic penalty): O(n n_v r)
    per penalty, no further decomposition. ``folds`` (codes narrower than the images, where that is dearer):
    each fold's own scatter, the full one less the validation rows' and the shift of the mean, decomposed once for
    every penalty: O(k d^3 + n d^2)."""
    import torch

    n, d = Xc.shape
    lam, Q, wide = eig
    Y = _targets(y, Xc.device)
    labels = torch.as_tensor(y, device=Xc.device)
    units = float(lam.sum()) / min(n, d)  # the mean of the min(n, d) eigenvalues that can be nonzero
    if not units > 0:  # constant codes: no direction to fit, every fold predicts its fit images' commonest class
        return sum(int((labels[torch.as_tensor(np.asarray(v))] == int(np.bincount(y[f]).argmax())).sum())
                   for f, v in folds) / sum(len(v) for _, v in folds)  # fmt: skip
    penalties = [t * units for t in grid]
    n_val = max(len(v) for _, v in folds)
    r = n if wide else d
    hat_cost = len(grid) * (n * n_val * r + len(folds) * n_val**3)
    folds_cost = len(folds) * (10 * d**3 + n_val * d * d)
    if route is None:
        route = "hat" if wide or hat_cost <= folds_cost else "folds"
    hits = torch.zeros(len(grid), dtype=torch.float64, device=Xc.device)
    if route == "hat":
        P = Q if wide else Xc @ Q
        Yc = Y - Y.mean(0)
        PY = P.T @ Yc
        blocks = [(v, P[v]) for v in (torch.as_tensor(np.asarray(val), device=Xc.device) for _, val in folds)]
        for j, pen in enumerate(penalties):
            w = lam / (lam + pen) if wide else 1 / (lam + pen)
            R = Yc - P @ (w[:, None] * PY)  # residuals of the fit on every training image
            for v, Pv in blocks:
                H = (Pv * w) @ Pv.T + 1.0 / n  # I - H_vv is positive definite for a positive penalty
                out = Y[v] - torch.linalg.solve(torch.eye(len(v), dtype=H.dtype, device=H.device) - H, R[v])
                if bool(torch.isfinite(out).all()):  # an ill-conditioned fold scores nothing at this penalty
                    hits[j] += (out.argmax(1) == labels[v]).sum()
    else:
        S = Xc.T @ Xc
        for fit, val in folds:
            f = torch.as_tensor(np.asarray(fit), device=Xc.device)
            v = torch.as_tensor(np.asarray(val), device=Xc.device)
            m = Xc[f].mean(0)
            e, V = torch.linalg.eigh(S - Xc[v].T @ Xc[v] - len(fit) * (m[:, None] * m[None, :]))
            ybar = Y[f].mean(0)
            B = V.T @ (Xc[f].T @ (Y[f] - ybar))  # the fit side's centred Xc'Y: Y - ybar sums to zero over it
            Pv = (Xc[v] - m) @ V
            for j, pen in enumerate(penalties):
                out = (Pv / (e.clamp_min(0) + pen)) @ B + ybar
                hits[j] += (out.argmax(1) == labels[v]).sum()
    return float((hits / sum(len(v) for _, v in folds)).max())


#: ``score_images="auto"``: an array's scores read the most training images m whose cost m d min(m, d) stays within
#: this many times r d, r the training rows its probes fit on (views included), whose search passes over them some
#: hundreds of times (5 folds x about 10 C values x 2 probes x tens of iterations). Measured on the digits benchmark
#: (docs/benchmarks.md): every image there is within it, and the scores take about 5 % of the full sweep.
SCORE_BUDGET = 400


def images_within(n: int, d: int, rows: int) -> int:
    """The most of ``n`` training images of width ``d`` the scores read under ``score_images="auto"``: the largest m
    <= n with m min(m, d) <= :data:`SCORE_BUDGET` ``rows`` (all ``n`` when the array is that narrow)."""
    budget = int(SCORE_BUDGET * max(1, rows))
    if n * min(n, d) <= budget:
        return n
    return max(1, min(n, budget // d if budget // d >= d else math.isqrt(budget)))


def rows_within(n: int, d: int, max_memory: int | None, queries: int = 1024) -> int:
    """How many of ``n`` training images of width ``d`` the scores can hold within ``max_memory`` bytes: the rows
    read (float32) and their float64 copies (the codes, their centered and normalized copies, a fit side, and
    ridge's projections P and their fold blocks), a float32 copy of the codes for the Gram products and its float32
    result, the Gram matrix with its centered copy, the cosines, ridge's Gram matrix and the two eigenvector matrices
    with their fold blocks and temporaries (seven min(m, d)^2 matrices in all), and a block of ``queries`` kNN
    similarities. All ``n`` without a bound."""
    if max_memory is None:
        return n

    def need(m: int) -> int:
        return 4 * (2 * m * d + min(m, d) ** 2) + 8 * (7 * m * d + 7 * min(m, d) ** 2 + queries * m)

    lo, hi = 0, n  # the largest m in [0, n] with need(m) <= max_memory (need grows with m)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= max_memory else (lo, mid - 1)
    return lo


def subsample(y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], size: int,
              seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:  # fmt: skip
    """At most ``size`` of the positions of ``y`` drawn with ``seed``, each class in proportion (every class kept at
    least once), and ``folds`` restricted to them, as positions into the sample: ``(positions, folds)``."""
    rng = np.random.default_rng(seed)
    key = y if y.ndim == 1 else np.zeros(len(y), dtype=np.int64)  # multi-label: drawn evenly
    classes, counts = np.unique(key, return_counts=True)
    share = np.floor(counts * max(0, size - len(classes)) / len(key)).astype(np.int64) + 1  # at most size in all
    picked = [rng.choice(np.flatnonzero(key == c), size=min(int(k), int(m)), replace=False)
              for c, k, m in zip(classes, share, counts)]  # fmt: skip
    keep = np.sort(np.concatenate(picked))
    inside = np.zeros(len(key), dtype=bool)
    inside[keep] = True
    return keep, [(np.searchsorted(keep, f[inside[f]]), np.searchsorted(keep, v[inside[v]])) for f, v in folds]


def array_scores(X: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                 names: Sequence[str] = SCORES, *, device: Any = "cpu", max_queries: int = 4096,
                 seed: int = 0) -> dict[str, tuple[float | None, float]]:  # fmt: skip
    """Every score of ``names`` of one array (plain training images ``X``, labels ``y``, fold positions ``folds``):
    ``{name: (value, seconds)}``. A multi-label ``y`` gets LogME only (the others are single-label): ``None``."""
    out: dict[str, tuple[float | None, float]] = {}
    y = np.asarray(y)
    multilabel = y.ndim == 2
    unknown = [name for name in names if name not in SCORES]
    if unknown:
        raise ParameterError(f"unknown score {unknown[0]!r}; use any of {list(SCORES)}.")
    start = time.perf_counter()
    single = _single(X)
    T = _tensor(X, device)
    Tc = T - T.mean(0)  # centred in float64, before any float32 product
    Gc = _gram(Tc, single) if {"logme", "hscore"} & set(names) else None  # one product: the H-score's, LogME's, kNN's
    G = _uncentered_gram(T, Gc, Tc) if Gc is not None and {"logme", "knn"} & set(names) else None
    wide = T.shape[1] > T.shape[0]
    gram_users = [n for n in names if n in ("logme", "hscore") or (n == "knn" and G is not None and wide)]
    shared = dict.fromkeys(names, 0.0)  # the shared work's time, split over the scores that use it
    for name in gram_users:
        shared[name] += (time.perf_counter() - start) / len(gram_users)
    for name in names:
        start = time.perf_counter()
        if multilabel and name != "logme":
            out[name] = (None, 0.0)
            continue
        if name == "knn":  # XX' (the wide arrays' Gram) holds every similarity the folds need
            value = _knn_of(T, y, folds, G if wide else None, max_queries=max_queries, seed=seed, device=device,
                            single=single)  # fmt: skip
        elif name == "logme":
            value = _logme_of(T, _targets(y, device), G)
        elif name == "ridge":  # standardized as the sweep's default normalizer does (here over every training image)
            Z = _standardized(T)
            value = _ridge_of(Z, y, folds, _eig(Z, _gram(Z, single)))
        else:
            value = _hscore(Tc, y, device, Gc, single=single)
        spent = time.perf_counter() - start + shared[name]
        out[name] = (value if math.isfinite(value) else None, spent)
    return out


def agreement(scores: Mapping[Hashable, float | None], measured: Mapping[Hashable, float],
              best: Hashable) -> dict[str, Any]:  # fmt: skip
    """How well one score ranked the arrays: Kendall's tau-b and the weighted tau (hyperbolic weights, which count
    swaps near the top most; scipy.stats.weightedtau) of the score against the measured CV accuracy, over the arrays
    both have, and the score's rank of the best array (1 = its top; ties counted against it)."""
    from scipy.stats import kendalltau, weightedtau

    keys = [k for k in measured if scores.get(k) is not None and math.isfinite(measured[k])]
    out: dict[str, Any] = {"arrays": len(keys)}
    if len(keys) >= 2:
        s, m = np.array([scores[k] for k in keys]), np.array([measured[k] for k in keys])
        if np.ptp(s) > 0 and np.ptp(m) > 0:
            tau = kendalltau(s, m)
            out.update(kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue),
                       weighted_tau=float(weightedtau(s, m).statistic))  # fmt: skip
    if best in keys:
        rank = 1 + sum(1 for k in keys if k != best and scores[k] >= scores[best])
        out["best_rank"] = rank
        out["best_in_top"] = {str(t): rank <= t for t in (1, 3, 5)}
    return out


def consensus_order(scores: Mapping[str, Mapping[Hashable, float | None]], keys: Sequence[Hashable]) -> list[Hashable]:
    """``keys`` from the best to the worst by their mean rank over the scores (a missing score ranks last)."""
    ranks = np.zeros(len(keys))
    for values in scores.values():
        v = np.array([values.get(k) if values.get(k) is not None else -np.inf for k in keys], dtype=float)
        ranks += np.argsort(np.argsort(-v, kind="stable"), kind="stable")
    return [keys[i] for i in np.argsort(ranks, kind="stable")]


def probe_subset(order: Sequence[Hashable], size: int, cost: Mapping[Hashable, float] | None = None) -> list[Hashable]:
    """``size`` keys spread over ``order`` (a ranking, best first): one from each of ``size`` equal strata of the
    ranking, so the score's trust is measured over its whole range, the top included; the cheapest of its stratum by
    ``cost`` (default: the stratum's first)."""
    size = max(1, min(size, len(order)))
    edges = np.round(np.linspace(0, len(order), size + 1)).astype(int)
    strata = [list(order[a:b]) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return [min(s, key=lambda k: cost[k]) if cost is not None else s[0] for s in strata]


def log_error(accuracy: Any, images: int) -> np.ndarray:
    """-log(1 - accuracy + 1 / (2 images)): accuracy on the scale where a score's errors are about equal at every
    level (halving the error rate adds log 2, at 60 % as at 99 %), floored at half an image of ``images`` so a
    perfect accuracy stays finite."""
    return -np.log(np.maximum(1.0 - np.asarray(accuracy, dtype=float), 0.0) + 0.5 / images)


@dataclass(frozen=True)
class Calibration:
    """What one score says of the measured CV accuracy, fitted on the arrays searched so far: the least-squares line
    log_error(accuracy) = intercept + slope x, with x the score (its :func:`log_error` when the score is itself an
    accuracy), the residual standard deviation ``sd`` on ``dof`` degrees of freedom (floored at the binomial
    standard error of the best accuracy measured, which no score can beat), the mean and spread of x it was fitted
    on, ``images`` (the log-error floor's), and the leave-one-out prediction error by which scores are compared."""

    score: str
    intercept: float
    slope: float
    sd: float
    dof: int
    mean_x: float
    sxx: float
    arrays: int
    images: int
    loo_rmse: float  # the root mean squared leave-one-out prediction error of the line (how the score is trusted)

    def x(self, value: float) -> float:
        return float(log_error(value, self.images)) if self.score in ACCURACY_SCORES else float(value)

    def predict(self, value: float) -> float:
        return self.intercept + self.slope * self.x(value)

    def scale(self, value: float) -> float:
        """The standard error of predicting an unsearched array's log-error accuracy from its score: the residual
        sd, widened by the array's distance from the scores fitted on (an array scored beyond them is known less
        well)."""
        spread = (self.x(value) - self.mean_x) ** 2 / self.sxx if self.sxx > 0 and self.slope > 0 else 0.0  # flat: none
        return self.sd * math.sqrt(1 + 1 / self.arrays + spread)

    def upper(self, value: float, level: float) -> float:
        """The one-sided ``level`` prediction bound of an unsearched array's log-error accuracy (Student's t on
        ``dof``, :meth:`scale`)."""
        from scipy.stats import t

        return self.predict(value) + float(t.ppf(level, self.dof)) * self.scale(value)

    def chance(self, value: float, bound: float) -> float:
        """The predictive probability (Student's t on ``dof``, :meth:`scale`) that an array of score ``value``
        reaches the log-error accuracy ``bound``."""
        from scipy.stats import t

        return float(t.sf((bound - self.predict(value)) / self.scale(value), self.dof))


def calibrate(name: str, values: Mapping[Hashable, float | None], measured: Mapping[Hashable, float],
              images: int) -> Calibration | None:  # fmt: skip
    """The :class:`Calibration` of score ``name`` (``values`` per array) against the ``measured`` CV accuracies, or
    None with fewer than three arrays that have both. A score that ranks backwards (a negative slope) predicts
    nothing: its line is flat, the measured mean, on one more degree of freedom."""
    keys = [
        k for k in measured if values.get(k) is not None and math.isfinite(values[k]) and math.isfinite(measured[k])
    ]
    if len(keys) < 3:
        return None
    raw = np.array([values[k] for k in keys], dtype=float)
    x = log_error(raw, images) if name in ACCURACY_SCORES else raw
    u = log_error([measured[k] for k in keys], images)
    sxx = float(((x - x.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (u - u.mean())).sum() / sxx) if sxx > 0 else 0.0
    dof = len(keys) - 2
    if slope <= 0:
        slope, dof = 0.0, len(keys) - 1
    intercept = float(u.mean() - slope * x.mean())
    residuals = u - intercept - slope * x
    sd = math.sqrt(float((residuals**2).sum()) / dof)
    leverage = 1 / len(keys) + ((x - x.mean()) ** 2 / sxx if sxx > 0 and slope > 0 else 0.0)
    loo_rmse = math.sqrt(float(np.mean((residuals / np.maximum(1 - leverage, 1e-12)) ** 2)))
    top = max(measured[k] for k in keys)
    noise = math.sqrt(max(top * (1 - top), 0.25 / images) / images) / (1 - top + 0.5 / images)
    return Calibration(name, intercept, slope, max(sd, noise), dof, float(x.mean()), sxx, len(keys), images, loo_rmse)
