"""Residual sums written in place: the tapped graph gives the codes the hooks route gives, a tapped operand is never
overwritten, and the in-place add falls back to ``a + b`` whenever the two could differ."""

import json
import operator
import subprocess
import sys
import warnings

import pytest
import torch

from cnncodes.network import CodeExtractor, list_taps, load_backbone
from cnncodes.network._graph import _add_into
from helpers import make_tiny_backbone


def _sum_targets(extractor):
    return [n.target for n in extractor.net.graph.nodes if n.name.startswith("add")]


@pytest.mark.parametrize("taps", ["stages", "conv_b,relu_2,act", "relu,act"])
def test_in_place_sums_give_the_codes_of_the_hooks_route(taps):
    backbone = make_tiny_backbone()
    fx = CodeExtractor(backbone, taps, "avg,none", relu="never")  # the routes may differ on what "auto" rectifies
    hooks = CodeExtractor(backbone, taps, "avg,none", relu="never", catalogue=list_taps(backbone, mode="hooks"))
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, expected = fx(x), hooks(x)
    for tap in expected:
        for pooling in expected[tap]:
            assert torch.equal(got[tap][pooling], expected[tap][pooling]), (tap, pooling)
    # conv_b + relu is summed into conv_b's output, unless conv_b is tapped: its tap must see the value before the sum
    assert _sum_targets(fx) == [operator.add if "conv_b" in taps else _add_into]


def test_the_callers_module_keeps_its_forward():
    backbone = make_tiny_backbone()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = backbone.model(x)
        CodeExtractor(backbone, "stages", "avg")(x)
        assert torch.equal(backbone.model(x), before)


def test_add_into_writes_in_place_only_when_a_plus_b_has_the_layout_of_a():
    a = torch.randn(2, 3, 4, 4)
    b = torch.randn(2, 3, 4, 4)
    expected = a + b
    out = _add_into(a, b)
    assert out is a and torch.equal(out, expected)

    for other in (torch.randn(1, 3, 1, 1), b.double(), b.contiguous(memory_format=torch.channels_last), 2.0):
        a = torch.randn(2, 3, 4, 4)
        kept = a.clone()
        out = _add_into(a, other)
        assert out is not a and torch.equal(a, kept) and torch.equal(out, kept + other)

    a = torch.randn(2, 3, requires_grad=True) * 1  # a non-leaf that autograd may need
    out = _add_into(a, torch.ones(2, 3))
    assert out is not a
    out.sum().backward()  # no "modified by an inplace operation" error


def test_a_traced_extractor_records_plain_sums_without_tracer_warnings():
    extractor = CodeExtractor(make_tiny_backbone(), "stages", "avg")
    taps = [t.name for t in extractor.taps]

    class Flat(torch.nn.Module):  # what the exporters see: a tensor-out module around the extractor's network
        def __init__(self):
            super().__init__()
            self.net = extractor.net

        def forward(self, x):
            codes = self.net(x)
            return tuple(codes[t]["avg"] for t in taps)

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript
        traced = torch.jit.trace(Flat(), torch.randn(2, 3, 32, 32))
    y = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        expected, got = extractor(y), traced(y)
    for tap, codes in zip(taps, got):
        assert torch.equal(codes, expected[tap]["avg"])


NAMES_WITHOUT_TIMM = """
import json, sys
from cnncodes.network import list_taps, load_backbone
catalogue = list_taps(load_backbone("resnet18:none"), input_size=64)
print(json.dumps({"timm": "timm" in sys.modules, "taps": [[t.name, list(t.shape)] for t in catalogue.taps]}))
"""


@pytest.mark.slow
def test_a_torchvision_model_is_traced_without_importing_timm_and_gets_the_same_taps():
    import timm  # noqa: F401 - in this process the taps come from timm's tracing wrappers

    done = subprocess.run([sys.executable, "-c", NAMES_WITHOUT_TIMM], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    assert found["timm"] is False
    catalogue = list_taps(load_backbone("resnet18:none"), input_size=64)
    assert found["taps"] == [[t.name, list(t.shape)] for t in catalogue.taps]
