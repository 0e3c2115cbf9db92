"""The network above a cut: the layers that read a tap's activation and end in the model's own classifier.

Everything below a cut is frozen, so its output (the tap's activation) can be computed once and cached; training then
needs only the part above it. :func:`top_above` builds that part from the FX trace tap discovery made: the sub-graph
from the tap to the input of the model's final ``nn.Linear``, as an independent copy initialised with the pretrained
weights, plus that classifier. A tap is a *cut* only when nothing above it reads an earlier activation (a residual
branch that bypasses it); :func:`cut_points` lists the taps that are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import fx, nn

from ..errors import ParameterError
from ._backbones import Backbone
from ._graph import _fetch
from ._taps import TapCatalogue, list_taps

__all__ = ["Top", "top_above", "cut_points", "first_block", "NORMS"]


@dataclass
class Top:
    """The layers above a cut.

    Attributes
    ----------
    tap : str
        The cut: the tap whose activation ``body`` reads.
    body : nn.Module
        Activation at ``tap`` (B, *shape) -> the features the model's classifier reads (B, features); trainable,
        initialised with the pretrained weights, sharing nothing with the backbone.
    features : int
        Width of ``body``'s output.
    classifier : str
        Qualified name of the model's final ``nn.Linear`` (the layer a new task replaces).
    modules : list of str
        Qualified names of the backbone modules ``body`` holds: their weights are what fine-tuning changes.
    block : tuple of str
        Qualified names of the modules that make the first block above the cut (see :func:`first_block`): what
        surgical fine-tuning of one block trains. Empty when nothing with weights lies above the cut.
    norms : tuple of str
        Qualified names of the normalization layers above the cut (:data:`NORMS`, judged on the backbone's own
        modules: the trace may read a norm's weights directly, as timm's ``LayerNorm2d``).
    """

    tap: str
    body: nn.Module
    features: int
    classifier: str
    modules: list[str]
    block: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()


def _trace_of(backbone: Backbone, catalogue: TapCatalogue) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    trace = catalogue._trace
    if catalogue.mode != "fx" or trace is None or trace[0] is not backbone.model:
        raise ParameterError(
            f"{backbone.spec} can only be hooked, not traced, so the layers above a tap cannot be cut out: fine-tuning "
            "on cached activations needs an FX-traceable model. Use a linear probe (cnncodes sweep), or a --head on "
            "pooled codes."
        )
    gm, qualname = trace[1], trace[2]
    return gm, {name: node for node, name in qualname.items()}


def _classifier(gm: fx.GraphModule, node_of: dict[str, fx.Node]) -> fx.Node:
    """The model's final ``nn.Linear``, which must produce the model's output (the last node of the trace)."""
    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    if not linears:
        raise ParameterError("the model has no final nn.Linear classifier, so there is no head to replace; load it "
                             "with its classifier (e.g. a torchvision or timm model with num_classes > 0).")  # fmt: skip
    output = list(node_of.values())[-1]
    if linears[-1] is not output:
        raise ParameterError(f"the model's output is {output.name!r}, not its last nn.Linear ({linears[-1].name!r}): "
                             "it combines several heads (e.g. a distilled model), so there is no one classifier to "
                             "replace. Fine-tune a model with a single classifier.")  # fmt: skip
    return linears[-1]


def _problem(gm: fx.GraphModule, start: fx.Node, end: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """The nodes strictly above ``start`` up to ``end`` (graph order), and an earlier activation one of them reads
    (``None`` when ``start`` is a cut)."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    depends: set[fx.Node] = set()  # nodes computed from the image
    above: set[fx.Node] = set()  # nodes computed from start
    for n in gm.graph.nodes:
        inputs = n.all_input_nodes
        if n is placeholder or any(i in depends for i in inputs):
            depends.add(n)
        if any(i is start or i in above for i in inputs):
            above.add(n)
    needed: set[fx.Node] = set()  # what end is computed from
    stack = [end]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    if end is not start and end not in above:
        return [], start
    body = [n for n in gm.graph.nodes if n in above and n in needed]
    for n in body:
        for i in n.all_input_nodes:
            if i is not start and i not in above and i in depends:
                return body, i
    return body, None


