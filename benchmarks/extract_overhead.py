"""Throughput of cnncodes extraction against a bare forward pass, measured side by side in one run.

    python benchmarks/extract_overhead.py [--model efficientnet_lite0] [--n 512] [--batch-size 32] [--device cpu]
    python benchmarks/extract_overhead.py --folder [--model resnet18:none] [--n 1797] [--image-size 64] [--repeat 2]

In-memory mode (the default) prints images/s for:
  * bare      -- model(x) under inference_mode, channels_last, on batches preprocessed beforehand;
  * cnncodes  -- extract(..., taps="stages", poolings="avg") into a fresh store (decoding, preprocessing, pooling, writes);
  * early     -- the same extraction with only the first stage tap (the forward stops there);
and the ratios cnncodes/bare (target >= 0.95 on CPU) and early/cnncodes (the early-exit speed-up).

Folder mode (--folder) first writes scikit-learn's digits as image files (upscaled to --image-size, RGB, ImageFolder
layout) to a temporary folder, untimed, then times, each --repeat times in alternating order so that every contender
sees the same machine load:
  * forward   -- in this process: the model at channels_last under inference_mode, batch after batch, on float
                 batches decoded and normalized beforehand. Nothing but the forward passes: no start-up, no decoding;
  * bare      -- the same forward passes as a fresh process, start-up included: import torch and torchvision, build
                 the model, channels_last, inference_mode, on the preprocessed float batches saved to a file beforehand
                 (read back memory-mapped). The baseline of the target: what the network alone costs as a program;
  * script    -- what a competent user writes by hand, as a fresh process: import torch and torchvision, build the
                 model, torchvision ImageFolder + DataLoader (Resize, CenterCrop, ToTensor, Normalize; --script-workers
                 decoding processes), channels_last, inference_mode, forward only (no taps, no pooling, nothing saved);
  * cnncodes  -- `cnncodes extract FOLDER --taps stages --poolings avg` as a fresh process: interpreter start,
                 imports, model load, tap discovery, decoding, preprocessing, forward, pooling and the fsync'ed store.
  * earlier   -- with --earlier DIR: the same command run from another checkout of cnncodes (a git worktree of an
                 earlier commit, put first on PYTHONPATH), for a before/after comparison under the same load.
Wall times of the fresh processes run from exec to exit. Each run also prints how many cores other processes kept busy
meanwhile (from /proc/stat, less this benchmark's own CPU time): on a shared machine that says which runs to trust.
Prints the ratios cnncodes/bare (target >= 0.9), cnncodes/script and cnncodes/forward (and earlier/bare with --earlier)
from the median of the quiet runs (other processes below 0.1 cores, when every contender has one), from the fastest
run, and from the median of all runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnncodes import extract, list_taps, load_backbone
from cnncodes.images import decode_image, open_source, plain_transform
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


def in_memory(args: argparse.Namespace) -> None:
    dev = resolve_device(args.device)
    backbone = load_backbone(args.model)
    pre = backbone.preprocessing
    n = args.n or 512
    data = images(n, pre.resize_size)
    tf = plain_transform(pre)
    x = torch.stack([tf(Image.fromarray(im)) for im in data])
    first_stage = list_taps(backbone).stage_taps[0].name

    rates = {
        "bare": bare(backbone, x, args.batch_size, dev),
        "cnncodes": through_cnncodes(backbone, data, "stages", args.batch_size, str(dev), args.workers),
        "early": through_cnncodes(backbone, data, first_stage, args.batch_size, str(dev), args.workers),
    }
    print(f"model={args.model} n={n} batch={args.batch_size} device={dev} threads={torch.get_num_threads()}")
    for name, rate in rates.items():
        print(f"  {name:<9} {rate:8.1f} img/s")
    print(f"ratio cnncodes/bare        = {rates['cnncodes'] / rates['bare']:.3f}  (target >= 0.95)")
    print(f"early exit ({first_stage}) speed-up over all stages = {rates['early'] / rates['cnncodes']:.2f}x")


# --------------------------------------------------------------------------------------------------------------------
# folder mode

#: The forward passes alone as a program: the model on batches preprocessed beforehand (formatted with the settings).
BARE_SCRIPT = """
import torch, torchvision

