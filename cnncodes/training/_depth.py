"""``cnncodes depth``: how many layers to freeze, measured. For each cut: a linear probe on its pooled codes and the
layers above it fine-tuned on its cached activations, on the same held-out test split, with what each cut costs."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._figures import new_figure
from ..errors import ParameterError
from ..extraction import extract
from ..images import open_source
from ..network import Backbone, cut_points, list_taps, load_backbone
from ..store import CodeStore
from ..sweeps import sweep
from ._finetune import FinetuneConfig
from ._run import backbone_of, finetune

__all__ = ["DepthRow", "depth", "depth_of_stores", "format_depth_table", "write_depth_report"]


@dataclass
class DepthRow:
    """One cut: its position, the linear probe's and the fine-tuned top's scores, and the cost."""

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
    test_size: float = 0.25,
    val_size: float = 0.2,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> list[DepthRow]:
    """For each cut: extract its raw activations (cache, ``none``) and pooled codes (``avg``) once, with ``views``
    seeded augmented views (``augment``: crop, flip, color; drop flip for images whose mirror means something else,
    such as digits); sweep linear probes on the pooled codes; fine-tune the layers above the cut on the cache.

    Every cut is scored on the same held-out test images (the sweep's stratified split for ``test_size`` and
    ``seed``); the fine-tuned top is chosen on validation images only. The best cut is the one with the highest
    fine-tuned validation accuracy. Stores go to ``out/cuts/<cut>/``: a rerun reuses them (and
    :func:`depth_of_stores` runs the same comparison over stores extracted by hand).
    """
    config = config or FinetuneConfig(seed=seed)
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
    stores, seconds = [], []
    for name in names:
        if progress:
            print(f"cut {name}:")
        start = time.perf_counter()
        stores.append(extract(source, out=Path(out) / "cuts" / name.replace("/", "_"), model=backbone, taps=[name],
                              poolings="none,avg", relu="never", views=views, seed=seed, augment=augment, batch_size=batch_size,
                              device=device, progress=progress))  # fmt: skip
        seconds.append(time.perf_counter() - start)
    return depth_of_stores(stores, out=out, backbone=backbone, config=config, test_size=test_size, val_size=val_size,
                           device=device, progress=progress, extract_seconds=seconds)  # fmt: skip


def depth_of_stores(
    stores: Sequence[CodeStore | str | os.PathLike],
    *,
    out: str | os.PathLike,
    backbone: Backbone | None = None,
    weights: str | os.PathLike | None = None,
    config: FinetuneConfig | None = None,
    test_size: float = 0.25,
    val_size: float = 0.2,
    device: str = "auto",
    progress: bool = True,
    extract_seconds: Sequence[float] | None = None,
) -> list[DepthRow]:
    """The freeze-depth sweep over stores already extracted: one cut per store, whose raw activations (``none``,
    ``relu="never"``) are the cache and whose pooled arrays of the same tap feed the linear probe. The stores must hold
    the same images (their sources are compared) from one backbone."""
    opened = [s if isinstance(s, CodeStore) else CodeStore(s) for s in stores]
    config = config or FinetuneConfig()
    if any(store.multilabel for store in opened):
        raise ParameterError("the depth sweep fine-tunes single-label classifiers, but these stores are multi-label "
                             "(a CSV of cat;dog labels); probe them with cnncodes sweep instead.")  # fmt: skip
    for store in opened[1:]:
        if store.sources != opened[0].sources or store.manifest.get("model") != opened[0].manifest.get("model"):
            raise ParameterError(f"{store.path} holds other images or another model than {opened[0].path}; a depth "
                                 "sweep compares cuts of one backbone on one set of images.")  # fmt: skip
    cut_of = [tuple(a["tap"] for a in store.arrays if a["pooling"] == "none") for store in opened]
    repeated = sorted({c for c in cut_of if len(c) == 1 and cut_of.count(c) > 1})
    if repeated:
        raise ParameterError(f"several stores hold the cut {repeated[0][0]!r}; give one store per cut.")
    backbone = backbone or backbone_of(opened[0], weights)
    catalogue = list_taps(backbone)
    rows = []
    for i, store in enumerate(opened):
        caches = [a for a in store.arrays if a["pooling"] == "none"]
        if len(caches) != 1:
            raise ParameterError(f"{store.path} holds {len(caches)} unpooled arrays; a depth store holds one cut: "
                                 "extract it with --taps CUT --poolings none,avg --relu never.")  # fmt: skip
        name = caches[0]["tap"]
        pooled = [p for t, p in store.keys() if t == name and p != "none"]
        if not pooled:
            raise ParameterError(f"{store.path} has no pooled codes of {name!r} for the linear probe; extract it with "
                                 "--poolings none,avg.")  # fmt: skip
        if progress:
            print(f"cut {name}: linear probe on {', '.join(pooled)}, then the layers above it")
        linear = sweep(store, taps=[name], poolings=pooled, probes=["logreg"], test_size=test_size, seed=config.seed,
                       progress=False)  # fmt: skip
        tuned = finetune(store, name, backbone=backbone, config=config, val_size=val_size, test_size=test_size,
                         device=device, progress=progress)  # fmt: skip
        rows.append(DepthRow(name, catalogue[name].index, linear.best.cv_accuracy, linear.best.test_accuracy,
                             tuned.val_accuracy, tuned.test_accuracy, (store.path / caches[0]["file"]).stat().st_size,
                             float("nan") if extract_seconds is None else extract_seconds[i], tuned.seconds))  # fmt: skip
    rows.sort(key=lambda r: r.depth)
    max(rows, key=lambda r: r.finetune_val_accuracy).best = True
    write_depth_report(rows, out)
    return rows


def write_depth_report(rows: list[DepthRow], out: str | os.PathLike) -> dict[str, Path]:
    """``depth.csv``, ``depth.json`` and ``depth.png`` (accuracy against cut depth, both methods, best cut marked)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "depth.csv", "json": out / "depth.json", "plot": out / "depth.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    paths["json"].write_text(json.dumps([asdict(r) for r in rows], indent=1))
    fig, ax = new_figure(8, 4.5)
    x = range(len(rows))
    ax.plot(x, [r.linear_test_accuracy for r in rows], "o-", label="linear probe (frozen up to the cut)")
    ax.plot(x, [r.finetune_test_accuracy or 0.0 for r in rows], "s-", label="layers above the cut fine-tuned")
    best = next(i for i, r in enumerate(rows) if r.best)
    ax.axvline(best, color="grey", linestyle=":", label=f"best cut (validation): {rows[best].cut}")
    ax.set_xticks(list(x), [r.cut for r in rows], rotation=30, ha="right")
    ax.set_xlabel("cut (deeper to the right: more layers frozen)")
    ax.set_ylabel("test accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    return paths


def format_depth_table(rows: list[DepthRow]) -> str:
    lines = [f"  {'cut':<28} {'linear cv':>9} {'linear test':>11} {'tuned val':>9} {'tuned test':>10} "
             f"{'cache MiB':>9} {'extract s':>9} {'train s':>8}"]  # fmt: skip
    for r in rows:
        test = "-" if r.finetune_test_accuracy is None else f"{r.finetune_test_accuracy:.4f}"
        lines.append(f"{'*' if r.best else ' '} {r.cut:<28} {r.linear_cv_accuracy:>9.4f} {r.linear_test_accuracy:>11.4f} "
                     f"{r.finetune_val_accuracy:>9.4f} {test:>10} {r.cache_bytes / 2**20:>9.2f} "
                     f"{'-' if r.extract_seconds != r.extract_seconds else f'{r.extract_seconds:.1f}':>9} "
                     f"{r.train_seconds:>8.1f}")  # fmt: skip
    return "\n".join(lines)
