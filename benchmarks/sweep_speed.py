"""A whole `cnncodes sweep` against the obvious scikit-learn baseline, side by side on the same store and CPU.

    python benchmarks/sweep_speed.py [--store DIR] [--jobs 2]

Baseline, per (tap, pooling): ``GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
C over 8 log values in [1e-4, 1e4], cv=5)`` on the same training images, best array by CV score, then its test accuracy.
cnncodes: ``sweep(store, probes=("logreg", "linsvc"))`` with the same held-out test split.
Prints both wall times, the speed ratio and both best test accuracies. Without --store, it extracts the demo store
(digits, efficientnet_lite0 at 96 px, stage taps x avg, avg2) first; that time is not counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cnncodes import CodeStore, extract
from cnncodes.probing import SweepConfig
from cnncodes.sweeps import make_split, sweep


def baseline(store: CodeStore, seed: int = 0) -> dict:
    split = make_split(store, config=SweepConfig(seed=seed))
    y = np.asarray(store.labels)
    results = []
    for (tap, pooling), codes in store.items():
        X = np.asarray(codes, dtype=np.float32)
        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            {"logisticregression__C": np.logspace(-4, 4, 8)},
            cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        )
        search.fit(X[split.train_rows], y[split.train_rows])
        test = search.score(X[split.test_rows], y[split.test_rows])
        results.append({"tap": tap, "pooling": pooling, "cv": search.best_score_, "test": test})
    return max(results, key=lambda r: r["cv"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--jobs", type=int, default=-1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or os.path.join(tmp, "digits")
        if not args.store:
            extract("demo:digits", out=path, input_size=96, taps="stages", poolings="avg,avg2", progress=False)
        store = CodeStore(path)
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        base = baseline(store)
        t_base = time.perf_counter() - start
        start = time.perf_counter()
        ours = sweep(store, jobs=args.jobs, progress=False)
        t_ours = time.perf_counter() - start
    print(f"store: {store.rows} rows x {len(store.arrays)} arrays; cpu cores: {os.cpu_count()}")
    print(
        f"baseline GridSearchCV  {t_base:8.1f} s  best {base['tap']}/{base['pooling']}  test accuracy {base['test']:.4f}"
    )
    print(f"cnncodes sweep         {t_ours:8.1f} s  best {ours.best.tap}/{ours.best.pooling}/{ours.best.probe}  "
          f"test accuracy {ours.best.test_accuracy:.4f}")  # fmt: skip
    print(
        f"speed ratio baseline/cnncodes = {t_base / t_ours:.2f}x (target >= 5); "
        f"accuracy difference = {100 * (ours.best.test_accuracy - base['test']):+.2f} points (target within 0.5)"
    )


if __name__ == "__main__":
    main()
