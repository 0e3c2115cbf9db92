"""The torch L-BFGS probes against scikit-learn's references, and the sklearn estimator contract."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnncodes.probing._linear import FeatureBasis, TorchLinearSVC, TorchLogisticRegression, fit_path


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X[:600]).astype(np.float32)
    return X, y[:600]


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_logreg_matches_sklearn(digits, C):
    X, y = digits
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(X, y)
    ours = TorchLogisticRegression(C=C, tol=1e-7, max_iter=1000).fit(X, y)
    assert ours.score(X, y) == pytest.approx(ref.score(X, y), abs=0.005)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=0.02 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=0.02)


def test_linsvc_agrees_with_sklearn_predictions(digits):
    X, y = digits
    ref = LinearSVC(C=0.1, max_iter=20000).fit(X, y)
    ours = TorchLinearSVC(C=0.1).fit(X, y)
    assert (ours.predict(X) == ref.predict(X)).mean() > 0.97
    assert ours.score(X, y) == pytest.approx(ref.score(X, y), abs=0.02)


def test_span_basis_is_exact_when_features_outnumber_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 200)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    basis = FeatureBasis(X)
    assert basis.reduced and basis.Z.shape == (40, 40)
    reduced = fit_path(basis, y, 3, [0.1, 1.0], tol=1e-7, max_iter=1000)
    # the same problem solved on the raw features
    direct = fit_path(FeatureBasis(X, span=False), y, 3, [0.1, 1.0], tol=1e-7, max_iter=1000)
    np.testing.assert_allclose(reduced.coefs[0], direct.coefs[0], atol=1e-3)
    np.testing.assert_allclose(reduced.coefs[1], direct.coefs[1], atol=1e-3)
    # a narrower array stays on its raw features unless told otherwise, with the same solution
    narrow = X[:, :100]
    assert not FeatureBasis(narrow).reduced and FeatureBasis(narrow, span=True).reduced
    np.testing.assert_allclose(fit_path(FeatureBasis(narrow, span=True), y, 3, [1.0], tol=1e-7, max_iter=1000).coefs[0],
                               fit_path(narrow, y, 3, [1.0], tol=1e-7, max_iter=1000).coefs[0], atol=1e-3)  # fmt: skip
    # optimality in feature space: the penalized gradient of the data term lies in the span of the rows
    coef = reduced.coefs[1]
    assert np.linalg.matrix_rank(np.vstack([X, coef.T]), tol=1e-3) == 40


def test_warm_started_path_matches_cold_fits(digits):
    X, y = digits
    path = fit_path(X, y, 10, [0.01, 0.1, 1.0], tol=1e-7, max_iter=1000)
    cold = fit_path(X, y, 10, [1.0], tol=1e-7, max_iter=1000)
    np.testing.assert_allclose(path.coefs[-1], cold.coefs[0], atol=2e-2)


@parametrize_with_checks([TorchLogisticRegression(), TorchLinearSVC()])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def test_repeated_rows_leave_the_span_solve_exact():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 300)).astype(np.float32)
    X = np.vstack([X, X[:15]])  # a singular Gram matrix: the span basis factorizes it with a tiny jitter
    y = np.arange(len(X)) % 3
    assert FeatureBasis(X).reduced
    ours = TorchLogisticRegression(C=0.1, tol=1e-7, max_iter=1000).fit(X, y)
    ref = LogisticRegression(C=0.1, max_iter=5000, tol=1e-8).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=0.02 * np.abs(ref.coef_).max())
    scale = np.abs(ref.decision_function(X)).max()
    np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(X), atol=0.01 * scale)


@pytest.mark.parametrize("loss", ["multinomial", "squared_hinge"])
@pytest.mark.slow
def test_preconditioned_solves_reach_the_unpreconditioned_optimum(monkeypatch, loss):
    """Wide correlated codes are solved with a preconditioner along their leading directions; it changes the path to
    the optimum, never the optimum (checked against the plain solver and scikit-learn; liblinear penalizes the
    intercept unless it is scaled up, the torch solver never does)."""
    from cnncodes.probing import _linear

    rng = np.random.default_rng(2)
    X = rng.normal(size=(240, 6)) @ rng.normal(size=(6, 160)) + 0.3 * rng.normal(size=(240, 160))
    X = StandardScaler().fit_transform(X).astype(np.float32)
    y = (X[:, :3] @ rng.normal(size=(3, 3))).argmax(1)
    assert not FeatureBasis(X).reduced
    Cs = [0.01, 1.0]
    conditioned = fit_path(X, y, 3, Cs, loss, tol=1e-7, max_iter=3000)
    monkeypatch.setattr(_linear, "_PRECONDITION_RANK", 0)
    plain = fit_path(X, y, 3, Cs, loss, tol=1e-7, max_iter=3000)
    for i, C in enumerate(Cs):
        top = np.abs(plain.coefs[i]).max()
        np.testing.assert_allclose(conditioned.coefs[i], plain.coefs[i], atol=5e-3 * top)  # float32 precision
        ref = (LogisticRegression(C=C, tol=1e-10, max_iter=20000) if loss == "multinomial"
               else LinearSVC(C=C, tol=1e-10, max_iter=200000, intercept_scaling=100)).fit(X, y)  # fmt: skip
        np.testing.assert_allclose(conditioned.coefs[i], ref.coef_.T, atol=0.02 * np.abs(ref.coef_).max())


@pytest.mark.parametrize("loss", ["multinomial", "squared_hinge"])
def test_preconditioner_copes_with_codes_of_lower_rank_than_its_directions(monkeypatch, loss):
    """Rank-10 codes in 256 dims (dead channels, few positions): the 32 directions' smallest variances are ~0, which
    must not stall the solver short of the optimum (it used to, by scaling the signal directions down a millionfold)."""
    import torch

    from cnncodes.probing import _linear

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 10)) @ rng.normal(size=(10, 256))).astype(np.float32)
    y = (X[:, :4] @ rng.normal(size=(4, 3))).argmax(1)

    def objective(path):
        stack = _linear.ProblemStack([X], [y], 3)
        value, _, _ = stack.value_and_grad(torch.as_tensor(path.coefs[0].T)[None],
                                           torch.as_tensor(path.intercepts[0])[None], 1.0 / (100 * stack.counts), loss)  # fmt: skip
        return float(value[0])

    # a tight tolerance: nearly separable at C = 100, a gradient of 1e-4 still leaves the objective 2 % above its
    # optimum, at a point that depends on the path taken
    conditioned = fit_path(X, y, 3, [100.0], loss, tol=1e-6, max_iter=300)
    monkeypatch.setattr(_linear, "_PRECONDITION_RANK", 0)
    plain = fit_path(X, y, 3, [100.0], loss, tol=1e-6, max_iter=300)
    assert objective(conditioned) <= objective(plain) * (1 + 1e-4)
    assert conditioned.n_iter[0] < 300, "the preconditioned solve did not converge"


@pytest.mark.parametrize("rank", [0, 32])  # with and without the directions
@pytest.mark.parametrize("d", [20, 200])
def test_a_strongly_regularized_solve_does_not_crawl_along_the_unpenalized_intercept(monkeypatch, d, rank):
    """At C = 1e-4 the weights' curvature is the penalty's, a hundred times the intercept's (unpenalized): scaled to
    the weights alone, L-BFGS took 18 to 21 iterations here, crawling along the intercept. It takes 7, to
    scikit-learn's optimum (whose multinomial intercepts are defined up to a common shift)."""
    from cnncodes.probing import _linear

    monkeypatch.setattr(_linear, "_PRECONDITION_RANK", rank)
    rng = np.random.default_rng(1)
    y = rng.choice(3, size=400, p=[0.6, 0.3, 0.1])  # unbalanced: the intercepts carry the class priors
    X = StandardScaler().fit_transform(rng.normal(size=(400, d)) + 0.5 * np.eye(3, d)[y]).astype(np.float32)
    path = fit_path(X, y, 3, [1e-4], tol=1e-6, max_iter=1000)
    ref = LogisticRegression(C=1e-4, tol=1e-12, max_iter=10000).fit(X, y)
    assert path.n_iter[0] <= 10
    b = path.intercepts[0]
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-4)
    np.testing.assert_allclose(path.coefs[0].T, ref.coef_, atol=1e-3 * np.abs(ref.coef_).max())


