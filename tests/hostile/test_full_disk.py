"""A real full disk (a small tmpfs, where the test may mount one) and a real file-size limit: extraction fails in one
line with exit 2 wherever the space runs out (preallocation, commits, final compaction), and the same command resumes
to a store bitwise equal to one written with room to spare."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from cnncodes.store import CodeStore
from helpers import write_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    images = write_image_folder(root / "imgs", n=40)
    (images / "class0" / "bad.png").write_bytes(b"\x89PNG garbage")  # a bad image: the store is compacted at the end
    ref = root / "ref"
    assert _extract(images, ref).returncode == 0
    return images, ref


def _extract(images, out, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cnncodes", "extract", str(images), "--model", "resnet18:none", "--input-size", "32",
           "--poolings", "avg,avg2,max", "--batch-size", "8", "--workers", "0", "--out", str(out), "--quiet"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **popen)


def _assert_same(a, b) -> None:
    a, b = CodeStore(a), CodeStore(b)
    assert a.keys() == b.keys() and a.sources == b.sources and a.errors == b.errors
    np.testing.assert_array_equal(a.labels, b.labels)
    for key in a.keys():
        np.testing.assert_array_equal(a.codes(*key), b.codes(*key))


def _mount_tmpfs(where, size: int) -> bool:
    where.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.mark.parametrize("fraction", [0.1, 0.9, 1.05, 1.3])
def test_a_full_disk_is_one_line_and_the_rerun_resumes_to_the_same_store(reference, tmp_path, fraction):
    images, ref = reference
    need = sum(p.stat().st_size for p in ref.iterdir())
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, int(need * fraction)):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        full = _extract(images, disk / "s")
        assert full.returncode == 2, full.stderr
        assert full.stderr.count("\n") == 1 and "rerun the same command" in full.stderr
        assert "disk full: " in full.stderr or "No space left on device: '" in full.stderr  # names the file
        subprocess.run(["mount", "-o", f"remount,size={4 * need}", str(disk)], check=True)
        again = _extract(images, disk / "s")
        assert again.returncode == 0, again.stderr
        _assert_same(ref, disk / "s")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_file_size_limit_is_one_line_and_the_rerun_resumes(reference, tmp_path):
    images, ref = reference
    biggest = max(p.stat().st_size for p in ref.iterdir())

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (biggest // 2, biggest // 2))

    limited = _extract(images, tmp_path / "s", preexec_fn=limit)
    assert limited.returncode == 2, limited.stderr
    assert limited.stderr.count("\n") == 1 and "ulimit -f" in limited.stderr
    assert _extract(images, tmp_path / "s").returncode == 0
    _assert_same(ref, tmp_path / "s")
