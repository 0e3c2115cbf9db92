"""``cnncodes depth`` on a task other than digits: is the recommended cell (picked on validation) within the test
interval of the best cell?

    python benchmarks/depth_tasks.py [--work DIR] [--per-class 100] [--size 16] [--recipes top,block,norms,head]

The task (nothing downloaded): ``size`` x ``size`` crops of ten scikit-image pictures (the patches of
benchmarks/relu_modes.py, class = the picture), ``per_class`` of each, small enough that a linear probe is not
saturated. The embedded efficientnet_lite0 at 96 px, depth's defaults otherwise (stage cuts, 2 views of crop and
flip, 8 epochs at most). Printed: the matrix (validation / test accuracy per cell), the best cell by validation
and the recommendation, the recommendation's test accuracy against the best cell's 95 % Wilson test interval, and
depth's exact McNemar p between them on the test images; the 1-minute load before and after, and the wall time.
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
warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="where the report goes (default: a temporary directory)")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--recipes", default="top,block,norms,head")
    args = parser.parse_args()

    from relu_modes import patches

    from cnncodes.images import ArraySource
    from cnncodes.training import depth

    images, labels = patches(per_class=args.per_class, size=args.size)
    source = ArraySource(images, labels, [str(k) for k in range(int(labels.max()) + 1)], description="patches")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.work or tmp) / f"patches{args.size}-{args.per_class}"
        load_before = os.getloadavg()
        start = time.perf_counter()
        rows = depth(source, out=out, input_size=96, recipes=args.recipes.split(","), progress=False)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
    print(f"patches {args.size}x{args.size}, {args.per_class} a class ({len(images)} images): {wall:.0f} s wall; "
          f"load before {load_before[0]:.2f}, after {load_after[0]:.2f}")  # fmt: skip
    print("  cut                  recipe  linear test  val    test   [95 %]")
    for r in rows:
        mark = (" best" if r.best else "") + (" recommended" if r.cheapest else "")
        ci = r.finetune_test_ci or [float("nan")] * 2
        print(f"  {r.cut:20s} {r.recipe:6s}  {r.linear_test_accuracy:.3f}        {r.finetune_val_accuracy:.3f}  "
              f"{r.finetune_test_accuracy:.3f}  [{ci[0]:.3f}, {ci[1]:.3f}]{mark}")  # fmt: skip
    best = next(r for r in rows if r.best)
    rec = next((r for r in rows if r.cheapest), best)
    inside = best.finetune_test_ci[0] <= rec.finetune_test_accuracy <= best.finetune_test_ci[1]
    p = 1.0 if rec is best or rec.p_test is None else rec.p_test  # depth's exact McNemar against the best cell
    print(f"  best {best.cut}/{best.recipe} test {best.finetune_test_accuracy:.3f}; recommended {rec.cut}/{rec.recipe}"
          f" test {rec.finetune_test_accuracy:.3f}; McNemar p {p:.3f}")  # fmt: skip
    how = " (trivially: the recommendation is the best cell)" if rec is best else ""
    print(f"  [{'ok' if inside else 'FAIL'}] the recommended cell's test accuracy is within the best cell's "
          f"interval{how}")  # fmt: skip
    probe = max(rows, key=lambda r: r.linear_test_accuracy)
    print(f"  [info] the best cell tests at {best.finetune_test_accuracy:.3f}, the best linear probe at "
          f"{probe.linear_test_accuracy:.3f} ({probe.cut}) on the same test split")  # fmt: skip
    return 0 if inside else 1


if __name__ == "__main__":
    raise SystemExit(main())
