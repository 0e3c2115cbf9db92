"""The tap catalogue: every place a CNN code can be taken from, in forward order, and how to select some.

A tap is a node of the network's forward graph whose output is a spatial map (channels-first or channels-last), a token
sequence or a vector (see :class:`~cnncodes.layout.Layout`). :func:`list_taps` traces the network, runs it once on a
probe batch and learns, for every tap:

* its **layout**, followed through the graph from the input image (permutes, flattens, reshapes, class-token concats,
  LayerNorm/Linear over the last axis), never guessed from which axis is largest;
* whether the network **thresholds** it: the tap is the output of a ReLU-family activation (ReLU, ReLU6) or the network
  feeds it to one. ``relu="auto"`` rectifies exactly those taps, as the classical recipe says (rectify codes that were
  thresholded during training) and keeps raw values elsewhere (GELU/SiLU outputs, residual streams, norms, logits);
* whether it lies on the **main path**: every path from the input to the output passes through it (a residual branch's
  inside or a squeeze-excitation gate does not).

Selections (:meth:`TapCatalogue.select`): names; ``stages`` (the model's own stage outputs: timm's ``feature_info`` where
the model declares it; else the output of each resolution stage on the main path, after the residual add and its
activation; for transformers, evenly spaced block outputs; always plus the post-activation outputs of hidden fully
connected layers, AlexNet's and VGG's fc6/fc7); ``expanded`` (the last activation output at each resolution, the
expanded point of an inverted-residual block; in transformers each block's MLP activation); ``rectified`` (every tap
the network thresholds); ``all``; ``last:K`` (the deepest K stage taps).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from ..errors import ParameterError, PoolingError, TapSelectionError
from . import _graph
from ._backbones import Backbone
from ._layout import AxisLabels, Layout, function_labels, generic_labels, module_labels
from ._pooling import Pooling, parse_poolings

__all__ = ["RELU_MODES", "TapCatalogue", "TapInfo", "check_relu_mode", "list_taps"]

_ACTIVATIONS = {
    "relu", "relu6", "relu_", "silu", "gelu", "hardswish", "hardsigmoid", "mish", "leaky_relu", "elu", "selu",
    "celu", "prelu", "hardtanh", "swish", "softplus", "quickgelu", "gelutanh", "geluerf", "silu_", "hardswish_",
}  # fmt: skip
_RELU_FAMILY = {"relu", "relu_", "relu6"}
_SKIPPED = ("Identity", "Dropout", "Dropout2d", "DropPath", "DropBlock2d", "Flatten", "StochasticDepth")
_PROBE_BATCH = 2
_MAX_BLOCK_TAPS = 12
RELU_MODES = ("auto", "always", "never")


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
        Output shape per image, in the network's own layout.
    layout : Layout
        What the axes mean: ``nchw``, ``nhwc``, ``tokens`` (with prefix tokens and patch grid) or ``vector``.
    post_activation : bool
        The output of an activation (or a norm+activation block).
    rectified : bool
        The output of a ReLU-family activation: non-negative by construction.
    thresholded : bool
        Rectified, or passed by the network through a ReLU-family activation; ``relu="auto"`` rectifies these.
    main_path : bool
        Every path from the input to the output passes through this tap (not inside a residual branch or a gate).
    stage : int or None
        Index of the resolution stage (0 = highest resolution) of main-path spatial taps.
    """

    name: str
    index: int
    op: str
    shape: tuple[int, ...]
    layout: Layout
    post_activation: bool
    rectified: bool
    thresholded: bool
    main_path: bool
    stage: int | None

    def code_dims(self, pooling: Pooling | str) -> int:
        """Length of the code this tap gives with ``pooling``."""
        pooling = parse_poolings([pooling])[0] if isinstance(pooling, str) else pooling
        return pooling.dims(self.shape, self.layout)

    def bytes_per_image(self, pooling: Pooling | str, dtype: str = "float16") -> int:
        """Storage per image and view for ``pooling`` at ``dtype``."""
        return self.code_dims(pooling) * torch.finfo(getattr(torch, dtype)).bits // 8

    def relu_applied(self, relu: str) -> bool:
        """Whether extraction with ``relu`` (auto, always, never) applies a ReLU on top of the network's output."""
        rectify = relu == "always" or (relu == "auto" and self.thresholded)
        return rectify and not self.rectified

    def codes_rectified(self, relu: str) -> bool:
        """Whether the codes extracted with ``relu`` are non-negative."""
        return self.rectified or self.relu_applied(relu)


