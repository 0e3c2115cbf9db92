"""The on-disk format of a code store: names, array specs, the shard layout and manifest JSON helpers.

The code store: the one module that knows the on-disk format of extracted codes.

A store is a directory::

    manifest.json                 # what is here and how it was made (format_version, complete, arrays, ...)
    labels.npy                    # int64 (rows,), -1 for unlabeled images; multi-label: 0/1 (rows, classes)
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

Format versions: ``format_version`` in ``manifest.json`` is bumped whenever a reader of the previous version
would misread a new store; readers refuse newer versions and keep reading every older one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._fsutil import replace as durable_replace
from ..errors import ParameterError, StoreError

FORMAT_VERSION = 1


MANIFEST = "manifest.json"


LABELS = "labels.npy"


PARTIAL = ".partial"


PROGRESS = "progress.json"


LOCK = ".lock"


SHARDS = "shards"


COPY_CHUNK_ROWS = 8192


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


_MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.npy")


def member_path(root: Path, entry: Any, where: str | os.PathLike) -> Path:
    """Where the array file an ``arrays[]`` manifest entry names lives: always a plain ``.npy`` name directly inside
    ``root``. Absolute paths, ``..``, sub-directories and links out of the store are refused, so neither reading nor
    ``--overwrite`` can touch a file outside the store whatever the manifest says."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not _MEMBER.fullmatch(name):
        raise StoreError(f"{where}: an array entry names the file {name!r}, which is not a plain .npy file name inside "
                         "the store. The manifest is damaged or was edited; re-extract with --overwrite into a new "
                         "--out directory.")  # fmt: skip
    return contained(root, name)


def contained(root: Path, name: str) -> Path:
    """``root / name``, checked by the one containment rule every member of a store follows (arrays, labels.npy,
    manifest.json): a link must stay inside the store, and what is there must be a regular file."""
    path = root / name
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as exc:  # a dangling link, or a loop (ELOOP)
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{path} is a link that loops back on itself; the store is damaged: re-extract it "
                                 "with --overwrite.") from None  # fmt: skip
    if path.is_symlink() and path.resolve().parent != root.resolve():
        raise StoreError(f"{path} is a link to {path.resolve()}, outside the store; refusing to use it. Copy the file "
                         "into the store, or re-extract it with --overwrite.")  # fmt: skip
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end a read
        raise StoreError(f"{path} is not a regular file; the store is damaged: re-extract it with --overwrite.")
    return path


