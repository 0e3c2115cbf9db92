"""The code store: the one module that knows the on-disk format of extracted codes.

A store is a directory::

    manifest.json                 # what is here and how it was made (format_version, complete, arrays, ...)
    labels.npy                    # int64 (rows,), -1 for unlabeled images
    <tap>__<pooling>.npy          # (rows, dims) float16/float32, one per (tap, pooling)
    .partial/                     # only while extraction runs: preallocated arrays + progress.json
    .lock                         # flock'ed by the process writing the store
    shards/I-of-N/                # only for sharded extraction: one complete store per shard, joined by merge_shards

Rows are images x views: row ``r`` is view ``r % (views + 1)`` of image ``r // (views + 1)``; view 0 is the plain view.

Crash safety: arrays are preallocated with :func:`numpy.lib.format.open_memmap` under ``.partial/`` and filled in place
with positioned writes (not through a mapping, so written pages never count towards the writer's resident memory).
After each batch the files are fsync'ed and ``progress.json`` is replaced atomically, so a restart continues from
the last committed batch. Final array names appear only when the store is complete, and ``manifest.json`` says
``"complete": true`` only after they all exist, so an incomplete store cannot be mistaken for a complete one.
Images that failed to decode are dropped at the end (their rows compacted away) and listed in ``errors``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

try:  # POSIX advisory locks die with the process, so kill -9 never leaves a stale lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ArraySpec",
    "CodeStore",
    "StoreWriter",
    "SharedStoreWriter",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "IncompleteStoreError",
    "FORMAT_VERSION",
    "merge_shards",
    "shard_path",
    "check_merge_target",
    "completed_shards",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PARTIAL = ".partial"
PROGRESS = "progress.json"
LOCK = ".lock"
SHARDS = "shards"
_COPY_CHUNK_ROWS = 8192


class StoreError(RuntimeError):
    """A code store cannot be opened or written as asked."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class StoreMismatchError(StoreError):
    """An existing store was made with different settings."""


class IncompleteStoreError(StoreError):
    """The store's extraction has not finished."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store: the codes of one tap under one pooling."""

    tap: str
    pooling: str
    dims: int
    dtype: str
    rectified: bool
    relu_applied: bool
    depth: int = -1  # the tap's position in forward order
    layout: dict[str, Any] | None = None  # the tap's Layout.to_dict(): what the network's axes meant
    relu: str | None = None  # the rectification mode asked for (auto, always, never)

    @property
    def file(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.tap)
        return f"{safe}__{self.pooling}.npy"

    def to_dict(self, rows: int) -> dict[str, Any]:
        return {**asdict(self), "file": self.file, "shape": [rows, self.dims]}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {path}: {exc}. The store is damaged; re-extract with --overwrite.") from exc


