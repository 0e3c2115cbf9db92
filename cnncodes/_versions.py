"""Versions of the packages that shape codes and probes, recorded in stores and bundles."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["versions"]


def versions() -> dict[str, str]:
    """Versions of the packages that shape the codes, for the manifest."""
    import timm
    import torch
    import torchvision

    from . import __version__

    return {
        "cnncodes": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
