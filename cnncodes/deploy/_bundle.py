"""Probe bundles: one safe file holding everything needed to turn images into predictions.

The one module that knows the bundle format. A bundle is a zip with

* ``bundle.json`` -- format name and version, the extractor spec (model spec, weights fingerprint, tap, pooling,
  rectify flag, preprocessing, input size, code dtype), the normalizer and classifier kinds, class names, training
  metrics, versions, and the sha256 of every array member;
* ``arrays/<name>.npy`` -- the normalizer parameters, linear weights and bias, saved with ``allow_pickle=False``.

Reading never executes code from the file: JSON is parsed, arrays are loaded with ``allow_pickle=False``, unknown
members are refused, and every member's checksum is verified, so a planted pickle, a tampered or a truncated file is
rejected with :class:`BundleError`. A joblib export of the sklearn Pipeline exists for convenience; unpickling
executes code, so only load joblib files you made yourself.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from .._fsutil import MemberTooLarge, naming, read_member, zip_entry
from .._fsutil import replace as durable_replace
from .._versions import versions
from ..errors import BundleError, CnncodesError
from ..probing import TorchLinearSVC, TorchLogisticRegression

__all__ = [
    "ExtractorSpec",
    "bundle_digest",
    "ProbeBundle",
    "save_bundle",
    "read_bundle",
    "bundle_from_pipeline",
    "save_probe",
    "FORMAT_VERSION",
]

FORMAT = "cnncodes.probe"
FORMAT_VERSION = 1
_JSON = "bundle.json"
_ARRAYS = ("scaler_mean", "scaler_scale", "coef", "intercept")


@dataclass(frozen=True)
class ExtractorSpec:
    """How a bundle's codes are computed from images: the ``extractor`` entry of ``bundle.json``.

    Attributes
    ----------
    model : dict
        The backbone's description: ``spec`` (model spec string), ``weights``, ``fingerprint`` and ``preprocessing``.
    tap, pooling : str
        Where the codes are taken and how they are pooled. A concatenated candidate's tap is its parts joined by
        ``+``.
    relu : bool or tuple of bool
        Whether the codes were rectified (one flag per part of a concatenated candidate when they differ).
    code_dtype : {"float16", "float32"}
        The dtype the codes were stored in during training (predictions round to it).
    dims : int
        Code dimensions.
    numerics : dict, optional
        How the training codes were computed (``device``, ``precision`` and software versions; see
        :func:`cnncodes.network.numerics`). Prediction runs at the same precision by default.
    taps : tuple of str
        The taps whose codes are joined side by side, in order (one tap: ``(tap,)``).
    """

    model: dict[str, Any]
    tap: str
    pooling: str
    relu: bool | tuple[bool, ...]
    code_dtype: str = "float32"
    dims: int = -1
    numerics: dict[str, Any] | None = None
    taps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.taps:
            object.__setattr__(self, "taps", (self.tap,))

    def relu_of(self, tap: str) -> bool:
        """Whether the codes of ``tap`` (one of :attr:`taps`) were rectified."""
        return self.relu[self.taps.index(tap)] if isinstance(self.relu, tuple) else bool(self.relu)

    @property
    def amp(self) -> bool:
        """Whether the codes were computed under mixed precision (bfloat16/float16) rather than float32."""
        return self.numerics is None or self.numerics.get("precision") != "float32"

    @classmethod
    def from_dict(cls, data: Any, where: str | os.PathLike) -> ExtractorSpec:
        """Parse and check the JSON entry; anything malformed is a :class:`BundleError` naming ``where``."""

        def need(mapping: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
            value = mapping.get(key) if isinstance(mapping, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
                raise BundleError(f"{where}: bundle.json {what}{key} is {value!r}, not a valid "
                                  f"{getattr(kind, '__name__', kind)}; the bundle is malformed.")  # fmt: skip
            return value

        model = need(data, "model", dict, "extractor.")
        for key in ("spec", "fingerprint"):
            need(model, key, str, "extractor.model.")
        if "weights" in model and not isinstance(model["weights"], (str, type(None))):
            need(model, "weights", str, "extractor.model.")
        if "dims" in data and (type(data["dims"]) is not int or data["dims"] < -1):
            raise BundleError(f"{where}: bundle.json extractor.dims is {data['dims']!r}, not a number of code "
                              "dimensions; the bundle is malformed.")  # fmt: skip
        need(model, "preprocessing", dict, "extractor.model.")
        code_dtype = data.get("code_dtype", "float32")
        if code_dtype not in ("float16", "float32"):
            raise BundleError(
                f"{where}: bundle.json extractor.code_dtype is {code_dtype!r}; expected float16 or float32."
            )
        numerics = data.get("numerics")
        if numerics is not None and not (
            isinstance(numerics, dict) and numerics.get("precision") in ("float32", "bfloat16", "float16")
        ):
            raise BundleError(f"{where}: bundle.json extractor.numerics is {str(numerics)[:80]}; expected null or an "
                              "object whose precision is float32, bfloat16 or float16. The bundle is malformed.")  # fmt: skip
        tap = need(data, "tap", str, "extractor.")
        taps = data.get("taps", [tap])
        if not (isinstance(taps, list) and taps and all(isinstance(t, str) and t for t in taps)
                and "+".join(taps) == tap and len(set(taps)) == len(taps)):  # fmt: skip
            raise BundleError(f"{where}: bundle.json extractor.taps is {str(taps)[:80]}; expected the distinct taps "
                              f"whose codes are joined, which {tap!r} names joined by '+'. The bundle is malformed.")  # fmt: skip
        relu = data.get("relu")
        if isinstance(relu, list):
            if len(relu) != len(taps) or not all(isinstance(r, bool) for r in relu):
                raise BundleError(f"{where}: bundle.json extractor.relu is {str(relu)[:80]}; expected true/false, or "
                                  f"one per tap of {taps}. The bundle is malformed.")  # fmt: skip
            relu = tuple(relu)
        else:
            relu = bool(need(data, "relu", (bool, int), "extractor."))
        return cls(model=dict(model), tap=tap, pooling=need(data, "pooling", str, "extractor."), relu=relu,
                   code_dtype=code_dtype, dims=int(data.get("dims", -1)) if isinstance(data.get("dims", -1), int) else -1,
                   numerics=None if numerics is None else dict(numerics), taps=tuple(taps))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "tap": self.tap, "pooling": self.pooling,
               "relu": list(self.relu) if isinstance(self.relu, tuple) else self.relu, "code_dtype": self.code_dtype,
               "dims": self.dims, "numerics": self.numerics}  # fmt: skip
        if len(self.taps) > 1:
            out["taps"] = list(self.taps)
        return out


@dataclass
class ProbeBundle:
    """A fitted linear probe on CNN codes, plus how to compute those codes.

    Attributes
    ----------
    extractor : ExtractorSpec
        How the codes are computed from images.
    normalizer : {"standard", "l2", "power", "none"}
    classifier : {"logreg", "linsvc", "sgd", "sgd-log"}
    classes : list of str
    arrays : dict of str to ndarray
        ``coef`` (n_outputs, dims), ``intercept`` (n_outputs,), and ``scaler_mean``/``scaler_scale`` for ``standard``.
    metrics : dict
    versions : dict
    multilabel : bool
        One-vs-rest probes of images that may show several classes: one output per class, each class present where
        its score is positive.
    """

    extractor: ExtractorSpec
    normalizer: str
    classifier: str
    classes: list[str]
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    multilabel: bool = False

    # -- compute on codes -------------------------------------------------------------------------------------------
    def normalize(self, codes: np.ndarray) -> np.ndarray:
        X = np.asarray(codes, dtype=np.float32)
        if self.extractor.code_dtype == "float16":  # the probe was trained on float16-stored codes
            X = X.astype(np.float16).astype(np.float32)
        if self.normalizer == "standard":
            return (X - self.arrays["scaler_mean"]) / self.arrays["scaler_scale"]
        if self.normalizer == "power":
            X = np.sign(X) * np.sqrt(np.abs(X))
        if self.normalizer in ("l2", "power"):
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.where(norms == 0, 1, norms)
        return X

    def decision_function_codes(self, codes: np.ndarray) -> np.ndarray:
        """Class scores from codes: (n, n_classes), or (n,) for a two-class single-label probe."""
        scores = self.normalize(codes) @ self.arrays["coef"].T + self.arrays["intercept"]
        return scores.ravel() if scores.shape[1] == 1 and not self.multilabel else scores

    def predict_codes(self, codes: np.ndarray) -> np.ndarray:
        """Class indices (into :attr:`classes`); for a multi-label probe, a 0/1 (n, n_classes) indicator."""
        s = self.decision_function_codes(codes)
        if self.multilabel:
            return (s > 0).astype(int)
        return (s > 0).astype(int) if s.ndim == 1 else s.argmax(1)

    @property
    def has_proba(self) -> bool:
        return self.classifier in ("logreg", "sgd-log")

    def predict_proba_codes(self, codes: np.ndarray) -> np.ndarray:
        """Class probabilities; only for ``logreg`` (softmax) and ``sgd-log`` (one-vs-rest, normalized)."""
        if not self.has_proba:
            raise BundleError(f"a {self.classifier!r} probe has no probabilities; use decision_function or predict.")
        s = self.decision_function_codes(codes)
        if self.multilabel:  # independent per-class probabilities
            return 1 / (1 + np.exp(-s))
        if s.ndim == 1:
            p1 = 1 / (1 + np.exp(-s))
            return np.stack([1 - p1, p1], axis=1)
        if self.classifier == "logreg":
            e = np.exp(s - s.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        p = 1 / (1 + np.exp(-s))
        return p / p.sum(1, keepdims=True)


def bundle_from_pipeline(
    pipeline: Pipeline,
    extractor: ExtractorSpec | dict[str, Any],
    classes: list[str],
    metrics: dict[str, Any] | None = None,
) -> ProbeBundle:
    """Take the parameters out of a fitted probe Pipeline (see :func:`cnncodes.probes.make_probe`), or a multi-label
    sweep's ``OneVsRestClassifier`` of per-class probes (or of searches over them)."""
    norm_step, clf = pipeline.named_steps["normalize"], pipeline.named_steps["classify"]
    multilabel = isinstance(clf, OneVsRestClassifier)
    if multilabel:
        per_class = [getattr(e, "best_estimator_", e) for e in clf.estimators_]
        clf = per_class[0]
        coef = np.concatenate([e.coef_ for e in per_class])
        intercept = np.concatenate([np.ravel(e.intercept_) for e in per_class])
    arrays: dict[str, np.ndarray] = {}
    if isinstance(norm_step, StandardScaler):
        normalizer = "standard"
        arrays["scaler_mean"] = np.asarray(norm_step.mean_, dtype=np.float32)
        arrays["scaler_scale"] = np.asarray(norm_step.scale_, dtype=np.float32)
    elif isinstance(norm_step, Normalizer):
        normalizer = "l2"
    elif isinstance(norm_step, Pipeline):
        normalizer = "power"
    elif norm_step in (None, "passthrough"):
        normalizer = "none"
    else:
        raise BundleError(f"cannot bundle normalizer {type(norm_step).__name__}; use standard, l2, power or none.")
    if isinstance(clf, (TorchLogisticRegression, LogisticRegression)):
        classifier = "logreg"
    elif isinstance(clf, (TorchLinearSVC, LinearSVC)):
        classifier = "linsvc"
    elif isinstance(clf, SGDClassifier):
        classifier = "sgd-log" if clf.loss == "log_loss" else "sgd"
    else:
        raise BundleError(f"cannot bundle classifier {type(clf).__name__}; use a linear probe from make_probe.")
    if multilabel:
        arrays["coef"], arrays["intercept"] = coef.astype(np.float32), intercept.astype(np.float32)
        fitted = list(classes)
    else:
        arrays["coef"] = np.asarray(clf.coef_, dtype=np.float32)
        arrays["intercept"] = np.asarray(clf.intercept_, dtype=np.float32)
        fitted = [
            classes[int(c)] if isinstance(c, (int, np.integer)) and len(classes) > int(c) else str(c)
            for c in clf.classes_
        ]
    if isinstance(extractor, dict):
        extractor = ExtractorSpec.from_dict(extractor, "the sweep's extractor")
    return ProbeBundle(extractor, normalizer, classifier, fitted, arrays, dict(metrics or {}), versions(), multilabel)


