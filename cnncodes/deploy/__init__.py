"""Deploy: a probe saved as a safe bundle (JSON + ``.npy``, no pickle), prediction on new images from a bundle alone,
and export as one TorchScript, ``torch.export`` or ONNX model. Never imports the store or the extraction run.

Saving and reading bundles needs no network code, so prediction and export (which load models, torchvision and timm)
are imported on first use: ``cnncodes sweep`` saves its bundle without paying for them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._bundle import (
    ExtractorSpec,
    ProbeBundle,
    bundle_digest,
    bundle_from_pipeline,
    check_digest,
    read_bundle,
    save_bundle,
    save_probe,
)

_EXPORT = ("FORMATS", "export_module", "export_probe")
_PREDICT = ("DeployedProbe", "load_bundle", "score_names")

__all__ = [
    "FORMATS",
    "DeployedProbe",
    "ExtractorSpec",
    "ProbeBundle",
    "bundle_digest",
    "bundle_from_pipeline",
    "check_digest",
    "export_module",
    "export_probe",
    "load_bundle",
    "read_bundle",
    "save_bundle",
    "save_probe",
    "score_names",
]


def __getattr__(name: str) -> Any:
    """Prediction and export, imported on first use."""
    if name in _EXPORT:
        from . import _export as module
    elif name in _PREDICT:
        from . import _predict as module
    else:
        raise AttributeError(f"module 'cnncodes.deploy' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORT) | set(_PREDICT))


if TYPE_CHECKING:
    from ._export import FORMATS, export_module, export_probe
    from ._predict import DeployedProbe, load_bundle, score_names
