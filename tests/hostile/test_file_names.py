"""Real file names and real exits, through the installed ``cnncodes`` script: a file name that is not valid UTF-8 is
extracted, swept and predicted, and written to CSV as its own bytes and to JSON as an escape; a sweep whose work
fails inside its worker threads leaves through the normal error path (one line, exit 2)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_images

pytestmark = pytest.mark.slow

SCRIPT = str(Path(sys.executable).with_name("cnncodes"))
MODEL = ["--model", "resnet18:none", "--input-size", "32", "--taps", "last:2", "--poolings", "avg", "--workers", "0"]
ODD = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8, as older tools wrote them
ODD_CLASS = os.fsdecode(b"cl\xe9")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args, "--quiet"], capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("names") / "images"
    images, labels = make_images(30)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / (ODD_CLASS if label == 0 else f"c{label}")  # a class name that is not UTF-8 either
        folder.mkdir(parents=True, exist_ok=True)
        name = ODD if i == 0 else f"{i:03d}.png"
        Image.fromarray(image).save(os.fsencode(folder / name))
    return root


def test_a_file_name_that_is_not_utf8_is_extracted_swept_and_predicted_losslessly(odd_folder, tmp_path):
    store, sweep, preds = tmp_path / "codes", tmp_path / "sweep", tmp_path / "preds.csv"
    done = _run("extract", str(odd_folder), "--out", str(store), *MODEL)
    assert done.returncode == 0, done.stderr
    assert any(s.endswith(ODD) for s in json.loads((store / "manifest.json").read_text())["sources"])
    done = _run("sweep", str(store), "--out", str(sweep), "--probes", "logreg", "--folds", "2", "--test-size", "0.5",
                "--no-latency", "--scores", "none")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (sweep / "confusion.png").stat().st_size > 0  # the class name drawn as \\xe9, not a crash
    assert ODD_CLASS in json.loads((sweep / "results.json").read_text())["classes"]
    raw = (sweep / "test_predictions.csv").read_bytes()
    with open(sweep / "test_predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15
    odd_rows = [r for r in rows if r["path"].endswith(ODD)]
    if odd_rows:  # on the test side of the split: its bytes are written as they are
        assert os.fsencode(ODD) in raw and Path(odd_rows[0]["path"]).is_file()
    done = _run("predict", str(sweep / "best_probe.zip"), str(odd_folder), "--out", str(preds))
    assert done.returncode == 0, done.stderr
    with open(preds, newline="", encoding="utf-8", errors="surrogateescape") as f:
        predicted = {r["path"]: r for r in csv.DictReader(f)}
    odd = [p for p in predicted if p.endswith(ODD)]
    assert len(predicted) == 30 and len(odd) == 1 and not predicted[odd[0]]["error"]
    assert Path(odd[0]).is_file()  # the written name opens the file: nothing was lost
    to_stdout = _run("predict", str(sweep / "best_probe.zip"), str(odd_folder))
    assert to_stdout.returncode == 0 and os.fsencode(ODD) in to_stdout.stdout


def test_a_sweep_failing_inside_its_worker_threads_exits_2_in_one_line(tmp_path):
    from helpers import make_code_store

    store = make_code_store(tmp_path / "one-class", n_images=40, n_classes=1)
    done = _run("sweep", str(store.path), "--out", str(tmp_path / "sweep"), "--jobs", "2")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    err = done.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("cnncodes sweep: error: ") and "class" in err
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())


def test_ctrl_c_while_a_sweep_runs_in_its_worker_threads_exits_130_in_one_message(tmp_path):
    """Before: 2 of 6 interrupts ended in "terminate called without an active exception" (status 134), the worker
    threads' torch kernels aborting the interpreter's shutdown."""
    import signal
    import time

    from helpers import make_code_store

    store = make_code_store(tmp_path / "codes", n_images=2000, dims={"early": 256, "mid": 1024, "late": 512})
    for k, wait in enumerate((0.0, 0.5, 1.0)):
        child = subprocess.Popen([SCRIPT, "sweep", str(store.path), "--out", str(tmp_path / f"s{k}"), "--jobs", "2",
                                  "--probes", "logreg,linsvc", "--scores", "none"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)  # fmt: skip
        seen = b""
        while b"sweep:" not in seen and child.poll() is None:  # the progress bar: the worker threads are running
            seen += os.read(child.stderr.fileno(), 4096)
        time.sleep(wait)
        child.send_signal(signal.SIGINT)
        err = (seen + child.stderr.read()).decode()
        assert child.wait(timeout=120) == 130, err[-500:]
        assert "terminate called" not in err and "Traceback" not in err and "interrupted" in err
        assert not (tmp_path / f"s{k}").exists() or not any((tmp_path / f"s{k}").iterdir())
