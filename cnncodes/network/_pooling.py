"""Poolings that turn one tap's activation into a (B, D) code, on the device, before the copy to the host.

Every pooling reads the activation through its :class:`~cnncodes.layout.Layout`: spatial poolings reduce the positions
of a channels-first map, a channels-last map or a token sequence's patch grid, never the channels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PoolingError
from ._layout import Layout

__all__ = ["Pooling", "parse_poolings"]

_PATTERN = re.compile(r"^(avg|max)(\d*)$|^(none|cls|mean)$")
_FORMS = (
    "avg, max, avgK or maxK (K x K grid, e.g. avg2, avg4), none (flatten), and for token taps cls (class token) and "
    "mean (mean of the patch tokens); comma-separated: --poolings avg,avg2"
)


def _default_layout(x_or_shape_ndim: int) -> Layout:
    return Layout("nchw") if x_or_shape_ndim >= 3 else Layout("vector")


@dataclass(frozen=True)
class Pooling:
    """One pooling: ``avg``/``max`` (global), ``avgK``/``maxK`` (adaptive K x K grid), ``none`` (flatten as the network
    laid it out), ``cls`` (the first prefix token of a token tap) or ``mean`` (the mean of the patch tokens; ``avg`` on
    spatial taps).

    On token taps, ``avg``/``max``/``avgK`` pool the patch tokens only (prefix tokens excluded), over the patch grid.
    Grid codes are flattened channel-major for every layout: feature ``c * K * K + i * K + j`` is channel ``c`` at cell
    ``(i, j)``. A vector tap's code is the vector itself for every pooling but ``cls``.
    """

    kind: str
    grid: int = 1

    @property
    def name(self) -> str:
        if self.kind in ("none", "cls", "mean"):
            return self.kind
        return self.kind if self.grid == 1 else f"{self.kind}{self.grid}"

    def check(self, layout: Layout, tap: str = "this tap", shape: Sequence[int] | None = None) -> None:
        """Raise :class:`PoolingError` if this pooling cannot read a tap of ``layout`` (and per-image ``shape``)."""
        grid = layout.positions(shape) if shape is not None and layout.kind != "vector" else None
        if self.kind in ("avg", "max") and grid and self.grid > 2 * max(grid):  # overlapping bins are fine up to 2x
            raise PoolingError(
                f"pooling {self.name!r} asks for a {self.grid}x{self.grid} grid, but {tap} is only {grid[0]}x{grid[1]}: "
                f"use a grid of at most {2 * max(grid)} (or none for every position)."
            )
        if self.kind == "cls" and not (layout.kind == "tokens" and layout.prefix >= 1):
            raise PoolingError(
                f"pooling 'cls' needs a token tap with a class token; {tap} is {layout.describe()}. Use avg or mean."
            )
        if self.kind in ("avg", "max") and self.grid > 1 and layout.kind == "tokens" and layout.grid is None:
            raise PoolingError(
                f"pooling {self.name!r} needs the patch grid of token tap {tap}, which its graph does not show; "
                "use avg, max, mean or cls."
            )

    def dims(self, shape: Sequence[int], layout: Layout | None = None) -> int:
        """Code length for an activation of per-image ``shape`` laid out as ``layout`` (default: from its rank)."""
        layout = layout or _default_layout(len(shape))
        if layout.kind == "vector":
            return int(shape[0])
        if self.kind == "none":
            return int(math.prod(shape))
        channels = layout.channels(shape)
        return int(channels if self.kind in ("cls", "mean") else channels * self.grid * self.grid)

    def __call__(self, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        layout = layout or _default_layout(x.ndim)
        if layout.kind == "vector":
            return x.flatten(1)
        if self.kind == "none":
            return x.flatten(1)
        if layout.kind == "tokens":
            if self.kind == "cls":
                return x[:, 0]
            patches = x[:, layout.prefix :]
            if self.grid == 1:
                return patches.amax(1) if self.kind == "max" else patches.mean(1)
            gh, gw = layout.grid  # type: ignore[misc]  # check() refuses a grid pooling without a grid
            fmap = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
        elif layout.kind == "nhwc":
            fmap = x.permute(0, 3, 1, 2)
        else:
            fmap = x
        if self.kind == "max":
            return F.adaptive_max_pool2d(fmap, self.grid).flatten(1)
        return F.adaptive_avg_pool2d(fmap, self.grid).flatten(1)

    def __str__(self) -> str:
        return self.name


def parse_poolings(spec: str | Sequence[str | Pooling]) -> list[Pooling]:
    """Parse ``"avg,avg2,max"`` (or a list) into :class:`Pooling` objects, keeping order and dropping repeats.

    Raises
    ------
    PoolingError
        For an unknown name; the message lists the accepted forms.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Pooling] = []
    for item in items:
        if isinstance(item, Pooling):
            pooling = item
        else:
            text = str(item).strip().lower()
            match = _PATTERN.match(text)
            if not match or (match.group(2) and int(match.group(2)) < 1):
                raise PoolingError(f"unknown pooling {item!r}; use {_FORMS}.")
            pooling = Pooling(match.group(3)) if match.group(3) else Pooling(match.group(1), int(match.group(2) or 1))
        if pooling not in out:
            out.append(pooling)
    if not out:
        raise PoolingError(f"no pooling given; use {_FORMS}.")
    return out
