"""Running a code extractor over an image source, batch by batch: decode (in DataLoader workers, or on a few threads
of this process between forward passes), normalize on the device, forward once, pool, and bring the codes back to the
host. Used by the extraction run, prediction and the scikit-learn adapter; writes nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from tqdm.auto import tqdm

from ..errors import ImageDecodeError, ParameterError
from ..images import ImageSource, PixelNormalizer, Preprocessing, pixel_transform, render_views_hwc, view_transform
from ._extractor import CodeExtractor

__all__ = ["encode", "resolve_device", "images_per_batch", "ImageViews", "autocast_dtype", "numerics", "precision"]

DTYPES = ("float16", "float32")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; validates ``cuda:i``. A CUDA device always comes back with its
    index (a bare ``cuda`` is the current device), so every later call names the device it means."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ParameterError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:INDEX.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"device={device!r} but CUDA is not available here; use --device cpu (or auto).")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ParameterError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    return dev


def autocast_dtype(dev: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype the network runs in on ``dev``: bfloat16 where the GPU has it natively, else float16; ``None`` (float32)
    on the CPU or without ``amp``."""
    if dev.type != "cuda" or not amp:
        return None
    with torch.cuda.device(dev):  # the question is about this GPU, not GPU 0
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float16


def numerics(dev: torch.device, amp: bool) -> dict[str, Any]:
    """What the exact values of codes depend on beyond the model and the images: the device type, the precision the
    network runs in and, on CUDA, the GPU model and the CUDA and cuDNN versions; always the torch version.

    Stores record it in their config (a resume or merge under other numerics is refused) and bundles carry it (a
    prediction runs at the same precision by default)."""
    precision = autocast_dtype(dev, amp) or torch.float32
    out: dict[str, Any] = {
        "device": dev.type,
        "precision": str(precision).removeprefix("torch."),
        "torch": torch.__version__,
    }
    if dev.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return out


@contextmanager
def precision(dev: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Run at the precision :func:`numerics` records: autocast to ``dtype``, or, on CUDA without it, IEEE float32
    (cuDNN convolutions and matmuls otherwise default to TF32)."""
    if dev.type != "cuda":
        yield
    elif dtype is not None:
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved


def _on(dev: torch.device) -> contextlib.AbstractContextManager:
    """Make ``dev`` the current CUDA device for a block (restored after): pinned-memory threads, streams and
    allocations then belong to it, not to GPU 0."""
    return torch.cuda.device(dev) if dev.type == "cuda" else nullcontext()


class _Fence:
    """Marks the point in ``dev``'s stream after a batch's device-to-host copies; :meth:`wait` returns once they landed."""

    def __init__(self, dev: torch.device) -> None:
        self.event = None
        if dev.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(dev))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class ImageViews(Dataset):
    """Image ``i`` -> (uint8 views (1+K, S, S, 3) channels last, image index, error reason or ``""``).

    A bad image yields zeros and its reason instead of raising, so one file never kills a long run and rows stay
    aligned with images. With ``threads > 1``, a batch fetched in this process (``DataLoader(num_workers=0)``) is
    decoded on that many threads: Pillow releases the GIL while it decodes and resizes, and on the CPU the cores the
    forward pass uses are idle meanwhile. Worker processes always decode on one thread.
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
        threads: int = 1,
    ) -> None:
        self.source = source
        self.pre = pre
        self.views = views
        self.seed = seed
        self.augment = tuple(augment)
        self.start = start
        self.stop = len(source) if stop is None else stop
        self.threads = threads

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _build(self) -> None:
        if not hasattr(self, "_plain"):  # built lazily so worker processes build their own
            self._plain = pixel_transform(self.pre)
            self._aug = view_transform(self.pre, self.augment) if self.views else None

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, str]:
        index = self.start + i
        self._build()
        try:
            image = self.source.load(index)
            return render_views_hwc(image, index, self.views, self.seed, self._plain, self._aug), index, ""
        except ImageDecodeError as exc:
            size = self.pre.input_size
            return np.zeros((self.views + 1, size, size, 3), dtype=np.uint8), index, exc.reason

    def __getitems__(self, indices: list[int]) -> list[tuple[np.ndarray, int, str]]:
        """A whole batch, what ``DataLoader`` fetches: on ``threads`` threads when fetched in this process."""
        if self.threads < 2 or get_worker_info() is not None or len(indices) < 2:
            return [self[i] for i in indices]
        self._build()  # once, before the threads share the transforms
        # A pool per batch: starting two threads costs microseconds, and nothing outlives the batch.
        with ThreadPoolExecutor(min(self.threads, len(indices)), thread_name_prefix="cnncodes-decode") as pool:
            return list(pool.map(self.__getitem__, indices))


