"""Outputs written all at once: a process killed at any write point of a report (sweep, compare, depth, finetune)
leaves the folder holding the complete old report or the complete new one, and the rerun gives the same bytes as an
uninterrupted run; a full disk names the file and leaves the old report whole.

The kill is simulated faithfully: the command runs in a forked child whose file operations (opening a file for
writing, renaming, linking, removing, the folder exchange) are counted, and at the k-th the child ends with
``os._exit`` -- no ``finally``, no buffered write flushed, as under ``kill -9``. k runs over every write point an
uninterrupted run has.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from cnncodes import _fsutil

_MODES = ("w", "a", "x", "+")


class _Killed(Exception):
    pass


def _armed(at: int | None, counter: list[int]):
    """Patches counting every write point; at the ``at``-th the process ends on the spot."""
    real = {"open": builtins.open, "os.open": os.open, "rename": os.rename, "replace": os.replace, "link": os.link,
            "unlink": os.unlink, "rmtree": shutil.rmtree, "exchange": _fsutil._exchange, "mkdir": os.mkdir}  # fmt: skip

    def point() -> None:
        counter[0] += 1
        if at is not None and counter[0] == at:
            os._exit(137)

    def wrap(fn, writes=lambda *a, **k: True):
        def inner(*args, **kwargs):
            if writes(*args, **kwargs):
                point()
            return fn(*args, **kwargs)

        return inner

    def opens_for_writing(file, mode="r", *args, **kwargs):
        return any(m in mode for m in _MODES)

    def os_opens_for_writing(path, flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    builtins.open = io.open = wrap(real["open"], opens_for_writing)  # pathlib opens through io.open
    os.open = wrap(real["os.open"], os_opens_for_writing)
    os.rename, os.replace, os.link = wrap(real["rename"]), wrap(real["replace"]), wrap(real["link"])
    os.unlink, os.mkdir, shutil.rmtree = wrap(real["unlink"]), wrap(real["mkdir"]), wrap(real["rmtree"])
    _fsutil._exchange = wrap(real["exchange"])
    return real


def _in_child(fn, at: int | None) -> tuple[int, int]:
    """Run ``fn()`` in a forked child armed to die at write point ``at``; (exit status, write points passed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        counter = [0]
        try:
            _armed(at, counter)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported as a status
            code = 3
        os.write(write, str(counter[0]).encode())
        os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child armed at write point {at} hung")
        time.sleep(0.01)
    with os.fdopen(read) as f:
        passed = f.read()
    return os.waitstatus_to_exitcode(status), int(passed or 0)


def _snapshot(folder: Path, owned) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in owned if (folder / n).is_file()}


def _check_every_write_point(tmp_path: Path, owned, old_fn, new_fn, extra=None) -> int:
    """``old_fn(out)`` and ``new_fn(out)`` publish two different reports to ``out``. For every write point k of
    ``new_fn`` over ``old_fn``'s report: the child killed at k leaves exactly the old or the new report (and the
    folders and foreign files of ``out`` unharmed), and the rerun gives the new report's bytes."""
    ref = tmp_path / "ref"
    old_fn(ref / "old")
    new_fn(ref / "new")
    old, new = _snapshot(ref / "old", owned), _snapshot(ref / "new", owned)
    assert old != new, "the two reports must differ for the test to tell them apart"
    base = tmp_path / "base"
    old_fn(base)
    (base / "notes.txt").write_text("the user's own file")
    (base / "cuts").mkdir(exist_ok=True)
    (base / "cuts" / "kept.bin").write_bytes(b"cached work")
    status, points = _in_child(lambda: new_fn(base.with_name("probe")), None)
    assert status == 0 and points > 0
    for k in range(1, points + 1):
        out = tmp_path / f"k{k}"
        shutil.copytree(base, out, symlinks=True)
        status, _ = _in_child(lambda out=out: new_fn(out), k)
        assert status == 137, f"write point {k} of {points} was not reached"
        state = _snapshot(out, owned)
        assert state in (old, new), (f"killed at write point {k} of {points}: the folder mixes reports "
                                     f"({sorted(n for n in state if state[n] != old.get(n))} new)")  # fmt: skip
        new_fn(out)  # the rerun
        assert _snapshot(out, owned) == new, f"the rerun after a kill at write point {k} differs"
        assert (out / "notes.txt").read_text() == "the user's own file"
        assert (out / "cuts" / "kept.bin").read_bytes() == b"cached work", f"cuts/ lost after a kill at {k}"
        assert not [p for p in tmp_path.iterdir() if ".publish-" in p.name], f"staging left after a kill at {k}"
        if extra:
            extra(out)
        shutil.rmtree(out)
    return points


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    import cnncodes
    from helpers import make_code_store

    store = make_code_store(tmp_path_factory.mktemp("pub") / "codes", n_images=60)
    config = cnncodes.SweepConfig(probes=("logreg",), folds=2)
    first = cnncodes.sweep(store, config, progress=False, latency=False)
    second = cnncodes.sweep(store, cnncodes.SweepConfig(probes=("logreg",), folds=2, seed=1), progress=False,
                            latency=False)  # fmt: skip
    return first, second


