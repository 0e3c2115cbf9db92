"""Sharded extraction: shard planning, shards as separate processes, merge, --devices, launcher environments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnncodes import extract
from cnncodes.cli import main
from cnncodes.errors import IncompleteStoreError, StoreError, StoreMismatchError
from cnncodes.extraction import parse_devices, parse_shard, shard_from_env
from cnncodes.store import CodeStore, Shard, merge_shards
from helpers import TESTS, make_images, make_tiny_backbone, wait_for

CLI_MODEL = [
    "--model",
    "resnet18:none",
    "--input-size",
    "32",
    "--taps",
    "last:2",
    "--poolings",
    "avg,avg2",
    "--batch-size",
    "4",
]


def store_files(path: Path) -> dict[str, bytes]:
    """Every array and the labels, byte for byte, and the manifest without its write time."""
    files = {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.npy"))}
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    manifest.pop("written")
    files["manifest"] = json.dumps(manifest).encode()
    return files


def image_folder(root: Path, n: int = 30) -> Path:
    """An ImageFolder with one unreadable file in each half, so errors and row compaction cross shards."""
    images, labels = make_images(n)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"c{label}" / f"{i:03d}.png")
    (root / "c0" / "001_empty.png").write_bytes(b"")
    (root / "c1" / "zzz_text.png").write_text("not an image")
    return root


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnncodes", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out + err


# -- planning ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images,per_batch,count", [(1797, 64, 3), (37, 8, 2), (5, 4, 3), (100, 1, 7), (3, 64, 4)])
def test_shards_cover_every_image_once_on_batch_boundaries(n_images, per_batch, count):
    ranges = [Shard(i, count).image_range(n_images, per_batch) for i in range(count)]
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
    np.testing.assert_array_equal(covered, np.arange(n_images))
    assert all(lo % per_batch == 0 for lo, _ in ranges)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= per_batch  # even split in whole batches


def test_shard_parsing_and_launcher_environments():
    assert parse_shard("2/5", env={}) == Shard(2, 5)
    assert parse_shard((1, 2), env={}) == Shard(1, 2)
    assert parse_shard(None, env={}) is None
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert parse_shard(None, env=torchrun) is None  # a library call inside the user's own torchrun job stays whole
    assert parse_shard("auto", env=torchrun) == Shard(3, 4)
    assert parse_shard(None, env={"RANK": "0", "WORLD_SIZE": "1"}) is None  # a single-process torchrun
    slurm = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard("auto", env=slurm) == Shard(3, 4)
    assert parse_shard(None, env=slurm) is None  # Slurm arrays only with --shard auto: the job may not mean shards
    assert shard_from_env(slurm) == Shard(3, 4)
    with pytest.raises(ValueError, match="out of range \\(0 to 3\\)"):
        parse_shard("4/4", env={})
    with pytest.raises(ValueError, match="is not I/N"):
        parse_shard("1of4", env={})
    with pytest.raises(ValueError, match="found no launcher"):
        parse_shard("auto", env={})
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="names no device"):
        parse_devices(" , ")


# -- shards as separate processes -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_shard_processes_then_merge_equal_a_one_process_run(tmp_path):
    folder = str(image_folder(tmp_path / "images"))
    assert main(["extract", folder, "--out", str(tmp_path / "one"), "--quiet", *CLI_MODEL]) == 0
    out = str(tmp_path / "sharded")
    shards = [cli("extract", folder, "--out", out, "--shard", f"{i}/2", "--quiet", *CLI_MODEL) for i in range(2)]
    logs = [finish(p) for p in shards]  # both ran at the same time
    assert any("2 of 2 shards are" in log for log in logs), logs
    merged = finish(cli("merge", out))
    assert "merged 30 rows" in merged

    assert store_files(tmp_path / "sharded") == store_files(tmp_path / "one")
    store = CodeStore(out)
    assert [e["path"].rsplit("/", 1)[1] for e in store.errors] == ["001_empty.png", "zzz_text.png"]
    assert (Path(out) / "shards" / "0-of-2" / "manifest.json").exists()  # kept unless --remove-shards
    # the one-process command now finds the merged store complete instead of extracting again
    again = cli("extract", folder, "--out", out, *CLI_MODEL)
    assert "wrote 30 rows" in finish(again)
    assert store_files(tmp_path / "sharded") == store_files(tmp_path / "one")


SHARD_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
from helpers import make_images, make_tiny_backbone
from cnncodes import extract
import cnncodes.extraction._run as run_module; run_module.COMMIT_SECONDS = 0  # commit every batch: the pause counts rows
images, labels = make_images(40)
extract(images, labels=labels, out={out!r}, model=make_tiny_backbone(pause={pause!r}), poolings="avg,avg2",
        batch_size=4, workers=0, progress=False, shard={shard!r}, shared={shared!r})
"""