def array_digest(array: np.ndarray) -> str:
    """The sha256 hex digest of an array's values: its C-order bytes, without the ``.npy`` header (the manifest's
    ``sha256`` of each array and ``labels_sha256``), read in 8 MiB blocks so a memory map is never held whole."""
    digest = hashlib.sha256()
    if array.size == 0:
        return digest.hexdigest()
    rows = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    step = max(1, (8 << 20) // max(rows[:1].nbytes, 1))
    for lo in range(0, len(rows), step):
        digest.update(np.ascontiguousarray(rows[lo : lo + step]).tobytes())
    return digest.hexdigest()


def check_manifest(manifest: Any, where: str | os.PathLike) -> dict[str, Any]:
    """Refuse a manifest whose structure or types are wrong (strict: ``true`` is not a version, ``"false"`` is not
    false), naming the file and the field, before anything trusts it."""

    def bad(field: str, value: Any, expected: str) -> StoreError:
        return StoreError(f"{where}: {field} is {short(value)}, expected {expected}. The store is damaged; re-extract "
                          "it with --overwrite (or into a new --out directory).")  # fmt: skip

    if not isinstance(manifest, dict):
        raise bad("the manifest", manifest, "a JSON object")
    if manifest.get("format") != "cnncodes.store":
        raise StoreError(f"{where} is not a cnncodes store manifest (format {short(manifest.get('format'))}).")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise bad("format_version", version, "a positive integer")
    if version > FORMAT_VERSION:
        raise StoreError(f"{where} uses store format {version}, newer than this cnncodes supports ({FORMAT_VERSION}); "
                         "upgrade cnncodes.")  # fmt: skip
    if type(manifest.get("complete", False)) is not bool:
        raise bad("complete", manifest.get("complete"), "true or false")
    for key in ("rows_total", "rows_done", "views"):
        if key in manifest and (type(manifest[key]) is not int or manifest[key] < 0):
            raise bad(key, manifest[key], "a non-negative integer")
    if manifest.get("complete") and manifest.get("rows_done", manifest.get("rows_total")) != manifest.get("rows_total"):
        raise bad(
            "rows_done", manifest.get("rows_done"), f"rows_total ({manifest.get('rows_total')}) in a complete store"
        )
    arrays = manifest.get("arrays", [])
    if not isinstance(arrays, list):
        raise bad("arrays", arrays, "a list")
    rows = manifest.get("rows_total")
    seen_files: set[Any] = set()
    seen_keys: set[tuple[Any, Any]] = set()
    for i, entry in enumerate(arrays):
        problem = _array_entry_problem(entry, rows)
        if problem:
            raise bad(f"arrays[{i}]", entry, problem)
        if entry.get("file") in seen_files or (entry["tap"], entry["pooling"]) in seen_keys:
            raise bad(f"arrays[{i}]", entry, "a file and a (tap, pooling) pair no earlier entry names")
        seen_files.add(entry.get("file"))
        seen_keys.add((entry["tap"], entry["pooling"]))
    for key in ("classes", "sources", "errors"):
        if key in manifest and not isinstance(manifest[key], list):
            raise bad(key, manifest[key], "a list")
    classes = manifest.get("classes", [])
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise bad("classes", classes, "a list of distinct class names (strings)")
    config = manifest.get("config", {})
    if not isinstance(config, dict):
        raise bad("config", config, "an object")
    ShardLayout.from_dict(config.get("shard"), where)
    sources = manifest.get("sources")
    if not all(isinstance(s, str) for s in sources or []):
        raise bad("sources", sources, "a list of image paths (strings)")
    views = manifest.get("views", 0)
    if manifest.get("complete") and sources is not None and type(rows) is int and len(sources) * (views + 1) != rows:
        raise bad("rows_total", rows, f"{len(sources)} sources x {manifest.get('views', 0) + 1} views")
    return manifest


_LAYOUT_KINDS = ("nchw", "nhwc", "tokens", "vector")  # network.Layout's kinds; a test keeps the two equal


def _array_entry_problem(entry: Any, rows: Any) -> str | None:
    """What is wrong with one ``arrays[]`` manifest entry (``None``: nothing), every field the readers use."""
    shape_ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("shape"), list)
        and len(entry["shape"]) == 2
        and all(type(v) is int and v >= 0 for v in entry["shape"])
    )
    if not shape_ok:
        return "{tap, pooling, dtype float16|float32, shape [rows, dims], file}"
    if not (isinstance(entry.get("tap"), str) and entry["tap"] and isinstance(entry.get("pooling"), str)):
        return "a tap name and a pooling name (strings)"
    if entry.get("dtype") not in ("float16", "float32"):
        return "dtype float16 or float32"
    if type(rows) is int and entry["shape"][0] != rows:
        return f"shape [{rows}, dims]: the store's rows_total is {rows}"
    if "dims" in entry and (type(entry["dims"]) is not int or entry["dims"] != entry["shape"][1]):
        return f"dims equal to shape[1] ({entry['shape'][1]})"
    for flag in ("rectified", "relu_applied"):
        if flag in entry and type(entry[flag]) is not bool:
            return f"{flag} true or false"
    if "depth" in entry and type(entry["depth"]) is not int:
        return "depth an integer"
    layout = entry.get("layout")
    if layout is not None and not (isinstance(layout, dict) and layout.get("kind") in _LAYOUT_KINDS):
        return f"layout null or an object whose kind is one of {', '.join(_LAYOUT_KINDS)}"
    return None


