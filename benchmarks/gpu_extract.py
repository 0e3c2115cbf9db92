"""GPU extraction throughput against a bare forward, and where decoding becomes the bottleneck, in one run.

    python benchmarks/gpu_extract.py                   # resnet50:none at 224 px, batch 256, 2048 images, cuda
    python benchmarks/gpu_extract.py --device cpu --model resnet18:none --size 64 --n 64 --batch-size 16   # smoke run

Prints images/s, each on the same model, batch and numerics (bf16 autocast, channels_last on CUDA):
  * bare         -- model(x) on uint8 batches already on the device, normalized there (the bound);
  * memory       -- cnncodes.extract of all stage taps x avg from a uint8 array in memory (resize/crop in workers);
  * jpeg/W       -- cnncodes.extract from a folder of JPEGs, decoding with W worker processes;
  * decode/W     -- decoding + resize alone with W workers (no network): where it falls below `bare`, decoding is
                    the bottleneck;
  * gpu-decode   -- torchvision.io.decode_jpeg on the device, batched, plus resize: what GPU decoding would give;
  * solvers      -- the sweep's logistic-regression path solve on the device against the CPU.
and the ratios memory/bare (target >= 0.9 on a GPU) and jpeg/bare. Weights are random (``:none``): throughput does not
depend on them.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnncodes import extract, load_backbone
from cnncodes.images import PixelNormalizer, open_source, pixel_transform
from cnncodes.network import autocast_dtype, resolve_device


def make_images(n: int, size: int) -> np.ndarray:
    """Smooth random pictures at 1.15x the input size, so resizing and JPEG coding cost what photos cost."""
    rng = np.random.default_rng(0)
    side = int(size * 1.15)
    small = rng.integers(0, 256, (n, side // 8, side // 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((side, side), Image.BILINEAR)) for s in small])


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare(backbone, n: int, batch: int, dev: torch.device) -> float:
    model = copy.deepcopy(backbone.model).to(dev, memory_format=torch.channels_last)
    size = backbone.preprocessing.input_size
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
    to_input = PixelNormalizer(backbone.preprocessing, dev)
    dtype = autocast_dtype(dev, amp=True)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype) if dtype else nullcontext():
        model(to_input(x).contiguous(memory_format=torch.channels_last))  # warm-up
        sync(dev)
        start = time.perf_counter()
        for _ in range(max(1, n // batch)):
            model(to_input(x).contiguous(memory_format=torch.channels_last))
        sync(dev)
    return max(1, n // batch) * batch / (time.perf_counter() - start)


def through_cnncodes(backbone, source, n: int, batch: int, device: str, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract(source, out=f"{tmp}/s", model=backbone, taps="stages", poolings="avg", batch_size=batch,
                device=device, workers=workers, progress=False)  # fmt: skip
        return n / (time.perf_counter() - start)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], pre) -> None:
        self.paths, self.transform = paths, pixel_transform(pre)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def decode_only(paths: list[str], pre, batch: int, workers: int) -> float:
    loader = DataLoader(_Decode(paths, pre), batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - start)


def gpu_decode(paths: list[str], size: int, batch: int, dev: torch.device) -> float | None:
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    if dev.type != "cuda":
        return None
    data = [read_file(p) for p in paths]
    decode_jpeg(data[:batch], device=dev)  # warm-up
    sync(dev)
    start = time.perf_counter()
    for lo in range(0, len(data), batch):
        images = decode_jpeg(data[lo : lo + batch], device=dev)
        [F.center_crop(F.resize(im, [size]), [size]) for im in images]
    sync(dev)
    return len(data) / (time.perf_counter() - start)


def solvers(dev: torch.device) -> tuple[float, float]:
    from cnncodes.probing import fit_paths

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(4000, 2048)).astype(np.float32), rng.integers(0, 10, 4000)
    times = []
    for device in ("cpu", dev):
        start = time.perf_counter()
        fit_paths([X], [y], 10, np.logspace(-3, 2, 8), "multinomial", device=device)
        sync(torch.device(device))
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50:none")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dev = resolve_device(args.device)
    backbone = load_backbone(args.model, input_size=args.size)
    print(f"{args.model} at {args.size} px, batch {args.batch_size}, {args.n} images on {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "") + f"; {os.cpu_count()} CPU cores")  # fmt: skip

    pictures = make_images(args.n, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, p in enumerate(pictures):
            paths.append(f"{tmp}/{i:05d}.jpg")
            Image.fromarray(p).save(paths[-1], quality=90)
        through_cnncodes(
            backbone, pictures[: args.batch_size], args.batch_size, args.batch_size, str(dev), 0
        )  # warm-up
        rates = {"bare": bare(backbone, args.n, args.batch_size, dev)}
        rates["memory"] = through_cnncodes(backbone, pictures, args.n, args.batch_size, str(dev), None)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        counts = sorted({w for w in (1, 2, 4, 8, 16) if w <= cores} | {cores})
        for w in counts:
            rates[f"decode/{w}"] = decode_only(paths, backbone.preprocessing, args.batch_size, w)
        rates["jpeg/auto"] = through_cnncodes(backbone, open_source(tmp), args.n, args.batch_size, str(dev), None)
        rates["gpu-decode"] = gpu_decode(paths, args.size, args.batch_size, dev)
    for name, rate in rates.items():
        print(f"  {name:<12} {'-' if rate is None else f'{rate:9.1f} img/s'}")
    print(f"  memory/bare  {rates['memory'] / rates['bare']:.2f}   (target >= 0.90 on a GPU)")
    print(f"  jpeg/bare    {rates['jpeg/auto'] / rates['bare']:.2f}")
    enough = [w for w in counts if rates[f"decode/{w}"] >= rates["bare"]]
    print("  decoding keeps up with the forward from " + (f"{enough[0]} workers" if enough else
          f"no worker count here: decoding is the bottleneck (best {max(rates[f'decode/{w}'] for w in counts):.0f} img/s)"))  # fmt: skip
    cpu_s, dev_s = solvers(dev)
    print(f"  solvers      cpu {cpu_s:.2f} s, {dev.type} {dev_s:.2f} s ({cpu_s / dev_s:.1f}x)")


if __name__ == "__main__":
    main()
