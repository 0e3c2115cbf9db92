import socket

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnncodes import ParameterError, Preprocessing, TapSelectionError, list_taps, load_backbone
from cnncodes.network import architecture_of, forward_flops, measure_latency, tap_costs
from helpers import make_tiny_backbone


def whole_model_flops(model: nn.Module, size: int) -> int:
    """Independent route: FlopCounterMode around the plain forward of the whole model."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


class TwoConvs(nn.Module):
    """conv (3 -> 4, k=3, no padding) -> ReLU -> conv (4 -> 6, k=1): costs a reader can work out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.second = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.first(x)))


class FunctionalParameter(nn.Module):
    """A parameter used in forward directly (as a ViT's pos_embed), not through a submodule."""

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.traceable = traceable
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 4, 8, 8))
        self.act = nn.ReLU()
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if not self.traceable and x.mean() > -1e9:  # data-dependent control flow: FX fails, the hooks route runs
            x = x * 1.0
        return self.out(self.act(x + self.pos))


def small(model: nn.Module, size: int):
    torch.manual_seed(0)
    return load_backbone(model, preprocessing=Preprocessing(input_size=size, resize_size=size))


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_backbone()


@pytest.fixture(scope="module")
def resnet():
    return load_backbone("resnet18:none", input_size=64)


@pytest.mark.slow
def test_output_tap_costs_the_whole_model(tiny, resnet):
    for backbone, last in ((tiny, "head"), (resnet, "fc")):
        assert list_taps(backbone).names[-1] == last
        cost = tap_costs(backbone, [last])[(last,)]
        assert cost.flops == whole_model_flops(backbone.model, backbone.preprocessing.input_size) > 0
        assert cost.params == sum(p.numel() for p in backbone.model.parameters())
        assert cost.to_dict() == {"taps": [last], "flops": cost.flops, "params": cost.params}


def test_costs_grow_along_forward_order_and_a_joined_candidate_costs_its_deepest_part(tiny):
    names = list_taps(tiny).names
    costs = tap_costs(tiny, names)
    assert list(costs) == [(n,) for n in names]
    flops, params = [costs[(n,)].flops for n in names], [costs[(n,)].params for n in names]
    assert flops == sorted(flops) and params == sorted(params)
    assert flops[0] < flops[-1] and params[0] < params[-1]
    joined = tap_costs(tiny, [("relu", "down"), ["down"]])
    assert joined[("relu", "down")].flops == joined[("down",)].flops == costs[("down",)].flops
    assert joined[("relu", "down")].params == costs[("down",)].params


def test_hand_counted_convolution():
    backbone = small(TwoConvs(), 10)
    costs = tap_costs(backbone, ["first", "act", "second"])
    h_out = 10 - 3 + 1  # no padding, stride 1
    first = 2 * 3 * 4 * 3 * 3 * h_out * h_out  # FlopCounterMode: 2 FLOPs per multiply-add, the bias is free
    assert costs[("first",)].flops == costs[("act",)].flops == first == 13824
    assert costs[("first",)].params == costs[("act",)].params == 4 * 3 * 3 * 3 + 4
    assert costs[("second",)].flops == first + 2 * 4 * 6 * h_out * h_out
    assert costs[("second",)].params == 4 * 3 * 3 * 3 + 4 + 6 * 4 + 6


@pytest.mark.parametrize("traceable", [True, False])
def test_a_parameter_used_functionally_counts_once_it_runs(traceable):
    backbone = small(FunctionalParameter(traceable), 8)
    catalogue = list_taps(backbone)
    assert catalogue.mode == ("fx" if traceable else "hooks")
    above = "act" if traceable else "out"  # hooks cannot lay out an output fed by a functional sum
    costs = tap_costs(backbone, ["conv", above])
    conv, out = 4 * 3 * 3 * 3 + 4, (4 * 2 + 2 if above == "out" else 0)
    assert costs[("conv",)].params == conv  # the forward stops before the sum reads `pos`
    assert costs[(above,)].params == conv + 4 * 8 * 8 + out
    assert costs[("conv",)].flops == 2 * 3 * 4 * 9 * 8 * 8
    assert costs[(above,)].flops == 2 * 3 * 4 * 9 * 8 * 8 + (2 * 4 * 2 * 8 * 8 if above == "out" else 0)


