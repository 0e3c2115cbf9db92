"""Probing: linear probes on codes (compute only). scikit-learn pipelines and torch path solvers, C chosen by
cross-validation, out of core when codes exceed memory, and the in-memory sweep over many arrays of codes."""

from ._concat import CONCAT_SEP, ConcatenatedCodes, concat_name
from ._fewshot import draw_shots
from ._knn import KNN_KS
from ._linear import ProblemStack, TorchLinearSVC, TorchLogisticRegression, fit_paths
from ._probes import (
    CLASSIFIERS,
    LINEAR,
    NORMALIZERS,
    PATH_LOSS,
    make_classifier,
    make_normalizer,
    make_probe,
    signed_sqrt,
)
from ._results import PROTOCOLS, Split, SweepConfig, SweepResult, SweepRow, best_of
from ._scoring import c_grid, check_finite, metrics_from_scores
from ._search import evaluate_codes, joblib_backend, split_images, sweep_codes
from ._transfer import SCORE_BUDGET

__all__ = [
    "CONCAT_SEP",
    "ConcatenatedCodes",
    "CLASSIFIERS",
    "KNN_KS",
    "LINEAR",
    "NORMALIZERS",
    "PATH_LOSS",
    "PROTOCOLS",
    "SCORE_BUDGET",
    "ProblemStack",
    "Split",
    "SweepConfig",
    "SweepResult",
    "SweepRow",
    "TorchLinearSVC",
    "TorchLogisticRegression",
    "best_of",
    "c_grid",
    "concat_name",
    "check_finite",
    "draw_shots",
    "evaluate_codes",
    "fit_paths",
    "joblib_backend",
    "make_classifier",
    "make_normalizer",
    "make_probe",
    "metrics_from_scores",
    "signed_sqrt",
    "split_images",
    "sweep_codes",
]
