"""Poolings that turn a (B, C, H, W) activation into a (B, D) code, on the device, before the copy to the host."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Pooling", "parse_poolings"]

_PATTERN = re.compile(r"^(avg|max)(\d*)$|^none$")


@dataclass(frozen=True)
class Pooling:
    """One pooling: global (``avg``, ``max``), adaptive K x K grid (``avg4``, ``max2``) or ``none`` (flatten).

    Grid codes are flattened channel-major: feature ``c * K * K + i * K + j`` is channel ``c`` at cell ``(i, j)``.
    """

    kind: str
    grid: int = 1

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        return self.kind if self.grid == 1 else f"{self.kind}{self.grid}"

    def dims(self, shape: Sequence[int]) -> int:
        """Code length for an activation of shape (C, H, W) or (C,)."""
        if len(shape) == 1:
            return int(shape[0])
        c, h, w = shape
        if self.kind == "none":
            return int(c * h * w)
        return int(c * self.grid * self.grid)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # already a vector per sample
            return x
        if self.kind == "none":
            return x.flatten(1)
        if self.kind == "avg":
            return F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        return F.adaptive_max_pool2d(x, self.grid).flatten(1)

    def __str__(self) -> str:
        return self.name


def parse_poolings(spec: str | Sequence[str | Pooling]) -> list[Pooling]:
    """Parse ``"avg,avg2,max"`` (or a list) into :class:`Pooling` objects, keeping order and dropping repeats.

    Raises
    ------
    ValueError
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
                raise ValueError(
                    f"unknown pooling {item!r}; use avg, max, avgK or maxK (K x K grid, e.g. avg2, avg4) or none "
                    "(flatten), comma-separated: --pool avg,avg2."
                )
            pooling = Pooling("none") if text == "none" else Pooling(match.group(1), int(match.group(2) or 1))
        if pooling not in out:
            out.append(pooling)
    if not out:
        raise ValueError("no pooling given; use for example --pool avg or --pool avg,avg4.")
    return out
