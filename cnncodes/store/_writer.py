"""Writing a code store: create, resume and publish it crash-safely, alone or as one shard of a shared store."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._fsutil import replace as durable_replace
from ..errors import StoreError, StoreLockedError, StoreMismatchError
from ._format import (
    COPY_CHUNK_ROWS,
    FORMAT_VERSION,
    LABELS,
    LOCK,
    MANIFEST,
    PARTIAL,
    PROGRESS,
    SHARDS,
    ArraySpec,
    array_digest,
    atomic_json,
    member_path,
    read_json,
    same_settings,
    short,
    unsharded,
)
from ._reader import CodeStore

try:  # POSIX advisory locks die with the process, so kill -9 never leaves a stale lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class StoreWriter:
    """Create, resume and finish a store. Used by :func:`cnncodes.extract`; one writer per directory at a time.

    Parameters
    ----------
    path : path-like
        Store directory (created if missing; must be empty or an existing store).
    arrays : sequence of ArraySpec
    sources : list of str
        One id per image, in row order.
    labels : ndarray of int64, shape (n_images,) or (n_images, n_classes)
        Class per image (-1 unlabeled), or a multi-label 0/1 indicator matrix.
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
        self._files: dict[str, RowFile] = {}
        self.digests: dict[str, str] = {}  # array file -> sha256 of its rows, known once published
        self.labels_digest = ""
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
        self._lock_file = hold_lock(self.path)
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        manifest_path = self.path / MANIFEST
        recovered = manifest_path.exists() and overwrite and not _readable(manifest_path)
        if recovered:
            _clear_damaged(self.path)  # the advice in the "damaged" message must work; other files are kept
        if manifest_path.exists():
            old = read_json(manifest_path)
            matches = same_settings(old.get("config"), self.config)
            if matches:
                self.config = old.get("config")  # a store from before numerics were recorded keeps its config
            if not matches:
                if not overwrite:
                    raise StoreMismatchError(_mismatch_message(self.path, old.get("config", {}), self.config))
                if shards_running(self.path):
                    raise StoreLockedError(
                        f"shards are still filling the shared store {self.path}; nothing was changed. Wait for them, "
                        "or write to another --out directory."
                    )
                clear_store(self.path, old)
            elif old.get("complete"):
                self.already_complete = True
                shutil.rmtree(self._partial, ignore_errors=True)  # left by a kill after publishing; we hold the lock
                return
            else:
                self._resume()
                return
        elif not recovered and any(
            p.name not in (LOCK, PARTIAL, SHARDS, MANIFEST + ".tmp") for p in self.path.iterdir()
        ):
            raise StoreError(
                f"{self.path} is not empty and holds no {MANIFEST}; refusing to write a store over unrelated files. "
                "Choose a new or empty --out directory."
            )
        (self.path / (MANIFEST + ".tmp")).unlink(missing_ok=True)  # a kill while the first manifest was written
        self._create()

    def _create(self) -> None:
        shutil.rmtree(self._partial, ignore_errors=True)
        need = sum(self.rows_total * spec.dims * np.dtype(spec.dtype).itemsize for spec in self.arrays)
        free = shutil.disk_usage(self.path).free
        if need > free:  # say so before allocating anything: a half-allocated store would hold the space itself
            raise StoreError(f"disk full: the store at {self.path} needs {_size_text(need)} ({self.rows_total} rows) "
                             f"but {_size_text(free)} are free; nothing was written. Free space, or choose another "
                             "--out, a later cut or fewer taps, poolings or views, or a lower --input-size, and rerun "
                             "the same command.")  # fmt: skip
        self._partial.mkdir()
        try:
            for spec in self.arrays:
                preallocate(self._partial / spec.file, spec.dtype, (self.rows_total, spec.dims))
                self._files[spec.file] = RowFile(self._partial / spec.file)
        except BaseException:  # nothing is computed yet: give the space back
            for f in self._files.values():
                f.close()
            self._files.clear()
            shutil.rmtree(self._partial, ignore_errors=True)
            raise
        self._save_progress()
        atomic_json(self.path / MANIFEST, self._manifest(complete=False))

    def _resume(self) -> None:
        progress = read_json(self._progress) if self._progress.exists() and _readable(self._progress) else None
        missing = [
            s.file for s in self.arrays if not (self._partial / s.file).exists() and not (self.path / s.file).exists()
        ]
        valid = (
            isinstance(progress, dict)
            and type(progress.get("rows_done")) is int
            and 0 <= progress["rows_done"] <= self.part_rows
            and isinstance(progress.get("errors"), list)
        )
        if valid and not missing:
            try:
                self._open_files(progress)
                return
            except (OSError, ValueError):  # a partial array cut short: its committed rows cannot be trusted
                for rows in self._files.values():
                    rows.close()
                self._files.clear()
        # crashed before the first commit, or the work folder is damaged: start the part over, nothing to lose
        self.rows_done, self.errors = 0, []
        shutil.rmtree(self._partial, ignore_errors=True)
        self._create()

    def _open_files(self, progress: dict[str, Any] | None) -> None:
        """Continue from ``progress`` (``None``: from the first row) in the preallocated arrays."""
        if progress is not None:
            self.rows_done = int(progress["rows_done"])
            self.errors = list(progress["errors"])
        offset = self.part_first_image * (self.views + 1)
        for spec in self.arrays:
            file = self._partial / spec.file
            if self.rows_done >= self.part_rows and not file.exists():
                continue  # finalize already moved it
            self._files[spec.file] = RowFile(file)
            if offset == 0 and self.rows_done:  # the rows a crashed run committed, hashed once so the next are in order
                self._files[spec.file].hash_written(self.rows_done)

    def _save_progress(self) -> None:
        atomic_json(self._progress, {"rows_done": self.rows_done, "rows_part": self.part_rows, "errors": self.errors})

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
            if rows is None:  # published by an earlier, interrupted finalize: hashed once from its final file
                self.digests[spec.file] = array_digest(np.load(final, mmap_mode="r", allow_pickle=False))
                continue
            if keep_rows.all():
                self.digests[spec.file] = rows.digest()
                rows.close()
                durable_replace(partial, final)
                continue
            rows.close()
            tmp = final.with_name(final.name + ".tmp")
            src = np.load(partial, mmap_mode="r", allow_pickle=False)
            try:  # positioned writes into a preallocated file: a full disk is an error here, never a SIGBUS
                preallocate(tmp, spec.dtype, (int(keep_rows.sum()), spec.dims))
                out = RowFile(tmp)
                pos = 0
                for lo in range(0, self.rows_total, COPY_CHUNK_ROWS):
                    block = src[lo : lo + COPY_CHUNK_ROWS][keep_rows[lo : lo + COPY_CHUNK_ROWS]]
                    out.write_rows(pos, block)
                    pos += len(block)
                self.digests[spec.file] = out.digest()
                out.close()
            except BaseException:
                tmp.unlink(missing_ok=True)  # the partial array is untouched: rerunning finishes the store
                raise
            finally:
                del src
            durable_replace(tmp, final)
            partial.unlink()
        labels = np.repeat(self.image_labels[keep_images], self.views + 1, axis=0)
        np.save(self.path / LABELS, labels, allow_pickle=False)
        self.labels_digest = array_digest(np.ascontiguousarray(labels))
        self.sources = [s for s, k in zip(self.sources, keep_images) if k]
        self.rows_total = int(keep_rows.sum())
        self.rows_done = self.rows_total
        atomic_json(self.path / MANIFEST, self._manifest(complete=True))
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

    def __enter__(self) -> StoreWriter:
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
            "arrays": [
                spec.to_dict(self.rows_total) | ({"sha256": self.digests[spec.file]} if complete else {})
                for spec in self.arrays
            ],  # fmt: skip
            "labels_file": LABELS,
            **({"labels_sha256": self.labels_digest} if complete else {}),
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
        self.final_config = json.loads(json.dumps(unsharded(config)))
        super().__init__(path, arrays=arrays, sources=sources, labels=labels, classes=classes, views=views, config=config,
                         info=info, part=part)  # fmt: skip

    def _open(self, overwrite: bool) -> None:
        self._progress = self._partial / f"progress-{self.shard.name}.json"
        creating = hold_lock(self.path, wait=self.create_wait_s)
        try:
            self._join()
            if not self.already_complete:  # taken under the store lock, so no shard can be publishing meanwhile
                self._lock_file = hold_lock(self._partial, f"{self.shard.name}.lock")
        finally:
            creating.close()

    def _join(self) -> None:
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            if any(p.name not in (LOCK, PARTIAL, SHARDS) for p in self.path.iterdir()):
                raise StoreError(
                    f"{self.path} is not empty and holds no {MANIFEST}; choose a new or empty --out directory."
                )
            self._create()
            return
        old = read_json(manifest_path)
        if old.get("complete") and old.get("config") == self.final_config:
            self.already_complete = True
        elif old.get("config") != self.config:
            asked = self.final_config if old.get("complete") else self.config
            raise StoreMismatchError(
                f"{self.path} holds a store with other settings than this shard ({config_diff(old.get('config', {}), asked)}). "
                "Nothing was changed. Give every shard the same arguments; to start over, delete the directory once no "
                "shard is running, or choose another --out."
            )
        else:  # join the store another shard created
            self._open_files(read_json(self._progress) if self._progress.exists() else None)
            if not self._progress.exists():
                self._save_progress()

    def finalize(self) -> CodeStore | None:
        """Record this shard as done; publish the store if every shard is. Returns the store, or ``None`` while other
        shards still run (the last one publishes)."""
        if self.rows_done != self.part_rows:
            raise StoreError(
                f"cannot finish shard {self.shard} of {self.path}: {self.rows_done}/{self.part_rows} rows done."
            )
        lock = hold_lock(self.path, wait=float("inf"))  # waits out another shard's publishing
        try:
            if read_json(self.path / MANIFEST).get("complete"):
                return CodeStore(self.path)
            status = shared_progress(self.path, self.shard.count)
            if any(done is None or done < part for done, part in status):
                return None
            count = self.shard.count
            progress = [read_json(self._partial / f"progress-{i}-of-{count}.json") for i in range(count)]
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
        progress = read_json(f) if f.exists() else {}
        out.append((progress.get("rows_done"), progress.get("rows_part")))
    return out


