"""Peak resident memory of an extraction at N = 2,000 and N = 20,000 images, measured in fresh processes.

    python benchmarks/memory_scaling.py [--sizes 2000 20000]

Images are generated on the fly by a Dataset (so the source itself holds nothing), the store keeps a large
flattened tap (``none`` pooling) so an implementation that buffered codes in RAM would show it, and each size runs in a
child process whose peak RSS is read from the kernel. Flat RSS in N means nothing grows with the number of images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys
import numpy as np, torch
from torch.utils.data import Dataset
from cnncodes import Preprocessing, extract, load_backbone

class Generated(Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), int(i % 10)

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU())
backbone = load_backbone(net, preprocessing=Preprocessing(input_size=32, resize_size=32))
n, out = int(sys.argv[1]), sys.argv[2]
store = extract(Generated(n), out=out, model=backbone, taps="1,3", poolings="avg,none", batch_size=256, workers=0, progress=False)
size = sum(np.load(f"{out}/{a['file']}", mmap_mode="r").nbytes for a in store.arrays)
print(json.dumps({"n": n, "store_bytes": int(size), "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(n), f"{tmp}/store{n}"], check=True, capture_output=True, text=True
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"N={r['n']:>7}  store={r['store_bytes'] / 2**20:8.1f} MiB  peak RSS={r['peak_rss_kib'] / 1024:7.1f} MiB")
    first, last = results[0], results[-1]
    print(
        f"store grew x{last['store_bytes'] / first['store_bytes']:.1f}; peak RSS grew x{last['peak_rss_kib'] / first['peak_rss_kib']:.3f}"
    )


if __name__ == "__main__":
    main()
