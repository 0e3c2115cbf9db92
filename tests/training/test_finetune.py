"""Training the top on cached activations is the same as freezing the layers below the cut: both routes give the same
losses and weights. Also: the top of a cut reproduces the model, cuts that are not cuts are refused, runs repeat."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cnncodes
from cnncodes.cli import main
from cnncodes.errors import ParameterError, StoreError
from cnncodes.images import as_source
from cnncodes.network import CodeExtractor, cut_points, list_taps, top_above
from cnncodes.training import CachedActivations, FinetuneConfig, LiveActivations, build_model, finetune, train
from helpers import make_images, make_tiny_backbone

VIEWS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A float32 store of the raw activations at a cut, with seeded views: what `cnncodes finetune` reads."""
    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(36)
    store = cnncodes.extract(images, labels=labels, out=tmp_path_factory.mktemp("cache") / "s", model=backbone,
                             taps=cut, poolings="none", relu="never", views=VIEWS, seed=3, dtype="float32",
                             batch_size=6, workers=0, progress=False)  # fmt: skip
    return backbone, cut, images, labels, store


def test_the_top_of_every_cut_reproduces_the_model():
    backbone = make_tiny_backbone()
    catalogue = list_taps(backbone)
    x = torch.randn(3, 3, catalogue.input_size, catalogue.input_size)
    cuts = cut_points(backbone, catalogue)
    assert cuts and {t.name for t in catalogue.select("stages")} <= set(cuts)
    for cut in cuts:
        top = top_above(backbone, cut, catalogue)
        extractor = CodeExtractor(backbone, [cut], "none", relu="never", catalogue=catalogue)
        with torch.no_grad():
            activation = extractor(x)[cut]["none"].reshape(3, *catalogue[cut].shape)
            logits = backbone.model.get_submodule(top.classifier)(top.body.eval()(activation))
            torch.testing.assert_close(logits, backbone.model(x), rtol=0, atol=0)
        assert all(p.requires_grad for p in top.body.parameters())
        assert not any(p.requires_grad for p in backbone.model.parameters())  # the backbone stays frozen


def test_a_tap_inside_a_residual_branch_is_not_a_cut():
    backbone = make_tiny_backbone()
    inside = next(t.name for t in list_taps(backbone).taps if not t.main_path)
    with pytest.raises(ParameterError, match=f"'{inside}' is not a cut .* which bypasses it. Cut at one of"):
        top_above(backbone, inside)


class _Block(torch.nn.Module):
    """conv, batch norm, ReLU, dropout and a residual: what the block and norms recipes must train or freeze."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.relu(self.bn(self.conv(x))))


class _BlockNet(torch.nn.Module):
    """A stem, then stages of blocks (nn.Sequential of nn.Sequential, as ResNets and EfficientNets nest them)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())  # fmt: skip
        self.blocks = torch.nn.Sequential(*(torch.nn.Sequential(_Block(width), _Block(width)) for _ in range(2)))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 3)
        with torch.no_grad():  # batch statistics far from the running ones: train and eval mode differ
            for m in self.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


@pytest.fixture(scope="module")
def blocks_cache(tmp_path_factory):
    """The cache of a network of blocks, cut at the end of its first block."""
    from cnncodes.network import load_backbone
    from helpers import TINY_PRE

    torch.manual_seed(0)
    backbone = load_backbone(_BlockNet(), preprocessing=TINY_PRE)
    cut = next(c for c in cut_points(backbone) if c.startswith("blocks.0.0"))
    images, labels = make_images(36)
    store = cnncodes.extract(images, labels=labels, out=tmp_path_factory.mktemp("blocks") / "s", model=backbone,
                             taps=cut, poolings="none", relu="never", views=VIEWS, seed=3, dtype="float32",
                             batch_size=6, workers=0, progress=False)  # fmt: skip
    return backbone, cut, images, labels, store


