"""What choosing a tap costs when deployed: FLOPs, parameters that run and latency of the early-exit network.

A probe bundle computes its codes with a :class:`~cnncodes.network.CodeExtractor` restricted to its tap(s), which runs
the network only as far as the deepest of them. Every figure here is measured on exactly that network:

* **FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` (torch's convention: a multiply-add is 2 FLOPs,
  a convolution counts ``2 * C_in/groups * C_out * k_h * k_w * H_out * W_out`` per image, biases, norms, activations
  and poolings count 0) on one forward at batch 1. No per-layer table is written by hand, so a tap at the model's
  output costs exactly what FlopCounterMode says the whole model costs.
* **Parameters that run** are the parameter tensors that feed an aten op during that forward (matched by storage, so
  views such as a linear layer's transposed weight and parameters used functionally, a ViT's ``pos_embed`` or
  ``cls_token``, count), each counted once.
* **Latency** is the median wall time of that network's forward on random input (:func:`measure_latency`).

:func:`architecture_of` gives the network of a stored model spec with random weights, so costs can be counted offline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ..errors import BackboneError, ParameterError
from ._backbones import DEFAULT_MODEL, Backbone, _parse_spec, _torchvision_enum, load_backbone
from ._extractor import CodeExtractor
from ._taps import TapCatalogue, _one_cpu_thread, list_taps

__all__ = ["TapCost", "LatencyTimes", "tap_costs", "forward_flops", "measure_latency", "architecture_of"]


@dataclass(frozen=True)
class TapCost:
    """What one candidate costs per image when a bundle computes its codes.

    Attributes
    ----------
    taps : tuple of str
        One tap, or the parts of a joined candidate (all computed in one forward).
    flops : int
        Forward FLOPs per image up to the deepest of ``taps`` (FlopCounterMode on the early-exit network, batch 1, at
        the backbone's input size).
    params : int
        Elements of the parameters that run in that forward (those that feed an op), each parameter counted once.
    """

    taps: tuple[str, ...]
    flops: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"taps": [...], "flops": int, "params": int}``."""
        return {"taps": list(self.taps), "flops": int(self.flops), "params": int(self.params)}


class LatencyTimes(dict):
    """``{taps: {batch size: per-image milliseconds}}``, plus what was measured to get there.

    Attributes
    ----------
    repeats : dict
        ``{taps: {batch size: timed runs}}`` (after one warm-up run each): fewer than asked where the budget ran out.
    seconds : float
        Wall time of the whole measurement, warm-ups and copies included.
    budget_s : float
        The budget it was given.
    """

    def __init__(self, times: dict, repeats: dict, seconds: float, budget_s: float) -> None:
        super().__init__(times)
        self.repeats = repeats
        self.seconds = seconds
        self.budget_s = budget_s


class _ParameterUse(TorchDispatchMode):
    """Record the storages of every tensor that an aten op receives."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        for a in flat:
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                self.storages.add(a.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def _entries(taps: Sequence[str | Sequence[str]]) -> list[tuple[str, ...]]:
    if isinstance(taps, str):
        raise ParameterError(
            f"taps={taps!r} is one string; pass a list of candidates, e.g. [{taps!r}] or [['layer3', 'layer4']] "
            "for a joined one (tap names: see `cnncodes layers MODEL`)."
        )
    out = []
    for entry in taps:
        parts = (entry,) if isinstance(entry, str) else tuple(entry)
        if not parts or not all(isinstance(p, str) and p for p in parts):
            raise ParameterError(f"candidate {entry!r} must be a tap name or a non-empty sequence of tap names.")
        out.append(parts)
    if not out:
        raise ParameterError("no candidates given; pass tap names, e.g. catalogue.names or [t.name for t in taps].")
    return out


def _extractor(backbone: Backbone, catalogue: TapCatalogue, entry: tuple[str, ...], pooling: str) -> CodeExtractor:
    for name in entry:
        catalogue[name]  # an unknown name raises TapSelectionError with close matches
    return CodeExtractor(backbone, list(entry), [pooling], relu="auto", catalogue=catalogue)


class _KeepModel:
    """Restore every module's training flag and every parameter's requires_grad on exit: building an extractor puts
    the shared modules in eval mode, and the caller's model must be left as found."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = [(m, m.training) for m in self.model.modules()]
        self.grad = [(p, p.requires_grad) for p in self.model.parameters()]

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.training:
            m.training = flag
        for p, flag in self.grad:
            p.requires_grad_(flag)


def _runnable(extractor: CodeExtractor, backbone: Backbone, device: torch.device) -> nn.Module:
    """The extractor's network on ``device``: the shared one when the model is there already (no copy), else the
    extractor's own channels_last copy."""
    first = next(iter(backbone.model.parameters()), None)
    if first is None or first.device == device:
        return extractor.net
    return extractor.on(device)


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def tap_costs(
    backbone: Backbone,
    taps: Sequence[str | Sequence[str]],
    *,
    pooling: str = "avg",
    device: torch.device | str = "cpu",
) -> dict[tuple[str, ...], TapCost]:
    """FLOPs and parameters that run, per image, for the early-exit network of each candidate.

    Parameters
    ----------
    backbone : Backbone
        Left as found (device, training mode, requires_grad).
    taps : sequence of str or of sequences of str
        Candidates: a tap name, or the parts of a joined candidate (their costs are those of the deepest part).
    pooling : str, default="avg"
        The pooling the extractor applies (it must suit every tap; poolings count 0 FLOPs).
    device : str or torch.device, default="cpu"
        Where the forward runs; a model elsewhere is copied there, never moved.

    Returns
    -------
    dict of tuple of str to TapCost
        Keyed by each candidate as a tuple, in the order given.

    Examples
    --------
    >>> costs = tap_costs(backbone, ["layer3", ("layer3", "layer4")])  # doctest: +SKIP
    >>> costs[("layer3",)].flops  # doctest: +SKIP
    """
    entries = _entries(taps)
    dev = _device(device)
    model = backbone.model
    size = backbone.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen).to(dev)
    out: dict[tuple[str, ...], TapCost] = {}
    with _KeepModel(model):
        catalogue = list_taps(backbone)
        for entry in entries:
            extractor = _extractor(backbone, catalogue, entry, pooling)
            net = _runnable(extractor, backbone, dev)
            params = {p.untyped_storage().data_ptr(): p.numel() for p in net.parameters() if p.numel()}
            counter, use = FlopCounterMode(display=False), _ParameterUse()
            with torch.inference_mode(), _one_cpu_thread(dev), counter, use:
                net(x)
            used = sum(n for ptr, n in params.items() if ptr in use.storages)
            out[entry] = TapCost(taps=entry, flops=int(counter.get_total_flops()), params=int(used))
    return out


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of ``model`` on ``x`` (all of ``x``'s batch), counted by FlopCounterMode.

    The convention of :func:`tap_costs`, for a whole module (a fine-tuned top, say). Runs under
    ``torch.inference_mode``; every module's training flag and every parameter's requires_grad are restored after.
    """
    counter = FlopCounterMode(display=False)
    with _KeepModel(model):
        model.eval()
        with torch.inference_mode(), _one_cpu_thread(x.device), counter:
            model(x)
    return int(counter.get_total_flops())


def measure_latency(
    backbone: Backbone,
    taps: Sequence[str | Sequence[str]],
    *,
    pooling: str = "avg",
    batch_sizes: Sequence[int] = (1, 64),
    device: torch.device | str = "cpu",
    repeats: int = 3,
    budget_s: float = 30.0,
) -> LatencyTimes:
    """Per-image milliseconds of each candidate's early-exit network, per batch size.

    This is the network's share of a bundle's prediction time: decoding and resizing images cost the same for every
    tap, and the probe's matrix product (codes times coefficients) is the caller's to add. Each (candidate, batch
    size) runs once to warm up, then ``repeats`` times on seeded random input of the preprocessing's input size,
    channels_last on ``device`` as extraction runs it (``extractor.on(device)``), under ``torch.inference_mode`` in
    float32; CUDA is synchronized around every run. The figure is the median run time divided by the batch size.

    Parameters
    ----------
    backbone : Backbone
        Left as found (the timed network is the extractor's own copy).
    taps : sequence of str or of sequences of str
        Candidates, as for :func:`tap_costs`.
    pooling : str, default="avg"
    batch_sizes : sequence of int, default=(1, 64)
    device : str or torch.device, default="cpu"
    repeats : int, default=3
        Timed runs per (candidate, batch size).
    budget_s : float, default=30.0
        A bound on the whole measurement: each cell gets an equal share of what is left, and runs fewer repeats (at
        least 1) when its warm-up shows that ``repeats`` would not fit. The warm-up and one run per cell always happen,
        so a very small budget can be exceeded by them. ``repeats`` and ``seconds`` on the result say what was done.

    Returns
    -------
    LatencyTimes
        ``{candidate tuple: {batch size: per-image ms}}``, every candidate and batch size present.
    """
    entries = _entries(taps)
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ParameterError(f"batch_sizes={tuple(batch_sizes)!r}; use positive integers, e.g. (1, 64).")
    if type(repeats) is not int or repeats < 1:
        raise ParameterError(f"repeats={repeats!r}; use a positive integer (3 gives a median of three runs).")
    if not budget_s > 0:
        raise ParameterError(f"budget_s={budget_s!r}; use a positive number of seconds, e.g. 30.")
    dev = _device(device)
    size = backbone.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    inputs = {
        b: torch.randn(b, 3, size, size, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
        for b in sizes
    }

    def timed(net: nn.Module, x: torch.Tensor) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    started = time.perf_counter()
    times: dict[tuple[str, ...], dict[int, float]] = {}
    done: dict[tuple[str, ...], dict[int, int]] = {}
    cells_left = len(entries) * len(sizes)
    with _KeepModel(backbone.model):
        catalogue = list_taps(backbone)
        for entry in entries:
            net = _extractor(backbone, catalogue, entry, pooling).on(dev)
            times[entry], done[entry] = {}, {}
            for b in sizes:
                share = (budget_s - (time.perf_counter() - started)) / cells_left
                with torch.inference_mode():
                    warm = timed(net, inputs[b])
                    n = max(1, min(repeats, int((share - warm) / max(warm, 1e-9))))
                    runs = [timed(net, inputs[b]) for _ in range(n)]
                times[entry][b] = statistics.median(runs) / b * 1000.0
                done[entry][b] = n
                cells_left -= 1
    return LatencyTimes(times, done, time.perf_counter() - started, float(budget_s))


def architecture_of(spec: str, input_size: int | None = None) -> Backbone | None:
    """The network of a store's or bundle's model spec, with random weights, for counting costs offline.

    Nothing is downloaded and no network is touched: ``resnet50``, ``resnet50:IMAGENET1K_V2`` and
    ``ResNet50_Weights.IMAGENET1K_V2`` build ``resnet50:none`` (at the input size of the weights the spec names, read
    from torchvision's enum, unless ``input_size`` is given); ``timm:NAME``, ``timm:NAME.TAG`` build
    ``timm:NAME[.TAG]:none`` (the tag keeps its pretrained config: input size, classes); ``efficientnet_lite0`` is the
    embedded model, already offline (its real weights). Random weights are seeded, so the same spec gives the same
    network.

    Returns None where the architecture cannot be known offline:

    * ``module:NAME``: a user's Python module, which only the user can build;
    * ``timm:hf-hub:ORG/NAME`` outside the ``timm`` organisation, or naming a model timm does not know: the
      architecture and its arguments live in the hub repository's config.json, which may need a download
      (``timm:hf-hub:timm/NAME`` builds ``timm:NAME:none``).

    Parameters
    ----------
    spec : str
        A model spec as :func:`~cnncodes.network.load_backbone` reads it (a bundle's or store's ``model.spec``).
    input_size : int, optional
        The input size to build for (a bundle's preprocessing input size); default: the spec's own.

    Raises
    ------
    BackboneError
        The spec is malformed or names an unknown model.
    """
    text = str(spec).strip()
    if text.startswith("module:"):
        return None
    family, name, weights = _parse_spec(text)
    if family == "embedded":
        return load_backbone(DEFAULT_MODEL, input_size=input_size)
    if family == "timm":
        if name.startswith("hf-hub:"):
            org, _, repo = name[len("hf-hub:") :].partition("/")
            import timm

            repo = repo.split("@")[0]
            if org != "timm" or not timm.list_models(repo.split(".")[0]):
                return None
            name = repo
        return load_backbone(f"timm:{name}:none", input_size=input_size)
    if "_Weights." in name:
        name, member = _torchvision_enum(name)
        weights = member.name if weights is None else weights
    size = input_size or _torchvision_size(name, weights)
    return load_backbone(f"{name}:none", input_size=size)


def _torchvision_size(name: str, weights: str | None) -> int | None:
    """The crop size of the torchvision weights a spec names (None for ``none`` or unknown names: the default)."""
    import torchvision

    if (weights or "").lower() == "none" or name not in torchvision.models.list_models():
        return None
    if weights and "_Weights." in weights:
        weights = _torchvision_enum(weights)[1].name
    enum = torchvision.models.get_model_weights(name)
    try:
        member = enum.DEFAULT if weights in (None, "DEFAULT") else enum[weights]
    except KeyError:
        raise BackboneError(
            f"{name!r} has no weights {weights!r}; available: {[w.name for w in enum]} plus 'DEFAULT' and 'none'."
        ) from None
    return int(member.transforms().crop_size[0])
