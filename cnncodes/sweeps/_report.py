"""Sweep outputs: the printed table, results.csv/json, best.json, sweep.png, test predictions and the best probe.

The only module that writes sweep results to disk (the probe's bundle format belongs to :mod:`cnncodes.deploy`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._figures import new_figure, save_figure
from .._fsutil import naming, publish, write_text
from .._labels import label_text
from ..probing import CONCAT_SEP, SweepResult, SweepRow
from ._compare import Comparison

__all__ = [
    "format_table",
    "write_report",
    "write_results",
    "REPORT_FILES",
    "plot_sweep",
    "plot_pareto",
    "plot_confusion",
    "plot_few_shot",
    "plot_scores",
    "pareto_front",
    "summary_lines",
]

_COLUMNS = ["backbone", "tap", "depth", "pooling", "dims", "normalizer", "probe", "protocol", "C", "k", "shots",
            "draws", "cv_accuracy", "cv_std", "cv_ci", "p_cv", "p_cv_holm", "p_cv_images", "p_cv_images_holm", "cv_map", "cv_map_std", "test_map",
            "test_map_ci", "test_accuracy", "test_accuracy_ci", "p_test", "p_test_holm", "test_accuracy_std",
            "test_balanced_accuracy", "test_balanced_accuracy_ci", "test_macro_f1", "test_macro_f1_ci",
            "test_tta_accuracy", "test_tta_accuracy_ci", "test_top5_accuracy", "test_top5_accuracy_ci", "flops",
            "params", "latency_ms_batch1", "latency_ms_batch64", "code_bytes", "probe_bytes", "test_accuracy_mean",
            "test_accuracy_repeat_std", "p_best", "score_knn", "score_logme", "score_hscore", "score_ridge",
            "fit_seconds", "C_at_edge",
            "n_fits", "solver"]  # fmt: skip


def _csv_columns() -> list[str]:
    """The CSV's header: an interval ``x_ci`` is two columns, ``x_ci_low`` and ``x_ci_high``."""
    return [part for c in _COLUMNS for part in ((f"{c}_low", f"{c}_high") if c.endswith("_ci") else (c,))]


def _csv_row(row: SweepRow) -> dict[str, object]:
    out = row.to_dict()
    for c in _COLUMNS:
        if c.endswith("_ci"):
            low, high = out.pop(c, None) or (None, None)
            out[f"{c}_low"], out[f"{c}_high"] = low, high
    return out


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    """``99.56 [98.4, 99.9]`` in percent, 20 characters wide."""
    if value is None:
        return f"{'-':<20}"
    return f"{100 * value:6.2f} " + (f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "").ljust(13)


def _p(value: float | None) -> str:
    return f"{'-':>6}" if value is None else (f"{value:6.3f}" if value >= 1e-3 else f"{'<.001':>6}")


def _flops(value: int | None) -> str:
    """Forward FLOPs in the unit that keeps 4 digits: ``170.2M``, ``4.11G``."""
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(int(value))


def _name(r: SweepRow, several: bool) -> str:
    return f"{r.backbone} {r.tap}" if several else r.tap