def _collate_views(items: list[tuple[np.ndarray, int, str]]) -> tuple[torch.Tensor, list[int], list[str]]:
    """:class:`ImageViews` items -> (uint8 (B, 1+K, S, S, 3), indices, reasons).

    In this process NumPy stacks the pixels: torch's stack would run on the intra-op thread pool, whose threads
    wait for each other on every call and stall for a scheduler slice when another process holds a core. A worker
    process keeps torch's collate, which stacks straight into shared memory (and runs on one thread there).
    """
    if get_worker_info() is not None:
        return default_collate(items)
    pixels, index, reasons = zip(*items)
    return torch.from_numpy(np.stack(pixels)), list(index), list(reasons)


def images_per_batch(batch_size: int, views: int) -> int:
    """Images per forward pass: ``batch_size`` rows rounded down to whole images (at least one)."""
    return max(1, batch_size // (views + 1))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the forward pass for cores


def _core_share(processes: int | None) -> int:
    """Cores for one extraction process when ``processes`` of them share the node (default: torchrun's
    ``LOCAL_WORLD_SIZE``, else 1)."""
    if processes is None:
        text = os.environ.get("LOCAL_WORLD_SIZE", "1") or "1"
        if not text.isdigit() or int(text) < 1:
            raise ParameterError(f"LOCAL_WORLD_SIZE={text!r} in the environment is not a positive integer; unset it "
                                 "or set it to the number of processes on this node.")  # fmt: skip
        processes = int(text)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def default_workers(device: torch.device, processes: int | None = None) -> int:
    """Decoding processes for one extraction process on ``device``, when ``processes`` extraction processes share the
    node's cores (default: torchrun's ``LOCAL_WORLD_SIZE``, else 1)."""
    share = _core_share(processes)
    if device.type == "cuda":
        return min(8, share)
    # On CPU the forward pass already uses every core; decoding processes only pay off with cores to spare.
    return 0 if share <= 4 else min(4, share // 4)


def _decode_threads(device: torch.device, processes: int | None = None) -> int:
    """Threads that decode a batch in this process when there are no decoding processes: on the CPU the threads the
    forward pass runs on (idle while a batch is decoded), on CUDA this process's share of the cores (at most 8)."""
    if device.type == "cpu":
        return max(1, torch.get_num_threads())
    return min(8, _core_share(processes))


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
    """Decode, normalize on the device, run the extractor, pool, and bring codes back to the host, batch by batch.

    On CUDA, batch ``i + 1`` is launched before batch ``i`` is waited for, so the GPU never idles while the host hands
    a batch over; each batch's copies are fenced by an event on ``dev``'s own stream. The caller's backbone is never
    moved or converted: the network runs from the extractor's private copy on ``dev`` (:meth:`CodeExtractor.on`).
    """
    cuda = dev.type == "cuda"
    workers = default_workers(dev) if workers is None else workers
    threads = 1 if workers else _decode_threads(dev)
    dataset = ImageViews(images, pre, views, seed, augment, start=start_image, stop=stop_image, threads=threads)
    loader = DataLoader(
        dataset,
        batch_size=images_per_batch(batch_size, views),
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_views,
        pin_memory=cuda,
        worker_init_fn=_worker_init,
    )
    with _on(dev):
        net = extractor.on(dev)
        to_input = PixelNormalizer(pre, dev)
        batches = iter(loader)  # its pin-memory thread pins for the current device: dev
    run_dtype = autocast_dtype(dev, amp)
    store_dtype = getattr(torch, dtype)
    keys = list(extractor.code_dims())

    def launch(batch: torch.Tensor) -> tuple[dict[tuple[str, str], torch.Tensor], _Fence, int]:
        with _on(dev), torch.inference_mode(), precision(dev, run_dtype):
            # (B, 1+K, S, S, 3) read as (rows, 3, S, S) is channels_last already: no transpose before the network.
            pixels = batch.flatten(0, 1).permute(0, 3, 1, 2)
            x = to_input(pixels.to(dev, non_blocking=cuda)).contiguous(memory_format=torch.channels_last)
            codes = net(x)
            host = {(t, p): codes[t][p].to(store_dtype).to("cpu", non_blocking=cuda) for t, p in keys}
            return host, _Fence(dev), x.shape[0]

    pending: Batch | None = None
    fence = _Fence(torch.device("cpu"))
    while True:
        try:
            with _on(dev):
                item = next(batches, None)
            if item is not None:
                batch, index, reasons = item
                host, next_fence, rows = launch(batch)
        except BaseException:
            if pending is not None:  # hand over the batch already computed before the error surfaces
                fence.wait()
                yield pending
            raise
        if pending is not None:  # batch i is collected only now that batch i + 1 is queued on the device
            fence.wait()
            yield pending
        if item is None:
            return
        pending, fence = Batch(host, [int(i) for i in index], list(reasons), rows), next_fence


def encode(
    images: ImageSource,
    extractor: CodeExtractor,
    pre: Preprocessing,
    *,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
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
