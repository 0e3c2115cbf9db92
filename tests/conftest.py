"""Shared fixtures. Helpers live in the ``helpers`` test package (``from helpers import ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helpers package, for tests and their child processes

from helpers import make_images, make_tiny_backbone  # noqa: E402


@pytest.fixture
def tiny_backbone():
    return make_tiny_backbone()


@pytest.fixture
def tiny_images():
    return make_images()