def format_table(result: SweepResult | Comparison) -> str:
    """A fixed-width table of every row, then what was chosen and how sure it is.

    Marks: ``*`` the best row (CV), ``c`` the cheapest row not significantly worse than it, ``=`` every other row the
    CV folds cannot tell from the best, ``!`` a C on the grid edge. Every number has its 95 % (1 - alpha) interval;
    p(CV) is the smaller of each row's two paired tests against the best on the CV folds (the corrected paired t on
    the fold scores, the McNemar test on the out-of-fold predictions) and p(test) the McNemar test on the test images. Few-shot rows follow in their own table (test
    accuracy, mean ± std over the draws, per shot count)."""
    rows = [r for r in result.rows if r.protocol != "few-shot"]
    several = len({r.backbone for r in result.rows}) > 1
    multilabel = any(r.protocol == "multilabel" for r in rows)
    cheapest = getattr(result, "cheapest", None)
    alpha = _alpha(result)
    name_width = min(max(22, *(len(_name(r, several)) for r in result.rows)), 64)
    # every number with its interval, as "99.56 [98.4, 99.9]"; multi-label rows are selected and scored by mean
    # average precision, and their "exact" is subset accuracy
    cv_head = "CV mAP" if multilabel else "CV acc"
    scored = [("test_map", "mAP"), ("test_accuracy", "exact")] if multilabel else [
        ("test_accuracy", "test"), ("test_balanced_accuracy", "bal"), ("test_macro_f1", "F1")]  # fmt: skip
    scored += [(m, h) for m, h in (("test_top5_accuracy", "top-5"), ("test_tta_accuracy", "TTA"))
               if any(getattr(r, m) is not None for r in rows)]  # fmt: skip
    costed = any(r.flops is not None for r in rows)
    timed = any(r.latency_ms_batch1 is not None for r in rows)
    head = f"  {'tap':<{name_width}} {'depth':>5} {'pool':<5} {'dims':>6} {'probe':<16} {'C / k':>9}  "
    head += f"{cv_head + ' [95% CI]':<20} {'p(CV)':>6} {scored[0][1] + ' [95% CI]':<20} {'p(test)':>7}"
    head += "".join(f" {h + ' [95% CI]':<20}" for _, h in scored[1:])
    head += (f" {'FLOPs':>7}" if costed else "") + (f" {'ms/img':>6}" if timed else "")
    repeated = any(r.test_accuracy_mean is not None for r in rows)
    head += f" {'test over repeats':>17} {'P(best)':>7}" if repeated else ""
    lines = [head + f" {'fit s':>6}"]
    for r in rows:
        star = ("*" if r.key == result.best.key else "c" if cheapest is not None and r.key == cheapest.key
                else "=" if _tied(r, alpha) else " ")  # fmt: skip
        edge = "!" if r.C_at_edge else " "
        probe = r.probe if r.normalizer == "standard" else f"{r.normalizer}+{r.probe}"
        param = f"k={r.k}" if r.k is not None else f"{r.C:.3g}"
        cv = r.cv_map if multilabel else r.cv_accuracy
        line = f"{star} {_name(r, several)[:name_width]:<{name_width}} {r.depth:>5} {r.pooling or '-':<5} {r.dims:>6}"
        line += f" {probe[:16]:<16} {param:>8}{edge} {_with_ci(cv, r.cv_ci)} {_p(_p_cv(r))}"
        first, *rest = scored
        line += f" {_with_ci(getattr(r, first[0]), getattr(r, first[0] + '_ci'))} {_p(r.p_test):>7}"
        line += "".join(f" {_with_ci(getattr(r, m), getattr(r, m + '_ci'))}" for m, _ in rest)
        line += f" {_flops(r.flops):>7}" if costed else ""
        line += f" {_ms(r.latency_ms_batch1):>6}" if timed else ""
        if repeated:
            spread = ("-" if r.test_accuracy_mean is None else
                      f"{100 * r.test_accuracy_mean:.2f} ± {100 * r.test_accuracy_repeat_std:.2f}")  # fmt: skip
            line += f" {spread:>17} {'-' if r.p_best is None else f'{r.p_best:.2f}':>7}"
        lines.append(line + f" {r.fit_seconds:6.1f}")
    lines += summary_lines(result)
    if any(r.C_at_edge for r in rows):
        lines.append("! = C or k on the edge of the grid: widen --c-range")
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


def _p_cv(r: SweepRow) -> float | None:
    """The smaller of the row's two CV tests against the best (the table's p(CV) column)."""
    tests = [p for p in (r.p_cv, r.p_cv_images) if p is not None]
    return min(tests) if tests else None


def _tied(r: SweepRow, alpha: float) -> bool:
    """Whether neither CV test tells the row from the best (what makes it a candidate for the cheapest pick)."""
    tests = [p for p in (r.p_cv, r.p_cv_images) if p is not None]
    return r.selectable and bool(tests) and min(tests) >= alpha


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _tolerance(result: SweepResult | Comparison) -> float | None:
    config = result.config
    return config.get("tolerance") if isinstance(config, dict) else config.tolerance


def _alpha(result: SweepResult | Comparison) -> float:
    config = result.config
    return float(config.get("alpha", 0.05) if isinstance(config, dict) else config.alpha)