@pytest.mark.slow
def test_a_sweep_report_killed_at_any_write_point_is_old_or_new_and_the_rerun_is_identical(tmp_path, two_sweeps):
    from cnncodes import save_probe
    from cnncodes.sweeps import write_report
    from cnncodes.sweeps._report import REPORT_FILES

    def report(result):
        return lambda out: write_report(result, out, bundle=lambda d: save_probe(result, d))

    def consistent(out: Path) -> None:  # best.json and the bundle are of one sweep
        import json
        import zipfile

        best = json.loads((out / "best.json").read_text())
        with zipfile.ZipFile(out / "best_probe.zip") as zf:
            metrics = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith(".json"))))["metrics"]
        assert {k: metrics.get(k) for k in best} == best

    points = _check_every_write_point(tmp_path, REPORT_FILES, report(two_sweeps[0]), report(two_sweeps[1]), consistent)
    assert points >= 8  # every file, the staging folder, the exchange, the clean-up


@pytest.mark.slow
def test_a_comparison_report_killed_at_any_write_point_is_old_or_new(tmp_path, two_sweeps):
    from cnncodes.sweeps import write_results
    from cnncodes.sweeps._report import REPORT_FILES

    first, second = two_sweeps
    _check_every_write_point(tmp_path / "a", REPORT_FILES, lambda out: write_results(first, out, plot=False),
                             lambda out: write_results(second, out, plot=False))  # fmt: skip


