"""Running a code extractor over an image source, batch by batch: decode in DataLoader workers, normalize on the
device, forward once, pool, and bring the codes back to the host. Used by the extraction run, prediction and the
scikit-learn adapter; writes nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import ImageDecodeError, ParameterError
from ..images import ImageSource, Preprocessing, normalize, pixel_transform, render_views, view_transform
from ._extractor import CodeExtractor

__all__ = ["encode", "resolve_device", "images_per_batch", "ImageViews"]

DTYPES = ("float16", "float32")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; validates ``cuda:i``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ParameterError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:INDEX.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"device={device!r} but CUDA is not available here; use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    return dev


class ImageViews(Dataset):
    """Image ``i`` -> (uint8 views (1+K, 3, S, S), image index, error reason or ``""``).

    A bad image yields zeros and its reason instead of raising, so one file never kills a long run and rows stay
    aligned with images.
    """

    def __init__(
        self,
        source: ImageSource,
        pre: Preprocessing,
        views: int,
        seed: int,
        augment: Sequence[str],
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.source = source
        self.pre = pre
        self.views = views
        self.seed = seed
        self.augment = tuple(augment)
        self.start = start
        self.stop = len(source) if stop is None else stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.start + i
        if not hasattr(self, "_plain"):  # built lazily so worker processes build their own
            self._plain = pixel_transform(self.pre)
            self._aug = view_transform(self.pre, self.augment) if self.views else None
        try:
            image = self.source.load(index)
            return render_views(image, index, self.views, self.seed, self._plain, self._aug), index, ""
        except ImageDecodeError as exc:
            size = self.pre.input_size
            return torch.zeros(self.views + 1, 3, size, size, dtype=torch.uint8), index, exc.reason


def images_per_batch(batch_size: int, views: int) -> int:
    """Images per forward pass: ``batch_size`` rows rounded down to whole images (at least one)."""
    return max(1, batch_size // (views + 1))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the forward pass for cores


def _default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cores)
    # On CPU the forward pass already uses every core; decoding processes only pay off with cores to spare.
    return 0 if cores <= 4 else min(4, cores // 4)


@dataclass
class Batch:
    codes: dict[tuple[str, str], torch.Tensor]  # host tensors (rows, dims) at the storage dtype
    index: list[int]  # image indices
    reasons: list[str]  # "" or why the image failed
    rows: int


def iter_batches(
    extractor: CodeExtractor,
    images: ImageSource,
    pre: Preprocessing,
    *,
    dev: torch.device,
    views: int = 0,
    seed: int = 0,
    augment: Sequence[str] = ("crop", "flip"),
    start_image: int = 0,
    stop_image: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    amp: bool = True,
    dtype: str = "float32",
) -> Iterator[Batch]:
    """Decode, normalize on the device, run the extractor, pool, and bring codes back to the host, batch by batch."""
    cuda = dev.type == "cuda"
    loader = DataLoader(
        ImageViews(images, pre, views, seed, augment, start=start_image, stop=stop_image),
        batch_size=images_per_batch(batch_size, views),
        shuffle=False,
        num_workers=_default_workers(dev) if workers is None else workers,
        pin_memory=cuda,
        worker_init_fn=_worker_init,
    )
    net = extractor.to(dev, memory_format=torch.channels_last)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if cuda and amp
        else nullcontext()
    )
    store_dtype = getattr(torch, dtype)
    keys = list(extractor.code_dims())
    for batch, index, reasons in loader:
        with torch.inference_mode():  # entered per batch: a generator must not leak the mode to its consumer
            pixels = batch.flatten(0, 1).to(dev, non_blocking=cuda)
            x = normalize(pixels, pre).contiguous(memory_format=torch.channels_last)
            with autocast:
                codes = net(x)
            host = {(t, p): codes[t][p].to(store_dtype).to("cpu", non_blocking=cuda) for t, p in keys}
            if cuda:
                torch.cuda.current_stream().synchronize()
        yield Batch(host, [int(i) for i in index], list(reasons), x.shape[0])


def encode(
    images: ImageSource,
    extractor: CodeExtractor,
    pre: Preprocessing,
    *,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = 0,
    amp: bool = True,
    progress: bool = False,
) -> tuple[dict[tuple[str, str], np.ndarray], list[str]]:
    """Codes of every image, in memory (no store): ``({(tap, pooling): (n, dims) float32}, reasons)``.

    ``reasons[i]`` is ``""`` or why image ``i`` could not be decoded (its codes rows are then zeros).
    """
    dev = resolve_device(device)
    parts: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in extractor.code_dims()}
    reasons: list[str] = []
    with tqdm(total=len(images), unit="img", disable=not progress, desc="encode", dynamic_ncols=True) as bar:
        for b in iter_batches(extractor, images, pre, dev=dev, batch_size=batch_size, workers=workers, amp=amp):
            for key, codes in b.codes.items():
                parts[key].append(codes.numpy())
            reasons.extend(b.reasons)
            bar.update(b.rows)
    return {k: np.concatenate(v) for k, v in parts.items()}, reasons