class CodeStore:
    """Read access to a code store; arrays come memory-mapped, never loaded whole.

    Parameters
    ----------
    path : path-like
        The store directory.
    allow_incomplete : bool, default=False
        Open a store whose extraction has not finished (arrays are then not available).

    Attributes
    ----------
    manifest : dict
        The parsed ``manifest.json``.

    Examples
    --------
    >>> store = CodeStore("codes/")  # doctest: +SKIP
    >>> X = store.codes("blocks.5.0.bn1", "avg4")  # (rows, dims) memmap  # doctest: +SKIP
    >>> y = store.labels  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(
                f"{self.path} is not a code store (no {MANIFEST}). Create one with `cnncodes extract SOURCE --out "
                f"{self.path}`."
            )
        self.manifest = _read_json(manifest_path)
        version = self.manifest.get("format_version")
        if self.manifest.get("format") != "cnncodes.store" or not isinstance(version, int):
            raise StoreError(f"{manifest_path} is not a cnncodes store manifest.")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path} uses store format {version}, newer than this cnncodes supports ({FORMAT_VERSION}); "
                "upgrade cnncodes."
            )
        if not self.complete and not allow_incomplete:
            raise IncompleteStoreError(
                f"{self.path} is incomplete ({self.manifest.get('rows_done')}/{self.manifest.get('rows_total')} rows): "
                "its extraction was interrupted or is still running. Rerun the same `cnncodes extract` command to "
                "resume it."
            )

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a complete store (no exception for a missing or damaged one)."""
        try:
            return CodeStore(path).complete
        except StoreError:
            return False

    # -- metadata ---------------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def rows(self) -> int:
        return int(self.manifest["rows_total"])

    @property
    def views(self) -> int:
        """Number of augmented views per image (0: plain view only)."""
        return int(self.manifest.get("views", 0))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    @property
    def sources(self) -> list[str]:
        """One entry per image, in row order."""
        return list(self.manifest.get("sources", []))

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("errors", []))

    @property
    def arrays(self) -> list[dict[str, Any]]:
        return list(self.manifest["arrays"])

    def keys(self) -> list[tuple[str, str]]:
        """``(tap, pooling)`` pairs in forward order."""
        return [(a["tap"], a["pooling"]) for a in self.arrays]

    @property
    def taps(self) -> list[str]:
        return list(dict.fromkeys(a["tap"] for a in self.arrays))

    @property
    def poolings(self) -> list[str]:
        return list(dict.fromkeys(a["pooling"] for a in self.arrays))

    def _array(self, tap: str, pooling: str | None) -> dict[str, Any]:
        matches = [a for a in self.arrays if a["tap"] == tap and (pooling is None or a["pooling"] == pooling)]
        if len(matches) != 1:
            have = ", ".join(f"{t}/{p}" for t, p in self.keys())
            what = f"tap {tap!r}" + (f" with pooling {pooling!r}" if pooling else " (give a pooling: several exist)")
            raise KeyError(f"{self.path} has no single array for {what}; it holds: {have}.")
        return matches[0]

    # -- arrays -----------------------------------------------------------------------------------------------------
    def codes(self, tap: str, pooling: str | None = None) -> np.ndarray:
        """The (rows, dims) codes of ``tap`` under ``pooling``, memory-mapped read-only."""
        if not self.complete:
            raise IncompleteStoreError(f"{self.path} is incomplete; rerun the extraction to finish it.")
        return np.load(self.path / self._array(tap, pooling)["file"], mmap_mode="r", allow_pickle=False)

    def read_rows(self, tap: str, pooling: str | None, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` read with plain file reads: unlike slicing the memmap, the pages read do not stay
        mapped in this process, so streaming a store larger than RAM keeps resident memory flat."""
        if not self.complete:
            raise IncompleteStoreError(f"{self.path} is incomplete; rerun the extraction to finish it.")
        entry = self._array(tap, pooling)
        path = self.path / entry["file"]
        header = np.load(path, mmap_mode="r", allow_pickle=False)
        offset, dims, dtype = header.offset, header.shape[1], header.dtype
        del header
        stop = min(stop, self.rows)
        count = max(0, stop - start) * dims
        with open(path, "rb") as f:
            block = np.fromfile(f, dtype=dtype, count=count, offset=offset + start * dims * dtype.itemsize)
        return block.reshape(-1, dims)

    def items(self) -> Iterator[tuple[tuple[str, str], np.ndarray]]:
        """Iterate ``((tap, pooling), codes)`` in forward order."""
        for tap, pooling in self.keys():
            yield (tap, pooling), self.codes(tap, pooling)

    @property
    def labels(self) -> np.ndarray:
        """int64 (rows,), -1 where unlabeled."""
        return np.load(self.path / LABELS, mmap_mode="r", allow_pickle=False)

    @property
    def groups(self) -> np.ndarray:
        """Image index of every row (views of one image share it)."""
        return np.arange(self.rows) // (self.views + 1)

    @property
    def view_index(self) -> np.ndarray:
        """View of every row: 0 is the plain view, 1..views the augmented ones."""
        return np.arange(self.rows) % (self.views + 1)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"CodeStore({str(self.path)!r}, {state}, rows={self.rows}, arrays={len(self.arrays)})"


class StoreWriter:
    """Create, resume and finish a store. Used by :func:`cnncodes.extract`; one writer per directory at a time.

    Parameters
    ----------
    path : path-like
        Store directory (created if missing; must be empty or an existing store).
    arrays : sequence of ArraySpec
    sources : list of str
        One id per image, in row order.
    labels : ndarray of int64, shape (n_images,)
    classes : list of str
    views : int
        Augmented views per image.
    config : dict
        Everything that determines the codes (model fingerprint, preprocessing, taps...). A store made with another
        config is refused unless ``overwrite``.
    info : dict
        Extra manifest entries that do not affect the codes (versions, batch size...).
    overwrite : bool, default=False
    part : (int, int), optional
        Fill only images ``part[0]:part[1]`` of ``sources`` (:class:`SharedStoreWriter`); rows passed to
        :meth:`write` and :meth:`commit` then count from the part's first row. Default: every image.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        arrays: Sequence[ArraySpec],
        sources: list[str],
        labels: np.ndarray,
        classes: list[str],
        views: int,
        config: dict[str, Any],
        info: dict[str, Any],
        overwrite: bool = False,
        part: tuple[int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.arrays = list(arrays)
        self.sources = list(sources)
        self.image_labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.views = int(views)
        self.rows_total = len(self.sources) * (self.views + 1)
        self.config = json.loads(json.dumps(config))  # normalize tuples etc. for comparison
        self.info = info
        self._partial = self.path / PARTIAL
        self._files: dict[str, _RowFile] = {}
        self.errors: list[dict[str, Any]] = []
        self.rows_done = 0
        self.already_complete = False
        self.part_first_image, stop = part if part is not None else (0, len(self.sources))
        self.part_images = stop - self.part_first_image
        self._progress = self._partial / PROGRESS
        self._lock_file: Any = None

        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    @property
    def part_rows(self) -> int:
        """Rows this writer fills."""
        return self.part_images * (self.views + 1)

    # -- opening ----------------------------------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        self._lock_file = _lock(self.path)
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            old = _read_json(manifest_path)
            if old.get("config") != self.config:
                if not overwrite:
                    raise StoreMismatchError(_mismatch_message(self.path, old.get("config", {}), self.config))
                if _shards_running(self.path):
                    raise StoreLockedError(
                        f"shards are still filling the shared store {self.path}; nothing was changed. Wait for them, "
                        "or write to another --out directory."
                    )
                _clear_store(self.path, old)
            elif old.get("complete"):
                self.already_complete = True
                return
            else:
                self._resume()
                return
        elif any(p.name not in (LOCK, PARTIAL, SHARDS) for p in self.path.iterdir()):
            raise StoreError(
                f"{self.path} is not empty and holds no {MANIFEST}; refusing to write a store over unrelated files. "
                "Choose a new or empty --out directory."
            )
        self._create()

    def _create(self) -> None:
        shutil.rmtree(self._partial, ignore_errors=True)
        self._partial.mkdir()
        for spec in self.arrays:
            mm = np.lib.format.open_memmap(
                self._partial / spec.file, mode="w+", dtype=np.dtype(spec.dtype), shape=(self.rows_total, spec.dims)
            )
            del mm  # only the preallocated file and its header are needed
            self._files[spec.file] = _RowFile(self._partial / spec.file)
        self._save_progress()
        _atomic_json(self.path / MANIFEST, self._manifest(complete=False))

    def _resume(self) -> None:
        progress = _read_json(self._progress) if self._progress.exists() else None
        if progress is None:  # crashed between manifest and first commit: start over
            self._create()
            return
        self._open_files(progress)

    def _open_files(self, progress: dict[str, Any] | None) -> None:
        """Continue from ``progress`` (``None``: from the first row) in the preallocated arrays."""
        if progress is not None:
            self.rows_done = int(progress["rows_done"])
            self.errors = list(progress["errors"])
        for spec in self.arrays:
            file = self._partial / spec.file
            if self.rows_done >= self.part_rows and not file.exists():
                continue  # finalize already moved it
            self._files[spec.file] = _RowFile(file)

    def _save_progress(self) -> None:
        _atomic_json(self._progress, {"rows_done": self.rows_done, "rows_part": self.part_rows, "errors": self.errors})

    # -- writing ----------------------------------------------------------------------------------------------------
    def write(self, start: int, codes: dict[str, np.ndarray]) -> None:
        """Write rows ``start : start + n`` of the part to each array (keyed by :attr:`ArraySpec.file`)."""
        offset = self.part_first_image * (self.views + 1)
        for file, block in codes.items():
            self._files[file].write_rows(offset + start, block)

    def commit(self, rows_done: int, errors: Sequence[dict[str, Any]] = ()) -> None:
        """Make the part's rows ``[0, rows_done)`` durable, then record them as done. ``errors`` carry the failed
        image's index within the part under ``"image"``."""
        for f in self._files.values():
            f.sync()
        self.errors.extend({**e, "image": int(e["image"]) + self.part_first_image} for e in errors)
        self.rows_done = rows_done
        self._save_progress()

    def finalize(self) -> CodeStore | None:
        """Drop failed images, publish the arrays under their final names and mark the store complete."""
        if self.rows_done != self.part_rows:
            raise StoreError(f"cannot finalize {self.path}: {self.rows_done}/{self.part_rows} rows done.")
        return self._publish()

    def _publish(self) -> CodeStore:
        bad = {int(e["image"]) for e in self.errors}
        keep_images = np.array([i not in bad for i in range(len(self.sources))], dtype=bool)
        keep_rows = np.repeat(keep_images, self.views + 1)
        for spec in self.arrays:
            partial, final = self._partial / spec.file, self.path / spec.file
            rows = self._files.pop(spec.file, None)
            if rows is None:  # published by an earlier, interrupted finalize
                continue
            rows.close()
            if keep_rows.all():
                os.replace(partial, final)
                continue
            tmp = final.with_name(final.name + ".tmp")
            src = np.load(partial, mmap_mode="r", allow_pickle=False)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(int(keep_rows.sum()), spec.dims))
            pos = 0
            for lo in range(0, self.rows_total, _COPY_CHUNK_ROWS):
                block = src[lo : lo + _COPY_CHUNK_ROWS][keep_rows[lo : lo + _COPY_CHUNK_ROWS]]
                out[pos : pos + len(block)] = block
                pos += len(block)
            out.flush()
            del out, src
            os.replace(tmp, final)
            partial.unlink()
        labels = np.repeat(self.image_labels[keep_images], self.views + 1)
        np.save(self.path / LABELS, labels, allow_pickle=False)
        self.sources = [s for s, k in zip(self.sources, keep_images) if k]
        self.rows_total = int(keep_rows.sum())
        self.rows_done = self.rows_total
        _atomic_json(self.path / MANIFEST, self._manifest(complete=True))
        shutil.rmtree(self._partial, ignore_errors=True)
        return CodeStore(self.path)

    def close(self) -> None:
        """Flush what is mapped and release the lock (the store stays resumable)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _manifest(self, complete: bool) -> dict[str, Any]:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return {
            "format": "cnncodes.store",
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "rows_total": self.rows_total,
            "rows_done": self.rows_total if complete else self.rows_done,
            "arrays": [spec.to_dict(self.rows_total) for spec in self.arrays],
            "labels_file": LABELS,
            "classes": self.classes,
            "views": self.views,
            "sources": self.sources,
            "errors": [{k: e[k] for k in ("path", "reason")} for e in self.errors],
            **self.info,
            "config": self.config,
            "written": now,
        }


class SharedStoreWriter(StoreWriter):
    """Shard ``I/N``'s writer into one store preallocated on shared storage.

    Every shard process opens the same store: the first one preallocates the full arrays (under the store's lock,
    held only for that), each fills its own rows with positioned writes and keeps its own progress
    (``.partial/progress-I-of-N.json``) under its own lock, so each resumes alone. The last shard to finish
    compacts and publishes the store, whose manifest then equals a one-process run's. Needs a filesystem whose
    ``flock`` works across the machines involved (local disks, most NFSv4 and Lustre mounts).

    Parameters
    ----------
    path : path-like
    shard : Shard
        This process's shard (:class:`cnncodes.shards.Shard`).
    part : (int, int)
        Its images ``[start, stop)``.
    config : dict
        The one-process config plus ``"shard": {...}`` describing the split (count, batching), identical in all
        shards; the published manifest drops ``"shard"``.
    arrays, sources, labels, classes, views, info
        As :class:`StoreWriter`, for the whole store.
    """

    #: How long a shard waits for another shard that is creating the store.
    create_wait_s = 600.0

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        shard: Any,
        part: tuple[int, int],
        arrays: Sequence[ArraySpec],
        sources: list[str],
        labels: np.ndarray,
        classes: list[str],
        views: int,
        config: dict[str, Any],
        info: dict[str, Any],
    ) -> None:
        self.shard = shard
        self.final_config = json.loads(json.dumps(_unsharded(config)))
        super().__init__(path, arrays=arrays, sources=sources, labels=labels, classes=classes, views=views, config=config,
                         info=info, part=part)  # fmt: skip

    def _open(self, overwrite: bool) -> None:
        self._progress = self._partial / f"progress-{self.shard.name}.json"
        creating = _lock(self.path, wait=self.create_wait_s)
        try:
            self._join()
            if not self.already_complete:  # taken under the store lock, so no shard can be publishing meanwhile
                self._lock_file = _lock(self._partial, f"{self.shard.name}.lock")
        finally:
            creating.close()

    def _join(self) -> None:
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            if any(p.name not in (LOCK, PARTIAL, SHARDS) for p in self.path.iterdir()):
                raise StoreError(f"{self.path} is not empty and holds no {MANIFEST}; choose a new or empty --out directory.")
            self._create()
            return
        old = _read_json(manifest_path)
        if old.get("complete") and old.get("config") == self.final_config:
            self.already_complete = True
        elif old.get("config") != self.config:
            asked = self.final_config if old.get("complete") else self.config
            raise StoreMismatchError(
                f"{self.path} holds a store with other settings than this shard ({_config_diff(old.get('config', {}), asked)}). "
                "Nothing was changed. Give every shard the same arguments; to start over, delete the directory once no "
                "shard is running, or choose another --out."
            )
        else:  # join the store another shard created
            self._open_files(_read_json(self._progress) if self._progress.exists() else None)
            if not self._progress.exists():
                self._save_progress()

    def finalize(self) -> CodeStore | None:
        """Record this shard as done; publish the store if every shard is. Returns the store, or ``None`` while other
        shards still run (the last one publishes)."""
        if self.rows_done != self.part_rows:
            raise StoreError(f"cannot finish shard {self.shard} of {self.path}: {self.rows_done}/{self.part_rows} rows done.")
        lock = _lock(self.path, wait=float("inf"))  # waits out another shard's publishing
        try:
            if _read_json(self.path / MANIFEST).get("complete"):
                return CodeStore(self.path)
            status = shared_progress(self.path, self.shard.count)
            if any(done is None or done < part for done, part in status):
                return None
            count = self.shard.count
            progress = [_read_json(self._partial / f"progress-{i}-of-{count}.json") for i in range(count)]
            self.errors = [e for p in progress for e in p["errors"]]  # image indices are store-wide already
            self.config = self.final_config
            self.part_first_image, self.part_images = 0, len(self.sources)
            self.rows_done = self.rows_total
            return self._publish()  # this writer has every array open; the other shards' rows are on disk
        finally:
            lock.close()


def completed_shards(out: str | os.PathLike, count: int) -> int:
    """How many shard stores of an ``count``-way split under ``out`` are complete."""
    return sum(CodeStore.is_complete(p) for p in (Path(out) / SHARDS).glob(f"*-of-{count}"))


def shared_progress(path: str | os.PathLike, count: int) -> list[tuple[int | None, int | None]]:
    """``(rows done, rows)`` of each shard of a shared store (``None`` for a shard that has not started)."""
    out = []
    for i in range(count):
        f = Path(path) / PARTIAL / f"progress-{i}-of-{count}.json"
        progress = _read_json(f) if f.exists() else {}
        out.append((progress.get("rows_done"), progress.get("rows_part")))
    return out


class _RowFile:
    """Positioned row writes into a preallocated ``.npy`` file."""

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
        self.offset, self.row_bytes, self.dtype = header.offset, header.shape[1] * header.itemsize, header.dtype
        del header
        self.fd = os.open(path, os.O_RDWR)

    def write_rows(self, start: int, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=self.dtype)
        os.pwrite(self.fd, data.tobytes(), self.offset + start * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _lock(path: Path, name: str = LOCK, wait: float = 0.0) -> Any:
    """Hold ``path/name`` exclusively until the returned file is closed, waiting up to ``wait`` seconds for it."""
    f = open(path / name, "a+")
    if fcntl is None:
        return f
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            if time.monotonic() >= deadline:
                f.close()
                raise StoreLockedError(
                    f"another cnncodes process is writing {path} (its lock {path / name} is held). Wait for it to "
                    "finish, or write to another --out directory."
                ) from None
            time.sleep(0.05)


def _config_diff(old: dict[str, Any], new: dict[str, Any], labels: tuple[str, str] = ("store has", "asked")) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {labels[0]} {_short(old.get(k))}, {labels[1]} {_short(new.get(k))}" for k in keys[:4])


def _mismatch_message(path: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    hint = ""
    differ = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
    if differ == ["shard"] and "images" in (old.get("shard") or {}) and "images" in (new.get("shard") or {}):
        hint = " A shard's image range follows --batch-size: resume it with the --batch-size it was started with."
    return (
        f"{path} already holds codes made with different settings ({_config_diff(old, new)}). Nothing was changed.{hint} "
        "Pass --overwrite (Python: overwrite=True) to replace them, or choose another --out directory."
    )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


# -- shards -------------------------------------------------------------------------------------------------------------
def shard_path(out: str | os.PathLike, shard: Any) -> Path:
    """Where shard ``I/N`` of the store ``out`` is written: ``out/shards/I-of-N`` (``shard`` is a
    :class:`cnncodes.shards.Shard`)."""
    return Path(out) / SHARDS / shard.name


def _unsharded(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "shard"}


def _shard_stores(out: Path, shards: Sequence[str | os.PathLike] | None, count: int | None = None) -> list[CodeStore]:
    """Open the shard stores of one run and return them in shard order, or say exactly what is missing."""
    if shards:
        paths = [Path(p) for p in shards]
    else:
        paths = sorted(p for p in (out / SHARDS).glob(f"*-of-{count or '*'}") if p.is_dir())
        splits = sorted({p.name.rsplit("-of-", 1)[1] for p in paths})
        if len(splits) > 1:
            raise StoreError(
                f"{out / SHARDS} holds shards of {' and '.join(splits)}-way splits: remove the stale ones, or name the "
                "shard stores to merge."
            )
    if not paths:
        raise StoreError(
            f"no shard stores under {out / SHARDS}. Run `cnncodes extract SOURCE --out {out} --shard I/N` for every "
            "shard first, or name the shard stores to merge."
        )
    by_index: dict[int, CodeStore] = {}
    count = None
    for path in paths:
        store = CodeStore(path, allow_incomplete=True)
        shard = store.manifest.get("config", {}).get("shard")
        if not shard:
            raise StoreError(f"{path} is not a shard store; merge joins stores written by `cnncodes extract --shard I/N`.")
        if count is None:
            count = shard["count"]
        if shard["count"] != count:
            raise StoreError(
                f"{path} is shard {shard['index']}/{shard['count']} but {paths[0]} is one of {count}: merge the shards "
                "of one run only."
            )
        if shard["index"] in by_index:
            raise StoreError(f"{path} and {by_index[shard['index']].path} are both shard {shard['index']}/{count}.")
        by_index[shard["index"]] = store
    assert count is not None
    missing = [i for i in range(count) if i not in by_index]
    if missing:  # not there yet is one way of not finished
        raise IncompleteStoreError(
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing (found {len(by_index)} of {count} under "
            f"{paths[0].parent}). Run `cnncodes extract ... --shard {missing[0]}/{count}` with the same arguments as "
            "the others, then merge again."
        )
    ordered = [by_index[i] for i in range(count)]
    unfinished = [s for s in ordered if not s.complete]
    if unfinished:
        what = ", ".join(f"{s.path} ({s.manifest.get('rows_done')}/{s.rows} rows)" for s in unfinished[:4])
        raise IncompleteStoreError(
            f"{len(unfinished)} shard(s) not finished: {what}. Rerun their `cnncodes extract ... --shard I/N` "
            "command to resume them, then merge again."
        )
    base = _unsharded(ordered[0].manifest["config"])
    batch_size = ordered[0].manifest.get("batch_size")
    end = 0
    for store in ordered:
        config = store.manifest["config"]
        if store.manifest.get("batch_size") != batch_size:
            raise StoreError(
                f"{store.path} was extracted with --batch-size {store.manifest.get('batch_size')} but {ordered[0].path} "
                f"with {batch_size}; batches differ, so the merge would not equal a one-process run. Re-extract the "
                "shards with one --batch-size."
            )
        if _unsharded(config) != base:
            raise StoreMismatchError(
                f"{store.path} was extracted with other settings than {ordered[0].path} "
                f"({_config_diff(base, _unsharded(config), ('first shard', 'this one'))}). Re-extract that shard with the same arguments."
            )
        lo, hi = config["shard"]["images"]
        if lo != end:
            raise StoreError(
                f"{store.path} starts at image {lo} but the shard before it ends at image {end}: the shards do not "
                "line up. Re-extract them with the same arguments."
            )
        end = hi
    if end != base["n_images"]:
        raise StoreError(f"the shards cover {end} of {base['n_images']} images; the last shard ends early.")
    return ordered


def check_merge_target(out: str | os.PathLike, config: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse, before any work is done, a sharded extraction whose shards could not be merged into ``out``."""
    out = Path(out)
    if overwrite or not out.is_dir():
        return
    if (out / MANIFEST).exists():
        old = _read_json(out / MANIFEST)
        if old.get("config") == json.loads(json.dumps(config)) and (old.get("complete") or old.get("merging")):
            return
        what = "a complete store" if old.get("complete") else "an unfinished store"
        raise StoreMismatchError(
            f"{out} already holds {what} with other settings or from a one-process run "
            f"({_config_diff(old.get('config', {}), config)}); its shards could not be merged there, so nothing was "
            "started. Pass --overwrite to replace it at the merge, resume the one-process run, or choose another --out."
        )
    if any(p.name not in (LOCK, PARTIAL, SHARDS) for p in out.iterdir()):
        raise StoreError(f"{out} holds files but no {MANIFEST}; choose a new or empty --out directory for the shards.")


def _refuse_shared(out: Path) -> None:
    """A shared store has nothing to merge; say what it is waiting for instead."""
    if not (out / MANIFEST).exists():
        return
    manifest = _read_json(out / MANIFEST)
    split = manifest.get("config", {}).get("shard") or {}
    if manifest.get("complete") or split.get("layout") != "shared":
        return
    count = split["count"]
    waiting = [f"{i}/{count} ({done or 0}/{rows if rows is not None else '?'} rows)"
               for i, (done, rows) in enumerate(shared_progress(out, count)) if done is None or done < rows]  # fmt: skip
    if waiting:
        raise IncompleteStoreError(
            f"{out} is a shared store that its shards fill in place, so there is nothing to merge. Unfinished shards: "
            f"{', '.join(waiting)}. Run or rerun their `cnncodes extract ... --shard I/{count} --shared` commands; "
            "the last one to finish publishes the store."
        )
    raise IncompleteStoreError(
        f"every shard of {out} is done but the store was not published (the last shard stopped while publishing): "
        f"rerun any shard's `cnncodes extract ... --shard I/{count} --shared` command to publish it."
    )


def merge_shards(
    out: str | os.PathLike,
    shards: Sequence[str | os.PathLike] | None = None,
    *,
    remove_shards: bool = False,
    count: int | None = None,
    overwrite: bool = False,
    wait: float = 0.0,
) -> CodeStore:
    """Join the shard stores of a sharded extraction into one store at ``out``.

    The merged store is bitwise identical (arrays, labels, manifest except its ``written`` time) to the store a
    single process would have written with the same arguments, so rerunning that single-process command on ``out``
    finds it complete. Rows are copied with plain reads and positioned writes, so memory stays flat. An interrupted
    merge is redone by merging again.

    Parameters
    ----------
    out : path-like
        Directory of the merged store; by default its ``shards/`` sub-directory holds the shard stores.
    shards : sequence of path-like, optional
        The shard stores to join, in any order (e.g. copied from several machines); default: ``out/shards/*``.
    remove_shards : bool, default=False
        Delete the shard stores once the merged store is complete.
    count : int, optional
        Join the shards of an ``N``-way split only (default: the one split found under ``out/shards``).
    overwrite : bool, default=False
        Replace a store with other settings at ``out``.
    wait : float, default=0
        Seconds to wait for another process merging into ``out`` (then its result is returned).

    Returns
    -------
    CodeStore
    """
    out = Path(out)
    if shards is None:
        _refuse_shared(out)
        if not out.is_dir():
            raise StoreError(f"{out} does not exist; give the --out directory of a sharded extraction.")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out, wait=wait)
    try:
        old = _read_json(out / MANIFEST) if (out / MANIFEST).exists() else None
        if old is not None and old.get("complete") and not (out / SHARDS).is_dir() and shards is None:
            return CodeStore(out)  # merged by another process, which removed the shard stores
        parts = _shard_stores(out, shards, count)  # raises, naming the fix, unless every shard is complete
        first = parts[0].manifest
        config = _unsharded(first["config"])
        if old is not None:
            if old.get("config") == config and old.get("complete"):
                if remove_shards:
                    _remove(parts, out, shards)
                return CodeStore(out)  # already merged (or extracted by one process with the same settings)
            if not (overwrite or (old.get("merging") and old.get("config") == config)):
                raise StoreMismatchError(
                    f"{out} already holds a {'complete' if old.get('complete') else 'unfinished'} store with other "
                    f"settings ({_config_diff(old.get('config', {}), config)}); nothing was changed. Pass --overwrite "
                    "(Python: overwrite=True) to replace it, or merge into another directory: cnncodes merge NEW_OUT "
                    f"{out / SHARDS}/*"
                )
            _clear_store(out, old)  # the store being replaced, or what an interrupted merge left
        elif any(p.name not in (LOCK, PARTIAL, SHARDS) for p in out.iterdir()):
            raise StoreError(
                f"{out} holds files but no {MANIFEST}, so it is not a store; move them away, or merge into another "
                f"directory: cnncodes merge NEW_OUT {out / SHARDS}/*"
            )
        _write_merged(out, parts, config)
    finally:
        lock.close()
    if remove_shards:
        _remove(parts, out, shards)
    return CodeStore(out)


def _write_merged(out: Path, parts: list[CodeStore], config: dict[str, Any]) -> None:
    first = parts[0].manifest
    rows = sum(s.rows for s in parts)
    manifest = {
        **first,
        "rows_total": rows,
        "rows_done": rows,
        "arrays": [{**entry, "shape": [rows, entry["shape"][1]]} for entry in first["arrays"]],
        "sources": [src for s in parts for src in s.sources],
        "errors": [e for s in parts for e in s.errors],
        "config": config,
    }
    # An unfinished manifest first: an interrupted merge then leaves a store that merging again replaces.
    _atomic_json(out / MANIFEST, {**manifest, "complete": False, "rows_done": 0, "merging": True})
    partial = out / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for entry in first["arrays"]:
        target = partial / entry["file"]
        mm = np.lib.format.open_memmap(target, mode="w+", dtype=np.dtype(entry["dtype"]), shape=(rows, entry["shape"][1]))
        del mm  # only the preallocated file and its header are needed
        writer = _RowFile(target)
        try:
            pos = 0
            for store in parts:
                for lo in range(0, store.rows, _COPY_CHUNK_ROWS):
                    block = store.read_rows(entry["tap"], entry["pooling"], lo, lo + _COPY_CHUNK_ROWS)
                    writer.write_rows(pos, block)
                    pos += len(block)
        finally:
            writer.close()
    np.save(partial / LABELS, np.concatenate([np.asarray(s.labels) for s in parts]), allow_pickle=False)
    for entry in first["arrays"]:
        os.replace(partial / entry["file"], out / entry["file"])
    os.replace(partial / LABELS, out / LABELS)
    _atomic_json(out / MANIFEST, {**manifest, "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    shutil.rmtree(partial, ignore_errors=True)


def _shards_running(path: Path) -> bool:
    """Whether a shard process holds its lock in the shared store at ``path``."""
    for lock_path in (path / PARTIAL).glob("*-of-*.lock"):
        try:
            _lock(lock_path.parent, lock_path.name).close()
        except StoreLockedError:
            return True
    return False


def _clear_store(path: Path, manifest: dict[str, Any]) -> None:
    """Remove a store's files (not its shard stores or lock)."""
    for entry in manifest.get("arrays", []):
        (path / entry["file"]).unlink(missing_ok=True)
    for name in (LABELS, MANIFEST):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / PARTIAL, ignore_errors=True)


def _remove(parts: list[CodeStore], out: Path, shards: Sequence[str | os.PathLike] | None) -> None:
    for store in parts:
        shutil.rmtree(store.path, ignore_errors=True)
    if shards is None and (out / SHARDS).is_dir() and not any((out / SHARDS).iterdir()):
        (out / SHARDS).rmdir()
