"""`extract`: run a frozen backbone once over images and fill a code store.

The one place that joins images, the network and the store: images come from :mod:`cnncodes.images`, codes from
:class:`~cnncodes.network.CodeExtractor` batch by batch, and rows go to the store writer on a background thread so
disk writes overlap the next forward pass.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._compat import deprecated_alias
from .._versions import versions
from ..errors import (
    ExtractionError,
    ImageDecodeError,
    IncompleteStoreError,
    ParameterError,
    SourceError,
    StoreError,
    StoreMismatchError,
)
from ..images import ImageSource, Preprocessing, open_source, parse_augment
from ..network import (
    DEFAULT_MODEL,
    DTYPES,
    Backbone,
    CodeExtractor,
    Pooling,
    images_per_batch,
    iter_batches,
    load_backbone,
    numerics,
    resolve_device,
)
from ..store import (
    ArraySpec,
    CodeStore,
    Shard,
    ShardLayout,
    SharedStoreWriter,
    StoreWriter,
    check_merge_target,
    merge_shards,
    same_settings,
    shard_path,
)
from ._plan import launched_by_torchrun, launcher_device, parse_devices, parse_shard

__all__ = ["extract"]

#: Rows are made durable (fsync + progress) at most this often: a crash redoes at most these seconds of work, and a
#: fast GPU is not held up by a flush per batch. A resume continues exactly from the last commit.
COMMIT_SECONDS = 2.0

_MAX_WORKERS = max(64, 8 * (os.cpu_count() or 1))  # decoding processes; more only exhausts the machine


def extract(
    source: Any,
    *,
    out: str | os.PathLike,
    model: str | nn.Module | Backbone = DEFAULT_MODEL,
    taps: str | Iterable[str] = "stages",
    poolings: str | Sequence[str | Pooling] = "avg",
    weights: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
    input_size: int | None = None,
    relu: str | bool = "auto",
    dtype: str = "float16",
    views: int = 0,
    seed: int = 0,
    augment: str | Sequence[str] = "crop,flip",
    labels: Any = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    amp: bool = True,
    on_error: str = "skip",
    max_pixels: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard: str | tuple[int, int] | Shard | None = None,
    devices: str | Sequence[str] | None = None,
    merge: bool | None = None,
    shared: bool = False,
    layers: str | Iterable[str] | None = None,
    pool: str | Sequence[str | Pooling] | None = None,
) -> CodeStore:
    """Extract CNN codes from images into a memory-mapped code store.

    One forward pass per batch serves every requested tap and pooling, and the network stops after the deepest tap.
    Rerunning the same call after a crash resumes from the last committed batch; the finished store is identical to
    one from an uninterrupted run.

    Parameters
    ----------
    source : str, path, ndarray, Dataset or ImageSource
        An ImageFolder directory, a ``path,label`` CSV, an unlabeled folder, uint8 images (N, H, W[, 3]), a torch
        Dataset, or ``"demo:digits"``.
    out : path
        Store directory.
    model : str, nn.Module or Backbone, default="efficientnet_lite0"
        Model spec (see :func:`cnncodes.load_backbone`).
    taps : str or list of str, default="stages"
        Tap names or selections: ``stages``, ``expanded``, ``rectified``, ``all``, ``last:K`` (see
        :func:`cnncodes.list_taps`).
    poolings : str or list, default="avg"
        Poolings, e.g. ``"avg,avg4"``.
    weights, preprocessing, input_size
        Passed to :func:`cnncodes.load_backbone`.
    relu : {"auto", "always", "never"}, default="auto"
        ``auto`` rectifies the taps the network thresholds itself (a ReLU-family output, or a tap the network feeds
        to one) and keeps raw values elsewhere; ``always`` rectifies every tap; ``never`` keeps raw values. Recorded
        per array in the manifest. ``True``/``False`` mean ``always``/``never``.
    dtype : {"float16", "float32"}, default="float16"
    views : int, default=0
        Augmented views per image stored after the plain view.
    seed : int, default=0
        Seed of the augmented views; a view's pixels depend only on (seed, image, view).
    augment : str or list, default="crop,flip"
        Augmentations combined in a view: ``crop`` (random resized crop), ``flip``, ``color``.
    labels : array-like, optional
        Labels for an array source.
    batch_size : int, default=64
        Images per forward pass (with views: rows per pass, rounded down to whole images).
    workers : int, optional
        DataLoader decoding processes; default depends on the device and core count.
    device : str, default="auto"
        ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
    amp : bool, default=True
        On CUDA, run the network in bfloat16 (float16 where bf16 is unsupported); codes are pooled in float32.
    on_error : {"skip", "raise"}, default="skip"
        Bad images are recorded in the manifest's ``errors`` and left out, or stop the run naming the file.
    max_pixels : int, optional
        Reject larger images as decompression bombs (default: Pillow's limit).
    overwrite : bool, default=False
        Replace a store made with other settings.
    progress : bool, default=True
        Show a progress bar with images/s and ETA.
    shard : "I/N", (I, N), "auto" or None
        Extract only shard ``I`` of ``N`` (a contiguous slice of whole batches) into ``out/shards/I-of-N``; join the
        shards with :func:`cnncodes.merge_shards` (``cnncodes merge``). ``"auto"`` reads torchrun or Slurm array
        variables; ``None`` never reads the environment, so a call inside your own torchrun job stays one
        extraction. Each shard resumes on its own.
    devices : str or list of str, optional
        Split the work over these devices, one process each (``"cuda:0,cuda:1"``), then merge; the result equals a
        one-process run.
    merge : bool, optional
        After this shard, merge all shards if every one is complete (the last shard to finish merges). Default:
        on under torchrun and ``devices``, off for an explicit ``shard``.
    shared : bool, default=False
        With ``shard``: write straight into the arrays of one store at ``out`` preallocated on shared storage,
        instead of ``out/shards/I-of-N``; the last shard to finish publishes it, so no merge (and no second copy)
        is needed.
    layers, pool
        Deprecated spellings of ``taps`` and ``poolings``; removed in cnncodes 0.3.

    Returns
    -------
    CodeStore
        The complete store; for a shard that did not merge, the shard's own store (with ``shared``: the
        still-incomplete shared store).
    """
    taps = deprecated_alias("layers", layers, "taps", taps, "stages")
    poolings = deprecated_alias("pool", pool, "poolings", poolings, "avg")
    if dtype not in DTYPES:
        raise ParameterError(f"dtype={dtype!r}; use one of {DTYPES}.")
    if on_error not in ("skip", "raise"):
        raise ParameterError(f"on_error={on_error!r}; use 'skip' (record and continue) or 'raise'.")
    if workers is not None and (type(workers) is not int or not 0 <= workers <= _MAX_WORKERS):
        raise ParameterError(
            f"workers={workers!r}; use 0 (decode in this process) up to {_MAX_WORKERS}, or leave it unset."
        )
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise ParameterError(f"seed={seed!r}; use an integer in [0, 2**32) (--seed 0).")
    if batch_size < 1 or views < 0:
        raise ParameterError(f"need batch_size >= 1 and views >= 0, got batch_size={batch_size}, views={views}.")
    augment = parse_augment(augment)
    part, device_list, launched, device = _split_plan(shard, devices, device, shared, overwrite, merge)
    dev = resolve_device(device) if len(device_list) < 2 else None
    run_numerics = numerics(dev or resolve_device(device_list[0]), amp)
    images = open_source(source, labels=labels, max_pixels=max_pixels)
    backbone = (
        model
        if isinstance(model, Backbone)
        else load_backbone(model, weights=weights, preprocessing=preprocessing, input_size=input_size)
    )
    extractor = CodeExtractor(backbone, taps, poolings, relu=relu)
    relu = extractor.relu

    specs = [
        ArraySpec(
            t.name,
            p.name,
            t.code_dims(p),
            dtype,
            rectified=t.codes_rectified(relu),
            relu_applied=extractor.relu_applied[t.name],
            depth=t.index,
            layout=t.layout.to_dict(),
            relu=relu,
        )  # fmt: skip
        for t in extractor.taps
        for p in extractor.poolings
    ]
    config = {
        "model": backbone.describe(),
        "arrays": [[s.tap, s.pooling, s.dtype, s.relu_applied] for s in specs],
        "views": views,
        "seed": seed if views else None,
        "augment": list(augment) if views else None,
        "source": images.description,
        "n_images": len(images),
        "numerics": run_numerics,  # bit-identical resumes and merges need the same device, precision and software
    }
    info = {
        "model": backbone.describe(),
        "tap_mode": extractor.catalogue.mode,
        "seed": seed,
        "augment": list(augment),
        "batch_size": batch_size,
        "versions": versions(),
    }
    if part is not None or len(device_list) > 1:
        merged = _finished_store(out, config)
        if merged is not None:  # a rerun after the shards were merged: nothing to do
            return merged
        if not shared:
            check_merge_target(out, config, overwrite)
    if len(device_list) > 1:
        for d in device_list:
            resolve_device(d)  # fail here, naming the device, rather than in a child process
        kwargs = dict(source=source, out=out, model=backbone, taps=[t.name for t in extractor.taps], poolings=[p.name for p in extractor.poolings],
                      relu=relu, dtype=dtype, views=views, seed=seed, augment=augment, labels=labels, batch_size=batch_size,
                      workers=workers, amp=amp, on_error=on_error, max_pixels=max_pixels, overwrite=overwrite)  # fmt: skip
        return _extract_on_devices(device_list, kwargs, progress)

    writer, first_image = _open_writer(
        out, images, part, shared, specs, config, info, views, images_per_batch(batch_size, views), overwrite
    )
    try:
        if writer.already_complete:
            return CodeStore(writer.path)
        _run(
            extractor,
            images,
            first_image,
            writer,
            backbone.preprocessing,
            specs,
            dev,
            views,
            seed,
            augment,
            batch_size,
            workers,
            amp,
            on_error,
            progress,
        )
        store = writer.finalize()
    finally:
        writer.close()
    if store is None:  # a shard of a shared store; the last shard to finish publishes it
        return CodeStore(out, allow_incomplete=True)
    if store.rows == 0 and store.errors:
        first = store.errors[0]
        raise SourceError(
            f"none of the {len(store.errors)} images could be decoded (first: {first['path']}: {first['reason']}); "
            f"the store at {store.path} is empty and lists them all under errors in manifest.json. Check the source."
        )
    if part is not None and not shared and (merge if merge is not None else launched):
        return _merge_when_complete(out, config, part.count, overwrite) or store
    return store


def _split_plan(
    shard: Any, devices: Any, device: str, shared: bool, overwrite: bool, merge: bool | None
) -> tuple[Shard | None, list[str], bool, str]:
    """Check how the run is split: ``(shard, devices, launched by torchrun, device of this process)``."""
    device_list = parse_devices(devices)
    launched = shard == "auto" and launched_by_torchrun()
    part = parse_shard(shard)
    if device_list and part is not None:
        if launched:
            raise ParameterError(f"devices={devices!r} under torchrun (WORLD_SIZE set): each rank is a shard already, on "
                             "cuda:LOCAL_RANK; drop --devices.")  # fmt: skip
        raise ParameterError(
            f"got devices={devices!r} and shard {part}: --devices splits the work itself; give one of them."
        )
    if shared and part is None:
        raise ParameterError("shared=True (--shared) needs a shard: give --shard I/N, or launch with torchrun.")
    if shared and overwrite:
        raise ParameterError(
            "--overwrite cannot be combined with --shared: other shards may be writing the store. Delete the directory "
            "once no shard is running, or choose another --out."
        )
    if merge and part is None:
        raise ParameterError("merge=True (--merge) needs a shard: give --shard I/N (the last shard to finish merges), "
                             "or run `cnncodes merge OUT` once all shards are done.")  # fmt: skip
    if shared and merge:
        raise ParameterError(
            "merge=True (--merge) does nothing with --shared: the last shard publishes the store itself."
        )
    if len(device_list) == 1:
        device = device_list[0]
    elif launched and device in ("auto", "cuda"):  # each rank on its own GPU; "cuda" alone would put all on GPU 0
        device = launcher_device() or device
    return part, device_list, launched, device


def _open_writer(
    out: str | os.PathLike,
    images: ImageSource,
    part: Shard | None,
    shared: bool,
    specs: list[ArraySpec],
    config: dict[str, Any],
    info: dict[str, Any],
    views: int,
    per_batch: int,
    overwrite: bool,
) -> tuple[StoreWriter, int]:
    """The writer for a one-process run, for shard ``part`` into its own store, or into the shared store; and the
    source index of the first image it fills."""
    common = dict(arrays=specs, classes=images.classes, views=views, info=info)
    if part is None:
        return StoreWriter(
            out, sources=images.ids, labels=images.labels, config=config, overwrite=overwrite, **common
        ), 0
    lo, hi = part.image_range(len(images), per_batch)
    if shared:
        split = ShardLayout(count=part.count, images_per_batch=per_batch)
        writer = SharedStoreWriter(out, shard=part, part=(lo, hi), sources=images.ids, labels=images.labels,
                                   config={**config, "shard": split.to_dict()}, **common)  # fmt: skip
        return writer, lo
    own = {**config, "shard": ShardLayout(count=part.count, index=part.index, images=(lo, hi)).to_dict()}
    writer = StoreWriter(shard_path(out, part), sources=images.ids[lo:hi], labels=images.labels[lo:hi], config=own,
                         overwrite=overwrite, **common)  # fmt: skip
    return writer, lo


def _finished_store(out: str | os.PathLike, config: dict[str, Any]) -> CodeStore | None:
    """The complete store at ``out`` if it was made with ``config``, else ``None``."""
    try:
        store = CodeStore(out)
    except StoreError:
        return None
    return store if same_settings(store.manifest.get("config"), config) else None


def _merge_when_complete(
    out: str | os.PathLike, config: dict[str, Any], count: int, overwrite: bool
) -> CodeStore | None:
    """Merge the shards of ``out`` if all are complete; ``None`` while some still run. Waits for a shard that is
    merging already and returns its result."""
    try:
        store = merge_shards(out, remove_shards=True, count=count, overwrite=overwrite, wait=float("inf"))
    except IncompleteStoreError:
        return None  # another shard is still running; the last one to finish merges
    if not same_settings(store.manifest.get("config"), config):
        raise StoreMismatchError(
            f"{store.path} holds a store with other settings than these shards; nothing was merged."
        )
    return store


def _extract_shard(kwargs: dict[str, Any], cpu_threads: int, processes: int) -> str:
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(processes))  # decode workers share the node's cores between us
    if resolve_device(kwargs["device"]).type == "cpu":
        torch.set_num_threads(cpu_threads)  # processes sharing the CPU split its cores instead of oversubscribing
    return str(extract(**kwargs).path)


def _extract_on_devices(devices: list[str], kwargs: dict[str, Any], progress: bool) -> CodeStore:
    """One spawned process per device, each extracting its shard; then merge (each shard resumes on a rerun)."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    n = len(devices)
    cpu_processes = sum(1 for d in devices if torch.device(d).type == "cpu")
    threads = max(1, torch.get_num_threads() // max(1, cpu_processes))
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _extract_shard,
                {**kwargs, "device": d, "shard": Shard(i, n), "merge": False, "progress": progress and i == 0},
                threads,
                n,
            )
            for i, d in enumerate(devices)
        ]
        failed = []
        for i, future in enumerate(futures):
            try:
                future.result()
            except BrokenProcessPool:
                failed.append(
                    f"shard {i}/{n} on {devices[i]}: stopped because a shard process died (killed, or out of memory)"
                )
            except Exception as exc:  # noqa: BLE001 - every shard is waited for; failures are reported together
                failed.append(f"shard {i}/{n} on {devices[i]}: {type(exc).__name__}: {exc}")
    if failed:
        raise ExtractionError(
            "extraction failed in " + "; ".join(failed) + ". Finished shards are kept: fix the cause and rerun the "
            "same command to resume."
        )
    return merge_shards(kwargs["out"], remove_shards=True, count=n, overwrite=kwargs["overwrite"])