def save_bundle(bundle: ProbeBundle, path: str | os.PathLike) -> Path:
    """Write ``bundle`` as a zip of JSON + ``.npy`` members (no pickle anywhere)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    members: dict[str, bytes] = {}
    for name, array in bundle.arrays.items():
        if name not in _ARRAYS:
            raise BundleError(f"unknown bundle array {name!r}; allowed: {_ARRAYS}.")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        members[f"arrays/{name}.npy"] = buf.getvalue()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "extractor": bundle.extractor.to_dict(),
        "normalizer": bundle.normalizer,
        "classifier": bundle.classifier,
        "classes": bundle.classes,
        "metrics": bundle.metrics,
        "versions": bundle.versions,
        "multilabel": bundle.multilabel,
        "checksums": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    with naming(path), zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zip_entry(_JSON, zipfile.ZIP_DEFLATED), json.dumps(meta, indent=1, default=_json_default))
        for name, data in members.items():
            zf.writestr(zip_entry(name, zipfile.ZIP_DEFLATED), data)
    durable_replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a bundle")


_MAX_JSON_BYTES = 16 * 2**20  # a bundle.json is a few KiB; anything near this is padding or an attack
_MAX_CODE_DIMS = 2**24


def bundle_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the whole bundle file: what :func:`read_bundle`'s ``digest`` pins."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_digest(path: Path, digest: str | None) -> None:
    """Refuse ``path`` unless its whole-file sha256 is ``digest`` (``None``: no pin)."""
    if digest is None:
        return
    want = digest.strip().lower().removeprefix("sha256:")
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise BundleError(
            f"digest {digest!r} is not a sha256 digest; give the sha256:HEX printed when the bundle was saved."
        )
    have = bundle_digest(path)
    if have != "sha256:" + want:
        raise BundleError(f"{path} has digest {have}, not the pinned sha256:{want}: it is not the bundle you pinned "
                          "(modified, replaced or another version). Refusing to use it.")  # fmt: skip


def npy_array(data: bytes, where: str, max_ndim: int = 2) -> np.ndarray:
    """The array of an ``.npy`` file's bytes, its header (format version, dtype, order, shape) checked before anything
    is allocated: a floating-point dtype of at most 8 bytes, C order, at most ``max_ndim`` dimensions, and a shape
    whose bytes are exactly those that follow the header. A header declaring terabytes is refused, not allocated."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"format version {version}")
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(buf, max_header_size=4096)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise BundleError(f"{where} is not a valid .npy array ({exc}); the bundle is damaged.") from None
    if dtype.kind != "f" or dtype.itemsize > 8 or dtype.hasobject:
        raise BundleError(f"{where} holds dtype {dtype}, not float16/32/64; the bundle is damaged.")
    if not all(type(n) is int and n >= 0 for n in shape):  # the reader lets True and -1 through
        raise BundleError(f"{where} declares shape {shape}, not sizes; the bundle is damaged.")
    if fortran or len(shape) > max_ndim:
        raise BundleError(f"{where} declares {'Fortran order' if fortran else f'{len(shape)} dimensions'}; cnncodes "
                          "writes C-order vectors and matrices only. The bundle is damaged.")  # fmt: skip
    need = math.prod(shape) * dtype.itemsize
    if need != len(data) - buf.tell():
        raise BundleError(f"{where} declares shape {shape} ({need} bytes) but holds {len(data) - buf.tell()}; the "
                          "bundle is damaged.")  # fmt: skip
    return np.frombuffer(data, dtype=dtype, offset=buf.tell()).reshape(shape).copy()


