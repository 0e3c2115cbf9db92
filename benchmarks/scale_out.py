"""The figures behind docs/scaling.md, measured side by side in one run on this machine.

    python benchmarks/scale_out.py [--n 384] [--store-mib 512]

Prints:
  * decode    -- JPEG (500x375, ImageNet-like) decode + resize 256 + centre crop 224 to uint8, images/s on ONE core:
                 the per-core ceiling of the input side (cnncodes' own decode path: decode_image + pixel_transform);
  * forward   -- efficientnet_lite0 stage taps at 224 px, images/s for the whole machine (extract from an array);
  * write     -- store writes (positioned writes + fsync per batch) in MiB/s, and merge_shards in MiB/s;
  * split     -- the same extraction in one process and with devices=cpu,cpu (two processes + merge): the ratio shows
                 what splitting costs or gains when both processes share the same cores;
  * probe     -- one sweep task (logreg, 3 folds) on a synthetic 10-class array, in memory and streamed out of core
                 (--max-memory), in training rows per second.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnncodes import extract, load_backbone
from cnncodes.images import decode_image, pixel_transform
from cnncodes.store import ArraySpec, StoreWriter, merge_shards


def jpeg_files(folder: Path, n: int) -> list[Path]:
    """``n`` JPEGs at 500x375, quality 90, made from scikit-image's sample photographs."""
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    paths = []
    for i in range(n):
        image = Image.fromarray(photos[i % len(photos)]).resize((500, 375), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def decode_rate(paths: list[Path], pre) -> float:
    torch.set_num_threads(1)
    transform = pixel_transform(pre)
    start = time.perf_counter()
    for p in paths:
        transform(decode_image(p))
    rate = len(paths) / (time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    return rate


def write_and_merge(folder: Path, mib: int) -> tuple[float, float]:
    """MiB/s of a store written in 256-row batches by two shard writers, then of merging them."""
    dims, rows_per_batch = 1280, 256
    rows = mib * 2**20 // (dims * 2)
    block = np.random.default_rng(0).standard_normal((rows_per_batch, dims)).astype(np.float16)
    spec = ArraySpec("tap", "avg", dims, "float16", True, False)
    half = rows // 2
    start = time.perf_counter()
    for index, (lo, hi) in enumerate([(0, half), (half, rows)]):
        config = {"bench": 1, "n_images": rows, "shard": {"index": index, "count": 2, "images": [lo, hi]}}
        with StoreWriter(folder / "shards" / f"{index}-of-2", arrays=[spec], sources=[str(i) for i in range(lo, hi)],
                         labels=np.zeros(hi - lo), classes=[], views=0, config=config, info={}) as writer:  # fmt: skip
            for r in range(0, hi - lo, rows_per_batch):
                n = min(rows_per_batch, hi - lo - r)
                writer.write(r, {spec.file: block[:n]})
                writer.commit(r + n)
            writer.finalize()
    write = mib / (time.perf_counter() - start)
    start = time.perf_counter()
    merge_shards(folder)
    return write, mib / (time.perf_counter() - start)


def probe_rates(folder: Path, rows: int, dims: int) -> tuple[float, float, float, float]:
    """Training rows/s and test accuracy of one sweep task in memory and streamed out of core."""
    from cnncodes.probing import SweepConfig
    from cnncodes.sweeps import sweep

    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 10
    centers = rng.standard_normal((10, dims)) * 0.15
    spec = ArraySpec("tap", "avg", dims, "float16", True, False)
    with StoreWriter(folder, arrays=[spec], sources=[str(i) for i in range(rows)], labels=labels,
                     classes=[str(k) for k in range(10)], views=0, config={"bench": 2}, info={}) as writer:  # fmt: skip
        for lo in range(0, rows, 8192):
            hi = min(rows, lo + 8192)
            writer.write(
                lo, {spec.file: (centers[labels[lo:hi]] + rng.standard_normal((hi - lo, dims))).astype(np.float16)}
            )
        writer.commit(rows)
        writer.finalize()
    out = []
    for max_memory in (None, 32 * 2**20):
        start = time.perf_counter()
        result = sweep(folder, SweepConfig(probes=("logreg",), folds=3, max_memory=max_memory), jobs=1, progress=False)
        out += [result.data["n_train_images"] / (time.perf_counter() - start), result.best.test_accuracy]
    return tuple(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=384, help="images for the decode and forward measurements")
    parser.add_argument("--store-mib", type=int, default=512, help="size of the store written and merged")
    parser.add_argument("--probe-rows", type=int, default=60000, help="rows of the synthetic probe array")
    parser.add_argument("--probe-dims", type=int, default=512)
    args = parser.parse_args()

    backbone = load_backbone("efficientnet_lite0")
    pre = backbone.preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        paths = jpeg_files(tmp / "jpeg", args.n)
        decode = decode_rate(paths, pre)
        pixels = np.stack([np.asarray(decode_image(p).resize((pre.input_size, pre.input_size))) for p in paths])

        settings = dict(model=backbone, taps="stages", poolings="avg,avg2", batch_size=32, progress=False, workers=0)
        extract(pixels[:32], out=tmp / "warm", **settings)
        start = time.perf_counter()
        extract(pixels, out=tmp / "one", **settings)
        one = time.perf_counter() - start
        start = time.perf_counter()
        extract(pixels, out=tmp / "split", devices="cpu,cpu", **settings)
        split = time.perf_counter() - start
        same = all((tmp / "one" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "split").glob("*.npy"))

        write, merge = write_and_merge(tmp / "store", args.store_mib)
        in_memory, acc_memory, streamed, acc_streamed = probe_rates(tmp / "probe", args.probe_rows, args.probe_dims)

    cores = os.cpu_count()
    print(f"machine: {cores} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"  decode   {decode:8.1f} img/s on one core (JPEG 500x375 -> uint8 224x224)")
    print(f"  forward  {args.n / one:8.1f} img/s, efficientnet_lite0 stage taps x avg,avg2 at 224 px, {cores} cores")
    print(f"  write    {write:8.1f} MiB/s (positioned writes, fsync per 256-row batch)")
    print(f"  merge    {merge:8.1f} MiB/s ({args.store_mib} MiB from two shard stores)")
    print(f"  split    one process {one:.1f} s, devices=cpu,cpu {split:.1f} s: ratio {one / split:.2f}x, "
          f"bitwise equal: {same}")  # fmt: skip
    print(f"  ratio    decode cores needed per forward-bound machine like this one: {args.n / one / decode:.2f}")
    print(f"  probe    {args.probe_rows} x {args.probe_dims}: in memory {in_memory:,.0f} train rows/s (test {acc_memory:.3f}), "
          f"streamed {streamed:,.0f} rows/s (test {acc_streamed:.3f}): ratio {in_memory / streamed:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
