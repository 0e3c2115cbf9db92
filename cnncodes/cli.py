"""The ``cnncodes`` command line. Thin by design: each command parses arguments and makes one library call."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .errors import CnncodesError

if TYPE_CHECKING:
    from .probing import SweepConfig

__all__ = ["main", "build_parser"]

#: Commands whose work survives an interruption (stores resume); the others start again.
_RESUMING = ("extract", "merge", "demo", "depth")


def _add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", help="model spec: efficientnet_lite0, resnet50[:WEIGHTS], timm:NAME")
    else:
        p.add_argument("--model", default="efficientnet_lite0", help="model spec (default: %(default)s)")
    p.add_argument("--weights", metavar="PATH", help="local .pth/.safetensors state_dict instead of downloading")
    p.add_argument("--input-size", type=int, metavar="N", help="input side in pixels (default: the model's)")


def _cmd_layers(args: argparse.Namespace) -> int:
    from .network import Layout, list_taps, load_backbone

    backbone = load_backbone(args.model, weights=args.weights, input_size=args.input_size)
    catalogue = list_taps(backbone)
    records = catalogue.to_records(args.poolings.split(","), args.dtype)
    if args.json:
        print(json.dumps({"model": backbone.describe(), "mode": catalogue.mode, "input_size": catalogue.input_size,
                          "stage_source": catalogue.stage_source, "taps": records}, indent=1))  # fmt: skip
        return 0
    pools = args.poolings.split(",")
    print(f"{backbone.spec} at {catalogue.input_size}px: {len(records)} taps ({catalogue.mode}); "
          f"* = stage tap (--taps stages, from {catalogue.stage_source}), e = expanded tap; "
          "relu: 'net' = rectified by the network, 'auto' = rectified at extraction by --relu auto, '-' = raw")  # fmt: skip
    header = f"{'':2} {'#':>3}  {'name':<34} {'op':<16} {'layout':<16} {'relu':<5} {'shape':<14}"
    header += "".join(f" {('dims ' + p):>10}" for p in pools) + f" {'KiB/img':>8}"
    print(header)
    for r in records:
        shape = "x".join(str(s) for s in r["shape"])
        layout = Layout.from_dict(r["layout"]).describe()
        relu = "net" if r["rectified"] else "auto" if r["thresholded"] else "-"
        mark = ("*" if r["stage_tap"] else "") + ("e" if r["expanded_tap"] else "")
        line = f"{mark:<2} {r['index']:>3}  {r['name']:<34} {r['op'][:16]:<16} {layout:<16} {relu:<5} {shape:<14}"
        line += "".join(f" {'-' if r['dims'][p] is None else r['dims'][p]:>10}" for p in pools)
        line += f" {sum(b for b in r['bytes_per_image'].values() if b) / 1024:>8.1f}"
        print(line)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extraction import extract, launched_by_torchrun
    from .store import completed_shards

    _output_dir(args.out)
    shard = args.shard or ("auto" if launched_by_torchrun() else None)  # a torchrun launch of the CLI is a shard
    store = extract(
        args.source,
        out=args.out,
        model=args.model,
        taps=args.taps,
        poolings=args.poolings,
        weights=args.weights,
        input_size=args.input_size,
        relu="never" if args.no_relu else args.relu,
        dtype=args.dtype,
        views=args.views,
        seed=args.seed,
        augment=args.augment,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=not args.no_amp,
        on_error=args.on_error,
        overwrite=args.overwrite,
        progress=not args.quiet,
        shard=shard,
        devices=args.devices,
        merge=True if args.merge else None,
        shared=args.shared,
    )
    layout = store.shard
    if not store.complete:
        from .store import shared_progress

        status = shared_progress(store.path, layout.count)
        done = sum(1 for d, rows in status if d is not None and d == rows)
        print(f"shard {args.shard or '(from the launcher)'} of the shared store {store.path} is done; {done} of {layout.count} shards are. "
              "The last one to finish publishes the store.")  # fmt: skip
        return 0
    print(f"wrote {store.rows} rows x {len(store.arrays)} arrays to {store.path} ({len(store.errors)} images skipped)")
    if layout:
        done = completed_shards(args.out, layout.count)
        print(f"shard {layout.shard} (images {layout.images[0]}-{layout.images[1] - 1}) is complete; "
              f"{done} of {layout.count} shards are. When all are, join them: cnncodes merge {args.out}")  # fmt: skip
    for err in store.errors[:20]:
        print(f"  skipped {err['path']}: {err['reason']}")
    if len(store.errors) > 20:
        print(f"  ... {len(store.errors) - 20} more in {store.path / 'manifest.json'}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .store import merge_shards

    store = merge_shards(args.out, args.shards or None, remove_shards=args.remove_shards)
    print(f"merged {store.rows} rows x {len(store.arrays)} arrays into {store.path} ({len(store.errors)} images skipped)"
          + ("; removed the shard stores" if args.remove_shards else ""))  # fmt: skip
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .store import CodeStore

    store = CodeStore(args.store)
    checked = store.verify()
    print(f"{store.path}: {len(checked) - 1} arrays and the labels ({store.rows} rows) match the digests recorded "
          "when they were written")  # fmt: skip
    return 0


def _parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 512M or 4G") from None


def _parse_c_range(text: str) -> tuple[float, float]:
    import math

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use MIN,MAX, e.g. 1e-4,1e4") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise argparse.ArgumentTypeError(f"{text!r}: need finite 0 < MIN <= MAX, e.g. 1e-4,1e4")
    return lo, hi


def _count_or_all(text: str) -> int | str | None:
    """An argparse type: ``--score-images`` as :class:`~cnncodes.SweepConfig` reads it (auto, all, or a number of
    images >= 2), checked there."""
    from .errors import ParameterError
    from .probing import SweepConfig

    try:
        return SweepConfig(score_images=int(text) if text.strip().lstrip("-").isdigit() else text).score_images
    except ParameterError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, all or a number of images >= 2 (1000)") from None


_count_or_all.__name__ = "auto, all or a number of images"


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (argparse then names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _writable_target(p: Path, flag: str, what: str) -> None:
    """Refuse ``p`` as an output path when it could not be created: the nearest existing ancestor must be a writable
    directory. Nothing is created here, so a refused command leaves no trace."""
    import os

    from .errors import ParameterError

    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ParameterError(f"{flag} {p}: {ancestor} is a file, not a directory; choose another path for the "
                             f"{what} (nothing was computed).")  # fmt: skip
    blocked = p if p.exists() and not os.access(p, os.W_OK) else None
    if blocked is None and not os.access(ancestor, os.W_OK | os.X_OK):
        blocked = ancestor
    if blocked is not None:
        raise ParameterError(f"{flag} {p} is not writable: {_why_not_writable(blocked)}; choose another path for the "
                             f"{what} (nothing was computed).")  # fmt: skip


def _why_not_writable(path: Path) -> str:
    """Why ``path`` refuses writes: a read-only filesystem, a read-only file or directory, or no permission."""
    import os
    import stat

    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{path} is on a read-only filesystem"
        mode = path.stat().st_mode
    except OSError:
        return f"{path} cannot be inspected"
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is read-only (chmod u+w {path} to allow it)"
    return f"no permission to write {path}"


def _output_dir(path: str, flag: str = "--out") -> None:
    """Refuse an output directory that cannot be one, before any work is done."""
    from .errors import ParameterError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ParameterError(f"{flag} {p} is a file; give a directory (nothing was computed).")
    _writable_target(p, flag, "directory")


def _output_file(path: str | None, flag: str = "--out") -> None:
    """Refuse an output file path that cannot be written, before any work is done."""
    from .errors import ParameterError

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ParameterError(f"{flag} {p} is a directory; give a file name inside it (nothing was computed).")
    if p.exists() and not p.is_file():
        raise ParameterError(f"{flag} {p} exists and is not a regular file (a device, FIFO or socket); give a new "
                             "file name (nothing was computed).")  # fmt: skip
    _writable_target(p, flag, "file")


def _not_an_input(out: str | None, *inputs: str, flag: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs: writing it would destroy what is being read."""
    import os

    from .errors import ParameterError

    if out is None or not Path(out).exists():
        return
    for source in inputs:
        if Path(source).exists() and os.path.samefile(out, source):
            raise ParameterError(f"{flag} {out} is the input {source}; writing it would destroy the input. Give "
                                 "another file name (nothing was computed).")  # fmt: skip


