"""The command line, both in-process (``main``) and as the installed ``cnncodes`` script."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnncodes import CodeStore, list_taps, load_backbone
from cnncodes.cli import main


@pytest.mark.slow
def test_layers_json_matches_the_catalogue(capsys):
    assert main(["layers", "resnet18:none", "--input-size", "64", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    catalogue = list_taps(load_backbone("resnet18:none", input_size=64))
    assert [t["name"] for t in listed["taps"]] == catalogue.names
    relu = next(t for t in listed["taps"] if t["name"] == "layer1.0.relu")
    assert relu["shape"] == [64, 16, 16] and relu["post_activation"] and relu["dims"]["avg2"] == 256


def test_layers_table_shows_layout_rectification_and_shapes(capsys):
    assert main(["layers", "efficientnet_lite0", "--input-size", "96"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if " blocks.5.0.bn1 " in ln)
    assert line.startswith("e ") and " nchw " in line and " net " in line and "672x6x6" in line
    stage = next(ln for ln in out.splitlines() if " blocks.4.2.add " in ln)
    assert stage.startswith("*") and " - " in stage  # a raw residual-stream stage output


def test_user_errors_exit_2_with_a_message(capsys):
    assert main(["layers", "resnt18"]) == 2
    assert "Close matches" in capsys.readouterr().err
    assert main(["extract", "demo:nope", "--out", "x"]) == 2
    assert "demo:digits" in capsys.readouterr().err


def _folder(root, n=6):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")


@pytest.mark.skipif(shutil.which("cnncodes") is None, reason="the package is not installed as a script")
@pytest.mark.slow
def test_installed_script_extracts_a_folder(tmp_path):
    _folder(tmp_path / "imgs")
    cmd = ["cnncodes", "extract", str(tmp_path / "imgs"), "--model", "resnet18:none", "--input-size", "32", "--taps",
           "stages", "--poolings", "avg,avg2", "--out", str(tmp_path / "s"), "--batch-size", "5", "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "broken.jpg" in done.stdout
    store = CodeStore(tmp_path / "s")
    assert store.rows == 12 and len(store.errors) == 1 and store.classes == ["a", "b"]
    module = subprocess.run(
        [sys.executable, "-m", "cnncodes", "extract", *cmd[2:]], capture_output=True, text=True, timeout=300
    )
    assert module.returncode == 0, module.stderr  # the same command again reuses the complete store
    refused = subprocess.run(cmd[:-1] + ["--poolings", "max", "--quiet"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, "the script's exit status must be main()'s"
    assert "cnncodes extract: error:" in refused.stderr and "max" in refused.stderr


@pytest.mark.slow
def test_in_process_extract_then_mismatch_is_refused(tmp_path, capsys):
    _folder(tmp_path / "imgs", n=3)
    base = [
        "extract",
        str(tmp_path / "imgs"),
        "--model",
        "resnet18:none",
        "--input-size",
        "32",
        "--out",
        str(tmp_path / "s"),
        "--quiet",
    ]
    assert main(base) == 0
    assert main(base[:-1] + ["--poolings", "max", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_relu_choice_is_recorded_per_array_and_matches_the_python_route(tmp_path):
    _folder(tmp_path / "imgs", n=3)
    base = ["extract", str(tmp_path / "imgs"), "--model", "resnet18:none", "--input-size", "32", "--pool", "avg",
            "--layers", "layer1.0.bn1,layer1.0.bn2", "--quiet"]  # fmt: skip
    assert main(base + ["--out", str(tmp_path / "auto")]) == 0
    assert main(base + ["--out", str(tmp_path / "never"), "--relu", "never"]) == 0
    auto, never = CodeStore(tmp_path / "auto"), CodeStore(tmp_path / "never")
    applied = {a["tap"]: (a["relu"], a["relu_applied"], a["rectified"]) for a in auto.arrays}
    assert applied == {"layer1.0.bn1": ("auto", True, True), "layer1.0.bn2": ("auto", False, False)}
    assert all(a["relu"] == "never" and not a["relu_applied"] for a in never.arrays)
    assert all(a["layout"] == {"kind": "nchw"} for a in auto.arrays)
    np.testing.assert_array_equal(auto.codes("layer1.0.bn2", "avg"), never.codes("layer1.0.bn2", "avg"))
    assert (np.asarray(never.codes("layer1.0.bn1", "avg")) < 0).any() and (
        np.asarray(auto.codes("layer1.0.bn1", "avg")) >= 0
    ).all()


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    from helpers import make_code_store

    store = make_code_store(tmp_path / "codes", n_images=30)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["sweep", str(store.path), "--out", str(a_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a file; give a directory" in err and "nothing was computed" in err
    assert main(["predict", str(tmp_path / "no.zip"), "demo:digits", "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no.zip"), "--out", str(a_file / "m.pt2")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err  # before any work


def test_a_store_without_its_model_is_refused_before_the_sweep(tmp_path, capsys):
    import json

    from helpers import make_code_store

    store = make_code_store(tmp_path / "codes", n_images=30)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["model"] = None
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["sweep", str(store.path), "--out", str(tmp_path / "sw"), "--quiet"]) == 2
    assert "does not say which model made its codes" in capsys.readouterr().err
    assert not (tmp_path / "sw" / "results.csv").exists()


def test_an_unwritable_output_says_read_only_when_it_is(tmp_path, monkeypatch, capsys):
    """A read-only file is named read-only, with the fix (as root every file is writable, so the check runs as a user
    who may not write: os.access says no)."""
    import os

    target = tmp_path / "preds.csv"
    target.write_text("")
    target.chmod(0o444)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(target) else real_access(p, mode))
    assert main(["predict", str(tmp_path / "missing.zip"), str(tmp_path), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "read-only (chmod u+w" in err and str(target) in err and len(err.strip().splitlines()) == 1
