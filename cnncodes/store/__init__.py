"""Store: the on-disk format of extracted codes. One owner for reading (:class:`CodeStore`), crash-safe writing and
resuming (:class:`StoreWriter`), shard stores and their merge. Knows nothing about networks or images."""

from ._format import FORMAT_VERSION, ArraySpec, Shard, ShardLayout, same_settings, shard_path
from ._merge import check_merge_target, merge_shards
from ._reader import CodeStore, StoredCodes
from ._writer import SharedStoreWriter, StoreWriter, completed_shards, shared_progress

__all__ = [
    "FORMAT_VERSION",
    "ArraySpec",
    "CodeStore",
    "Shard",
    "ShardLayout",
    "SharedStoreWriter",
    "StoreWriter",
    "StoredCodes",
    "check_merge_target",
    "completed_shards",
    "merge_shards",
    "same_settings",
    "shard_path",
    "shared_progress",
]