def top_above(backbone: Backbone, tap: str, catalogue: TapCatalogue | None = None) -> Top:
    """The trainable layers of ``backbone`` above ``tap``, up to its classifier (see :class:`Top`)."""
    catalogue = catalogue or list_taps(backbone)
    gm, node_of = _trace_of(backbone, catalogue)
    if tap not in node_of:
        raise ParameterError(f"{tap!r} is not a tap of {backbone.spec}; cut at one of: {', '.join(cut_points(backbone, catalogue))}.")  # fmt: skip
    classifier = _classifier(gm, node_of)
    start, features_node = node_of[tap], classifier.args[0]
    if not isinstance(features_node, fx.Node):
        raise ParameterError(f"{backbone.spec}'s classifier reads no single tensor; it cannot be split.")
    body, leak = _problem(gm, start, features_node)
    if leak is not None:
        name = next((n for n, node in node_of.items() if node is leak), leak.name)
        raise ParameterError(f"{tap!r} is not a cut of {backbone.spec}: the layers above it also read "
                             f"{name!r}, which bypasses it. Cut at one of: {', '.join(cut_points(backbone, catalogue))}.")  # fmt: skip
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {start: graph.placeholder("x")}
    owners: dict[str, object] = {}

    def bring(node: fx.Node) -> fx.Node:
        """A node the body reads that does not depend on the image (a weight, a reshaped constant, an optional
        input left at its default): copied with what it is computed from."""
        if node not in remap:
            for i in node.all_input_nodes:
                bring(i)
            remap[node] = graph.node_copy(node, lambda a: remap[a])
        return remap[node]

    for node in body:
        for i in node.all_input_nodes:
            bring(i)
        remap[node] = graph.node_copy(node, lambda a: remap[a])
    graph.output(remap[features_node])
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owners[node.target] = _fetch(gm, node.target)
    module = fx.GraphModule(owners, graph) if body else nn.Identity()
    module = copy.deepcopy(module)  # pretrained initial weights, shared with nothing
    for p in module.parameters():
        p.requires_grad_(True)
    linear = gm.get_submodule(classifier.target)
    modules = sorted({n.target for n in body if n.op == "call_module"})
    order = []  # the modules above the cut in execution order, those whose weights the trace reads directly included
    for node in graph.nodes:
        if node.op == "call_module":
            order.append(str(node.target))
        elif node.op == "get_attr" and isinstance(_fetch(gm, node.target), nn.Parameter):
            order.append(str(node.target).rpartition(".")[0])
    order = list(dict.fromkeys(order))
    norms = tuple(name for name in order if name and isinstance(backbone.model.get_submodule(name), NORMS))
    return Top(tap, module, int(linear.in_features), str(classifier.target), modules,
               first_block(backbone.model, order), norms)  # fmt: skip


#: Normalization layers (their affine parameters are what the ``norms`` recipe trains), timm's subclasses included.
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def first_block(model: nn.Module, order: list[str]) -> tuple[str, ...]:
    """The first block above a cut, as the module names it consists of, from ``order`` (the names of the modules
    above the cut, in execution order).

    A block is a module that is itself no container but an element of one (a ResNet ``layer3.0``, a timm EfficientNet
    ``blocks.2.0``, a torchvision ``features.2.0``, a ViT ``blocks.3``). The first block is the outermost such module
    holding the first layer with weights above the cut (a block, not a gate inside it). Where that module holds a
    sequence of blocks of its own (a ConvNeXt stage: its downsampling layers, then ``blocks.0``, ``blocks.1``...),
    the first block is what it holds above the cut up to and including its first inner block above the cut
    (``stages.1.downsample``, ``stages.1.blocks.0``). Where no block encloses that layer, the outermost element of
    a container that does (torchvision ConvNeXt's downsampling ``features.2``), else the layer alone (a network of
    plain layers). When the cut lies inside a block, its first block is that block's layers above the cut. Empty
    without a layer with weights.
    """
    first = next((t for t in order if next(model.get_submodule(t).parameters(), None) is not None), None)
    if first is None:
        return ()
    parts = first.split(".")
    prefixes = [".".join(parts[:k]) for k in range(1, len(parts))]
    owner = next((p for p in prefixes if _is_block(model, p)), None)
    if owner is None:  # no block: the outermost element of a container holding the layer, else the layer
        return (next((p for p in prefixes if isinstance(model.get_submodule(p.rpartition(".")[0]), _CONTAINERS)),
                     first),)  # fmt: skip

    def above(name: str) -> bool:
        return any(t == name or t.startswith(name + ".") for t in order)

    inner = next((name for name, _ in model.get_submodule(owner).named_modules(prefix=owner)
                  if name != owner and above(name) and _is_block(model, name, repeated=True)), None)  # fmt: skip
    if inner is None:
        return (owner,)
    before, path = [], owner  # the modules the owner holds before its first inner block, level by level
    for part in inner[len(owner) + 1 :].split("."):
        for name, _ in model.get_submodule(path).named_children():
            if name == part:
                break
            before.append(f"{path}.{name}")
        path = f"{path}.{part}"
    return (*(b for b in before if above(b)), inner)


def _is_block(model: nn.Module, name: str, repeated: bool = False) -> bool:
    """A module made of layers (not a layer), that is no container but an element of one; ``repeated``: one of
    several of its kind there (a stage's blocks, not a squeeze-excitation gate among a block's layers)."""
    module, parent = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0])
    if next(module.children(), None) is None or isinstance(module, _CONTAINERS) or not isinstance(parent, _CONTAINERS):
        return False
    return not repeated or sum(type(m) is type(module) for m in parent.children()) > 1


def cut_points(backbone: Backbone, catalogue: TapCatalogue | None = None) -> list[str]:
    """Main-path taps the network can be cut at, in forward order."""
    catalogue = catalogue or list_taps(backbone)
    gm, node_of = _trace_of(backbone, catalogue)
    end = _classifier(gm, node_of).args[0]
    return [t.name for t in catalogue.taps if t.main_path and _problem(gm, node_of[t.name], end)[1] is None]
