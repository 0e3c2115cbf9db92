"""End-to-end extraction into stores: layout, two routes to the same codes, resume, locking, bad images, views."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cnncodes import CodeExtractor, CodeStore, ImageDecodeError, StoreError, extract
from cnncodes.errors import IncompleteStoreError, StoreLockedError, StoreMismatchError
from cnncodes.images import pixel_transform
from cnncodes.store import StoreWriter
from helpers import TESTS, TINY_PRE, make_images, make_tiny_backbone, wait_for

MANIFEST_KEYS = {
    "complete",
    "rows_total",
    "rows_done",
    "arrays",
    "classes",
    "sources",
    "errors",
    "model",
    "views",
    "seed",
    "versions",
}


def run(images, labels, out, **kw):
    kw.setdefault("model", make_tiny_backbone())
    kw.setdefault("taps", "stages")
    kw.setdefault("poolings", "avg,avg2")
    kw.setdefault("batch_size", 8)
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return extract(images, labels=labels, out=out, **kw)


def arrays_of(store):
    return {key: np.array(codes) for key, codes in store.items()}


def test_store_layout_manifest_and_memmaps(tmp_path, tiny_images):
    images, labels = tiny_images
    store = run(images, labels, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert set(manifest) >= MANIFEST_KEYS and manifest["complete"] is True
    assert manifest["rows_total"] == manifest["rows_done"] == len(images) == store.rows
    assert set(manifest["versions"]) >= {"cnncodes", "torch", "timm", "numpy"}
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    for entry in manifest["arrays"]:
        assert set(entry) >= {"tap", "pooling", "file", "shape", "dtype", "rectified"}
        codes = store.codes(entry["tap"], entry["pooling"])
        assert isinstance(codes, np.memmap) and list(codes.shape) == entry["shape"] and codes.dtype == np.float16
    np.testing.assert_array_equal(store.labels, labels)
    assert not (tmp_path / "s" / ".partial").exists()


def test_store_codes_equal_the_extractor_on_the_same_pixels(tmp_path, tiny_images):
    images, labels = tiny_images
    backbone = make_tiny_backbone()
    store = run(images, labels, tmp_path / "s", model=backbone, dtype="float32")
    # reference preprocessing through torchvision's own Normalize, not cnncodes' on-device normalization
    tf = v2.Compose(
        [pixel_transform(TINY_PRE), v2.ToDtype(torch.float32, scale=True), v2.Normalize(TINY_PRE.mean, TINY_PRE.std)]
    )
    x = torch.stack([tf(Image.fromarray(im)) for im in images])
    with torch.inference_mode():
        direct = CodeExtractor(backbone, "stages", "avg,avg2")(x)
    for (tap, pooling), codes in store.items():
        np.testing.assert_allclose(codes, direct[tap][pooling].numpy(), rtol=1e-5, atol=1e-6)


def test_interrupted_run_resumes_to_identical_store(tmp_path, tiny_images):
    images, labels = tiny_images
    reference = arrays_of(run(images, labels, tmp_path / "ref"))

    backbone = make_tiny_backbone()
    batches = []

    def interrupt_second_batch(module, args):
        if args[0].shape[0] == 8:  # extraction batches (tap discovery uses 2 images)
            batches.append(1)
            if len(batches) == 2:
                raise KeyboardInterrupt

    handle = backbone.model.stem.register_forward_pre_hook(interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(images, labels, tmp_path / "s", model=backbone)
    with pytest.raises(IncompleteStoreError, match="resume"):
        CodeStore(tmp_path / "s")
    assert not list((tmp_path / "s").glob("*.npy")), "no final array may exist before the store is complete"
    progress = json.loads((tmp_path / "s" / ".partial" / "progress.json").read_text())
    assert progress["rows_done"] == 8  # the first batch was committed
    handle.remove()
    resumed = arrays_of(run(images, labels, tmp_path / "s"))
    assert resumed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key])


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import make_images, make_tiny_backbone
from cnncodes import extract
import cnncodes.extraction._run as run_module; run_module.COMMIT_SECONDS = 0  # commit every batch: the pause counts rows
images, labels = make_images(48)
extract(images, labels=labels, out={out!r}, model=make_tiny_backbone(pause={pause!r}), poolings="avg,avg2",
        batch_size=4, workers=0, progress=False)
"""


@pytest.mark.slow
def test_sigkill_partway_then_rerun_is_bitwise_identical(tmp_path):
    images, labels = make_images(48)
    reference = arrays_of(run(images, labels, tmp_path / "ref", batch_size=4))
    out = tmp_path / "killed"
    progress = out / ".partial" / "progress.json"
    ready = tmp_path / "ready"
    script = KILL_SCRIPT.format(tests=str(TESTS), out=str(out), pause=(str(progress), 12, str(ready)))
    proc = subprocess.Popen([sys.executable, "-c", script])
    wait_for(ready, proc=proc)  # the child committed >= 12 rows and now blocks in its next forward
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["rows_done"]
    assert 12 <= done < 48, f"kill came too late or too early ({done} rows)"
    plain = KILL_SCRIPT.format(tests=str(TESTS), out=str(out), pause=None)
    resumed = subprocess.run([sys.executable, "-c", plain], timeout=300)
    assert resumed.returncode == 0
    store = CodeStore(out)
    for key, codes in arrays_of(store).items():
        np.testing.assert_array_equal(codes, reference[key])


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, tiny_images):
    images, labels = tiny_images
    from cnncodes.store import ArraySpec

    holder = StoreWriter(
        tmp_path / "s", arrays=[ArraySpec("a", "avg", 2, "float16", True, False)], sources=["x"], labels=np.zeros(1),
        classes=[], views=0, config={"k": 1}, info={},
    )  # fmt: skip
    try:
        with pytest.raises(StoreLockedError, match="another cnncodes process"):
            run(images, labels, tmp_path / "s")
    finally:
        holder.close()


