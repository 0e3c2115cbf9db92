"""Deploy: a probe saved as a safe bundle (JSON + ``.npy``, no pickle), prediction on new images from a bundle alone,
and export as one TorchScript, ``torch.export`` or ONNX model. Never imports the store or the extraction run."""

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
from ._export import FORMATS, export_module, export_probe
from ._predict import DeployedProbe, load_bundle, score_names

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
