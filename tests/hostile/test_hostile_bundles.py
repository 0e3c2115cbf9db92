"""Hostile bundles (``helpers.hostile.BUNDLE_CASES``): damaged, malformed, oversized and tampered bundles, each
refused with a BundleError (exit 2, one line, from the CLI) before any image work."""

from __future__ import annotations

import pytest

from cnncodes.cli import main
from cnncodes.deploy import bundle_digest, load_bundle, read_bundle
from cnncodes.errors import BundleError
from helpers import tiny_bundle
from helpers.hostile import BUNDLE_CASES, RAW_BUNDLE_CASES, bundle_members, make_bundle_case, write_bundle


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_hostile_bundles_are_refused_before_any_image_work(valid, tmp_path, case, capsys):
    bundle, images = valid
    path = make_bundle_case(bundle, tmp_path / "hostile.zip", case)
    with pytest.raises(BundleError, match=BUNDLE_CASES[case][1]):
        read_bundle(path)
    assert main(["predict", str(path), str(images), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes predict: error: ") and err.count("\n") == 1


def test_member_checksums_catch_corruption_but_only_a_pinned_digest_catches_tampering(valid, tmp_path, capsys):
    bundle, images = valid
    digest = bundle_digest(bundle)
    meta, arrays = bundle_members(bundle)
    forged = write_bundle(tmp_path / "forged.zip", meta, {**arrays, "coef": -arrays["coef"]})  # checksums recomputed
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


@pytest.mark.parametrize("case", list(RAW_BUNDLE_CASES))
def test_hostile_bundle_files_are_refused_before_any_image_work(valid, tmp_path, case, capsys):
    bundle, images = valid
    make, message = RAW_BUNDLE_CASES[case]
    path = tmp_path / "hostile.zip"
    make(bundle, path)
    with pytest.raises(BundleError, match=message):
        read_bundle(path)
    assert main(["predict", str(path), str(images), "--quiet"]) == 2
    assert main(["export", str(path), "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and all(line.startswith("cnncodes ") for line in err.splitlines())


def test_a_bundle_whose_pooling_does_not_fit_its_coefficients_is_refused_before_images(valid, tmp_path):
    bundle, _ = valid
    meta, arrays = bundle_members(bundle)
    meta["extractor"]["pooling"] = "avg2" if meta["extractor"]["pooling"] != "avg2" else "avg"
    path = write_bundle(tmp_path / "other_pooling.zip", meta, arrays)
    with pytest.raises(BundleError, match="does not fit its model"):
        load_bundle(path, backbone=_tiny())


@pytest.mark.slow
def test_a_member_that_lies_about_its_size_is_inflated_in_bounded_chunks(valid, tmp_path):
    """A 256 KiB bundle whose intercept declares 2 KiB but inflates to 256 MiB: refused, and the peak of memory
    allocated while reading it stays far below what inflating it whole would take (zipfile.read did that)."""
    import tracemalloc

    from helpers.hostile import _npy_header, _with_member

    bomb = tmp_path / "bomb.zip"
    _with_member(valid[0], bomb, "arrays/intercept.npy", _npy_header((1,)) + bytes(256 * 2**20), declared=2048)
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=str(bomb)):
            read_bundle(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"reading the bomb allocated {peak / 2**20:.0f} MiB at its peak"
