"""Sweep outputs: the printed table, results.csv/json, best.json, sweep.png, test predictions and the best probe.

The only module that writes sweep results to disk (the probe's bundle format belongs to :mod:`cnncodes.deploy`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .._figures import new_figure
from .._labels import label_text
from ..probing import CONCAT_SEP, SweepResult, SweepRow
from ._compare import Comparison

__all__ = ["format_table", "write_report", "write_results", "plot_sweep", "plot_confusion", "plot_few_shot"]

_COLUMNS = ["backbone", "tap", "depth", "pooling", "dims", "normalizer", "probe", "protocol", "C", "k", "shots",
            "draws", "cv_accuracy", "cv_std", "cv_map", "cv_map_std", "test_map", "test_accuracy", "test_accuracy_std",
            "test_balanced_accuracy",
            "test_macro_f1", "test_tta_accuracy", "test_top5_accuracy", "fit_seconds", "C_at_edge", "n_fits",
            "solver"]  # fmt: skip


def _percent(value: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if value is None else f"{100 * value:{width}.2f}"


def format_table(result: SweepResult | Comparison) -> str:
    """A fixed-width table of every row; the best is marked ``*`` and a C on the grid edge ``!``. Few-shot rows
    follow in their own table (test accuracy, mean ± std over the draws, per shot count)."""
    rows = [r for r in result.rows if r.protocol != "few-shot"]
    several = len({r.backbone for r in result.rows}) > 1
    multilabel = any(r.protocol == "multilabel" for r in rows)
    tta = any(r.test_tta_accuracy is not None for r in rows)
    names = [f"{r.backbone} {r.tap}" if several else r.tap for r in result.rows]
    name_width = min(max(22, *map(len, names)), 64)
    # multi-label rows are selected and scored by mean average precision; their "exact" is subset accuracy
    cv_head, test_head, bal_head = ("CV mAP", "mAP", "exact") if multilabel else ("CV acc", "test", "bal")
    head = f"  {'tap':<{name_width}} {'depth':>5} {'pool':<5} {'dims':>6} {'probe':<16} {'C / k':>9}  {cv_head:>13}"
    head += f" {test_head:>6} {bal_head:>6} {'F1':>6}" + (f" {'TTA':>6}" if tta else "")
    lines = [head + f" {'fit s':>6}"]
    for r in rows:
        star = "*" if r.key == result.best.key else " "
        edge = "!" if r.C_at_edge else " "
        probe = r.probe if r.normalizer == "standard" else f"{r.normalizer}+{r.probe}"
        name = f"{r.backbone} {r.tap}" if several else r.tap
        param = f"k={r.k}" if r.k is not None else f"{r.C:.3g}"
        cv, cv_std = (r.cv_map, r.cv_map_std) if multilabel else (r.cv_accuracy, r.cv_std)
        test, second = (r.test_map, r.test_accuracy) if multilabel else (r.test_accuracy, r.test_balanced_accuracy)
        line = (
            f"{star} {name[:name_width]:<{name_width}} {r.depth:>5} {r.pooling or '-':<5} {r.dims:>6} {probe[:16]:<16}"
        )
        line += f" {param:>8}{edge} {_percent(cv)}±{100 * (cv_std or 0):<5.2f} {_percent(test)}"
        line += f" {_percent(second)} {_percent(r.test_macro_f1)}"
        line += f" {_percent(r.test_tta_accuracy)}" if tta else ""
        lines.append(line + f" {r.fit_seconds:6.1f}")
    b = result.best
    where = f"{b.backbone} / " if several else ""
    score = (f"CV mAP {100 * b.cv_map:.2f}%, test mAP {100 * b.test_map:.2f}%" if multilabel
             else f"CV {100 * b.cv_accuracy:.2f}%, test {100 * b.test_accuracy:.2f}%")  # fmt: skip
    lines.append(
        f"best: {where}{b.tap} / {b.pooling or '-'} / {b.probe} (C={b.C:.3g}): {score} on "
        f"{result.data.get('n_test_images', '?')} held-out images"
        + ("  (! = C or k on the edge of the grid: widen --c-range)" if any(r.C_at_edge for r in rows) else "")
    )
    few = [r for r in result.rows if r.protocol == "few-shot"]
    if few:
        shots = sorted({r.shots for r in few})
        lines.append(
            f"few-shot test accuracy (%), mean ± std over {few[0].draws} draws of n training images per class:"
        )
        lines.append(f"  {'candidate':<{name_width + 24}}" + "".join(f" {f'n={n}':>12}" for n in shots))
        table: dict[tuple, dict[int, SweepRow]] = {}
        for r in few:
            table.setdefault((r.backbone, r.tap, r.pooling, r.normalizer, r.probe), {})[r.shots] = r
        for (backbone, tap, pooling, norm, probe), by_shots in table.items():
            name = " ".join(p for p in ((backbone if several else ""), tap, pooling or "-", probe if norm == "standard"
                                        else f"{norm}+{probe}") if p)  # fmt: skip
            cells = [f"{100 * by_shots[n].test_accuracy:6.2f}±{100 * by_shots[n].test_accuracy_std:<5.2f}"
                     if n in by_shots else f"{'-':>12}" for n in shots]  # fmt: skip
            lines.append(f"  {name[: name_width + 24]:<{name_width + 24}} " + " ".join(cells))
    return "\n".join(lines)


def plot_sweep(result: SweepResult | Comparison, path: str | os.PathLike) -> Path:
    """CV accuracy against depth, saved as PNG, the best marked.

    One store: a line per pooling x probe over the taps. Several backbones: a line per backbone (its best pooling and
    probe at each tap) over relative depth, the tap's position among that backbone's taps, so networks of different
    depths share one axis; joined taps (``--concat``) are hollow diamonds at their deepest part. The legend sits to the right of the axes, so it never covers a point.
    """
    rows = [r for r in result.rows if r.protocol != "few-shot"]
    backbones = list(dict.fromkeys(r.backbone for r in rows))
    b = result.best
    if len(backbones) > 1:
        fig, ax = new_figure(9.5, 4.8)
        for backbone in backbones:
            names = list(dict.fromkeys(r.tap for r in rows if r.backbone == backbone))
            best_at = {t: max((r for r in rows if r.backbone == backbone and r.tap == t and r.selectable),
                              key=lambda r: r.score) for t in names}  # fmt: skip
            taps = [t for t in names if CONCAT_SEP not in t]  # the line: single taps at relative depth
            x_of = {t: (i + 1) / len(taps) for i, t in enumerate(taps)}
            for joined in (t for t in names if CONCAT_SEP in t):  # a joined candidate sits at its deepest part
                x_of[joined] = max(x_of.get(part, 1.0) for part in joined.split(CONCAT_SEP))
            (line,) = ax.plot([x_of[t] for t in taps], [100 * best_at[t].score for t in taps], marker="o", ms=4,
                              label=backbone)  # fmt: skip
            joined = [t for t in names if CONCAT_SEP in t]
            if joined:
                ax.plot([x_of[t] for t in joined], [100 * best_at[t].score for t in joined], ls="none", marker="D",
                        mfc="none", color=line.get_color(), label=f"{backbone}: joined taps")  # fmt: skip
            for t in names:
                ax.annotate(t, (x_of[t], 100 * best_at[t].score), fontsize=6, rotation=20, alpha=0.7,
                            xytext=(2, 3), textcoords="offset points")  # fmt: skip
            if backbone == b.backbone:
                ax.plot([x_of[b.tap]], [100 * b.score], marker="*", ms=18, color="gold", mec="black",
                        zorder=5, label=f"best: {b.backbone} {b.tap} {b.pooling} {b.probe}")  # fmt: skip
        ax.set_xlabel("relative depth (tap position / taps of that backbone)")
        ax.set_xlim(0, 1.05)
        ax.set_title("Linear probe accuracy by relative depth, best pooling and probe per tap")
    else:
        taps = list(dict.fromkeys(r.tap for r in rows))
        x_of = {t: i for i, t in enumerate(taps)}
        depth_of = {r.tap: r.depth for r in rows}
        fig, ax = new_figure(max(6.0, 1.1 * len(taps) + 2) + 2.5, 4.8)
        series: dict[str, list[SweepRow]] = {}
        for r in rows:
            label = f"{r.pooling or '-'} · {r.probe}" + ("" if r.normalizer == "standard" else f" ({r.normalizer})")
            series.setdefault(label, []).append(r)
        for label, members in series.items():
            ax.errorbar([x_of[r.tap] for r in members], [100 * r.score for r in members],
                        yerr=[100 * (r.cv_map_std if r.cv_map is not None else r.cv_std) for r in members], marker="o",
                        ms=4, capsize=2, label=label)  # fmt: skip
        ax.plot([x_of[b.tap]], [100 * b.score], marker="*", ms=18, color="gold", mec="black", zorder=5,
                label=f"best: {b.tap} {b.pooling} {b.probe}")  # fmt: skip
        ax.set_xticks(range(len(taps)))
        ax.set_xticklabels([f"{t}\n(depth {depth_of[t]})" for t in taps], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("tap (shallow → deep)")
        ax.set_title(f"Linear probe accuracy by layer: {Path(result.data.get('store') or 'codes').name}")
    multilabel = any(r.protocol == "multilabel" for r in rows)
    ax.set_ylabel(f"cross-validated {'mean average precision' if multilabel else 'accuracy'} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def write_results(result: SweepResult | Comparison, out: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
    """Write results.csv, results.json, best.json, sweep.png and (with few-shot rows) few_shot.png to ``out``: what a
    sweep and a comparison share."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.csv", "results.json", "best.json")}
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r.to_dict() for r in result.rows)
    paths["results.json"].write_text(json.dumps(result.to_dict(), indent=1))
    # best.json describes the choice, without timings, so equal sweeps of one store (local or on a cluster) write
    # equal files; timings are in results.csv/json.
    best = {k: v for k, v in result.best_record().items() if k != "fit_seconds"}
    paths["best.json"].write_text(json.dumps(best, indent=1))
    if plot:
        paths["sweep.png"] = plot_sweep(result, out / "sweep.png")
        if any(r.protocol == "few-shot" for r in result.rows):
            paths["few_shot.png"] = plot_few_shot(result, out / "few_shot.png")
    return paths