def test_other_settings_are_refused_unless_overwrite(tmp_path, tiny_images):
    images, labels = tiny_images
    first = arrays_of(run(images, labels, tmp_path / "s"))
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        run(images, labels, tmp_path / "s", poolings="max")
    again = arrays_of(run(images, labels, tmp_path / "s"))  # same settings: the complete store is reused
    assert again.keys() == first.keys()
    store = run(images, labels, tmp_path / "s", poolings="max", overwrite=True)
    assert store.poolings == ["max"] and not list((tmp_path / "s").glob("*__avg.npy"))


def test_unrelated_directory_is_not_overwritten(tmp_path, tiny_images):
    images, labels = tiny_images
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(StoreError, match="not empty"):
        run(images, labels, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def _folder_with_bad_files(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    good = root / "cat" / "0.png"
    bad = {
        "cat/empty.jpg": b"",
        "cat/notes.png": b"this is text, not pixels",
        "dog/truncated.png": good.read_bytes()[: len(good.read_bytes()) // 2],
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    Image.fromarray((rng.integers(0, 255, (20, 24)) * 200).astype(np.uint16)).save(root / "dog" / "deep.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8)).save(root / "dog" / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).convert("CMYK").save(root / "cat" / "cmyk.jpg")
    return bad


def test_image_folder_with_bad_files_completes_and_lists_them(tmp_path):
    bad = _folder_with_bad_files(tmp_path / "imgs")
    store = run(str(tmp_path / "imgs"), None, tmp_path / "s", batch_size=4)
    failed = {Path(e["path"]).relative_to(tmp_path / "imgs").as_posix() for e in store.errors}
    assert failed == set(bad) and all(e["reason"] for e in store.errors)
    assert store.rows == 13 and len(store.sources) == 13
    labels = np.asarray(store.labels)
    for path, label in zip(store.sources, labels):
        assert store.classes[label] == Path(path).parent.name, "rows and labels must stay aligned"
    for _, codes in store.items():
        assert codes.shape[0] == 13 and np.isfinite(codes).all()


def test_on_error_raise_names_the_file(tmp_path):
    _folder_with_bad_files(tmp_path / "imgs")
    with pytest.raises(ImageDecodeError, match="empty.jpg"):
        run(str(tmp_path / "imgs"), None, tmp_path / "s", batch_size=4, on_error="raise")


@pytest.mark.parametrize("batch_size,workers", [(3, 0), (16, 1)])
@pytest.mark.slow
def test_views_are_reproducible_and_independent_of_batching(tmp_path, tiny_images, batch_size, workers):
    images, labels = tiny_images
    images, labels = images[:10], labels[:10]
    kw = dict(views=2, seed=7, poolings="avg", dtype="float32")
    a = run(images, labels, tmp_path / "a", batch_size=6, **kw)
    b = run(images, labels, tmp_path / "b", batch_size=batch_size, workers=workers, **kw)
    plain = run(images, labels, tmp_path / "plain", poolings="avg", dtype="float32")
    assert a.rows == 30 and list(a.groups[:6]) == [0, 0, 0, 1, 1, 1] and list(a.view_index[:3]) == [0, 1, 2]
    np.testing.assert_array_equal(np.asarray(a.labels), np.repeat(labels, 3))
    for key, codes in arrays_of(a).items():
        np.testing.assert_array_equal(codes, np.asarray(b.codes(*key)))
        np.testing.assert_allclose(codes[::3], np.asarray(plain.codes(*key)), rtol=1e-6)  # view 0 is the plain view
        assert not np.allclose(codes[1::3], codes[::3]), "augmented views must differ from the plain view"
    other_seed = run(images, labels, tmp_path / "c", batch_size=6, **{**kw, "seed": 8})
    key = a.keys()[0]
    assert not np.allclose(np.asarray(other_seed.codes(*key))[1::3], np.asarray(a.codes(*key))[1::3])


def test_arguments_are_checked_before_anything_is_written(tmp_path, tiny_images):
    images, labels = tiny_images
    with pytest.raises(ValueError, match=r"seed=-1; use an integer in \[0, 2\*\*32\)"):
        run(images, labels, tmp_path / "s", views=2, seed=-1)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_source_whose_every_image_is_bad_fails_clearly(tmp_path, capsys):
    from cnncodes.cli import main

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i}.png").write_bytes(b"")  # zero-byte files
    assert main(["extract", str(tmp_path / "imgs"), "--model", "resnet18:none", "--input-size", "32",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "none of the 3 images could be decoded" in err and "0.png" in err


def test_a_runaway_worker_count_is_refused(tmp_path, tiny_images):
    images, labels = tiny_images
    with pytest.raises(ValueError, match="workers=100000"):
        run(images, labels, tmp_path / "s", workers=100000)
    assert not (tmp_path / "s").exists()
