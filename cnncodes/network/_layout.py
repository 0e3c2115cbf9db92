"""What the axes of a tapped activation mean, worked out from the operations that made it.

A CNN code is only meaningful if pooling averages over *positions*, not over channels. Networks lay their activations
out in several ways: ``(B, C, H, W)`` for convolutions, ``(B, H, W, C)`` where a ConvNeXt or Swin block permutes before a
LayerNorm or Linear, ``(B, T, C)`` token sequences with class/register/distillation tokens in front of the patch tokens,
and ``(B, C)`` vectors. :class:`Layout` names these; :class:`AxisLabels` is the small algebra that follows axis meanings
through an FX graph (``permute``, ``flatten``, ``reshape``, ``cat``, indexing, reductions, last-axis ops), so the layout
of every node comes from the graph and the modules, never from which axis happens to be largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ParameterError

__all__ = ["LAYOUT_KINDS", "AxisLabels", "Layout"]

LAYOUT_KINDS = ("nchw", "nhwc", "tokens", "vector")

# Axis labels. SUB is a factor split off a labelled axis (a 2x2 patch-merge neighbourhood); UNK is anything else.
N, C, H, W, T, SUB, UNK = "N", "C", "H", "W", "T", "~", "?"


@dataclass(frozen=True)
class Layout:
    """The layout of one tap's activation (per image, batch axis excluded).

    Attributes
    ----------
    kind : {"nchw", "nhwc", "tokens", "vector"}
        Spatial channels-first ``(C, H, W)``, spatial channels-last ``(H, W, C)``, a token sequence ``(T, C)`` or a
        vector ``(C,)``.
    prefix : int
        Tokens only: how many class/register/distillation tokens precede the patch tokens.
    grid : tuple of int or None
        Tokens only: the patch grid ``(H, W)`` of the patch tokens, when the graph shows it.
    """

    kind: str
    prefix: int = 0
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ParameterError(f"layout kind {self.kind!r}; expected one of {LAYOUT_KINDS}.")

    @property
    def spatial(self) -> bool:
        return self.kind in ("nchw", "nhwc")

    def channels(self, shape: Sequence[int]) -> int:
        """Channels of an activation of this layout with per-image ``shape``."""
        return int(shape[0] if self.kind == "nchw" else shape[-1])

    def positions(self, shape: Sequence[int]) -> tuple[int, int] | None:
        """The ``(H, W)`` grid that spatial poolings reduce, or None (a vector, or tokens of unknown grid)."""
        if self.kind == "nchw":
            return int(shape[1]), int(shape[2])
        if self.kind == "nhwc":
            return int(shape[0]), int(shape[1])
        if self.kind == "tokens":
            return self.grid
        return None

    def describe(self) -> str:
        """Short text for tables: ``nchw``, ``nhwc``, ``tokens(1+14x14)``, ``vector``."""
        if self.kind != "tokens":
            return self.kind
        grid = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "?"
        return f"tokens({self.prefix}+{grid})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "tokens":
            out.update(prefix=self.prefix, grid=list(self.grid) if self.grid else None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        grid = data.get("grid")
        return cls(str(data["kind"]), int(data.get("prefix", 0)), tuple(int(g) for g in grid) if grid else None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AxisLabels:
    """Meaning of every axis of a tensor (batch included), plus token facts carried along the token axis."""

    axes: tuple[str, ...]
    prefix: int = 0
    grid: tuple[int, int] | None = None

    # ---- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def image(cls) -> AxisLabels:
        return cls((N, C, H, W))

    @classmethod
    def channels_first(cls, ndim: int) -> AxisLabels | None:
        return cls((N, C, H, W)) if ndim == 4 else cls((N, C)) if ndim == 2 else None

    @classmethod
    def channels_last(cls, ndim: int) -> AxisLabels | None:
        """Labels of the output of an op over the last axis (LayerNorm, Linear) whose input labels are unknown."""
        return {2: cls((N, C)), 3: cls((N, T, C)), 4: cls((N, H, W, C))}.get(ndim)

    # ---- the layout this labelling is, if any -------------------------------------------------------------------

    def layout(self) -> Layout | None:
        kind = {(N, C, H, W): "nchw", (N, H, W, C): "nhwc", (N, T, C): "tokens", (N, C): "vector"}.get(self.axes)
        if kind is None:
            return None
        return Layout(kind, self.prefix, self.grid) if kind == "tokens" else Layout(kind)

    # ---- operations ---------------------------------------------------------------------------------------------

    def permute(self, dims: Sequence[int]) -> AxisLabels | None:
        n = len(self.axes)
        dims = [d % n for d in dims]
        if sorted(dims) != list(range(n)):
            return None
        return replace(self, axes=tuple(self.axes[d] for d in dims))

    def transpose(self, a: int, b: int) -> AxisLabels:
        axes = list(self.axes)
        n = len(axes)
        axes[a % n], axes[b % n] = axes[b % n], axes[a % n]
        return replace(self, axes=tuple(axes))

    def last_axis_channels(self) -> AxisLabels | None:
        """After a Linear/LayerNorm over the last axis: that axis holds channels."""
        return replace(self, axes=self.axes[:-1] + (C,))

    def reduce(self, dims: Sequence[int], keepdim: bool) -> AxisLabels:
        n = len(self.axes)
        dims = {d % n for d in dims}
        if keepdim:
            return replace(self, axes=tuple(UNK if i in dims else a for i, a in enumerate(self.axes)))
        axes = tuple(a for i, a in enumerate(self.axes) if i not in dims)
        keeps_tokens = T in axes
        return AxisLabels(axes, self.prefix if keeps_tokens else 0, self.grid if keeps_tokens else None)

    def reshape(self, old: Sequence[int], new: Sequence[int]) -> AxisLabels:
        """Follow axis meanings through a reshape from shape ``old`` to ``new`` by aligning products of sizes."""
        groups = _align(list(old), list(new))
        if groups is None:
            return AxisLabels((UNK,) * len(new))
        out = [UNK] * len(new)
        prefix, grid = 0, None
        for src, dst in groups:
            if not dst:
                continue
            labels = [self.axes[i] for i in src]
            sizes = [new[j] for j in dst]
            if len(src) == 1 and len(dst) == 1:
                out[dst[0]] = labels[0]
                if labels[0] == T:
                    prefix, grid = self.prefix, self.grid
            elif len(dst) == 1:
                merged, grid_here = _merge(labels, [old[i] for i in src])
                out[dst[0]] = merged
                if merged == T:
                    grid = grid_here
            elif len(src) == 1:
                for j, label in zip(dst, _split(labels[0], sizes, self)):
                    out[j] = label
        return AxisLabels(tuple(out), prefix, grid)

    def flatten(self, shape: Sequence[int], start: int, end: int) -> AxisLabels:
        n = len(shape)
        start, end = start % n, end % n
        new = list(shape[:start]) + [math.prod(shape[start : end + 1])] + list(shape[end + 1 :])
        return self.reshape(shape, new)

    def index(self, key: Any, shape: Sequence[int]) -> AxisLabels | None:
        """Labels after ``x[key]`` for ints, slices, Ellipsis and None; None for tensor indexing."""
        items = list(key) if isinstance(key, tuple) else [key]
        if any(not (isinstance(k, (int, slice)) or k is None or k is Ellipsis) for k in items):
            return None
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = len(self.axes) - (len(items) - 1 - items.count(None))
            items = items[:at] + [slice(None)] * fill + items[at + 1 :]
        axes: list[str] = []
        prefix, grid = self.prefix, self.grid
        dim = 0
        for k in items:
            if k is None:
                axes.append(UNK)
                continue
            label = self.axes[dim]
            if isinstance(k, slice):
                axes.append(label)
                if label == T and k != slice(None):
                    start, stop, step = k.indices(shape[dim])
                    if step == 1 and start <= self.prefix and stop == shape[dim]:
                        prefix = self.prefix - start  # dropping prefix tokens keeps the patch tokens
                    else:
                        axes[-1], grid = UNK, None
            dim += 1
        axes.extend(self.axes[dim:])
        keeps_tokens = T in axes
        return AxisLabels(tuple(axes), prefix if keeps_tokens else 0, grid if keeps_tokens else None)

    def concat(self, dim: int, sizes_before: int) -> AxisLabels:
        """Labels after concatenating unlabelled tensors (class tokens, parameters) of total size ``sizes_before``
        in front of this one along ``dim``."""
        if self.axes[dim % len(self.axes)] == T:
            return replace(self, prefix=self.prefix + sizes_before)
        return self


def _align(old: list[int], new: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair groups of contiguous axes of ``old`` and ``new`` with equal size products (a reshape's structure)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        if old[i] == 1 and new[j] != 1:
            groups.append(([i], []))
            i += 1
            continue
        if new[j] == 1 and old[i] != 1:
            groups.append(([], [j]))
            j += 1
            continue
        src, dst, a, b = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i >= len(old):
                    return None
                a *= old[i]
                src.append(i)
                i += 1
            else:
                if j >= len(new):
                    return None
                b *= new[j]
                dst.append(j)
                j += 1
        groups.append((src, dst))
    groups += [([k], []) for k in range(i, len(old))] + [([], [k]) for k in range(j, len(new))]
    return groups


def _merge(labels: list[str], sizes: list[int]) -> tuple[str, tuple[int, int] | None]:
    real = [(lab, s) for lab, s in zip(labels, sizes) if s != 1]
    kinds = [lab for lab, _ in real]
    if N in kinds or UNK in kinds:
        return UNK, None
    if kinds == [H, W]:
        return T, (real[0][1], real[1][1])
    if C in kinds:  # (C, H, W) -> a flat code; (~, ~, C) -> the channels of a patch merge
        return C, None
    return UNK, None


def _split(label: str, sizes: list[int], labels: AxisLabels) -> list[str]:
    real = [s for s in sizes if s != 1]
    if label == T and labels.prefix == 0 and labels.grid is not None and tuple(real) == labels.grid:
        it = iter((H, W))
        return [next(it) if s != 1 else UNK for s in sizes]
    if label in (H, W, N) and real:
        first = sizes.index(real[0])
        return [label if k == first else (SUB if s != 1 else UNK) for k, s in enumerate(sizes)]
    return [UNK] * len(sizes)


def dims_arg(args: Sequence[Any], kwargs: dict[str, Any], position: int = 1) -> list[int] | None:
    """The ``dim`` argument of a reduction, as a list (None when absent: a full reduction)."""
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if dim is None:
        return None
    if isinstance(dim, int):
        return [dim]
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return list(dim)
    return None


REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nanmean"}
PERMUTES = {"permute"}
TRANSPOSES = {"transpose", "swapaxes", "swapdims"}
RESHAPES = {"reshape", "view", "unflatten", "view_as", "reshape_as"}
CATS = {"cat", "concat", "concatenate"}


# ---- labelling one operation ------------------------------------------------------------------------------------
# Shapes below include the batch axis. ``inputs`` are (labels, shape) of the op's tensor arguments in order, with
# labels None where unknown (parameters, class tokens, constants).

Input = tuple["AxisLabels | None", tuple[int, ...]]


def module_labels(module: Any, inputs: Sequence[Input], out_shape: Sequence[int]) -> AxisLabels | None:
    """Labels of a module's output, from what the module does to its input's axes."""
    from torch import nn

    ndim = len(out_shape)
    first = inputs[0] if inputs else (None, ())
    name = type(module).__name__
    if name == "Permute" and hasattr(module, "dims"):  # torchvision.ops.misc.Permute
        return first[0].permute(module.dims) if first[0] else None
    if isinstance(module, nn.Flatten):
        return first[0].flatten(first[1], module.start_dim, module.end_dim) if first[0] else None
    if name.lower().endswith("2d") or isinstance(module, nn.GroupNorm):  # convolutions, 2-d norms and pools: NCHW
        return AxisLabels.channels_first(ndim) or generic_labels(inputs, out_shape)
    last_axis_ops = tuple(c for c in (nn.Linear, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if c is not None)
    if isinstance(module, last_axis_ops):
        return last_axis_labels(inputs, ndim)
    return None


def last_axis_labels(inputs: Sequence[Input], ndim: int) -> AxisLabels | None:
    labels, shape = inputs[0] if inputs else (None, ())
    if labels is not None and len(shape) == ndim:
        return labels.last_axis_channels()
    return AxisLabels.channels_last(ndim)


def function_labels(name: str, inputs: Sequence[Input], args: Sequence[Any], kwargs: dict[str, Any],
                    out_shape: Sequence[int]) -> AxisLabels | None:  # fmt: skip
    """Labels of a function's or method's output (``name`` as in ``torch.permute`` or ``Tensor.view``).

    ``args``/``kwargs`` are the call's concrete values (tensors replaced), in the FX node's argument order.
    """
    labels, shape = inputs[0] if inputs else (None, ())
    if name in CATS:
        return _cat_labels(inputs, args, kwargs)
    if labels is None:
        return generic_labels(inputs, out_shape)
    if name in PERMUTES:
        dims = kwargs.get("dims", args[1:] if len(args) > 2 else args[1] if len(args) > 1 else None)
        return labels.permute(list(dims)) if dims is not None else None
    if name in TRANSPOSES and len(args) >= 3:
        return labels.transpose(int(args[1]), int(args[2]))
    if name == "flatten":
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
        return labels.flatten(shape, int(start), int(end))
    if name in RESHAPES:
        return labels.reshape(shape, out_shape)
    if name == "getitem":
        return labels.index(args[1], shape) if len(args) > 1 else None
    if name in ("max", "min", "maximum", "minimum") and len(inputs) > 1:  # elementwise between two tensors
        return generic_labels(inputs, out_shape)
    if name in REDUCTIONS or name in ("max", "min"):
        dims = dims_arg(args, kwargs)
        if dims is None:
            return None
        keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
        return labels.reduce(dims, keepdim)
    if name in ("linear", "layer_norm", "rms_norm"):
        return last_axis_labels(inputs, len(out_shape))
    if name in ("unsqueeze", "squeeze"):
        return labels.reshape(shape, out_shape)
    return generic_labels(inputs, out_shape)


def _cat_labels(inputs: Sequence[Input], args: Sequence[Any], kwargs: dict[str, Any]) -> AxisLabels | None:
    dim = int(kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else 0))
    for k, (labels, _) in enumerate(inputs):
        if labels is not None and labels.axes[dim % len(labels.axes)] == T:
            # Patch tokens joined with class/register/distillation tokens: those in front become the prefix; tokens
            # appended behind would be read as patches, so the grid is then unknown.
            before = sum(s[dim] for _, s in inputs[:k])
            joined = labels.concat(dim, before)
            return joined if k == len(inputs) - 1 else replace(joined, grid=None, axes=joined.axes)
    for labels, _ in inputs:
        if labels is not None:
            return labels
    return None


def generic_labels(inputs: Sequence[Input], out_shape: Sequence[int]) -> AxisLabels | None:
    """An op we do not model: elementwise and same-rank ops (add, activations, pad, pooling) keep their input's
    labels; an op that returns a (B, D) matrix from a labelled input gives a vector."""
    out_shape = tuple(out_shape)
    for labels, shape in inputs:
        if labels is not None and tuple(shape) == out_shape:
            return labels
    for labels, shape in inputs:
        if labels is not None and len(shape) == len(out_shape) and (not shape or shape[0] == out_shape[0]):
            return labels
    if len(out_shape) == 2 and any(lab is not None and s and s[0] == out_shape[0] for lab, s in inputs):
        return AxisLabels((N, C))
    return None