def run_tiny(out: Path, **kwargs) -> CodeStore:
    images, labels = make_images(40)
    settings = dict(model=make_tiny_backbone(), poolings="avg,avg2", batch_size=4, workers=0, progress=False)
    return extract(images, labels=labels, out=out, **{**settings, **kwargs})


@pytest.mark.slow
def test_a_killed_shard_resumes_on_its_own(tmp_path):
    run_tiny(tmp_path / "one")
    out = tmp_path / "sharded"
    run_tiny(out, shard="0/2")
    progress = out / "shards" / "1-of-2" / ".partial" / "progress.json"
    ready = tmp_path / "ready"
    script = SHARD_SCRIPT.format(
        tests=str(TESTS), out=str(out), pause=(str(progress), 8, str(ready)), shard="1/2", shared=False
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    wait_for(ready, proc=proc)  # shard 1 committed >= 8 rows and now blocks in its next forward
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["rows_done"]
    assert 8 <= done < 20, f"kill came too late or too early ({done} rows)"
    with pytest.raises(IncompleteStoreError, match=r"1-of-2 \(\d+/20 rows\).*resume"):
        merge_shards(out)
    run_tiny(out, shard="1/2")  # resumes shard 1 only; shard 0 is not touched
    merge_shards(out, remove_shards=True)
    assert store_files(out) == store_files(tmp_path / "one")
    assert not (out / "shards").exists()


@pytest.mark.slow
def test_torchrun_ranks_split_the_work_and_the_last_one_merges(tmp_path):
    run_tiny(tmp_path / "one")
    out = tmp_path / "launched"
    script = SHARD_SCRIPT.format(tests=str(TESTS), out=str(out), pause=None, shard="auto", shared=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert store_files(out) == store_files(tmp_path / "one")
    assert not (out / "shards").exists()


def test_a_library_call_inside_a_torchrun_job_is_not_a_shard(tmp_path, monkeypatch):
    one = run_tiny(tmp_path / "one")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    inside = run_tiny(tmp_path / "inside")  # shard=None: the environment is not read
    assert inside.shard is None and inside.rows == one.rows
    assert store_files(tmp_path / "inside") == store_files(tmp_path / "one")


@pytest.mark.slow
def test_devices_split_over_processes_equals_one_process(tmp_path):
    one = run_tiny(tmp_path / "one")
    split = run_tiny(tmp_path / "split", devices="cpu,cpu")
    assert split.rows == one.rows
    assert store_files(tmp_path / "split") == store_files(tmp_path / "one")
    assert not (tmp_path / "split" / "shards").exists()
    with pytest.raises(ValueError, match="give one of them"):
        run_tiny(tmp_path / "x", devices="cpu,cpu", shard="0/2")
    with pytest.raises(ValueError, match="CUDA is not available|only \\d+ CUDA"):
        run_tiny(tmp_path / "y", devices="cpu,cuda:7")


def test_more_shards_than_batches_gives_empty_shards_that_merge(tmp_path):
    images, labels = make_images(5)
    kw = dict(labels=labels, model=make_tiny_backbone(), batch_size=4, workers=0, progress=False)
    one = extract(images, out=tmp_path / "one", **kw)
    shards = [extract(images, out=tmp_path / "s", shard=(i, 3), **kw) for i in range(3)]
    assert [s.rows for s in shards] == [0, 4, 1]
    merge_shards(tmp_path / "s")
    assert store_files(tmp_path / "s") == store_files(one.path)


# -- merge refuses what it cannot join ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_merge_names_what_is_wrong(tmp_path):
    with pytest.raises(StoreError, match="does not exist; give the --out directory of a sharded extraction"):
        merge_shards(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no shard stores under .*--shard I/N"):
        merge_shards(tmp_path / "empty")
    out = tmp_path / "s"
    run_tiny(out, shard="0/3")
    with pytest.raises(IncompleteStoreError, match="shard\\(s\\) 1/3, 2/3 missing .*--shard 1/3"):
        merge_shards(out)
    run_tiny(out, shard="1/3")
    run_tiny(out, poolings="max", shard="2/3")
    with pytest.raises(StoreMismatchError, match="2-of-3 was extracted with other settings .*arrays"):
        merge_shards(out)
    run_tiny(out, shard="2/3", overwrite=True)
    with pytest.raises(StoreError, match="is shard 1/2 but .* is one of 3"):
        merge_shards(
            out, [out / "shards" / "0-of-3", out / "shards" / "1-of-3", run_tiny(tmp_path / "t", shard="1/2").path]
        )
    with pytest.raises(StoreError, match="not a shard store"):
        merge_shards(out, [run_tiny(tmp_path / "plain").path])
    run_tiny(tmp_path / "b", batch_size=8, shard="1/3")
    with pytest.raises(StoreError, match="extracted with --batch-size 8 but .* with 4"):
        merge_shards(out, [out / "shards" / "0-of-3", tmp_path / "b" / "shards" / "1-of-3", out / "shards" / "2-of-3"])
    # merging into a directory that holds another store changes nothing there
    other = run_tiny(tmp_path / "other", poolings="max")
    before = store_files(other.path)
    with pytest.raises(StoreMismatchError, match="nothing was changed"):
        merge_shards(other.path, list((out / "shards").iterdir()))
    assert store_files(other.path) == before
    assert merge_shards(out).rows == 40


def test_cli_reports_shard_errors(tmp_path, capsys):
    assert main(["extract", "demo:digits", "--out", str(tmp_path), "--shard", "2/2", *CLI_MODEL]) == 2
    assert "out of range (0 to 1)" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "none")]) == 2
    assert "does not exist; give the --out directory" in capsys.readouterr().err


