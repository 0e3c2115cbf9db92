"""A fine-tuned model saved without pickle, and put back to work: ``finetuned.zip`` holds ``finetuned.json`` (how to
rebuild it: the backbone spec and fingerprint, the cut, head or top, classes, numerics, scores) and
``weights.safetensors`` (the trained layers only; the frozen trunk comes from the backbone's own weights).

Reading checks the schema, bounds the weights member by what the rebuilt model can hold, verifies its checksum and,
when given, the whole file's pinned digest, before any image is touched."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .._fsutil import MemberTooLarge, naming, read_member, zip_entry
from .._fsutil import replace as durable_replace
from ..deploy import check_digest, export_module
from ..errors import BundleError, FingerprintMismatchError
from ..images import Preprocessing, as_source
from ..network import Backbone, CodeExtractor, encode, list_taps, load_backbone
from ._finetune import FinetuneConfig, build_model

__all__ = ["DeployedFinetune", "FinetunedModule", "is_finetuned", "load_finetuned", "save_finetuned"]

FORMAT, FORMAT_VERSION = "cnncodes.finetuned", 1
_JSON, _WEIGHTS = "finetuned.json", "weights.safetensors"
_MAX_JSON_BYTES = 4 * 2**20


def save_finetuned(result: Any, backbone: Backbone, path: str | os.PathLike, numerics: dict | None = None) -> Path:
    """Write ``result`` (a :class:`FinetuneResult`) as ``path`` (a zip); returns the path. Its digest is
    :func:`cnncodes.deploy.bundle_digest`."""
    path = Path(path)
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": backbone.describe(),
        "cut": result.cut,
        "head": result.head,
        "classes": list(result.classes),
        "config": {k: result.config[k] for k in ("hidden", "dropout", "seed", "train")},
        "trained_parameters": list(result.trained),
        "numerics": numerics,
        "metrics": {
            "val_accuracy": result.val_accuracy,
            "test_accuracy": result.test_accuracy,
            "best_epoch": result.best_epoch,
        },  # fmt: skip
        "checksums": {_WEIGHTS: hashlib.sha256(weights).hexdigest()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with naming(path), zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(zip_entry(_JSON, zipfile.ZIP_STORED), json.dumps(meta, indent=1))
            zf.writestr(zip_entry(_WEIGHTS, zipfile.ZIP_STORED), weights)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_finetuned(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fine-tuned model file (rather than a probe bundle)."""
    if not Path(path).is_file():  # never open a FIFO or device to find out
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return _JSON in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _refuse(path: Path, what: str) -> BundleError:
    return BundleError(f"{path}: {what}; it is not a usable fine-tuned model.")


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _refuse(path, f"{_JSON} is not a {FORMAT} object")
    if type(meta.get("format_version")) is not int or not meta["format_version"] >= 1:
        raise _refuse(path, f"format_version {meta.get('format_version')!r} is not a positive integer")
    if meta["format_version"] > FORMAT_VERSION:
        raise BundleError(f"{path} uses format {meta['format_version']}; upgrade cnncodes to read it.")
    model = meta.get("model")
    if not (isinstance(model, dict) and all(isinstance(model.get(k), str) for k in ("spec", "fingerprint"))
            and isinstance(model.get("preprocessing"), dict)):  # fmt: skip
        raise _refuse(path, "model must give spec, fingerprint and preprocessing")
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):  # fmt: skip
        raise _refuse(path, f"classes {str(classes)[:80]} is not a list of at least 2 distinct class names")
    if not isinstance(meta.get("cut"), str) or type(meta.get("head")) is not bool:
        raise _refuse(path, "cut must be a tap name and head true or false")
    numerics = meta.get("numerics")
    if numerics is not None and not (isinstance(numerics, dict) and numerics.get("precision") in
                                     ("float32", "bfloat16", "float16")):  # fmt: skip
        raise _refuse(path, f"numerics {str(numerics)[:60]} is not null or an object with a float precision")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise _refuse(path, "config must be an object")
    try:
        FinetuneConfig(head=meta["head"], train=config.get("train", "top"), hidden=config.get("hidden", 512),
                       dropout=config.get("dropout", 0.5))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the config's own checks name the field
        raise _refuse(path, f"config is malformed ({exc})") from None
    if not isinstance(meta.get("checksums"), dict) or not isinstance(meta["checksums"].get(_WEIGHTS), str):
        raise _refuse(path, f"checksums must give the sha256 of {_WEIGHTS}")
    return meta


