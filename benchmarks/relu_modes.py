"""``--relu auto`` against ``--relu always``, side by side on two real tasks, same split and probes.

    python benchmarks/relu_modes.py [--model efficientnet_lite0] [--input-size 96]

Tasks (nothing downloaded): sklearn's digits (1,797 images, 10 classes) and a texture-patch task cut from
scikit-image's sample pictures (64x64 crops, class = the picture the crop came from). For each task and mode, the same
backbone extracts the stage and expanded taps (avg, avg2) and a logistic-regression sweep runs on the same folds and test
split. Prints, per tap where the two modes differ (taps the network does not threshold) and for the best tap overall,
the test accuracy under both modes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np

from cnncodes import SweepConfig, extract
from cnncodes.sweeps import sweep

warnings.filterwarnings("ignore")


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255).astype(np.uint8)
    return images, d.target


def patches(per_class: int = 60, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random crops of scikit-image's sample pictures; the label is the picture."""
    from skimage import data

    names = ["brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "camera", "coins", "moon"]
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, name in enumerate(names):
        picture = getattr(data, name)()
        if picture.ndim == 2:
            picture = np.stack([picture] * 3, -1)
        picture = picture[..., :3]
        h, w = picture.shape[:2]
        for _ in range(per_class):
            y, x = rng.integers(0, h - size), rng.integers(0, w - size)
            images.append(picture[y : y + size, x : x + size])
            labels.append(k)
    return np.stack(images).astype(np.uint8), np.array(labels)


def run(task: str, images: np.ndarray, labels: np.ndarray, model: str, size: int, root: str) -> dict[str, dict]:
    results = {}
    for mode in ("auto", "always"):
        start = time.perf_counter()
        store = extract(images, labels=labels, out=f"{root}/{task}-{mode}", model=model, input_size=size,
                        taps="stages,expanded", poolings="avg,avg2", relu=mode, progress=False)  # fmt: skip
        result = sweep(store, SweepConfig(probes=("logreg",)), jobs=-1, progress=False)
        rectified = {(a["tap"], a["pooling"]): a["relu_applied"] for a in store.arrays}
        rows = {(r.tap, r.pooling): r.to_dict() for r in result.rows}
        results[mode] = {
            "rows": rows,
            "best": result.best.to_dict(),
            "applied": rectified,
            "seconds": time.perf_counter() - start,
        }
    return results


def report(task: str, results: dict[str, dict]) -> None:
    auto, always = results["auto"], results["always"]
    differ = [k for k in auto["rows"] if always["applied"][k] != auto["applied"][k]]
    print(f"\n{task}: {len(differ)} of {len(auto['rows'])} arrays differ between the modes (raw under auto)")
    print(f"  {'tap':<24} {'pool':<5} {'auto test':>9} {'always test':>11} {'diff':>6}")
    gains = []
    for k in differ:
        a, b = auto["rows"][k]["test_accuracy"], always["rows"][k]["test_accuracy"]
        gains.append(a - b)
        print(f"  {k[0]:<24} {k[1]:<5} {100 * a:>9.2f} {100 * b:>11.2f} {100 * (a - b):>+6.2f}")
    if gains:
        print(f"  mean difference over those arrays (auto - always): {100 * np.mean(gains):+.2f} points")
    for mode in ("auto", "always"):
        best = results[mode]["best"]
        print(f"  best under {mode:<6}: {best['tap']} {best['pooling']}  CV {100 * best['cv_accuracy']:.2f}  "
              f"test {100 * best['test_accuracy']:.2f}  ({results[mode]['seconds']:.0f} s extract + sweep)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for task, (images, labels) in {"digits": digits(), "patches": patches()}.items():
            report(task, run(task, images, labels, args.model, args.input_size, root))


if __name__ == "__main__":
    main()