def _describe(r: SweepRow, several: bool, n_test: object, multilabel: bool) -> str:
    """One row in a sentence: where, its scores with intervals, its cost."""
    where = f"{r.backbone} / " if several else ""
    head = f"{where}{r.tap} / {r.pooling or '-'} / {r.probe} (C={r.C:.3g})"
    if multilabel:
        score = f"CV mAP {_with_ci(r.cv_map, r.cv_ci).strip()}, test mAP {_with_ci(r.test_map, r.test_map_ci).strip()}"
    else:
        score = f"CV {_with_ci(r.cv_accuracy, r.cv_ci).strip()}, test {_with_ci(r.test_accuracy, r.test_accuracy_ci).strip()}"
    cost = ""
    if r.flops is not None:
        cost = f"; {_flops(r.flops)} FLOPs"
        times = [f"{t:.3g} ms/image at batch {b}" for b, t in ((1, r.latency_ms_batch1), (64, r.latency_ms_batch64))
                 if t is not None]  # fmt: skip
        cost += "".join(f", {t}" for t in times)
    return f"{head}: {score} on {n_test} held-out images{cost}"


def summary_lines(result: SweepResult | Comparison) -> list[str]:
    """The best row, the cheapest row statistically as good (with what it saves and its tests), which was saved, how
    many rows the folds cannot tell from the best, and with repeats how stable the ranking is."""
    rows = [r for r in result.rows if r.protocol != "few-shot"]
    several = len({r.backbone for r in result.rows}) > 1
    multilabel = any(r.protocol == "multilabel" for r in rows)
    n_test = result.data.get("n_test_images", "?")
    b, cheapest, alpha = result.best, getattr(result, "cheapest", None), _alpha(result)
    lines = [f"best: {_describe(b, several, n_test, multilabel)}"]
    if cheapest is not None and cheapest.key != b.key:
        saving = f"{b.flops / cheapest.flops:.1f}x fewer FLOPs" if b.flops and cheapest.flops else ""
        if cheapest.latency_ms_batch1 and b.latency_ms_batch1:
            saving += f", {b.latency_ms_batch1 / cheapest.latency_ms_batch1:.1f}x faster at batch 1"
        test_name = "paired bootstrap" if multilabel else "McNemar"
        lines.append(f"cheapest equal: {_describe(cheapest, several, n_test, multilabel)}")
        lines.append(f"  {saving + '; ' if saving else ''}vs the best: p = {_p(cheapest.p_cv).strip()} (corrected paired t on the folds), "
                     f"{_p(cheapest.p_cv_images).strip()} (McNemar, out-of-fold), {_p(cheapest.p_test).strip()} "
                     f"({test_name}, test images)")  # fmt: skip
    elif cheapest is not None:
        rule = ("is within the tolerance of it" if _tolerance(result) is not None else
                "is one the CV folds cannot tell from it")  # fmt: skip
        lines.append(f"cheapest equal: the best row itself (no row with fewer FLOPs {rule})")
    else:
        lines.append("cheapest equal: unknown (no row's FLOPs were counted: codes in memory, or a store of a Python "
                     "module)")  # fmt: skip
    pick = result.config.get("pick", "best") if isinstance(result.config, dict) else result.config.pick
    if isinstance(result, SweepResult):
        lines.append(f"saved: the {pick} row (--pick {pick})")
    tested = [r for r in rows if r.selectable and (r.p_cv is not None or r.p_cv_images is not None)]
    tied = [r for r in tested if _tied(r, alpha)]
    worse = [r for r in tested if min(p for p in (r.p_cv_holm, r.p_cv_images_holm, 1.0) if p is not None) < alpha]
    if tested:
        lines.append(f"{len(tied)} of {len(tested)} other rows (=) are not significantly worse than the best on the CV "
                     f"folds (neither p(CV), the corrected paired t on the folds, nor the McNemar test on the "
                     f"out-of-fold predictions is below {alpha:g}); {len(worse)} are worse after Holm's correction.")  # fmt: skip
    lines += _score_lines(result)
    stable = result.data.get("stability")
    if stable:
        rank = stable.get("rank_correlation") or {}
        p_best = sorted((r for r in rows if r.p_best), key=lambda r: -r.p_best)
        shares = ", ".join(f"{_name(r, several)} {r.pooling} {r.probe} {r.p_best:.2f}" for r in p_best[:4])
        tau, rho = (rank.get(k) for k in ("kendall_tau", "spearman"))
        agreement = ("no pair of draws ranked the rows (every row scored the same)" if tau is None else
                     f"Kendall tau {tau:.2f}, Spearman {rho:.2f} between the rankings")  # fmt: skip
        lines.append(f"over {stable['repeats']} redrawn splits: {agreement}; P(best): {shares}")
    return lines


