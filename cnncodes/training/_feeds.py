"""Where the activations at a cut come from: a store's cache, or the frozen layers run live on decoded images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..images import ImageSource, PixelNormalizer, Preprocessing, pixel_transform, render_view, view_transform
from ..network import CodeExtractor, autocast_dtype, precision
from ..probing import check_finite

__all__ = ["CachedActivations", "LiveActivations"]


class CachedActivations:
    """Activations read from a store's ``(cut, "none")`` array; ``shape`` is one image's activation shape.

    A memory-mapped array is read row by row with positioned reads (``os.pread``), not through the mapping, so the
    pages of a cache larger than RAM never accumulate in this process: memory stays flat in the number of images.
    """

    def __init__(self, codes: Any, views: int, shape: Sequence[int]) -> None:
        self.codes, self.per, self.shape = codes, views + 1, tuple(shape)
        self.views = views
        self._file = getattr(codes, "filename", None)
        if self._file is not None:
            self._offset, self._dtype = int(codes.offset), np.dtype(codes.dtype)
            self._row_bytes = int(codes.shape[1]) * self._dtype.itemsize
            self._fd = os.open(self._file, os.O_RDONLY)

    def rows(self, images: np.ndarray, view: int) -> torch.Tensor:
        index = np.asarray(images) * self.per + view
        if self._file is None:
            block = np.asarray(self.codes[index], dtype=np.float32)
        else:
            raw = b"".join(os.pread(self._fd, self._row_bytes, self._offset + int(r) * self._row_bytes) for r in index)
            block = np.frombuffer(raw, dtype=self._dtype).astype(np.float32)
        return torch.from_numpy(check_finite(block.reshape(len(index), -1), index, "the cached activations")).reshape(
            len(index), *self.shape
        )

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            os.close(self._fd)


class LiveActivations:
    """Activations computed now: decode, render the seeded view, run the frozen layers up to the cut (eval mode)."""

    def __init__(self, source: ImageSource, extractor: CodeExtractor, pre: Preprocessing, seed: int,
                 augment: Sequence[str], device: torch.device, amp: bool = True) -> None:  # fmt: skip
        self.source, self.extractor, self.seed, self.device = source, extractor, seed, device
        self.dtype = autocast_dtype(device, amp)
        self.plain, self.augmented = pixel_transform(pre), view_transform(pre, augment)
        self.to_input = PixelNormalizer(pre, device)
        self.net = extractor.on(device)
        self.tap = extractor.taps[0]

    def rows(self, images: np.ndarray, view: int) -> torch.Tensor:
        pixels = torch.stack([render_view(self.source.load(int(i)), int(i), view, self.seed, self.plain, self.augmented)
                              for i in images])  # fmt: skip
        with torch.inference_mode(), precision(self.device, self.dtype):  # the numerics the cache was made at
            x = self.to_input(pixels.to(self.device)).contiguous(memory_format=torch.channels_last)
            flat = self.net(x)[self.tap.name]["none"].float()
        return flat.reshape(len(images), *self.tap.shape).clone()
