"""How a multi-label image's classes are written as text (``cat;dog``): in CSV sources, reports and predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MULTILABEL_SEP", "label_text"]

#: Separates the classes of a multi-label image in a CSV label cell, a report and a prediction.
MULTILABEL_SEP = ";"


def label_text(label: Any, classes: Sequence[str]) -> str:
    """A label as text: the class of an index, or the classes of a 0/1 multi-label row joined by ``;`` (``""``: none)."""
    if np.ndim(label):
        return MULTILABEL_SEP.join(c for c, on in zip(classes, label) if on)
    return classes[int(label)]
