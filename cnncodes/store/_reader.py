"""Reading a code store: :class:`CodeStore` opens a finished store and hands out memory-mapped arrays."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArrayNotFoundError, IncompleteStoreError, StoreError
from ._format import (
    LABELS,
    MANIFEST,
    PARTIAL,
    PROGRESS,
    ShardLayout,
    array_digest,
    check_manifest,
    contained,
    member_path,
    read_json,
)


class CodeStore:
    """Read access to a code store; arrays come memory-mapped, never loaded whole.

    Parameters
    ----------
    path : path-like
        The store directory.
    allow_incomplete : bool, default=False
        Open a store whose extraction has not finished (arrays are then not available).
    verify : bool, default=False
        Read every array and the labels once and check them against the content digests recorded as they were
        written (:meth:`verify`): slow on a large store, so opening is cheap by default. An incomplete store has no
        digests yet and raises :class:`~cnncodes.errors.IncompleteStoreError`, even with ``allow_incomplete``.

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

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False, verify: bool = False) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() or manifest_path.is_symlink():
            contained(self.path, MANIFEST)
        if not manifest_path.is_file():
            raise StoreError(
                f"{self.path} is not a code store (no {MANIFEST}). Create one with `cnncodes extract SOURCE --out "
                f"{self.path}`."
            )
        self.manifest = check_manifest(read_json(manifest_path), manifest_path)
        if self.complete:
            for entry in self.manifest["arrays"]:  # every member named safely, before any work trusts the store
                member_path(self.path, entry, manifest_path)
        if verify:  # an incomplete store refused, not passed unverified: its digests are recorded when it completes
            self.verify()
        if not self.complete and not allow_incomplete:
            raise IncompleteStoreError(
                f"{self.path} is incomplete ({self._rows_committed()}/{self.manifest.get('rows_total')} rows): "
                "its extraction was interrupted or is still running. Rerun the same `cnncodes extract` command to "
                "resume it."
            )

    def verify(self) -> list[str]:
        """Read every array and the labels once and check them against the sha256 digests the writer recorded as
        it wrote them; raises :class:`~cnncodes.errors.StoreError` naming the first file (and tap) that differs,
        e.g. two arrays of equal shape swapped. Returns what was checked. Opening a store does not read its arrays;
        ``CodeStore(path, verify=True)`` and ``cnncodes check STORE`` do."""
        if not self.complete:
            raise IncompleteStoreError(f"{self.path} is incomplete, and its digests are recorded when it completes; "
                                       "rerun the extraction to finish it, then verify it.")  # fmt: skip
        unrecorded = [f"{a['tap']}/{a['pooling']}" for a in self.arrays if "sha256" not in a]
        if unrecorded or "labels_sha256" not in self.manifest:
            raise StoreError(f"{self.path} records no content digests for {unrecorded[:3] or ['labels.npy']} (written "
                             "by a cnncodes before they were added), so it cannot be verified; re-extract it with "
                             "--overwrite to get them.")  # fmt: skip
        checked = []
        for entry in self.arrays:
            path = member_path(self.path, entry, self.path / MANIFEST)
            if array_digest(self.codes(entry["tap"], entry["pooling"])) != entry["sha256"]:
                raise StoreError(f"{path} (tap {entry['tap']!r}, pooling {entry['pooling']!r}) does not match the "
                                 "digest recorded when it was written: the file was changed, damaged or swapped with "
                                 "another. Re-extract the store with --overwrite.")  # fmt: skip
            checked.append(f"{entry['tap']}/{entry['pooling']}")
        if array_digest(np.ascontiguousarray(self.labels)) != self.manifest["labels_sha256"]:
            raise StoreError(f"{self.path / LABELS} does not match the digest recorded when it was written; "
                             "re-extract the store with --overwrite.")  # fmt: skip
        return [*checked, LABELS]

    def _rows_committed(self) -> Any:
        """Rows committed so far: the writer's progress file knows, the manifest only says where it started."""
        try:
            return read_json(self.path / PARTIAL / PROGRESS).get("rows_done", self.manifest.get("rows_done"))
        except (StoreError, AttributeError):
            return self.manifest.get("rows_done")

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
        return self.manifest.get("complete") is True

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

    @property
    def shard(self) -> ShardLayout | None:
        """How this store belongs to a sharded extraction (``None``: it does not)."""
        return ShardLayout.from_dict((self.manifest.get("config") or {}).get("shard"), self.path / MANIFEST)

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
            raise ArrayNotFoundError(f"{self.path} has no single array for {what}; it holds: {have}.")
        return matches[0]

    # -- arrays -----------------------------------------------------------------------------------------------------
    def codes(self, tap: str, pooling: str | None = None) -> np.ndarray:
        """The (rows, dims) codes of ``tap`` under ``pooling``, memory-mapped read-only."""
        if not self.complete:
            raise IncompleteStoreError(f"{self.path} is incomplete; rerun the extraction to finish it.")
        entry = self._array(tap, pooling)
        path = member_path(self.path, entry, self.path / MANIFEST)
        try:
            codes = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, TypeError, OverflowError) as exc:  # a header's shape of True or -1 included
            raise StoreError(f"cannot read {path} (tap {tap!r}, pooling {entry['pooling']!r}: {type(exc).__name__}: "
                             f"{exc}); the store is damaged: re-extract it with --overwrite.") from None  # fmt: skip
        if codes.offset + codes.nbytes != path.stat().st_size:
            raise StoreError(f"{path} (tap {tap!r}, pooling {entry['pooling']!r}) is {path.stat().st_size} bytes but its header describes "
                             f"{codes.offset + codes.nbytes}; the store is damaged: re-extract it with --overwrite.")  # fmt: skip
        if codes.ndim == 2 and codes.shape[0] > 1 and codes.shape[1] > 1 and not codes.flags.c_contiguous:
            raise StoreError(f"{path} (tap {tap!r}) is stored in Fortran order, not row-major as cnncodes writes it; the store is "
                             "damaged: re-extract it with --overwrite.")  # fmt: skip
        if list(codes.shape) != [self.rows, entry["shape"][1]] or codes.dtype != np.dtype(entry["dtype"]):
            raise StoreError(f"{path} (tap {tap!r}, pooling {entry['pooling']!r}) holds {codes.dtype} {tuple(codes.shape)} but the manifest says {entry['dtype']} "
                             f"({self.rows}, {entry['shape'][1]}); the store is damaged: re-extract it with --overwrite.")  # fmt: skip
        return codes

    def read_rows(self, tap: str, pooling: str | None, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` read with plain file reads: unlike slicing the memmap, the pages read do not stay
        mapped in this process, so streaming a store larger than RAM keeps resident memory flat."""
        if not self.complete:
            raise IncompleteStoreError(f"{self.path} is incomplete; rerun the extraction to finish it.")
        header = self.codes(tap, pooling)  # validated against the manifest, naming the file
        path, offset, dims, dtype = Path(header.filename), header.offset, header.shape[1], header.dtype
        del header
        stop = min(stop, self.rows)
        count = max(0, stop - start) * dims
        with open(path, "rb") as f:
            block = np.fromfile(f, dtype=dtype, count=count, offset=offset + start * dims * dtype.itemsize)
        return block.reshape(-1, dims)

    def lazy(self, tap: str, pooling: str | None = None) -> StoredCodes:
        """A handle on the codes of ``tap`` under ``pooling`` that pickles as a path: a joblib or Dask worker given it
        reads the rows it needs from the store itself (shared storage) instead of receiving a copy."""
        entry = self._array(tap, pooling)
        return StoredCodes(
            self.path, entry["tap"], entry["pooling"], (self.rows, int(entry["shape"][1])), str(entry["dtype"])
        )

    def items(self) -> Iterator[tuple[tuple[str, str], np.ndarray]]:
        """Iterate ``((tap, pooling), codes)`` in forward order."""
        for tap, pooling in self.keys():
            yield (tap, pooling), self.codes(tap, pooling)

    @property
    def labels(self) -> np.ndarray:
        """int64 (rows,), -1 where unlabeled; or, for multi-label images, a 0/1 (rows, classes) indicator matrix."""
        path = contained(self.path, LABELS)
        try:
            labels = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, TypeError, OverflowError) as exc:
            raise StoreError(
                f"cannot read {path} ({type(exc).__name__}: {exc}); the store is damaged: re-extract it with --overwrite."
            ) from None
        if labels.shape not in ((self.rows,), (self.rows, len(self.classes))) or labels.dtype.kind not in "iu":
            raise StoreError(
                f"{path} holds {labels.dtype} {labels.shape}, not {self.rows} integer labels; the store is damaged: "
                "re-extract it with --overwrite."
            )
        return labels

    @property
    def multilabel(self) -> bool:
        """Whether an image may show several classes (``labels`` is a rows x classes indicator matrix)."""
        return self.labels.ndim == 2

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


class StoredCodes:
    """The (rows, dims) codes of one store array, opened where they are used.

    Supports ``shape``, ``dtype``, ``len`` and NumPy indexing: a contiguous slice ``[lo:hi]`` is read with plain file
    reads (:meth:`CodeStore.read_rows`, so streaming keeps resident memory flat), anything else goes through a
    read-only memory map opened on first use. Pickles as (path, tap, pooling), never as data.
    """

    def __init__(self, path: str | os.PathLike, tap: str, pooling: str, shape: tuple[int, int], dtype: str) -> None:
        self.path, self.tap, self.pooling = Path(path), tap, pooling
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._store: CodeStore | None = None
        self._map: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> CodeStore:
        if self._store is None:
            self._store = CodeStore(self.path)
        return self._store

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            lo, hi, _ = key.indices(self.shape[0])
            return self._open().read_rows(self.tap, self.pooling, lo, max(lo, hi))
        if self._map is None:
            self._map = self._open().codes(self.tap, self.pooling)
        return self._map[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_map": None}

    def __repr__(self) -> str:
        return f"StoredCodes({str(self.path)!r}, tap={self.tap!r}, pooling={self.pooling!r}, shape={self.shape})"
