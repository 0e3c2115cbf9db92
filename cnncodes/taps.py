"""The tap catalogue: every place a CNN code can be taken from, in forward order, and how to select some.

A tap is a node of the network's forward graph whose output is a feature map (B, C, H, W) or a vector (B, C).
:func:`list_taps` runs the network once on a probe batch to learn each tap's shape, whether it is *post-activation*
(the output of an activation such as ReLU/ReLU6/SiLU, or of a norm+act block) and whether it is *rectified*
(never negative, so ReLU is a no-op). CNN codes are rectified: taps that are not get a ReLU at extraction time unless
the user asks for raw values, and :class:`TapInfo` makes that visible.

Selections (:meth:`TapCatalogue.select`): explicit names, ``stages`` (the last rectified tap of each resolution stage of
the main path), ``rectified`` (every rectified main-path tap), ``all`` (every tap) and ``last:K`` (the deepest K stages).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import _graph
from .backbones import Backbone
from .pooling import Pooling, parse_poolings

__all__ = ["TapInfo", "TapCatalogue", "TapSelectionError", "list_taps"]

_ACTIVATIONS = {
    "relu", "relu6", "relu_", "silu", "gelu", "hardswish", "hardsigmoid", "mish", "leaky_relu", "elu", "selu",
    "celu", "prelu", "hardtanh", "swish", "softplus", "sigmoid", "tanh", "quickgelu", "gelutanh",
}  # fmt: skip
_SKIPPED = ("Identity", "Dropout", "Dropout2d", "DropPath", "DropBlock2d", "Flatten")


class TapSelectionError(ValueError):
    """A tap selection names an unknown tap or an impossible range."""


@dataclass(frozen=True)
class TapInfo:
    """One candidate tap.

    Attributes
    ----------
    name : str
        Graph node name (``layer3.1.relu_1``, ``blocks.5.0.bn1``); the ``--layers`` value.
    index : int
        Position in forward order.
    op : str
        What produces the output (module class or function name).
    shape : tuple of int
        Output shape per image: (C, H, W) or (C,).
    post_activation : bool
        The output of an activation (or a norm+activation block).
    rectified : bool
        Non-negative on the probe batch, i.e. already rectified by the network; ReLU changes nothing.
    main_path : bool
        On the network's main path (not a side branch such as a squeeze-excitation gate).
    stage : int or None
        Index of the resolution stage (0 = highest resolution) for main-path feature maps.
    """

    name: str
    index: int
    op: str
    shape: tuple[int, ...]
    post_activation: bool
    rectified: bool
    main_path: bool
    stage: int | None

    def code_dims(self, pooling: Pooling | str) -> int:
        """Length of the code this tap gives with ``pooling``."""
        pooling = parse_poolings([pooling])[0] if isinstance(pooling, str) else pooling
        return pooling.dims(self.shape)

    def bytes_per_image(self, pooling: Pooling | str, dtype: str = "float16") -> int:
        """Storage per image and view for ``pooling`` at ``dtype``."""
        return self.code_dims(pooling) * torch.finfo(getattr(torch, dtype)).bits // 8


class TapCatalogue(Sequence[TapInfo]):
    """All taps of a backbone at one input size, in forward order.

    Attributes
    ----------
    taps : list of TapInfo
    mode : {"fx", "hooks"}
        How the network is cut: FX graph pruning, or forward hooks when the model cannot be traced.
    input_size : int
    stage_taps : list of TapInfo
        The ``stages`` selection.
    """

    def __init__(self, taps: list[TapInfo], mode: str, input_size: int) -> None:
        self.taps = taps
        self.mode = mode
        self.input_size = input_size
        self._by_name = {t.name: t for t in taps}
        self.stage_taps = _stage_taps(taps)

    def __len__(self) -> int:
        return len(self.taps)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._lookup(key)
        return self.taps[key]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.taps]

    def _lookup(self, name: str) -> TapInfo:
        if name not in self._by_name:
            close = difflib.get_close_matches(name, self.names, n=5, cutoff=0.5)
            raise TapSelectionError(
                f"unknown tap {name!r}. Close matches: {close or 'none'}. List the taps with "
                "`cnncodes layers MODEL` (Python: cnncodes.list_taps(backbone)); keywords: stages, rectified, all, last:K."
            )
        return self._by_name[name]

    def select(self, layers: str | Iterable[str]) -> list[TapInfo]:
        """Resolve a selection into taps in forward order (duplicates removed).

        Parameters
        ----------
        layers : str or iterable of str
            Comma-separated or listed items; each is a tap name or one of ``stages``, ``rectified``, ``all``,
            ``last:K``.
        """
        items = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else [str(s).strip() for s in layers]
        items = [s for s in items if s]
        if not items:
            raise TapSelectionError("no taps selected; use e.g. --layers stages (see `cnncodes layers MODEL`).")
        chosen: dict[str, TapInfo] = {}
        for item in items:
            for tap in self._expand(item):
                chosen[tap.name] = tap
        return sorted(chosen.values(), key=lambda t: t.index)

    def _expand(self, item: str) -> list[TapInfo]:
        if item == "stages":
            return list(self.stage_taps)
        if item == "all":
            return list(self.taps)
        if item == "rectified":
            return [t for t in self.taps if t.rectified and t.main_path]
        if item.startswith("last:"):
            n_stages = len(self.stage_taps)
            try:
                k = int(item[5:])
            except ValueError:
                k = -1
            if not 1 <= k <= n_stages:
                raise TapSelectionError(f"{item!r} is out of range: K must be 1 to {n_stages} (the number of stages).")
            return list(self.stage_taps[-k:])
        return [self._lookup(item)]

    def to_records(self, poolings: Sequence[Pooling | str] = ("avg",), dtype: str = "float16") -> list[dict[str, Any]]:
        """One JSON-ready dict per tap, with code dims and bytes per image for each pooling."""
        pools = parse_poolings(list(poolings))
        stage_names = {t.name for t in self.stage_taps}
        return [
            {
                **asdict(t),
                "shape": list(t.shape),
                "stage_tap": t.name in stage_names,
                "dims": {p.name: t.code_dims(p) for p in pools},
                "bytes_per_image": {p.name: t.bytes_per_image(p, dtype) for p in pools},
            }
            for t in self.taps
        ]


def _is_activation(op: str, module: nn.Module | None) -> bool:
    if op.lower() in _ACTIVATIONS:
        return True
    act = getattr(module, "act", None) if module is not None else None
    return isinstance(act, nn.Module) and type(act).__name__.lower() in _ACTIVATIONS


def _stage_taps(taps: list[TapInfo]) -> list[TapInfo]:
    stages: dict[int, list[TapInfo]] = {}
    for t in taps:
        if t.stage is not None:
            stages.setdefault(t.stage, []).append(t)
    picked = []
    for members in stages.values():
        # Prefer what the network rectified itself; else its last activation; else the stage output.
        for pool in ([t for t in members if t.rectified], [t for t in members if t.post_activation], members):
            if pool:
                picked.append(pool[-1])
                break
    return picked


class _Probe(nn.Module):
    """Discovery head: records shape and sign of an activation right where it is produced."""

    def __init__(self) -> None:
        super().__init__()
        self.shape: tuple[int, ...] | None = None
        self.minimum = 0.0

    def forward(self, x: object) -> None:
        if isinstance(x, torch.Tensor) and x.ndim in (2, 4) and x.is_floating_point():
            self.shape = tuple(x.shape[1:])
            self.minimum = float(x.amin())


def _probe_input(size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=gen)


def list_taps(backbone: Backbone | nn.Module, input_size: int | None = None, mode: str = "auto") -> TapCatalogue:
    """Discover the taps of a backbone.

    Parameters
    ----------
    backbone : Backbone or nn.Module
    input_size : int, optional
        Defaults to the backbone's preprocessing input size (224 for a bare module).
    mode : {"auto", "fx", "hooks"}
        ``auto`` uses FX tracing and falls back to hooks when the model cannot be traced.

    Returns
    -------
    TapCatalogue
    """
    if mode not in ("auto", "fx", "hooks"):
        raise ValueError(f"mode={mode!r}; use 'auto', 'fx' or 'hooks'.")
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    size = int(input_size or (backbone.preprocessing.input_size if isinstance(backbone, Backbone) else 224))
    x = _probe_input(size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if mode in ("auto", "fx"):
                try:
                    raw = _discover_fx(model, x)
                    return TapCatalogue(_finish(raw), "fx", size)
                except Exception:  # tracing fails in many ways on dynamic models
                    if mode == "fx":
                        raise
            return TapCatalogue(_finish(_discover_hooks(model, x)), "hooks", size)
    finally:
        model.train(was_training)


def _discover_fx(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, bool, tuple[int, ...], bool]]:
    names = _graph.fx_node_names(model)
    probes = {n: _Probe() for n in names}
    gm = _graph.tapped_fx(model, probes)
    gm(x)
    ops = _graph.tapped_ops(gm)
    raw = []
    for name in names:
        op, module = ops[name]
        probe = probes[name]
        if probe.shape is None or op in _SKIPPED:
            continue
        raw.append((name, op, _is_activation(op, module), probe.shape, probe.minimum >= 0))
    return raw


def _discover_hooks(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, bool, tuple[int, ...], bool]]:
    raw = []

    def record(name: str, module: nn.Module, output: object) -> None:
        op = type(module).__name__
        if isinstance(output, torch.Tensor) and output.ndim in (2, 4) and output.is_floating_point() and op not in _SKIPPED:
            raw.append((name, op, _is_activation(op, module), tuple(output.shape[1:]), float(output.amin()) >= 0))

    _graph.hook_call_order(model, x, record)
    return raw


def _finish(raw: list[tuple[str, str, bool, tuple[int, ...], bool]]) -> list[TapInfo]:
    # Main path: resolution never increases along it, so a map smaller than some later map is a side branch
    # (e.g. a squeeze-excitation gate at 1x1 inside a 14x14 stage).
    areas = [shape[1] * shape[2] if len(shape) == 3 else 0 for (_, _, _, shape, _) in raw]
    later_max = [0] * len(raw)
    running = 0
    for i in range(len(raw) - 1, -1, -1):
        later_max[i] = running
        running = max(running, areas[i])
    stage_of_area: dict[int, int] = {}
    taps = []
    for i, (name, op, post_act, shape, nonneg) in enumerate(raw):
        main = len(shape) == 3 and areas[i] >= later_max[i]
        # A global pool's 1x1 output is the previous stage with avg pooling, not a stage of its own.
        is_global_pool = areas[i] == 1 and ("pool" in op.lower() or op == "mean")
        stage = stage_of_area.setdefault(areas[i], len(stage_of_area)) if main and not is_global_pool else None
        taps.append(TapInfo(name, i, op, shape, post_act, nonneg, main, stage))
    return taps
