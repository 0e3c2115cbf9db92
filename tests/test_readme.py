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


#: Lines the in-order run cannot execute on one CPU machine: GPUs, clusters, launchers and shared storage.
_NEEDS_ELSEWHERE = ("cuda:", "torchrun", "--backend dask", "sbatch")
#: Weights that would be downloaded: the same architecture with its seeded random weights (the README is not changed).
_OFFLINE = ((r"\bresnet50:IMAGENET1K_V2\b", "resnet50:none"), (r"--model resnet50\b(?!:)", "--model resnet50:none"),
            (r"--model resnet18\b(?!:)", "--model resnet18:none"), (r"\btimm:convnext_tiny\b(?!:)", "timm:convnext_tiny:none"))  # fmt: skip


def readme_steps() -> list[tuple[str, str]]:
    """Every block of the README after its two set-up commands, in order: ("python", code) or ("shell", line)."""
    steps = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S):
        if "python3 -m venv" in body:
            continue
        if lang == "python":
            steps.append(("python", body))
            continue
        for line in body.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#") and not any(m in command for m in _NEEDS_ELSEWHERE):
                for pattern, offline in _OFFLINE:
                    command = re.sub(pattern, offline, command)
                command = command.replace("/shared/", "shared/")  # shared storage: a local folder here
                if "$SLURM_ARRAY_TASK_ID" in command:  # what the array job runs: every task, one after the other
                    count = re.search(r"\$SLURM_ARRAY_TASK_ID/(\d+)", command).group(1)
                    command = f"for SLURM_ARRAY_TASK_ID in $(seq 0 {int(count) - 1}); do {command}; done"
                steps.append(("shell", command))
    return steps


def test_the_in_order_run_covers_every_command_kind():
    kinds = {line.split()[1] for kind, line in readme_steps() if kind == "shell" and line.startswith("cnncodes ")}
    commands = ("layers", "extract", "sweep", "compare", "depth", "finetune", "predict", "export", "merge", "check")
    assert kinds >= set(commands)
    assert not any("resnet50 " in line for kind, line in readme_steps() if kind == "shell")


@pytest.mark.slow
@pytest.mark.readme
def test_every_readme_block_runs_in_order_in_a_fresh_folder(tmp_path, monkeypatch):
    """The README as a new user runs it: every shell line and Python block in order, in one fresh folder holding the
    photos/ and new_photos/ it names. Minutes long (two depth sweeps): run it with ``python -m pytest -m readme``."""
    import os
    import subprocess
    import sys

    write_image_folder(tmp_path / "photos", n=72, size=40)  # 24 a class: the few-shot example asks for 16 shots
    write_image_folder(tmp_path / "new_photos", n=4, size=40, seed=1)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for i, (kind, step) in enumerate(readme_steps()):
        if kind == "python":
            try:
                exec(compile(step, f"README.md block {i + 1}", "exec"), {"__name__": "__readme__"})
            except Exception as exc:  # noqa: BLE001 - name the block that failed
                pytest.fail(f"README python block (step {i + 1}) failed: {type(exc).__name__}: {exc}\n{step}")
            continue
        done = subprocess.run(["bash", "-c", step], capture_output=True, text=True, env=env, timeout=1800)
        assert done.returncode == 0, f"README step {i + 1} failed: {step}\n{done.stderr[-3000:]}"
    assert (tmp_path / "joined" / "best.json").is_file() and (tmp_path / "preds.csv").is_file()