@pytest.mark.slow
def test_a_full_disk_while_a_report_is_written_names_the_file_and_keeps_the_old_report(tmp_path, two_sweeps,
                                                                                       monkeypatch):  # fmt: skip
    from cnncodes import save_probe
    from cnncodes.sweeps import write_report
    from cnncodes.sweeps._report import REPORT_FILES

    first, second = two_sweeps
    out = tmp_path / "sweep"
    write_report(first, out, bundle=lambda d: save_probe(first, d))
    old = _snapshot(out, REPORT_FILES)
    real = builtins.open
    opened = []

    def full(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        if "w" in mode and Path(str(file)).name == "results.json":
            opened.append(file)
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr(builtins, "open", full)
    monkeypatch.setattr(io, "open", full)  # pathlib's write_text opens through io.open
    with pytest.raises(OSError, match="No space left") as info:
        write_report(second, out, bundle=lambda d: save_probe(second, d))
    monkeypatch.undo()
    assert opened and info.value.filename == str(out / "results.json")
    assert _snapshot(out, REPORT_FILES) == old
    assert not [p for p in tmp_path.iterdir() if ".publish-" in p.name]


@pytest.mark.slow
def test_a_report_in_a_folder_that_cannot_be_exchanged_is_still_written_file_by_file(tmp_path, two_sweeps,
                                                                                     monkeypatch):  # fmt: skip
    from cnncodes.sweeps import write_results

    first, second = two_sweeps
    out = tmp_path / "sweep"
    write_results(first, out)
    assert (out / "sweep.png").is_file()
    monkeypatch.setattr(_fsutil, "_exchange", lambda a, b: False)  # a filesystem without renameat2
    paths = write_results(second, out, plot=False)
    assert paths["best.json"] == out / "best.json"
    assert (out / "best.json").read_bytes() == json.dumps(
        {k: v for k, v in second.best_record().items() if k != "fit_seconds"}, indent=1
    ).encode()
    assert not (out / "sweep.png").exists()  # an old run's plot does not stay beside the new report
    monkeypatch.undo()
    monkeypatch.chdir(out)  # the working directory is never swapped away: written in place
    write_results(first, out, plot=False)
    assert Path.cwd().samefile(out) and (out / "results.json").is_file()
    assert not [p for p in [*tmp_path.iterdir(), *out.iterdir()] if ".publish-" in p.name]


@pytest.mark.slow
def test_finetune_outputs_killed_at_any_write_point_are_both_old_or_both_new(tmp_path):
    import cnncodes
    from cnncodes.network import cut_points
    from cnncodes.training import FinetuneConfig
    from cnncodes.training._run import FINETUNE_FILES, publish_finetuned
    from helpers import make_images, make_tiny_backbone

    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(24)
    store = cnncodes.extract(images, labels=labels, out=tmp_path / "cache", model=backbone, taps=cut,
                             poolings="none", relu="never", views=1, dtype="float32", batch_size=6, workers=0,
                             progress=False)  # fmt: skip
    runs = [cnncodes.finetune(store, cut, backbone=backbone, config=FinetuneConfig(head=True, epochs=2, seed=seed),
                              progress=False) for seed in (0, 1)]  # fmt: skip

    def publish(done):
        return lambda out: publish_finetuned(done, backbone, out, None)

    _check_every_write_point(tmp_path / "k", FINETUNE_FILES, publish(runs[0]), publish(runs[1]))


@pytest.mark.slow
def test_a_depth_report_killed_at_any_write_point_keeps_its_cuts_and_is_old_or_new(tmp_path):
    from cnncodes.training import DepthRow, write_depth_report
    from cnncodes.training._depth import DEPTH_FILES

    def rows(shift: float) -> list:
        return [DepthRow(f"layer{i}", i, 0.5 + shift, 0.5, 0.6, 0.6 + shift, 1000 * i, 1.0, 2.0, best=i == 1)
                for i in (1, 2)]  # fmt: skip

    _check_every_write_point(tmp_path / "k", DEPTH_FILES, lambda out: write_depth_report(rows(0.0), out),
                             lambda out: write_depth_report(rows(0.1), out))  # fmt: skip


@pytest.mark.slow
def test_a_merge_killed_at_any_write_point_is_rerun_to_the_same_store(tmp_path):
    from cnncodes import extract
    from cnncodes.store import CodeStore, merge_shards
    from helpers import make_images, make_tiny_backbone

    images, labels = make_images(16)
    kw = dict(labels=labels, model=make_tiny_backbone(), poolings="avg,avg2", batch_size=4, workers=0, progress=False)
    one = extract(images, out=tmp_path / "one", **kw)
    base = tmp_path / "base"
    for i in range(2):
        extract(images, out=base, shard=(i, 2), **kw)

    def files(path: Path) -> dict[str, bytes]:
        out = {p.name: p.read_bytes() for p in sorted(path.glob("*.npy"))}
        manifest = json.loads((path / "manifest.json").read_text())
        manifest.pop("written")
        return out | {"manifest": json.dumps(manifest).encode()}

    reference = files(one.path)
    probe = shutil.copytree(base, tmp_path / "probe")
    status, points = _in_child(lambda: merge_shards(probe), None)
    assert status == 0 and points >= 5
    for k in range(1, points + 1):
        out = tmp_path / f"k{k}"
        shutil.copytree(base, out)
        status, _ = _in_child(lambda out=out: merge_shards(out), k)
        assert status == 137, f"write point {k} of {points} was not reached"
        if CodeStore.is_complete(out):  # killed after publishing: already the merged store
            assert files(out) == reference
        assert merge_shards(out).rows == one.rows, f"the rerun after a kill at write point {k} failed"
        assert files(out) == reference, f"the rerun after a kill at write point {k} differs"
        shutil.rmtree(out)


def test_a_folder_or_link_where_an_output_file_goes_is_refused_before_any_work(tmp_path):
    out = tmp_path / "sweep"
    (out / "best.json").mkdir(parents=True)
    (out / "best.json" / "mine.txt").write_text("the user's")
    (out / "results.csv").symlink_to(tmp_path / "elsewhere.csv")
    called = []
    for name, kind in (("best.json", "a folder"), ("results.csv", "a link")):
        with pytest.raises(FileExistsError, match=f"{kind} where this command writes its {name}") as info:
            _fsutil.publish(out, called.append, owned=(name, "other.txt"))
        assert info.value.filename == str(out / name)
    assert not called and (out / "best.json" / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no staging folder, nothing written beside


def _write(stage: Path) -> None:
    (stage / "a.txt").write_text("new")


def test_a_folder_that_may_not_be_exchanged_is_written_file_by_file_without_leaving_its_stage(tmp_path, monkeypatch):
    class Libc:  # renameat2 refused as in a sticky folder owned by someone else
        @staticmethod
        def renameat2(*args):
            return -1

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    (out / "b.txt").write_text("old, owned, not rewritten")
    (out / "keep.txt").write_text("the user's")
    monkeypatch.setattr(_fsutil.ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(_fsutil.ctypes, "get_errno", lambda: errno.EPERM)
    _fsutil.publish(out, _write, owned=("a.txt", "b.txt"))
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "keep.txt"]
    assert (out / "a.txt").read_text() == "new" and (out / "keep.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(_fsutil.ctypes, "get_errno", lambda: errno.EIO)  # a real failure is not hidden
    with pytest.raises(OSError, match="Input/output error"):
        _fsutil.publish(out, _write, owned=("a.txt",))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder another owner needs root")
def test_a_swapped_folder_keeps_its_owner_group_and_mode(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    os.chown(out, 4321, 8765)
    os.chmod(out, 0o2770)
    _fsutil.publish(out, _write, owned=("a.txt",))
    st = out.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 8765, 0o2770)
    assert (out / "a.txt").read_text() == "new"


def test_a_folder_this_process_could_not_give_its_owner_is_not_swapped(tmp_path, monkeypatch):
    out = tmp_path / "theirs"
    out.mkdir()
    me, group = 1000, 1000
    monkeypatch.setattr(os, "geteuid", lambda: me)
    monkeypatch.setattr(os, "getegid", lambda: group)
    monkeypatch.setattr(os, "getgroups", lambda: [group, 27])

    def stat(uid, gid):
        return os.stat_result((0o40755, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    assert _fsutil._may_own_like(stat(me, group)) and _fsutil._may_own_like(stat(me, 27))
    assert not _fsutil._may_own_like(stat(me + 1, group)) and not _fsutil._may_own_like(stat(me, 999))
    assert not _fsutil._can_swap(out)  # owned by root, seen from uid 1000: written file by file


def test_recover_follows_a_linked_output_folder_as_publish_does(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    left = tmp_path / ".real.publish-999999999-x"  # a dead publish to the link, killed after its exchange
    (left / "cuts").mkdir(parents=True)
    (left / "cuts" / "kept.bin").write_bytes(b"cached")
    _fsutil.recover(tmp_path / "link")
    assert (real / "cuts" / "kept.bin").read_bytes() == b"cached" and not left.exists()


_FORK_SERVER = r"""
import os, signal, sys
sys.path[:0] = [{tests!r}, {here!r}]
import test_publish
from cnncodes.cli import main
# imported once here for every child (not run: no torch thread pool starts in this process, so forks of it are safe)
import cnncodes, cnncodes.deploy, torch, torch.export, torchvision.models  # noqa: E401, F401


def run(at, out):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: counts the write points it passes, dies at the at-th; never returns into this script
        status = 1
        try:
            os.close(read)
            signal.alarm(120)  # a hung child dies of SIGALRM (exit -14), named by its k below
            counter = [0]
            test_publish._armed(at, counter)
            status = main([*sys.argv[3:], out])
            os.write(write, str(counter[0]).encode())
        finally:
            os._exit(status)
    os.close(write)
    passed = os.read(read, 64).decode()
    os.close(read)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), passed


root, name = sys.argv[1], sys.argv[2]
status, points = run(None, os.path.join(root, "ref-" + name))
assert status == 0, status
print("POINTS", points, flush=True)
for k in range(1, int(points) + 2):  # one past the last: the same path, the same points, and no kill
    os.mkdir(os.path.join(root, "k%d" % k))
    with open(os.path.join(root, "k%d" % k, name), "wb") as f:
        f.write(b"the old file")
    status, passed = run(k, os.path.join(root, "k%d" % k, name))
    print("KILLED", k, status, passed or "-", flush=True)
"""


@pytest.mark.slow
def test_predict_out_and_export_killed_at_any_write_point_leave_the_old_file_or_the_new_one(tmp_path):
    """Each run in a fork of one fresh interpreter that imported torch but ran nothing in it (a fork of a process
    that ran torch's thread pools, as the test process has, can deadlock in torch)."""
    import subprocess
    import sys

    from cnncodes.cli import main
    from helpers import write_image_folder

    images = write_image_folder(tmp_path / "imgs", n=18)
    model = ["--model", "resnet18:none", "--input-size", "32", "--taps", "last:1", "--poolings", "avg", "--quiet"]
    assert main(["extract", str(images), "--out", str(tmp_path / "codes"), *model]) == 0
    assert main(["sweep", str(tmp_path / "codes"), "--out", str(tmp_path / "sweep"), "--probes", "logreg", "--folds",
                 "2", "--no-latency", "--scores", "none", "--quiet"]) == 0  # fmt: skip
    bundle = tmp_path / "sweep" / "best_probe.zip"
    here = str(Path(__file__).parent)
    script = _FORK_SERVER.format(tests=str(Path(here).parent), here=here)

    for name, args in (("preds.csv", ["predict", str(bundle), str(images), "--quiet", "--out"]),
                       ("m.pt2", ["export", str(bundle), "--out"])):  # fmt: skip
        root = tmp_path / name.replace(".", "-")
        root.mkdir()
        done = subprocess.run([sys.executable, "-c", script, str(root), name, *args], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        ref = root / f"ref-{name}"
        points = int(done.stdout.split("POINTS")[1].split()[0])
        assert points >= 2
        killed = {int(k): (int(v), passed) for k, v, passed in (line.split()[1:] for line in done.stdout.splitlines()
                                                               if line.startswith("KILLED"))}  # fmt: skip
        assert sorted(killed) == list(range(1, points + 2))
        assert killed.pop(points + 1) == (0, str(points)), "an unkilled run passed other write points than the first"
        status = {k: v for k, (v, _) in killed.items()}
        for k in range(1, points + 1):
            out = root / f"k{k}" / name
            assert status[k] == 137, f"{name}: write point {k} of {points} not reached"
            now = out.read_bytes()
            if now != b"the old file":  # the new file, whole
                if name.endswith(".csv"):
                    assert now == ref.read_bytes(), f"{name} half written after a kill at {k}"
                else:
                    import torch

                    assert torch.export.load(str(out)) is not None
            assert main([*args, str(out)]) == 0  # the rerun
            if name.endswith(".csv"):
                assert out.read_bytes() == ref.read_bytes()
            assert [p.name for p in out.parent.iterdir()] == [name], f"{name}: a partial file left after a kill at {k}"
            shutil.rmtree(out.parent)