def test_each_recipe_trains_its_parameters_and_freezes_the_rest_in_eval_mode(blocks_cache):
    backbone, cut, *_ = blocks_cache
    assert top_above(backbone, cut).block == ("blocks.0.1",)  # the next block of the stage, not the stage
    trained = {}
    for recipe in ("top", "block", "norms", "head"):
        model = build_model(backbone, cut, 3, FinetuneConfig(train=recipe, hidden=4)).train()
        trained[recipe] = set(model.trained_parameters())
        modes = {name: m.training for name, m in model.named_modules() if not list(m.children())}
        if recipe == "block":
            assert {n.rsplit(".", 1)[0] for n in trained[recipe]} == {"body.blocks.0.1.conv", "body.blocks.0.1.bn",
                                                                     "classifier"}  # fmt: skip
            assert modes["body.blocks.0.1.conv"] and modes["body.blocks.0.1.drop"]  # the block trains, dropout on
            assert not modes["body.blocks.0.1.bn"]  # but its batch norm keeps its running statistics
            assert not modes["body.blocks.1.0.bn"] and not modes["body.blocks.1.0.drop"]  # frozen but run
        if recipe == "norms":  # BatchNorm and LayerNorm affine parameters, biases, the classifier; no conv weight
            assert trained[recipe] == {n for n in trained["top"] if ".bn." in n or ".norm." in n or
                                       n.startswith("classifier")}  # fmt: skip
            assert not modes["body.blocks.1.0.bn"] and not modes["body.blocks.1.0.drop"]  # affine trained, stats kept
        x = torch.randn(8, *list_taps(backbone)[cut].shape)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        optimizer = torch.optim.AdamW(model.param_groups(FinetuneConfig(train=recipe)))
        torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 3).backward()
        optimizer.step()  # one step: what the recipe trains moves, nothing else does (running statistics aside)
        for name, value in model.named_parameters():
            moved = not torch.equal(value, before[name])
            assert moved == (name in trained[recipe]), f"{recipe}: {name} {'moved' if moved else 'did not move'}"
        for name, value in model.named_buffers():  # batch norm statistics move only in train-mode modules
            if "running_mean" in name:
                assert (not torch.equal(value, before[name])) == modes[name.rsplit(".", 1)[0]], name
        model.eval()
        assert not any(m.training for m in model.modules())
    assert trained["block"] < trained["top"] and trained["norms"] < trained["top"]
    assert FinetuneConfig(head=True).train == "head" and FinetuneConfig(train="head").head
    with pytest.raises(ParameterError, match="train='layers'; use one of top, block, norms, head"):
        FinetuneConfig(train="layers")
    with pytest.raises(ParameterError, match="head=True and train='norms' disagree"):
        FinetuneConfig(head=True, train="norms")


