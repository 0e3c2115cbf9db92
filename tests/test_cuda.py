"""The CUDA path on a real GPU (marker ``cuda``; skipped where there is none): codes against the CPU's in float32 and
bfloat16, the caller's backbone left in place, two device processes, other device indices, and the probe solvers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cnncodes
from cnncodes.images import as_source
from cnncodes.network import CodeExtractor, encode, load_backbone
from helpers import make_images

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def resnet():
    return load_backbone("resnet18:none", input_size=64)


@pytest.fixture(scope="module")
def pictures():
    images, labels = make_images(40, size=80)
    return images, labels


def _codes(backbone, images, device, amp):
    extractor = CodeExtractor(backbone, "stages", "avg,avg2")
    codes, reasons = encode(as_source(images), extractor, backbone.preprocessing, device=device, amp=amp, workers=0)
    assert not any(reasons)
    return codes


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def test_cuda_codes_match_the_cpu_in_float32_and_closely_in_bfloat16(resnet, pictures):
    images, _ = pictures
    cpu = _codes(resnet, images, "cpu", amp=False)
    fp32 = _codes(resnet, images, "cuda", amp=False)
    amp = _codes(resnet, images, "cuda", amp=True)
    for key in cpu:
        np.testing.assert_allclose(fp32[key], cpu[key], rtol=1e-4, atol=1e-5)  # IEEE float32: TF32 is off
        assert _cosine(amp[key], cpu[key]).min() > 0.995, key


def test_extraction_on_cuda_leaves_the_callers_backbone_on_the_cpu(resnet, pictures, tmp_path):
    images, labels = pictures
    before = {n: (p.device, p.stride()) for n, p in resnet.model.named_parameters()}
    for run in ("a", "b"):  # the same backbone twice
        cnncodes.extract(images, labels=labels, out=tmp_path / run, model=resnet, device="cuda", progress=False)
    assert {n: (p.device, p.stride()) for n, p in resnet.model.named_parameters()} == before
    a, b = cnncodes.CodeStore(tmp_path / "a"), cnncodes.CodeStore(tmp_path / "b")
    for key in a.keys():
        np.testing.assert_array_equal(a.codes(*key), b.codes(*key))
    assert a.manifest["config"]["numerics"]["device"] == "cuda"


def test_a_module_already_on_the_gpu_works(pictures, tmp_path):
    import torchvision

    model = torchvision.models.resnet18().cuda()
    backbone = load_backbone(model, input_size=64)
    images, labels = pictures
    store = cnncodes.extract(images, labels=labels, out=tmp_path / "s", model=backbone, device="cuda", progress=False)
    assert store.rows == len(images)


def test_two_device_processes_equal_one(resnet, pictures, tmp_path):
    images, labels = pictures
    kw = dict(labels=labels, model=resnet, batch_size=8, progress=False)
    one = cnncodes.extract(images, out=tmp_path / "one", device="cuda:0", **kw)
    two = cnncodes.extract(images, out=tmp_path / "two", devices="cuda:0,cuda:0", **kw)
    for key in one.keys():
        np.testing.assert_allclose(two.codes(*key), one.codes(*key), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_codes_on_the_second_gpu_equal_the_firsts(resnet, pictures):
    images, _ = pictures
    first, second = _codes(resnet, images, "cuda:0", amp=True), _codes(resnet, images, "cuda:1", amp=True)
    for key in first:
        np.testing.assert_allclose(second[key], first[key], rtol=1e-2, atol=1e-3)


def test_the_probe_solvers_on_cuda_agree_with_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    ours = cnncodes.TorchLogisticRegression(C=0.1, device="cuda", max_iter=500, tol=1e-6).fit(X, y)
    ref = LogisticRegression(C=0.1, max_iter=2000, tol=1e-8).fit(X, y)
    assert (ours.predict(X) == ref.predict(X)).mean() > 0.99
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)


def test_fine_tuning_on_cuda_learns_what_the_cpu_learns(tmp_path):
    from cnncodes.network import cut_points
    from cnncodes.training import FinetuneConfig, finetune
    from helpers import make_images, make_tiny_backbone

    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(60)
    store = cnncodes.extract(images, labels=labels, out=tmp_path / "s", model=backbone, taps=cut, poolings="none",
                             relu="never", views=1, device="cpu", progress=False)  # fmt: skip
    config = FinetuneConfig(epochs=3, batch_size=8)
    cpu = finetune(store, cut, backbone=backbone, config=config, device="cpu", progress=False)
    gpu = finetune(store, cut, backbone=backbone, config=config, device="cuda", progress=False)  # bf16, channels_last
    assert abs(gpu.val_accuracy - cpu.val_accuracy) <= 0.1
    assert next(gpu.model.parameters()).device.type == "cuda"
