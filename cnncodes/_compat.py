"""Deprecated spellings kept for one release, in one place."""

from __future__ import annotations

import warnings
from typing import Any

from .errors import ParameterError

__all__ = ["deprecated_alias"]


def deprecated_alias(old: str, old_value: Any, new: str, new_value: Any, default: Any, stacklevel: int = 3) -> Any:
    """``new_value``, or ``old_value`` with a FutureWarning (pointing ``stacklevel`` frames up, at the caller's line)
    when the caller used the old keyword."""
    if old_value is None:
        return new_value
    if new_value is not None and new_value != default:
        raise ParameterError(
            f"got both {old}= and {new}=; {old}= is the deprecated spelling of {new}=, give only {new}=."
        )
    warnings.warn(
        f"{old}= is deprecated and will be removed in cnncodes 0.3; use {new}= instead.",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return old_value
