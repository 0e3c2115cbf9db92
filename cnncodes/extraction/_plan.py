"""How extraction work is split across processes, GPUs and machines. Planning only: no IO, no model.

A shard is ``I/N`` (0-based ``I``): a contiguous slice of the images whose bounds fall on whole batches of the
single-process run, so every shard feeds the network exactly the batches a one-process run would, and merged shards
are bitwise identical to it. The shard can come from ``--shard``, from ``--devices`` (one shard per device), or from
the environment of a launcher: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or a Slurm array
(``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``, when ``--shard auto`` is given).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from ..errors import ParameterError
from ..store import Shard

__all__ = ["parse_shard", "shard_from_env", "launched_by_torchrun", "launcher_device", "parse_devices"]


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | Shard | tuple[int, int] | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``"I/N"``, ``(I, N)``, ``"auto"`` (from a launcher's environment) or ``None`` -> :class:`Shard` or ``None``.

    Only ``"auto"`` reads the environment (torchrun's ``RANK``/``WORLD_SIZE``, else Slurm array variables), so a
    library call inside a user's own torchrun job is never turned into a shard behind their back.
    """
    if isinstance(text, Shard):
        return text
    if isinstance(text, tuple):
        return Shard(*(int(v) for v in text))
    env = os.environ if env is None else env
    if text is None:
        return None
    if text == "auto":
        found = shard_from_env(env, slurm=True)
        if found is None:
            raise ParameterError(
                "--shard auto found no launcher in the environment (torchrun sets RANK and WORLD_SIZE, Slurm arrays "
                "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT); give the shard explicitly, e.g. --shard 0/4."
            )
        return found
    match = _SHARD.match(str(text))
    if not match:
        raise ParameterError(
            f"--shard {text!r} is not I/N; use e.g. --shard 0/4 for the first of four shards, or auto."
        )
    return Shard(int(match[1]), int(match[2]))


def shard_from_env(env: Mapping[str, str], *, slurm: bool = True) -> Shard | None:
    """The shard a launcher assigned to this process, or ``None`` when not launched as one of several."""

    def number(name: str, default: str) -> int:
        text = env.get(name, default) or default
        try:
            return int(text)
        except ValueError:
            raise ParameterError(f"the launcher variable {name}={text!r} is not an integer; fix or unset it.") from None

    world = number("WORLD_SIZE", "1")
    if world > 1 and "RANK" in env:
        return Shard(number("RANK", "0"), world)
    if slurm and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = number("SLURM_ARRAY_TASK_MIN", "0")
        step = number("SLURM_ARRAY_TASK_STEP", "1")  # --array=0-14:2 has step 2
        return Shard((number("SLURM_ARRAY_TASK_ID", "0") - first) // step, number("SLURM_ARRAY_TASK_COUNT", "1"))
    return None


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one rank of a multi-process torchrun launch (what the CLI takes as ``--shard auto``)."""
    return shard_from_env(os.environ if env is None else env, slurm=False) is not None


def launcher_device(env: Mapping[str, str] | None = None) -> str | None:
    """``cuda:LOCAL_RANK`` under torchrun when CUDA is there; ``None`` otherwise."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch

    return f"cuda:{int(env['LOCAL_RANK'])}" if torch.cuda.is_available() else None


def parse_devices(devices: str | Sequence[str] | None) -> list[str]:
    """``"cuda:0,cuda:1"`` or a list -> device strings (``[]`` for none). Repeats are allowed (two processes on one GPU
    or on the CPU)."""
    if devices is None:
        return []
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    items = [d.strip() for d in items if d.strip()]
    if not items:
        raise ParameterError(f"--devices {devices!r} names no device; use e.g. --devices cuda:0,cuda:1.")
    return items