def _run(
    extractor: CodeExtractor,
    images: ImageSource,
    first_image: int,
    writer: StoreWriter,
    pre: Preprocessing,
    specs: list[ArraySpec],
    dev: torch.device,
    views: int,
    seed: int,
    augment: Sequence[str],
    batch_size: int,
    workers: int | None,
    amp: bool,
    on_error: str,
    progress: bool,
) -> None:
    """Fill ``writer``'s part: source images ``first_image ...`` (rows and errors count from ``first_image``)."""
    start_image = first_image + writer.rows_done // (views + 1)
    stop_image = first_image + writer.part_images
    if start_image >= stop_image:
        return
    pending: deque[Future] = deque()
    bar = tqdm(
        total=writer.part_rows,
        initial=writer.rows_done,
        unit="img",
        unit_scale=True,
        disable=not progress,
        desc="extract",
        dynamic_ncols=True,
    )
    row = writer.rows_done
    batches = iter_batches(extractor, images, pre, dev=dev, views=views, seed=seed, augment=augment, start_image=start_image,
                       stop_image=stop_image, batch_size=batch_size, workers=workers, amp=amp, dtype=specs[0].dtype)  # fmt: skip
    committer = _Committer(writer)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnncodes-writer") as pool:
        try:
            for b in batches:
                errors = [
                    {"path": images.ids[i], "reason": r, "image": i - first_image}
                    for i, r in zip(b.index, b.reasons)
                    if r
                ]
                if errors and on_error == "raise":
                    raise ImageDecodeError(errors[0]["path"], errors[0]["reason"])
                host = {s.file: b.codes[(s.tap, s.pooling)] for s in specs}
                pending.append(pool.submit(committer.write, row, host, row + b.rows, errors))
                row += b.rows
                while len(pending) > 2:  # bound host memory; surfaces writer errors early
                    pending.popleft().result()
                bar.update(b.rows)
        finally:
            # Commit everything written so far, even when interrupted: nothing done is lost.
            try:
                while pending:
                    pending.popleft().result()
            finally:
                pool.submit(committer.commit).result()
                bar.close()


class _Committer:
    """The writer thread's side of a run: writes batches in order, commits at most every :data:`COMMIT_SECONDS`, and
    after any failure writes and commits nothing more, so progress never covers rows that are not on disk. Image
    errors wait for the commit that covers their rows (a failed commit keeps them; the rerun finds them again)."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer, self.failed, self.errors = writer, False, []
        self.written, self.last = writer.rows_done, time.monotonic()

    def write(self, start: int, host: dict[str, torch.Tensor], end: int, errors: list[dict[str, Any]]) -> None:
        if self.failed:
            return
        try:
            self.writer.write(start, {k: v.numpy() for k, v in host.items()})
            self.errors += errors
            self.written = end
            if time.monotonic() - self.last >= COMMIT_SECONDS:
                self.commit()
        except BaseException:
            self.failed = True
            raise

    def commit(self) -> None:
        if self.failed or self.written <= self.writer.rows_done:
            return
        try:
            self.writer.commit(self.written, self.errors)
        except BaseException:
            self.failed = True
            raise
        self.errors, self.last = [], time.monotonic()
