"""Few-shot rows of a sweep: how accuracy falls with fewer labels, on drawn subsets of the training images only.

For each shot count n and draw d, n training images per class are drawn with the seed ``(seed, n, d)``; the test
split is never drawn from. With n >= 2, C is chosen by stratified CV inside the draw (``min(folds, n)`` folds), the
same coarse-to-fine search as the full sweep (``evaluate_codes`` on the draw's split). One shot leaves no image to
validate on, so its C is the one chosen on every training image, and the row says so (``cv_accuracy`` is empty).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..errors import ParameterError
from ._probes import make_probe
from ._results import Split, SweepConfig, SweepRow
from ._scoring import load_rows, metrics_from_scores

__all__ = ["draw_shots", "evaluate_few_shot", "check_shots"]


def check_shots(shots: Sequence[int], labels: np.ndarray, split: Split, classes: Sequence[str]) -> None:
    """Refuse, before any fit, a shot count larger than a class's training images."""
    per = split.views + 1
    counts = np.bincount(np.asarray(labels)[split.train_rows[::per]], minlength=len(classes))
    present = counts[counts > 0]
    too_many = [n for n in shots if n > present.min()]
    if too_many:
        rare = int(np.flatnonzero(counts == present.min())[0])
        raise ParameterError(f"--shots {max(too_many)} needs {max(too_many)} training images per class, but class "
                             f"{classes[rare]!r} has {present.min()} on the training side of the split; give shot "
                             f"counts up to {present.min()}.")  # fmt: skip


def draw_shots(labels: np.ndarray, split: Split, shots: int, draw: int, seed: int) -> np.ndarray:
    """Rows (every view) of ``shots`` training images per class, drawn with the seed ``(seed, shots, draw)``."""
    per = split.views + 1
    images = split.train_rows[::per] // per
    y = np.asarray(labels)[images * per]
    rng = np.random.default_rng([seed, shots, draw])
    chosen = np.concatenate([rng.choice(images[y == c], shots, replace=False) for c in np.unique(y)])
    return np.sort((np.sort(chosen)[:, None] * per + np.arange(per)).ravel())


def _draw_split(labels: np.ndarray, split: Split, rows: np.ndarray, folds: int, seed: int) -> Split:
    per = split.views + 1
    images = rows[::per] // per
    y = np.asarray(labels)[images * per]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_rows = [
        (np.sort((images[f][:, None] * per + np.arange(per)).ravel()), np.sort(images[v] * per))
        for f, v in splitter.split(images, y)
    ]
    return Split(rows, fold_rows, split.test_rows, split.views, split.test_views)


def evaluate_few_shot(
    codes: Any,
    labels: np.ndarray,
    test_codes: Any,
    test_labels: np.ndarray,
    split: Split,
    config: SweepConfig,
    full_C: Mapping[tuple[str, str], float],
    search: Callable[..., list[tuple[SweepRow, Any]]],
    *,
    tap: str,
    pooling: str,
    depth: int = -1,
    n_classes: int,
    backbone: str = "",
) -> list[SweepRow]:
    """One row per (normalizer, linear probe, shot count): test accuracy as mean and std over ``config.draws``.

    ``full_C`` maps (normalizer, probe) to the C chosen on every training image (used for one shot); ``search`` is
    the full sweep's candidate search (:func:`cnncodes.probing.evaluate_codes`), run on each draw's split.
    """
    labels, test_labels = np.asarray(labels), np.asarray(test_labels)
    inner = replace(config, shots=(), max_memory=None)
    y_test = test_labels[split.test_rows]
    X_test = None
    runs: dict[tuple[str, str, int], list[SweepRow]] = {}
    for shots in config.shots:
        for draw in range(config.draws):
            started = time.perf_counter()
            rows = draw_shots(labels, split, shots, draw, config.seed)
            if shots >= 2:
                fitted = search(codes, labels, test_codes, test_labels,
                                        _draw_split(labels, split, rows, min(config.folds, shots), config.seed), inner,
                                        tap=tap, pooling=pooling, depth=depth, n_classes=n_classes)  # fmt: skip
                found = [row for row, _ in fitted]
            else:
                if X_test is None:
                    X_test = load_rows(test_codes, split.test_rows, f"{tap}/{pooling} (test)")  # fmt: skip
                X = load_rows(codes, rows, f"{tap}/{pooling}")
                found = []
                for norm in config.normalizers:
                    for probe in config.probes:
                        C = full_C[(norm, probe)]
                        est = make_probe(probe, norm, C, n_samples=len(rows), random_state=config.seed,
                                         device=config.device).fit(X, labels[rows])  # fmt: skip
                        metrics, _, _ = metrics_from_scores(est.decision_function(X_test), y_test, split.test_views,
                                                            est.classes_)  # fmt: skip
                        found.append(SweepRow(tap=tap, pooling=pooling, depth=depth, dims=int(codes.shape[1]),
                                              normalizer=norm, probe=probe, solver="fixed-C", C=float(C),
                                              C_at_edge=False, n_fits=1, cv_accuracy=None, cv_std=None, **metrics,
                                              fit_seconds=time.perf_counter() - started))  # fmt: skip
            for row in found:
                runs.setdefault((row.normalizer, row.probe, shots), []).append(row)
    out = []
    for (norm, probe, shots), draws in runs.items():
        acc = np.array([r.test_accuracy for r in draws])
        cv = [r.cv_accuracy for r in draws if r.cv_accuracy is not None]
        top5 = [r.test_top5_accuracy for r in draws if r.test_top5_accuracy is not None]
        tta = [r.test_tta_accuracy for r in draws if r.test_tta_accuracy is not None]
        out.append(SweepRow(
            tap=tap, pooling=pooling, depth=int(depth), dims=int(codes.shape[1]), normalizer=norm, probe=probe,
            solver=draws[0].solver, C=float(np.median([r.C for r in draws])), C_at_edge=any(r.C_at_edge for r in draws),
            n_fits=int(sum(r.n_fits for r in draws)), cv_accuracy=float(np.mean(cv)) if cv else None,
            cv_std=float(np.std(cv)) if cv else None, test_accuracy=float(acc.mean()),
            test_balanced_accuracy=float(np.mean([r.test_balanced_accuracy for r in draws])),
            test_macro_f1=float(np.mean([r.test_macro_f1 for r in draws])),
            test_top5_accuracy=float(np.mean(top5)) if top5 else None,
            test_tta_accuracy=float(np.mean(tta)) if tta else None,
            fit_seconds=float(sum(r.fit_seconds for r in draws)), backbone=backbone, protocol="few-shot",
            shots=shots, draws=len(draws), test_accuracy_std=float(acc.std()),
        ))  # fmt: skip
    return out