def plot_few_shot(result: SweepResult | Comparison, path: str | os.PathLike) -> Path:
    """Test accuracy against training images per class (log axis), mean ± std over the draws, for each backbone's
    best candidate (by CV on all training images) and, as a dotted line, its accuracy with every training image."""
    fig, ax = new_figure(7.5, 4.5)
    for backbone in dict.fromkeys(r.backbone for r in result.rows):
        linear = [r for r in result.rows if r.backbone == backbone and r.protocol == "linear"]
        if not linear:
            continue
        top = max(linear, key=lambda r: (r.cv_accuracy, -r.dims))
        few = sorted((r for r in result.rows if r.protocol == "few-shot" and r.backbone == backbone and
                      (r.tap, r.pooling, r.normalizer, r.probe) == (top.tap, top.pooling, top.normalizer, top.probe)),
                     key=lambda r: r.shots)  # fmt: skip
        if not few:
            continue
        label = f"{backbone + ' ' if backbone else ''}{top.tap} {top.pooling} {top.probe}"
        line = ax.errorbar([r.shots for r in few], [100 * r.test_accuracy for r in few],
                           yerr=[100 * r.test_accuracy_std for r in few], marker="o", ms=4, capsize=3, label=label)  # fmt: skip
        ax.axhline(100 * top.test_accuracy, ls=":", color=line[0].get_color(), alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images per class (few-shot draws; dotted: all training images)")
    ax.set_ylabel("test accuracy (%), mean ± std over draws")
    ax.set_title("How many labels: few-shot linear probes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def write_report(result: SweepResult, out: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
    """Write results.csv, results.json, best.json, test_predictions.csv, sweep.png and confusion.png to ``out``."""
    paths = write_results(result, out, plot=plot)
    out = Path(out)
    paths["test_predictions.csv"] = out / "test_predictions.csv"
    pred = result.test_predictions
    scores = np.atleast_2d(pred["scores"].T).T

    with open(paths["test_predictions.csv"], "w", newline="") as f:
        w = csv.writer(f)
        names = result.classes if scores.shape[1] == len(result.classes) else ["decision"]
        w.writerow(["path", "label", "predicted"] + [f"score_{c}" for c in names])
        for src, label, p, s in zip(pred["sources"], pred["labels"], pred["predicted"], scores):
            w.writerow(
                [src, label_text(label, result.classes), label_text(p, result.classes)] + [f"{v:.6g}" for v in s]
            )
    if plot and not result.data.get("multilabel"):  # a confusion matrix needs one class per image
        paths["confusion.png"] = plot_confusion(result, out / "confusion.png")
    return paths


def plot_confusion(result: SweepResult, path: str | os.PathLike) -> Path:
    """The best candidate's confusion matrix on the test images (rows: true class, normalized to recall)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    pred = result.test_predictions
    labels = list(range(len(result.classes)))
    side = min(12.0, 3.0 + 0.45 * len(labels))
    fig, ax = new_figure(side, side)
    ConfusionMatrixDisplay.from_predictions(
        pred["labels"], pred["predicted"], labels=labels, display_labels=result.classes, normalize="true",
        values_format=".2f", include_values=len(labels) <= 20, cmap="Blues", colorbar=False, ax=ax,
        xticks_rotation=45,
    )  # fmt: skip
    best = result.best
    ax.set_title(
        f"{best.backbone + ' / ' if best.backbone else ''}{best.tap} / {best.pooling} / {best.normalizer} / "
        f"{best.probe}: test accuracy {best.test_accuracy:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
