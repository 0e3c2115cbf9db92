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
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Shard", "parse_shard", "shard_from_env", "parse_devices"]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard count must be at least 1, got {self.count}.")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard index {self.index} is out of range (0 to {self.count - 1}) for {self.count} shards; shards "
                f"are numbered from 0, e.g. --shard 0/{self.count} ... --shard {self.count - 1}/{self.count}."
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """Directory name of the shard store, e.g. ``1-of-4``."""
        return f"{self.index}-of-{self.count}"

    def image_range(self, n_images: int, images_per_batch: int) -> tuple[int, int]:
        """``[start, stop)`` of this shard's images: whole batches of the one-process run, spread evenly."""
        n_batches = -(-n_images // images_per_batch)
        first = self.index * n_batches // self.count
        last = (self.index + 1) * n_batches // self.count
        return min(first * images_per_batch, n_images), min(last * images_per_batch, n_images)


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | Shard | tuple[int, int] | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``"I/N"``, ``(I, N)``, ``"auto"`` (from a launcher's environment) or ``None`` -> :class:`Shard` or ``None``.

    Without an explicit shard a torchrun launch (``WORLD_SIZE`` > 1) is detected; ``"auto"`` also reads Slurm array
    variables.
    """
    if isinstance(text, Shard):
        return text
    if isinstance(text, tuple):
        return Shard(*(int(v) for v in text))
    env = os.environ if env is None else env
    if text is None:
        return shard_from_env(env, slurm=False)
    if text == "auto":
        found = shard_from_env(env, slurm=True)
        if found is None:
            raise ValueError(
                "--shard auto found no launcher in the environment (torchrun sets RANK and WORLD_SIZE, Slurm arrays "
                "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT); give the shard explicitly, e.g. --shard 0/4."
            )
        return found
    match = _SHARD.match(str(text))
    if not match:
        raise ValueError(f"--shard {text!r} is not I/N; use e.g. --shard 0/4 for the first of four shards, or auto.")
    return Shard(int(match[1]), int(match[2]))


def shard_from_env(env: Mapping[str, str], *, slurm: bool = True) -> Shard | None:
    """The shard a launcher assigned to this process, or ``None`` when not launched as one of several."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and "RANK" in env:
        return Shard(int(env["RANK"]), world)
    if slurm and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)  # --array=0-14:2 has step 2
        return Shard((int(env["SLURM_ARRAY_TASK_ID"]) - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"]))
    return None


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
        raise ValueError(f"--devices {devices!r} names no device; use e.g. --devices cuda:0,cuda:1.")
    return items
