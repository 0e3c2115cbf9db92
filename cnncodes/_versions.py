"""Versions of the packages that shape codes and probes, recorded in stores and bundles."""

from __future__ import annotations

import sys
from importlib import metadata

import numpy as np

__all__ = ["versions"]


def _version(package: str) -> str:
    """The package's installed version, read from its metadata: importing timm and torchvision only to read a version
    would cost a sweep seconds (local build labels such as ``+cu130`` are the numerics' business, not recorded here)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        module = sys.modules.get(package)
        return str(getattr(module, "__version__", "not installed"))


def versions() -> dict[str, str]:
    """Versions of the packages that shape the codes, for the manifest."""
    from . import __version__

    return {
        "cnncodes": __version__,
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
