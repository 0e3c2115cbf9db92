"""Run a network only as far as its deepest tap, applying a small "head" module to each tapped activation.

Two routes give the same answer:

* **FX** (preferred): the model is traced, every node after the deepest tap is pruned, and each head is inserted
  *immediately* after its node. Running the head before any later in-place op (``ReLU(inplace=True)``,
  ``out += identity``) means a tap sees exactly what the plain forward produced at that node.
* **hooks** (fallback for untraceable models): forward hooks run the heads as modules finish, and the forward is
  abandoned by an exception once the deepest tap has fired.

Node naming follows torchvision's feature extraction: qualified module paths, with ``_1``, ``_2`` ... for the second and
later calls of a reused module (ResNet's shared ``relu``).
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

__all__ = ["fx_node_names", "traced", "tapped_fx", "TappedHooks", "hook_call_order"]


def _timm_fx():
    # timm's wrappers know which timm modules must stay leaves during tracing and which timm functions to wrap. A model
    # can hold timm modules or call timm functions only once timm is imported; without it they add nothing to
    # torchvision's own functions, which they call, and importing timm would cost 0.3-0.5 s of start-up.
    if "timm" not in sys.modules:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    else:
        from timm.models import create_feature_extractor, get_graph_node_names

    return create_feature_extractor, get_graph_node_names


def fx_node_names(model: nn.Module) -> list[str]:
    """Eval-mode FX node names in forward order (raises if the model cannot be traced)."""
    _, get_graph_node_names = _timm_fx()
    _, names = get_graph_node_names(model)
    return [n for n in names if n != "x"]


def traced(model: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """The whole eval-mode graph (every node kept) and each node's qualified name (``layer1.0.relu_1``)."""
    names = fx_node_names(model)
    create_feature_extractor, _ = _timm_fx()
    gm = create_feature_extractor(model, return_nodes={name: name for name in names})
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return gm, {node: name for name, node in dict(output.args[0]).items()}


def op_label(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module | None]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module).__name__, module
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)), None
    return str(node.target), None


def tapped_from_trace(
    gm: fx.GraphModule, qualname: Mapping[fx.Node, str], heads: Mapping[str, nn.Module]
) -> fx.GraphModule:
    """Like :func:`tapped_fx`, from the whole-graph trace tap discovery made already (saves tracing the model again).

    The trace is copied, never changed: the new graph returns the heads' outputs, and everything after the deepest
    tap is dropped as dead code.
    """
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, remap)
    node_of = {name: remap[node] for node, name in qualname.items()}
    owners: dict[str, Any] = {}
    outputs = {}
    for i, (name, head) in enumerate(heads.items()):
        attr = f"_cnncodes_head_{i}"
        owners[attr] = head
        with graph.inserting_after(node_of[name]):
            outputs[name] = graph.call_module(attr, (node_of[name],))
    graph.output(outputs)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in owners:
            owners[node.target] = _fetch(gm, node.target)
    cut = fx.GraphModule(owners, graph)
    cut.graph.eliminate_dead_code()
    cut.delete_all_unused_submodules()
    _sums_in_place(cut)
    cut.graph.lint()
    cut.recompile()
    return cut


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tapped_fx(model: nn.Module, heads: Mapping[str, nn.Module]) -> fx.GraphModule:
    """A GraphModule returning ``{name: heads[name](activation at node name)}``, pruned after the deepest node."""
    create_feature_extractor, _ = _timm_fx()
    gm = create_feature_extractor(model, return_nodes={name: name for name in heads})
    output = next(n for n in gm.graph.nodes if n.op == "output")
    targets: dict[str, fx.Node] = dict(output.args[0])
    new_outputs = {}
    for i, (name, head) in enumerate(heads.items()):
        node = targets[name]
        attr = f"_cnncodes_head_{i}"
        gm.add_submodule(attr, head)
        with gm.graph.inserting_after(node):
            new_outputs[name] = gm.graph.call_module(attr, (node,))
    output.args = (new_outputs,)
    _sums_in_place(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


# Modules (and their subclasses, such as timm's BatchNormAct2d) whose output is a new tensor, never a view of their
# input or of a buffer.
_FRESH_OUTPUT = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.LayerNorm, nn.GroupNorm)


