"""Hostile command lines (``helpers.hostile.ARG_CASES``): each exits 2 with one line naming the argument, before any
work (no store, sweep or prediction file appears)."""

from __future__ import annotations

import pytest

from cnncodes.cli import main
from helpers import make_code_store, tiny_bundle, write_image_folder
from helpers.hostile import ARG_CASES, fill_args


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    bundle, _ = tiny_bundle(root / "bundle")
    a_file = root / "file.txt"
    a_file.write_text("x")
    images = write_image_folder(root / "images", n=6)
    listing = root / "list.csv"
    listing.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted(images.rglob("*.png"))))
    return {"store": make_code_store(root / "store", n_images=30).path, "bundle": bundle, "images": images,
            "file": a_file, "csv": listing}  # fmt: skip


@pytest.mark.parametrize("case", list(ARG_CASES))
def test_a_hostile_command_line_fails_in_one_line_before_any_work(where, tmp_path, case, capsys):
    args, words = ARG_CASES[case]
    argv = fill_args(args, tmp=tmp_path, **where)
    assert main([*argv, "--quiet"] if argv[0] != "export" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnncodes {argv[0]}: error: ") and err.count("\n") == 1, err
    assert fill_args([words], tmp=tmp_path, **where)[0] in err
    assert list(tmp_path.iterdir()) == [], "nothing may be written before the arguments are checked"
    assert not (where["store"] / "w").exists()
