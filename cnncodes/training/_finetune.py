"""Training the unfrozen top of a network on cached activations at a cut.

Everything below the cut is frozen, so its output is computed once into a store (``--poolings none --relu never``,
with ``--views K --seed S`` for augmentation) and epoch ``e`` reads augmented view ``1 + e mod K`` of every training
image. :func:`train` runs the same loop on any :class:`Activations` feed (see ``_feeds``: the cache, or the frozen
layers run live); given the same seeds both see the same numbers, which is what makes training on the cache *the
same* as freezing the layers.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import ParameterError
from ..network import Backbone, Layout, list_taps, parse_poolings, resolve_device, top_above

__all__ = [
    "RECIPES",
    "NORMS_LR_SCALE",
    "Activations",
    "FinetuneConfig",
    "HeadModel",
    "TopModel",
    "TrainResult",
    "accuracy",
    "build_model",
    "init_from_probe",
    "train",
]


#: What can be trained above a cut (:class:`FinetuneConfig` ``train``), from the most to the fewest parameters.
RECIPES = ("top", "block", "norms", "head")
#: Learning rate of the ``norms`` recipe's parameters relative to ``lr_pretrained``: BitFit trains biases and norm
#: scales at a rate about ten times that of full fine-tuning, since so few parameters move.
NORMS_LR_SCALE = 10.0


@dataclass(frozen=True)
class FinetuneConfig:
    """How the top is trained.

    Parameters
    ----------
    train : {"top", "block", "norms", "head"}, default="top"
        What is trained above the cut (:data:`RECIPES`). Always a new classifier; besides it, ``top``: every
        pretrained layer above the cut; ``block``: only the first block above it (surgical fine-tuning, Lee et al.,
        ICLR 2023), the layers above that block frozen but run; ``norms``: the normalization layers' affine
        parameters and every bias above the cut (BitFit, Ben Zaken et al. 2022), at ``NORMS_LR_SCALE`` times
        ``lr_pretrained``; ``head``: a small head on the cut's activation (global average pooling, a dense layer
        with ReLU and dropout, and a classifier: the classic recipe) instead of the pretrained layers. Frozen layers
        run in eval mode (batch norm on its running statistics, no dropout); trained ones in train mode, but for
        ``block`` and ``norms`` every batch norm keeps its running statistics (frozen batch norm, its affine
        parameters still trained by ``norms``): re-estimating the statistics of a few layers shifts the input of
        every frozen layer above them and of the probe-started classifier, which the few trained parameters could
        not follow (measured on digits at ``blocks.1.1.add``: ``norms`` reached validation 0.967 with frozen
        statistics, 0.867 without; its start was 0.956; docs/benchmarks.md).
    head : bool, default=False
        The same as ``train="head"`` (kept for earlier callers). After construction ``head`` is
        ``train == "head"``: to change the recipe of a config with :func:`dataclasses.replace`, give ``head=False``
        with the new ``train``.
    epochs : int, default=10
    batch_size : int, default=64
    lr : float, default=3e-3
        AdamW learning rate of the new layers (classifier, head).
    lr_pretrained : float, default=1e-3
        Learning rate of the pretrained layers above the cut (lower: they start from good weights).
    weight_decay : float, default=0.05
    label_smoothing : float, default=0.1
    patience : int, default=3
        Stop after this many epochs without a better validation accuracy; the best epoch's weights are kept.
    hidden : int, default=512
        Width of the head's dense layer.
    dropout : float, default=0.5
        Dropout before the head's classifier.
    seed : int, default=0
        Seeds the classifier's initial weights, the data order and dropout.
    init : {"probe", "random"}, default="probe"
        How the new classifier of the top starts: ``probe`` fits a logistic regression on the pretrained top's
        features first (C chosen on the validation images) and starts from it, then fine-tunes everything ("LP-FT",
        Kumar et al., ICLR 2022: fine-tuning from a trained head distorts the pretrained features less); ``random``
        starts from a seeded random classifier. The head (``head=True``) always starts random.
    """

    head: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    lr_pretrained: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    patience: int = 3
    hidden: int = 512
    dropout: float = 0.5
    seed: int = 0
    init: str = "probe"
    train: str = "top"

    def __post_init__(self) -> None:
        if self.train not in RECIPES:
            raise ParameterError(f"train={self.train!r}; use one of {', '.join(RECIPES)}.")
        if self.head and self.train not in ("top", "head"):
            raise ParameterError(f"head=True and train={self.train!r} disagree; give train='head' alone.")
        object.__setattr__(self, "train", "head" if self.head else self.train)  # one spelling of each recipe
        object.__setattr__(self, "head", self.train == "head")
        if self.init not in ("probe", "random"):
            raise ParameterError(f"init={self.init!r}; use 'probe' (start from a linear probe) or 'random'.")
        limits = {"epochs": (1, 100_000), "batch_size": (2, 65_536), "patience": (1, 100_000), "hidden": (1, 65_536)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                why = " (batch norm cannot train on batches of one)" if name == "batch_size" else ""
                raise ParameterError(f"{name}={value!r}; use an integer from {low} to {high}{why}.")
        for name in ("lr", "lr_pretrained"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 10):
                raise ParameterError(f"{name}={value!r}; use a learning rate in (0, 10], such as 1e-3.")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1):
            raise ParameterError(f"weight_decay={self.weight_decay!r}; use a number in [0, 1).")
        for name in ("label_smoothing", "dropout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ParameterError(f"{name}={value!r}; use a number in [0, 1).")
        if type(self.seed) is not int or not 0 <= self.seed < 2**32:
            raise ParameterError(f"seed={self.seed!r}; use an integer in [0, 2**32).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TopModel(nn.Module):
    """The pretrained layers above the cut (``body``) and a new linear classifier. ``recipe`` (see
    :class:`FinetuneConfig` ``train``) says which of the body's parameters train; ``block`` names the modules of the
    first block above the cut (for ``"block"``), ``norms`` the normalization layers above it (for ``"norms"``).
    Frozen parameters do not require gradients, and :meth:`train` leaves the frozen modules in eval mode, and, for
    ``block`` and ``norms``, every normalization layer that keeps running statistics (they are used, not updated;
    ``norms`` still trains their affine parameters). Layers a trace turned into functions (not modules) keep the
    mode they were traced in, eval, under every recipe."""

    def __init__(self, body: nn.Module, features: int, n_classes: int, recipe: str = "top",
                 block: tuple[str, ...] = (), norms: tuple[str, ...] = ()) -> None:  # fmt: skip
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(features, n_classes)
        self.recipe, self.block, self.norms = recipe, block, norms
        for name, param in self.body.named_parameters():
            param.requires_grad_(self._trains(name))

    def _in_block(self, name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in self.block)

    def _trains(self, name: str) -> bool:
        """Whether body parameter ``name`` trains under the recipe."""
        if self.recipe == "top":
            return True
        if self.recipe == "block":
            return self._in_block(name)
        owner, _, leaf = name.rpartition(".")
        return leaf == "bias" or owner in self.norms

    def _trained_modules(self) -> list[nn.Module]:
        """The body's modules put in train mode: all for ``top``, the block's, or the normalization layers (whose
        running statistics :meth:`train` then puts back in eval mode for ``block`` and ``norms``)."""
        if self.recipe == "top":
            return [self.body]
        if self.recipe == "block":
            return [m for name, m in self.body.named_modules() if self._in_block(name)]
        return [m for name, m in self.body.named_modules() if name in self.norms]

    def train(self, mode: bool = True) -> TopModel:
        super().train(mode)
        if mode and self.recipe != "top":
            self.body.eval()
            for module in self._trained_modules():
                module.train()
            for module in self.body.modules():  # every norm that keeps running statistics on them (FinetuneConfig)
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                    module.eval()
        return self

    def trained_parameters(self) -> list[str]:
        """Names of the parameters the recipe trains (the classifier's included)."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def param_groups(self, config: FinetuneConfig) -> list[dict[str, Any]]:
        scale = NORMS_LR_SCALE if self.recipe == "norms" else 1.0
        body = [p for p in self.body.parameters() if p.requires_grad]
        return [g for g in ({"params": body, "lr": config.lr_pretrained * scale},
                            {"params": list(self.classifier.parameters()), "lr": config.lr}) if g["params"]]  # fmt: skip


class HeadModel(nn.Module):
    """Global average pooling over the cut's layout, then dense (ReLU, dropout) and a classifier."""

    def __init__(self, layout: Layout, channels: int, n_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layout = layout
        self.pool = parse_poolings("avg")[0]
        self.dense = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.pool(x, self.layout))

    def param_groups(self, config: FinetuneConfig) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters()), "lr": config.lr}]

    def trained_parameters(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]


