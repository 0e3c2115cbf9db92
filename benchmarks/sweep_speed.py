"""A logistic-regression sweep of every array of a store: cnncodes against two scikit-learn baselines, side by side.

    python benchmarks/sweep_speed.py [--store DIR] [--jobs 2] [--repeat 3] [--profile FILE]

All contenders search C over the training images of the same held-out split (``cnncodes.sweeps.make_split``) with the
same 5 stratified folds, pick the array with the best CV accuracy and report its test accuracy:

* GridSearchCV: per (tap, pooling), ``GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
  C = logspace(-3, 2, 8), cv=folds, n_jobs=jobs)``;
* LogisticRegressionCV: per (tap, pooling), ``make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=logspace(-3, 2,
  8), cv=folds, max_iter=1000, n_jobs=jobs))`` (warm-started along C, its default; the scaler sees all training rows,
  as LogisticRegressionCV cannot scale per fold);
* cnncodes: ``sweep(store, SweepConfig(probes=("logreg",)), jobs=jobs)`` (per-fold scaling, coarse-to-fine C in [1e-4, 1e4]).

Two comparisons, each like for like:

* in process: the three searches timed inside this process, imports and loading paid beforehand;
* as fresh processes, what users run: the GridSearchCV search as a script of its own (it imports NumPy and
  scikit-learn, loads the arrays from an ``.npz``, searches every array and prints the best) against
  ``cnncodes sweep STORE --probes logreg --out DIR``, which also writes the results files, two plots and the bundle.

Each contender runs ``--repeat`` times, in turn; medians are reported, with the load average over the run (other
processes on the cores slow the process-based GridSearchCV far more than threads: compare runs on a quiet machine).
Without --store it extracts the demo store (digits, efficientnet_lite0 at 96 px, stage taps x avg, avg2) first; that
time is not counted. ``--profile FILE`` also writes a cProfile of an in-process cnncodes sweep (jobs=1, one torch
thread) and prints its top lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

GRID = np.logspace(-3, 2, 8)


def search_arrays(arrays: dict[str, np.ndarray], y: np.ndarray, train: np.ndarray, test: np.ndarray,
                  folds: list[tuple[np.ndarray, np.ndarray]], kind: str, jobs: int) -> dict:  # fmt: skip
    """The best array by CV accuracy under one scikit-learn search (``folds``: positions in the training rows)."""
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.simplefilter("ignore", FutureWarning)  # LogisticRegressionCV announcing 1.10 defaults
    results = []
    for name, X in arrays.items():
        X = np.asarray(X, dtype=np.float32)
        if kind == "grid":
            search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                                  {"logisticregression__C": GRID}, cv=folds, n_jobs=jobs).fit(X[train], y[train])  # fmt: skip
            cv, C = search.best_score_, search.best_params_["logisticregression__C"]
        else:
            search = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=GRID, cv=folds, max_iter=1000,
                                                                          n_jobs=jobs)).fit(X[train], y[train])  # fmt: skip
            clf = search[-1]
            cv, C = np.mean(next(iter(clf.scores_.values())), axis=0).max(), float(clf.C_[0])
        results.append({"array": name, "cv": float(cv), "C": float(C), "test": float(search.score(X[test], y[test]))})
    return max(results, key=lambda r: r["cv"])


def _user_script(data: str, jobs: int) -> None:
    """The fresh-process baseline: what a user would run on arrays saved with their folds."""
    loaded = np.load(data)
    arrays = {k[2:]: loaded[k] for k in loaded.files if k.startswith("X:")}
    folds = [(loaded[f"fit{i}"], loaded[f"val{i}"]) for i in range(int(loaded["n_folds"]))]
    best = search_arrays(arrays, loaded["y"], loaded["train"], loaded["test"], folds, "grid", jobs)
    print(json.dumps(best))


def _median(times: list[float]) -> float:
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE", help="also write a cProfile of an in-process cnncodes sweep")
    parser.add_argument("--user-script", metavar="NPZ", help=argparse.SUPPRESS)  # the fresh-process baseline
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give at least 1 run per contender")
    if args.user_script:
        _user_script(args.user_script, args.jobs)
        return

    from cnncodes import CodeStore, extract
    from cnncodes.probing import SweepConfig
    from cnncodes.sweeps import make_split, sweep

    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or os.path.join(tmp, "digits")
        if not args.store:
            extract("demo:digits", out=path, input_size=96, taps="stages", poolings="avg,avg2", progress=False)
        store = CodeStore(path)
        split = make_split(store, config=SweepConfig(seed=0))
        # the store has no views (one row per image): folds as positions in the training rows
        folds = [(np.searchsorted(split.train_rows, f), np.searchsorted(split.train_rows, v)) for f, v in split.folds]
        arrays = {f"{tap}/{pooling}": np.asarray(codes, dtype=np.float32) for (tap, pooling), codes in store.items()}
        y = np.asarray(store.labels)
        data = os.path.join(tmp, "arrays.npz")
        np.savez(data, y=y, train=split.train_rows, test=split.test_rows, n_folds=len(folds),
                 **{f"X:{k}": v for k, v in arrays.items()}, **{f"fit{i}": f for i, (f, _) in enumerate(folds)},
                 **{f"val{i}": v for i, (_, v) in enumerate(folds)})  # fmt: skip
        user = [sys.executable, os.path.abspath(__file__), "--user-script", data, "--jobs", str(args.jobs)]
        cli = [sys.executable, "-m", "cnncodes", "sweep", path, "--out", os.path.join(tmp, "cli"), "--probes", "logreg",
               "--jobs", str(args.jobs), "--quiet"]  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in ("grid", "lrcv", "ours", "grid_fresh", "cli")}
        best: dict[str, dict] = {}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeat):
            for kind in ("grid", "lrcv"):
                start = time.perf_counter()
                best[kind] = search_arrays(arrays, y, split.train_rows, split.test_rows, folds, kind, args.jobs)
                times[kind].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours = sweep(store, SweepConfig(probes=("logreg",)), jobs=args.jobs, progress=False)
            times["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            done = subprocess.run(user, check=True, capture_output=True, text=True)
            times["grid_fresh"].append(time.perf_counter() - start)
            best["grid_fresh"] = json.loads(done.stdout)
            start = time.perf_counter()
            subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
            times["cli"].append(time.perf_counter() - start)
            load.append(os.getloadavg()[0])
        if args.profile:
            import cProfile
            import pstats

            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # one core, as each task of a parallel sweep has
            try:
                cProfile.runctx("sweep(store, SweepConfig(probes=('logreg',)), jobs=1, progress=False)", {"sweep": sweep, "SweepConfig": SweepConfig},
                                {"store": store}, args.profile)  # fmt: skip
            finally:
                torch.set_num_threads(threads)
    t = {k: _median(v) for k, v in times.items()}
    print(f"store: {store.rows} rows x {len(store.arrays)} arrays; cpu cores: {os.cpu_count()}; jobs: {args.jobs}; "
          f"median of {args.repeat} runs; 1-min load average {min(load):.2f} to {max(load):.2f} during the runs")  # fmt: skip
    rows = [("GridSearchCV", "grid", best["grid"]), ("LogisticRegressionCV", "lrcv", best["lrcv"]),
            ("cnncodes sweep", "ours", {"array": f"{ours.best.tap}/{ours.best.pooling}", "C": ours.best.C,
                                        "test": ours.best.test_accuracy}),
            ("GridSearchCV script", "grid_fresh", best["grid_fresh"]), ("cnncodes sweep (CLI)", "cli", None)]  # fmt: skip
    for name, kind, b in rows:
        runs = " ".join(f"{x:.2f}" for x in times[kind])
        where = "in process" if kind in ("grid", "lrcv", "ours") else "fresh process"
        what = f"  best {b['array']}  C {b['C']:.3g}  test accuracy {b['test']:.4f}" if b else "  (same sweep)"
        print(f"{name:22s} {t[kind]:7.2f} s  {where:13s} runs {runs}{what}")
    for kind, name, target in (("grid", "GridSearchCV", 10), ("lrcv", "LogisticRegressionCV", 3)):
        print(f"speed ratio {name}/cnncodes in process = {t[kind] / t['ours']:5.2f}x (target >= {target}); test "
              f"accuracy difference {100 * (ours.best.test_accuracy - best[kind]['test']):+.2f} points (target within "
              "0.5)")  # fmt: skip
    print(f"speed ratio GridSearchCV script/cnncodes sweep, fresh processes = {t['grid_fresh'] / t['cli']:5.2f}x "
          f"(start-up included on both sides; cnncodes also writes its report, plots and bundle)")  # fmt: skip
    if args.profile:
        print(
            f"\nprofile of an in-process sweep (jobs=1, one torch thread), top lines by internal time ({args.profile}):"
        )
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
