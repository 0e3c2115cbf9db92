"""Model families beyond the demo: the stage taps are each family's own stage outputs, read along the right axes.

Random weights and tiny inputs; codes are compared with torchvision's and timm's own feature extraction.
"""

import pytest
import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from cnncodes import CodeExtractor, list_taps, load_backbone

pytestmark = pytest.mark.slow  # builds dozens of real architectures

# torchvision model -> (input size, the modules whose outputs are its stages, in order, and their channels)
TORCHVISION = {
    "resnet50": (64, ["relu", "layer1", "layer2", "layer3", "layer4"], [64, 256, 512, 1024, 2048]),
    "convnext_tiny": (64, ["features.1", "features.3", "features.5", "features.7"], [96, 192, 384, 768]),
    "vgg16": (64, ["features.3", "features.8", "features.15", "features.22", "features.29", "features.30", "classifier.1",
                   "classifier.4"], [64, 128, 256, 512, 512, 512, 4096, 4096]),
    "alexnet": (96, ["features.1", "features.4", "features.11", "features.12", "classifier.2", "classifier.5"],
                [64, 192, 256, 256, 4096, 4096]),
    "efficientnet_b0": (64, ["features.1", "features.2", "features.3", "features.5", "features.8"], [16, 24, 40, 112, 1280]),
    "mobilenet_v3_large": (64, ["features.1", "features.3", "features.6", "features.12", "features.16", "classifier.1"],
                           [16, 24, 40, 112, 960, 1280]),
    "densenet121": (64, ["features.relu0", "features.denseblock1", "features.denseblock2", "features.denseblock3", "relu"],
                    [64, 256, 512, 1024, 1024]),
    "regnet_y_400mf": (64, ["stem", "trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"],
                       [32, 48, 104, 208, 440]),
    "swin_t": (64, ["features.1", "features.3", "features.5", "permute"], [96, 192, 384, 768]),
    "vit_b_16": (32, [f"encoder.layers.encoder_layer_{i}" for i in range(12)], [768] * 12),
}  # fmt: skip


def _reference_avg(out: torch.Tensor, layout_kind: str, prefix: int) -> torch.Tensor:
    """The mean over positions, written out per layout."""
    if layout_kind == "nchw":
        return out.mean((2, 3))
    if layout_kind == "nhwc":
        return out.mean((1, 2))
    if layout_kind == "tokens":
        return out[:, prefix:].mean(1)
    return out


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_stage_taps_are_block_outputs_and_equal_torchvisions_extractor(name):
    size, modules, channels = TORCHVISION[name]
    bb = load_backbone(f"{name}:none", input_size=size)
    cat = list_taps(bb)
    stages = cat.stage_taps
    assert [t.layout.channels(t.shape) for t in stages] == channels
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    reference = create_feature_extractor(bb.model, return_nodes={m: m for m in modules})
    with torch.inference_mode():
        ours = CodeExtractor(bb, [t.name for t in stages], "avg,none", relu="never", catalogue=cat)(x)
        theirs = reference(x)
    for tap, module in zip(stages, modules):
        torch.testing.assert_close(
            ours[tap.name]["none"], theirs[module].flatten(1), msg=f"{name}: {tap.name} vs {module}"
        )
        want = _reference_avg(theirs[module], tap.layout.kind, tap.layout.prefix)
        torch.testing.assert_close(ours[tap.name]["avg"], want, msg=f"{name}: avg of {tap.name} ({tap.layout.kind})")


def test_hidden_fc_codes_are_stage_taps_and_channels_last_and_token_layouts_are_found():
    assert any(
        t.layout.kind == "vector" and t.shape == (4096,)
        for t in list_taps(load_backbone("alexnet:none", input_size=96)).stage_taps
    )
    swin = list_taps(load_backbone("swin_t:none", input_size=64))
    assert [t.layout.kind for t in swin.stage_taps[:3]] == ["nhwc"] * 3
    vit = list_taps(load_backbone("vit_b_16:none", input_size=32))
    assert {t.layout.kind for t in vit.stage_taps} == {"tokens"} and vit.stage_taps[0].layout.prefix == 1
    assert vit.stage_taps[0].layout.grid == (2, 2)


# timm model -> input size; stage taps must match feature_info, codes must equal forward_intermediates
TIMM = {
    "convnext_atto": 64,
    "resnet18": 64,
    "vit_tiny_patch16_224": 32,
    "efficientnet_b0": 64,
    "swin_tiny_patch4_window7_224": 64,
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_stage_taps_follow_feature_info_and_equal_forward_intermediates(name):
    size = TIMM[name]
    bb = load_backbone(f"timm:{name}:none", input_size=size)
    cat = list_taps(bb)
    info = bb.model.feature_info
    assert cat.stage_source == "feature_info"
    assert [t.layout.channels(t.shape) for t in cat.stage_taps] == [f["num_chs"] for f in info]
    assert [t.code_dims("avg") for t in cat.stage_taps] == [f["num_chs"] for f in info]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = CodeExtractor(bb, [t.name for t in cat.stage_taps], "avg,avg2", relu="never", catalogue=cat)(x)
        _, inter = bb.model.forward_intermediates(x, indices=len(info), output_fmt="NCHW", intermediates_only=False)
    for tap, fmap in zip(cat.stage_taps, inter):  # timm returns every stage as an NCHW map (patch tokens as a grid)
        torch.testing.assert_close(ours[tap.name]["avg"], fmap.mean((2, 3)), msg=f"{name}: {tap.name}")
        torch.testing.assert_close(ours[tap.name]["avg2"], torch.nn.functional.adaptive_avg_pool2d(fmap, 2).flatten(1))


def test_timm_vit_num_prefix_tokens_agrees_with_the_graph():
    bb = load_backbone("timm:vit_tiny_patch16_224:none", input_size=32)
    cat = list_taps(bb)
    assert {t.layout.prefix for t in cat.stage_taps} == {bb.model.num_prefix_tokens}


def test_cli_layers_json_lists_one_stage_tap_per_convnext_stage(capsys):
    import json

    from cnncodes.cli import main

    assert main(["layers", "timm:convnext_tiny:none", "--input-size", "64", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    stages = [t for t in listed["taps"] if t["stage_tap"]]
    assert [t["dims"]["avg"] for t in stages] == [96, 192, 384, 768]
    assert all(t["layout"]["kind"] == "nchw" for t in stages)


def test_model_spec_forms_users_write(monkeypatch):
    from cnncodes.network._backbones import _parse_spec

    assert _parse_spec("timm:hf-hub:timm/convnext_tiny.fb_in22k") == (
        "timm",
        "hf-hub:timm/convnext_tiny.fb_in22k",
        None,
    )
    assert _parse_spec("timm:hf-hub:timm/convnext_tiny.fb_in22k:none")[2] == "none"
    assert load_backbone("timm:resnet18.a1_in1k:none", input_size=32).model.feature_info[-1]["num_chs"] == 512
    called = {}

    def fake_get_model(name, weights=None, **kwargs):
        called.update(name=name, weights=weights)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    monkeypatch.setattr("cnncodes.network._backbones._fail_if_unreachable", lambda *a: None)
    with pytest.raises(RuntimeError, match="stop here"):
        load_backbone("ResNet50_Weights.IMAGENET1K_V2")
    assert called["name"] == "resnet50" and called["weights"] == torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert timm.__version__  # timm's registry resolved the tag above
