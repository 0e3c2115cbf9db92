"""CNNCodes as a scikit-learn transformer: Pipeline + GridSearchCV, caching, pickling without weights, checks."""

import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

import cnncodes.adapter as transformer_module
from cnncodes import load_backbone
from cnncodes.adapter import CNNCodes
from cnncodes.errors import FingerprintMismatchError
from cnncodes.probing._linear import TorchLogisticRegression
from helpers import make_images

SPEC = dict(model="resnet18:none", input_size=32, taps="layer2.1.relu_1", poolings="avg,avg2")


@pytest.fixture(scope="module")
def data():
    return make_images(36, size=24)


def test_transform_equals_the_extractor_and_names_features(data):
    images, _ = data
    t = CNNCodes(**SPEC, device="cpu").fit(images)
    codes = t.transform(images[:5])
    assert codes.shape == (5, t.n_features_out_) == (5, 128 + 512)
    names = t.get_feature_names_out()
    assert (
        len(names) == codes.shape[1]
        and names[0] == "layer2.1.relu_1__avg_0"
        and names[-1] == "layer2.1.relu_1__avg2_511"
    )
    same = t.transform([Image.fromarray(im) for im in images[:5]])  # PIL route
    np.testing.assert_allclose(codes, same, rtol=1e-6)


def test_grid_over_C_does_not_reextract_codes(data, tmp_path, monkeypatch):
    images, labels = data
    seen = []
    original = transformer_module.encode

    def counting(source, *args, **kwargs):
        seen.append(len(source))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(transformer_module, "encode", counting)
    pipe = Pipeline(
        [("codes", CNNCodes(**SPEC, device="cpu", memory=str(tmp_path))), ("probe", TorchLogisticRegression())]
    )
    search = GridSearchCV(pipe, {"probe__C": [0.01, 0.1, 1.0]}, cv=3).fit(images, labels)
    assert sum(seen) == len(images), f"the network ran on {sum(seen)} images for {len(images)} distinct ones"
    assert search.best_estimator_.predict(images[:4]).shape == (4,)


def test_pickle_leaves_the_weights_out_and_checks_them_on_reload(data, monkeypatch):
    images, _ = data
    t = CNNCodes(**SPEC, device="cpu").fit(images)
    blob = pickle.dumps(t)
    assert len(blob) < 50_000, "the weights must not be pickled"
    restored = pickle.loads(blob)
    np.testing.assert_array_equal(restored.transform(images[:3]), t.transform(images[:3]))
    other = load_backbone("resnet18:none", input_size=32)
    other.fingerprint = "sha256:" + "1" * 64
    monkeypatch.setattr(transformer_module, "_shared_backbone", lambda *a: other)
    with pytest.raises(FingerprintMismatchError, match="refit"):
        pickle.loads(blob).transform(images[:1])


EXPECTED_FAILED_CHECKS = {
    # CNNCodes consumes images (uint8 (N, H, W, C), paths or PIL images), not 2-D feature matrices; the checks that
    # feed it random float matrices do not apply.
}


@parametrize_with_checks([CNNCodes(**SPEC, device="cpu")], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def test_a_damaged_cache_entry_is_recomputed_not_fatal(data, tmp_path):
    images, labels = data
    codes = CNNCodes(**SPEC, device="cpu", memory=str(tmp_path))
    first = codes.fit(images).transform(images)
    entries = sorted(tmp_path.rglob("*.npy"))
    assert len(entries) == len(images)
    entries[0].write_bytes(entries[0].read_bytes()[:40])  # truncated by a kill mid-write
    entries[1].write_bytes(b"not an array")
    np.testing.assert_array_equal(codes.transform(images), first)
    np.testing.assert_array_equal(codes.transform(images), first)  # and the repaired entries are read back
