"""The typed objects a sweep passes around: its configuration, the split, one result row, and the whole result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from ..errors import ParameterError
from ._probes import CLASSIFIERS, NORMALIZERS
from ._transfer import SCORES

__all__ = ["SweepConfig", "SweepRow", "SweepResult", "Split", "PROTOCOLS", "PICKS", "best_of"]

#: What ``--pick`` can choose: the highest CV score, or the cheapest row statistically as good.
PICKS = ("best", "cheapest")


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
    pick : {"best", "cheapest"}, default="best"
        Which row the sweep hands back as its choice (``SweepResult.chosen``, the bundle saved): ``best``, the highest
        CV score; ``cheapest``, the row with the lowest forward FLOPs to its tap among those not significantly worse
        than the best on the CV folds (neither the one-sided corrected paired t on the fold scores nor the one-sided
        exact McNemar test on the out-of-fold predictions rejects at ``alpha``; not corrected for multiplicity: a
        correction would let more worse rows pass as equal), or within ``tolerance`` when given. CV only: the test
        split is never used to choose.
    tolerance : float, optional
        With ``pick="cheapest"``: rows within this many percentage points of the best CV score count as equal
        (instead of the test).
    alpha : float, default=0.05
        Significance level of the paired tests (and 1 - alpha the level of every interval).
    repeats : int, default=1
        Redraw the held-out split and the folds this many times (seeds ``seed``, ``seed + 1``, ...) and report how
        stable the ranking is: every row's test accuracy mean and std over the repeats, how often it is the best
        (``p_best``), and the rank correlation between repeats. The rows' own numbers and the choice come from the
        first draw (``seed``), whose test images the other draws' folds would otherwise touch. 1 costs nothing.
    resamples : int, default=2000
        Bootstrap resamples of the test images, for the intervals that are not proportions (seeded by ``seed``).
    scores : tuple of str, default=("knn", "logme", "hscore", "ridge")
        Transferability scores measured on every array before its probes are searched (training images only; see
        :mod:`cnncodes.probing._transfer`): every row carries them, and ``results.json`` says how well each ranked
        the arrays against their measured CV accuracy. ``()`` measures none.
    score_images : int, "auto", "all" or None, default="auto"
        How many training images the scores read. An array's scores cost O(m d min(m, d)) for m images of
        d dims, its probes' search O(r d) for the r training rows (views included) they fit on, so where m min(m, d)
        would pass :data:`~cnncodes.probing.SCORE_BUDGET` times r, ``"auto"`` reads a class-stratified sample (drawn
        with ``seed``) of the largest m within it: the scores then stay a small, fixed share of the sweep at any
        size (at 37,500 training images and 20,480 dims, about 3,900). Every array reads the same sample, the size
        its widest allows, so their scores compare. An int caps it at that many instead; ``"all"`` or ``None``
        reads every training image. Either way at least 10 images a class (more than a fixed share where there
        are thousands of classes), and how far the sample's ranking can be trusted is measured against the sweep
        all the same; results.json ``transferability.sample`` says how many were read.
    triage : int, float or "auto", optional
        Search C only on the arrays the scores say could hold the best: an int K (the top K arrays of the most
        trustworthy score), a float in (0, 1) (that fraction of them), or ``"auto"`` (every array whose 95 %
        prediction bound, from the score calibrated on the arrays searched so far, reaches the best CV accuracy
        measured plus 0.3 points, or ``tolerance``). Trust is measured first on a probe subset of arrays spread over
        the scores' range, searched in full (:mod:`cnncodes.probing._triage`). The best row is always a fully
        searched one; the test images are read only for the final numbers of the rows searched. Default: search
        every array.
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
    pick: str = "best"
    tolerance: float | None = None
    alpha: float = 0.05
    repeats: int = 1
    resamples: int = 2000
    scores: tuple[str, ...] = SCORES
    score_images: int | str | None = "auto"
    triage: int | float | str | None = None

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
        if self.pick not in PICKS:
            raise ParameterError(f"pick={self.pick!r}; use one of {list(PICKS)} (--pick best|cheapest).")
        if self.tolerance is not None:
            if not 0 <= _number("tolerance", self.tolerance) < 100:
                raise ParameterError(f"tolerance must be 0 to 100 percentage points of CV accuracy, got "
                                     f"{self.tolerance} (--tolerance 0.5).")  # fmt: skip
            object.__setattr__(self, "tolerance", float(self.tolerance))
        if self.pick == "cheapest" and self.val_size is not None and self.tolerance is None:
            raise ParameterError("pick='cheapest' with one validation split (val_size) has no folds to test rows "
                                 "against the best on; give a tolerance in points (--tolerance 0.5) or use k-fold "
                                 "(--folds).")  # fmt: skip
        if not 0 < _number("alpha", self.alpha) < 0.5:
            raise ParameterError(f"alpha must be in (0, 0.5), got {self.alpha} (0.05: 95 % intervals).")
        if not 1 <= _integer("repeats", self.repeats) <= 100:
            raise ParameterError(f"repeats must be 1 to 100 redrawn splits, got {self.repeats} (--repeats 3).")
        if not 100 <= _integer("resamples", self.resamples) <= 100_000:
            raise ParameterError(f"resamples must be 100 to 100000 bootstrap resamples, got {self.resamples}.")
        scores = (self.scores,) if isinstance(self.scores, str) else tuple(self.scores)
        bad = [s for s in scores if s not in SCORES]
        if bad:
            raise ParameterError(f"unknown score {bad[0]!r}; use any of {list(SCORES)} (--scores knn,logme), or none.")
        object.__setattr__(self, "scores", tuple(dict.fromkeys(scores)))
        object.__setattr__(self, "score_images", _score_images(self.score_images))
        object.__setattr__(self, "triage", _triage(self.triage, self.scores))

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


def _score_images(value: Any) -> int | str | None:
    """``score_images`` checked: "auto", None or "all" (every image), or a whole number of images >= 2."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "all"):
        return None if value.strip().lower() == "all" else "auto"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
        raise ParameterError(f"score_images={value!r}: give 'auto', 'all' (None) or a whole number of training "
                             "images >= 2 (--score-images auto|all|1000).")  # fmt: skip
    return int(value)


