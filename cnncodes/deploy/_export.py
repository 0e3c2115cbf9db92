"""Export a probe bundle as one self-contained model: truncated backbone, pooling, normalization and linear head.

The exported model takes a *preprocessed* batch (float32, normalized as the bundle's ``preprocessing`` says, at its
input size) and returns class scores equal to :meth:`DeployedProbe.decision_function`, for any batch size. ``pt2``
(:mod:`torch.export`) and TorchScript need only torch; ONNX needs the ``onnx`` extra (checked with onnxruntime).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .._fsutil import replace as durable_replace
from ..errors import BundleError, MissingExtraError, ParameterError
from ._predict import DeployedProbe

__all__ = ["ProbeModule", "export_module", "export_probe", "FORMATS"]

FORMATS = ("pt2", "torchscript", "onnx")


class ProbeModule(nn.Module):
    """Backbone cut at the tap -> pooling -> probe normalizer -> linear head, as one module."""

    def __init__(self, probe: DeployedProbe) -> None:
        super().__init__()
        bundle = probe.bundle
        self.net = probe.extractor.net
        self.taps = list(bundle.extractor.taps)
        self.pooling = bundle.extractor.pooling
        self.round_fp16 = bundle.extractor.code_dtype == "float16"
        self.normalizer = bundle.normalizer
        arrays = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in bundle.arrays.items()}
        self.register_buffer("coef", arrays["coef"])
        self.register_buffer("intercept", arrays["intercept"])
        self.register_buffer("mean", arrays.get("scaler_mean", torch.zeros(1)))
        self.register_buffer("scale", arrays.get("scaler_scale", torch.ones(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        codes = (
            torch.cat([out[t][self.pooling] for t in self.taps], dim=1)
            if len(self.taps) > 1
            else out[self.taps[0]][self.pooling]
        )
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


def export_probe(
    probe: DeployedProbe,
    path: str | os.PathLike,
    format: str = "pt2",
    batch_size: int = 2,
    *,
    check_atol: float = 1e-4,  # noqa: A002
) -> Path:
    """Write ``probe`` as one model taking a preprocessed batch and returning class scores.

    Parameters
    ----------
    probe : DeployedProbe
        From :func:`cnncodes.load_bundle`.
    path : path-like
        Output file.
    format : {"pt2", "torchscript", "onnx"}, default="pt2"
        ``pt2``: a :func:`torch.export.export` program (``torch.export.load(path).module()``), the format torch is
        moving to. ``torchscript``: ``torch.jit.load``, kept while torch ships it. ``onnx``: through torch's dynamo
        exporter (the ``onnx`` extra), for onnxruntime.
    batch_size : int, default=2
        Batch size of the example used to trace; the batch dimension stays dynamic in every format.
    check_atol : float, default=1e-4
        The exported model is run again on a random batch of another size and must match the eager module within
        this tolerance (absolute, or relative to the largest score where scores exceed 1), or nothing is left at
        ``path``.

    Returns
    -------
    Path
    """
    return export_module(ProbeModule(probe).eval(), probe.preprocessing.input_size, path, format, batch_size,
                         check_atol=check_atol, what="probe")  # fmt: skip


def export_module(
    module: nn.Module,
    size: int,
    path: str | os.PathLike,
    format: str = "pt2",  # noqa: A002
    batch_size: int = 2,
    *,
    check_atol: float = 1e-4,
    what: str = "model",
) -> Path:
    """Write ``module`` (a preprocessed ``(N, 3, size, size)`` batch -> scores) in ``format``, with a dynamic batch
    dimension, checked against the eager module on another batch size (see :func:`export_probe`)."""
    if format not in FORMATS:
        raise ParameterError(f"format={format!r}; use one of {FORMATS}.")
    if batch_size < 2:
        raise ParameterError(
            f"batch_size={batch_size}: the example batch needs at least 2 images (1 would fix the batch size)."
        )
    example = torch.zeros(batch_size, 3, size, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise ParameterError(f"{path} is a directory; give the model's file name, e.g. {path / 'probe.pt2'}.")
    if path.exists() and not path.is_file():
        raise ParameterError(
            f"{path} exists and is not a regular file (a device, FIFO or socket); give a new file name."
        )
    _check_free_space(module, path.parent)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # keeps the suffix torch.export.load looks for
    try:
        with torch.inference_mode(False), torch.no_grad():
            run = _EXPORTERS[format](module, example, tmp)
            check = torch.randn(batch_size + 1, 3, size, size, generator=torch.Generator().manual_seed(0))
            want = module(check)
            # float32 rounding grows with the scores' size (one-vs-rest probes at large C reach thousands)
            diff = float((torch.as_tensor(run(check)) - want).abs().max()) / max(1.0, float(want.abs().max()))
        if not diff <= check_atol:
            raise BundleError(f"the exported {format} model differs from the {what} by {diff:.2e} (> {check_atol:g}); "
                              "nothing was written. Try another --format.")  # fmt: skip
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_free_space(module: nn.Module, folder: Path) -> None:
    """Refuse before exporting when the model cannot fit: the exporters abort the process on a full disk."""
    import shutil

    need = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) + 2**20
    free = shutil.disk_usage(folder).free
    if free < 2 * need:  # the temporary file and some margin
        raise BundleError(f"disk full: exporting needs about {2 * need / 2**20:.1f} MiB in {folder} but "
                          f"{free / 2**20:.1f} MiB are free; free space or choose another --out.")  # fmt: skip


def _export_pt2(module: nn.Module, example: torch.Tensor, tmp: Path):
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp))
    return torch.export.load(str(tmp)).module()


def _export_torchscript(module: nn.Module, example: torch.Tensor, tmp: Path):
    with warnings.catch_warnings():  # torch deprecates TorchScript; the pt2 format is the default
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(module, example, check_trace=False).save(str(tmp))
        return torch.jit.load(str(tmp))


def _export_onnx(module: nn.Module, example: torch.Tensor, tmp: Path):
    """Export through torch's dynamo ONNX exporter; return a callable running the file with onnxruntime."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError as exc:
        raise MissingExtraError(f"ONNX export needs the onnx extra: pip install 'cnncodes[onnx]' ({exc}).") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter narrates its steps as warnings
        torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=["scores"],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)  # fmt: skip
    session = onnxruntime.InferenceSession(str(tmp))
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


_EXPORTERS = {"pt2": _export_pt2, "torchscript": _export_torchscript, "onnx": _export_onnx}
