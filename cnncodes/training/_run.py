"""``cnncodes.finetune``: train the top of a network above a cut on a store of cached activations."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fsutil import publish, write_text
from ..errors import FingerprintMismatchError, ParameterError, StoreError
from ..images import Preprocessing
from ..network import Backbone, list_taps, load_backbone
from ..probing import SweepConfig
from ..store import CodeStore
from ..sweeps import make_split
from ._feeds import CachedActivations
from ._finetune import FinetuneConfig, TrainResult, build_model, init_from_probe, train
from ._saved import save_finetuned

__all__ = ["FinetuneResult", "finetune", "backbone_of", "FINETUNE_FILES"]

#: The files ``finetune(out=...)`` writes, published together.
FINETUNE_FILES = ("finetune.json", "finetuned.zip")


@dataclass
class FinetuneResult:
    """A trained top: the model, where it was cut, its scores and the training record."""

    cut: str
    head: bool
    model: torch.nn.Module
    classes: list[str]
    val_accuracy: float
    test_accuracy: float | None
    best_epoch: int
    history: list[dict[str, float]]
    seconds: float
    config: dict[str, Any]
    path: Path | None = None  # the saved finetuned.zip, when ``out`` was given
    val_hits: np.ndarray | None = None  # per validation image: classified right (paired tests across cuts)
    test_hits: np.ndarray | None = None  # per test image
    recipe: str = "top"  # what was trained above the cut (FinetuneConfig.train)
    trained: list[str] = field(default_factory=list)  # the names of the parameters it trained
    val_loss: float | None = None  # mean cross-entropy on the validation images (plain views)

    def to_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "train": self.recipe, "head": self.head, "classes": self.classes,
                "val_accuracy": self.val_accuracy, "val_loss": self.val_loss, "test_accuracy": self.test_accuracy,
                "best_epoch": self.best_epoch,
                "history": self.history, "seconds": self.seconds, "config": self.config,
                "trainable_params": int(sum(p.numel() for n, p in self.model.named_parameters() if n in self.trained)),
                "trained_parameters": self.trained,
                "batch_norm": {"top": "batch statistics in training, running ones updated",
                               "head": None}.get(self.recipe, "running statistics, not updated")}  # fmt: skip


def backbone_of(store: CodeStore, weights: str | os.PathLike | None = None) -> Backbone:
    """The backbone that made a store's codes, rebuilt from its manifest and checked against its weights
    fingerprint."""
    model = store.manifest.get("model") or {}
    spec = model.get("spec")
    if not isinstance(spec, str) or spec.startswith("module:"):
        raise ParameterError(f"{store.path} was made from {spec or 'an unknown model'}; pass backbone=load_backbone("
                             "module, preprocessing=...) to train on it.")  # fmt: skip
    pre = Preprocessing.from_dict(model["preprocessing"])
    backbone = load_backbone(spec, weights=weights, input_size=pre.input_size)
    if backbone.fingerprint != model.get("fingerprint"):
        raise FingerprintMismatchError(f"the weights of {spec} now fingerprint {backbone.fingerprint[:19]}..., but "
                                       f"{store.path} was made with {str(model.get('fingerprint'))[:19]}...; give "
                                       "the same weights (--weights PATH).")  # fmt: skip
    return backbone


def finetune(
    store: CodeStore | str | os.PathLike,
    cut: str,
    *,
    out: str | os.PathLike | None = None,
    backbone: Backbone | None = None,
    weights: str | os.PathLike | None = None,
    config: FinetuneConfig | None = None,
    val_size: float = 0.2,
    test_size: float = 0.25,
    device: str = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """Train above ``cut`` on the store's cached activations at it: every layer, the first block, the norms and
    biases, or a small head (``config.train``, see :class:`FinetuneConfig`), with a new classifier.

    Parameters
    ----------
    store : CodeStore or path
        A store holding ``cut`` under pooling ``none`` with ``relu="never"`` (what the layers above the cut read),
        ideally with ``views`` seeded augmented views: epoch ``e`` reads view ``1 + e mod views``.
    cut : str
        The tap to cut at (see :func:`cnncodes.network.cut_points`).
    out : path, optional
        Directory for ``finetune.json`` (scores, history, settings) and ``finetuned.zip`` (the trained model, without
        pickle: see :func:`cnncodes.training.load_finetuned`).
    backbone : Backbone, optional
        The backbone that made the store (default: rebuilt from its manifest, fingerprint checked).
    config : FinetuneConfig, optional
    val_size, test_size : float
        The split: the same stratified, seeded held-out test images as ``cnncodes.sweep`` with that ``test_size`` and
        ``config.seed``; validation images (for early stopping) are drawn from the rest. The test split is scored
        once, at the end, with the weights chosen on validation.
    device : str, default="auto"
    progress : bool, default=True

    Returns
    -------
    FinetuneResult
    """
    store = store if isinstance(store, CodeStore) else CodeStore(store)
    if store.multilabel:
        raise ParameterError(f"{store.path} is multi-label (a CSV of cat;dog labels), but fine-tuning trains a "
                             "single-label classifier; probe it with cnncodes sweep, which scores one-vs-rest probes "
                             "by mAP.")  # fmt: skip
    config = config or FinetuneConfig()
    entry = next((a for a in store.arrays if a["tap"] == cut and a["pooling"] == "none"), None)
    if entry is None:
        have = sorted({a["tap"] for a in store.arrays if a["pooling"] == "none"})
        raise StoreError(f"{store.path} holds no unpooled activations of {cut!r} (pooling none): extract them with "
                         f"--taps {cut} --poolings none --relu never{' (it has: ' + ', '.join(have) + ')' if have else ''}.")  # fmt: skip
    if entry.get("relu_applied"):
        raise StoreError(f"{store.path}: the activations of {cut!r} were rectified by cnncodes (--relu auto), but the "
                         f"layers above the cut read them raw. Extract them with --relu never.")  # fmt: skip
    backbone = backbone or backbone_of(store, weights)
    catalogue = list_taps(backbone)
    if cut not in catalogue:
        raise ParameterError(f"{cut!r} is not a tap of {backbone.spec}.")
    shape = catalogue[cut].shape
    if int(np.prod(shape)) != int(entry["shape"][1]):
        raise StoreError(f"{store.path}: {cut!r} holds {entry['shape'][1]} values per row, but {backbone.spec} at "
                         f"{catalogue.input_size} px gives {shape}; the store was made at another input size.")  # fmt: skip
    model = build_model(backbone, cut, len(store.classes), config, catalogue)
    split = make_split(store, config=SweepConfig(val_size=val_size, test_size=test_size, seed=config.seed, folds=2))
    per = store.views + 1
    fit_rows, val_rows = split.folds[0]
    feed = CachedActivations(store.codes(cut, "none"), store.views, shape)
    labels, fit, val = np.asarray(store.labels)[::per], np.unique(fit_rows // per), np.unique(val_rows // per)
    if config.init == "probe":
        init_from_probe(model, feed, labels, fit, val, config.batch_size, device)
    result: TrainResult = train(model, feed, labels, fit=fit, val=val, test=np.unique(split.test_rows // per),
                                views=store.views, config=config, device=device, progress=progress)  # fmt: skip
    done = FinetuneResult(cut, config.head, result.model, store.classes, result.val_accuracy, result.test_accuracy,
                          result.best_epoch, result.history, result.seconds,
                          {**config.to_dict(), "val_size": val_size, "test_size": test_size, "store": str(store.path)},
                          val_hits=result.val_hits, test_hits=result.test_hits, recipe=config.train,
                          val_loss=result.val_loss,
                          trained=model.trained_parameters())  # fmt: skip
    if out is not None:
        done.path = publish_finetuned(done, backbone, out, (store.manifest.get("config") or {}).get("numerics"))
    return done


def publish_finetuned(done: FinetuneResult, backbone: Backbone, out: str | os.PathLike,
                      numerics: dict | None) -> Path:  # fmt: skip
    """``finetune.json`` and ``finetuned.zip`` written to ``out`` together (:func:`cnncodes._fsutil.publish`): a
    crash leaves both of the old run or both of the new one, never the record of one run beside another's model."""

    def write(folder: Path) -> Path:
        write_text(folder / "finetune.json", json.dumps(done.to_dict(), indent=1))
        return save_finetuned(done, backbone, folder / "finetuned.zip", numerics=numerics)

    return publish(out, write, owned=FINETUNE_FILES)