def _check_bundle_source(path: str) -> None:
    """The CLI sweep ends by saving a bundle: refuse, before the work, a store that cannot say how its codes were made."""
    from .errors import StoreError
    from .store import CodeStore

    store = CodeStore(path)
    model = store.manifest.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("spec"), str) and isinstance(model.get("fingerprint"), str)
            and isinstance(model.get("preprocessing"), dict)):  # fmt: skip
        raise StoreError(f"{store.path / 'manifest.json'} does not say which model made its codes (model: "
                         f"{str(model)[:60]}), so no probe bundle could be saved from a sweep of it. The store is "
                         "damaged: re-extract it with --overwrite.")  # fmt: skip


def _parse_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers (``1,2,4,8,16``)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated whole numbers, e.g. 1,2,4,8,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be at least 1, e.g. 1,2,4,8,16")
    return values


def _run_sweep(stores: list[str], out: str, args: argparse.Namespace) -> int:
    from .deploy import bundle_digest, save_probe
    from .errors import ParameterError
    from .sweeps import format_table, sweep, write_report

    _output_dir(out)
    tests = args.test or []
    for code_store in [*stores, *tests]:
        if Path(out).resolve().is_relative_to(Path(code_store).resolve()):
            raise ParameterError(f"--out {out} is inside the code store {code_store}; write the results elsewhere "
                                 "(nothing was computed).")  # fmt: skip
    if tests and len(tests) != len(stores):
        raise ParameterError(f"{len(stores)} stores but {len(tests)} --test stores; give one --test per store, in the "
                             "same order (nothing was computed).")  # fmt: skip
    for store in stores:
        _check_bundle_source(store)
    result = sweep(
        stores,
        sweep_config(args),
        test=tests or None,
        taps=args.taps.split(",") if args.taps else None,
        poolings=args.poolings.split(",") if args.poolings else None,
        concat=args.concat,
        latency=args.latency,
        jobs=args.jobs,
        progress=not args.quiet,
        backend=args.backend,
        scheduler=args.scheduler,
    )
    print(format_table(result))
    paths = write_report(result, out, bundle=lambda folder: save_probe(result, folder))
    print(f"wrote {', '.join(p.name for p in paths.values())} to {out}")
    print(f"{paths['probe']} digest {bundle_digest(paths['probe'])} (pin it: cnncodes predict --digest ...)")
    return 0


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The one SweepConfig the sweep flags describe."""
    from .probing import SweepConfig

    return SweepConfig(
        probes=tuple(args.probes.split(",")),
        normalizers=tuple(args.normalizers.split(",")),
        folds=args.folds,
        val_size=args.val_size,
        test_size=args.test_size,
        seed=args.seed,
        c_min=args.c_range[0],
        c_max=args.c_range[1],
        c_steps_per_decade=args.c_steps_per_decade,
        max_memory=args.max_memory,
        device=args.device,
        shots=args.shots,
        draws=args.draws,
        pick=args.pick,
        tolerance=args.tolerance,
        repeats=args.repeats,
        scores=() if args.scores.strip().lower() == "none" else tuple(t.strip() for t in args.scores.split(",")),
        score_images=args.score_images,
        triage=args.triage,
    )


def _cmd_sweep(args: argparse.Namespace) -> int:
    return _run_sweep(args.stores, args.out, args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .sweeps import compare, format_table, write_results

    _output_dir(args.out)
    _not_an_input(args.out, *args.sweeps)
    comparison = compare(args.sweeps)
    if not args.quiet:
        print(format_table(comparison))
    paths = write_results(comparison, args.out)
    bundle = Path(comparison.data["sweep_of"][comparison.best.backbone]) / "best_probe.zip"
    where = f"no bundle of the best probe in {bundle.parent}"
    if bundle.is_file():
        try:  # a sweep saved with --pick cheapest holds its cheapest row, which may not be the joint best
            saved = json.loads((bundle.parent / "best.json").read_text())
        except (OSError, ValueError):
            saved = {}
        b = comparison.best
        same = [saved.get(k) for k in ("tap", "pooling", "normalizer", "probe")] == [b.tap, b.pooling, b.normalizer,
                                                                                     b.probe]  # fmt: skip
        where = (f"the best probe's bundle is {bundle}" if same else
                 f"{bundle} holds that sweep's {saved.get('pick', 'chosen')} row, not the best: rerun it with --pick best")  # fmt: skip
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out} ({where})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .extraction import extract

    out = Path(args.out)
    print(
        f"[1/2] extracting demo:digits with efficientnet_lite0 at 96 px: stage and expanded taps x avg, avg2, avg4 -> {out / 'codes'}"
    )
    store = extract("demo:digits", out=out / "codes", input_size=96, taps="stages,expanded", poolings="avg,avg2,avg4",
                    progress=not args.quiet)  # fmt: skip
    print(f"      {store.rows} images x {len(store.arrays)} arrays")
    print(f"[2/2] sweeping {args.probes} probes over every tap and pooling -> {out / 'sweep'}")
    return _run_sweep([str(out / "codes")], str(out / "sweep"), args)


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from .deploy import load_bundle, score_names

    _output_file(args.out)
    _not_an_input(args.out, args.bundle, args.source)
    kwargs = dict(digest=args.digest, weights=args.weights, batch_size=args.batch_size, device=args.device,
                  allow_fingerprint_mismatch=args.allow_fingerprint_mismatch, amp=args.amp)  # fmt: skip
    if _is_finetuned(args.bundle):
        from .training import load_finetuned

        probe = load_finetuned(args.bundle, **kwargs)
        names = probe.score_names()
    else:
        probe = load_bundle(args.bundle, **kwargs)
        names = score_names(probe)
    rows = probe.predict_source(args.source, progress=not args.quiet)
    tmp = Path(args.out).with_name(f".{Path(args.out).name}.partial") if args.out else None
    out = open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") if tmp else sys.stdout  # noqa: SIM115 - closed below unless stdout
    try:
        writer = csv.writer(out)
        writer.writerow(["path", "predicted", *names, "error"])
        for r in rows:
            scores = [f"{v:.6g}" for v in r["scores"]] if r["scores"] is not None else [""] * len(names)
            writer.writerow([r["path"], r["predicted"], *scores, r["error"]])
        if tmp:
            out.close()
            tmp.replace(args.out)  # whole or not at all; a link at --out is replaced, never written through
    finally:
        if tmp:
            out.close()
            tmp.unlink(missing_ok=True)
    failed = sum(1 for r in rows if r["error"])
    print(f"predicted {len(rows) - failed} images" + (f", {failed} could not be read" if failed else "")
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)  # fmt: skip
    return 0


def _is_finetuned(path: str) -> bool:
    from .training import is_finetuned

    return is_finetuned(path)


def _cmd_export(args: argparse.Namespace) -> int:
    from .deploy import export_probe, load_bundle

    _output_file(args.out)
    _not_an_input(args.out, args.bundle)
    if _is_finetuned(args.bundle):
        from .training import load_finetuned

        model = load_finetuned(args.bundle, digest=args.digest, weights=args.weights, device="cpu",
                               allow_fingerprint_mismatch=args.allow_fingerprint_mismatch)  # fmt: skip
        path = model.export(args.out, args.format)
        size = model.preprocessing.input_size
        print(f"wrote {args.format} model to {path}: input float32 (N, 3, {size}, {size}) normalized with mean "
              f"{list(model.preprocessing.mean)} std {list(model.preprocessing.std)}; output logits (N, "
              f"{len(model.classes)}) for classes {model.classes[:10]}")  # fmt: skip
        return 0
    probe = load_bundle(
        args.bundle,
        digest=args.digest,
        weights=args.weights,
        allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
        device="cpu",
    )
    path = export_probe(probe, args.out, args.format)
    size = probe.preprocessing.input_size
    print(f"wrote {args.format} model to {path}: input float32 (N, 3, {size}, {size}) normalized with mean "
          f"{list(probe.preprocessing.mean)} std {list(probe.preprocessing.std)}; output scores (N, {probe.bundle.arrays['coef'].shape[0]}) "
          f"for classes {probe.classes[:10]}")  # fmt: skip
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .deploy import bundle_digest
    from .errors import ParameterError
    from .training import FinetuneConfig, finetune

    _output_dir(args.out)
    if Path(args.out).resolve().is_relative_to(Path(args.store).resolve()):
        raise ParameterError(f"--out {args.out} is inside the code store {args.store}; write the model elsewhere "
                             "(nothing was computed).")  # fmt: skip
    if args.head and args.train not in ("top", "head"):
        raise ParameterError(
            f"--head and --train {args.train} disagree; give --train head alone (nothing was computed)."
        )
    config = FinetuneConfig(train="head" if args.head else args.train, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, lr_pretrained=args.lr_pretrained, patience=args.patience, seed=args.seed)  # fmt: skip
    result = finetune(args.store, args.cut, out=args.out, weights=args.weights, config=config, val_size=args.val_size,
                      test_size=args.test_size, device=args.device, progress=not args.quiet)  # fmt: skip
    what = {"head": "a head", "top": "the layers above it", "block": "the first block above it",
            "norms": "the norms and biases above it"}[result.recipe]  # fmt: skip
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    print(f"cut {result.cut}: trained {what} for {len(result.history)} epochs in {result.seconds:.1f} s; best epoch "
          f"{result.best_epoch}: validation accuracy {result.val_accuracy:.4f}, test accuracy {test}")  # fmt: skip
    print(f"wrote {Path(args.out) / 'finetune.json'} and {result.path} (digest {bundle_digest(result.path)}; predict "
          "and export it like a probe bundle)")  # fmt: skip
    return 0


def _cmd_depth(args: argparse.Namespace) -> int:
    from .errors import ParameterError
    from .training import FinetuneConfig, depth, depth_of_stores, format_depth_table

    _output_dir(args.out)
    if args.head and args.train != "top":
        wanted = args.train if "head" in args.train.split(",") else f"{args.train},head"
        raise ParameterError(f"--head and --train {args.train} disagree; give --train {wanted} alone (nothing was "
                             "computed).")  # fmt: skip
    recipes = "head" if args.head else args.train
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    stores = [s for s in args.source if (Path(s) / "manifest.json").is_file()]
    if stores and len(stores) != len(args.source):
        raise ParameterError("give either one image source or code stores (one cut each), not both.")
    if stores:
        rows = depth_of_stores(stores, out=args.out, weights=args.weights, config=config, recipes=recipes,
                               test_size=args.test_size, device=args.device, progress=not args.quiet)  # fmt: skip
    elif len(args.source) > 1:
        raise ParameterError(f"{args.source[1]} is not a code store; give one image source, or code stores only.")
    else:
        rows = depth(args.source[0], out=args.out, model=args.model, cuts=args.cuts, weights=args.weights,
                     input_size=args.input_size, views=args.views, seed=args.seed, augment=args.augment, config=config,
                     recipes=recipes, test_size=args.test_size, device=args.device, progress=not args.quiet)  # fmt: skip
    print(format_depth_table(rows))
    best, pick = next(r for r in rows if r.best), next(r for r in rows if r.cheapest)
    print(f"best: {best.cut} / {best.recipe} (validation {best.finetune_val_accuracy:.4f}); recommended: {pick.cut} / "
          f"{pick.recipe}, the cheapest cell as good on validation ({pick.finetune_val_accuracy:.4f}, "
          f"{(pick.finetune_flops or 0) / 1e9:.3f} GFLOPs, {pick.trainable_params} trained parameters)")  # fmt: skip
    print(f"wrote depth.csv, depth.json, depth.png to {args.out}")
    return 0


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--probes",
        default="logreg,linsvc",
        help="logreg,linsvc,sgd,sgd-log; knn adds the kNN baseline (default: %(default)s)",
    )
    p.add_argument("--normalizers", default="standard", help="standard,l2,power,none (default: %(default)s)")
    p.add_argument("--folds", type=_int_at_least(2), default=5, help="stratified CV folds over training images")
    p.add_argument(
        "--val-size", type=float, default=None, help="one validation split of this fraction instead of k-fold"
    )
    p.add_argument("--test-size", type=float, default=0.25, help="held-out test fraction (ignored with --test)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--c-range", type=_parse_c_range, default=(1e-4, 1e4), metavar="MIN,MAX")
    p.add_argument(
        "--c-steps-per-decade",
        type=_int_at_least(1),
        default=2,
        metavar="N",
        help="C resolution: a binary search around the best of one C per decade, down to 1/N decade "
        "(CLIP's protocol: --c-range 1e-6,1e6 --c-steps-per-decade 8)",
    )
    p.add_argument("--jobs", type=int, default=-1, help="parallel workers (-1: all cores)")
    p.add_argument(
        "--max-memory",
        type=_parse_bytes,
        default=None,
        metavar="SIZE",
        help="memory per sweep task; arrays whose in-memory fit (their rows, a normalized copy per fold and the solver's "
        "two copies of each fold's rows: see docs/scaling.md) needs more stream out of core; kNN and multi-label rows "
        "over it are refused (e.g. 2G)",
    )
    p.add_argument("--device", default="cpu", help="device of the linear solvers (cpu, cuda)")
    p.add_argument("--backend", choices=["dask"], help="run the sweep's tasks on a Dask cluster (needs cnncodes[dask])")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --backend dask: tcp://HOST:PORT or a scheduler JSON file (default: local cluster)",
    )
    p.add_argument("--shots", type=_parse_ints, default=(), metavar="N,N,...",
                   help="few-shot rows: training images per class, e.g. 1,2,4,8,16 (never drawn from the test split)")  # fmt: skip
    p.add_argument("--draws", type=_int_at_least(1), default=5, help="subsets drawn per shot count (default: 5)")
    p.add_argument("--pick", choices=["best", "cheapest"], default="best",
                   help="the row to save: best (highest CV score) or cheapest (lowest forward FLOPs among the rows not "
                        "significantly worse than the best on the CV folds) (default: %(default)s)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=None, metavar="POINTS",
                   help="with --pick cheapest: rows within this many points of the best CV score count as equal, "
                        "instead of the paired test")  # fmt: skip
    p.add_argument("--repeats", type=_int_at_least(1), default=1, metavar="R",
                   help="redraw the test split and folds R times (seeded) and report how stable the ranking is: test "
                        "accuracy mean and std, P(best), rank correlation (default: 1, no redraws)")  # fmt: skip
    p.add_argument("--scores", default="knn,logme,hscore,ridge", metavar="NAMES",
                   help="transferability scores measured on every array, checked against its CV accuracy: knn, logme, "
                        "hscore, ridge, or none (default: %(default)s)")  # fmt: skip
    p.add_argument("--score-images", type=_count_or_all, default="auto", metavar="auto|all|N",
                   help="training images the scores read, one class-stratified sample for every array: auto, as "
                        "many as keep the widest array's scores a small share of its search (at least 10 a class); "
                        "all; or at most N (default: %(default)s)")  # fmt: skip
    p.add_argument("--triage", default=None, metavar="K|FRACTION|auto",
                   help="search C only on the top K arrays (or that fraction of them) of the score that predicts a "
                        "probe subset's CV accuracy best; auto: every array whose 95 %% prediction bound reaches the "
                        "best measured + 0.3 points (--tolerance) (default: search every array)")  # fmt: skip
    p.add_argument(
        "--no-latency",
        dest="latency",
        action="store_false",
        help="skip timing the network up to each tap (FLOPs are still counted)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(test=None, taps=None, poolings=None, concat=None)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the CLI, with where to look next."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cnncodes",
        description="CNN codes + linear probes: which layer of a frozen CNN works best for your images?",
    )
    parser.add_argument("--version", action="version", version=f"cnncodes {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("layers", help="list the taps of a model in forward order")
    _add_model_args(p, positional=True)
    p.add_argument(
        "--poolings",
        "--pool",
        default="avg,avg2",
        help="poolings to size, e.g. avg,avg2,cls,mean (default: %(default)s)",
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("extract", help="extract CNN codes from images into a code store")
    p.add_argument("source", help="ImageFolder dir, path,label CSV, unlabeled dir, or demo:digits")
    _add_model_args(p)
    p.add_argument(
        "--taps",
        "--layers",
        default="stages",
        help="tap names or stages|expanded|rectified|all|last:K (default: %(default)s)",
    )
    p.add_argument(
        "--poolings",
        "--pool",
        default="avg",
        help="poolings: avg,max,avgK,maxK,none; token taps also cls,mean (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument(
        "--relu",
        default="auto",
        choices=["auto", "always", "never"],
        help="auto: rectify only where the network thresholds (ReLU/ReLU6); always; never (default: %(default)s)",
    )
    p.add_argument("--no-relu", action="store_true", help=argparse.SUPPRESS)  # deprecated spelling of --relu never
    p.add_argument(
        "--views", type=_int_at_least(0), default=0, metavar="K", help="augmented views per image (default: 0)"
    )
    p.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S", help="seed of the augmented views")
    p.add_argument("--augment", default="crop,flip", help="view augmentations: crop,flip,color (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--workers", type=_int_at_least(0), default=None, help="decoding processes (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:INDEX")
    p.add_argument(
        "--no-amp", action="store_true", help="on CUDA, run in IEEE float32: no bfloat16/float16 autocast, no TF32"
    )
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="bad images: record and skip, or stop")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="extract only shard I of N (0-based) into OUT/shards/I-of-N; auto: from torchrun/Slurm (a torchrun launch is detected without it)",
    )
    p.add_argument("--merge", action="store_true", help="with --shard: merge all shards if this is the last to finish")
    p.add_argument(
        "--shared",
        action="store_true",
        help="with --shard: fill one store preallocated at OUT (shared storage) instead of OUT/shards/I-of-N; no merge needed",
    )
    p.add_argument("--devices", metavar="LIST", help="one process per device, e.g. cuda:0,cuda:1; merged at the end")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("merge", help="join the shard stores of a sharded extraction into one store")
    p.add_argument("out", help="the --out directory of the sharded extraction (merged store goes here)")
    p.add_argument("shards", nargs="*", help="shard stores to join (default: OUT/shards/*)")
    p.add_argument("--remove-shards", action="store_true", help="delete the shard stores after a successful merge")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("check", help="verify a code store: every array and the labels against their recorded digests")
    p.add_argument("store", metavar="STORE", help="a code store directory (from cnncodes extract or merge)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "sweep", help="probe every (tap, pooling) of one or more stores and pick the best extraction point"
    )
    p.add_argument(
        "stores", nargs="+", metavar="STORE",
        help="code store directories (from cnncodes extract); several: the same images from other backbones or sizes",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="directory for results, plot and the best probe")
    _add_sweep_args(p)
    p.add_argument("--test", action="append", help="a separate test store instead of a held-out split (one per STORE)")
    p.add_argument("--taps", help="only these taps (comma-separated)")
    p.add_argument("--poolings", help="only these poolings (comma-separated)")
    p.add_argument("--concat", metavar="SPEC[,SPEC]",
                   help="also probe taps joined side by side: last:K (each store's K deepest swept taps) or a+b")  # fmt: skip
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("compare", help="join sweeps of the same images (their --out directories) into one table")
    p.add_argument("sweeps", nargs="+", metavar="DIR", help="directories written by cnncodes sweep --out")
    p.add_argument("--out", required=True, help="directory for the joined results.csv/json, best.json and sweep.png")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("finetune", help="train the layers above a cut (or a head) on a store's cached activations")
    p.add_argument(
        "store", help="store with the cut's activations: --taps CUT --poolings none --relu never [--views K]"
    )
    p.add_argument("--cut", required=True, help="the tap to cut at (cnncodes layers MODEL lists taps)")
    p.add_argument("--out", required=True, help="directory for finetune.json")
    p.add_argument("--train", choices=("top", "block", "norms", "head"), default="top",
                   help="what to train above the cut with a new classifier: every layer (top), the first block, the "
                   "norms and biases, or a small head (default: %(default)s)")  # fmt: skip
    p.add_argument("--head", action="store_true", help="the same as --train head")
    p.add_argument("--epochs", type=_int_at_least(1), default=10)
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of new layers (default: %(default)s)")
    p.add_argument("--lr-pretrained", type=float, default=1e-3, help="of pretrained layers (default: %(default)s)")
    p.add_argument("--patience", type=_int_at_least(1), default=3, help="early-stopping patience in epochs")
    p.add_argument("--val-size", type=float, default=0.2, help="validation fraction of the training images")
    p.add_argument("--test-size", type=float, default=0.25, help="held-out test fraction (the sweep's split)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--weights", metavar="PATH", help="local weights for the store's model spec")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("depth", help="how many layers to freeze: linear probe vs fine-tuned top at every cut")
    p.add_argument(
        "source", nargs="+", help="an image source (ImageFolder, CSV, demo:digits), or stores of one cut each"
    )
    _add_model_args(p)
    p.add_argument("--cuts", default="stages", help="cuts: stages or tap names (default: %(default)s)")
    p.add_argument("--out", required=True, help="directory for the per-cut stores and depth.csv/json/png")
    p.add_argument("--views", type=_int_at_least(0), default=2, help="augmented views cached per image (default: 2)")
    p.add_argument("--augment", default="crop,flip", help="view augmentations: crop,flip,color (default: %(default)s)")
    p.add_argument("--train", default="top",
                   help="what to train above each cut, comma-separated: top (every layer), block (the first block), "
                   "norms (norms and biases), head (a small head); several give a cuts x recipes matrix "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--head", action="store_true", help="the same as --train head")
    p.add_argument("--epochs", type=_int_at_least(1), default=8, help="at most, per cell (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_depth)

    p = sub.add_parser("predict", help="predict images with a probe bundle or a fine-tuned model")
    p.add_argument("bundle", help="probe bundle (best_probe.zip from sweep) or fine-tuned model (finetuned.zip)")
    p.add_argument("source", help="ImageFolder dir, CSV, unlabeled folder or demo:digits")
    p.add_argument("--out", help="CSV file to write (default: standard output)")
    p.add_argument("--weights", metavar="PATH", help="local weights for the bundle's model spec")
    p.add_argument(
        "--allow-fingerprint-mismatch", action="store_true", help="predict with other backbone weights anyway"
    )
    p.add_argument(
        "--digest", metavar="SHA256", help="refuse the bundle unless its file has this digest (sweep prints it)"
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA, bfloat16/float16 (--amp) or IEEE float32 (--no-amp); default: as the bundle's codes were made")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export", help="export a probe bundle or fine-tuned model as one torch.export, TorchScript or ONNX model"
    )
    p.add_argument("bundle")
    p.add_argument(
        "--format",
        default="pt2",
        choices=["pt2", "torchscript", "onnx"],
        help="pt2: torch.export program (torch.export.load); torchscript; onnx (needs cnncodes[onnx]) (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--weights", metavar="PATH", help="local weights for the bundle's model spec")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true")
    p.add_argument(
        "--digest", metavar="SHA256", help="refuse the bundle unless its file has this digest (sweep prints it)"
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="extract sklearn digits with the embedded model and sweep every layer")
    p.add_argument("--out", default="cnncodes-demo", help="output directory (default: %(default)s)")
    _add_sweep_args(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnncodes`` script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors end here; a caller of main() gets the status
        return exc.code if isinstance(exc.code, int) else 0
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        resumes = args.command in _RESUMING
        print("\ncnncodes: interrupted. " + ("Work done so far is saved; rerun the same command to resume." if resumes
              else "Nothing was written; rerun the command to start again."), file=sys.stderr)  # fmt: skip
        return 130
    except (CnncodesError, OSError) as exc:  # the user can fix these; anything else is our bug and keeps its traceback
        text = _one_line(exc)
        if args.command not in _RESUMING:
            text = text.replace(" and rerun the same command to resume", " and rerun the same command")
        print(f"cnncodes {args.command}: error: {text}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The ``cnncodes`` script: :func:`main`, then exit with its status.

    Before exiting, every live object is moved out of the cyclic garbage collector's reach (:func:`gc.freeze`), so the
    interpreter does not walk torch's and scikit-learn's module graphs once more on the way out: that walk took 0.5 to
    0.9 s of a 5 s sweep. Exit handlers still run (not after Ctrl-C: see below), and every file the command wrote is
    already closed. Only for the script: a caller in Python uses :func:`main`.
    """
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed as its own bytes, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    status = main()
    if status == 130:  # interrupted: worker threads may still be inside torch kernels, which abort the interpreter's
        for stream in (sys.stdout, sys.stderr):  # shutdown ("terminate called", status 134); every file is closed
            stream.flush()
        os._exit(130)
    gc.freeze()
    sys.exit(status)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, CnncodesError) and exc.strerror:
        where = " -> ".join(f"'{f}'" for f in (exc.filename, exc.filename2) if f is not None)
        return f"{exc.strerror}{': ' + where if where else ''} ({type(exc).__name__})" + _os_hint(exc)
    return " ".join(str(exc).split())


def _os_hint(exc: OSError) -> str:
    import errno

    hints = {
        errno.ENOSPC: "; free disk space (or point --out elsewhere) and rerun the same command to resume",
        errno.EDQUOT: "; free quota (or point --out elsewhere) and rerun the same command to resume",
        errno.EFBIG: "; a file size limit was hit (ulimit -f); raise it and rerun the same command to resume",
        errno.ENOTDIR: "; a path component is a file, not a directory: choose another path",
        errno.EISDIR: "; that path is a directory: give a file name",
        errno.EEXIST: "; choose another path",
        errno.EACCES: "; no permission: choose another path or fix its permissions",
        errno.EPERM: "; the operation is not permitted (an immutable or read-only file?): choose another path",
        errno.EROFS: "; the filesystem is read-only: choose another path",
        errno.ELOOP: "; a symbolic link loops: fix or remove it",
    }
    if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename and Path(exc.filename).exists():
        return f"; {_why_not_writable(Path(exc.filename))}: choose another path or fix its permissions"
    return hints.get(exc.errno, "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
