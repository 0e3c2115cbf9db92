import pytest
import torch
import torchvision
from torch import nn

from cnncodes import CodeExtractor, Preprocessing, TapSelectionError, list_taps, load_backbone


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
    return load_backbone(model, preprocessing=Preprocessing(input_size=64, resize_size=64))


def reference_codes(model: nn.Module, x: torch.Tensor, wanted: dict[str, tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Independent route: plain forward hooks that clone the k-th output of a module, on an untouched model copy."""
    calls: dict[str, int] = {}
    out: dict[str, torch.Tensor] = {}
    handles = []
    for tap, (module_name, k) in wanted.items():

        def hook(module, args, output, tap=tap, module_name=module_name, k=k):
            seen = calls.get(tap, 0)
            calls[tap] = seen + 1
            if seen == k:
                out[tap] = output.clone().mean((2, 3))

        handles.append(model.get_submodule(module_name).register_forward_hook(hook))
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_codes_equal_a_plain_forward_despite_inplace_relu_and_reused_modules(resnet):
    x = torch.randn(3, 3, 64, 64)
    wanted = {
        "layer1.0.bn1": ("layer1.0.bn1", 0),  # followed by an in-place ReLU
        "layer1.0.relu": ("layer1.0.relu", 0),
        "layer1.0.relu_1": ("layer1.0.relu", 1),  # second call of the shared self.relu
        "layer3.1.relu_1": ("layer3.1.relu", 1),
    }
    ref = reference_codes(resnet.model, x, wanted)
    with torch.inference_mode():
        for mode in ("fx", "hooks"):
            codes = CodeExtractor(resnet, list(wanted), "avg", relu=False, catalogue=list_taps(resnet, mode=mode))(x)
            for tap in wanted:
                torch.testing.assert_close(codes[tap]["avg"], ref[tap], rtol=0, atol=0, msg=f"{mode} {tap}")
    assert (ref["layer1.0.bn1"] < 0).any(), "the pre-activation tap must keep its negative values"


def test_residual_add_node_equals_manual_block(resnet):
    m = resnet.model
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        b = m.layer1[0]
        manual = (b.bn2(b.conv2(b.relu(b.bn1(b.conv1(stem))))) + stem).flatten(1)
        codes = CodeExtractor(resnet, "layer1.0.add", "none", relu=False)(x)
    torch.testing.assert_close(codes["layer1.0.add"]["none"], manual)


def test_stage_taps_are_last_rectified_points_per_resolution(resnet):
    cat = list_taps(resnet)
    assert cat.mode == "fx"
    assert [t.name for t in cat.stage_taps] == ["relu", "layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"]
    assert all(t.rectified and t.post_activation for t in cat.stage_taps)
    assert not cat["layer1.0.bn1"].rectified and cat["layer1.0.relu"].rectified
    assert cat["layer2.0.add"].shape == (128, 8, 8)
    assert [t.name for t in cat.select("last:2")] == ["layer3.1.relu_1", "layer4.1.relu_1"]


def test_lite0_stage_taps_are_post_activation_expansions():
    cat = list_taps(load_backbone(input_size=64))
    names = [t.name for t in cat.stage_taps]
    assert names == ["blocks.1.0.bn1", "blocks.2.0.bn1", "blocks.3.0.bn1", "blocks.5.0.bn1", "bn2"]
    block_out = cat["blocks.5.1.bn3"]  # linear projection of an MBConv block: not rectified
    assert not block_out.rectified and not block_out.post_activation
    assert block_out.code_dims("avg2") == 4 * 192


def test_selection_errors_name_close_matches_and_the_fix(resnet):
    cat = list_taps(resnet)
    with pytest.raises(TapSelectionError, match=r"layer3\.1\.relu_1.*cnncodes layers"):
        cat.select("layer3.1.relu_2")
    with pytest.raises(TapSelectionError, match=r"1 to 5"):
        cat.select("last:7")
    assert [t.name for t in cat.select("layer4.1.relu_1,relu,relu")] == ["relu", "layer4.1.relu_1"]


def test_forward_stops_after_the_deepest_tap(resnet):
    extractors = {m: CodeExtractor(resnet, "layer1.0.relu_1", "avg", catalogue=list_taps(resnet, mode=m)) for m in ("fx", "hooks")}
    assert "layer2" not in extractors["fx"].net.code
    deeper = []
    handle = resnet.model.layer2.register_forward_hook(lambda *a: deeper.append(1))
    try:
        with torch.inference_mode():
            for ex in extractors.values():
                ex(torch.randn(1, 3, 64, 64))
    finally:
        handle.remove()
    assert deeper == [], "layer2 ran although the deepest tap is in layer1"


def test_relu_is_applied_only_where_the_network_did_not_rectify(resnet):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        rect = CodeExtractor(resnet, "layer1.0.bn1,layer1.0.relu", "avg,none")
        raw = CodeExtractor(resnet, "layer1.0.bn1", "none", relu=False)
        a, b = rect(x), raw(x)
    assert rect.relu_applied == {"layer1.0.bn1": True, "layer1.0.relu": False}
    torch.testing.assert_close(a["layer1.0.bn1"]["none"], b["layer1.0.bn1"]["none"].clamp_min(0))
    torch.testing.assert_close(a["layer1.0.bn1"]["none"], a["layer1.0.relu"]["none"])  # relu(bn1) is the next node


def test_untraceable_model_falls_back_to_hooks():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats FX
                x = -x
            return self.relu(self.conv(x))

    bb = load_backbone(Dynamic(), preprocessing=Preprocessing(input_size=16, resize_size=16))
    cat = list_taps(bb)
    assert cat.mode == "hooks" and [t.name for t in cat.stage_taps] == ["relu"]
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(CodeExtractor(bb, "relu", "avg")(x)["relu"]["avg"], bb.model(x).mean((2, 3)))
