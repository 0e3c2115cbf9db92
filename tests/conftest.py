"""Shared fixtures: tiny networks and tiny seeded images, so the suite runs in minutes on two CPU cores."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from cnncodes import Preprocessing, load_backbone


class TinyNet(nn.Module):
    """A small CNN with the traps real networks have: in-place ReLUs, one ReLU module reused, a residual `+=`."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(2 * width, 5)
        with torch.no_grad():  # non-trivial BN statistics so pre-activation values are clearly signed
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        y = self.conv_b(self.relu(self.conv_a(x)))
        y += x
        y = self.relu(y)
        z = self.act(self.down(y))
        return self.head(z.mean((2, 3)))


TINY_PRE = Preprocessing(input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_tiny_backbone(delay: float = 0.0):
    """The tiny backbone; ``delay`` seconds of sleep per forward make a run slow enough to interrupt."""
    torch.manual_seed(0)
    backbone = load_backbone(TinyNet(), preprocessing=TINY_PRE)
    if delay:  # a hook, not code in forward: FX tracing would drop a sleep
        backbone.model.stem.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return backbone


@pytest.fixture
def tiny_backbone():
    return make_tiny_backbone()


def make_images(n: int = 24, size: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    base[..., labels % 3] //= 4  # a learnable colour cue per class
    return base, labels


@pytest.fixture
def tiny_images():
    return make_images()


#: What a synthetic store says made its codes: enough for a bundle, though no network can recompute them.
SYNTHETIC_MODEL = {"spec": "module:synthetic", "weights": "none", "fingerprint": "sha256:" + "0" * 64,
                   "preprocessing": TINY_PRE.to_dict()}  # fmt: skip


def make_code_store(path, n_images: int = 150, views: int = 0, dims: dict | None = None, seed: int = 0, n_classes: int = 3):
    """A complete store of synthetic codes written through the real StoreWriter.

    Tap ``mid`` separates the classes well, ``early`` weakly and ``late`` not at all, so a sweep must pick ``mid``.
    """
    from cnncodes.store import ArraySpec, StoreWriter

    dims = dims or {"early": 6, "mid": 12, "late": 8}
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % n_classes
    strength = {"early": 0.6, "mid": 3.0, "late": 0.0}
    specs = [ArraySpec(t, p, d, "float32", True, False, depth=i) for i, (t, d) in enumerate(dims.items()) for p in ("avg",)]
    writer = StoreWriter(path, arrays=specs, sources=[f"img{i}.png" for i in range(n_images)], labels=labels,
                         classes=[f"c{k}" for k in range(n_classes)], views=views, config={"synthetic": seed}, info={"model": SYNTHETIC_MODEL})  # fmt: skip
    rows = n_images * (views + 1)
    row_labels = np.repeat(labels, views + 1)
    codes = {}
    for spec in specs:
        centers = rng.normal(size=(n_classes, spec.dims)) * strength.get(spec.tap, 1.0)
        codes[spec.file] = (centers[row_labels] + rng.normal(size=(rows, spec.dims))).astype(np.float32)
    writer.write(0, codes)
    writer.commit(rows)
    store = writer.finalize()
    writer.close()
    return store
