"""Deployment: predict from a saved bundle, safety of bundles, fingerprints, export, and the sklearn transformer."""

import csv
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnncodes.cli import main
from cnncodes.deploy import export_probe, load_bundle, read_bundle, save_bundle
from cnncodes.errors import BundleError, FingerprintMismatchError
from cnncodes.images import normalize, pixel_transform

MODEL = ["--model", "resnet18:none", "--input-size", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder of images, its store, a sweep over it and the saved bundle."""
    root = tmp_path_factory.mktemp("deploy")
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("red", "green", "blue")):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(16):
            img = rng.integers(0, 90, (28, 28, 3), dtype=np.uint8)
            img[..., k] += 150
            Image.fromarray(img).save(root / "imgs" / cls / f"{i}.png")
    assert (
        main(
            [
                "extract",
                str(root / "imgs"),
                *MODEL,
                "--taps",
                "last:2",
                "--poolings",
                "avg",
                "--out",
                str(root / "codes"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sweep",
                str(root / "codes"),
                "--out",
                str(root / "sweep"),
                "--probes",
                "logreg",
                "--folds",
                "3",
                "--jobs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    return root


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_predict_cli_reproduces_the_sweeps_test_predictions(trained, tmp_path):
    expected = _csv(trained / "sweep" / "test_predictions.csv")
    listing = tmp_path / "test.csv"
    listing.write_text("path\n" + "\n".join(r["path"] for r in expected) + "\n")
    assert (
        main(
            [
                "predict",
                str(trained / "sweep" / "best_probe.zip"),
                str(listing),
                "--out",
                str(tmp_path / "p.csv"),
                "--quiet",
            ]
        )
        == 0
    )
    got = _csv(tmp_path / "p.csv")
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    assert [r["predicted"] for r in got] == [r["predicted"] for r in expected]
    probe = load_bundle(trained / "sweep" / "best_probe.zip")
    api = probe.decision_function([r["path"] for r in expected])
    score_cols = [c for c in expected[0] if c.startswith("score_")]
    ref = np.array([[float(r[c]) for c in score_cols] for r in expected])
    np.testing.assert_allclose(api, ref, rtol=1e-4, atol=1e-4)
    assert list(probe.predict([r["path"] for r in expected])) == [r["predicted"] for r in expected]


@pytest.mark.slow
def test_bad_image_gets_an_error_row(trained, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"nope")
    assert (
        main(
            [
                "predict",
                str(trained / "sweep" / "best_probe.zip"),
                str(folder),
                "--out",
                str(tmp_path / "p.csv"),
                "--quiet",
            ]
        )
        == 0
    )
    rows = {Path(r["path"]).name: r for r in _csv(tmp_path / "p.csv")}
    assert rows["broken.png"]["error"] and not rows["broken.png"]["predicted"]
    assert rows["ok.png"]["predicted"] in ("red", "green", "blue") and not rows["ok.png"]["error"]


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _rewrite(src: Path, dst: Path, change):
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)


def test_planted_pickle_is_never_executed(trained, tmp_path):
    bundle = trained / "sweep" / "best_probe.zip"
    marker = tmp_path / "pwned"
    Boom.marker = str(marker)
    payload = pickle.dumps(Boom())

    def extra_member(m):
        m["arrays/evil.pkl"] = payload

    def object_array(m):
        buf = io.BytesIO()
        np.save(buf, np.array([Boom()], dtype=object), allow_pickle=True)
        m["arrays/coef.npy"] = buf.getvalue()
        meta = json.loads(m["bundle.json"])
        import hashlib

        meta["checksums"]["arrays/coef.npy"] = hashlib.sha256(buf.getvalue()).hexdigest()
        m["bundle.json"] = json.dumps(meta)

    for change in (extra_member, object_array):
        evil = tmp_path / f"{change.__name__}.zip"
        _rewrite(bundle, evil, change)
        with pytest.raises(BundleError):
            read_bundle(evil)
    assert not marker.exists(), "a pickle payload was executed"


def test_tampered_and_truncated_bundles_are_rejected(trained, tmp_path):
    bundle = trained / "sweep" / "best_probe.zip"

    def flip(m):
        data = bytearray(m["arrays/coef.npy"])
        data[-1] ^= 0xFF
        m["arrays/coef.npy"] = bytes(data)

    _rewrite(bundle, tmp_path / "t.zip", flip)
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(tmp_path / "t.zip")
    raw = bundle.read_bytes()
    (tmp_path / "cut.zip").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BundleError, match="truncated"):
        read_bundle(tmp_path / "cut.zip")


@pytest.mark.slow
def test_fingerprint_mismatch_is_refused_unless_overridden(trained, tmp_path, capsys):
    bundle = read_bundle(trained / "sweep" / "best_probe.zip")
    bundle.extractor.model["fingerprint"] = "sha256:" + "0" * 64
    path = save_bundle(bundle, tmp_path / "other.zip")
    with pytest.raises(FingerprintMismatchError, match="--weights PATH"):
        load_bundle(path)
    assert main(["predict", str(path), str(trained / "imgs"), "--quiet"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert load_bundle(path, allow_fingerprint_mismatch=True).classes == ["blue", "green", "red"]


def _preprocessed(probe, paths):
    tf = pixel_transform(probe.preprocessing)
    return normalize(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]), probe.preprocessing)


@pytest.mark.slow
def test_pt2_export_is_the_default_and_matches_the_bundle_at_any_batch_size(trained, tmp_path, capsys):
    probe = load_bundle(trained / "sweep" / "best_probe.zip", device="cpu")
    assert main(["export", str(trained / "sweep" / "best_probe.zip"), "--out", str(tmp_path / "m.pt2")]) == 0
    assert "wrote pt2 model" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    for n in (1, 3, 7):  # the batch dimension is dynamic
        paths = sorted((trained / "imgs").rglob("*.png"))[:n]
        with torch.no_grad():
            got = program(_preprocessed(probe, paths)).numpy()
        np.testing.assert_allclose(got, probe.decision_function([str(p) for p in paths]), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchscript_export_is_kept_and_matches_the_bundle(trained, tmp_path):
    probe = load_bundle(trained / "sweep" / "best_probe.zip", device="cpu")
    paths = sorted((trained / "imgs").rglob("*.png"))[:6]
    assert (
        main(
            [
                "export",
                str(trained / "sweep" / "best_probe.zip"),
                "--format",
                "torchscript",
                "--out",
                str(tmp_path / "m.pt"),
            ]
        )
        == 0
    )
    with pytest.warns(FutureWarning):  # torch deprecates torch.jit.load; that is why pt2 is the default
        exported = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        got = exported(_preprocessed(probe, paths)).numpy()
    np.testing.assert_allclose(got, probe.decision_function([str(p) for p in paths]), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_export_through_dynamo_matches_the_bundle(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    probe = load_bundle(trained / "sweep" / "best_probe.zip", device="cpu")
    path = export_probe(probe, tmp_path / "m.onnx", "onnx")
    session = ort.InferenceSession(str(path))
    for n in (1, 5):
        paths = sorted((trained / "imgs").rglob("*.png"))[:n]
        got = session.run(None, {"images": _preprocessed(probe, paths).numpy()})[0]
        np.testing.assert_allclose(got, probe.decision_function([str(p) for p in paths]), atol=1e-4, rtol=0)


def test_export_refuses_unknown_formats_and_leaves_nothing(trained, tmp_path):
    probe = load_bundle(trained / "sweep" / "best_probe.zip", device="cpu")
    with pytest.raises(ValueError, match="use one of"):
        export_probe(probe, tmp_path / "m.bin", "keras")
    assert not (tmp_path / "m.bin").exists()


def test_predict_arguments_are_checked_before_any_image_work(trained, tmp_path, capsys):
    bundle = str(trained / "sweep" / "best_probe.zip")
    assert main(["predict", bundle, str(trained / "imgs"), "--batch-size", "-3", "--quiet"]) == 2
    assert "argument --batch-size: -3 is below 1" in capsys.readouterr().err
