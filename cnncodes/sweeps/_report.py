"""Sweep outputs: the printed table, results.csv/json, best.json, sweep.png, test predictions and the best probe.

The only module that writes sweep results to disk (the probe's bundle format belongs to :mod:`cnncodes.deploy`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from ..probing import SweepResult, SweepRow

__all__ = ["format_table", "write_report", "plot_sweep"]

_COLUMNS = ["tap", "depth", "pooling", "dims", "normalizer", "probe", "C", "cv_accuracy", "cv_std", "test_accuracy",
            "test_balanced_accuracy", "test_macro_f1", "test_tta_accuracy", "test_top5_accuracy", "fit_seconds",
            "C_at_edge", "n_fits", "solver"]  # fmt: skip


def format_table(result: SweepResult) -> str:
    """A fixed-width table of every row; the best is marked ``*`` and a C on the grid edge ``!``."""
    tta = any(r.test_tta_accuracy is not None for r in result.rows)
    head = f"  {'tap':<22} {'depth':>5} {'pool':<5} {'dims':>6} {'probe':<16} {'C':>9}  {'CV acc':>13} {'test':>6} {'bal':>6} {'F1':>6}"
    head += f" {'TTA':>6}" if tta else ""
    lines = [head + f" {'fit s':>6}"]
    for r in result.rows:
        star = "*" if r.key == result.best.key else " "
        edge = "!" if r.C_at_edge else " "
        probe = r.probe if r.normalizer == "standard" else f"{r.normalizer}+{r.probe}"
        line = (
            f"{star} {r.tap[:22]:<22} {r.depth:>5} {r.pooling or '-':<5} {r.dims:>6} {probe[:16]:<16} {r.C:>8.3g}{edge}"
        )
        line += f" {100 * r.cv_accuracy:6.2f}±{100 * r.cv_std:<5.2f} {100 * r.test_accuracy:6.2f}"
        line += f" {100 * r.test_balanced_accuracy:6.2f} {100 * r.test_macro_f1:6.2f}"
        line += f" {100 * (r.test_tta_accuracy or 0):6.2f}" if tta else ""
        lines.append(line + f" {r.fit_seconds:6.1f}")
    b = result.best
    lines.append(
        f"best: {b.tap} / {b.pooling or '-'} / {b.probe} (C={b.C:.3g}): CV {100 * b.cv_accuracy:.2f}%, "
        f"test {100 * b.test_accuracy:.2f}% on {result.data.get('n_test_images', '?')} held-out images"
        + ("  (! = C on the edge of the grid: widen --c-range)" if any(r.C_at_edge for r in result.rows) else "")
    )
    return "\n".join(lines)


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> Path:
    """CV accuracy against depth, one line per pooling x probe, the best marked; saved as PNG.

    The legend sits to the right of the axes, so it never covers a point however many series there are.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taps = list(dict.fromkeys(r.tap for r in result.rows))
    x_of = {t: i for i, t in enumerate(taps)}
    depth_of = {r.tap: r.depth for r in result.rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(taps) + 2) + 2.5, 4.8))
    series: dict[str, list[SweepRow]] = {}
    for r in result.rows:
        label = f"{r.pooling or '-'} · {r.probe}" + ("" if r.normalizer == "standard" else f" ({r.normalizer})")
        series.setdefault(label, []).append(r)
    for label, rows in series.items():
        ax.errorbar([x_of[r.tap] for r in rows], [100 * r.cv_accuracy for r in rows], yerr=[100 * r.cv_std for r in rows],
                    marker="o", ms=4, capsize=2, label=label)  # fmt: skip
    b = result.best
    ax.plot([x_of[b.tap]], [100 * b.cv_accuracy], marker="*", ms=18, color="gold", mec="black", zorder=5,
            label=f"best: {b.tap} {b.pooling} {b.probe}")  # fmt: skip
    ax.set_xticks(range(len(taps)))
    ax.set_xticklabels([f"{t}\n(depth {depth_of[t]})" for t in taps], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("tap (shallow → deep)")
    ax.set_ylabel("cross-validated accuracy (%)")
    ax.set_title(f"Linear probe accuracy by layer: {Path(result.data.get('store') or 'codes').name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(result: SweepResult, out: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
    """Write results.csv, results.json, best.json, test_predictions.csv, sweep.png and confusion.png to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.csv", "results.json", "best.json", "test_predictions.csv")}
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r.to_dict() for r in result.rows)
    paths["results.json"].write_text(json.dumps(result.to_dict(), indent=1))
    # best.json describes the choice, without timings, so equal sweeps of one store (local or on a cluster) write
    # equal files; timings are in results.csv/json.
    best = {k: v for k, v in result.best_record().items() if k != "fit_seconds"}
    paths["best.json"].write_text(json.dumps(best, indent=1))
    pred = result.test_predictions
    scores = np.atleast_2d(pred["scores"].T).T
    with open(paths["test_predictions.csv"], "w", newline="") as f:
        w = csv.writer(f)
        names = result.classes if scores.shape[1] == len(result.classes) else ["decision"]
        w.writerow(["path", "label", "predicted"] + [f"score_{c}" for c in names])
        for src, label, p, s in zip(pred["sources"], pred["labels"], pred["predicted"], scores):
            w.writerow([src, result.classes[label], result.classes[p]] + [f"{v:.6g}" for v in s])
    if plot:
        paths["sweep.png"] = plot_sweep(result, out / "sweep.png")
        paths["confusion.png"] = plot_confusion(result, out / "confusion.png")
    return paths


def plot_confusion(result: SweepResult, path: str | os.PathLike) -> Path:
    """The best candidate's confusion matrix on the test images (rows: true class, normalized to recall)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    pred = result.test_predictions
    labels = list(range(len(result.classes)))
    side = min(12.0, 3.0 + 0.45 * len(labels))
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay.from_predictions(
        pred["labels"], pred["predicted"], labels=labels, display_labels=result.classes, normalize="true",
        values_format=".2f", include_values=len(labels) <= 20, cmap="Blues", colorbar=False, ax=ax,
        xticks_rotation=45,
    )  # fmt: skip
    best = result.best
    ax.set_title(
        f"{best.tap} / {best.pooling} / {best.normalizer} / {best.probe}: test accuracy {best.test_accuracy:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