def _score_lines(result: SweepResult | Comparison) -> list[str]:
    """How well each transferability score ranked the arrays, and what a triage searched, skipped and saved."""
    record = result.data.get("transferability") or {}
    lines = []
    parts = []
    for name in record.get("scores", {}):
        t = record.get(name) or {}
        if "kendall_tau" in t:
            parts.append(f"{name} tau {t['kendall_tau']:.2f} (weighted {t['weighted_tau']:.2f}), best array at rank "
                         f"{t.get('best_rank', '?')}, {t['seconds']:.1f} s")  # fmt: skip
    if parts:
        lines.append(f"scores against the measured CV over {record[next(iter(record['scores']))]['arrays']} arrays: "
                     + "; ".join(parts))  # fmt: skip
    triage = result.data.get("triage")
    if triage:
        searched, skipped = len(triage["searched"]), len(triage["skipped"])
        trust = triage["probe_trust"][triage["score"]]
        tau = trust.get("kendall_tau")
        last = (triage.get("rounds") or [{}])[-1]
        sd = last.get("log_error_sd", trust.get("log_error_sd"))
        how = (f"every array that could reach the best CV + {triage['tolerance_points']:g} points by {triage['score']}"
               f" (log-error sd {sd if sd is None else round(sd, 2)} on the {last.get('arrays_searched', '?')} "
               "arrays searched)" if triage["requested"] == "auto"
               else f"the top {triage['window']} by {triage['score']} (log-error sd "
                    f"{sd if sd is None else round(sd, 2)} on the probe arrays)")  # fmt: skip
        lines.append(f"triage ({triage['requested']}): searched {searched} of {triage['arrays']} arrays: the "
                     f"{len(triage['probe_subset'])} probe arrays and {how}; tau of {triage['score']} on the probe "
                     f"arrays {tau if tau is None else round(tau, 2)}; scores took {triage['score_seconds']:.1f} s, "
                     f"the searches {triage['searched_fit_seconds']:.1f} fit-seconds")  # fmt: skip
        if skipped:
            names = ", ".join(f"{a['backbone'] + ' ' if a.get('backbone') else ''}{a['tap']} {a['pooling']}"
                              for a in triage["skipped"][:6])  # fmt: skip
            more = f" and {skipped - 6} more" if skipped > 6 else ""
            lines.append(f"  skipped {skipped}: {names}{more} (all in results.json, triage.skipped); they would have "
                         f"taken about {triage['skipped_fit_seconds_estimate']:.0f} fit-seconds more")  # fmt: skip
    return lines


