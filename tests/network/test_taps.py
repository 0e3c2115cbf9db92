import pytest
import torch
import torchvision
from torch import nn

from cnncodes import CodeExtractor, Preprocessing, TapSelectionError, list_taps, load_backbone
from helpers import make_tiny_backbone


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


def test_stage_taps_are_the_block_outputs_after_the_residual_add_and_its_relu(resnet):
    cat = list_taps(resnet)
    assert cat.mode == "fx" and cat.stage_source == "resolution"
    assert [t.name for t in cat.stage_taps] == [
        "relu",
        "layer1.1.relu_1",
        "layer2.1.relu_1",
        "layer3.1.relu_1",
        "layer4.1.relu_1",
    ]
    assert all(t.main_path and t.rectified for t in cat.stage_taps)
    assert not cat["layer1.0.conv1"].main_path and not cat["layer2.0.downsample.1"].main_path  # inside branches
    assert cat["layer2.0.add"].shape == (128, 8, 8) and cat["layer2.0.add"].main_path
    assert [t.name for t in cat.select("last:2")] == ["layer3.1.relu_1", "layer4.1.relu_1"]


def test_thresholded_means_the_network_passes_it_through_a_relu(resnet):
    cat = list_taps(resnet)
    assert cat["layer1.0.bn1"].thresholded and not cat["layer1.0.bn1"].rectified  # feeds relu
    assert cat["layer1.0.add"].thresholded  # the residual sum feeds relu
    assert not cat["layer1.0.bn2"].thresholded  # feeds the add: a raw residual-branch value
    assert not cat["fc"].thresholded and cat["fc"].layout.kind == "vector"  # logits stay raw
    assert {t.name for t in cat.select("rectified")} >= {"layer1.0.bn1", "layer1.0.relu", "layer1.0.add"}


@pytest.mark.slow
def test_lite0_stages_follow_its_feature_info_and_expanded_keeps_the_inner_activations():
    cat = list_taps(load_backbone(input_size=64))
    assert cat.stage_source == "feature_info"
    assert [t.layout.channels(t.shape) for t in cat.stage_taps] == [16, 24, 40, 112, 320]
    assert [t.name for t in cat.select("expanded")] == [
        "blocks.1.0.bn1",
        "blocks.2.0.bn1",
        "blocks.3.0.bn1",
        "blocks.5.0.bn1",
        "bn2",
    ]
    assert all(t.rectified for t in cat.expanded_taps)  # BatchNormAct2d with ReLU6
    block_out = cat["blocks.5.1.bn3"]  # linear projection of an MBConv block: not thresholded
    assert not block_out.thresholded and not block_out.post_activation
    assert block_out.code_dims("avg2") == 4 * 192


@pytest.mark.slow
def test_relu_modes_auto_always_never(resnet):
    x = torch.randn(2, 3, 64, 64)
    taps = "layer1.0.bn1,layer1.0.bn2,layer1.0.relu"
    with torch.inference_mode():
        codes = {m: CodeExtractor(resnet, taps, "none", relu=m) for m in ("auto", "always", "never")}
        out = {m: ex(x) for m, ex in codes.items()}
    assert codes["auto"].relu_applied == {"layer1.0.bn1": True, "layer1.0.bn2": False, "layer1.0.relu": False}
    assert codes["always"].relu_applied == {"layer1.0.bn1": True, "layer1.0.bn2": True, "layer1.0.relu": False}
    assert not any(codes["never"].relu_applied.values())
    raw = out["never"]
    torch.testing.assert_close(out["auto"]["layer1.0.bn1"]["none"], raw["layer1.0.bn1"]["none"].clamp_min(0))
    torch.testing.assert_close(out["auto"]["layer1.0.bn2"]["none"], raw["layer1.0.bn2"]["none"])
    assert (raw["layer1.0.bn2"]["none"] < 0).any()
    torch.testing.assert_close(out["always"]["layer1.0.bn2"]["none"], raw["layer1.0.bn2"]["none"].clamp_min(0))
    torch.testing.assert_close(out["auto"]["layer1.0.bn1"]["none"], out["auto"]["layer1.0.relu"]["none"])  # relu(bn1)
    with pytest.raises(ValueError, match="auto"):
        CodeExtractor(resnet, taps, "avg", relu="sometimes")


def test_selection_errors_name_close_matches_and_the_fix(resnet):
    cat = list_taps(resnet)
    with pytest.raises(TapSelectionError, match=r"layer3\.1\.relu_1.*cnncodes layers"):
        cat.select("layer3.1.relu_2")
    with pytest.raises(TapSelectionError, match=r"1 to 5"):
        cat.select("last:7")
    assert [t.name for t in cat.select("layer4.1.relu_1,relu,relu")] == ["relu", "layer4.1.relu_1"]


def test_forward_stops_after_the_deepest_tap(resnet):
    extractors = {
        m: CodeExtractor(resnet, "layer1.0.relu_1", "avg", catalogue=list_taps(resnet, mode=m)) for m in ("fx", "hooks")
    }
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
    assert cat["conv"].thresholded and not cat["conv"].rectified and cat["relu"].rectified  # seen by tensor identity
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(CodeExtractor(bb, "relu", "avg")(x)["relu"]["avg"], bb.model(x).mean((2, 3)))


def test_a_1x1_last_stage_is_kept_and_its_global_pool_is_not_a_stage():
    cat = list_taps(load_backbone("resnet18:none", input_size=32))
    assert [t.name for t in cat.stage_taps][-1] == "layer4.1.relu_1" and cat.stage_taps[-1].shape == (512, 1, 1)
    assert "avgpool" not in {t.name for t in cat.stage_taps}


def test_elementwise_max_keeps_labels_and_a_hardtanh_module_counts_as_relu6():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(3, 8, 3, 2, 1)
            self.act = nn.Hardtanh(0.0, 6.0)
            self.c3 = nn.Conv2d(8, 16, 3, 2, 1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            m = self.act(torch.max(self.c1(x), self.c2(x)))
            return self.fc(self.c3(m).mean((2, 3)))

    cat = list_taps(load_backbone(Net(), preprocessing=Preprocessing(input_size=32, resize_size=32)))
    assert cat["max"].layout.kind == "nchw" and cat["max"].main_path and cat["max"].thresholded
    assert cat["act"].rectified and [t.name for t in cat.stage_taps] == ["act", "c3"]


def test_the_discovery_probe_runs_on_one_cpu_thread_and_restores_the_count():
    backbone = make_tiny_backbone()
    seen = []
    backbone.model.stem.register_forward_pre_hook(lambda m, args: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        list_taps(backbone)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
