"""Throughput of cnncodes extraction against a bare forward pass, measured side by side in one run.

    python benchmarks/extract_overhead.py [--model efficientnet_lite0] [--n 256] [--batch-size 32] [--device cpu]

Prints images/s for:
  * bare      -- model(x) under inference_mode, channels_last, on batches preprocessed beforehand;
  * cnncodes  -- extract(..., taps="stages", poolings="avg") into a fresh store (decoding, preprocessing, pooling, writes);
  * early     -- the same extraction with only the first stage tap (the forward stops there);
and the ratios cnncodes/bare (target >= 0.95 on CPU) and early/cnncodes (the early-exit speed-up).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from cnncodes import extract, list_taps, load_backbone
from cnncodes.images import plain_transform
from cnncodes.network import autocast_dtype, resolve_device


def images(n: int, size: int) -> np.ndarray:
    """Smooth random images at the model's resize size, so decoding costs what a real JPEG-free source costs."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small])


def bare(backbone, x: torch.Tensor, batch: int, dev: torch.device) -> float:
    """The baseline at the numerics cnncodes runs at: channels_last and, on CUDA, the same bf16/fp16 autocast."""
    model = copy.deepcopy(backbone.model).to(dev, memory_format=torch.channels_last)  # the backbone stays on the CPU
    dtype = autocast_dtype(dev, amp=True)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext():
        model(x[:batch].to(dev, memory_format=torch.channels_last))  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for lo in range(0, len(x), batch):
            model(x[lo : lo + batch].to(dev, memory_format=torch.channels_last))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - start)


def through_cnncodes(backbone, data: np.ndarray, layers: str, batch: int, device: str, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        extract(
            data[:batch],
            out=f"{tmp}/warm",
            model=backbone,
            taps=layers,
            batch_size=batch,
            device=device,
            progress=False,
            workers=0,
        )
        start = time.perf_counter()
        extract(
            data,
            out=f"{tmp}/run",
            model=backbone,
            taps=layers,
            poolings="avg",
            batch_size=batch,
            device=device,
            workers=workers,
            progress=False,
        )
        return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    dev = resolve_device(args.device)
    backbone = load_backbone(args.model)
    pre = backbone.preprocessing
    data = images(args.n, pre.resize_size)
    tf = plain_transform(pre)
    x = torch.stack([tf(Image.fromarray(im)) for im in data])
    first_stage = list_taps(backbone).stage_taps[0].name

    rates = {
        "bare": bare(backbone, x, args.batch_size, dev),
        "cnncodes": through_cnncodes(backbone, data, "stages", args.batch_size, str(dev), args.workers),
        "early": through_cnncodes(backbone, data, first_stage, args.batch_size, str(dev), args.workers),
    }
    print(f"model={args.model} n={args.n} batch={args.batch_size} device={dev} threads={torch.get_num_threads()}")
    for name, rate in rates.items():
        print(f"  {name:<9} {rate:8.1f} img/s")
    print(f"ratio cnncodes/bare        = {rates['cnncodes'] / rates['bare']:.3f}  (target >= 0.95)")
    print(f"early exit ({first_stage}) speed-up over all stages = {rates['early'] / rates['cnncodes']:.2f}x")


if __name__ == "__main__":
    main()