def _triage(value: Any, scores: tuple[str, ...]) -> int | float | str | None:
    """``triage`` checked: None, a whole number of arrays >= 1, a fraction in (0, 1), or "auto"."""
    if value is None:
        return None
    how = "give a number of arrays (--triage 8), a fraction of them (--triage 0.25) or --triage auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            value = "auto"
        else:
            try:
                value = float(text) if any(c in text for c in ".e") else int(text)
            except ValueError:
                raise ParameterError(f"triage={value!r}: {how}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, str, np.integer, np.floating)):
        raise ParameterError(f"triage={value!r}: {how}.")
    if isinstance(value, (float, np.floating)):
        if not 0 < value < 1:
            raise ParameterError(f"triage={value!r}: a fraction must be in (0, 1); {how}.")
        value = float(value)
    elif not isinstance(value, str):
        if value < 1:
            raise ParameterError(f"triage={value!r}: at least one array must be searched; {how}.")
        value = int(value)
    if not scores:
        raise ParameterError("triage ranks arrays by their transferability scores, but scores=() measures none; "
                             "keep at least one score (--scores knn).")  # fmt: skip
    return value


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


#: What a row costs when deployed (all measured: see ``cnncodes.network.tap_costs``).
COSTS = ("flops", "params", "latency_ms_batch1", "latency_ms_batch64", "code_bytes", "probe_bytes")

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
    *(
        f"{m}_ci"
        for m in (
            "cv",
            "test_accuracy",
            "test_balanced_accuracy",
            "test_macro_f1",
            "test_top5_accuracy",
            "test_tta_accuracy",
            "test_map",
        )
    ),
    "cv_folds",
    "cv_hits",
    "p_cv",
    "p_cv_holm",
    "p_cv_images",
    "p_cv_images_holm",
    "p_test",
    "p_test_holm",
    *COSTS,
    "test_accuracy_mean",
    "test_accuracy_repeat_std",
    "p_best",
    "test_hits",
    *(f"score_{name}" for name in SCORES),
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
    # uncertainty (cnncodes.probing._stats): 1 - alpha intervals [low, high] of the numbers above
    cv_ci: list[float] | None = None  # corrected resampled t over the folds (Wilson with one validation split)
    test_accuracy_ci: list[float] | None = None  # Wilson
    test_balanced_accuracy_ci: list[float] | None = None  # percentile bootstrap over test images
    test_macro_f1_ci: list[float] | None = None  # percentile bootstrap over test images
    test_top5_accuracy_ci: list[float] | None = None  # Wilson
    test_tta_accuracy_ci: list[float] | None = None  # Wilson
    test_map_ci: list[float] | None = None  # percentile bootstrap over test images
    cv_folds: list[float] | None = None  # the score of every CV fold at the chosen C (what the paired t pairs)
    cv_hits: str | None = None  # out-of-fold correctness of every validation image, fold after fold (packed hex)
    # paired comparisons with the best row (None for the best itself and for rows no test applies to)
    p_cv: float | None = None  # one-sided: the best is better on the CV folds (corrected paired t)
    p_cv_holm: float | None = None  # Holm-adjusted over the rows tested
    p_cv_images: float | None = None  # one-sided exact McNemar on the out-of-fold predictions of every training image
    p_cv_images_holm: float | None = None
    p_test: float | None = None  # on the test images: exact McNemar (mAP: paired bootstrap, one-sided)
    p_test_holm: float | None = None
    # cost, measured on this machine (cnncodes.network._cost)
    flops: int | None = None  # forward FLOPs per image up to the tap (FlopCounterMode on the early-exit network)
    params: int | None = None  # parameters that run up to the tap
    latency_ms_batch1: float | None = None  # per-image ms of the network up to the tap, batch 1
    latency_ms_batch64: float | None = None  # per-image ms at batch 64
    code_bytes: int | None = None  # bytes of one image's codes in the store
    probe_bytes: int | None = None  # bytes of the fitted probe's arrays (normalizer and linear layer)
    # stability over redrawn splits (repeats > 1)
    test_accuracy_mean: float | None = None
    test_accuracy_repeat_std: float | None = None
    p_best: float | None = None  # how often the row was the best over the repeats
    test_hits: str | None = None  # per-image test correctness, packed bits in hex (results.json: paired tests later)
    # transferability scores of the row's array (cnncodes.probing._transfer), on the training images only
    score_knn: float | None = None
    score_logme: float | None = None
    score_hscore: float | None = None
    score_ridge: float | None = None

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
        One per (tap, pooling, normalizer, probe), in the order of the codes given, each with its intervals, its
        paired tests against the best row and, for a store sweep, its cost.
    best : SweepRow
        The row with the best CV accuracy (ties: fewer dimensions). Selection never looks at the test split.
    cheapest : SweepRow or None
        The row with the lowest forward FLOPs among those not significantly worse than ``best`` on the CV folds (or
        within ``config.tolerance``); None when the rows' costs are unknown (codes in memory without ``costs``).
    estimator : Pipeline
        The chosen row's probe (``config.pick``: ``best`` or ``cheapest``) refit on every training row.
    test_predictions : dict
        ``sources``, ``labels``, ``predicted`` and ``scores`` of the chosen probe on the plain test views.
    classes : list of str
    config : SweepConfig
    data : dict
        What was swept: ``store``/``test_store`` paths (for a store sweep), ``n_train_images``, ``n_test_images``,
        ``views``, and with repeats ``stability`` (rank correlations between redrawn splits).
    extractor : dict
        For a store sweep, how the chosen codes were made (model, tap, pooling, rectification, dtype, dims): what a
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
    cheapest: SweepRow | None = None

    @property
    def chosen(self) -> SweepRow:
        """The row ``config.pick`` names: what the bundle holds."""
        return self.cheapest if self.config.pick == "cheapest" and self.cheapest is not None else self.best

    def best_record(self) -> dict[str, Any]:
        """The chosen row with where it came from and the choice it was (``best.json`` and a bundle's metrics)."""
        keep = ("store", "n_train_images", "n_test_images")
        record = {**self._named(self.chosen), **{k: self.data[k] for k in keep if k in self.data}}
        record.pop("test_hits", None)
        return {**record, **selection_record(self.best, self.cheapest, self.config.pick, self.config.tolerance)}

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
            "statistics": STATISTICS,
            "selection": selection_record(self.best, self.cheapest, self.config.pick, self.config.tolerance),
            "rows": rows,
        }


