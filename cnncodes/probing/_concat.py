"""Concatenated candidates: several taps' codes of the same images joined side by side, as one array-like.

DINOv2's linear evaluation concatenates the class tokens of the last four blocks (Oquab et al. 2023, section 7);
the same question for a CNN is whether two stages together beat either alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ParameterError

__all__ = ["CONCAT_SEP", "ConcatenatedCodes", "concat_name"]

#: Joins the tap names of a concatenated candidate (``layer3+layer4``); FX and hook names never contain it.
CONCAT_SEP = "+"


def concat_name(taps: Sequence[str]) -> str:
    """The candidate name of ``taps`` joined in order."""
    return CONCAT_SEP.join(taps)


class ConcatenatedCodes:
    """The codes of several (rows, dims_i) array-likes side by side: shape (rows, sum of dims_i).

    Supports ``shape``, ``dtype`` and NumPy row indexing; rows are read from each part when indexed, so parts that are
    a store's lazy handles stay on disk and pickle as paths.
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        if len(self.parts) < 2:
            raise ParameterError("a concatenated candidate needs at least two taps.")
        rows = {p.shape[0] for p in self.parts}
        if len(rows) != 1:
            raise ParameterError(f"the arrays to concatenate have different row counts {sorted(rows)}.")
        self.shape = (rows.pop(), int(sum(p.shape[1] for p in self.parts)))
        self.dtype = np.result_type(*[p.dtype for p in self.parts])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.concatenate([np.asarray(p[key], dtype=self.dtype) for p in self.parts], axis=1)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def __repr__(self) -> str:
        return f"ConcatenatedCodes({len(self.parts)} parts, shape={self.shape})"
