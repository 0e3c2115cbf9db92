"""The code store on its own: what the writer writes the reader reads back, lazy handles, locks, shard layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cnncodes.errors import StoreError, StoreLockedError
from cnncodes.store import ArraySpec, CodeStore, ShardLayout, StoredCodes, StoreWriter
from helpers import make_code_store


def _writer(path, rows=6, dims=3, **kw):
    spec = ArraySpec("a", "avg", dims, "float32", True, False)
    return StoreWriter(path, arrays=[spec], sources=[f"{i}.png" for i in range(rows)], labels=np.arange(rows) % 2,
                       classes=["x", "y"], views=0, config={"k": 1}, info={}, **kw), spec  # fmt: skip


def test_what_the_writer_writes_the_reader_reads_back(tmp_path):
    writer, spec = _writer(tmp_path / "s")
    codes = np.arange(18, dtype=np.float32).reshape(6, 3)
    writer.write(0, {spec.file: codes[:4]})
    writer.commit(4)
    writer.write(4, {spec.file: codes[4:]})
    writer.commit(6)
    store = writer.finalize()
    writer.close()
    again = CodeStore(tmp_path / "s")
    np.testing.assert_array_equal(again.codes("a", "avg"), codes)
    np.testing.assert_array_equal(again.labels, np.arange(6) % 2)
    assert again.keys() == [("a", "avg")] and again.classes == ["x", "y"] and store.rows == 6
    assert again.shard is None


def test_lazy_handles_read_the_same_rows_and_pickle_as_a_path(tmp_path):
    store = make_code_store(tmp_path / "s", n_images=40)
    lazy = store.lazy("mid", "avg")
    assert isinstance(lazy, StoredCodes) and lazy.shape == store.codes("mid", "avg").shape
    full = np.asarray(store.codes("mid", "avg"))
    np.testing.assert_array_equal(lazy[5:17], full[5:17])  # plain file reads
    rows = np.array([3, 0, 39, 7])
    np.testing.assert_array_equal(lazy[rows], full[rows])  # memory map
    np.testing.assert_array_equal(np.asarray(lazy), full)
    blob = pickle.dumps(lazy)
    assert len(blob) < 1000, "a handle must not carry the codes"
    np.testing.assert_array_equal(pickle.loads(blob)[rows], full[rows])


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder, _ = _writer(tmp_path / "s")
    try:
        with pytest.raises(StoreLockedError, match="another cnncodes process is writing"):
            _writer(tmp_path / "s")
    finally:
        holder.close()


def test_opening_what_is_not_a_store_says_how_to_make_one(tmp_path):
    with pytest.raises(StoreError, match="not a code store.*cnncodes extract"):
        CodeStore(tmp_path)
    store = make_code_store(tmp_path / "s", n_images=30)
    with pytest.raises(StoreError, match="no single array for tap 'nope'"):
        store.codes("nope", "avg")


def test_shard_layouts_round_trip_and_malformed_ones_are_refused(tmp_path):
    own = ShardLayout(count=4, index=1, images=(8, 16))
    shared = ShardLayout(count=4, images_per_batch=8)
    for layout in (own, shared):
        assert ShardLayout.from_dict(layout.to_dict(), tmp_path) == layout
    assert own.shard is not None and str(own.shard) == "1/4" and shared.shared and shared.shard is None
    assert ShardLayout.from_dict(None, tmp_path) is None
    with pytest.raises(StoreError, match="shard entry .* is malformed"):
        ShardLayout.from_dict({"index": 1}, tmp_path / "manifest.json")


@pytest.mark.parametrize("name", ["../victim.npy", "/ABS/victim.npy", "sub/x.npy", "..", ".hidden.npy", 7])
def test_manifest_paths_outside_the_store_are_refused_and_never_deleted(tmp_path, name):
    import json

    import cnncodes
    from helpers import make_images, make_tiny_backbone

    victim = tmp_path / "victim.npy"
    np.save(victim, np.zeros(3))
    images, labels = make_images(8)
    kw = dict(labels=labels, model=make_tiny_backbone(), batch_size=4, workers=0, progress=False)
    store = cnncodes.extract(images, out=tmp_path / "s", **kw)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["arrays"][0]["file"] = str(victim) if name == "/ABS/victim.npy" else name
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    entry = manifest["arrays"][0]
    with pytest.raises(StoreError, match="not a plain .npy file name inside the store"):
        CodeStore(store.path).codes(entry["tap"], entry["pooling"])
    with pytest.raises(StoreError, match="not a plain .npy file name inside the store"):
        cnncodes.extract(images, out=tmp_path / "s", poolings="max", overwrite=True, **kw)
    assert victim.is_file()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: [m], "the manifest is .* expected a JSON object"),
        (lambda m: {**m, "format_version": True}, "format_version is true, expected a positive integer"),
        (lambda m: {**m, "format_version": 0}, "format_version is 0"),
        (lambda m: {**m, "complete": "false"}, 'complete is "false", expected true or false'),
        (lambda m: {**m, "arrays": [{"tap": 1}]}, r"arrays\[0\] is"),
        (lambda m: {**m, "format_version": 99}, "newer than this cnncodes supports"),
    ],
)
def test_a_manifest_with_wrong_types_is_refused_naming_the_field(tmp_path, edit, message):
    import json

    store = make_code_store(tmp_path / "s", n_images=30)
    path = store.path / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(StoreError, match=message):
        CodeStore(store.path)
    assert not CodeStore.is_complete(store.path)


def test_a_kill_while_the_first_manifest_was_written_does_not_block_the_rerun(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json.tmp").write_text('{"format": "cnncodes.st')  # torn by the kill
    writer, spec = _writer(tmp_path / "s")
    writer.write(0, {spec.file: np.ones((6, 3), np.float32)})
    writer.commit(6)
    assert writer.finalize().rows == 6
    writer.close()
    assert not (tmp_path / "s" / "manifest.json.tmp").exists()


def test_a_filesystem_without_locks_is_named_instead_of_waiting_forever(tmp_path, monkeypatch):
    import errno

    from cnncodes.store import _writer

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_writer.fcntl, "flock", no_locks)
    with pytest.raises(StoreError, match="does not support file locks .*NFS without a lock manager"):
        _writer.hold_lock(tmp_path, wait=float("inf"))


def test_a_truncated_or_missing_array_is_named(tmp_path):
    store = make_code_store(tmp_path / "s", n_images=30)
    path = store.path / "mid__avg.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"mid__avg\.npy .*damaged"):
        CodeStore(store.path).codes("mid", "avg")
    with pytest.raises(StoreError, match=r"mid__avg\.npy .*damaged"):
        CodeStore(store.path).read_rows("mid", "avg", 0, 5)
    path.unlink()
    with pytest.raises(StoreError, match=r"cannot read .*mid__avg\.npy"):
        CodeStore(store.path).codes("mid", "avg")


def test_overwrite_recovers_a_store_whose_manifest_is_truncated(tmp_path):
    writer, spec = _writer(tmp_path / "s")
    writer.close()
    (tmp_path / "s" / "manifest.json").write_text('{"format": "cnncodes.store", "forma')
    (tmp_path / "s" / "keep.txt").write_text("not ours")
    with pytest.raises(StoreError, match="re-extract with --overwrite"):
        _writer(tmp_path / "s")
    writer, spec = _writer(tmp_path / "s", overwrite=True)
    writer.write(0, {spec.file: np.ones((6, 3), np.float32)})
    writer.commit(6)
    assert writer.finalize().rows == 6
    writer.close()
    assert (tmp_path / "s" / "keep.txt").read_text() == "not ours"


@pytest.mark.parametrize("damage", ["truncate progress", "delete partial array"])
def test_a_resume_over_damaged_progress_starts_the_part_again(tmp_path, damage):
    writer, spec = _writer(tmp_path / "s")
    writer.write(0, {spec.file: np.ones((3, 3), np.float32)})
    writer.commit(3)
    writer.close()
    partial = tmp_path / "s" / ".partial"
    if damage == "truncate progress":
        (partial / "progress.json").write_text('{"rows_do')
    else:
        (partial / spec.file).unlink()
    writer, spec = _writer(tmp_path / "s")
    assert writer.rows_done == 0
    codes = np.arange(18, dtype=np.float32).reshape(6, 3)
    writer.write(0, {spec.file: codes})
    writer.commit(6)
    np.testing.assert_array_equal(writer.finalize().codes("a", "avg"), codes)
    writer.close()


def test_a_full_disk_while_publishing_is_an_error_and_the_store_stays_resumable(tmp_path, monkeypatch):
    import errno
    import os

    writer, spec = _writer(tmp_path / "s")
    codes = np.arange(18, dtype=np.float32).reshape(6, 3)
    writer.write(0, {spec.file: codes})
    writer.commit(6, [{"path": "2.png", "reason": "truncated image", "image": 2}])  # compaction must copy rows

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StoreError, match="disk full: .*rerun the same command"):
        writer.finalize()
    writer.close()
    assert not list((tmp_path / "s").glob("*.tmp"))
    monkeypatch.undo()
    writer, spec = _writer(tmp_path / "s")  # the rerun: nothing to recompute, it publishes
    store = writer.finalize()
    writer.close()
    np.testing.assert_array_equal(store.codes("a", "avg"), codes[[0, 1, 3, 4, 5]])


def test_an_incomplete_store_reports_the_rows_really_committed(tmp_path):
    from cnncodes.errors import IncompleteStoreError

    writer, spec = _writer(tmp_path / "s")
    writer.write(0, {spec.file: np.ones((4, 3), np.float32)})
    writer.commit(4)
    writer.close()
    with pytest.raises(IncompleteStoreError, match=r"is incomplete \(4/6 rows\)"):
        CodeStore(tmp_path / "s")
    assert not CodeStore(tmp_path / "s", allow_incomplete=True).complete
    with pytest.raises(IncompleteStoreError, match="its digests are recorded when it completes"):
        CodeStore(tmp_path / "s", allow_incomplete=True, verify=True)  # never passed unverified


def test_a_stale_partial_folder_of_a_complete_store_is_cleaned_on_the_rerun(tmp_path):
    writer, spec = _writer(tmp_path / "s")
    writer.write(0, {spec.file: np.ones((6, 3), np.float32)})
    writer.commit(6)
    writer.finalize()
    writer.close()
    (tmp_path / "s" / ".partial").mkdir()  # a kill between publishing and removing the work folder
    (tmp_path / "s" / ".partial" / "a__avg.npy").write_bytes(b"x" * 100)
    writer, _ = _writer(tmp_path / "s")
    assert writer.already_complete
    writer.close()
    assert not (tmp_path / "s" / ".partial").exists()


@pytest.mark.parametrize("damage", ["progress is a list", "rows_done negative", "rows_done past the end", "array cut"])
def test_a_resume_over_a_malformed_work_folder_starts_the_part_again(tmp_path, damage):
    import json

    writer, spec = _writer(tmp_path / "s")
    writer.write(0, {spec.file: np.ones((3, 3), np.float32)})
    writer.commit(3)
    writer.close()
    partial = tmp_path / "s" / ".partial"
    progress = json.loads((partial / "progress.json").read_text())
    if damage == "progress is a list":
        (partial / "progress.json").write_text("[]")
    elif damage == "array cut":
        (partial / spec.file).write_bytes((partial / spec.file).read_bytes()[:40])
    else:
        progress["rows_done"] = -5 if damage == "rows_done negative" else 9999
        (partial / "progress.json").write_text(json.dumps(progress))
    writer, spec = _writer(tmp_path / "s")
    assert writer.rows_done == 0
    codes = np.arange(18, dtype=np.float32).reshape(6, 3)
    writer.write(0, {spec.file: codes})
    writer.commit(6)
    np.testing.assert_array_equal(writer.finalize().codes("a", "avg"), codes)
    writer.close()


def test_truncated_labels_are_named(tmp_path):
    store = make_code_store(tmp_path / "s", n_images=30)
    (store.path / "labels.npy").write_bytes((store.path / "labels.npy").read_bytes()[:100])
    with pytest.raises(StoreError, match=r"labels\.npy .*damaged"):
        CodeStore(store.path).labels  # noqa: B018


def test_the_manifest_check_knows_every_layout_the_network_can_record():
    from cnncodes.network._layout import LAYOUT_KINDS
    from cnncodes.store._format import _LAYOUT_KINDS

    assert _LAYOUT_KINDS == LAYOUT_KINDS


# -- content digests --------------------------------------------------------------------------------------------------
def test_digests_are_recorded_as_rows_are_written_and_catch_two_swapped_arrays(tmp_path, capsys):
    import hashlib
    import json

    from cnncodes.cli import main

    store = make_code_store(tmp_path / "s", n_images=40, dims={"early": 6, "mid": 6, "late": 6})
    for entry in store.arrays:  # the writer's digest is the sha256 of the rows' bytes, computed independently here
        codes = np.load(store.path / entry["file"])
        assert entry["sha256"] == hashlib.sha256(codes.tobytes()).hexdigest()
    assert store.manifest["labels_sha256"] == hashlib.sha256(np.load(store.path / "labels.npy").tobytes()).hexdigest()
    assert CodeStore(store.path, verify=True).verify() == ["early/avg", "mid/avg", "late/avg", "labels.npy"]
    assert main(["check", str(store.path)]) == 0
    assert "3 arrays and the labels (40 rows) match" in capsys.readouterr().out
    early, mid = (store.path / e["file"] for e in store.arrays[:2])  # equal shapes: only the digests tell them apart
    early.rename(tmp_path / "x")
    mid.rename(early)
    (tmp_path / "x").rename(mid)
    CodeStore(store.path).codes("early", "avg")  # opening and reading stay cheap: nothing is hashed
    with pytest.raises(StoreError, match=r"early__avg.npy \(tap 'early', pooling 'avg'\) does not match the digest"):
        CodeStore(store.path, verify=True)
    assert main(["check", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "swapped" in err
    manifest = json.loads((store.path / "manifest.json").read_text())
    for entry in manifest["arrays"]:
        entry.pop("sha256")
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="records no content digests .* re-extract it with --overwrite"):
        CodeStore(store.path).verify()


def test_a_resumed_or_compacted_write_records_the_digest_of_the_final_rows(tmp_path):
    import hashlib

    spec = ArraySpec("a", "avg", 3, "float32", True, False)
    rows = np.arange(36, dtype=np.float32).reshape(12, 3)

    def writer():
        return StoreWriter(tmp_path / "s", arrays=[spec], sources=[f"{i}.png" for i in range(12)],
                           labels=np.zeros(12), classes=["c"], views=0, config={"k": 1}, info={})  # fmt: skip

    first = writer()
    first.write(0, {spec.file: rows[:5]})
    first.commit(5)
    first.write(5, {spec.file: rows[5:8]})  # written but not committed: the crash loses it
    first.close()
    again = writer()  # resumes at row 5, hashing rows 0-4 once, then 5-11 as they are written
    assert again.rows_done == 5
    again.write(5, {spec.file: rows[5:]})
    again.commit(12, [{"path": "3.png", "reason": "truncated", "image": 3}])  # compaction drops row 3
    store = again.finalize()
    again.close()
    kept = np.delete(rows, 3, axis=0)
    np.testing.assert_array_equal(store.codes("a", "avg"), kept)
    assert store.arrays[0]["sha256"] == hashlib.sha256(kept.tobytes()).hexdigest()
    assert CodeStore(store.path, verify=True).rows == 11


def test_rows_written_again_with_other_bytes_are_hashed_as_they_end_up(tmp_path):
    import hashlib

    from cnncodes.store._writer import RowFile

    path = tmp_path / "a.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(6, 2)).flush()
    rows = RowFile(path)
    rows.write_rows(0, np.ones((4, 2)))
    rows.write_rows(2, np.full((4, 2), 7.0))  # rows 2-3 rewritten (a retried batch), rows 4-5 new
    final = np.concatenate([np.ones((2, 2)), np.full((4, 2), 7.0)]).astype(np.float32)
    assert rows.digest() == hashlib.sha256(final.tobytes()).hexdigest()
    rows.close()
    np.testing.assert_array_equal(np.load(path), final)