def preallocate(path: Path, dtype: str | np.dtype, shape: tuple[int, int]) -> None:
    """Create a ``.npy`` file of ``shape`` with every block allocated now, so that filling it can never hit a full
    disk halfway (which, through a memory map, would kill the process with SIGBUS)."""
    try:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
        size = header.offset + header.nbytes
        del header
        if size and hasattr(os, "posix_fallocate"):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # filesystems without fallocate
                    raise
            finally:
                os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path.unlink(missing_ok=True)
        need = _size_text(np.dtype(dtype).itemsize * shape[0] * shape[1])
        raise StoreError(f"disk full: {path} needs {need} ({exc.strerror}). Free space (or choose another --out) and "
                         "rerun the same command: everything committed so far is kept.") from None  # fmt: skip


class RowFile:
    """Positioned row writes into a preallocated ``.npy`` file, hashed as they are written.

    The sha256 of the array's bytes (:func:`~cnncodes.store._format.array_digest`'s definition) is updated with every
    block written right after the rows hashed so far; :meth:`digest` reads once only the rows that were not written
    in that order (another shard's rows of a shared store, or a resumed run's earlier rows, see :meth:`hash_written`).
    """

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
        self.offset, self.row_bytes, self.dtype = header.offset, header.shape[1] * header.itemsize, header.dtype
        self.rows = int(header.shape[0])
        del header
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self._hash, self._hashed = hashlib.sha256(), 0  # rows [0, _hashed) are in the hash

    def write_rows(self, start: int, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=self.dtype).tobytes()
        os.pwrite(self.fd, data, self.offset + start * self.row_bytes)
        if start < self._hashed:  # rows hashed already, written again (with other bytes, maybe): hashed afresh
            self._hash, self._hashed = hashlib.sha256(), 0
        if start == self._hashed and self.row_bytes:
            self._hash.update(data)
            self._hashed += len(data) // self.row_bytes

    def hash_written(self, rows: int) -> None:
        """Hash rows ``[0, rows)`` written by an earlier process (a resumed run), so the rows this one writes next are
        hashed as they come."""
        self._catch_up(min(rows, self.rows))

    def digest(self) -> str:
        """The sha256 hex digest of every row of the file, in order."""
        self._catch_up(self.rows)
        return self._hash.hexdigest()

    def _catch_up(self, rows: int) -> None:
        chunk = max(1, (8 << 20) // max(self.row_bytes, 1))
        while self._hashed < rows:
            n = min(chunk, rows - self._hashed)
            want = n * self.row_bytes
            data = os.pread(self.fd, want, self.offset + self._hashed * self.row_bytes)
            if len(data) != want:
                raise StoreError(f"{self.path}: short read while hashing its rows; the array is damaged: rerun with "
                                 "--overwrite.")  # fmt: skip
            self._hash.update(data)
            self._hashed += n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def hold_lock(path: Path, name: str = LOCK, wait: float = 0.0) -> Any:
    """Hold ``path/name`` exclusively until the returned file is closed, waiting up to ``wait`` seconds for it."""
    f = open(path / name, "a+")  # noqa: SIM115 - the open file is the lock; the caller closes it
    if fcntl is None:
        return f
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()  # ENOLCK, EOPNOTSUPP...: this filesystem cannot lock at all; waiting would never end
                raise StoreError(
                    f"cannot lock {path / name}: {exc.strerror} (errno {exc.errno}). The filesystem of {path} does not "
                    "support file locks (e.g. NFS without a lock manager). Write the store to a local disk, or to NFS "
                    "with lockd running, then copy it."
                ) from None
            if time.monotonic() >= deadline:
                f.close()
                raise StoreLockedError(
                    f"another cnncodes process is writing {path} (its lock {path / name} is held). Wait for it to "
                    "finish, or write to another --out directory."
                ) from None
            time.sleep(0.05)


def config_diff(old: dict[str, Any], new: dict[str, Any], labels: tuple[str, str] = ("store has", "asked")) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {labels[0]} {short(old.get(k))}, {labels[1]} {short(new.get(k))}" for k in keys[:4])


def _mismatch_message(path: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    hint = ""
    differ = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
    if differ == ["shard"] and "images" in (old.get("shard") or {}) and "images" in (new.get("shard") or {}):
        hint = " A shard's image range follows --batch-size: resume it with the --batch-size it was started with."
    if "numerics" in differ:
        hint += (" Codes are bit-identical only under the same numerics: resume where they were started (same device "
                 "type, --no-amp choice, GPU model and torch/CUDA versions).")  # fmt: skip
    return (
        f"{path} already holds codes made with different settings ({config_diff(old, new)}). Nothing was changed.{hint} "
        "Pass --overwrite (Python: overwrite=True) to replace them, or choose another --out directory."
    )


def _readable(path: Path) -> bool:
    try:
        read_json(path)
        return True
    except StoreError:
        return False


def _clear_damaged(path: Path) -> None:
    """Remove what a store whose manifest cannot be read may hold: only our own names, never other files."""
    for p in path.iterdir():
        ours = p.name in (MANIFEST, MANIFEST + ".tmp", LABELS) or (p.suffix == ".npy" and "__" in p.name)
        if ours and p.is_file() and not p.is_symlink():
            p.unlink()
    shutil.rmtree(path / PARTIAL, ignore_errors=True)


def clear_store(path: Path, manifest: dict[str, Any]) -> None:
    """Remove a store's files (not its shard stores or lock)."""
    for entry in manifest.get("arrays", []) if isinstance(manifest, dict) else []:
        member_path(path, entry, path / MANIFEST).unlink(missing_ok=True)
    for name in (LABELS, MANIFEST):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / PARTIAL, ignore_errors=True)


def shards_running(path: Path) -> bool:
    """Whether a shard process holds its lock in the shared store at ``path``."""
    for lock_path in (path / PARTIAL).glob("*-of-*.lock"):
        try:
            hold_lock(lock_path.parent, lock_path.name).close()
        except StoreLockedError:
            return True
    return False


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