def test_latency_is_positive_and_the_callers_model_is_left_as_found(tiny):
    model = tiny.model
    model.train()
    model.head.weight.requires_grad_(True)
    try:
        before = [(m.training, [(p.device, p.requires_grad, p.stride()) for p in m.parameters(recurse=False)])
                  for m in model.modules()]  # fmt: skip
        costs = tap_costs(tiny, ["act", ("relu_1", "head")])
        times = measure_latency(tiny, ["act", ("relu_1", "head")], batch_sizes=(1, 4), repeats=2)
        after = [(m.training, [(p.device, p.requires_grad, p.stride()) for p in m.parameters(recurse=False)])
                 for m in model.modules()]  # fmt: skip
        assert after == before
    finally:
        model.eval()
        model.head.weight.requires_grad_(False)
    assert set(times) == set(costs) == {("act",), ("relu_1", "head")}
    for entry in times:
        assert set(times[entry]) == {1, 4} and all(ms > 0 for ms in times[entry].values())
        assert times.repeats[entry] == {1: 2, 4: 2}
    assert times.seconds > 0


def test_a_spent_budget_runs_one_repeat_per_cell(tiny):
    times = measure_latency(tiny, ["relu", "head"], batch_sizes=(2,), repeats=50, budget_s=1e-6)
    assert times.repeats == {("relu",): {2: 1}, ("head",): {2: 1}}
    assert all(ms > 0 for per in times.values() for ms in per.values())


def test_bad_candidates_say_what_to_pass(tiny):
    with pytest.raises(TapSelectionError, match="Close matches"):
        tap_costs(tiny, ["hed"])
    with pytest.raises(ParameterError, match="one string"):
        tap_costs(tiny, "head")
    with pytest.raises(ParameterError, match="batch_sizes"):
        measure_latency(tiny, ["head"], batch_sizes=(0,))


def test_forward_flops_counts_a_whole_module_and_restores_its_mode():
    top = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    assert forward_flops(top, torch.zeros(1, 4)) == 2 * 4 * 3
    assert top.training and top[1].training


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test of offline builds")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.slow
def test_architecture_of_builds_random_weights_offline(offline):
    for spec in ("resnet18", "resnet18:IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        backbone = architecture_of(spec)
        assert (backbone.spec, backbone.weights, backbone.preprocessing.input_size) == ("resnet18:none", "none", 224)
    assert architecture_of("resnet18:IMAGENET1K_V1", 64).preprocessing.input_size == 64
    one = architecture_of("efficientnet_b1:IMAGENET1K_V1")  # its weights were made for 240 px
    assert (one.spec, one.preprocessing.input_size) == ("efficientnet_b1:none", 240)
    for spec in ("timm:resnet18.a1_in1k", "timm:resnet18.a1_in1k:none", "timm:hf-hub:timm/resnet18.a1_in1k"):
        backbone = architecture_of(spec, 64)
        assert (backbone.spec, backbone.weights) == ("timm:resnet18.a1_in1k:none", "none")
    assert architecture_of("module:TinyNet") is None
    assert architecture_of("timm:hf-hub:someone/custom-net") is None


@pytest.mark.slow
def test_architecture_of_lite0_has_the_real_specs_taps(offline):
    built = list_taps(architecture_of("efficientnet_lite0", 96))
    real = list_taps(load_backbone("efficientnet_lite0", input_size=96))
    assert [(t.name, t.shape) for t in built] == [(t.name, t.shape) for t in real]
