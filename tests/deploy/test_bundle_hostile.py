"""Hostile bundles: a corpus of damaged, malformed, oversized and tampered bundles, each refused with a BundleError
(exit 2, one line, from the CLI) before any image work. Add a case by adding one entry to CASES."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cnncodes.cli import main
from cnncodes.deploy import bundle_digest, load_bundle, read_bundle
from cnncodes.errors import BundleError
from helpers import tiny_bundle


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _members(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("bundle.json"))
        arrays = {n[7:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist() if n.startswith("arrays/")}
    return meta, arrays


def _write(path: Path, meta, arrays: dict[str, np.ndarray], raw_json: bytes | None = None) -> Path:
    """Write a bundle the way an attacker would: checksums recomputed so they look right."""
    members = {}
    for name, array in arrays.items():
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        members[f"arrays/{name}.npy"] = buf.getvalue()
    if isinstance(meta, dict) and "checksums" in meta and not isinstance(meta["checksums"], int):
        meta["checksums"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bundle.json", raw_json if raw_json is not None else json.dumps(meta))
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


CASES = {
    # case: (edit(meta, arrays) -> (meta, arrays, raw_json or None), expected message)
    "json is a list": (lambda m, a: ([1, 2], a, None), "not a cnncodes probe bundle"),
    "integer checksums": (lambda m, a: ({**m, "checksums": 7}, a, None), "checksums must be an object"),
    "deeply nested json": (lambda m, a: (m, a, _nested(100000)), "not a readable probe bundle"),
    "json padded past the limit": (lambda m, a: (m, a, json.dumps(m).encode() + b" " * (17 * 2**20)), "over the"),
    "format_version 0": (lambda m, a: ({**m, "format_version": 0}, a, None), "not a positive integer"),
    "format_version -7": (lambda m, a: ({**m, "format_version": -7}, a, None), "not a positive integer"),
    "format_version true": (lambda m, a: ({**m, "format_version": True}, a, None), "not a positive integer"),
    "unknown normalizer": (lambda m, a: ({**m, "normalizer": "bogus"}, a, None), "normalizer 'bogus'"),
    "one class": (lambda m, a: ({**m, "classes": m["classes"][:1]}, a, None), "at least 2 class names"),
    "classes do not fit the scores": (
        lambda m, a: ({**m, "classes": [*m["classes"], "extra"]}, a, None),
        "do not fit",
    ),
    "nan coefficients": (lambda m, a: (m, {**a, "coef": a["coef"] * np.nan}, None), "not finite"),
    "string coefficients": (
        lambda m, a: (m, {**a, "coef": a["coef"].astype(str)}, None),
        "not finite floating|more than .* can need",
    ),
    "missing coef": (lambda m, a: (m, {k: v for k, v in a.items() if k != "coef"}, None), "missing"),
    "oversized coef": (
        lambda m, a: (m, {**a, "coef": np.zeros((a["coef"].shape[0], 300000))}, None),
        "more than .* can need",
    ),
    "infinite input size": (
        lambda m, a: (_with_pre(m, input_size=1e309), a, None),
        "preprocessing",
    ),
    "std of zero": (lambda m, a: (_with_pre(m, std=[0.0, 0.5, 0.5]), a, None), "std must be finite and positive"),
}


def _with_pre(meta: dict, **changes) -> dict:
    meta = json.loads(json.dumps(meta))
    meta["extractor"]["model"]["preprocessing"].update(changes)
    return meta


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_bundles_are_refused_before_any_image_work(valid, tmp_path, case, capsys):
    bundle, images = valid
    meta, arrays = _members(bundle)
    edit, message = CASES[case]
    new_meta, new_arrays, raw = edit(json.loads(json.dumps(meta)), dict(arrays))
    path = _write(tmp_path / "hostile.zip", new_meta, new_arrays, raw)
    with pytest.raises(BundleError, match=message):
        read_bundle(path)
    assert main(["predict", str(path), str(images), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes predict: error: ") and err.count("\n") == 1


def test_member_checksums_catch_corruption_but_only_a_pinned_digest_catches_tampering(valid, tmp_path, capsys):
    bundle, images = valid
    digest = bundle_digest(bundle)
    meta, arrays = _members(bundle)
    forged = _write(tmp_path / "forged.zip", meta, {**arrays, "coef": -arrays["coef"]})  # checksums recomputed
    assert read_bundle(forged).arrays["coef"].sum() == pytest.approx(-arrays["coef"].sum())  # looks valid
    with pytest.raises(BundleError, match="not the pinned sha256"):
        read_bundle(forged, digest=digest)
    assert main(["predict", str(forged), str(images), "--digest", digest, "--quiet"]) == 2
    assert "not the bundle you pinned" in capsys.readouterr().err
    assert load_bundle(bundle, digest=digest, backbone=_tiny()).classes == meta["classes"]
    with pytest.raises(BundleError, match="is not a sha256 digest"):
        read_bundle(bundle, digest="abc")


def _tiny():
    from helpers import make_tiny_backbone

    return make_tiny_backbone()
