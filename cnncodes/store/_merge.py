"""Joining the shard stores of a sharded extraction into one store."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._fsutil import replace as durable_replace
from ..errors import IncompleteStoreError, StoreError, StoreMismatchError
from ._format import (
    COPY_CHUNK_ROWS,
    LABELS,
    LOCK,
    MANIFEST,
    PARTIAL,
    SHARDS,
    ShardLayout,
    array_digest,
    atomic_json,
    member_path,
    read_json,
    same_settings,
    unsharded,
)
from ._reader import CodeStore
from ._writer import RowFile, clear_store, config_diff, hold_lock, preallocate, shared_progress


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
        if not shards and not (path / MANIFEST).exists():  # a shard whose writer has made its folder, not its manifest
            raise IncompleteStoreError(f"{path} is still being created (no {MANIFEST} yet): let its `cnncodes extract "
                                       "... --shard I/N` run finish, or rerun it, then merge again.")  # fmt: skip
        store = CodeStore(path, allow_incomplete=True)
        layout = store.shard
        if layout is None or layout.shared:
            raise StoreError(
                f"{path} is not a shard store; merge joins stores written by `cnncodes extract --shard I/N`."
            )
        if count is None:
            count = layout.count
        if layout.count != count:
            raise StoreError(
                f"{path} is shard {layout.shard} but {paths[0]} is one of {count}: merge the shards of one run only."
            )
        if layout.index in by_index:
            raise StoreError(f"{path} and {by_index[layout.index].path} are both shard {layout.shard}.")
        by_index[layout.index] = store
    if count is None:
        raise StoreError(f"no shard stores to merge under {out}.")
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
    base = unsharded(ordered[0].manifest["config"])
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
        if not same_settings(base, unsharded(config)):
            raise StoreMismatchError(
                f"{store.path} was extracted with other settings than {ordered[0].path} "
                f"({config_diff(base, unsharded(config), ('first shard', 'this one'))}). Re-extract that shard with the same arguments."
            )
        if store.classes != ordered[0].classes or store.views != ordered[0].views:
            raise StoreMismatchError(
                f"{store.path} names its classes {store.classes[:5]} (views {store.views}) but {ordered[0].path} "
                f"{ordered[0].classes[:5]} (views {ordered[0].views}): its labels would mean other classes. "
                "Re-extract that shard from the same source."
            )
        lo, hi = store.shard.images
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
        old = read_json(out / MANIFEST)
        if same_settings(old.get("config"), config) and (old.get("complete") or old.get("merging")):
            return
        what = "a complete store" if old.get("complete") else "an unfinished store"
        raise StoreMismatchError(
            f"{out} already holds {what} with other settings or from a one-process run "
            f"({config_diff(old.get('config', {}), config)}); its shards could not be merged there, so nothing was "
            "started. Pass --overwrite to replace it at the merge, resume the one-process run, or choose another --out."
        )
    if any(p.name not in (LOCK, PARTIAL, SHARDS, MANIFEST + ".tmp") for p in out.iterdir()):
        raise StoreError(f"{out} holds files but no {MANIFEST}; choose a new or empty --out directory for the shards.")


def _refuse_shared(out: Path) -> None:
    """A shared store has nothing to merge; say what it is waiting for instead."""
    if not (out / MANIFEST).exists():
        return
    manifest = read_json(out / MANIFEST)
    split = ShardLayout.from_dict((manifest.get("config") or {}).get("shard"), out / MANIFEST)
    if manifest.get("complete") or split is None or not split.shared:
        return
    count = split.count
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
    lock = hold_lock(out, wait=wait)
    try:
        old = read_json(out / MANIFEST) if (out / MANIFEST).exists() else None
        if old is not None and old.get("complete") and not (out / SHARDS).is_dir() and shards is None:
            return CodeStore(out)  # merged by another process, which removed the shard stores
        parts = _shard_stores(out, shards, count)  # raises, naming the fix, unless every shard is complete
        first = parts[0].manifest
        config = unsharded(first["config"])
        if old is not None:
            if same_settings(old.get("config"), config) and old.get("complete"):
                if remove_shards:
                    _remove(parts, out, shards)
                return CodeStore(out)  # already merged (or extracted by one process with the same settings)
            if not (overwrite or (old.get("merging") and same_settings(old.get("config"), config))):
                raise StoreMismatchError(
                    f"{out} already holds a {'complete' if old.get('complete') else 'unfinished'} store with other "
                    f"settings ({config_diff(old.get('config', {}), config)}); nothing was changed. Pass --overwrite "
                    "(Python: overwrite=True) to replace it, or merge into another directory: cnncodes merge NEW_OUT "
                    f"{out / SHARDS}/*"
                )
            clear_store(out, old)  # the store being replaced, or what an interrupted merge left
        elif any(p.name not in (LOCK, PARTIAL, SHARDS, MANIFEST + ".tmp") for p in out.iterdir()):
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
    first_path = parts[0].path / MANIFEST
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
    # An unfinished manifest first: an interrupted merge then leaves a store that merging again replaces. (A kill while
    # it is written leaves only its .tmp, which the rerun ignores and replaces.)
    atomic_json(out / MANIFEST, {**manifest, "complete": False, "rows_done": 0, "merging": True})
    partial = out / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    digests = {}
    for entry in first["arrays"]:
        target = member_path(partial, entry, first_path)
        preallocate(target, entry["dtype"], (rows, entry["shape"][1]))
        writer = RowFile(target)
        try:
            pos = 0
            for store in parts:  # each shard's rows checked against its digest as they are copied
                shard_hash = hashlib.sha256()
                for lo in range(0, store.rows, COPY_CHUNK_ROWS):
                    block = store.read_rows(entry["tap"], entry["pooling"], lo, lo + COPY_CHUNK_ROWS)
                    shard_hash.update(np.ascontiguousarray(block).tobytes())
                    writer.write_rows(pos, block)
                    pos += len(block)
                _check_digest(store, entry, shard_hash.hexdigest())
            digests[entry["file"]] = writer.digest()
        finally:
            writer.close()
    for store in parts:  # the labels too: the merged digest must not vouch for a shard's damaged labels
        recorded = store.manifest.get("labels_sha256")
        if recorded is not None and array_digest(np.ascontiguousarray(store.labels)) != recorded:
            raise StoreError(f"{store.path / LABELS} does not match the digest its shard recorded when it was written. "
                             "Nothing was merged; re-extract that shard (its --shard command with --overwrite).")  # fmt: skip
    labels = np.concatenate([np.asarray(s.labels) for s in parts])
    np.save(partial / LABELS, labels, allow_pickle=False)
    manifest["arrays"] = [{**entry, "sha256": digests[entry["file"]]} for entry in manifest["arrays"]]
    manifest["labels_sha256"] = array_digest(np.ascontiguousarray(labels))
    for entry in first["arrays"]:
        durable_replace(member_path(partial, entry, first_path), member_path(out, entry, first_path))
    durable_replace(partial / LABELS, out / LABELS)
    atomic_json(out / MANIFEST, {**manifest, "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    shutil.rmtree(partial, ignore_errors=True)


def _check_digest(store: CodeStore, entry: dict[str, Any], digest: str) -> None:
    """Refuse a shard whose rows of ``entry`` do not hash to what its manifest recorded when they were written."""
    own = next((a for a in store.arrays if (a["tap"], a["pooling"]) == (entry["tap"], entry["pooling"])), {})
    if own.get("sha256") not in (None, digest):
        raise StoreError(f"{store.path / own['file']} (tap {entry['tap']!r}, pooling {entry['pooling']!r}) does not "
                         "match the digest its shard recorded when it was written: the file was changed or swapped "
                         "with another. Nothing was merged; re-extract that shard (its --shard command with "
                         "--overwrite).")  # fmt: skip


def _remove(parts: list[CodeStore], out: Path, shards: Sequence[str | os.PathLike] | None) -> None:
    for store in parts:
        shutil.rmtree(store.path, ignore_errors=True)
    if shards is None and (out / SHARDS).is_dir() and not any((out / SHARDS).iterdir()):
        (out / SHARDS).rmdir()
