"""A logistic-regression sweep of every array of a store: cnncodes against two scikit-learn baselines, side by side.

    python benchmarks/sweep_speed.py [--store DIR] [--jobs 2] [--profile FILE]

All three search C over the training images of the same held-out split (``cnncodes.sweeps.make_split``) with the same
5 stratified folds, pick the array with the best CV accuracy and report its test accuracy:

* GridSearchCV: per (tap, pooling), ``GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
  C = logspace(-3, 2, 8), cv=folds, n_jobs=jobs)``;
* LogisticRegressionCV: per (tap, pooling), ``make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=logspace(-3, 2,
  8), cv=folds, max_iter=1000, n_jobs=jobs))`` (warm-started along C, its default; the scaler sees all training rows,
  as LogisticRegressionCV cannot scale per fold);
* cnncodes: ``sweep(store, probes=("logreg",), jobs=jobs)`` (per-fold scaling, coarse-to-fine C in [1e-4, 1e4]),
  in process and as ``cnncodes sweep STORE --probes logreg`` in a fresh process (start-up, report and bundle
  included).

Prints the three wall times, both speed ratios and the three best test accuracies. Without --store it extracts the
demo store (digits, efficientnet_lite0 at 96 px, stage taps x avg, avg2) first; that time is not counted.
``--profile FILE`` also writes a cProfile of an in-process cnncodes sweep (jobs=1, one torch thread) and prints its
top lines.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
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

from cnncodes import CodeStore, extract
from cnncodes.probing import SweepConfig
from cnncodes.sweeps import make_split, sweep

GRID = np.logspace(-3, 2, 8)


def _folds(split) -> list[tuple[np.ndarray, np.ndarray]]:
    """The sweep's CV folds as positions in the training rows (the store has no views: one row per image)."""
    return [(np.searchsorted(split.train_rows, f), np.searchsorted(split.train_rows, v)) for f, v in split.folds]


def _baseline(store: CodeStore, kind: str, jobs: int, seed: int = 0) -> dict:
    split = make_split(store, config=SweepConfig(seed=seed))
    folds = _folds(split)
    y = np.asarray(store.labels)
    y_train, y_test = y[split.train_rows], y[split.test_rows]
    results = []
    for (tap, pooling), codes in store.items():
        X = np.asarray(codes, dtype=np.float32)
        if kind == "grid":
            search = GridSearchCV(
                make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                {"logisticregression__C": GRID},
                cv=folds,
                n_jobs=jobs,
            ).fit(X[split.train_rows], y_train)
            cv, C = search.best_score_, search.best_params_["logisticregression__C"]
        else:
            search = make_pipeline(
                StandardScaler(), LogisticRegressionCV(Cs=GRID, cv=folds, max_iter=1000, n_jobs=jobs)
            ).fit(X[split.train_rows], y_train)
            clf = search[-1]
            cv, C = np.mean(next(iter(clf.scores_.values())), axis=0).max(), float(clf.C_[0])
        test = search.score(X[split.test_rows], y_test)
        results.append({"tap": tap, "pooling": pooling, "cv": cv, "C": C, "test": test})
    return max(results, key=lambda r: r["cv"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--profile", metavar="FILE", help="also write a cProfile of an in-process cnncodes sweep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or os.path.join(tmp, "digits")
        if not args.store:
            extract("demo:digits", out=path, input_size=96, taps="stages", poolings="avg,avg2", progress=False)
        store = CodeStore(path)
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # LogisticRegressionCV announcing 1.10 defaults
        times, best = {}, {}
        for kind in ("grid", "lrcv"):
            start = time.perf_counter()
            best[kind] = _baseline(store, kind, args.jobs)
            times[kind] = time.perf_counter() - start
        start = time.perf_counter()
        ours = sweep(store, probes=("logreg",), jobs=args.jobs, progress=False)
        t_ours = time.perf_counter() - start
        # what users run: the CLI in a fresh process, start-up, report and bundle included
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnncodes", "sweep", path, "--out", os.path.join(tmp, "cli"), "--probes",
                        "logreg", "--jobs", str(args.jobs), "--quiet"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        t_cli = time.perf_counter() - start
        if args.profile:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # one core, as each task of a parallel sweep has
            try:
                cProfile.runctx(
                    "sweep(store, probes=('logreg',), jobs=1, progress=False)",
                    globals(),
                    {"store": store},
                    args.profile,
                )
            finally:
                torch.set_num_threads(threads)
    print(f"store: {store.rows} rows x {len(store.arrays)} arrays; cpu cores: {os.cpu_count()}; jobs: {args.jobs}")
    for kind, name in (("grid", "GridSearchCV"), ("lrcv", "LogisticRegressionCV")):
        b = best[kind]
        print(f"{name:22s} {times[kind]:8.2f} s  best {b['tap']}/{b['pooling']}  C {b['C']:.3g}  "
              f"test accuracy {b['test']:.4f}")  # fmt: skip
    print(f"{'cnncodes sweep':22s} {t_ours:8.2f} s  best {ours.best.tap}/{ours.best.pooling}  C {ours.best.C:.3g}  "
          f"test accuracy {ours.best.test_accuracy:.4f}")  # fmt: skip
    print(f"{'cnncodes sweep (CLI)':22s} {t_cli:8.2f} s  a fresh process: start-up, results files and bundle included")
    for kind, name, target in (("grid", "GridSearchCV", 10), ("lrcv", "LogisticRegressionCV", 3)):
        print(f"speed ratio {name}/cnncodes = {times[kind] / t_ours:5.2f}x in process, {times[kind] / t_cli:5.2f}x "
              f"as the CLI (target >= {target}); accuracy difference "
              f"{100 * (ours.best.test_accuracy - best[kind]['test']):+.2f} points (target within 0.5)")  # fmt: skip
    if args.profile:
        print(
            f"\nprofile of an in-process sweep (jobs=1, one torch thread), top lines by internal time ({args.profile}):"
        )
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
