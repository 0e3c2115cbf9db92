"""The device path without a GPU: mocks of the torch.cuda entry points record which device each call names, the meta
device stands in for a GPU the backbone must not be moved to, and a backbone is used twice."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import cnncodes.network._encode as encode_module
from cnncodes.images import as_source
from cnncodes.network import CodeExtractor, autocast_dtype, default_workers, iter_batches, list_taps, resolve_device
from helpers import TINY_PRE, TinyNet, make_images, make_tiny_backbone


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as seen on a machine with two GPUs whose current device is 0; every device-naming call is logged."""
    calls: list[tuple[str, object]] = []
    current = [0]

    @contextlib.contextmanager
    def device(dev):
        calls.append(("device", torch.device(dev)))
        saved, current[0] = current[0], torch.device(dev).index
        try:
            yield
        finally:
            current[0] = saved

    class Event:
        def record(self, stream):
            calls.append(("record", stream))

        def synchronize(self):
            calls.append(("synchronize", None))

    def bf16(including_emulation=True):
        calls.append(("bf16", (current[0], including_emulation)))
        return True

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(cuda, "device", device)
    monkeypatch.setattr(cuda, "Event", Event)
    monkeypatch.setattr(cuda, "current_stream", lambda dev=None: ("stream of", torch.device(dev) if dev else None))
    monkeypatch.setattr(cuda, "is_bf16_supported", bf16)
    return calls


def test_a_bare_cuda_resolves_to_an_indexed_device(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(Exception, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_the_bf16_question_is_asked_of_the_gpu_in_use_without_emulation(two_gpus):
    assert autocast_dtype(torch.device("cuda", 1), amp=True) is torch.bfloat16
    assert ("bf16", (1, False)) in two_gpus  # asked with cuda:1 current, emulation not counted
    assert autocast_dtype(torch.device("cuda", 1), amp=False) is None
    assert autocast_dtype(torch.device("cpu"), amp=True) is None


def test_a_batch_fence_records_and_waits_on_its_own_device_stream(two_gpus):
    fence = encode_module._Fence(torch.device("cuda", 1))
    fence.wait()
    assert two_gpus == [("record", ("stream of", torch.device("cuda", 1))), ("synchronize", None)]


def test_without_amp_cuda_runs_ieee_float32_and_the_setting_is_restored():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with encode_module.precision(torch.device("cuda", 0), None):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with encode_module.precision(torch.device("cpu"), None):
        assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_discovery_and_the_device_copy_leave_the_callers_backbone_where_it_is():
    backbone = make_tiny_backbone()
    params = {n: (p.device, p.stride(), p.data_ptr()) for n, p in backbone.model.named_parameters()}
    extractor = CodeExtractor(backbone, "stages", "avg")
    on_meta = extractor.on(torch.device("meta"))
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    assert extractor.on(torch.device("meta")) is on_meta  # made once per device
    assert {n: (p.device, p.stride(), p.data_ptr()) for n, p in backbone.model.named_parameters()} == params
    assert all(p.device.type == "cpu" for p in extractor.net.parameters())
    # the next discovery still runs on the caller's (CPU) backbone
    assert [t.name for t in list_taps(backbone).taps] == [t.name for t in extractor.catalogue.taps]


def test_a_module_already_on_another_device_is_probed_there():
    on_cpu = list_taps(TinyNet(), input_size=TINY_PRE.input_size)
    on_meta = list_taps(TinyNet().to("meta"), input_size=TINY_PRE.input_size)  # a CPU probe input would crash here
    assert [(t.name, t.shape) for t in on_meta.taps] == [(t.name, t.shape) for t in on_cpu.taps]


def test_a_backbone_used_twice_gives_the_same_codes_and_is_not_changed(tmp_path):
    import cnncodes

    images, labels = make_images(12)
    backbone = make_tiny_backbone()
    strides = {n: p.stride() for n, p in backbone.model.named_parameters()}
    kw = dict(labels=labels, model=backbone, poolings="avg,avg2", batch_size=4, workers=0, progress=False)
    first = cnncodes.extract(images, out=tmp_path / "a", **kw)
    second = cnncodes.extract(images, out=tmp_path / "b", **kw)
    for key in first.keys():
        np.testing.assert_array_equal(first.codes(*key), second.codes(*key))
    assert {n: p.stride() for n, p in backbone.model.named_parameters()} == strides  # not made channels_last


def test_batch_i_is_collected_after_batch_i_plus_one_is_launched():
    backbone = make_tiny_backbone()
    extractor = CodeExtractor(backbone, "stages", "avg")
    events: list[str] = []
    net = extractor.on(torch.device("cpu"))
    net.register_forward_pre_hook(lambda m, a: events.append("launch"))
    images, _ = make_images(12)
    for _ in iter_batches(extractor, as_source(images), TINY_PRE, dev=torch.device("cpu"), batch_size=4, workers=0):
        events.append("collect")
    assert events == ["launch", "launch", "collect", "launch", "collect", "collect"]


def test_an_error_in_the_next_batch_hands_over_the_batch_already_computed():
    backbone = make_tiny_backbone()
    extractor = CodeExtractor(backbone, "stages", "avg")
    launched = [0]

    def fail_second(module, args):
        launched[0] += 1
        if launched[0] == 2:
            raise KeyboardInterrupt

    extractor.on(torch.device("cpu")).register_forward_pre_hook(fail_second)
    images, _ = make_images(12)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for b in iter_batches(extractor, as_source(images), TINY_PRE, dev=torch.device("cpu"), batch_size=4, workers=0):
            got.append(b.index)
    assert got == [[0, 1, 2, 3]]


def test_decode_workers_are_shared_by_the_processes_of_a_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers(cuda) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers(cuda) == 4
    assert default_workers(cuda, processes=8) == 2
    assert default_workers(torch.device("cpu"), processes=1) == 4
    assert default_workers(torch.device("cpu"), processes=4) == 0  # 4 cores each: the forward needs them


def test_the_device_copy_follows_the_callers_weights_and_always_runs_in_eval_mode():
    from cnncodes.network import encode

    backbone = make_tiny_backbone()
    extractor = CodeExtractor(backbone, "stages", "avg")
    images = as_source(make_images(8)[0])

    def codes(ex, batch=8):
        return encode(images, ex, TINY_PRE, device="cpu", workers=0, batch_size=batch)[0]

    before = codes(extractor)
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in backbone.model.state_dict().items()}
    backbone.model.load_state_dict(state)  # the caller changes the weights after building the extractor
    after = codes(extractor)
    fresh = codes(CodeExtractor(backbone, "stages", "avg"))
    for key in before:
        assert not np.allclose(before[key], after[key])
        np.testing.assert_array_equal(after[key], fresh[key])
    backbone.model.train()  # and switches it to training mode: codes must not depend on the batch
    for key, value in codes(extractor, batch=2).items():
        np.testing.assert_allclose(value, fresh[key], rtol=1e-5, atol=1e-6)
