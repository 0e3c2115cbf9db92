"""Every Python block of the README runs, in order, in a folder holding the `photos/` and `new_photos/` it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import write_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks_and_they_use_the_front_door():
    assert len(BLOCKS) >= 4
    for block in BLOCKS:
        for line in block.splitlines():
            assert not re.match(r"\s*from cnncodes\.", line), f"README imports a private room: {line.strip()}"


@pytest.mark.slow
def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "photos", n=30, size=40)
    write_image_folder(tmp_path / "new_photos", n=4, size=40, seed=1)
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
        except Exception as exc:  # noqa: BLE001 - name the block that failed
            pytest.fail(f"README python block {i + 1} failed: {type(exc).__name__}: {exc}\n{block}")
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    assert (tmp_path / "sweep" / "best_probe.zip").is_file()
