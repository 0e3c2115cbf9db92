"""``cnncodes depth``: how many layers to freeze, measured. For each cut: a linear probe on its pooled codes and the
layers above it fine-tuned on its cached activations, on the same held-out test split, with what each cut costs."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._figures import new_figure, save_figure
from .._fsutil import naming, publish, recover, write_text
from ..errors import ParameterError
from ..extraction import extract
from ..images import open_source
from ..network import Backbone, cut_points, forward_flops, list_taps, load_backbone, tap_costs
from ..probing import SweepConfig
from ..probing._scoring import pack_hits
from ..probing._stats import holm, mcnemar_exact, wilson_interval
from ..store import CodeStore
from ..sweeps import sweep
from ._finetune import RECIPES, FinetuneConfig
from ._run import backbone_of, finetune

__all__ = ["DepthRow", "depth", "depth_of_stores", "format_depth_table", "write_depth_report", "DEPTH_FILES"]


@dataclass
class DepthRow:
    """One cell of the matrix: a cut and what was trained above it (``recipe``), the linear probe at that cut (the
    same for every recipe of the cut), the trained model's scores, and the costs."""

    cut: str
    depth: int  # position in forward order
    linear_cv_accuracy: float
    linear_test_accuracy: float
    finetune_val_accuracy: float
    finetune_test_accuracy: float | None
    cache_bytes: int
    extract_seconds: float
    train_seconds: float
    best: bool = False
    # 95 % intervals: Wilson on the images scored, the corrected resampled t on the linear probe's CV folds
    linear_cv_ci: list[float] | None = None
    linear_test_ci: list[float] | None = None
    finetune_val_ci: list[float] | None = None
    finetune_test_ci: list[float] | None = None
    # the best cut's fine-tuned top against this cut's, on the same images: exact McNemar, Holm-adjusted over cuts
    p_val: float | None = None
    p_val_holm: float | None = None
    p_test: float | None = None
    p_test_holm: float | None = None
    linear_flops: int | None = None  # deployed linear probe: forward FLOPs per image of the network up to the cut
    finetune_flops: int | None = None  # deployed fine-tuned model: the network up to the cut and the trained top
    trainable_params: int | None = None  # parameters the fine-tuning trained
    val_hits: str | None = None  # the fine-tuned top right or not on each validation image (packed bits, hex)
    test_hits: str | None = None  # on each test image
    epochs: int | None = None  # epochs the fine-tuning ran (early stopping: at most FinetuneConfig.epochs)
    best_epoch: int | None = None  # the epoch whose weights were kept (-1: the starting weights)
    recipe: str = "top"  # what was trained above the cut (FinetuneConfig.train)
    cheapest: bool = False  # the recommendation: the cheapest cell as good as the best on validation (mark_cheapest)
    finetune_val_loss: float | None = None  # mean validation cross-entropy: breaks ties of validation accuracy