def read_finetuned(path: str | os.PathLike, *, digest: str | None = None) -> tuple[dict[str, Any], zipfile.ZipInfo]:
    """The checked ``finetuned.json`` of ``path`` and the zip entry of its weights (read later, once their size is
    known to fit the rebuilt model)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise BundleError(f"{path} is not a regular file; give the path of a fine-tuned model (finetuned.zip).")
    check_digest(path, digest)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if sorted(names) != sorted({_JSON, _WEIGHTS}):
                raise _refuse(path, f"its members are {names[:5]}, not {_JSON} and {_WEIGHTS}")
            if zf.getinfo(_JSON).file_size > _MAX_JSON_BYTES:
                raise _refuse(path, f"{_JSON} is over {_MAX_JSON_BYTES} bytes")
            meta = _check_meta(json.loads(read_member(zf, _JSON, _MAX_JSON_BYTES)), path)
            return meta, zf.getinfo(_WEIGHTS)
    except (
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        OSError,
        RecursionError,
        RuntimeError,
        NotImplementedError,
    ) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path} is not a readable fine-tuned model ({type(exc).__name__}: {exc}).") from exc


class FinetunedModule(nn.Module):
    """Preprocessed images -> frozen layers up to the cut -> the trained top (or head) -> class scores."""

    def __init__(self, trunk: nn.Module, cut: str, shape: tuple[int, ...], top: nn.Module) -> None:
        super().__init__()
        self.trunk, self.cut, self.shape, self.top = trunk, cut, tuple(shape), top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation = self.trunk(x)[self.cut]["none"]
        return self.top(activation.reshape(activation.shape[0], *self.shape))


class DeployedFinetune:
    """A fine-tuned model with its backbone: predictions straight from images (the API of a deployed probe)."""

    def __init__(self, path: str | os.PathLike, *, digest: str | None = None, backbone: Backbone | None = None,
                 weights: str | os.PathLike | None = None, allow_fingerprint_mismatch: bool = False,
                 batch_size: int = 64, device: str = "auto", amp: bool | None = None) -> None:  # fmt: skip
        path = Path(path)
        meta, info = read_finetuned(path, digest=digest)
        self.meta, self.classes, self.cut = meta, list(meta["classes"]), meta["cut"]
        self.preprocessing = Preprocessing.from_dict(meta["model"]["preprocessing"])
        self.batch_size, self.device = batch_size, device
        numerics = meta.get("numerics") or {}
        self.amp = numerics.get("precision", "float32") != "float32" if amp is None else bool(amp)
        spec = meta["model"]["spec"]
        if backbone is None:
            if spec.startswith("module:"):
                raise BundleError(f"{path} was made from a Python module ({spec}); pass backbone=load_backbone(...).")
            backbone = load_backbone(spec, weights=weights, input_size=self.preprocessing.input_size)
        if backbone.fingerprint != meta["model"]["fingerprint"] and not allow_fingerprint_mismatch:
            raise FingerprintMismatchError(f"the backbone's weights fingerprint {backbone.fingerprint[:19]}... differs "
                                           f"from the model's {meta['model']['fingerprint'][:19]}...; load the same "
                                           "weights (--weights PATH).")  # fmt: skip
        catalogue = list_taps(backbone)
        config = FinetuneConfig(head=meta["head"], train=meta["config"].get("train", "top"),
                                hidden=meta["config"].get("hidden", 512), dropout=meta["config"].get("dropout", 0.5))  # fmt: skip
        self.top = build_model(backbone, self.cut, len(self.classes), config, catalogue)
        expected = self.top.state_dict()
        need = sum(t.numel() * t.element_size() for t in expected.values()) + 2**20
        if info.file_size > need:
            raise _refuse(path, f"{_WEIGHTS} is {info.file_size} bytes, more than the model can hold ({need})")
        try:
            with zipfile.ZipFile(path) as zf:
                data = read_member(zf, _WEIGHTS, need)
        except MemberTooLarge as exc:
            raise _refuse(path, f"{exc} (the model holds {need - 2**20} bytes of weights)") from None
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
            raise _refuse(path, f"{_WEIGHTS} cannot be read ({type(exc).__name__}: {exc})") from None
        if hashlib.sha256(data).hexdigest() != meta["checksums"][_WEIGHTS]:
            raise _refuse(path, f"{_WEIGHTS} does not match its checksum (the file was modified)")
        try:
            tensors = load_safetensors(data)
            wrong_type = [k for k in expected if k in tensors and tensors[k].dtype != expected[k].dtype]
            if wrong_type:
                raise _refuse(path, f"weights {wrong_type[:3]} are not {expected[wrong_type[0]].dtype}")
            mismatched = [k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape]
            if mismatched or set(tensors) - set(expected):
                raise _refuse(path, f"its weights do not fit the model rebuilt at cut {self.cut!r} "
                                    f"({(mismatched or sorted(set(tensors) - set(expected)))[:3]})")  # fmt: skip
            if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
                raise _refuse(path, "its weights are not finite")
            self.top.load_state_dict(tensors)
        except (ValueError, RuntimeError, TypeError, SafetensorError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise _refuse(path, f"its weights cannot be read ({type(exc).__name__}: {exc})") from None
        self.top.eval()
        self.backbone = backbone
        self.extractor = CodeExtractor(backbone, [self.cut], "none", relu="never", catalogue=catalogue)
        self.shape = catalogue[self.cut].shape

    def module(self) -> FinetunedModule:
        """The whole model as one module, for export."""
        return FinetunedModule(self.extractor.net, self.cut, self.shape, self.top).eval()

    def _scores(self, images: Any, progress: bool = False) -> tuple[np.ndarray, list[str]]:
        source = as_source(images)
        codes, reasons = encode(source, self.extractor, self.preprocessing, batch_size=self.batch_size,
                                device=self.device, amp=self.amp, progress=progress)  # fmt: skip
        flat = torch.from_numpy(codes[(self.cut, "none")])
        with torch.inference_mode():
            logits = torch.cat([self.top(part.reshape(len(part), *self.shape))
                                for part in flat.split(self.batch_size)]) if len(flat) else torch.zeros(0, len(self.classes))  # fmt: skip
        return torch.softmax(logits, 1).numpy(), reasons

    def predict_proba(self, images: Any) -> np.ndarray:
        proba, reasons = self._scores(images)
        bad = [r for r in reasons if r]
        if bad:
            raise BundleError(f"an image could not be decoded: {bad[0]}")
        return proba

    def predict(self, images: Any) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.predict_proba(images).argmax(1)]

    def predict_source(self, source: Any, *, progress: bool = False) -> list[dict[str, Any]]:
        """One row per image, as :meth:`cnncodes.deploy.DeployedProbe.predict_source`."""
        images = as_source(source)
        proba, reasons = self._scores(images, progress)
        return [{"path": path, "error": reasons[i], "predicted": "" if reasons[i] else self.classes[int(proba[i].argmax())],
                 "scores": None if reasons[i] else proba[i]} for i, path in enumerate(images.ids)]  # fmt: skip

    def score_names(self) -> list[str]:
        return [f"proba_{c}" for c in self.classes]

    def export(self, path: str | os.PathLike, format: str = "pt2") -> Path:  # noqa: A002
        """One model: preprocessed images -> class logits (see :func:`cnncodes.deploy.export_module`)."""
        return export_module(self.module(), self.preprocessing.input_size, path, format, what="fine-tuned model")


def load_finetuned(path: str | os.PathLike, **kwargs: Any) -> DeployedFinetune:
    """Read a fine-tuned model safely and attach its backbone (``digest``, ``backbone``, ``weights``, ``device``...)."""
    return DeployedFinetune(path, **kwargs)
