"""Test helpers shared by the suite (import them with ``from helpers import ...``): a tiny network with the traps
real ones have, tiny seeded images, synthetic code stores written through the real writer, and a tiny saved probe."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cnncodes import Preprocessing, load_backbone

#: The tests directory: child processes put it on sys.path to import these helpers.
TESTS = Path(__file__).resolve().parents[1]

__all__ = ["CONTEXT_FIELDS", "row_facts", "TESTS", "TinyNet", "TINY_PRE", "SYNTHETIC_MODEL", "make_tiny_backbone", "make_images", "make_code_store",
           "write_image_folder", "tiny_bundle", "wait_for"]  # fmt: skip


class TinyNet(nn.Module):
    """A small CNN with the traps real networks have: in-place ReLUs, one ReLU module reused, a residual `+=`."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(2 * width, 5)
        with torch.no_grad():  # non-trivial BN statistics so pre-activation values are clearly signed
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        y = self.conv_b(self.relu(self.conv_a(x)))
        y += x
        y = self.relu(y)
        z = self.act(self.down(y))
        return self.head(z.mean((2, 3)))


TINY_PRE = Preprocessing(input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


#: Row fields that depend on more than the row itself: timings, what the cost of its tap measured, and its paired tests
#: against whichever row is the best of the sweep it is in. Two routes to the same row agree on everything else.
CONTEXT_FIELDS = ("fit_seconds", "p_cv", "p_cv_holm", "p_cv_images", "p_cv_images_holm", "p_test", "p_test_holm",
                  "flops", "params", "latency_ms_batch1", "latency_ms_batch64", "code_bytes", "probe_bytes")  # fmt: skip


def row_facts(row, *drop: str) -> dict:
    """``row.to_dict()`` without :data:`CONTEXT_FIELDS` (and ``drop``): what two routes to one row must agree on."""
    return {k: v for k, v in row.to_dict().items() if k not in CONTEXT_FIELDS + drop}


def make_tiny_backbone(pause: tuple[str, int, str] | None = None):
    """The tiny backbone.

    ``pause=(progress_file, rows, ready_file)`` stops the run at a known point, for kill tests: once the store's
    ``progress_file`` has committed at least ``rows`` rows, the next forward writes ``ready_file`` and blocks forever,
    so the test kills a process whose state it knows instead of racing a timer.
    """
    torch.manual_seed(0)
    backbone = load_backbone(TinyNet(), preprocessing=TINY_PRE)
    if pause is not None:  # a hook, not code in forward: FX tracing would drop it
        progress, rows, ready = Path(pause[0]), int(pause[1]), Path(pause[2])
        discovery_stem, forwarded = backbone.model.stem, [0]

        def committed() -> bool:
            return progress.exists() and json.loads(progress.read_text() or "{}").get("rows_done", 0) >= rows

        def stop_once_committed(module, args):
            if module is discovery_stem:  # tap discovery; batches run on the extractor's own copy of the network
                return
            batch = args[0].shape[0]
            handed_over = forwarded[0] - batch  # batch i is handed to the writer once batch i + 1 is launched
            forwarded[0] += batch
            if handed_over >= rows:
                wait_for_condition(committed, timeout=60)
                ready.write_text(progress.read_text())
                threading.Event().wait()

        backbone.model.stem.register_forward_pre_hook(stop_once_committed)
    return backbone


def make_images(n: int = 24, size: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    base[..., labels % 3] //= 4  # a learnable colour cue per class
    return base, labels


#: What a synthetic store says made its codes: enough for a bundle, though no network can recompute them.
SYNTHETIC_MODEL = {"spec": "module:synthetic", "weights": "none", "fingerprint": "sha256:" + "0" * 64,
                   "preprocessing": TINY_PRE.to_dict()}  # fmt: skip


def make_code_store(
    path, n_images: int = 150, views: int = 0, dims: dict | None = None, seed: int = 0, n_classes: int = 3,
    model: dict | None = None, source_names: list[str] | None = None,
):  # fmt: skip
    """A complete store of synthetic codes written through the real StoreWriter.

    Tap ``mid`` separates the classes well, ``early`` weakly and ``late`` not at all, so a sweep must pick ``mid``.
    """
    from cnncodes.store import ArraySpec, StoreWriter

    dims = dims or {"early": 6, "mid": 12, "late": 8}
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % n_classes
    strength = {"early": 0.6, "mid": 3.0, "late": 0.0}
    specs = [
        ArraySpec(t, p, d, "float32", True, False, depth=i) for i, (t, d) in enumerate(dims.items()) for p in ("avg",)
    ]
    sources = source_names or [f"img{i}.png" for i in range(n_images)]
    writer = StoreWriter(path, arrays=specs, sources=sources, labels=labels, classes=[f"c{k}" for k in range(n_classes)],
                         views=views, config={"synthetic": seed}, info={"model": model or SYNTHETIC_MODEL})  # fmt: skip
    rows = n_images * (views + 1)
    row_labels = np.repeat(labels, views + 1)
    codes = {}
    for spec in specs:
        centers = rng.normal(size=(n_classes, spec.dims)) * strength.get(spec.tap, 1.0)
        codes[spec.file] = (centers[row_labels] + rng.normal(size=(rows, spec.dims))).astype(np.float32)
    writer.write(0, codes)
    writer.commit(rows)
    store = writer.finalize()
    writer.close()
    return store


def write_image_folder(root: Path, n: int = 24, size: int = 20, seed: int = 0) -> Path:
    """An ImageFolder of ``n`` PNGs in 3 classes (the images of :func:`make_images`)."""
    images, labels = make_images(n, size, seed)
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / f"class{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"class{y}" / f"{i:03d}.png")
    return root


def tiny_bundle(tmp_path: Path) -> tuple[Path, Path]:
    """A probe bundle trained on TinyNet codes of a tiny image folder: ``(bundle path, image folder)``."""
    import cnncodes

    images = write_image_folder(tmp_path / "images")
    store = cnncodes.extract(images, out=tmp_path / "codes", model=make_tiny_backbone(), taps="stages", poolings="avg",
                             batch_size=8, workers=0, progress=False)  # fmt: skip
    result = cnncodes.sweep(store, cnncodes.SweepConfig(probes=("logreg",), folds=3), progress=False)
    return cnncodes.save_probe(result, tmp_path / "probe"), images


def wait_for_condition(condition, timeout: float) -> None:
    """Poll ``condition()`` until it holds, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{condition} did not hold within {timeout} s")
        time.sleep(0.01)


def wait_for(path: Path, timeout: float = 120.0, proc=None) -> None:
    """Block until ``path`` exists (a ready file a child process writes at a known point), or fail."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the child exited with {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