@pytest.mark.slow
def test_shards_as_dask_tasks_then_merge_equal_one_process(tmp_path):
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    folder = str(image_folder(tmp_path / "images", n=16))
    settings = dict(model="resnet18:none", input_size=32, taps="last:2", poolings="avg", batch_size=4, progress=False)
    extract(folder, out=tmp_path / "one", **settings)
    out = str(tmp_path / "dask")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            futures = client.map(lambda i: str(extract(folder, out=out, shard=(i, 3), **settings).path), range(3))
            assert sorted(client.gather(futures)) == [f"{out}/shards/{i}-of-3" for i in range(3)]
    merge_shards(out)
    assert store_files(Path(out)) == store_files(tmp_path / "one")


# -- one shared, preallocated store -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_shards_filling_one_shared_store_concurrently_equal_a_one_process_run(tmp_path, capsys):
    folder = str(image_folder(tmp_path / "images"))
    assert main(["extract", folder, "--out", str(tmp_path / "one"), "--quiet", *CLI_MODEL]) == 0
    out = str(tmp_path / "shared")
    procs = [
        cli("extract", folder, "--out", out, "--shard", f"{i}/3", "--shared", "--quiet", *CLI_MODEL) for i in range(3)
    ]
    logs = [finish(p) for p in procs]  # three processes create, fill and publish one store at the same time
    assert sum("wrote 30 rows" in log for log in logs) >= 1, logs
    assert store_files(Path(out)) == store_files(tmp_path / "one")
    assert not (Path(out) / ".partial").exists() and not (Path(out) / "shards").exists()
    assert main(["extract", folder, "--out", out, "--shard", "1/3", "--shared", "--quiet", *CLI_MODEL]) == 0  # a rerun
    assert "wrote 30 rows" in capsys.readouterr().out
    assert store_files(Path(out)) == store_files(tmp_path / "one")


