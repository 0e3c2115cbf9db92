"""Tiny coloured-square images shared by the examples (real runs use your own ImageFolder)."""

from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("red", "green", "blue")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (28, 28, 3), dtype=np.uint8)
            img[..., k] += 150
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return root
