"""The axis-label algebra and layout-aware pooling, on hand-built networks whose layouts are known by construction."""

import pytest
import torch
from torch import nn

from cnncodes import CodeExtractor, Preprocessing, list_taps, load_backbone
from cnncodes.errors import PoolingError
from cnncodes.network import Pooling, parse_poolings
from cnncodes.network._layout import AxisLabels, Layout


def test_labels_follow_permute_flatten_and_class_token_concat():
    x = AxisLabels.image()  # (N, C, H, W)
    assert x.permute([0, 2, 3, 1]).layout() == Layout("nhwc")
    tokens = x.flatten((2, 8, 4, 4), 2, -1).transpose(1, 2)  # (N, HW, C), as a ViT patch embedding does
    assert tokens.layout() == Layout("tokens", 0, (4, 4))
    with_cls = tokens.concat(1, sizes_before=1)
    assert with_cls.layout() == Layout("tokens", 1, (4, 4))
    assert with_cls.index((slice(None), 0), (2, 17, 8)).layout() == Layout("vector")  # x[:, 0]
    assert with_cls.index((slice(None), slice(1, None)), (2, 17, 8)).layout() == Layout("tokens", 0, (4, 4))
    assert with_cls.reduce([1], keepdim=False).layout() == Layout("vector")


def test_reshape_alignment_recovers_a_patch_merge_and_refuses_windows():
    nhwc = AxisLabels(("N", "H", "W", "C"))
    merged = nhwc.reshape((2, 8, 8, 4), (2, 4, 2, 4, 2, 4)).permute([0, 1, 3, 4, 2, 5])
    assert merged.flatten((2, 4, 4, 2, 2, 4), 3, -1).layout() == Layout("nhwc")  # Swin's patch merging
    windows = nhwc.reshape((2, 8, 8, 4), (2, 2, 4, 2, 4, 4)).permute([0, 1, 3, 2, 4, 5])
    assert windows.reshape((2, 2, 2, 4, 4, 4), (8, 4, 4, 4)).layout() is None  # batch merged with windows
    assert AxisLabels.image().flatten((2, 8, 4, 4), 1, -1).layout() == Layout("vector")


class ChannelsLast(nn.Module):
    """ConvNeXt-style: conv, permute to (B, H, W, C), LayerNorm + Linear over channels, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 4, stride=4)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.fc(self.norm(x))  # (B, 4, 4, 10): 10 channels, 4x4 positions
        return self.head(x.mean((1, 2)))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.reg = nn.Parameter(torch.randn(1, 2, dim))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(3))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.reg.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x[:, 0])


PRE = Preprocessing(input_size=32, resize_size=32)


@pytest.mark.parametrize("mode", ["fx", "hooks"])
def test_channels_last_tap_pools_positions_not_channels(mode):
    torch.manual_seed(0)
    bb = load_backbone(ChannelsLast(), preprocessing=PRE)
    cat = list_taps(bb, mode=mode)
    name = "fc"
    assert cat[name].layout == Layout("nhwc") and cat[name].shape == (8, 8, 10)
    assert cat[name].code_dims("avg") == 10 and cat[name].code_dims("avg2") == 40
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        codes = CodeExtractor(bb, name, "avg,avg2,none", relu="never", catalogue=cat)(x)[name]
        ref = bb.model.fc(bb.model.norm(bb.model.conv(x).permute(0, 2, 3, 1)))
    torch.testing.assert_close(codes["avg"], ref.mean((1, 2)))
    quadrants = ref.reshape(3, 2, 4, 2, 4, 10).mean((2, 4)).permute(0, 3, 1, 2).flatten(1)  # channel-major grid
    torch.testing.assert_close(codes["avg2"], quadrants)
    torch.testing.assert_close(codes["none"], ref.flatten(1))


def test_token_tap_knows_its_prefix_tokens_and_patch_grid():
    torch.manual_seed(0)
    bb = load_backbone(TinyViT(), preprocessing=PRE)
    cat = list_taps(bb)
    assert cat.stage_source == "blocks" and len(cat.stage_taps) == 3
    tap = cat.stage_taps[-1]
    assert tap.layout == Layout("tokens", 3, (4, 4)) and tap.shape == (19, 8)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        codes = CodeExtractor(bb, tap.name, "cls,mean,avg,max,avg2,none", relu="never", catalogue=cat)(x)[tap.name]
        m = bb.model
        t = m.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([m.cls.expand(2, -1, -1), m.reg.expand(2, -1, -1), t], 1)
        for block in m.blocks:
            t = t + block(t)
    torch.testing.assert_close(codes["cls"], t[:, 0])
    torch.testing.assert_close(codes["mean"], t[:, 3:].mean(1))
    torch.testing.assert_close(codes["avg"], t[:, 3:].mean(1))
    torch.testing.assert_close(codes["max"], t[:, 3:].amax(1))
    grid = t[:, 3:].reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(codes["avg2"], grid.reshape(2, 8, 2, 2, 2, 2).mean((3, 5)).flatten(1))
    torch.testing.assert_close(codes["none"], t.flatten(1))


def test_token_poolings_are_refused_where_they_do_not_apply(tiny_backbone):
    with pytest.raises(PoolingError, match="cls.*token tap"):
        CodeExtractor(tiny_backbone, "stages", "avg,cls")
    with pytest.raises(PoolingError, match="patch grid"):
        Pooling("avg", 2).check(Layout("tokens", 1, None))
    Pooling("avg", 2).check(Layout("tokens", 1, (2, 2)))


def test_vector_taps_give_the_vector_for_every_spatial_pooling():
    v = torch.randn(2, 7)
    for p in parse_poolings("avg,max,avg2,none,mean"):
        assert p.dims((7,), Layout("vector")) == 7
        torch.testing.assert_close(p(v, Layout("vector")), v)