@pytest.mark.slow
def test_a_killed_shard_of_a_shared_store_resumes_and_the_last_one_publishes(tmp_path):
    run_tiny(tmp_path / "one")
    out = tmp_path / "shared"
    progress = out / ".partial" / "progress-0-of-2.json"
    ready = tmp_path / "ready"
    script = SHARD_SCRIPT.format(
        tests=str(TESTS), out=str(out), pause=(str(progress), 8, str(ready)), shard="0/2", shared=True
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    wait_for(ready, proc=proc)  # shard 0 committed >= 8 rows and now blocks in its next forward
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 <= json.loads(progress.read_text())["rows_done"] < 20
    assert not run_tiny(out, shard="1/2", shared=True).complete  # shard 1 finishes; shard 0 is still unfinished
    with pytest.raises(IncompleteStoreError, match=r"nothing to merge. Unfinished shards: 0/2 \(\d+/20 rows\)"):
        merge_shards(out)
    assert run_tiny(out, shard="0/2", shared=True).complete  # resumes shard 0, then publishes
    assert store_files(out) == store_files(tmp_path / "one")


@pytest.mark.slow
def test_shared_store_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs a shard"):
        run_tiny(tmp_path / "a", shared=True)
    with pytest.raises(ValueError, match="--overwrite cannot be combined with --shared"):
        run_tiny(tmp_path / "a", shard="0/2", shared=True, overwrite=True)
    run_tiny(tmp_path / "a", shard="0/2", shared=True)
    with pytest.raises(
        StoreMismatchError, match="other settings than this shard .*Give every shard the same arguments"
    ):
        run_tiny(tmp_path / "a", shard="1/2", shared=True, poolings="max")
    with pytest.raises(StoreMismatchError, match="images_per_batch"):
        run_tiny(tmp_path / "a", shard="1/2", shared=True, batch_size=8)
    one = run_tiny(tmp_path / "b")
    before = store_files(one.path)
    assert run_tiny(tmp_path / "b", shard="1/2", shared=True).complete  # the same codes exist already: nothing to do
    assert store_files(one.path) == before


# -- what was there before is never lost or silently reused --------------------------------------------------------------
@pytest.mark.slow
def test_a_sharded_run_into_another_store_is_refused_before_any_work(tmp_path):
    other = run_tiny(tmp_path / "out", poolings="max")
    before = store_files(other.path)
    with pytest.raises(StoreMismatchError, match="nothing was started"):
        run_tiny(tmp_path / "out", shard="0/2")
    with pytest.raises(StoreMismatchError, match="nothing was started"):
        run_tiny(tmp_path / "out", devices="cpu,cpu")
    assert not (tmp_path / "out" / "shards").exists() and store_files(other.path) == before
    run_tiny(tmp_path / "one")
    replaced = run_tiny(tmp_path / "out", devices="cpu,cpu", overwrite=True)  # replaced only at the merge
    assert store_files(replaced.path) == store_files(tmp_path / "one")


@pytest.mark.slow
def test_stale_shards_of_another_split_do_not_break_a_merge(tmp_path):
    run_tiny(tmp_path / "one")
    out = tmp_path / "out"
    run_tiny(out, shard="0/3")  # an abandoned 3-way run
    assert run_tiny(out, shard="1/2", merge=True).path == out / "shards" / "1-of-2"  # 0/2 missing: not merged yet
    with pytest.raises(StoreError, match="2 and 3-way splits"):
        merge_shards(out)
    merged = run_tiny(out, shard="0/2", merge=True)  # the last of the 2-way split merges it, ignoring the 3-way one
    assert merged.path == out and store_files(out) == store_files(tmp_path / "one")


@pytest.mark.slow
def test_an_interrupted_merge_is_redone(tmp_path, monkeypatch):
    run_tiny(tmp_path / "one")
    out = tmp_path / "out"
    for i in range(2):
        run_tiny(out, shard=(i, 2))
    real_save = np.save

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cnncodes.store._merge.np.save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        merge_shards(out)
    assert not CodeStore.is_complete(out)
    monkeypatch.setattr("cnncodes.store._merge.np.save", real_save)
    merge_shards(out, remove_shards=True)
    assert store_files(out) == store_files(tmp_path / "one")
    assert merge_shards(out).rows == 40  # merging again after the shards were removed returns the merged store


def test_shards_with_other_batch_sizes_are_not_merged_even_when_bounds_line_up(tmp_path):
    out = tmp_path / "out"
    run_tiny(out, shard="0/2", batch_size=4)  # 10 batches: images 0-19
    run_tiny(out, shard="1/2", batch_size=20)  # 2 batches: images 20-39
    with pytest.raises(StoreError, match="--batch-size 20 but .* with 4"):
        merge_shards(out)


def test_overwrite_waits_for_running_shards_of_a_shared_store(tmp_path):
    from cnncodes.errors import StoreLockedError
    from cnncodes.store import Shard, SharedStoreWriter

    images, labels = make_images(8)
    from cnncodes.store import ArraySpec

    spec = ArraySpec("a", "avg", 2, "float16", True, False)
    shard = SharedStoreWriter(tmp_path / "s", shard=Shard(0, 2), part=(0, 4), arrays=[spec], sources=list("abcdefgh"),
                              labels=labels, classes=["0", "1", "2"], views=0, info={},
                              config={"k": 1, "shard": {"count": 2, "layout": "shared"}})  # fmt: skip
    try:
        with pytest.raises(StoreLockedError, match="shards are still filling"):
            run_tiny(tmp_path / "s", overwrite=True)
        with pytest.raises(StoreMismatchError) as info:
            run_tiny(tmp_path / "s")
        assert "--batch-size" not in str(info.value)
    finally:
        shard.close()


@pytest.mark.slow
def test_merge_checks_every_shard_against_its_digests(tmp_path):
    images, labels = make_images(16)
    kw = dict(labels=labels, model=make_tiny_backbone(), poolings="avg,avg2", batch_size=4, workers=0, progress=False)
    for i in range(2):
        extract(images, out=tmp_path / "s", shard=(i, 2), **kw)
    shard = CodeStore(tmp_path / "s" / "shards" / "1-of-2")
    victim = shard.path / shard.arrays[0]["file"]
    codes = np.load(victim)
    np.save(victim, codes[::-1].copy())  # same shape and dtype, other rows: only the digest can tell
    with pytest.raises(StoreError, match=r"1-of-2/.*\(tap .*\) does not match the digest its shard recorded"):
        merge_shards(tmp_path / "s")
    assert not CodeStore.is_complete(tmp_path / "s")
    np.save(victim, codes)
    labels = np.load(shard.path / "labels.npy")
    np.save(shard.path / "labels.npy", labels[::-1].copy())  # the labels are checked too
    with pytest.raises(StoreError, match=r"1-of-2/labels.npy does not match the digest its shard recorded"):
        merge_shards(tmp_path / "s")
    np.save(shard.path / "labels.npy", labels)
    merged = merge_shards(tmp_path / "s")
    assert merged.verify()[-1] == "labels.npy"
