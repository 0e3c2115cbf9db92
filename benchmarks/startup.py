"""Start-up cost of the command line, side by side with what the libraries themselves cost to load.

    python benchmarks/startup.py [--repeat 3]

Measures, each as the median of --repeat fresh processes:

* ``cnncodes --help`` and an argument error (no torch import may happen there);
* the floor: ``python -c "import torch, torchvision, timm"``, which any tool using these libraries pays;
* ``cnncodes extract`` of 16 PNG files with the embedded EfficientNet-Lite0 at 224 px (process start, imports, model
  load, tap discovery, 16 forwards, the store written and fsync'ed);
* the same extraction a second time inside one warm process (what is left once imports are paid).

Prints the ratios: the extraction's start-up over the import floor, and what cnncodes adds on top of it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _timed(cmd: list[str], repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from helpers import write_image_folder

    cli = str(Path(sys.executable).with_name("cnncodes"))
    with tempfile.TemporaryDirectory() as tmp:
        images = write_image_folder(Path(tmp) / "images", n=16, size=64)
        out = Path(tmp) / "codes"

        def clear() -> None:
            shutil.rmtree(out, ignore_errors=True)

        help_s = _timed([cli, "--help"], args.repeat * 2)
        argerr_s = _timed([cli, "extract"], args.repeat * 2)
        floor_s = _timed([sys.executable, "-c", "import torch, torchvision, timm"], args.repeat)
        extract_s = _timed([cli, "extract", str(images), "--out", str(out), "--quiet"], args.repeat, before=clear)
        warm = (
            "import shutil, time, sys\nfrom cnncodes import extract\n"
            f"extract({str(images)!r}, out={str(out)!r}, progress=False)\nshutil.rmtree({str(out)!r})\n"
            f"t = time.perf_counter(); extract({str(images)!r}, out={str(out)!r}, progress=False)\n"
            "print(time.perf_counter() - t)"
        )
        clear()
        warm_s = float(subprocess.run([sys.executable, "-c", warm], capture_output=True, text=True, check=True).stdout)
    print(f"cnncodes --help                       {help_s:6.2f} s")
    print(f"cnncodes extract (argument error)     {argerr_s:6.2f} s")
    print(f"import torch, torchvision, timm       {floor_s:6.2f} s   (the floor any tool on these libraries pays)")
    print(f"cnncodes extract, 16 images, Lite0    {extract_s:6.2f} s   ({extract_s / floor_s:.2f}x the floor; "
          f"+{extract_s - floor_s:.2f} s over it)")  # fmt: skip
    print(f"  same extraction in a warm process   {warm_s:6.2f} s")


if __name__ == "__main__":
    main()