def build_model(backbone: Backbone, cut: str, n_classes: int, config: FinetuneConfig, catalogue=None) -> nn.Module:
    """The trainable model for a cut, its new layers initialised from ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.head:
            tap = (catalogue or list_taps(backbone))[cut]
            return HeadModel(tap.layout, tap.layout.channels(tap.shape), n_classes, config.hidden, config.dropout)
        top = top_above(backbone, cut, catalogue)
        model = TopModel(top.body, top.features, n_classes, config.train, top.block, top.norms)
        if config.train in ("block", "norms") and len(model.trained_parameters()) == 2 and any(top.body.parameters()):
            warnings.warn(f"train={config.train!r} finds nothing to train above {cut!r} but the classifier; the "
                          "row is a linear probe on the top's features.", UserWarning, stacklevel=2)  # fmt: skip
        return model


class Activations(Protocol):
    """Batches of activations at the cut: ``rows(images, view)`` for a list of image indices and one view."""

    def rows(self, images: np.ndarray, view: int) -> torch.Tensor: ...


def init_from_probe(model: nn.Module, feed: Activations, labels: np.ndarray, fit: np.ndarray, val: np.ndarray,
                    batch_size: int, device: str | torch.device = "cpu") -> float | None:  # fmt: skip
    """Start a :class:`TopModel`'s new classifier from a logistic regression on the pretrained top's features (plain
    views of ``fit``), with C chosen by accuracy on ``val``; returns that C (``None`` for other models)."""
    from ..probing import fit_paths

    if not isinstance(model, TopModel):
        return None
    dev = resolve_device(device)
    body = model.body.to(dev).eval()

    def features(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([body(feed.rows(images[lo : lo + batch_size], 0).to(dev)).float().cpu()
                              for lo in range(0, len(images), batch_size)]).numpy()  # fmt: skip

    X_fit, X_val = features(fit), features(val)
    y = np.asarray(labels)
    Cs = [float(c) for c in np.logspace(-3, 2, 6)]
    path = fit_paths([X_fit], [y[fit]], model.classifier.out_features, Cs, "multinomial")[0]
    scores = [float(((X_val @ w + b).argmax(1) == y[val]).mean()) for w, b in zip(path.coefs, path.intercepts)]
    best = int(np.argmax(scores))
    with torch.no_grad():
        model.classifier.weight.copy_(torch.as_tensor(path.coefs[best].T, dtype=torch.float32))
        model.classifier.bias.copy_(torch.as_tensor(path.intercepts[best], dtype=torch.float32))
    return Cs[best]


@dataclass
class TrainResult:
    """What :func:`train` did: the best model (by validation accuracy), its scores and each epoch's record.
    ``best_epoch`` is -1 when no epoch beat the starting weights."""

    model: nn.Module
    best_epoch: int
    val_accuracy: float
    test_accuracy: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    val_hits: np.ndarray | None = None  # per validation image, right or not (paired tests across cuts)
    test_hits: np.ndarray | None = None  # per test image, right or not
    val_loss: float | None = None  # mean cross-entropy of the kept weights on the validation images (plain views)


def train(
    model: nn.Module,
    feed: Activations,
    labels: np.ndarray,
    *,
    fit: np.ndarray,
    val: np.ndarray,
    test: np.ndarray | None,
    views: int,
    config: FinetuneConfig,
    device: str | torch.device = "cpu",
    steps: int | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` on ``feed`` (image indices ``fit``), early-stopped on ``val``, scored on ``test``.

    Epoch ``e`` reads view ``1 + e mod views`` of every training image (view 0 without views), in an order drawn from
    ``(seed, e)``; validation and test read view 0. AdamW with a cosine schedule over every step, cross-entropy with
    label smoothing. ``steps`` stops after that many optimizer steps (for equivalence checks).
    """
    dev = resolve_device(device)
    # channels_last on the CPU too: training steps above EfficientNet-Lite0 cuts at 96 px took 1.5x less time
    # (measured by hand on one batch, docs/benchmarks.md; not yet by a benchmarks/ script)
    model = model.to(dev, memory_format=torch.channels_last)
    labels_t = torch.tensor(np.asarray(labels), dtype=torch.long)
    per_epoch = -(-len(fit) // config.batch_size)
    optimizer = torch.optim.AdamW(model.param_groups(config), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * per_epoch))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    # The starting point competes too: a fine-tuning that never beats its start (a probe-initialised head) keeps it.
    best = (accuracy(model, feed, labels, val, config.batch_size, dev), -1, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    done_steps, start, since_best, best_trained = 0, time.perf_counter(), 0, -1.0
    rng = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        view = 1 + epoch % views if views else 0
        order = fit[
            torch.randperm(len(fit), generator=torch.Generator().manual_seed(config.seed * 1009 + epoch)).numpy()
        ]
        model.train()
        losses = []
        for lo in range(0, len(order), config.batch_size):
            images = order[lo : lo + config.batch_size]
            if len(images) < 2 <= len(order):  # a last batch of one image: batch norm cannot train on it
                continue
            x = feed.rows(images, view).to(dev, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.random.fork_rng(devices=[]), amp:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))  # dropout, reproducibly
                loss = loss_fn(model(x), labels_t[images].to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            done_steps += 1
            if steps is not None and done_steps >= steps:
                break
        val_acc = accuracy(model, feed, labels, val, config.batch_size, dev)
        history.append({"epoch": epoch, "view": view, "loss": float(np.mean(losses)), "val_accuracy": val_acc})
        if progress:
            print(f"  epoch {epoch}: loss {history[-1]['loss']:.4f}, validation accuracy {val_acc:.4f}")
        if val_acc > best[0]:
            best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
        # Patience counts against the best *trained* epoch: the first, high-rate epochs may fall below a probe start,
        # and stopping then would never let the decaying schedule recover.
        if val_acc > best_trained:
            best_trained, since_best = val_acc, 0
        else:
            since_best += 1
        if since_best >= config.patience or (steps is not None and done_steps >= steps):
            break
    model.load_state_dict(best[2])
    seconds = time.perf_counter() - start
    val_hits, val_loss = scored(model, feed, labels, val, config.batch_size, dev)
    test_hits = None if test is None or not len(test) else hits(model, feed, labels, test, config.batch_size, dev)
    test_acc = None if test_hits is None else float(test_hits.mean())
    return TrainResult(model, best[1], best[0], test_acc, history, seconds, val_hits, test_hits, val_loss)


def scored(model: nn.Module, feed: Activations, labels: np.ndarray, images: np.ndarray, batch: int,
           dev) -> tuple[np.ndarray, float | None]:  # fmt: skip
    """Per image of ``images``, whether the model classifies its plain view (view 0) right, in eval mode, and the
    mean cross-entropy of those predictions (no label smoothing; None without images)."""
    model.eval()
    out, nll = [], 0.0
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            part = images[lo : lo + batch]
            x = feed.rows(part, 0).to(dev)
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
            logits, truth = model(x).float(), np.asarray(labels)[part]
            nll += float(nn.functional.cross_entropy(logits, torch.as_tensor(truth, device=logits.device),
                                                     reduction="sum"))  # fmt: skip
            out.append(logits.argmax(1).cpu().numpy() == truth)
    right = np.concatenate(out) if out else np.zeros(0, dtype=bool)
    return right, (nll / len(right) if len(right) else None)


def hits(model: nn.Module, feed: Activations, labels: np.ndarray, images: np.ndarray, batch: int, dev) -> np.ndarray:
    """Per image of ``images``, whether the model classifies its plain view (view 0) right, in eval mode."""
    return scored(model, feed, labels, images, batch, dev)[0]


def accuracy(model: nn.Module, feed: Activations, labels: np.ndarray, images: np.ndarray, batch: int, dev) -> float:
    """Accuracy on the plain view (view 0) of ``images``, in eval mode."""
    right = hits(model, feed, labels, images, batch, dev)
    return float(right.sum()) / max(1, len(images))
