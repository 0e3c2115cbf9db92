"""Export a probe bundle as one self-contained model: truncated backbone, pooling, normalization and linear head.

The exported model takes a *preprocessed* batch (float32, normalized as the bundle's ``preprocessing`` says, at its
input size) and returns class scores equal to :meth:`DeployedProbe.decision_function`. TorchScript needs only torch;
ONNX needs the ``onnx`` extra (checked with onnxruntime).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import BundleError
from ._predict import DeployedProbe

__all__ = ["ProbeModule", "export_probe", "FORMATS"]

FORMATS = ("torchscript", "onnx")


class ProbeModule(nn.Module):
    """Backbone cut at the tap -> pooling -> probe normalizer -> linear head, as one module."""

    def __init__(self, probe: DeployedProbe) -> None:
        super().__init__()
        bundle = probe.bundle
        self.net = probe.extractor.net
        self.tap = bundle.extractor.tap
        self.pooling = bundle.extractor.pooling
        self.round_fp16 = bundle.extractor.code_dtype == "float16"
        self.normalizer = bundle.normalizer
        arrays = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in bundle.arrays.items()}
        self.register_buffer("coef", arrays["coef"])
        self.register_buffer("intercept", arrays["intercept"])
        self.register_buffer("mean", arrays.get("scaler_mean", torch.zeros(1)))
        self.register_buffer("scale", arrays.get("scaler_scale", torch.ones(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.net(x)[self.tap][self.pooling]
        if self.round_fp16:  # the probe was trained on float16-stored codes
            codes = codes.half().float()
        if self.normalizer == "standard":
            codes = (codes - self.mean) / self.scale
        if self.normalizer == "power":
            codes = torch.sign(codes) * torch.sqrt(torch.abs(codes))
        if self.normalizer in ("l2", "power"):
            norm = torch.linalg.vector_norm(codes, dim=1, keepdim=True)
            codes = codes / torch.where(norm == 0, torch.ones_like(norm), norm)
        return codes @ self.coef.T + self.intercept


def export_probe(probe: DeployedProbe, path: str | os.PathLike, format: str = "torchscript", batch_size: int = 2) -> Path:  # noqa: A002
    """Write ``probe`` as TorchScript (``torch.jit.load``) or ONNX (``onnxruntime``) to ``path``.

    The input size is fixed to the bundle's preprocessing input size; the batch dimension is dynamic for ONNX.
    """
    if format not in FORMATS:
        raise BundleError(f"format={format!r}; use one of {FORMATS}.")
    module = ProbeModule(probe).eval()
    size = probe.preprocessing.input_size
    example = torch.zeros(batch_size, 3, size, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        if format == "torchscript":
            traced = torch.jit.trace(module, example, check_trace=False)
            traced.save(str(path))
        else:
            try:
                # The TorchScript-based exporter needs nothing beyond `onnx`; torch.export's needs onnxscript too.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning)
                    torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["scores"],
                                      dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)  # fmt: skip
            except (ImportError, ModuleNotFoundError) as exc:
                raise BundleError(f"ONNX export needs the onnx extra: pip install 'cnncodes[onnx]' ({exc}).") from exc
    return path
