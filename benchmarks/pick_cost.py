"""``--pick cheapest`` against ``--pick best``: what the cheaper pick saves in forward FLOPs and in folder prediction time.

    python benchmarks/pick_cost.py [--work DIR] [--repeat 5] [--images N] [--tasks digits,patches] [--quick]

Tasks (nothing downloaded): sklearn's digits as ``demo:digits`` gives them (1,797 images upscaled to 32x32 RGB, 10
classes) and a texture-patch task cut from scikit-image's sample pictures (64x64 crops, class = the picture the crop
came from, as in benchmarks/relu_modes.py). For each task:

1. the embedded efficientnet_lite0 at 96 px extracts the stage and expanded taps x avg, avg2, avg4 into a store under
   ``--work`` (reused when it is already there; default a temporary directory);
2. one sweep with ``SweepConfig(pick="cheapest")`` (probes logreg, linsvc) saves the cheapest equal row's bundle, and a
   second sweep of the same store with ``pick="best"`` saves the best row's (the sweep is seeded, so both see the
   same rows; the script checks that their best rows agree). Sweep time is not what is measured;
3. the test images of the split (all of them, or the first ``--images``) are written as PNG files into a folder and
   both bundles predict that folder ``--repeat`` times each, interleaved (the order alternates between repeats):

   * in process: ``load_bundle(path).predict(folder)``, the bundle and backbone load included (imports paid before);
   * fresh process: ``cnncodes predict BUNDLE FOLDER --out X.csv --quiet``, interpreter start-up included.

Medians are reported with the 1-minute load average before and after the timed runs (other processes on the cores
slow everything: compare runs on a quiet machine). Printed per task: both rows (tap, pooling, probe, FLOPs, CV and
test accuracy with intervals, p-values against the best), the sweep's summary lines, the FLOPs ratio, the measured time
ratios best/cheapest, images per second, the accuracy of each bundle's CSV predictions on the folder, and whether each
check holds: cheapest FLOPs <= best FLOPs / 3; the cheapest not significantly worse on CV (p_cv and p_cv_images >=
0.05); its test accuracy within 0.5 points of the best's; the cheapest bundle predicts the folder faster (both ways).
``--quick``: one repeat on a few images (a smoke run).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from relu_modes import patches  # the texture-patch task, from the script beside this one

warnings.filterwarnings("ignore")

MODEL = "efficientnet_lite0"
TAPS = "stages,expanded"
POOLINGS = "avg,avg2,avg4"


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The images of ``demo:digits``: sklearn's digits 0..16 -> 0..255, upscaled to 32x32 (what extract sees)."""
    from cnncodes import open_source

    source = open_source("demo:digits")
    return np.stack([np.asarray(source.load(i)) for i in range(len(source.ids))]), source.labels


def store_of(task: str, images: np.ndarray, labels: np.ndarray, root: Path, size: int):
    """The task's store under ``root``, extracted once and reused (a half-written one resumes)."""
    from cnncodes import CodeStore, extract

    path = root / f"{task}-{MODEL}-{size}"
    try:
        return CodeStore(path), 0.0
    except Exception:  # absent or incomplete: extract (resumes an interrupted run)
        start = time.perf_counter()
        source = "demo:digits" if task == "digits" else images
        store = extract(source, labels=None if task == "digits" else labels, out=path, model=MODEL, input_size=size,
                        taps=TAPS, poolings=POOLINGS, progress=False)  # fmt: skip
        return store, time.perf_counter() - start