def same_settings(old: Any, new: dict[str, Any]) -> bool:
    """Whether a store made with config ``old`` holds what config ``new`` asks for (symmetric: shards compare with it
    too). A store written before numerics were recorded (no ``numerics`` key) matches any numerics: its guarantee was
    never recorded, and refusing would strand every such store."""
    if isinstance(old, dict) and ("numerics" not in old or "numerics" not in new):
        old = {k: v for k, v in old.items() if k != "numerics"}
        new = {k: v for k, v in new.items() if k != "numerics"}
    return old == json.loads(json.dumps(new))


def atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a write error carries no file name; say which file could not be written
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
    durable_replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise StoreError(f"cannot read {path}: {exc}. The store is damaged; re-extract with --overwrite.") from exc


def short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- shards -------------------------------------------------------------------------------------------------------------
def shard_path(out: str | os.PathLike, shard: Any) -> Path:
    """Where shard ``I/N`` of the store ``out`` is written: ``out/shards/I-of-N`` (``shard`` is a
    :class:`cnncodes.shards.Shard`)."""
    return Path(out) / SHARDS / shard.name


def unsharded(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "shard"}


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ParameterError(f"shard count must be at least 1, got {self.count}.")
        if not 0 <= self.index < self.count:
            raise ParameterError(
                f"shard index {self.index} is out of range (0 to {self.count - 1}) for {self.count} shards; shards "
                f"are numbered from 0, e.g. --shard 0/{self.count} ... --shard {self.count - 1}/{self.count}."
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """Directory name of the shard store, e.g. ``1-of-4``."""
        return f"{self.index}-of-{self.count}"

    def image_range(self, n_images: int, images_per_batch: int) -> tuple[int, int]:
        """``[start, stop)`` of this shard's images: whole batches of the one-process run, spread evenly."""
        n_batches = -(-n_images // images_per_batch)
        first = self.index * n_batches // self.count
        last = (self.index + 1) * n_batches // self.count
        return min(first * images_per_batch, n_images), min(last * images_per_batch, n_images)


@dataclass(frozen=True)
class ShardLayout:
    """How a store belongs to a sharded extraction; ``config["shard"]`` in its manifest.

    A shard store (``out/shards/I-of-N``) holds images ``images[0]:images[1]`` of shard ``index`` of ``count``. A
    shared store (``--shared``) is filled in place by ``count`` shards of ``images_per_batch``-image batches;
    ``index`` is then ``None``.
    """

    count: int
    index: int | None = None
    images: tuple[int, int] | None = None
    images_per_batch: int | None = None

    @property
    def shared(self) -> bool:
        return self.index is None

    @property
    def shard(self) -> Shard | None:
        """The ``I/N`` shard this store holds (``None`` for a shared store)."""
        return None if self.index is None else Shard(self.index, self.count)

    def to_dict(self) -> dict[str, Any]:
        if self.shared:
            return {"count": self.count, "images_per_batch": self.images_per_batch, "layout": "shared"}
        return {"index": self.index, "count": self.count, "images": list(self.images or (0, 0))}

    @classmethod
    def from_dict(cls, data: Any, where: str | os.PathLike) -> ShardLayout | None:
        """Parse ``config["shard"]`` (``None`` or absent: not sharded); refuse anything malformed, naming ``where``."""
        if data is None:
            return None
        try:
            if data.get("layout") == "shared":
                return cls(count=int(data["count"]), images_per_batch=int(data["images_per_batch"]))
            lo, hi = (int(v) for v in data["images"])
            return cls(count=int(data["count"]), index=int(data["index"]), images=(lo, hi))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise StoreError(f"{where}: its shard entry {data!r} is malformed. The store is damaged; re-extract it "
                             "with --overwrite.") from None  # fmt: skip