model = {build}
model = model.eval().to(memory_format=torch.channels_last)
batches = torch.load({batches!r}, mmap=True)
with torch.inference_mode():
    for x in batches:
        model(x)
"""

#: The hand-written extraction a competent user would run instead of cnncodes (formatted with the model and settings).
USER_SCRIPT = """
import torch, torchvision
from torchvision import datasets, transforms

model = {build}
model = model.eval().to(memory_format=torch.channels_last)
tf = transforms.Compose([
    transforms.Resize({resize}, interpolation=transforms.InterpolationMode.{interp}),
    transforms.CenterCrop({crop}),
    transforms.ToTensor(),
    transforms.Normalize({mean}, {std}),
])
loader = torch.utils.data.DataLoader(datasets.ImageFolder({folder!r}, tf), batch_size={batch}, num_workers={workers})
with torch.inference_mode():
    for x, _ in loader:
        model(x.contiguous(memory_format=torch.channels_last))
"""


def write_digits(folder: Path, n: int, size: int, fmt: str) -> None:
    """scikit-learn's digits as RGB image files of ``size`` px in class sub-folders (what a user's folder looks like)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images[:n] * (255.0 / 16.0)).astype(np.uint8)
    for i, (im, label) in enumerate(zip(pixels, digits.target[:n])):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        image.save(folder / str(label) / f"{i:04d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))


def preprocessed_batches(folder: Path, pre, batch: int) -> list[torch.Tensor]:
    """The folder decoded and normalized the way cnncodes does it, as channels_last float batches (untimed)."""
    source = open_source(str(folder))
    tf = plain_transform(pre)
    x = torch.stack([tf(decode_image(path)) for path in source.ids])
    return [x[lo : lo + batch].contiguous(memory_format=torch.channels_last) for lo in range(0, len(x), batch)]


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds for the forward passes alone (one warm-up batch first, untimed)."""
    with torch.inference_mode():
        model(batches[0])
        start = time.perf_counter()
        for x in batches:
            model(x)
        return time.perf_counter() - start


#: A run during which other processes kept fewer cores than this busy counts as quiet.
QUIET = 0.1


def machine_busy() -> float:
    """CPU seconds every process on this machine has spent busy so far (Linux ``/proc/stat``; NaN elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in stat.readline().split()[1:8])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_busy() -> float:
    """CPU seconds this process and its finished children have used."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def with_load(run) -> tuple[float, float]:
    """``(seconds, cores)``: what ``run()`` returns, and how many cores other processes kept busy meanwhile."""
    machine, own, start = machine_busy(), own_busy(), time.perf_counter()
    seconds = run()
    wall = time.perf_counter() - start
    return seconds, max(0.0, (machine_busy() - machine) - (own_busy() - own)) / wall


def timed_process(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())  # no cwd imports
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def scripts(args: argparse.Namespace, folder: Path, batches: Path, pre) -> tuple[str, str]:
    """The bare forward and the hand-written extraction, as Python sources for fresh processes."""
    name, _, weights = args.model.partition(":")
    if weights != "none" or name not in __import__("torchvision").models.list_models():
        raise SystemExit(f"--folder builds its baselines with torchvision; give a torchvision model without weights "
                         f"(e.g. resnet18:none), not {args.model!r}.")  # fmt: skip
    build = f"torchvision.models.get_model({name!r}, weights=None)"
    bare_script = BARE_SCRIPT.format(build=build, batches=str(batches))
    user = USER_SCRIPT.format(build=build, resize=pre.resize_size, crop=pre.input_size, interp=pre.interpolation.upper(),
                              mean=tuple(pre.mean), std=tuple(pre.std), folder=str(folder), batch=args.batch_size,
                              workers=args.script_workers)  # fmt: skip
    return bare_script, user


def from_folder(args: argparse.Namespace) -> None:
    n = args.n or 1797
    cli = str(Path(sys.executable).with_name("cnncodes"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_digits(folder, n, args.image_size, args.image_format)
        backbone = load_backbone(args.model)
        batches = preprocessed_batches(folder, backbone.preprocessing, args.batch_size)
        torch.save(batches, Path(tmp) / "batches.pt")
        model = copy.deepcopy(backbone.model).eval().to(memory_format=torch.channels_last)
        bare_script, user = scripts(args, folder, Path(tmp) / "batches.pt", backbone.preprocessing)
        out = Path(tmp) / "codes"
        cnncodes_cmd = [cli, "extract", str(folder), "--out", str(out), "--model", args.model, "--taps", "stages",
                        "--poolings", "avg", "--batch-size", str(args.batch_size), "--device", "cpu", "--quiet"]  # fmt: skip
        contenders = {
            "forward": lambda: bare_forward(model, batches),
            "bare": lambda: timed_process([sys.executable, "-c", bare_script]),
            "script": lambda: timed_process([sys.executable, "-c", user]),
            "cnncodes": lambda: timed_process(cnncodes_cmd),
        }
        if args.earlier:
            path = os.pathsep.join(p for p in (str(args.earlier), os.environ.get("PYTHONPATH")) if p)
            contenders["earlier"] = lambda: timed_process(cnncodes_cmd, env={**os.environ, "PYTHONPATH": path})
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}  # (seconds, other processes' cores)
        order = list(contenders)
        for r in range(args.repeat):
            for name in order if r % 2 == 0 else order[::-1]:  # alternate, so a load change hits every contender
                shutil.rmtree(out, ignore_errors=True)
                runs[name].append(with_load(contenders[name]))
                took, others = runs[name][-1]
                print(f"  run {r + 1} {name:<9} {took:7.2f} s   other processes: {others:.2f} cores", flush=True)
    print(f"model={args.model} n={n} {args.image_format} {args.image_size}px batch={args.batch_size} device=cpu "
          f"threads={torch.get_num_threads()} script workers={args.script_workers} repeat={args.repeat}")  # fmt: skip
    # Other processes on the cores only add time: the quiet runs (others below QUIET cores) are the ones to trust, the
    # fastest run is the least disturbed one, and the median of all shows how much the load moved.
    quiet = {k: [s for s, others in v if others < QUIET] for k, v in runs.items()}
    summaries = [("quiet runs (median)", quiet)] if all(quiet.values()) else []
    summaries += [("best run", {k: [min(s for s, _ in v)] for k, v in runs.items()})]
    summaries += [("all runs (median)", {k: [s for s, _ in v] for k, v in runs.items()})]
    for label, picked in summaries:
        rate = {k: n / statistics.median(v) for k, v in picked.items()}
        print(f"{label}:")
        for name in contenders:
            listed = ", ".join(f"{s:.1f}" for s in picked[name])
            print(f"  {name:<9} {rate[name]:7.1f} img/s  {n / rate[name]:6.2f} s  ({listed})")
        print(f"  ratio cnncodes/bare    = {rate['cnncodes'] / rate['bare']:.3f}  (target >= 0.9, fresh processes)")
        print(f"  ratio cnncodes/script  = {rate['cnncodes'] / rate['script']:.3f}")
        print(f"  ratio cnncodes/forward = {rate['cnncodes'] / rate['forward']:.3f}  (start-up, decoding vs none)")
        if args.earlier:
            print(f"  ratio earlier/bare     = {rate['earlier'] / rate['bare']:.3f}  (cnncodes from {args.earlier})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: efficientnet_lite0, with --folder resnet18:none")
    parser.add_argument("--n", type=int, default=None, help="images (default: 512, with --folder all 1797 digits)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32, with --folder 64")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--folder", action="store_true", help="time extraction from a folder of image files")
    parser.add_argument("--image-size", type=int, default=64, help="--folder: side of the image files")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png", help="--folder: file format")
    parser.add_argument("--repeat", type=int, default=2, help="--folder: runs of each contender")
    parser.add_argument("--script-workers", type=int, default=0, help="--folder: the user script's DataLoader workers")
    parser.add_argument("--earlier", type=Path, default=None, help="--folder: also time the CLI from this checkout")
    args = parser.parse_args()
    args.model = args.model or ("resnet18:none" if args.folder else "efficientnet_lite0")
    args.batch_size = args.batch_size or (64 if args.folder else 32)
    from_folder(args) if args.folder else in_memory(args)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