def _summary(row: SweepRow | None) -> dict[str, Any] | None:
    """The fields that say which row it is and what it scores and costs."""
    if row is None:
        return None
    keep = ("backbone", "tap", "pooling", "normalizer", "probe", "depth", "dims", "C", "cv_accuracy", "cv_ci",
            "cv_map", "test_accuracy", "test_accuracy_ci", "test_map", "test_map_ci", "p_cv", "p_cv_images", "p_test", "flops",
            "params", "latency_ms_batch1", "latency_ms_batch64", "code_bytes", "probe_bytes")  # fmt: skip
    return {k: getattr(row, k) for k in keep if getattr(row, k) is not None}


def selection_record(best: SweepRow, cheapest: SweepRow | None, pick: str, tolerance: float | None) -> dict[str, Any]:
    """Both choices side by side, with what the cheaper one saves: ``best.json``, ``results.json`` and bundles."""
    rule = (f"the lowest forward FLOPs among rows within {tolerance} points of the best CV score" if tolerance is not None
            else "the lowest forward FLOPs among rows not significantly worse than the best on the CV folds: "
                 "neither the one-sided corrected paired t on the folds (p_cv) nor the one-sided exact McNemar test "
                 "on the out-of-fold predictions (p_cv_images) rejects at alpha, uncorrected for multiplicity "
                 "(correcting would let more worse rows pass as equal)")  # fmt: skip
    out: dict[str, Any] = {"pick": pick, "cheapest_rule": rule, "best": _summary(best), "cheapest": _summary(cheapest)}
    if cheapest is not None and best.flops and cheapest.flops:
        out["flops_speedup"] = best.flops / cheapest.flops
        for b in ("batch1", "batch64"):
            fast, slow = getattr(cheapest, f"latency_ms_{b}"), getattr(best, f"latency_ms_{b}")
            if fast and slow:
                out[f"latency_speedup_{b}"] = slow / fast
    return out


