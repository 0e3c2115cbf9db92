"""``--triage auto`` against the full sweep, on stores large enough to matter: wall time, best row, CV and test
accuracy, and each transferability score's Kendall tau and cost.

    python benchmarks/triage.py [--work DIR] [--tasks digits,patches] [--quick]

Tasks (nothing downloaded):

* ``digits``: ``demo:digits`` with ``--views 4`` (1,797 images, 8,985 rows), the embedded efficientnet_lite0 at 96 px,
  stage and expanded taps x avg, avg2, avg4: 30 arrays of 16 to 20,480 dims;
* ``patches``: 64x64 crops of ten scikit-image sample pictures (class = the picture; the task of
  benchmarks/relu_modes.py), 300 per class (3,000 images), the same model, taps and poolings, no views.

For each task the store is extracted once under ``--work`` (reused when there; default a temporary directory), then
swept twice in this process with ``SweepConfig()`` (probes logreg, linsvc, 5 folds; costs and latency measured as
``cnncodes sweep`` does): the full sweep, and the same with ``triage="auto"``. Each sweep's wall time is measured
around ``cnncodes.sweep(...)``; the scores' own time is the sum of their per-array seconds. Printed: both times and
their ratio, both best rows, the CV gap in points, what triage searched and skipped, each score's tau against the
full sweep's measured CV accuracy (and its weighted tau, the best array's rank and its seconds), the 1-minute load
average before and after, and whether each check of issue 23 holds: triaged time <= full / 5, best CV within 0.3
points of the full sweep's, score time <= 10 % of the full sweep's. ``--quick`` sweeps the avg pooling only (a
smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

MODEL, SIZE, TAPS, POOLINGS = "efficientnet_lite0", 96, "stages,expanded", "avg,avg2,avg4"
PER_CLASS = 300  # patches per picture


def store_of(task: str, root: Path):
    """The task's store under ``root``, extracted once and reused."""
    from cnncodes import CodeStore, extract

    path = root / f"{task}{PER_CLASS if task == 'patches' else ''}-{MODEL}-{SIZE}"
    try:
        return CodeStore(path)
    except Exception:  # absent or incomplete: extract (resumes an interrupted run)
        if task == "digits":
            return extract("demo:digits", out=path, model=MODEL, input_size=SIZE, taps=TAPS, poolings=POOLINGS,
                           views=4, progress=False)  # fmt: skip
        from relu_modes import patches

        images, labels = patches(per_class=PER_CLASS)
        return extract(images, labels=labels, out=path, model=MODEL, input_size=SIZE, taps=TAPS, poolings=POOLINGS,
                       progress=False)  # fmt: skip


def timed_sweep(store, config, poolings):
    from cnncodes import sweep

    start = time.perf_counter()
    result = sweep(store, config, poolings=poolings, progress=False)
    return result, time.perf_counter() - start


def describe(row) -> str:
    return (f"{row.tap} / {row.pooling} / {row.probe} ({row.dims} dims): CV {100 * row.cv_accuracy:.2f}, "
            f"test {100 * row.test_accuracy:.2f} [{100 * row.test_accuracy_ci[0]:.1f}, "
            f"{100 * row.test_accuracy_ci[1]:.1f}]")  # fmt: skip


def run_task(task: str, root: Path, quick: bool) -> bool:
    from cnncodes import SweepConfig

    store = store_of(task, root)
    poolings = "avg" if quick else None
    load_before = os.getloadavg()
    full, full_s = timed_sweep(store, SweepConfig(), poolings)
    tri, tri_s = timed_sweep(store, SweepConfig(triage="auto"), poolings)
    load_after = os.getloadavg()
    record, scores = tri.data["triage"], full.data["transferability"]
    score_s = sum(scores[name]["seconds"] for name in scores["scores"])
    gap = 100 * (full.best.cv_accuracy - tri.best.cv_accuracy)
    print(f"\n## {task}: {store.rows} rows x {len(store.keys()) if not quick else len(store.taps)} arrays, "
          f"{full.data['n_train_images']} training images")  # fmt: skip
    print(f"  load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}")  # fmt: skip
    print(f"  full sweep:    {full_s:7.1f} s  best {describe(full.best)}")
    print(f"  triage auto:   {tri_s:7.1f} s  best {describe(tri.best)}")
    sample = scores["sample"]
    print(f"  the scores read {sample['images']} of the {sample['of']} training images, the same for every array "
          f"(score_images {sample['score_images']})")  # fmt: skip
    print(f"  ratio triaged/full {tri_s / full_s:.3f}; CV gap {gap:.2f} points; scores took {score_s:.1f} s "
          f"({100 * score_s / full_s:.1f} % of the full sweep's wall time)")  # fmt: skip
    rounds = ", ".join(f"{r['score']} sd {r['log_error_sd']:.2f} on {r['arrays_searched']} -> "
                       f"{r['could_hold_the_best']} could hold the best" for r in record["rounds"])  # fmt: skip
    print(f"  triage: score {record['score']}, searched {len(record['searched'])} of {record['arrays']} arrays "
          f"({rounds}); skipped {len(record['skipped'])}, about {record['skipped_fit_seconds_estimate']:.0f} "
          "fit-seconds")  # fmt: skip
    save_arrays(full, root / f"{task}-arrays.json")
    print("  score   tau    weighted tau  best array's rank  seconds")
    for name in scores["scores"]:
        s = scores[name]
        print(f"  {name:7s} {s.get('kendall_tau', float('nan')):5.2f}  {s.get('weighted_tau', float('nan')):12.2f}  "
              f"{s.get('best_rank', '-'):>17}  {s['seconds']:7.1f}")  # fmt: skip
    checks = {
        "triaged time <= full / 5": tri_s <= full_s / 5,
        "best CV within 0.3 points of the full sweep's": gap <= 0.3 + 1e-9,
        "scores' time <= 10 % of the full sweep's": score_s <= 0.1 * full_s,
    }
    for what, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    return all(checks.values())


def save_arrays(result, path: Path) -> None:
    """Each array's measured CV accuracy (its best linear row), fit-seconds and scores, from the full sweep: what a
    triage rule can be replayed on without refitting."""
    import json

    arrays: dict[str, dict] = {}
    for r in result.rows:
        a = arrays.setdefault(
            f"{r.tap} / {r.pooling}",
            {"dims": r.dims, "cv": -1.0, "fit_seconds": 0.0}
            | {name: getattr(r, f"score_{name}") for name in result.data["transferability"]["scores"]},
        )
        a["fit_seconds"] += r.fit_seconds
        if r.selectable and r.cv_accuracy is not None:
            a["cv"] = max(a["cv"], r.cv_accuracy)
    path.write_text(json.dumps({"n_train_images": result.data["n_train_images"], "arrays": arrays}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="where the stores live (default: a temporary directory)")
    parser.add_argument("--tasks", default="digits,patches")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} CPU cores; torch threads {__import__('torch').get_num_threads()}")
        ok = [run_task(task, root, args.quick) for task in args.tasks.split(",")]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
