"""The typed objects a sweep passes around: its configuration, the split, one result row, and the whole result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from ..errors import ParameterError
from ._probes import CLASSIFIERS, NORMALIZERS

__all__ = ["SweepConfig", "SweepRow", "SweepResult", "Split", "PROTOCOLS", "best_of"]


@dataclass(frozen=True)
class SweepConfig:
    """How every candidate of a sweep is fitted and scored (the same for all of them).

    Parameters
    ----------
    probes : tuple of str, default=("logreg", "linsvc")
        Any of ``logreg``, ``linsvc``, ``sgd``, ``sgd-log``, and ``knn`` for the kNN baseline row.
    normalizers : tuple of str, default=("standard",)
        Any of ``standard``, ``l2``, ``power``, ``none``.
    folds : int, default=5
        Stratified k-fold over training images.
    val_size : float, optional
        One stratified validation split of this fraction instead of k-fold.
    test_size : float, default=0.25
        Held-out fraction of the images when no separate test set is given.
    seed : int, default=0
    c_min, c_max : float, default=1e-4, 1e4
        Bounds of the C grid.
    c_steps_per_decade : int, default=2
        Resolution of the C search: one coarse value per decade, then a binary search around the best down to this
        many steps per decade (2: half-decade; 8 over 1e-6 to 1e6: CLIP's 97-point grid).
    max_memory : int, optional
        Bytes per task; a candidate whose in-memory fit needs more is fitted out of core by streaming (the kNN and
        multi-label rows, which hold every training row, are refused instead).
    device : str, default="cpu"
        Torch device of the path solver.
    shots : tuple of int, default=()
        Few-shot rows: training images per class (see ``PROTOCOLS["few-shot"]``).
    draws : int, default=5
        Subsets drawn per shot count.
    cv_tol, cv_max_iter
        Tolerance and iterations of the selection fits (the final refit is tight).
    threads : int, default=0
        Torch threads per task (0: leave torch's default).
    """

    probes: tuple[str, ...] = ("logreg", "linsvc")
    normalizers: tuple[str, ...] = ("standard",)
    folds: int = 5
    val_size: float | None = None
    test_size: float = 0.25
    seed: int = 0
    c_min: float = 1e-4
    c_max: float = 1e4
    c_steps_per_decade: int = 2
    max_memory: int | None = None
    device: str = "cpu"
    cv_tol: float = 2e-3  # selection needs accuracies, not exact optima (warm-started, early-stopped)
    cv_max_iter: int = 30
    threads: int = 0
    shots: tuple[int, ...] = ()
    draws: int = 5

    def __post_init__(self) -> None:
        for name, allowed in (("probes", CLASSIFIERS), ("normalizers", NORMALIZERS)):
            given = getattr(self, name)
            given = (given,) if isinstance(given, str) else tuple(given)
            object.__setattr__(self, name, given)
            bad = [g for g in given if g not in allowed]
            if bad or not given:
                raise ParameterError(f"unknown {name[:-1]} {bad or list(given)!r}; use any of {list(allowed)}.")
        c_min, c_max = _number("c_min", self.c_min), _number("c_max", self.c_max)
        if not 1e-12 <= c_min < c_max <= 1e12:  # beyond these the solvers overflow
            raise ParameterError(
                f"need 1e-12 <= c_min < c_max <= 1e12, got c_min={self.c_min}, c_max={self.c_max} (--c-range MIN,MAX)."
            )
        object.__setattr__(self, "c_min", c_min)
        object.__setattr__(self, "c_max", c_max)
        if not 1 <= _integer("c_steps_per_decade", self.c_steps_per_decade) <= 1000:
            raise ParameterError(f"c_steps_per_decade must be 1 to 1000 C values per decade, got "
                                 f"{self.c_steps_per_decade} (--c-steps-per-decade 8).")  # fmt: skip
        object.__setattr__(self, "c_steps_per_decade", int(self.c_steps_per_decade))
        if not 0 < _number("test_size", self.test_size) < 1:
            raise ParameterError(f"test_size must be in (0, 1), got {self.test_size}.")
        if self.val_size is not None and not 0 < _number("val_size", self.val_size) < 1:
            raise ParameterError(f"val_size must be in (0, 1), got {self.val_size}.")
        if _integer("folds", self.folds) < 2:
            raise ParameterError(
                f"folds must be at least 2, got {self.folds}; or use val_size for one validation split."
            )
        if not 0 <= _integer("seed", self.seed) < 2**32:
            raise ParameterError(f"seed must be in [0, 2**32), got {self.seed}.")
        _check_device(self.device)
        shots = (self.shots,) if isinstance(self.shots, (int, np.integer)) else tuple(self.shots)
        object.__setattr__(self, "shots", tuple(sorted({_integer("shots", n) for n in shots})))
        if any(n < 1 for n in self.shots):
            raise ParameterError(
                f"shots must be positive numbers of images per class, got {list(shots)} (--shots 1,2,4)."
            )
        if not 1 <= _integer("draws", self.draws) <= 1000:
            raise ParameterError(f"draws must be 1 to 1000 subsets per shot count, got {self.draws} (--draws 5).")
        if self.shots and not set(self.probes) - {"knn"}:
            raise ParameterError("few-shot rows are linear probes; add logreg, linsvc or sgd to the probes.")
        if self.max_memory is not None and _integer("max_memory", self.max_memory) < 1:
            raise ParameterError(f"max_memory must be a positive number of bytes, got {self.max_memory}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(name: str, value: Any) -> float:
    """A real number (numpy scalars welcome), or a ParameterError naming ``name``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ParameterError(f"{name} must be a finite number, got {value!r}.")
    return out


def _check_device(device: Any) -> None:
    """The solver's torch device must exist here (checked before any fit, not by the first one)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device={device!r} is not a device; use cpu, cuda or cuda:INDEX.") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ParameterError(f"device={device!r} but that CUDA device is not available here; use --device cpu.")


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r}.")
    return int(value)


@dataclass
class Split:
    """Rows for training, CV folds and testing.

    ``train_rows`` and the folds index the training codes, ``test_rows`` the test codes (the same array when the test
    images are held out of it). Rows are image-major, ``views + 1`` per image, view 0 the plain view.
    """

    train_rows: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]  # (fit rows: every view, validation rows: plain views)
    test_rows: np.ndarray  # every view of the test images
    views: int
    test_views: int


_OPTIONAL = (
    "test_tta_accuracy",
    "test_top5_accuracy",
    "test_class_recall",
    "k",
    "shots",
    "draws",
    "test_accuracy_std",
    "cv_map",
    "cv_map_std",
    "test_map",
    "test_class_ap",
    "class_C",
)
#: Row fields keyed by class index, which results.json keys by class name.
_BY_CLASS = ("test_class_recall", "test_class_ap", "class_C")

#: The protocols a sweep row can follow, with their sources (``results.json`` carries this table).
PROTOCOLS = {
    "linear": "Linear probe: a normalizer and a linear classifier on frozen codes, C chosen coarse-to-fine by "
              "stratified k-fold CV over training images, refit on every training image, tested once on the held-out "
              "images (Razavian et al. 2014, CNN features off-the-shelf; CLIP, Radford et al. 2021, appendix A.3).",
    "knn": "k-nearest-neighbour baseline: codes normalized as the row's normalizer says, then compared by cosine "
           "similarity; majority vote of the k nearest training images (plain views), k over {10, 20, 50, 100} chosen "
           "by the same CV folds (Wu et al. 2018; DINO, Caron et al. 2021). Reported next to the linear probes, never "
           "picked as the best: a bundle holds a linear probe.",
    "few-shot": "Few-shot linear probe: for each shot count n and draw d, n training images per class drawn with seed "
                "(seed, n, d) from the training side of the split only (never a test image); C chosen by CV inside the "
                "draw (min(folds, n) folds), or for n = 1, where no image is left to validate on, the C chosen on all "
                "training images; tested on the whole test split. Mean and standard deviation over the draws (the "
                "few-shot linear probes of CLIP, Radford et al. 2021, section 3.2.4, and of Kornblith et al. 2019).",
    "multilabel": "Multi-label linear probe (images may show several classes): one binary probe per class, one-vs-rest, "
                  "each class's C chosen by CV average precision on the same folds over the --c-range grid at "
                  "--c-steps-per-decade, scored by mean average precision "
                  "over classes on the held-out images (the VOC07 linear SVM protocol of Goyal et al. 2019; AP is "
                  "scikit-learn's average_precision_score, not VOC07's 11-point interpolation). Selection uses CV mAP.",
}  # fmt: skip


@dataclass
class SweepRow:
    """One fitted candidate: a (tap, pooling, normalizer, probe) with its chosen C and its scores."""

    tap: str
    pooling: str
    depth: int
    dims: int
    normalizer: str
    probe: str
    solver: str  # "path" (exact regularization path), "sgd", or "sgd-stream" (out of core)
    C: float | None  # None for the kNN baseline, which has k instead
    C_at_edge: bool
    n_fits: int
    cv_accuracy: float | None  # None only for one-shot rows: no image is left to validate on
    cv_std: float | None
    test_accuracy: float
    test_balanced_accuracy: float | None  # None for multi-label rows
    test_macro_f1: float
    fit_seconds: float
    test_tta_accuracy: float | None = None  # with views: decision functions averaged over an image's views
    test_top5_accuracy: float | None = None  # with more than 5 classes
    test_class_recall: dict[int, float] | None = None  # by class label (results.json names the classes)
    backbone: str = ""  # which store (model) the codes come from, in a sweep of several
    protocol: str = "linear"  # a key of PROTOCOLS
    k: int | None = None  # kNN: neighbours
    shots: int | None = None  # few-shot: training images per class
    draws: int | None = None  # few-shot: draws averaged (test_accuracy is their mean)
    test_accuracy_std: float | None = None  # few-shot: standard deviation over the draws
    cv_map: float | None = None  # multi-label: CV mean average precision (the selection score)
    cv_map_std: float | None = None  # multi-label: its standard deviation over classes
    test_map: float | None = None  # multi-label: test mean average precision
    test_class_ap: dict[int, float] | None = None  # multi-label: test average precision by class label
    class_C: dict[int, float] | None = None  # multi-label: each class's C (C is their geometric mean)

    @property
    def score(self) -> float | None:
        """What selection compares: CV mean average precision for multi-label rows, CV accuracy otherwise."""
        return self.cv_map if self.cv_map is not None else self.cv_accuracy

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.backbone, self.tap, self.pooling, self.normalizer, self.probe, self.protocol, self.shots)

    @property
    def selectable(self) -> bool:
        """Whether the row competes for the best: linear probes on all training images (the kNN and few-shot rows
        are reported next to them)."""
        return self.protocol in ("linear", "multilabel")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepRow:
        """A row read back from ``results.json`` (unknown keys are ignored, missing optional ones default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def best_of(rows: list[SweepRow]) -> SweepRow:
    """The selectable row with the best CV score (ties: fewer dimensions, then first given)."""
    candidates = [r for r in rows if r.selectable]
    if not candidates:
        raise ParameterError("no linear-probe row to pick the best from; add a linear probe (logreg, linsvc, sgd).")
    return max(candidates, key=lambda r: (r.score, -r.dims))


@dataclass
class SweepResult:
    """What a sweep found.

    Attributes
    ----------
    rows : list of SweepRow
        One per (tap, pooling, normalizer, probe), in the order of the codes given.
    best : SweepRow
        The row with the best CV accuracy (ties: fewer dimensions). Selection never looks at the test split.
    estimator : Pipeline
        The best probe refit on every training row.
    test_predictions : dict
        ``sources``, ``labels``, ``predicted`` and ``scores`` of the best probe on the plain test views.
    classes : list of str
    config : SweepConfig
    data : dict
        What was swept: ``store``/``test_store`` paths (for a store sweep), ``n_train_images``, ``n_test_images``,
        ``views``.
    extractor : dict
        For a store sweep, how the best codes were made (model, tap, pooling, rectification, dtype, dims): what a
        probe bundle needs to compute them again.
    """

    rows: list[SweepRow]
    best: SweepRow
    estimator: Pipeline
    test_predictions: dict[str, Any]
    classes: list[str]
    config: SweepConfig
    data: dict[str, Any] = field(default_factory=dict)
    extractor: dict[str, Any] = field(default_factory=dict)

    def best_record(self) -> dict[str, Any]:
        """The best row with where it came from: ``best.json`` and a bundle's metrics."""
        keep = ("store", "n_train_images", "n_test_images")
        return {**self._named(self.best), **{k: self.data[k] for k in keep if k in self.data}}

    def _named(self, row: SweepRow) -> dict[str, Any]:
        """``row.to_dict()`` with its per-class figures keyed by class name."""
        out = row.to_dict()
        for key in _BY_CLASS:
            if out.get(key) is not None:
                out[key] = {self.classes[int(c)]: v for c, v in out[key].items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything but the fitted estimator and predictions, JSON-ready (``results.json``)."""
        rows = [self._named(r) for r in self.rows]
        protocols = {p: PROTOCOLS[p] for p in dict.fromkeys(r["protocol"] for r in rows)}
        return {
            "config": self.config.to_dict(),
            "data": self.data,
            "classes": self.classes,
            "protocols": protocols,
            "rows": rows,
        }
