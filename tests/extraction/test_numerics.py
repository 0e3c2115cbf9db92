"""Numerics travel with the codes: a store records the device, precision and software its codes were computed with; a
resume or merge under other numerics is refused; bundles carry them and prediction runs at the same precision. Also:
bare ``cuda`` under torchrun and how often rows are committed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cnncodes
import cnncodes.extraction._run as run_module
from cnncodes.errors import StoreMismatchError
from cnncodes.network import numerics
from cnncodes.store import CodeStore, Shard, merge_shards
from helpers import make_images, make_tiny_backbone

ON_A_GPU = {"device": "cuda", "precision": "bfloat16", "torch": torch.__version__, "gpu": "NVIDIA H100 80GB HBM3",
            "cuda": "13.0", "cudnn": 91000}  # fmt: skip


def _extract(out, backbone=None, **kw):
    images, labels = make_images(16)
    settings = dict(labels=labels, model=backbone or make_tiny_backbone(), poolings="avg", batch_size=4, workers=0,
                    progress=False)  # fmt: skip
    return cnncodes.extract(images, out=out, **{**settings, **kw})


def _interrupted(out) -> None:
    backbone, seen = make_tiny_backbone(), []

    def stop_at_third_batch(module, args):
        if args[0].shape[0] == 4:
            seen.append(1)
            if len(seen) == 3:
                raise KeyboardInterrupt

    backbone.model.stem.register_forward_pre_hook(stop_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _extract(out, backbone)


def test_the_store_records_the_numerics_of_its_codes(tmp_path):
    store = _extract(tmp_path / "s")
    assert store.manifest["config"]["numerics"] == numerics(torch.device("cpu"), amp=True)
    assert store.manifest["config"]["numerics"]["precision"] == "float32"  # no autocast on the CPU


def test_a_resume_under_other_numerics_is_refused_and_overwrite_starts_again(tmp_path, monkeypatch):
    _interrupted(tmp_path / "s")
    monkeypatch.setattr(run_module, "numerics", lambda dev, amp: ON_A_GPU)
    with pytest.raises(StoreMismatchError, match="numerics: store has .*cpu.* asked .*cuda.*same numerics"):
        _extract(tmp_path / "s")
    assert _extract(tmp_path / "s", overwrite=True).manifest["config"]["numerics"] == ON_A_GPU


def test_shards_made_under_other_numerics_do_not_merge(tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    _extract(out, shard=Shard(0, 2))
    monkeypatch.setattr(run_module, "numerics", lambda dev, amp: ON_A_GPU)
    _extract(out, shard=Shard(1, 2))
    with pytest.raises(StoreMismatchError, match="numerics: first shard .*cpu.*this one .*cuda"):
        merge_shards(out)


def test_bundles_carry_the_numerics_and_prediction_uses_their_precision(tmp_path):
    store = _extract(tmp_path / "s")
    result = cnncodes.sweep(store, cnncodes.SweepConfig(probes=("logreg",), folds=2, test_size=0.25), progress=False)
    bundle = cnncodes.save_probe(result, tmp_path / "sweep")
    probe = cnncodes.load_bundle(bundle, backbone=make_tiny_backbone())
    assert probe.bundle.extractor.numerics == store.manifest["config"]["numerics"]
    assert probe.amp is False  # float32 codes: predict without autocast too
    assert cnncodes.load_bundle(bundle, backbone=make_tiny_backbone(), amp=True).amp is True

    import zipfile

    with zipfile.ZipFile(bundle) as zf:
        meta = json.loads(zf.read("bundle.json"))
    assert meta["extractor"]["numerics"]["device"] == "cpu"


def test_bare_cuda_under_torchrun_is_the_ranks_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    for asked, expected in (("cuda", "cuda:1"), ("auto", "cuda:1"), ("cuda:0", "cuda:0"), ("cpu", "cpu")):
        _, _, launched, device = run_module._split_plan("auto", None, asked, False, False, None)
        assert launched and device == expected, asked


@pytest.mark.parametrize(("seconds", "commits"), [(0.0, 4), (float("inf"), 1)])
def test_rows_are_committed_at_most_every_commit_interval_and_always_at_the_end(
    tmp_path, monkeypatch, seconds, commits
):
    from cnncodes.store import StoreWriter

    counted = []
    original = StoreWriter.commit
    monkeypatch.setattr(StoreWriter, "commit", lambda self, *a, **k: (counted.append(a[0]), original(self, *a, **k))[1])
    monkeypatch.setattr(run_module, "COMMIT_SECONDS", seconds)
    store = _extract(tmp_path / "s")
    assert len(counted) == commits and counted[-1] == 16 and store.rows == 16
    reference = _extract(tmp_path / "ref")
    np.testing.assert_array_equal(store.labels, reference.labels)


def test_an_interrupt_between_commits_still_commits_every_row_written(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "COMMIT_SECONDS", float("inf"))
    _interrupted(tmp_path / "s")
    progress = json.loads((tmp_path / "s" / ".partial" / "progress.json").read_text())
    assert progress["rows_done"] == 8  # batches 1 and 2 were computed before the third failed: neither is lost
    assert CodeStore(tmp_path / "s", allow_incomplete=True).manifest["complete"] is False


def test_a_store_from_before_numerics_were_recorded_still_resumes_and_is_reused(tmp_path):
    _interrupted(tmp_path / "s")
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["numerics"]  # what a store written by cnncodes 0.2.0 looks like
    path.write_text(json.dumps(manifest))
    store = _extract(tmp_path / "s")  # resumes instead of "made with different settings"
    assert store.complete and "numerics" not in store.manifest["config"]
    assert _extract(tmp_path / "s").manifest["written"] == store.manifest["written"]  # reused as it is


@pytest.mark.slow
def test_a_failed_commit_loses_no_image_error_and_the_rerun_equals_a_clean_run(tmp_path, monkeypatch):
    import errno

    from cnncodes.store import StoreWriter
    from helpers import write_image_folder

    images = write_image_folder(tmp_path / "imgs", n=24)
    for i in (3, 14):  # bad images in different batches
        next(images.rglob(f"{i:03d}.png")).write_bytes(b"\x89PNG garbage")
    kw = dict(model=make_tiny_backbone(), poolings="avg", views=1, batch_size=4, workers=0, progress=False)
    clean = cnncodes.extract(images, out=tmp_path / "clean", **kw)
    monkeypatch.setattr(run_module, "COMMIT_SECONDS", 0.0)
    original, failed = StoreWriter.commit, []

    def fsync_fails_once(self, rows_done, errors=()):
        if errors and not failed:
            failed.append(rows_done)
            raise OSError(errno.EIO, "Input/output error (injected)")
        return original(self, rows_done, errors)

    monkeypatch.setattr(StoreWriter, "commit", fsync_fails_once)
    with pytest.raises(OSError, match="injected"):
        cnncodes.extract(images, out=tmp_path / "s", **kw)
    progress = json.loads((tmp_path / "s" / ".partial" / "progress.json").read_text())
    assert progress["rows_done"] < failed[0]  # nothing past the failed commit was recorded as done
    monkeypatch.setattr(StoreWriter, "commit", original)
    again = cnncodes.extract(images, out=tmp_path / "s", **{**kw, "model": make_tiny_backbone()})
    assert again.rows == clean.rows and sorted(e["path"] for e in again.errors) == sorted(
        e["path"] for e in clean.errors
    )
    np.testing.assert_array_equal(again.labels, clean.labels)
    for key in clean.keys():
        np.testing.assert_array_equal(again.codes(*key), clean.codes(*key))


def test_a_shard_from_before_numerics_merges_with_a_new_one(tmp_path):
    out = tmp_path / "sharded"
    first = _extract(out, shard=Shard(0, 2))
    path = first.path / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["numerics"]
    path.write_text(json.dumps(manifest))
    _extract(out, shard=Shard(1, 2))
    merged = merge_shards(out)
    reference = _extract(tmp_path / "one")
    for key in reference.keys():
        np.testing.assert_array_equal(merged.codes(*key), reference.codes(*key))
