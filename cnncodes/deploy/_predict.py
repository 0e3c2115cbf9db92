"""A saved probe bundle, put back to work on images: ``load_bundle(path).predict(images)``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._labels import label_text
from ..errors import BundleError, FingerprintMismatchError, ImageDecodeError, ParameterError
from ..images import Preprocessing, as_source
from ..network import Backbone, CodeExtractor, encode, list_taps, load_backbone
from ._bundle import ProbeBundle, read_bundle

__all__ = ["DeployedProbe", "FingerprintMismatchError", "load_bundle", "as_source"]


class DeployedProbe:
    """A probe bundle with its backbone: predictions straight from images.

    Parameters
    ----------
    bundle : ProbeBundle
    backbone : Backbone, optional
        Needed when the bundle was made from a Python ``nn.Module``; otherwise built from the bundle's model spec.
    weights : path, optional
        Local weights file for the bundle's model spec.
    allow_fingerprint_mismatch : bool, default=False
        Use a backbone whose weights differ from the bundle's (its predictions are then not the trained probe's).
    batch_size, device : extraction settings.
    amp : bool, optional
        On CUDA, run the network in bfloat16/float16 (``True``) or IEEE float32 (``False``). Default: the precision the
        bundle's training codes were computed at, so predictions see codes made the same way.
    """

    def __init__(
        self,
        bundle: ProbeBundle,
        *,
        backbone: Backbone | None = None,
        weights: str | os.PathLike | None = None,
        allow_fingerprint_mismatch: bool = False,
        batch_size: int = 64,
        device: str = "auto",
        amp: bool | None = None,
    ) -> None:
        self.bundle = bundle
        self.classes = list(bundle.classes)
        if type(batch_size) is not int or batch_size < 1:
            raise ParameterError(f"batch_size={batch_size!r}; use a positive integer (--batch-size 64).")
        self.batch_size = batch_size
        self.device = device
        self.amp = bundle.extractor.amp if amp is None else bool(amp)
        model = bundle.extractor.model
        self.preprocessing = Preprocessing.from_dict(model["preprocessing"])
        if backbone is None:
            if str(model["spec"]).startswith("module:"):
                raise BundleError(
                    f"this bundle was made from a Python module ({model['spec']}); pass backbone=load_backbone(module, "
                    "preprocessing=...) to use it."
                )
            backbone = load_backbone(model["spec"], weights=weights, input_size=self.preprocessing.input_size)
        if backbone.fingerprint != model["fingerprint"] and not allow_fingerprint_mismatch:
            raise FingerprintMismatchError(
                f"the backbone's weights fingerprint {backbone.fingerprint[:19]}... differs from the bundle's "
                f"{model['fingerprint'][:19]}...: the probe was trained on codes of other weights ({model.get('weights')}). "
                "Load the same weights (--weights PATH), or pass --allow-fingerprint-mismatch "
                "(Python: allow_fingerprint_mismatch=True) to predict anyway."
            )
        self.backbone = backbone
        spec = bundle.extractor
        # one rectification mode serves every tap: a flag means always (true) or never (false); parts rectified
        # differently were made by never (the network's own ReLU outputs) or auto, which decide the same way again
        if isinstance(spec.relu, bool):
            self.extractor = CodeExtractor(backbone, list(spec.taps), [spec.pooling], relu=spec.relu)
        else:  # parts rectified differently: the one mode (never or auto) that rectifies exactly those parts
            catalogue = list_taps(backbone)
            taps = catalogue.select(list(spec.taps))
            mode = next((m for m in ("never", "auto") if all(t.codes_rectified(m) == spec.relu_of(t.name) for t in taps)),
                        None)  # fmt: skip
            if mode is None:
                flags = ", ".join(f"{t}: {'rectified' if spec.relu_of(t) else 'raw'}" for t in spec.taps)
                raise BundleError(f"the bundle's codes ({flags}) are rectified in a way no --relu mode gives on "
                                  f"{model['spec']}: the bundle does not fit its model.")  # fmt: skip
            self.extractor = CodeExtractor(backbone, list(spec.taps), [spec.pooling], relu=mode, catalogue=catalogue)
        code_dims = self.extractor.code_dims()
        dims = sum(code_dims[(t, spec.pooling)] for t in spec.taps)
        if dims != bundle.arrays["coef"].shape[1]:
            raise BundleError(f"the bundle's probe reads {bundle.arrays['coef'].shape[1]} code dimensions, but "
                              f"{model['spec']} gives {dims} at {bundle.extractor.tap}/{bundle.extractor.pooling} "
                              f"({self.preprocessing.input_size} px): the bundle does not fit its model.")  # fmt: skip

    def codes(self, images: Any, *, progress: bool = False) -> tuple[np.ndarray, list[str]]:
        """``(codes (n, dims), reasons)``; ``reasons[i]`` is ``""`` or why image ``i`` failed to decode."""
        source = as_source(images)
        codes, reasons = encode(
            source,
            self.extractor,
            self.preprocessing,
            batch_size=self.batch_size,
            device=self.device,
            amp=self.amp,
            progress=progress,
        )
        spec = self.bundle.extractor
        parts = [codes[(t, spec.pooling)] for t in spec.taps]
        return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)), reasons

    def _checked(self, images: Any) -> np.ndarray:
        codes, reasons = self.codes(images)
        bad = [(i, r) for i, r in enumerate(reasons) if r]
        if bad:
            raise ImageDecodeError(f"image {bad[0][0]}", bad[0][1])
        return codes

    def decision_function(self, images: Any) -> np.ndarray:
        """Class scores (n, n_classes), or (n,) for two classes."""
        return self.bundle.decision_function_codes(self._checked(images))

    def predict(self, images: Any) -> np.ndarray:
        """Class names, one per image (for a multi-label probe, the classes present joined by ``;``)."""
        return np.asarray(self._names(self.bundle.predict_codes(self._checked(images))), dtype=object)

    def _names(self, predicted: np.ndarray) -> list[str]:
        return [label_text(p, self.classes) for p in predicted]

    def predict_proba(self, images: Any) -> np.ndarray:
        """Class probabilities (logreg and sgd-log probes only)."""
        return self.bundle.predict_proba_codes(self._checked(images))

    def predict_source(self, source: Any, *, progress: bool = False) -> list[dict[str, Any]]:
        """One row per image: ``path``, ``predicted``, ``scores`` (or ``probabilities``), ``error``; bad images get an
        error row instead of stopping the run."""
        images = as_source(source)
        codes, reasons = self.codes(images, progress=progress)
        scores = (
            self.bundle.predict_proba_codes(codes)
            if self.bundle.has_proba
            else self.bundle.decision_function_codes(codes)
        )
        pred = self._names(self.bundle.predict_codes(codes))
        rows = []
        for i, path in enumerate(images.ids):
            row: dict[str, Any] = {"path": path, "error": reasons[i]}
            row["predicted"] = "" if reasons[i] else pred[i]
            row["scores"] = None if reasons[i] else np.atleast_1d(scores[i])
            rows.append(row)
        return rows


def load_bundle(path: str | os.PathLike, *, digest: str | None = None, **kwargs: Any) -> DeployedProbe:
    """Read a probe bundle safely (see :func:`cnncodes.deploy.read_bundle`) and attach its backbone.

    ``digest="sha256:HEX"`` (printed when the bundle was saved) refuses any other file. Other keyword arguments go
    to :class:`DeployedProbe` (``weights``, ``backbone``, ``allow_fingerprint_mismatch``, ``batch_size``, ``device``,
    ``amp``).
    """
    return DeployedProbe(read_bundle(path, digest=digest), **kwargs)


def score_names(probe: DeployedProbe) -> Sequence[str]:
    """Column names for the per-class outputs of :meth:`DeployedProbe.predict_source`."""
    kind = "proba" if probe.bundle.has_proba else "score"
    if probe.bundle.arrays["coef"].shape[0] == 1 and not probe.bundle.has_proba and not probe.bundle.multilabel:
        return [f"{kind}_{probe.classes[1]}"]
    return [f"{kind}_{c}" for c in probe.classes]