def depth(
    source: Any,
    *,
    out: str | os.PathLike,
    model: str | Backbone = "efficientnet_lite0",
    cuts: str | Sequence[str] = "stages",
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    views: int = 2,
    seed: int = 0,
    augment: str | Sequence[str] = ("crop", "flip"),
    config: FinetuneConfig | None = None,
    recipes: Sequence[str] | None = None,
    test_size: float = 0.25,
    val_size: float = 0.2,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> list[DepthRow]:
    """For each cut: extract its raw activations (cache, ``none``) and pooled codes (``avg``) once, with ``views``
    seeded augmented views (``augment``: crop, flip, color; drop flip for images whose mirror means something else,
    such as digits); sweep linear probes on the pooled codes; train above the cut on the cache, once per recipe of
    ``recipes`` (default: ``config.train``; see :data:`~cnncodes.training.RECIPES`), with the same optimizer,
    schedule and early stopping.

    Every cell (cut x recipe) is scored on the same held-out test images (the sweep's stratified split for
    ``test_size`` and ``seed``); each trained model is chosen on validation images only. The best cell is the one
    with the highest validation accuracy (ties: the lower validation cross-entropy, :func:`best_cell`); the cheapest
    cell as good as it on validation (:func:`mark_cheapest`) is marked too: the recommendation. One extraction pass writes every cut to the store ``out/cache/``: a rerun reuses
    it (and
    :func:`depth_of_stores` runs the same comparison over stores extracted by hand).
    """
    config = config or FinetuneConfig(seed=seed, epochs=DEPTH_EPOCHS)
    source = open_source(source)  # opened once, so a multi-label source is refused before any extraction
    if source.multilabel:
        raise ParameterError(f"{source.description} is multi-label (cat;dog labels), but the depth sweep fine-tunes "
                             "single-label classifiers; probe it with cnncodes extract and cnncodes sweep instead.")  # fmt: skip
    backbone = model if isinstance(model, Backbone) else load_backbone(model, weights=weights, input_size=input_size)
    catalogue = list_taps(backbone)
    names = [t.name for t in catalogue.select(cuts)]
    possible = set(cut_points(backbone, catalogue))
    not_cuts = [n for n in names if n not in possible]
    if not_cuts:
        raise ParameterError(f"{', '.join(not_cuts)} cannot be cut at (the layers above read around them); choose "
                             f"among: {', '.join(sorted(possible, key=catalogue.names.index))}.")  # fmt: skip
    recipes = _recipes(recipes, config)  # refused before any extraction
    recover(out)  # cache/ left in a report's staging folder by a crash is moved back, not extracted again
    if progress:
        print(f"extracting {len(names)} cuts in one pass: {', '.join(names)}")
    start = time.perf_counter()
    store = extract(source, out=Path(out) / "cache", model=backbone, taps=names, poolings="none,avg", relu="never",
                    views=views, seed=seed, augment=augment, batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    return depth_of_stores([store], out=out, backbone=backbone, config=config, recipes=recipes, test_size=test_size,
                           val_size=val_size, device=device, progress=progress,
                           extract_seconds=[time.perf_counter() - start])  # fmt: skip


def _recipes(recipes: Sequence[str] | str | None, config: FinetuneConfig) -> tuple[str, ...]:
    """``recipes`` checked (a comma-separated string or a list of :data:`RECIPES`), ``(config.train,)`` by default."""
    if recipes is None:
        return (config.train,)
    names = [r.strip() for r in recipes.split(",")] if isinstance(recipes, str) else [str(r) for r in recipes]
    unknown = [r for r in names if r not in RECIPES]
    if unknown or not names or len(set(names)) != len(names):
        raise ParameterError(f"recipes {','.join(names)!r}: give distinct names among {', '.join(RECIPES)} "
                             "(e.g. --train top,block,norms,head).")  # fmt: skip
    return tuple(names)


def depth_of_stores(
    stores: Sequence[CodeStore | str | os.PathLike],
    *,
    out: str | os.PathLike,
    backbone: Backbone | None = None,
    weights: str | os.PathLike | None = None,
    config: FinetuneConfig | None = None,
    recipes: Sequence[str] | None = None,
    test_size: float = 0.25,
    val_size: float = 0.2,
    device: str = "auto",
    progress: bool = True,
    extract_seconds: Sequence[float] | None = None,
) -> list[DepthRow]:
    """The freeze-depth sweep over stores already extracted: every unpooled array (``none``, ``relu="never"``) of
    every store is a cut, its cache, and the pooled arrays of the same tap feed its linear probe. The stores must hold
    the same images (their sources are compared) from one backbone; ``extract_seconds`` gives each store's
    extraction time, which every cut of it reports."""
    opened = [s if isinstance(s, CodeStore) else CodeStore(s) for s in stores]
    config = config or FinetuneConfig(epochs=DEPTH_EPOCHS)
    recipes = _recipes(recipes, config)
    if any(store.multilabel for store in opened):
        raise ParameterError("the depth sweep fine-tunes single-label classifiers, but these stores are multi-label "
                             "(a CSV of cat;dog labels); probe them with cnncodes sweep instead.")  # fmt: skip
    for store in opened[1:]:
        if store.sources != opened[0].sources or store.manifest.get("model") != opened[0].manifest.get("model"):
            raise ParameterError(f"{store.path} holds other images or another model than {opened[0].path}; a depth "
                                 "sweep compares cuts of one backbone on one set of images.")  # fmt: skip
    cuts = [(i, a) for i, store in enumerate(opened) for a in store.arrays if a["pooling"] == "none"]
    names = [a["tap"] for _, a in cuts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ParameterError(f"several stores hold the cut {repeated[0]!r}; give each cut once.")
    bare = next((store for store in opened if not any(a["pooling"] == "none" for a in store.arrays)), None)
    if bare is not None:
        raise ParameterError(f"{bare.path} holds no unpooled arrays; a depth store holds its cuts raw: extract it "
                             "with --taps CUTS --poolings none,avg --relu never.")  # fmt: skip
    backbone = backbone or backbone_of(opened[0], weights)
    catalogue = list_taps(backbone)
    rows, hits = [], []
    for i, entry in cuts:
        store, name = opened[i], entry["tap"]
        pooled = [p for t, p in store.keys() if t == name and p != "none"]
        if not pooled:
            raise ParameterError(f"{store.path} has no pooled codes of {name!r} for the linear probe; extract it with "
                                 "--poolings none,avg.")  # fmt: skip
        if progress:
            print(f"cut {name}: linear probe on {', '.join(pooled)}, then {', '.join(recipes)} above it")
        linear = sweep(store, SweepConfig(probes=("logreg",), test_size=test_size, seed=config.seed), taps=[name],
                       poolings=pooled, costs=False, progress=False)  # fmt: skip
        for recipe in recipes:
            tuned = finetune(store, name, backbone=backbone, config=replace(config, train=recipe, head=False),
                             val_size=val_size, test_size=test_size, device=device, progress=progress)  # fmt: skip
            row = DepthRow(name, catalogue[name].index, linear.best.cv_accuracy, linear.best.test_accuracy,
                           tuned.val_accuracy, tuned.test_accuracy, (store.path / entry["file"]).stat().st_size,
                           float("nan") if extract_seconds is None else extract_seconds[i], tuned.seconds,
                           linear_cv_ci=linear.best.cv_ci, linear_test_ci=linear.best.test_accuracy_ci,
                           recipe=recipe)  # fmt: skip
            _measure(row, tuned, backbone, catalogue[name].shape)
            rows.append(row)
            hits.append((tuned.val_hits, tuned.test_hits))
    order = sorted(range(len(rows)), key=lambda i: (rows[i].depth, recipes.index(rows[i].recipe)))
    rows, hits = [rows[i] for i in order], [hits[i] for i in order]
    best_cell(rows).best = True
    compare_cuts(rows, hits)
    mark_cheapest(rows)
    write_depth_report(rows, out)
    return rows


def best_cell(rows: Sequence[DepthRow]) -> DepthRow:
    """The cell with the highest validation accuracy; of cells equal on it (a few hundred validation images often
    tie), the one with the lowest validation cross-entropy, a proper score that sees how sure each right answer is;
    then the first in forward order."""

    def loss(r: DepthRow) -> float:
        return (
            r.finetune_val_loss if r.finetune_val_loss is not None and math.isfinite(r.finetune_val_loss) else math.inf
        )

    return max(rows, key=lambda r: (r.finetune_val_accuracy, -loss(r)))


def _measure(row: DepthRow, tuned: Any, backbone: Backbone, shape: tuple[int, ...]) -> None:
    """A cut's intervals and costs: Wilson intervals of the fine-tuned top's scores, deployed FLOPs of the probe
    (the network up to the cut) and of the fine-tuned model (that, then the trained top), trained parameters."""
    import torch

    for name, hits in (("val", tuned.val_hits), ("test", tuned.test_hits)):
        if hits is not None and len(hits):
            setattr(row, f"finetune_{name}_ci", list(wilson_interval(int(np.sum(hits)), len(hits))))
            setattr(row, f"{name}_hits", pack_hits(hits))
    prefix = tap_costs(backbone, [row.cut], pooling="none")[(row.cut,)].flops
    model = tuned.model.to("cpu")
    row.linear_flops = int(prefix)
    row.finetune_flops = int(prefix + forward_flops(model, torch.zeros((1, *shape))))
    row.trainable_params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    row.epochs, row.best_epoch = len(tuned.history), int(tuned.best_epoch)
    row.finetune_val_loss = tuned.val_loss


def mark_cheapest(rows: list[DepthRow], alpha: float = 0.05) -> None:
    """Mark the cheapest cell as good as the best on the validation images: the best itself, or a cell whose paired
    test against it is not significant (exact McNemar, *unadjusted* p >= ``alpha``: the Holm adjustment would call
    more cells equal, which a recommendation must not) and whose validation accuracy lies inside the best's 95 %
    interval. Cheapest: the fewest deployed FLOPs; among equal FLOPs (every recipe that runs the whole network above
    the cut deploys the same), the higher validation accuracy, then the fewest trained parameters."""
    best = next(r for r in rows if r.best)
    low = best.finetune_val_ci[0] if best.finetune_val_ci else best.finetune_val_accuracy

    def cost(r: DepthRow) -> tuple[float, float, float]:
        def known(value: int | None) -> float:
            return math.inf if value is None else value

        return (known(r.finetune_flops), -r.finetune_val_accuracy, known(r.trainable_params), r.train_seconds)

    equal = [r for r in rows if r is best or (r.p_val is not None and r.p_val >= alpha
                                              and r.finetune_val_accuracy >= low)]  # fmt: skip
    min(equal, key=cost).cheapest = True


def compare_cuts(rows: list[DepthRow], hits: list[tuple[Any, Any]]) -> None:
    """Every cell's trained model against the best cell's, on the same validation and test images (exact McNemar),
    Holm-adjusted over the cells, in place."""
    at = next(i for i, r in enumerate(rows) if r.best)
    for which, k in (("p_val", 0), ("p_test", 1)):
        ref = hits[at][k]
        values = np.full(len(rows), np.nan)
        for i, (row, pair) in enumerate(zip(rows, hits)):
            if i != at and ref is not None and pair[k] is not None and len(pair[k]) == len(ref):
                values[i] = mcnemar_exact(ref, pair[k])
                setattr(row, which, float(values[i]))
        if np.isfinite(values).any():
            for row, p in zip(rows, holm(values)):
                if np.isfinite(p):
                    setattr(row, f"{which}_holm", float(p))


#: Epochs a depth sweep trains each cell by default (early stopping may end it sooner): on digits at 96 px, 8
#: epochs keep the 10-epoch answer (the same best cut) in 4 min 16 s instead of 5 min 42 s (docs/benchmarks.md).
DEPTH_EPOCHS = 8

#: The files of a depth report, published together (the cache/ store beside them stays).
DEPTH_FILES = ("depth.csv", "depth.json", "depth.png")


def write_depth_report(rows: list[DepthRow], out: str | os.PathLike) -> dict[str, Path]:
    """``depth.csv``, ``depth.json`` and ``depth.png`` (accuracy against cut depth, both methods, best cut marked),
    published together (:func:`cnncodes._fsutil.publish`): a crash leaves the old three or the new three."""
    return publish(out, lambda folder: _depth_files(rows, folder), owned=DEPTH_FILES)


def _depth_files(rows: list[DepthRow], out: Path) -> dict[str, Path]:
    paths = {"csv": out / "depth.csv", "json": out / "depth.json", "plot": out / "depth.png"}
    with naming(paths["csv"]), open(paths["csv"], "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    write_text(paths["json"], json.dumps([asdict(r) for r in rows], indent=1))
    cuts = list(dict.fromkeys(r.cut for r in rows))
    recipes = list(dict.fromkeys(r.recipe for r in rows))
    fig, (heat, lines) = new_figure(7.5 + 1.1 * len(recipes), 0.6 * len(cuts) + 3.0, ncols=2)
    _heat_map(heat, rows, cuts, recipes)
    _by_cut(lines, rows, cuts, recipes)
    save_figure(fig, paths["plot"], dpi=120)
    return paths


def _cell(rows: list[DepthRow], cut: str, recipe: str) -> DepthRow | None:
    return next((r for r in rows if r.cut == cut and r.recipe == recipe), None)


def _heat_map(ax: Any, rows: list[DepthRow], cuts: list[str], recipes: list[str]) -> None:
    """Test accuracy of every cell (cuts down, the linear probe then each recipe across), validation beside it;
    the best cell (by validation) boxed in black, the cheapest cell not significantly worse in a dashed box."""
    columns = ["linear", *recipes]
    grid = np.full((len(cuts), len(columns)), np.nan)
    for i, cut in enumerate(cuts):
        first = next(r for r in rows if r.cut == cut)
        grid[i, 0] = first.linear_test_accuracy
        ax.text(0, i, f"{first.linear_test_accuracy:.3f}\ncv {first.linear_cv_accuracy:.3f}", ha="center",
                va="center", fontsize=7)  # fmt: skip
        for j, recipe in enumerate(recipes, start=1):
            cell = _cell(rows, cut, recipe)
            if cell is None:
                continue
            grid[i, j] = cell.finetune_test_accuracy if cell.finetune_test_accuracy is not None else np.nan
            test = "-" if cell.finetune_test_accuracy is None else f"{cell.finetune_test_accuracy:.3f}"
            ax.text(j, i, f"{test}\nval {cell.finetune_val_accuracy:.3f}", ha="center", va="center", fontsize=7)
            for flag, style in ((cell.best, "-"), (cell.cheapest, "--")):
                if flag:
                    ax.add_patch(_box(i, j, style))
    shown = ax.imshow(grid, cmap="Blues", aspect="auto", vmin=np.nanmin(grid) - 0.02, vmax=1.0)
    ax.figure.colorbar(shown, ax=ax, label="test accuracy", shrink=0.8)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(cuts)), cuts, fontsize=8)
    ax.set_xlabel("what is trained above the cut")
    ax.set_title("best (validation): solid box; cheapest not worse: dashed", fontsize=8)


def _box(i: int, j: int, style: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, lw=2, ls=style, ec="black")


def _by_cut(ax: Any, rows: list[DepthRow], cuts: list[str], recipes: list[str]) -> None:
    """Test accuracy against the cut, the linear probe and each recipe, with 95 % Wilson intervals."""
    x = np.arange(len(cuts))

    def plot(values: list[float | None], cis: list[list[float] | None], label: str, fmt: str) -> None:
        y = np.array([np.nan if v is None else v for v in values])
        err = np.array([[v - c[0], c[1] - v] if c and v is not None else [0.0, 0.0] for v, c in zip(values, cis)]).T
        ax.errorbar(x, y, yerr=err, fmt=fmt, capsize=3, label=label)

    first = [next(r for r in rows if r.cut == cut) for cut in cuts]
    plot([r.linear_test_accuracy for r in first], [r.linear_test_ci for r in first], "linear probe", "o-")
    for recipe in recipes:
        cells = [_cell(rows, cut, recipe) for cut in cuts]
        plot([c.finetune_test_accuracy if c else None for c in cells], [c.finetune_test_ci if c else None
             for c in cells], f"trained: {recipe}", "s-")  # fmt: skip
    best = next(r for r in rows if r.best)
    ax.axvline(cuts.index(best.cut), color="grey", linestyle=":", label=f"best: {best.cut} / {best.recipe}")
    ax.set_xticks(list(x), cuts, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("cut (deeper to the right: more layers frozen)")
    ax.set_ylabel("test accuracy (bars: 95 % Wilson intervals)")
    ax.legend(fontsize=7, loc="lower right")


def format_depth_table(rows: list[DepthRow]) -> str:
    """Every cell (cut x what was trained): the linear probe's CV and test accuracy at the cut, the trained model's
    validation and test accuracy with 95 % intervals, its paired tests against the best cell, and the costs."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    def ci(value: list[float] | None) -> str:
        return "" if value is None else f"[{100 * value[0]:.1f},{100 * value[1]:.1f}]"

    def p(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    head = (f"   {'cut':<24} {'trained':<7} {'linear cv':>9} {'linear test':>11} {'tuned val':>9} {'95% CI':<13} {'p(val)':>6} "
            f"{'tuned test':>10} {'95% CI':<13} {'p(test)':>7} {'probe FLOPs':>11} {'tuned FLOPs':>11} "
            f"{'cache MiB':>9} {'train s':>8}")  # fmt: skip
    lines = [head]
    for r in rows:
        mark = ("*" if r.best else " ") + ("=" if r.cheapest else " ")
        lines.append(f"{mark} {r.cut[:24]:<24} {r.recipe:<7} {pct(r.linear_cv_accuracy):>9} "
                     f"{pct(r.linear_test_accuracy):>11} {pct(r.finetune_val_accuracy):>9} {ci(r.finetune_val_ci):<13} "
                     f"{p(r.p_val):>6} {pct(r.finetune_test_accuracy):>10} {ci(r.finetune_test_ci):<13} "
                     f"{p(r.p_test):>7} {_giga(r.linear_flops):>11} {_giga(r.finetune_flops):>11} "
                     f"{r.cache_bytes / 2**20:>9.2f} {r.train_seconds:>8.1f}")  # fmt: skip
    lines.append("* = best cell by validation accuracy (ties: lower validation cross-entropy); = the recommendation: the cheapest cell (deployed FLOPs; at equal "
                 "FLOPs the higher validation accuracy) as good as the best on validation (McNemar p >= 0.05 and inside its interval); "
                 "p(val), p(test): exact McNemar test of each cell against the best on the same images (Holm-adjusted "
                 "in depth.json).")  # fmt: skip
    return "\n".join(lines)


def _giga(flops: int | None) -> str:
    return "-" if flops is None else f"{flops / 1e9:.3f}G"