def write_folder(images: np.ndarray, labels: np.ndarray, ids: list[str], sources: list[str], folder: Path,
                 limit: int | None) -> dict[str, int]:  # fmt: skip
    """The test images (``sources``: ids of the split's test rows) as PNG files; file name -> label index."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    index = {s: i for i, s in enumerate(ids)}
    truth = {}
    for n, source in enumerate(sources[:limit] if limit else sources):
        i = index[source]
        name = f"{n:05d}.png"
        Image.fromarray(images[i]).convert("RGB").save(folder / name)
        truth[name] = int(labels[i])
    return truth


def csv_accuracy(path: Path, truth: dict[str, int], classes: list[str]) -> float:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    hits = [classes.index(r["predicted"]) == truth[Path(r["path"]).name] for r in rows if not r["error"]]
    return float(np.mean(hits)) if len(hits) == len(truth) else float("nan")


def describe(row, best) -> str:
    def ci(v: list[float] | None) -> str:
        return f"[{100 * v[0]:.2f}, {100 * v[1]:.2f}]" if v else ""

    def p(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    flops = f"{row.flops / 1e6:.1f} MFLOPs" if row.flops else "FLOPs ?"
    same = row.key == best.key
    tests = "(the best itself)" if same else (f"p_cv {p(row.p_cv)}  p_cv_images {p(row.p_cv_images)}  "
                                              f"p_test {p(row.p_test)}")  # fmt: skip
    return (f"{row.tap}/{row.pooling}/{row.probe}  dims {row.dims}  {flops}  CV {100 * row.cv_accuracy:.2f} "
            f"{ci(row.cv_ci)}  test {100 * row.test_accuracy:.2f} {ci(row.test_accuracy_ci)}  {tests}")  # fmt: skip


def run_task(task: str, args: argparse.Namespace, root: Path) -> dict:
    import cnncodes
    from cnncodes import SweepConfig, load_bundle, save_probe

    try:
        from cnncodes.sweeps import summary_lines
    except ImportError:  # not re-exported by the package: the report module has it
        from cnncodes.sweeps._report import summary_lines

    images, labels = digits() if task == "digits" else patches()
    store, extract_s = store_of(task, images, labels, root, args.input_size)
    start = time.perf_counter()
    cheap_result = cnncodes.sweep(store, SweepConfig(pick="cheapest"), jobs=-1, progress=False)
    best, cheap = cheap_result.best, cheap_result.cheapest
    if cheap is None:
        raise SystemExit(f"{task}: the sweep has no cheapest row (no FLOPs counted)")
    same = cheap.key == best.key
    if same:  # the cheapest equal row is the best itself: its refit probe is the best's, one sweep is enough
        best_result, agree = cheap_result, "n/a (one sweep: the cheapest equal row is the best)"
    else:
        best_result = cnncodes.sweep(store, SweepConfig(pick="best"), jobs=-1, progress=False)
        agree = str(best_result.best.key == best.key and best_result.chosen.key == best.key)
    sweep_s = time.perf_counter() - start
    bundles = {"best": save_probe(best_result, root / f"{task}-best"),
               "cheapest": save_probe(cheap_result, root / f"{task}-cheapest")}  # fmt: skip
    # the chosen row's test predictions name the test split's images (the same split for both sweeps)
    folder = root / f"{task}-test-png"
    truth = write_folder(images, labels, list(store.sources), list(cheap_result.test_predictions["sources"]),
                         folder, args.images)  # fmt: skip
    classes = list(cheap_result.classes)
    n = len(truth)

    times: dict[str, list[float]] = {f"{k}_{w}": [] for k in bundles for w in ("inproc", "cli")}
    csv_acc: dict[str, float] = {}
    load_before = os.getloadavg()
    for r in range(args.repeat):
        order = ("best", "cheapest") if r % 2 == 0 else ("cheapest", "best")
        for kind in order:
            start = time.perf_counter()
            load_bundle(bundles[kind]).predict(str(folder))
            times[f"{kind}_inproc"].append(time.perf_counter() - start)
        for kind in order:
            out = root / f"{task}-{kind}-preds.csv"
            cmd = [sys.executable, "-m", "cnncodes", "predict", str(bundles[kind]), str(folder), "--out", str(out),
                   "--quiet"]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[f"{kind}_cli"].append(time.perf_counter() - start)
            csv_acc[kind] = csv_accuracy(out, truth, classes)
    load_after = os.getloadavg()
    t = {k: statistics.median(v) for k, v in times.items()}

    made = f"extracted in {extract_s:.0f} s" if extract_s else "store reused"
    print(f"\n== {task}: store {store.rows} rows x {len(store.arrays)} arrays ({MODEL} at {args.input_size} px, "
          f"{TAPS} x {POOLINGS}); {made}; sweeps "
          f"{sweep_s:.0f} s (not measured); best rows of the two sweeps agree: {agree}")  # fmt: skip
    print(f"  best     : {describe(best, best)}")
    print(f"  cheapest : {describe(cheap, best)}")
    print("  sweep summary (pick=cheapest):")
    for line in summary_lines(cheap_result):
        print(f"    {line}")
    ratio = best.flops / cheap.flops
    lat = (f"; latency batch 1 {best.latency_ms_batch1:.2f} -> {cheap.latency_ms_batch1:.2f} ms/image, batch 64 "
           f"{best.latency_ms_batch64:.2f} -> {cheap.latency_ms_batch64:.2f} ms/image (sweep's measurement)"
           if best.latency_ms_batch1 and cheap.latency_ms_batch1 else "")  # fmt: skip
    print(f"  FLOPs: best {best.flops / 1e6:.1f} M, cheapest {cheap.flops / 1e6:.1f} M -> ratio {ratio:.2f}x{lat}")
    print(f"  folder: {n} test PNGs; median of {args.repeat} interleaved runs each; 1/5/15-min load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}")  # fmt: skip
    for where, label in (("inproc", "in process (load_bundle + predict)"), ("cli", "fresh process (cnncodes predict)")):
        b, c = t[f"best_{where}"], t[f"cheapest_{where}"]
        runs = {k: " ".join(f"{x:.2f}" for x in times[f"{k}_{where}"]) for k in bundles}
        print(f"  {label:36s} best {b:6.2f} s ({n / b:6.1f} img/s)  cheapest {c:6.2f} s ({n / c:6.1f} img/s)  "
              f"best/cheapest {b / c:.2f}x   runs best [{runs['best']}] cheapest [{runs['cheapest']}]")  # fmt: skip
    print(f"  accuracy of the CSV predictions on the folder: best {100 * csv_acc['best']:.2f}, cheapest "
          f"{100 * csv_acc['cheapest']:.2f} (sweep's test accuracy on {n} of {cheap_result.data.get('n_test_images')} "
          "test images, when all are written)")  # fmt: skip
    checks = {
        "cheapest FLOPs <= best FLOPs / 3": cheap.flops <= best.flops / 3,
        "cheapest not significantly worse on CV (p_cv, p_cv_images >= 0.05)": cheap.key == best.key
        or ((cheap.p_cv or 0) >= 0.05 and (cheap.p_cv_images or 0) >= 0.05),
        "cheapest test accuracy within 0.5 points of the best's": abs(cheap.test_accuracy - best.test_accuracy)
        <= 0.005 + 1e-12,
        "cheapest predicts the folder faster in process": t["cheapest_inproc"] < t["best_inproc"],
        "cheapest predicts the folder faster as a fresh process": t["cheapest_cli"] < t["best_cli"],
    }
    diff = 100 * (cheap.test_accuracy - best.test_accuracy)
    for name, ok in checks.items():
        extra = f" (difference {diff:+.2f} points)" if "test accuracy" in name else ""
        if same and "faster" in name:  # one bundle timed twice: the difference is noise
            extra += " -- n/a: both bundles hold the same row, the difference is run-to-run noise"
        print(f"  [{'holds' if ok else 'FAILS'}] {name}{extra}")
    return {"task": task, "times": t, "checks": checks, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="directory for the stores, bundles and PNG folders (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--images", type=int, help="write only the first N test images (default: all of them)")
    parser.add_argument("--tasks", default="digits,patches")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 16 images")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.images = 1, args.images or 16
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give at least 1 run per contender")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"digits", "patches"}:
        parser.error(f"--tasks {args.tasks}: choose from digits, patches")
    print(f"cpu cores: {os.cpu_count()}; python {sys.version.split()[0]}; 1/5/15-min load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            run_task(task, args, root)
    print(f"\n1/5/15-min load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