def plot_scores(result: SweepResult | Comparison, path: str | os.PathLike) -> Path:
    """Each transferability score of every array searched against its measured CV score (the best of its linear
    rows), one panel per score, Kendall's tau in the title, the best array starred."""
    record = result.data.get("transferability") or {}
    names = [n for n in record.get("scores", {}) if any(getattr(r, f"score_{n}") is not None for r in result.rows)]
    measured: dict[tuple[str, str, str], SweepRow] = {}
    for r in result.rows:
        k = (r.backbone, r.tap, r.pooling)
        if r.selectable and (k not in measured or r.score > measured[k].score):
            measured[k] = r
    fig, first = new_figure(4.2 * max(1, len(names)), 4.0)
    fig.clear()
    axes = np.atleast_1d(fig.subplots(1, max(1, len(names)), sharey=True))
    b = result.best
    for ax, name in zip(axes, names):
        points = [(getattr(r, f"score_{name}"), 100 * r.score, r) for r in measured.values()
                  if getattr(r, f"score_{name}") is not None]  # fmt: skip
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", ms=4, alpha=0.7)
        for x, y, r in points:
            if (r.backbone, r.tap, r.pooling) == (b.backbone, b.tap, b.pooling):
                ax.plot([x], [y], marker="*", ms=16, color="gold", mec="black", zorder=5, ls="none",
                        label=f"best: {r.tap} {r.pooling}")  # fmt: skip
        t = record.get(name) or {}
        tau = f"Kendall tau {t['kendall_tau']:.2f}" if "kendall_tau" in t else "tau undefined"
        ax.set_title(f"{name}: {tau}", fontsize=9)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    multilabel = any(r.protocol == "multilabel" for r in result.rows)
    axes[0].set_ylabel(f"measured CV {'mAP' if multilabel else 'accuracy'} (%), best row of the array")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Transferability scores against the measured sweep (training images only)")
    return save_figure(fig, path, dpi=110, tight=True)


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
            ax.errorbar([x_of[r.tap] for r in members], [100 * r.score for r in members], yerr=_yerr(members),
                        marker="o", ms=4, capsize=2, label=label)  # fmt: skip
        ax.plot([x_of[b.tap]], [100 * b.score], marker="*", ms=18, color="gold", mec="black", zorder=5,
                label=f"best: {b.tap} {b.pooling} {b.probe}")  # fmt: skip
        cheap = getattr(result, "cheapest", None)
        if cheap is not None and cheap.key != b.key:
            ax.plot([x_of[cheap.tap]], [100 * cheap.score], marker="D", ms=10, color="limegreen", mec="black",
                    zorder=5, ls="none", label=f"cheapest equal: {cheap.tap} {cheap.pooling} {cheap.probe}")  # fmt: skip
        ax.set_xticks(range(len(taps)))
        ax.set_xticklabels([f"{t}\n(depth {depth_of[t]})" for t in taps], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("tap (shallow → deep); bars: 95 % intervals of the CV score (corrected resampled t)")
        ax.set_title(f"Linear probe accuracy by layer: {Path(result.data.get('store') or 'codes').name}")
    multilabel = any(r.protocol == "multilabel" for r in rows)
    ax.set_ylabel(f"cross-validated {'mean average precision' if multilabel else 'accuracy'} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    return save_figure(fig, path, dpi=120, tight=True)


def _yerr(rows: list[SweepRow]) -> np.ndarray:
    """Asymmetric error bars in points: each row's CV interval, or its fold std where it has none."""
    out = []
    for r in rows:
        spread = r.cv_map_std if r.cv_map is not None else r.cv_std
        low, high = r.cv_ci or (r.score - (spread or 0.0), r.score + (spread or 0.0))
        out.append((100 * max(r.score - low, 0.0), 100 * max(high - r.score, 0.0)))
    return np.array(out, dtype=float).T.reshape(2, len(rows))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has lower (or equal) cost and a higher score; ordered by
    cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, top = [], -np.inf
    for i in order:
        if points[i][1] > top:
            front.append(i)
            top = points[i][1]
    return front


def plot_pareto(result: SweepResult | Comparison, path: str | os.PathLike) -> Path:
    """What each row costs against how well it does: CV score (95 % interval bars) against forward FLOPs and, where
    timed, against per-image latency at batch 1; the Pareto front drawn, the best and the cheapest equal row marked."""
    rows = [r for r in result.rows if r.selectable and r.flops]
    timed = all(r.latency_ms_batch1 for r in rows)
    fig, first = new_figure(13.0 if timed else 7.5, 4.8)
    axes = [first]
    if timed:
        fig.clear()
        axes = list(fig.subplots(1, 2, sharey=True))
    cheapest = getattr(result, "cheapest", None)
    for ax, (what, label) in zip(axes, (("flops", "forward FLOPs per image up to the tap (log)"),
                                        ("latency_ms_batch1", "ms per image at batch 1, network up to the tap (log)"))):  # fmt: skip
        x = [float(getattr(r, what)) for r in rows]
        y = [100 * r.score for r in rows]
        ax.errorbar(x, y, yerr=_yerr(rows), fmt="o", ms=3, capsize=2, alpha=0.45, color="tab:blue", label="rows")
        front = pareto_front(list(zip(x, y)))
        ax.plot([x[i] for i in front], [y[i] for i in front], "-", color="tab:red", lw=1.2, label="Pareto front")
        for marker, row, text in (("*", result.best, "best"), ("D", cheapest, "cheapest equal")):
            if row is not None and getattr(row, what):
                ax.plot([getattr(row, what)], [100 * row.score], marker=marker, ms=14 if marker == "*" else 9,
                        color="gold" if marker == "*" else "limegreen", mec="black", ls="none", zorder=5,
                        label=f"{text}: {row.tap} {row.pooling} {row.probe}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    multilabel = any(r.protocol == "multilabel" for r in rows)
    axes[0].set_ylabel(f"cross-validated {'mAP' if multilabel else 'accuracy'} (%), 95 % interval")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.suptitle("What each row costs: accuracy against compute")
    return save_figure(fig, path, dpi=120, tight=True)


#: Every file a sweep's or a comparison's report may hold (a report written without one drops an old one).
REPORT_FILES = ("results.csv", "results.json", "best.json", "sweep.png", "pareto.png", "few_shot.png", "scores.png",
                "test_predictions.csv", "confusion.png", "best_probe.zip")  # fmt: skip


def write_results(result: SweepResult | Comparison, out: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
    """Write results.csv, results.json, best.json, sweep.png and (with few-shot rows) few_shot.png to ``out``: what a
    sweep and a comparison share. The files are published together (:func:`cnncodes._fsutil.publish`): a crash while
    writing leaves the old report whole, never a mix of two."""
    return publish(out, lambda stage: _results_files(result, stage, plot), owned=REPORT_FILES)


def _results_files(result: SweepResult | Comparison, out: Path, plot: bool) -> dict[str, Path]:
    paths = {name: out / name for name in ("results.csv", "results.json", "best.json")}
    with (
        naming(paths["results.csv"]),
        open(paths["results.csv"], "w", newline="", encoding="utf-8", errors="surrogateescape") as f,
    ):
        writer = csv.DictWriter(f, fieldnames=_csv_columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(_csv_row(r) for r in result.rows)
    write_text(paths["results.json"], json.dumps(result.to_dict(), indent=1))
    # best.json describes the choice, without timings, so equal sweeps of one store (local or on a cluster) write
    # equal files; timings are in results.csv/json.
    best = {k: v for k, v in result.best_record().items() if k != "fit_seconds"}
    write_text(paths["best.json"], json.dumps(best, indent=1))
    if plot:
        paths["sweep.png"] = plot_sweep(result, out / "sweep.png")
        if any(r.flops for r in result.rows if r.selectable):
            paths["pareto.png"] = plot_pareto(result, out / "pareto.png")
        if any(r.protocol == "few-shot" for r in result.rows):
            paths["few_shot.png"] = plot_few_shot(result, out / "few_shot.png")
        if any(getattr(r, f"score_{n}") is not None for r in result.rows for n in ("knn", "logme", "hscore")):
            paths["scores.png"] = plot_scores(result, out / "scores.png")
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
    return save_figure(fig, path, dpi=120)


def write_report(result: SweepResult, out: str | os.PathLike, *, plot: bool = True,
                 bundle: Callable[[Path], Path] | None = None) -> dict[str, Path]:  # fmt: skip
    """Write results.csv, results.json, best.json, test_predictions.csv, sweep.png and confusion.png to ``out``, and
    with ``bundle`` (a function of the folder, such as ``lambda d: save_probe(result, d)``) the best probe's bundle
    beside them, as ``paths["probe"]``. Everything is published together (:func:`cnncodes._fsutil.publish`): a
    crash at any point leaves either the old report whole or the new one, never ``best.json`` of one sweep beside
    another's bundle."""

    def write(stage: Path) -> dict[str, Path]:
        paths = _report_files(result, stage, plot)
        if bundle is not None:
            paths["probe"] = bundle(stage)
        return paths

    return publish(out, write, owned=REPORT_FILES)


def _report_files(result: SweepResult, out: Path, plot: bool) -> dict[str, Path]:
    paths = _results_files(result, out, plot)
    paths["test_predictions.csv"] = out / "test_predictions.csv"
    pred = result.test_predictions
    scores = np.atleast_2d(pred["scores"].T).T

    with (
        naming(paths["test_predictions.csv"]),
        open(paths["test_predictions.csv"], "w", newline="", encoding="utf-8", errors="surrogateescape") as f,
    ):
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
    """The chosen candidate's confusion matrix on the test images (rows: true class, normalized to recall)."""
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
    best = result.chosen
    ax.set_title(
        f"{best.backbone + ' / ' if best.backbone else ''}{best.tap} / {best.pooling} / {best.normalizer} / "
        f"{best.probe}: test accuracy {best.test_accuracy:.3f}"
    )
    return save_figure(fig, path, dpi=110)
