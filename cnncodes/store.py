"""The code store: the one module that knows the on-disk format of extracted codes.

A store is a directory::

    manifest.json                 # what is here and how it was made (format_version, complete, arrays, ...)
    labels.npy                    # int64 (rows,), -1 for unlabeled images
    <tap>__<pooling>.npy          # (rows, dims) float16/float32, one per (tap, pooling)
    .partial/                     # only while extraction runs: preallocated arrays + progress.json
    .lock                         # flock'ed by the process writing the store

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
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "IncompleteStoreError",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PARTIAL = ".partial"
PROGRESS = "progress.json"
LOCK = ".lock"
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

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._acquire_lock()
        try:
            self._prepare(overwrite)
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------------------------------
    def _acquire_lock(self) -> Any:
        f = open(self.path / LOCK, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise StoreLockedError(
                    f"another cnncodes process is writing {self.path} (its lock {self.path / LOCK} is held). Wait for "
                    "it to finish, or write to another --out directory."
                ) from None
        return f

    def _prepare(self, overwrite: bool) -> None:
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            old = _read_json(manifest_path)
            if old.get("config") != self.config:
                if not overwrite:
                    raise StoreMismatchError(_mismatch_message(self.path, old.get("config", {}), self.config))
                self._clear(old)
            elif old.get("complete"):
                self.already_complete = True
                return
            else:
                self._resume()
                return
        elif any(p.name not in (LOCK, PARTIAL) for p in self.path.iterdir()):
            raise StoreError(
                f"{self.path} is not empty and holds no {MANIFEST}; refusing to write a store over unrelated files. "
                "Choose a new or empty --out directory."
            )
        self._create()

    def _clear(self, old: dict[str, Any]) -> None:
        for entry in old.get("arrays", []):
            (self.path / entry["file"]).unlink(missing_ok=True)
        for name in (LABELS, MANIFEST):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self._partial, ignore_errors=True)

    def _create(self) -> None:
        shutil.rmtree(self._partial, ignore_errors=True)
        self._partial.mkdir()
        for spec in self.arrays:
            mm = np.lib.format.open_memmap(
                self._partial / spec.file, mode="w+", dtype=np.dtype(spec.dtype), shape=(self.rows_total, spec.dims)
            )
            del mm  # only the preallocated file and its header are needed
            self._files[spec.file] = _RowFile(self._partial / spec.file)
        _atomic_json(self._partial / PROGRESS, {"rows_done": 0, "errors": []})
        _atomic_json(self.path / MANIFEST, self._manifest(complete=False))

    def _resume(self) -> None:
        progress = _read_json(self._partial / PROGRESS) if (self._partial / PROGRESS).exists() else None
        if progress is None:  # crashed between manifest and first commit: start over
            self._create()
            return
        self.rows_done = int(progress["rows_done"])
        self.errors = list(progress["errors"])
        for spec in self.arrays:
            file = self._partial / spec.file
            if self.rows_done >= self.rows_total and not file.exists():
                continue  # finalize already moved it
            self._files[spec.file] = _RowFile(file)

    # -- writing ----------------------------------------------------------------------------------------------------
    def write(self, start: int, codes: dict[str, np.ndarray]) -> None:
        """Write rows ``start : start + n`` of each array (keyed by :attr:`ArraySpec.file`)."""
        for file, block in codes.items():
            self._files[file].write_rows(start, block)

    def commit(self, rows_done: int, errors: Sequence[dict[str, Any]] = ()) -> None:
        """Make rows ``[0, rows_done)`` durable, then record them as done."""
        for f in self._files.values():
            f.sync()
        self.errors.extend(errors)
        self.rows_done = rows_done
        _atomic_json(self._partial / PROGRESS, {"rows_done": rows_done, "errors": self.errors})

    def finalize(self) -> CodeStore:
        """Drop failed images, publish the arrays under their final names and mark the store complete."""
        if self.rows_done != self.rows_total:
            raise StoreError(f"cannot finalize {self.path}: {self.rows_done}/{self.rows_total} rows done.")
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


def _mismatch_message(path: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    details = "; ".join(f"{k}: store has {_short(old.get(k))}, asked {_short(new.get(k))}" for k in keys[:4])
    return (
        f"{path} already holds codes made with different settings ({details}). Nothing was changed. Pass "
        "--overwrite (Python: overwrite=True) to replace them, or choose another --out directory."
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