#: How every interval and test of a sweep is computed (``results.json`` carries this table).
STATISTICS = {
    "intervals": "Every interval is at 1 - alpha (0.95 by default). Test accuracy, top-5 and TTA accuracy: Wilson "
                 "score intervals for a proportion of test images (scipy.stats.binomtest(...).proportion_ci). Balanced "
                 "accuracy, macro F1 and mAP: percentile bootstrap over test images (scipy.stats.bootstrap, "
                 "--seed-seeded, `resamples` draws). CV accuracy: the fold mean with the corrected resampled t "
                 "interval of Nadeau and Bengio (2003), whose variance (1/k + n_val/n_fit) s^2 accounts for the "
                 "folds' overlapping training sets; with one validation split, Wilson on its images.",
    "paired_tests": "Every row against the best row, on the same images. CV: one-sided corrected resampled paired t "
                    "on the fold differences (H1: the best is better), p_cv, which accounts for the variance of "
                    "training on other images but has k - 1 degrees of freedom; and a one-sided exact McNemar test on "
                    "the out-of-fold predictions of every training image (each validated once, by the fold that left "
                    "it out), p_cv_images, which has the power of every image but sees only the variance of the "
                    "images. A row is statistically as good as the best when neither test rejects. Test: exact McNemar test on the images "
                    "exactly one of the two gets right (scipy.stats.binomtest(b, b + c, 0.5), two-sided), p_test; "
                    "multi-label rows: a one-sided paired bootstrap of mAP over test images. p_cv_holm and "
                    "p_test_holm are Holm-adjusted over the rows tested (family-wise error).",
    "reading": "The best was chosen on the same folds its CV tests use, so p_cv and p_cv_images lean toward 'the best is "
               "better' (a simulation of 12 rows of equal quality rejected a null row 24 % of the time at 0.05): "
               "p_cv_holm < alpha is evidence that a row is worse, not with the family-wise error controlled, and "
               "the lean makes the cheapest pick conservative (fewer rows pass as equal). p_cv >= alpha means the "
               "folds cannot tell a row from the best, which is not proof of equality: the test split's intervals "
               "and p_test, on images the choice never saw, say how far apart the two are on unseen images.",
    "stability": "With repeats > 1: the held-out split and folds redrawn with seeds seed, seed + 1, ...; per row the "
                 "mean and std of its test accuracy and p_best, the share of draws in which it was the best; "
                 "rank_correlation: Kendall's tau and Spearman's rho of the rows' CV scores between every pair of "
                 "draws, averaged.",
}  # fmt: skip
