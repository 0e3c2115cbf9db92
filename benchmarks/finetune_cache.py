"""Training the top on cached activations against training it live, side by side in one run, with the bound each cut
allows.

    python benchmarks/finetune_cache.py [--model efficientnet_lite0] [--size 96] [--n 256] [--views 2] [--epochs 2]
                                        [--recipes top,block,norms]

On a folder of PNG files (sklearn's digits, upscaled), for an early, a middle and the last stage cut, each recipe of
``--recipes`` (what is trained above the cut: every layer, the first block, the norms and biases), and a ``head`` at
the last cut, it trains the same model for the same epochs two ways:
  * live  -- every epoch decodes the files, renders the seeded augmented view, runs the frozen layers (eval mode);
  * cache -- one extraction of the cut's activations (float16, ``views`` views), then every epoch reads them.
and prints seconds per epoch, the per-epoch speed-up, the overall speed-up including the one-off extraction, and
the bound: (decode+augment + frozen forward + top forward/backward) / (cache read + top forward/backward), from
the measured parts, with the FLOP split of frozen and top layers. Targets: every cut reaches >= 80 % of its bound;
the head at the last cut is >= 20x faster per epoch than live.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import cnncodes
from cnncodes.images import open_source
from cnncodes.network import CodeExtractor, cut_points, list_taps, load_backbone
from cnncodes.training import CachedActivations, FinetuneConfig, LiveActivations, build_model, train


def write_digits(root: Path, n: int, size: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(n):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i:05d}.png")
    return root


def timed_epochs(make_model, feed, labels, fit, config, epochs: int) -> float:
    """Seconds per epoch of the real training loop, after a one-batch warm-up (no validation images to speak of)."""
    warm = FinetuneConfig(**{**config.to_dict(), "epochs": 1})
    train(make_model(), feed, labels, fit=fit[: 2 * config.batch_size], val=fit[:2], test=None, views=feed.views,
          config=warm)  # fmt: skip
    start = time.perf_counter()
    train(make_model(), feed, labels, fit=fit, val=fit[:2], test=None, views=feed.views, config=config)
    return (time.perf_counter() - start) / epochs


def parts(backbone, extractor, cut, source, fit, model, config, cache_feed, shape) -> dict[str, float]:
    """Seconds per epoch of each part: decode+augment, frozen forward, top forward/backward, cache read (the best of
    two passes, so one-off warm-up costs are not counted)."""
    first = _parts(backbone, extractor, cut, source, fit, model, config, cache_feed, shape)
    second = _parts(backbone, extractor, cut, source, fit, model, config, cache_feed, shape)
    return {k: min(first[k], second[k]) for k in first}


def _parts(backbone, extractor, cut, source, fit, model, config, cache_feed, shape) -> dict[str, float]:
    live = LiveActivations(source, extractor, backbone.preprocessing, 0, ("crop", "flip"), torch.device("cpu"))
    start = time.perf_counter()
    pixels = [
        torch.stack([live_view(live, int(i)) for i in fit[lo : lo + config.batch_size]])
        for lo in range(0, len(fit), config.batch_size)
    ]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    acts = []
    with torch.no_grad():  # not inference_mode: the top trains on these below
        for batch in pixels:
            x = live.to_input(batch).contiguous(memory_format=torch.channels_last)
            acts.append(live.net(x)[cut]["none"].reshape(len(batch), *shape))
    frozen = time.perf_counter() - start
    model = model.to(memory_format=torch.channels_last)  # as the training loop runs it
    optimizer = torch.optim.AdamW(model.param_groups(config))  # only what the recipe trains
    labels = torch.zeros(config.batch_size, dtype=torch.long)
    model.train()
    start = time.perf_counter()
    for a in acts:
        a = a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a
        loss = torch.nn.functional.cross_entropy(model(a), labels[: len(a)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    top = time.perf_counter() - start
    start = time.perf_counter()
    for lo in range(0, len(fit), config.batch_size):
        cache_feed.rows(fit[lo : lo + config.batch_size], 1)
    read = time.perf_counter() - start
    return {"decode": decode, "frozen": frozen, "top": top, "read": read}


def live_view(live: LiveActivations, i: int) -> torch.Tensor:
    from cnncodes.images import render_view

    return render_view(live.source.load(i), i, 1, live.seed, live.plain, live.augmented)


def flop_split(backbone, extractor, cut, model, shape, size) -> tuple[float, float]:
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as below, torch.no_grad():
        act = extractor(x)[cut]["none"].reshape(1, *shape)
    with FlopCounterMode(display=False) as above, torch.no_grad():
        model.eval()(act)
    return below.get_total_flops(), above.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recipes", default="top,block,norms", help="recipes timed at each cut (head: at the last)")
    args = parser.parse_args()
    backbone = load_backbone(args.model, input_size=args.size)
    catalogue = list_taps(backbone)
    stages = [t for t in catalogue.select("stages") if t.name in set(cut_points(backbone, catalogue))]
    cuts = [("early", stages[0]), ("middle", stages[len(stages) // 2]), ("last", stages[-1])]
    picks = [(f"{label} {recipe}", tap, recipe) for label, tap in cuts for recipe in args.recipes.split(",")]
    picks.append(("last head", stages[-1], "head"))
    print(f"{args.model} at {args.size} px, {args.n} PNG files, {args.views} views, {args.epochs} epochs, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; 1-minute load "
          f"{os.getloadavg()[0]:.2f} before")  # fmt: skip
    header = f"{'cut':<32} {'frozen GF':>9} {'top GF':>7} {'live s/ep':>9} {'cache s/ep':>10} {'speed-up':>8} {'bound':>7} {'of bound':>8} {'overall':>8}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(write_digits(Path(tmp) / "imgs", args.n, args.size))
        labels = np.asarray(source.labels)
        fit = np.arange(len(source))
        extraction: dict[str, float] = {}
        for label, tap, recipe in picks:
            config = FinetuneConfig(train=recipe, epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs)
            if tap.name not in extraction:  # the head reuses the last cut's cache: one extraction serves both
                start = time.perf_counter()
                cnncodes.extract(source, out=f"{tmp}/{tap.name}", model=backbone, taps=[tap.name], poolings="none",
                                 relu="never", views=args.views, seed=0, progress=False)  # fmt: skip
                extraction[tap.name] = time.perf_counter() - start
            store = cnncodes.CodeStore(f"{tmp}/{tap.name}")
            shape = tap.shape
            cache_feed = CachedActivations(store.codes(tap.name, "none"), args.views, shape)
            extractor = CodeExtractor(backbone, [tap.name], "none", relu="never", catalogue=catalogue)
            live_feed = LiveActivations(source, extractor, backbone.preprocessing, 0, ("crop", "flip"),
                                        torch.device("cpu"))  # fmt: skip
            live_feed.views = cache_feed.views = args.views

            def make_model(tap=tap, config=config):
                return build_model(backbone, tap.name, len(source.classes), config, catalogue)

            below, above = flop_split(backbone, extractor, tap.name, make_model(), shape, args.size)
            p = parts(backbone, extractor, tap.name, source, fit, make_model(), config, cache_feed, shape)
            bound = (p["decode"] + p["frozen"] + p["top"]) / (p["read"] + p["top"])
            live = timed_epochs(make_model, live_feed, labels, fit, config, args.epochs)
            cache = timed_epochs(make_model, cache_feed, labels, fit, config, args.epochs)
            speedup = live / cache
            overall = live * args.epochs / (extraction[tap.name] + cache * args.epochs)
            name = f"{label}: {tap.name}"
            print(f"{name:<32} {below / 1e9:>9.3f} {above / 1e9:>7.3f} {live:>9.2f} {cache:>10.3f} {speedup:>7.1f}x "
                  f"{bound:>6.1f}x {speedup / bound:>7.0%} {overall:>7.2f}x")  # fmt: skip
            print(f"{'':<32} parts per epoch: decode+augment {p['decode']:.2f} s, frozen {p['frozen']:.2f} s, "
                  f"top fwd/bwd {p['top']:.3f} s, cache read {p['read']:.3f} s; extraction once "
                  f"{extraction[tap.name]:.1f} s; load {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