def _sums_in_place(gm: fx.GraphModule) -> None:
    """Let residual sums ``bn(x) + shortcut`` write into the normalization's output, as eager ``out += identity`` does.

    FX records ``out += identity`` as an out-of-place add: a new activation-sized buffer per block, 3-4 % of a
    ResNet-18 forward on a CPU. Only a sum whose left operand is a fresh output (see :func:`_fresh`) is rerouted, and
    :func:`_add_into` still adds out of place unless the result would have that operand's shape, strides and dtype:
    the values and layout are those of ``a + b``.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, torch.add) or node.kwargs:
            continue
        if len(node.args) == 2 and _fresh(gm, node.args[0]):
            node.target = _add_into


def _fresh(gm: fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` is a new tensor that nothing but its one user reads (no tap, no other op): the output of one
    of :data:`_FRESH_OUTPUT`, or such an output passed through ``nn.Identity`` (timm's drop path at inference)."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
        return False
    module = gm.get_submodule(str(node.target))
    if type(module) is nn.Identity:
        return len(node.args) == 1 and _fresh(gm, node.args[0])
    return isinstance(module, _FRESH_OUTPUT)


def _add_into(a: torch.Tensor, b: Any) -> torch.Tensor:
    """``a + b``, written into ``a`` when ``b`` is a tensor laid out exactly like it and no gradient needs ``a``.

    Exporters (TorchScript tracing, torch.export) get the plain ``a + b``: they record their own graph, and a traced
    shape test would only warn."""
    if (
        not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        and not (a.requires_grad and torch.is_grad_enabled())
    ):
        return a.add_(b)
    return a + b


class _StopForward(Exception):
    """Raised by the deepest hook to skip the rest of the network."""


def hook_call_order(model: nn.Module, x: torch.Tensor, fn: Callable[[str, nn.Module, tuple, object], None]) -> None:
    """Run ``model(x)`` calling ``fn(tap_name, module, args, output)`` as every sub-module finishes, in completion
    order."""
    counts: dict[str, int] = defaultdict(int)
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            k = counts[name]
            counts[name] += 1
            fn(name if k == 0 else f"{name}_{k}", module, args, output)

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()


class TappedHooks(nn.Module):
    """Hook-based equivalent of :func:`tapped_fx` for models FX cannot trace.

    Parameters
    ----------
    model : nn.Module
        The network (hooks are attached only during :meth:`forward` and always removed).
    heads : mapping of tap name to module
        Tap names as produced by :func:`hook_call_order`.
    order : list of str
        All tap names in forward order; the last selected one is where the forward stops.
    """

    def __init__(self, model: nn.Module, heads: Mapping[str, nn.Module], order: list[str]) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({f"h{i}": h for i, h in enumerate(heads.values())})
        self._keys = {name: f"h{i}" for i, name in enumerate(heads)}
        self._last = max(heads, key=order.index)
        modules = dict(model.named_modules())
        # "layer1.0.relu_1" is the second call of module "layer1.0.relu"
        self._bases = {name if name in modules else name.rsplit("_", 1)[0] for name in heads}

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        results: dict[str, object] = {}
        counts: dict[str, int] = defaultdict(int)
        handles = []

        def make_hook(name: str):
            def hook(module: nn.Module, args: object, output: object) -> None:
                k = counts[name]
                counts[name] += 1
                tap = name if k == 0 else f"{name}_{k}"
                if tap in self._keys:
                    results[tap] = self.heads[self._keys[tap]](output)
                    if tap == self._last:
                        raise _StopForward

            return hook

        try:
            for name, module in self.model.named_modules():
                if name in self._bases:
                    handles.append(module.register_forward_hook(make_hook(name)))
            with contextlib.suppress(_StopForward):
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return results