def _member_limit(name: str, spec: ExtractorSpec, n_classes: int) -> int:
    """Largest size a member can have for this bundle's dims and classes (float64, plus the .npy header)."""
    dims = spec.dims if 0 < spec.dims <= _MAX_CODE_DIMS else _MAX_CODE_DIMS
    outputs = max(n_classes, 1)  # a two-class probe has one output, a multi-label one two
    elements = {"coef": outputs * dims, "intercept": outputs}.get(name, dims)
    return 8 * elements + 4096


def read_bundle(path: str | os.PathLike, *, digest: str | None = None) -> ProbeBundle:
    """Read and verify a bundle; never unpickles anything.

    Parameters
    ----------
    path : path-like
    digest : str, optional
        ``sha256:HEX`` of the whole file, as printed when it was saved (:func:`bundle_digest`). The member checksums
        inside a bundle only catch corruption: anyone who edits a bundle can recompute them. Pinning the digest is
        what refuses a modified or substituted bundle.

    Raises
    ------
    BundleError
        Not a zip, truncated, oversized, unknown members, checksum or digest mismatch, pickled arrays, a malformed
        schema, or a newer format version.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise BundleError(f"{path} is not a regular file; give the path of a probe bundle (best_probe.zip).")
    check_digest(path, digest)
    try:
        with zipfile.ZipFile(path) as zf:
            listed = zf.namelist()
            names = set(listed)
            if len(names) != len(listed):  # zip readers disagree on which of two same-named members counts
                raise BundleError(f"{path} holds two members of one name; refusing an ambiguous bundle.")
            if _JSON not in names:
                raise BundleError(f"{path} has no {_JSON}: not a cnncodes probe bundle.")
            if zf.getinfo(_JSON).file_size > _MAX_JSON_BYTES:
                raise BundleError(f"{path}: {_JSON} is {zf.getinfo(_JSON).file_size} bytes, over the "
                                  f"{_MAX_JSON_BYTES} a bundle can need; refusing it.")  # fmt: skip
            meta = json.loads(read_member(zf, _JSON, _MAX_JSON_BYTES))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise BundleError(f"{path} is not a cnncodes probe bundle ({_JSON} is not a {FORMAT} object).")
            if type(meta.get("format_version")) is not int or meta["format_version"] < 1:
                raise BundleError(f"{path}: format_version {meta.get('format_version')!r} is not a positive integer.")
            if not isinstance(meta.get("checksums", {}), dict):
                raise BundleError(f"{path}: checksums must be an object of member name to sha256 hex digest.")
            if meta["format_version"] > FORMAT_VERSION:
                raise BundleError(f"{path} uses bundle format {meta['format_version']}; upgrade cnncodes to read it.")
            expected = dict(meta.get("checksums", {}))
            unexpected = names - set(expected) - {_JSON}
            if unexpected:
                raise BundleError(f"{path} holds unexpected members {sorted(unexpected)}; refusing a tampered bundle.")
            arrays = {}
            spec = ExtractorSpec.from_dict(meta.get("extractor"), path)
            n_classes = len(meta["classes"]) if isinstance(meta.get("classes"), list) else 0
            for name, checksum in expected.items():
                if not (name.startswith("arrays/") and name.endswith(".npy") and name[7:-4] in _ARRAYS):
                    raise BundleError(f"{path} lists an unknown member {name!r}; refusing a tampered bundle.")
                try:
                    data = read_member(zf, name, _member_limit(name[7:-4], spec, n_classes))
                except MemberTooLarge as exc:
                    raise BundleError(f"{path}: {exc}, more than {spec.dims} dims x {n_classes} classes can need; "
                                      "refusing it.") from None  # fmt: skip
                if hashlib.sha256(data).hexdigest() != checksum:
                    raise BundleError(f"{path}: member {name} does not match its checksum; the file was modified.")
                arrays[name[7:-4]] = npy_array(data, f"{path}: member {name}")
    except (
        zipfile.BadZipFile,
        EOFError,
        KeyError,
        ValueError,
        OSError,
        RecursionError,
        RuntimeError,
        NotImplementedError,
    ) as exc:  # RuntimeError/NotImplementedError: encrypted or oddly compressed members
        if isinstance(exc, BundleError):
            raise
        raise BundleError(
            f"{path} is not a readable probe bundle ({type(exc).__name__}: {exc}); it may be truncated."
        ) from exc
    if not isinstance(meta.get("multilabel", False), bool):
        raise BundleError(f"{path}: bundle.json multilabel is {meta['multilabel']!r}, not true or false; the bundle is "
                          "malformed.")  # fmt: skip
    bundle = ProbeBundle(spec, meta.get("normalizer"),
                         meta.get("classifier"), meta.get("classes"), arrays, meta.get("metrics") or {},
                         meta.get("versions") or {}, meta.get("multilabel", False))  # fmt: skip
    check_bundle(bundle, path)
    return bundle


def check_bundle(bundle: ProbeBundle, where: str | os.PathLike) -> None:
    """Refuse a bundle whose parts do not fit together, before any image is touched."""
    from ..probing import LINEAR, NORMALIZERS

    def refuse(what: str) -> BundleError:
        return BundleError(f"{where}: {what}; the bundle is malformed. Save it again from a sweep (cnncodes sweep).")

    from ..images import Preprocessing

    try:
        Preprocessing.from_dict(bundle.extractor.model["preprocessing"])
    except CnncodesError as exc:
        raise refuse(f"extractor.model.preprocessing: {exc}") from None
    if bundle.normalizer not in NORMALIZERS:
        raise refuse(f"normalizer {bundle.normalizer!r} is not one of {list(NORMALIZERS)}")
    if bundle.classifier not in LINEAR:
        raise refuse(f"classifier {bundle.classifier!r} is not one of {list(LINEAR)}")
    classes = bundle.classes
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise refuse(f"classes {str(classes)[:80]} is not a list of at least 2 class names")
    if len(set(classes)) != len(classes) or not all(c and "\x00" not in c for c in classes):
        raise refuse(f"classes {str(classes)[:80]} repeat a name or hold an empty one; class names must be distinct")
    missing = [k for k in ("coef", "intercept") + (("scaler_mean", "scaler_scale") if bundle.normalizer == "standard" else ())
               if k not in bundle.arrays]  # fmt: skip
    if missing:
        raise refuse(f"arrays {missing} are missing")
    for name, array in bundle.arrays.items():
        if array.dtype.kind != "f" or not np.isfinite(array).all():
            raise refuse(f"array {name} is not finite floating point (dtype {array.dtype})")
    coef, intercept = bundle.arrays["coef"], bundle.arrays["intercept"]
    outputs = len(classes) if bundle.multilabel or len(classes) > 2 else 1
    dims = bundle.extractor.dims
    if (
        coef.ndim != 2
        or coef.shape[0] != outputs
        or intercept.shape != (outputs,)
        or (dims > 0 and coef.shape[1] != dims)
    ):
        raise refuse(f"coef {coef.shape} and intercept {intercept.shape} do not fit {len(classes)} classes and "
                     f"{dims} code dimensions")  # fmt: skip
    if bundle.normalizer == "standard":
        mean, scale = bundle.arrays["scaler_mean"], bundle.arrays["scaler_scale"]
        if mean.shape != (coef.shape[1],) or scale.shape != (coef.shape[1],) or (scale <= 0).any():
            raise refuse("scaler_mean/scaler_scale do not match the coefficients, or a scale is not positive")


def save_probe(result: Any, out: str | os.PathLike) -> Path:
    """Save a sweep's best probe as ``best_probe.zip`` in ``out``."""
    if not result.extractor:
        raise BundleError("this sweep ran on codes in memory, so nothing says how to compute them from images; a "
                          "bundle needs a sweep of a store (cnncodes.sweep) made by cnncodes.extract.")  # fmt: skip
    bundle = bundle_from_pipeline(result.estimator, result.extractor, result.classes, result.best_record())
    return save_bundle(bundle, Path(out) / "best_probe.zip")