@pytest.mark.parametrize("recipe", ["top", "block", "norms", "head"])
@pytest.mark.slow
def test_training_on_the_cache_equals_training_with_the_frozen_layers_live(cache, blocks_cache, recipe):
    backbone, cut, images, labels, store = cache if recipe in ("top", "head") else blocks_cache
    config = FinetuneConfig(train=recipe, epochs=3, batch_size=6, hidden=8, patience=5, seed=1)
    fit, val = np.arange(0, 24), np.arange(24, 36)
    runs = {}
    for route in ("cache", "live"):
        if route == "cache":
            feed = CachedActivations(store.codes(cut, "none"), VIEWS, list_taps(backbone)[cut].shape)
        else:  # decode, augment with the same seeded views, run the frozen layers below the cut in eval mode
            extractor = CodeExtractor(backbone, [cut], "none", relu="never")
            feed = LiveActivations(as_source(images), extractor, backbone.preprocessing, 3, ("crop", "flip"),
                                   torch.device("cpu"))  # fmt: skip
        model = build_model(backbone, cut, 3, config)
        runs[route] = train(model, feed, labels, fit=fit, val=val, test=None, views=VIEWS, config=config)
    cached, live = runs["cache"], runs["live"]
    assert [h["view"] for h in cached.history] == [1, 2, 1]  # epoch e reads view 1 + e mod K
    for a, b in zip(cached.history, live.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_accuracy"] == b["val_accuracy"]
    for (name, a), (_, b) in zip(cached.model.state_dict().items(), live.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_finetune_runs_repeat_and_score_the_sweeps_test_split(cache, tmp_path):
    backbone, cut, _, _, store = cache
    config = FinetuneConfig(epochs=2, batch_size=6, seed=0)
    a = finetune(store, cut, backbone=backbone, config=config, out=tmp_path / "a", progress=False)
    b = finetune(store, cut, backbone=backbone, config=config, progress=False)
    assert a.history == b.history and a.test_accuracy == b.test_accuracy
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    saved = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert saved["cut"] == cut and saved["test_accuracy"] == a.test_accuracy and saved["config"]["seed"] == 0
    split = cnncodes.sweeps.make_split(
        store, config=cnncodes.SweepConfig(val_size=0.2, test_size=0.25, seed=0, folds=2)
    )
    assert 0 < len(np.unique(split.test_rows // (VIEWS + 1))) < store.rows // (VIEWS + 1)


def test_a_store_without_raw_activations_at_the_cut_is_refused(tmp_path):
    backbone = make_tiny_backbone()
    cut = cut_points(backbone)[2]
    images, labels = make_images(12)
    kw = dict(labels=labels, model=backbone, taps=cut, batch_size=6, workers=0, progress=False)
    pooled = cnncodes.extract(images, out=tmp_path / "pooled", poolings="avg", **kw)
    with pytest.raises(StoreError, match=f"no unpooled activations of '{cut}'.*--poolings none --relu never"):
        finetune(pooled, cut, backbone=backbone, progress=False)
    pre_activation = next(t.name for t in list_taps(backbone).taps if t.relu_applied("auto") and t.main_path)
    kw["taps"] = pre_activation
    rectified = cnncodes.extract(images, out=tmp_path / "rect", poolings="none", relu="auto", **kw)
    with pytest.raises(StoreError, match="read them raw. Extract them with --relu never"):
        finetune(rectified, pre_activation, backbone=backbone, progress=False)


@pytest.mark.slow
def test_the_cli_trains_on_a_store_and_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    images = tmp_path / "imgs"
    from helpers import write_image_folder

    write_image_folder(images, n=18)
    store = tmp_path / "s"
    assert main(["extract", str(images), "--model", "resnet18:none", "--input-size", "32", "--taps", "layer3.1.relu_1",
                 "--poolings", "none", "--relu", "never", "--views", "1", "--out", str(store), "--quiet"]) == 0  # fmt: skip
    assert main(["finetune", str(store), "--cut", "layer3.1.relu_1", "--out", str(tmp_path / "ft"), "--epochs", "2",
                 "--batch-size", "4", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "cut layer3.1.relu_1: trained the layers above it for 2 epochs" in out
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["cut"] == "layer3.1.relu_1"
    assert main(["finetune", str(store), "--cut", "layer3.0.bn1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no unpooled activations of 'layer3.0.bn1'" in err
    assert (
        main(["finetune", str(store), "--cut", "layer3.1.relu_1", "--out", str(tmp_path / "x"), "--epochs", "0"]) == 2
    )
    assert "--epochs" in capsys.readouterr().err


def test_the_first_block_is_the_networks_own_unit_whatever_its_nesting():
    """Synthetic module trees of the kinds real networks use: blocks in stages, a stage module holding its
    downsampling and then repeated blocks (ConvNeXt), a gate inside a block (MobileNet), plain layers."""
    from torch import nn

    from cnncodes.network import first_block

    class Gate(nn.Module):  # a squeeze-excitation: a module of layers inside a block, not a block
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(2, 2, 1), Gate(), nn.Conv2d(2, 2, 1))

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.downsample = nn.Sequential(nn.GroupNorm(1, 2), nn.Conv2d(2, 2, 2))
            self.blocks = nn.Sequential(Block(), Block())

    nested = nn.Module()
    nested.stem, nested.stages = nn.Conv2d(3, 2, 1), nn.Sequential(Stage(), Stage())
    order = ["stages.1.downsample.0", "stages.1.downsample.1", "stages.1.blocks.0.layers.0",
             "stages.1.blocks.0.layers.1.fc", "stages.1.blocks.1.layers.0"]  # fmt: skip
    assert first_block(nested, order) == ("stages.1.downsample", "stages.1.blocks.0")
    assert first_block(nested, order[2:]) == ("stages.1.blocks.0",)  # a cut after the downsampling
    assert first_block(nested, order[3:]) == ("stages.1.blocks.0",)  # inside a block: its layers above the cut
    flat = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    assert first_block(flat, ["1", "2"]) == ("2",)  # plain layers: the first layer with weights
    assert first_block(flat, ["1"]) == ()


@pytest.mark.slow
def test_the_first_block_of_real_networks():
    from cnncodes.network import load_backbone

    expected = {  # spec: {cut: first block above it}
        "resnet18:none": {"layer1.1.relu_1": ("layer2.0",), "layer4.1.relu_1": ()},
        "efficientnet_lite0": {"blocks.1.1.add": ("blocks.2.0",)},
        "mobilenet_v3_small:none": {"features.3.add": ("features.4",)},
        "timm:convnext_atto:none": {"stages.0.blocks.1.add": ("stages.1.downsample", "stages.1.blocks.0")},
        "timm:vit_tiny_patch16_224:none": {"blocks.0.add_1": ("blocks.1",)},
    }
    for spec, cuts in expected.items():
        backbone = load_backbone(spec, input_size=64)
        for cut, block in cuts.items():
            assert top_above(backbone, cut).block == block, (spec, cut)


class _LayerNorm2d(torch.nn.LayerNorm):
    """A channel LayerNorm written as timm writes it: traced through, so the trace reads its weights directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias).permute(0, 3, 1, 2)


class _Stage(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.downsample = torch.nn.Sequential(_LayerNorm2d(width), torch.nn.Conv2d(width, width, 2, stride=2))
        self.blocks = torch.nn.Sequential(_Block(width), _Block(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class _StageNet(torch.nn.Module):
    """ConvNeXt's nesting: stages that hold their downsampling and then a sequence of blocks."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, padding=1)
        self.stages = torch.nn.Sequential(_Stage(width), _Stage(width))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_a_stage_of_blocks_gives_the_blocks_above_the_cut_and_norms_read_through_the_trace_train():
    from cnncodes.network import load_backbone
    from helpers import TINY_PRE

    backbone = load_backbone(_StageNet(), preprocessing=TINY_PRE)
    cuts = cut_points(backbone)
    between = next(c for c in cuts if c.startswith("stages.0.blocks.0"))  # between a stage's two blocks
    assert top_above(backbone, between).block == ("stages.0.blocks.1",)  # the block above, never the one below
    before = next(c for c in cuts if c.startswith("stages.0.blocks.1"))  # the end of the first stage
    assert top_above(backbone, before).block == ("stages.1.downsample", "stages.1.blocks.0")
    norms = build_model(backbone, before, 3, FinetuneConfig(train="norms"))
    assert "body.stages.1.downsample.0.weight" in norms.trained_parameters()  # a scale read through the trace
    assert "body.stages.1.downsample.1.weight" not in norms.trained_parameters()  # a conv weight
    block = build_model(backbone, before, 3, FinetuneConfig(train="block"))
    assert {n.split(".")[3] for n in block.trained_parameters() if n.startswith("body.")} == {"downsample", "blocks"}
