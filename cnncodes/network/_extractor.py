"""CodeExtractor: a tensor-in, codes-out module. One forward serves every tap and pooling; nothing touches the disk."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _graph
from ._backbones import Backbone
from ._layout import Layout
from ._pooling import Pooling, parse_poolings
from ._taps import TapCatalogue, TapInfo, check_relu_mode, list_taps

__all__ = ["CodeExtractor", "TapHead"]


class TapHead(nn.Module):
    """Rectify (optionally) and pool one activation of ``layout`` into ``{pooling name: (B, D) float32}``."""

    def __init__(self, poolings: Sequence[Pooling], relu: bool, layout: Layout | None = None) -> None:
        super().__init__()
        self.poolings = list(poolings)
        self.relu = relu
        self.layout = layout

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dtype in (torch.float16, torch.bfloat16):  # pool AMP activations in float32
            x = x.float()
        if self.relu:
            x = F.relu(x)  # never in place: the network may still need the raw tensor
        out = {}
        for p in self.poolings:
            code = p(x, self.layout).float()
            # `none` and vector taps can be views of the network's tensor; a later in-place op would change them.
            # torch.export cannot look at storages, so an exported model always copies (cheap, and always safe).
            aliased = (
                torch.compiler.is_compiling() or code.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            )
            out[p.name] = code.clone() if aliased else code
        return out


class CodeExtractor(nn.Module):
    """Compute CNN codes for a batch of preprocessed images.

    Parameters
    ----------
    backbone : Backbone
    taps : str or iterable of str
        A selection understood by :meth:`TapCatalogue.select` (``"stages"``, names, ``"last:2"``...).
    poolings : str or sequence
        E.g. ``"avg,avg4"``.
    relu : {"auto", "always", "never"}, default="auto"
        ``auto`` rectifies the taps the network thresholds itself (ReLU-family outputs and their inputs) and keeps raw
        values elsewhere; ``always`` rectifies every tap; ``never`` keeps raw values. ``True``/``False`` are accepted
        as ``always``/``never``.
    catalogue : TapCatalogue, optional
        Reuse an existing catalogue (it fixes the input size and the fx/hooks mode).

    Attributes
    ----------
    taps : list of TapInfo
        Selected taps in forward order.
    poolings : list of Pooling
    relu : str
        The rectification mode.
    relu_applied : dict of str to bool
        Per tap: whether a ReLU is applied on top of the network's output.

    Examples
    --------
    >>> codes = CodeExtractor(backbone, "stages", "avg")(images)  # doctest: +SKIP
    >>> codes["blocks.5.0.bn1"]["avg"].shape  # doctest: +SKIP
    torch.Size([8, 672])
    """

    def __init__(
        self,
        backbone: Backbone,
        taps: str | Iterable[str] = "stages",
        poolings: str | Sequence[str | Pooling] = "avg",
        relu: str | bool = "auto",
        catalogue: TapCatalogue | None = None,
    ) -> None:
        super().__init__()
        self.catalogue = catalogue or list_taps(backbone)
        self.taps: list[TapInfo] = self.catalogue.select(taps)
        self.poolings = parse_poolings(poolings)
        for t in self.taps:
            for p in self.poolings:
                p.check(t.layout, repr(t.name), t.shape)
        self.relu = check_relu_mode(relu)
        self.relu_applied = {t.name: t.relu_applied(self.relu) for t in self.taps}
        heads = {t.name: TapHead(self.poolings, self.relu_applied[t.name], t.layout) for t in self.taps}
        trace = self.catalogue._trace
        if self.catalogue.mode == "fx" and trace is not None and trace[0] is backbone.model:
            self.net: nn.Module = _graph.tapped_from_trace(trace[1], trace[2], heads)
        elif self.catalogue.mode == "fx":
            self.net = _graph.tapped_fx(backbone.model, heads)
        else:
            self.net = _graph.TappedHooks(backbone.model, heads, self.catalogue.names)
        self.net.eval()
        self._placed: dict[str, tuple[tuple[int, ...], nn.Module]] = {}  # not submodules: (state, copy) per device

    def on(self, device: torch.device | str) -> nn.Module:
        """This extractor's network on ``device`` in channels_last, for running batches.

        The network shares its modules with the backbone, so moving or converting it in place would change the
        caller's model (and leave a discovery or a later run on the wrong device). Unless the network already sits
        on ``device`` in channels_last, a private copy is made there once and kept for later calls.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if _placed_on(self.net, device):
            return self.net.eval()
        key, state = str(device), _state_versions(self.net)
        placed = self._placed.get(key)
        if placed is None or placed[0] != state:  # first use, or the caller changed the weights since (load_state_dict)
            self._placed[key] = (state, copy.deepcopy(self.net).to(device, memory_format=torch.channels_last))
        return self._placed[key][1].eval()  # extraction always runs in eval mode, whatever the caller's model is in

    def forward(self, images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """``{tap: {pooling: (B, D) float32 tensor}}`` on the images' device."""
        return self.net(images)

    def code_dims(self) -> dict[tuple[str, str], int]:
        """``{(tap, pooling): D}`` in output order."""
        return {(t.name, p.name): t.code_dims(p) for t in self.taps for p in self.poolings}

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_placed": {}}  # device copies are rebuilt where they are needed


def _state_versions(net: nn.Module) -> tuple[int, ...]:
    """In-place change counters of every parameter and buffer: they move when weights or statistics are replaced."""
    return tuple(t._version for t in (*net.parameters(), *net.buffers()))


def _placed_on(net: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``net`` is on ``device`` and every 4-d weight is channels_last."""
    tensors = [*net.parameters(), *net.buffers()]
    return all(t.device == device for t in tensors) and all(
        t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last) for t in net.parameters()
    )
