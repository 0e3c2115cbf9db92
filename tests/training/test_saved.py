"""The fine-tuned model saved without pickle: it round-trips to the same predictions, predicts from the CLI, exports
to one model with the same scores, and tampered or mismatched files are refused before any image work."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch

import cnncodes
from cnncodes.cli import main
from cnncodes.errors import BundleError
from cnncodes.images import as_source
from cnncodes.network import CodeExtractor, cut_points, list_taps
from cnncodes.training import FinetuneConfig, LiveActivations, finetune, load_finetuned
from helpers import make_images, make_tiny_backbone


@pytest.fixture(scope="module", params=["top", "block", "norms", "head"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(30)
    store = cnncodes.extract(images, labels=labels, out=root / "s", model=backbone, taps=cut, poolings="none",
                             relu="never", views=1, dtype="float32", batch_size=6, workers=0, progress=False)  # fmt: skip
    result = finetune(store, cut, backbone=backbone, out=root / "ft", progress=False,
                      config=FinetuneConfig(epochs=2, batch_size=6, train=request.param, hidden=8))  # fmt: skip
    return backbone, cut, images, result, root


def test_the_saved_model_predicts_what_the_trained_one_does(trained):
    backbone, cut, images, result, _ = trained
    deployed = load_finetuned(result.path, backbone=backbone)
    live = LiveActivations(as_source(images), CodeExtractor(backbone, [cut], "none", relu="never"),
                           backbone.preprocessing, 0, ("crop", "flip"), torch.device("cpu"))  # fmt: skip
    result.model.eval()
    with torch.inference_mode():
        expected = torch.softmax(result.model(live.rows(np.arange(len(images)), 0)), 1).numpy()
    np.testing.assert_allclose(deployed.predict_proba(images), expected, rtol=1e-5, atol=1e-6)
    assert list(deployed.predict(images)) == [result.classes[i] for i in expected.argmax(1)]
    import json
    import zipfile

    with zipfile.ZipFile(result.path) as zf:  # the recipe and what it trained, recorded with the weights
        meta = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith(".json"))))
    assert meta["config"]["train"] == result.recipe and meta["trained_parameters"] == result.trained
    record = json.loads((result.path.parent / "finetune.json").read_text())
    assert record["train"] == result.recipe and record["trainable_params"] == sum(
        p.numel() for n, p in result.model.named_parameters() if n in result.trained
    )


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_the_exported_model_gives_the_same_scores(trained, tmp_path, fmt):
    backbone, _, images, result, _ = trained
    deployed = load_finetuned(result.path, backbone=backbone)
    path = deployed.export(tmp_path / f"m.{fmt}", fmt)
    program = torch.export.load(str(path)).module() if fmt == "pt2" else torch.jit.load(str(path))
    size = deployed.preprocessing.input_size
    x = torch.randn(3, 3, size, size)
    torch.testing.assert_close(program(x), deployed.module()(x), rtol=1e-4, atol=1e-4)


def test_tampered_or_mismatched_files_are_refused(trained, tmp_path):
    backbone, _, _, result, _ = trained
    with zipfile.ZipFile(result.path) as zf:
        meta, weights = json.loads(zf.read("finetuned.json")), zf.read("weights.safetensors")

    def write(name, meta, weights, checksum=True):
        if checksum:
            meta = {**meta, "checksums": {"weights.safetensors": hashlib.sha256(weights).hexdigest()}}
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr("finetuned.json", json.dumps(meta))
            zf.writestr("weights.safetensors", weights)
        return tmp_path / name

    flipped = bytearray(weights)
    flipped[-1] ^= 1
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_finetuned(write("flip.zip", meta, bytes(flipped), checksum=False), backbone=backbone)
    catalogue = list_taps(backbone)
    shape = catalogue[meta["cut"]].shape  # a cut whose activation differs, so the weights cannot fit it
    other_cut = next(c for c in cut_points(backbone, catalogue) if catalogue[c].layout.channels(catalogue[c].shape)
                     != catalogue[meta["cut"]].layout.channels(shape))  # fmt: skip
    with pytest.raises(BundleError, match="do not fit the model rebuilt at cut"):
        load_finetuned(write("cut.zip", {**meta, "cut": other_cut}, weights), backbone=backbone)
    with pytest.raises(BundleError, match="distinct class names"):
        load_finetuned(write("cls.zip", {**meta, "classes": ["a", "a", "b"]}, weights), backbone=backbone)
    with pytest.raises(BundleError, match="not the pinned"):
        load_finetuned(result.path, backbone=backbone, digest="sha256:" + "0" * 64)


@pytest.mark.slow
def test_predict_and_export_from_the_cli(tmp_path, capsys):
    from helpers import write_image_folder

    images = write_image_folder(tmp_path / "imgs", n=18)
    store = tmp_path / "s"
    assert main(["extract", str(images), "--model", "resnet18:none", "--input-size", "32", "--taps", "layer4.1.relu_1",
                 "--poolings", "none", "--relu", "never", "--out", str(store), "--quiet"]) == 0  # fmt: skip
    assert main(["finetune", str(store), "--cut", "layer4.1.relu_1", "--out", str(tmp_path / "ft"), "--epochs", "1",
                 "--batch-size", "4", "--quiet"]) == 0  # fmt: skip
    model = tmp_path / "ft" / "finetuned.zip"
    digest = capsys.readouterr().out.split("digest ")[1].split(";")[0]
    assert main(["predict", str(model), str(images), "--out", str(tmp_path / "p.csv"), "--digest", digest,
                 "--quiet"]) == 0  # fmt: skip
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,predicted,proba_class0,proba_class1,proba_class2,error"
    assert main(["export", str(model), "--out", str(tmp_path / "m.pt2")]) == 0
    assert "output logits (N, 3)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, w: ({**m, "numerics": [1]}, w), "numerics"),
        (lambda m, w: ({**m, "config": {**m["config"], "hidden": 2**40}}, w), "config is malformed"),
        (lambda m, w: (m, b"\x08" + 7 * b"\0" + b'{"a":1}'), "cannot be read"),
        (lambda m, w: (m, _retyped(w)), "are not torch.float32"),
    ],
    ids=["numerics a list", "huge hidden", "junk weights", "integer weights"],
)
def test_hostile_fine_tuned_files_fail_in_one_line(trained, tmp_path, edit, message, capsys):
    backbone, _, _, result, root = trained
    with zipfile.ZipFile(result.path) as zf:
        meta, weights = json.loads(zf.read("finetuned.json")), zf.read("weights.safetensors")
    meta, weights = edit(meta, weights)
    meta = {**meta, "checksums": {"weights.safetensors": hashlib.sha256(weights).hexdigest()}}
    path = tmp_path / "hostile.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("finetuned.json", json.dumps(meta))
        zf.writestr("weights.safetensors", weights)
    with pytest.raises(BundleError, match=message):
        load_finetuned(path, backbone=backbone)


def _retyped(weights: bytes) -> bytes:
    from safetensors.torch import load, save

    return save({k: v.to(torch.int64) if v.is_floating_point() else v for k, v in load(weights).items()})


def test_non_finite_cached_activations_are_named(tmp_path):
    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(24)
    store = cnncodes.extract(images, labels=labels, out=tmp_path / "s", model=backbone, taps=cut, poolings="none",
                             relu="never", dtype="float32", batch_size=6, workers=0, progress=False)  # fmt: skip
    array = np.load(store.path / store.arrays[0]["file"], mmap_mode="r+")
    array[3, :5] = np.nan
    array.flush()
    del array
    with pytest.raises(cnncodes.errors.ParameterError, match="NaN or infinite values"):
        finetune(
            store, cut, backbone=backbone, config=FinetuneConfig(epochs=1, batch_size=6, head=True), progress=False
        )


@pytest.mark.parametrize(("field", "value"), [("lr", 1e300), ("batch_size", 1), ("hidden", 10**9), ("init", "lp")])
def test_finetune_settings_are_bounded(field, value):
    with pytest.raises(cnncodes.errors.ParameterError, match=field):
        FinetuneConfig(**{field: value})