def check_relu_mode(relu: str | bool) -> str:
    """Normalise a ``relu`` argument; ``True``/``False`` are the pre-0.3 spellings of ``always``/``never``."""
    if isinstance(relu, bool):
        return "always" if relu else "never"
    if relu not in RELU_MODES:
        raise ParameterError(f"relu={relu!r}; use 'auto' (rectify where the network thresholds), 'always' or 'never'.")
    return relu


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
    stage_source : str
        Where the stages come from: ``feature_info`` (the model declares them), ``resolution`` (main-path resolution
        stages) or ``blocks`` (transformer block outputs).
    expanded_taps : list of TapInfo
        The ``expanded`` selection.
    """

    def __init__(self, taps: list[TapInfo], mode: str, input_size: int, stage_names: Sequence[str], stage_source: str,
                 expanded_names: Sequence[str]) -> None:  # fmt: skip
        self.taps = taps
        self.mode = mode
        self.input_size = input_size
        self._by_name = {t.name: t for t in taps}
        self._trace: tuple[nn.Module, fx.GraphModule, dict] | None = None  # (model, whole-graph trace, node names)
        self.stage_taps = [self._by_name[n] for n in stage_names]
        self.stage_source = stage_source
        self.expanded_taps = [self._by_name[n] for n in expanded_names]

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
                f"unknown tap {name!r}. Close matches: {close or 'none'}. List the taps with `cnncodes layers MODEL` "
                "(Python: cnncodes.list_taps(backbone)); keywords: stages, expanded, rectified, all, last:K."
            )
        return self._by_name[name]

    def select(self, layers: str | Iterable[str]) -> list[TapInfo]:
        """Resolve a selection into taps in forward order (duplicates removed).

        Parameters
        ----------
        layers : str or iterable of str
            Comma-separated or listed items; each is a tap name or one of ``stages``, ``expanded``, ``rectified``,
            ``all``, ``last:K``.
        """
        items = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else [str(s).strip() for s in layers]
        items = [s for s in items if s]
        if not items:
            raise TapSelectionError("no taps selected; use e.g. --taps stages (see `cnncodes layers MODEL`).")
        chosen: dict[str, TapInfo] = {}
        for item in items:
            for tap in self._expand(item):
                chosen[tap.name] = tap
        return sorted(chosen.values(), key=lambda t: t.index)

    def _expand(self, item: str) -> list[TapInfo]:
        if item == "stages":
            return list(self.stage_taps)
        if item == "expanded":
            return list(self.expanded_taps)
        if item == "all":
            return list(self.taps)
        if item == "rectified":
            return [t for t in self.taps if t.thresholded]
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
        """One JSON-ready dict per tap: layout, flags, and code dims and bytes per image for each pooling (None where
        the pooling does not apply to the tap's layout)."""
        pools = parse_poolings(list(poolings))
        stage_names = {t.name for t in self.stage_taps}
        expanded = {t.name for t in self.expanded_taps}
        records = []
        for t in self.taps:
            dims: dict[str, int | None] = {}
            for p in pools:
                try:
                    p.check(t.layout, t.name, t.shape)
                    dims[p.name] = t.code_dims(p)
                except PoolingError:
                    dims[p.name] = None
            records.append({
                "name": t.name, "index": t.index, "op": t.op, "shape": list(t.shape), "layout": t.layout.to_dict(),
                "post_activation": t.post_activation, "rectified": t.rectified, "thresholded": t.thresholded,
                "main_path": t.main_path, "stage": t.stage, "stage_tap": t.name in stage_names,
                "expanded_tap": t.name in expanded, "dims": dims,
                "bytes_per_image": {k: None if d is None else t.bytes_per_image(k, dtype) for k, d in dims.items()},
            })  # fmt: skip
        return records


# --------------------------------------------------------------------------------------------------------------------
# Discovery


@dataclass
class _Raw:
    """What discovery learns about one node before the catalogue is assembled."""

    name: str
    op: str
    shape: tuple[int, ...]
    layout: Layout
    activation: bool
    relu: bool
    thresholded: bool = False
    main_path: bool = False


def _activation_name(op: str, module: nn.Module | None) -> str:
    """The activation that produces this output, if any: the op itself, the ``act`` of a norm+act block (timm's
    BatchNormAct2d), or the last layer of a leaf Sequential (torchvision's Conv2dNormActivation)."""
    if op.lower() in _ACTIVATIONS:
        return op.lower()
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = next((m for m in reversed(module) if type(m).__name__ not in _SKIPPED), None)
    if module is None:
        return ""
    own = type(module).__name__.lower()
    if own in _ACTIVATIONS:
        return own
    act = getattr(module, "act", None)
    name = type(act).__name__.lower() if isinstance(act, nn.Module) else ""
    return name if name in _ACTIVATIONS else ""


def _probe_input(size: int, model: nn.Module) -> torch.Tensor:
    """The discovery input, on the device the model's weights are on (a model already on a GPU is probed there)."""
    gen = torch.Generator().manual_seed(0)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.randn(_PROBE_BATCH, 3, size, size, generator=gen)
    return x if first is None else x.to(first.device)


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
        raise ParameterError(f"mode={mode!r}; use 'auto', 'fx' or 'hooks'.")
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    size = int(input_size or (backbone.preprocessing.input_size if isinstance(backbone, Backbone) else 224))
    x = _probe_input(size, model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _one_cpu_thread(x.device):
            if mode in ("auto", "fx"):
                try:
                    raw, final, (gm, qualname) = _discover_fx(model, x)
                    catalogue = _assemble(model, raw, "fx", size, final)
                    catalogue._trace = (model, gm, qualname)  # the extractor cuts this graph instead of re-tracing
                    return catalogue
                except Exception:  # tracing fails in many ways on dynamic models
                    if mode == "fx":
                        raise
            raw = _discover_hooks(model, x, _declared_channels(model))
            return _assemble(model, raw, "hooks", size, None)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the 2-image probe on one CPU thread (restored after): ops this small gain nothing from a second thread, and
    on a busy machine every op of a multi-threaded forward waits for the slowest thread (a probe took 0.6-0.9 s on two
    threads against 0.1-0.3 s on one, with other processes on the cores)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Recorder(fx.Interpreter):
    """Runs a traced graph, keeping each node's output shape and its concrete (tensor-free) arguments."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}
        self.floating: dict[fx.Node, bool] = {}
        self.concrete: dict[fx.Node, tuple[tuple, dict]] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)

        def strip(a: Any) -> Any:
            return None if isinstance(a, torch.Tensor) else a

        self.concrete[n] = (fx.node.map_aggregate(args, strip), fx.node.map_aggregate(kwargs, strip))
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
            self.floating[n] = result.is_floating_point()
        elif isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
            self.shapes[n] = [tuple(r.shape) for r in result]
        return result


def _fx_function_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


def _discover_fx(model: nn.Module, x: torch.Tensor) -> tuple[list[_Raw], str, tuple[fx.GraphModule, dict]]:
    gm, qualname = _graph.traced(model)
    recorder = _Recorder(gm)
    recorder.run(x)
    labels: dict[fx.Node, Any] = {}
    raw: list[_Raw] = []
    node_of: dict[str, fx.Node] = {}
    relu_nodes: set[fx.Node] = set()
    for node in gm.graph.nodes:
        shape = recorder.shapes.get(node)
        if node.op == "placeholder":
            labels[node] = AxisLabels.image()
            continue
        if node.op in ("output", "get_attr") or shape is None:
            continue
        inputs = _fx_inputs(node, labels, recorder.shapes)
        op, module = _graph.op_label(gm, node)
        labels[node] = _fx_node_labels(node, module, inputs, recorder, shape, labels)
        activation = _activation_name(op, module)
        is_relu = activation in _RELU_FAMILY or (
            activation == "hardtanh" and _is_relu6_hardtanh(recorder, node, module)
        )
        if is_relu and op.lower() in _ACTIVATIONS:  # the op itself thresholds its input (not a block ending in one)
            relu_nodes.add(node)
        lab = labels[node]
        if not isinstance(shape, tuple) or not isinstance(lab, AxisLabels) or not recorder.floating.get(node):
            continue
        layout = lab.layout()
        if layout is None or op in _SKIPPED or node not in qualname or shape[0] != x.shape[0]:
            continue
        name = qualname[node]
        node_of[name] = node
        raw.append(_Raw(name, op, shape[1:], layout, bool(activation), is_relu))
    for r in raw:
        node = node_of[r.name]
        r.thresholded = r.relu or any(u in relu_nodes for u in node.users)
    main = _main_path(gm, qualname, set(recorder.shapes))
    for r in raw:
        r.main_path = node_of[r.name] in main
    order = _order(gm)
    final = qualname[max(main, key=order.__getitem__)] if main else raw[-1].name
    return raw, final, (gm, qualname)


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _is_relu6_hardtanh(recorder: _Recorder, node: fx.Node, module: nn.Module | None) -> bool:
    """``hardtanh(x, 0, 6)`` is ReLU6: as a module its bounds are attributes, as a function they are arguments."""
    if module is not None:
        return getattr(module, "min_val", -1.0) == 0
    args, kwargs = recorder.concrete.get(node, ((), {}))
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    return low == 0


def _fx_inputs(node: fx.Node, labels: dict[fx.Node, Any], shapes: dict[fx.Node, Any]) -> list[tuple[Any, tuple]]:
    out: list[tuple[Any, tuple]] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Node) and isinstance(shapes.get(a), tuple):
            out.append((labels.get(a) if isinstance(labels.get(a), AxisLabels) else None, shapes[a]))
        return a

    fx.node.map_arg((node.args, node.kwargs), visit)
    return out


def _fx_node_labels(node: fx.Node, module: nn.Module | None, inputs: list, recorder: _Recorder, shape: Any,
                    labels: dict[fx.Node, Any]) -> Any:  # fmt: skip
    if isinstance(shape, list):  # a tuple of tensors (unbind, split, chunk): label each element
        base = inputs[0][0] if inputs else None
        name = _fx_function_name(node)
        if base is None:
            return [None] * len(shape)
        if name == "unbind":
            args, kwargs = recorder.concrete[node]
            dim = int(kwargs.get("dim", args[1] if len(args) > 1 else 0))
            return [base.reduce([dim], keepdim=False)] * len(shape)
        return [generic_labels(inputs, s) for s in shape]
    if node.op == "call_module" and module is not None:
        lab = module_labels(module, inputs, shape)
        return lab if lab is not None else generic_labels(inputs, shape)
    name = _fx_function_name(node)
    if name == "getitem" and node.args and isinstance(node.args[0], fx.Node):
        elements = labels.get(node.args[0])
        if isinstance(elements, list):  # an element of a tuple output
            index = node.args[1]
            return elements[index] if isinstance(index, int) and -len(elements) <= index < len(elements) else None
    args, kwargs = recorder.concrete[node]
    return function_labels(name, inputs, args, kwargs, shape)


def _main_path(gm: fx.GraphModule, qualname: dict[fx.Node, str], tensors: set[fx.Node]) -> set[fx.Node]:
    """Nodes that every path from the input to the model's output passes through (dominators of the output).

    Only tensor-valued nodes count: shape arithmetic (``n, c, h, w = x.shape``) is not a path for the data.
    """
    order = _order(gm)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    named = [n for n in gm.graph.nodes if n in qualname]
    if not inputs or not named:
        return set()
    forward: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        n = stack.pop()
        if n in forward:
            continue
        forward.add(n)
        stack.extend(u for u in n.users if u.op != "output" and u in tensors)
    final = max((n for n in named if n in forward), key=order.__getitem__)
    backward: set[fx.Node] = set()
    stack = [final]
    while stack:
        n = stack.pop()
        if n in backward:
            continue
        backward.add(n)
        stack.extend(a for a in n.all_input_nodes if a in tensors)
    relevant = sorted(forward & backward, key=order.__getitem__)
    main, reach = set(), -1
    for n in relevant:
        if reach <= order[n]:
            main.add(n)
        reach = max([reach] + [order[u] for u in n.users if u in backward])
    return main


def _declared_channels(model: nn.Module) -> dict[str, int]:
    return {str(e["module"]): int(e["num_chs"]) for e in _feature_info_entries(model) or [] if "num_chs" in e}


def _labels_from_channels(shape: tuple[int, ...], channels: int) -> AxisLabels | None:
    """The layout of a declared stage output whose input the hooks could not follow: where its declared channel
    count sits says which axis holds channels."""
    if len(shape) == 4:
        return (
            AxisLabels.channels_first(4)
            if shape[1] == channels
            else AxisLabels.channels_last(4)
            if shape[3] == channels
            else None
        )
    if len(shape) == 3 and shape[2] == channels:
        return AxisLabels.channels_last(3)
    return None


def _discover_hooks(model: nn.Module, x: torch.Tensor, declared: dict[str, int] | None = None) -> list[_Raw]:
    """Module outputs in completion order, labelled from each module's input (followed by tensor identity), or for
    the model's declared stages (timm's ``feature_info``) from their declared channels."""
    raw: list[_Raw] = []
    labels: dict[int, AxisLabels | None] = {id(x): AxisLabels.image()}
    producer: dict[int, int] = {}
    alive: list[torch.Tensor] = [x]  # keep outputs alive so that ids stay unique during the probe

    def record(name: str, module: nn.Module, args: tuple, output: object) -> None:
        op = type(module).__name__
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        activation = _activation_name(op, module)
        is_relu = activation in _RELU_FAMILY
        if is_relu and op.lower() in _ACTIVATIONS and first is not None and id(first) in producer:
            raw[producer[id(first)]].thresholded = True
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        inputs = [(labels.get(id(first)), tuple(first.shape))] if first is not None else []
        # A container returns the tensor its last child made, already labelled by that child's hook.
        lab = labels.get(id(output)) if id(output) in labels and output is not first else None
        lab = lab or module_labels(module, inputs, tuple(output.shape)) or generic_labels(inputs, tuple(output.shape))
        if lab is None and name in (declared or {}):
            lab = _labels_from_channels(tuple(output.shape), declared[name])
        labels[id(output)] = lab
        alive.append(output)
        layout = lab.layout() if lab is not None else None
        if layout is None or op in _SKIPPED or output.shape[0] != x.shape[0]:
            return
        producer[id(output)] = len(raw)
        raw.append(_Raw(name, op, tuple(output.shape[1:]), layout, bool(activation), is_relu, thresholded=is_relu))

    _graph.hook_call_order(model, x, record)
    # Without a graph, the main path is approximated: resolution never increases along it, so a map smaller than
    # some later map is a side branch (a squeeze-excitation gate at 1x1 inside a 14x14 stage).
    later = 0
    for r in reversed(raw):
        area = _area(r)
        r.main_path = area is not None and area >= later
        later = max(later, area or 0)
    return raw


def _area(r: _Raw | TapInfo) -> int | None:
    grid = r.layout.positions(r.shape)
    return None if grid is None else grid[0] * grid[1]


def _assemble(model: nn.Module, raw: list[_Raw], mode: str, size: int, final: str | None) -> TapCatalogue:
    stage_of: dict[tuple[int, int], int] = {}
    taps = []
    for i, r in enumerate(raw):
        grid = r.layout.positions(r.shape) if r.layout.spatial else None
        stage = stage_of.setdefault(grid, len(stage_of)) if r.main_path and grid is not None else None
        taps.append(
            TapInfo(r.name, i, r.op, r.shape, r.layout, r.activation, r.relu, r.thresholded, r.main_path, stage)
        )
    taps = _token_grids_from_feature_info(model, taps, size)
    stages, source = _feature_info_stages(model, taps), "feature_info"
    if stages is None:
        tokens = [t for t in taps if t.main_path and t.layout.kind == "tokens"]
        stages, source = (_token_stages(tokens), "blocks") if tokens else (_resolution_stages(taps, size), "resolution")
    fc = _hidden_fc(taps, final)
    names = sorted({t.name for t in stages + fc}, key=lambda n: next(t.index for t in taps if t.name == n))
    return TapCatalogue(taps, mode, size, names, source, [t.name for t in _expanded(taps, stages)])


def _feature_info_entries(model: nn.Module) -> list[dict[str, Any]] | None:
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "module" in e for e in entries):
        return None
    return entries


def _token_grids_from_feature_info(model: nn.Module, taps: list[TapInfo], size: int) -> list[TapInfo]:
    """Hooks cannot see a token tap's flatten; the model's declared reduction gives its patch grid instead."""
    entries = _feature_info_entries(model) or []
    out = []
    for t in taps:
        if t.layout.kind == "tokens" and t.layout.grid is None:
            entry = next((e for e in entries if _inside(t.name, str(e["module"])) and e.get("reduction")), None)
            side = size // int(entry["reduction"]) if entry else 0
            if side and side * side == t.shape[0] - t.layout.prefix:
                t = replace(t, layout=Layout("tokens", t.layout.prefix, (side, side)))
        out.append(t)
    return out


def _feature_info_stages(model: nn.Module, taps: list[TapInfo]) -> list[TapInfo] | None:
    """timm's declared stages (``feature_info``: module, channels, reduction), each mapped to the last tap inside
    its module; None when the model declares none or a module has no tap of the declared channels."""
    entries = _feature_info_entries(model)
    if entries is None:
        return None
    picked = []
    for entry in entries:
        module = str(entry["module"])
        inside = [t for t in taps if t.name == module] or [t for t in taps if t.name.startswith(module + ".")]
        inside = [t for t in inside if t.layout.kind != "vector"] or inside
        if not inside or ("num_chs" in entry and inside[-1].layout.channels(inside[-1].shape) != entry["num_chs"]):
            return None
        picked.append(inside[-1])
    return _evenly_spaced(picked) if len({e.get("reduction") for e in entries}) == 1 else picked


def _evenly_spaced(taps: list[TapInfo], k: int = _MAX_BLOCK_TAPS) -> list[TapInfo]:
    if len(taps) <= k:
        return taps
    step = (len(taps) - 1) / (k - 1)
    return [taps[round(i * step)] for i in range(k)]


def _resolution_stages(taps: list[TapInfo], size: int) -> list[TapInfo]:
    """The output of each resolution stage on the main path.

    The last main-path tap at each resolution is the stage output, except for ops at the old resolution that belong to
    the module doing the downsampling (a ConvNeXt downsample's LayerNorm, a DenseNet transition's conv): that module
    is the shortest name prefix of the first tap at the next resolution whose main-path taps span only the two
    resolutions.
    """
    spatial, smallest = [], size * size
    for t in taps:  # resolution never increases along the main path (an adaptive pool may upsample a tiny map)
        area = _area(t) if t.main_path and t.layout.spatial else None
        if area is not None and area <= smallest and not (t.layout.channels(t.shape) == 3 and area == size * size):
            spatial.append(t)
            smallest = area
    runs: list[list[TapInfo]] = []
    for t in spatial:  # a stage is a reduction octave: valid convolutions (149 -> 147 px) do not start a new one
        if runs and _octave(t, size) == _octave(runs[-1][0], size):
            runs[-1].append(t)
        else:
            runs.append([t])
    picked = []
    for k, members in enumerate(runs):
        if k > 0 and _area(members[0]) == 1:  # a global pool ends the last stage; a 1x1 map of convolutions does not
            cut = next((i for i, m in enumerate(members) if _is_global_pool(m)), len(members))
            members = members[:cut]
            if not members:
                continue
        if k + 1 < len(runs):
            scope = _downsample_scope(
                runs[k + 1][0].name, spatial, {_octave(members[0], size), _octave(runs[k + 1][0], size)}, size
            )
            members = [m for m in members if not _inside(m.name, scope)] or members
        picked.append(members[-1])
    return picked


def _is_global_pool(t: TapInfo) -> bool:
    return _area(t) == 1 and ("pool" in t.op.lower() or t.op in ("mean", "amax"))


def _inside(name: str, scope: str | None) -> bool:
    return scope is not None and (name == scope or name.startswith(scope + "."))


def _octave(t: TapInfo, size: int) -> int:
    return round(math.log2(size * size / max(_area(t) or 1, 1)) / 2)


def _downsample_scope(name: str, spatial: list[TapInfo], octaves: set[int], size: int) -> str | None:
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        scope = ".".join(parts[:depth])
        if all(_octave(t, size) in octaves for t in spatial if _inside(t.name, scope)):
            return scope
    return None


def _token_stages(tokens: list[TapInfo]) -> list[TapInfo]:
    """A plain transformer's block outputs; for a hierarchical one (several patch grids), each grid's last block
    output."""
    runs: list[list[TapInfo]] = []
    for t in tokens:
        if runs and t.layout.grid == runs[-1][0].layout.grid:
            runs[-1].append(t)
        else:
            runs.append([t])
    if len(runs) == 1:
        return _block_outputs(tokens)
    return [([m for m in run if m.op in ("add", "iadd")] or run)[-1] for run in runs]


def _block_outputs(tokens: list[TapInfo]) -> list[TapInfo]:
    """Transformer block outputs: the last main-path token tap of each child of the container with most children."""
    best: tuple[int, str] = (0, "")
    for depth in range(max(len(t.name.split(".")) for t in tokens)):
        containers: dict[str, set[str]] = {}
        for t in tokens:
            parts = t.name.split(".")
            if len(parts) > depth + 1:
                containers.setdefault(".".join(parts[:depth]), set()).add(parts[depth])
        for container, children in containers.items():
            if len(children) > best[0]:
                best = (len(children), container)
    if best[0] < 2:  # no block modules: the residual merges of the token stream are the block outputs
        merges = [t for t in tokens if t.op in ("add", "iadd")]
        return _evenly_spaced(merges or tokens[-1:])
    prefix = best[1] + "." if best[1] else ""
    last: dict[str, TapInfo] = {}
    for t in tokens:
        if t.name.startswith(prefix):
            rest = t.name[len(prefix) :].split(".")
            if len(rest) > 1:
                last[rest[0]] = t
    return _evenly_spaced(sorted(last.values(), key=lambda t: t.index))


def _hidden_fc(taps: list[TapInfo], final: str | None) -> list[TapInfo]:
    """Post-activation outputs of hidden fully connected layers (fc6/fc7): main-path activation vectors after the
    last spatial or token tap, except the model's output."""
    last_map = max((t.index for t in taps if t.main_path and t.layout.kind != "vector"), default=-1)
    return [t for t in taps if t.layout.kind == "vector" and t.main_path and t.post_activation and t.index > last_map
            and t.name != final]  # fmt: skip


def _expanded(taps: list[TapInfo], stages: list[TapInfo]) -> list[TapInfo]:
    """The last activation output at each resolution (spatial), or inside each transformer block (tokens)."""
    by_key: dict[Any, TapInfo] = {}
    block_names = [s.name.rsplit(".", 1)[0] for s in stages if s.layout.kind == "tokens"]
    # 1x1 activations are squeeze-excitation gates unless the main path itself reaches 1x1 with convolutions
    one_by_one = any(t.main_path and t.layout.spatial and _area(t) == 1 and not _is_global_pool(t) for t in stages)
    for t in taps:
        if not t.post_activation:
            continue
        if t.layout.spatial:
            grid = t.layout.positions(t.shape)
            if grid != (1, 1) or one_by_one:
                by_key[("res", grid)] = t
        elif t.layout.kind == "tokens":
            block = next((b for b in block_names if t.name.startswith(b + ".")), None)
            if block is not None:
                by_key[("block", block)] = t
    return sorted(by_key.values(), key=lambda t: t.index)