@pytest.mark.parametrize("loss", ["multinomial", "squared_hinge"])
@pytest.mark.parametrize("scale", [0.0, 1e-5])
def test_features_of_no_or_tiny_scale_still_get_the_class_priors(loss, scale):
    """All-zero or 1e-5-scale features at C = 1e6: the weights' curvature is ~0, so the intercept's preconditioning
    factor is ~1e-8. Its first steps used to round away in float32 and the solve stopped at zero intercepts (uniform
    probabilities); the initial inverse Hessian is now scaled so the intercept's steps are Newton's."""
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=200, p=[0.1, 0.3, 0.6])
    X = (scale * rng.normal(size=(200, 5))).astype(np.float32)
    path = fit_path(X, y, 3, [1e6], loss, tol=1e-6, max_iter=1000)
    b = path.intercepts[0]
    if loss == "multinomial":  # log class priors, up to a common shift
        prior = np.log(np.bincount(y) / len(y))
        np.testing.assert_allclose(b - b.mean(), prior - prior.mean(), atol=1e-3)
    else:  # one-vs-rest squared hinge on a constant: 2 p - 1
        np.testing.assert_allclose(b, 2 * np.bincount(y) / len(y) - 1, atol=1e-3)
    empty = fit_path(np.zeros((30, 0), np.float32), np.arange(30) % 3, 3, [1.0], loss)  # no features at all
    assert empty.coefs[0].shape == (0, 3)


@pytest.mark.parametrize("data", ["breast_cancer", "wine"])
@pytest.mark.parametrize("C", [0.05, 1.0])
def test_a_c_copied_from_scikit_learn_means_the_same_objective(data, C):
    """Binary and multiclass, logistic and squared hinge: the same C gives scikit-learn's optimum (a binary softmax
    once matched sklearn at 2 C: its two logits halved the penalty). liblinear penalizes the intercept unless it is
    scaled up; the torch solver never does."""
    from sklearn import datasets

    X, y = getattr(datasets, f"load_{data}")(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    ours = TorchLogisticRegression(C=C, tol=1e-9, max_iter=5000).fit(X.astype(np.float32), y)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(X, y)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-3 * scale)
    np.testing.assert_allclose(ours.intercept_ - ours.intercept_.mean() * (ours.coef_.shape[0] > 1),
                               ref.intercept_ - ref.intercept_.mean() * (ref.coef_.shape[0] > 1), atol=2e-3 * scale)  # fmt: skip
    svc = TorchLinearSVC(C=C, tol=1e-9, max_iter=5000).fit(X.astype(np.float32), y)
    ref = LinearSVC(C=C, tol=1e-12, max_iter=1000000, intercept_scaling=1000).fit(X, y)
    np.testing.assert_allclose(svc.coef_, ref.coef_, atol=5e-3 * np.abs(ref.coef_).max())
