"""`CNNCodes`: CNN codes as a scikit-learn transformer, for use inside Pipeline and GridSearchCV."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._compat import deprecated_alias
from .errors import FingerprintMismatchError, ImageDecodeError, ParameterTypeError
from .images import ImageSource, as_source
from .network import Backbone, CodeExtractor, encode, load_backbone, numerics, resolve_device

__all__ = ["CNNCodes"]


@functools.lru_cache(maxsize=4)
def _shared_backbone(model: str, weights: str | None, input_size: int | None) -> Backbone:
    # Frozen backbones are read-only, so clones of one transformer (GridSearchCV) can share one loaded copy.
    return load_backbone(model, weights=weights, input_size=input_size)


@functools.lru_cache(maxsize=16)
def _shared_extractor(model: str, weights: str | None, input_size: int | None, taps: Any, poolings: Any,
                      relu: Any) -> CodeExtractor:  # fmt: skip
    # Clones with the same settings share one extractor, and so one device copy of the network (CodeExtractor.on).
    return CodeExtractor(_shared_backbone(model, weights, input_size), taps, poolings, relu=relu)


def _key(value: Any) -> Any:
    """A hashable spelling of a tap, pooling or relu setting (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


class CNNCodes(TransformerMixin, BaseEstimator):
    """Images -> CNN codes of a frozen backbone, as a scikit-learn transformer.

    Parameters
    ----------
    model : str, default="efficientnet_lite0"
        Model spec (see :func:`cnncodes.load_backbone`).
    taps : str or list of str, default="stages"
        Tap selection (names, ``stages``, ``last:K``...).
    poolings : str or list of str, default="avg"
        Poolings, comma-separated (``"avg,avg2"``); codes of every (tap, pooling) are concatenated.
    relu : {"auto", "always", "never"}, default="auto"
        Rectify taps the network did not rectify itself.
    input_size : int, optional
        Input side in pixels (default: the model's).
    weights : str, optional
        Local weights file for the model spec.
    batch_size : int, default=64
    device : str, default="auto"
    amp : bool, default=True
        On CUDA, run the network in bfloat16 (float16 where the GPU lacks it); ``False`` runs IEEE float32 (no TF32).
    memory : str or joblib.Memory, optional
        Directory caching the codes of every image (keyed by its pixels, the extractor and the numerics it runs at), so
        a grid search over the probe never runs the network twice on the same image.
    pooling : str, optional
        Deprecated spelling of ``poolings``; removed in cnncodes 0.3.

    Attributes
    ----------
    fingerprint_ : str
        Weights fingerprint of the backbone; a pickled transformer refuses to run on other weights.
    taps_ : list of str
    poolings_ : list of str
    n_features_out_ : int

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from cnncodes import CNNCodes, TorchLogisticRegression
    >>> clf = make_pipeline(CNNCodes(taps="blocks.5.0.bn1", poolings="avg2"), TorchLogisticRegression())  # doctest: +SKIP
    >>> clf.fit(images, labels).predict(new_images)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str = "efficientnet_lite0",
        taps: str | list[str] = "stages",
        poolings: str | list[str] = "avg",
        relu: str | bool = "auto",
        input_size: int | None = None,
        weights: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
        amp: bool = True,
        memory: Any = None,
        pooling: str | None = None,
    ) -> None:
        self.model = model
        self.taps = taps
        self.poolings = poolings
        self.relu = relu
        self.input_size = input_size
        self.weights = weights
        self.batch_size = batch_size
        self.device = device
        self.amp = amp
        self.memory = memory
        self.pooling = pooling

    def fit(self, X: Any, y: Any = None) -> CNNCodes:
        """Load the backbone and resolve the taps; ``X`` and ``y`` are not used."""
        extractor = self._build()
        self.fingerprint_ = self._backbone.fingerprint
        self.taps_ = [t.name for t in extractor.taps]
        self.poolings_ = [p.name for p in extractor.poolings]
        self.dims_ = list(extractor.code_dims().values())
        self.n_features_out_ = int(sum(self.dims_))
        return self

    def _build(self) -> CodeExtractor:
        if not isinstance(self.model, str):
            raise ParameterTypeError(
                f"model must be a model spec string (got {type(self.model).__name__}); see cnncodes.load_backbone."
            )
        self._backbone = _shared_backbone(self.model, self.weights, self.input_size)
        poolings = deprecated_alias("pooling", self.pooling, "poolings", self.poolings, "avg", stacklevel=4)
        self._extractor = _shared_extractor(self.model, self.weights, self.input_size, _key(self.taps), _key(poolings),
                                            _key(self.relu))  # fmt: skip
        return self._extractor

    def _ready(self) -> CodeExtractor:
        check_is_fitted(self, "fingerprint_")
        if getattr(self, "_extractor", None) is None:  # unpickled: reload from the spec, then check the weights
            self._build()
            if self._backbone.fingerprint != self.fingerprint_:
                raise FingerprintMismatchError(
                    f"{self.model!r} now loads weights {self._backbone.fingerprint[:19]}..., but this transformer was "
                    f"fitted with {self.fingerprint_[:19]}...; give the original weights (weights=PATH) or refit."
                )
        return self._extractor

    def transform(self, X: Any) -> np.ndarray:
        """Codes (n_images, n_features_out_) float32 for image paths, PIL images or uint8 arrays (N, H, W[, C])."""
        extractor = self._ready()
        source = as_source(X)
        keys = self._cache_keys(source) if self.memory is not None else None
        out = np.empty((len(source), self.n_features_out_), dtype=np.float32)
        todo = list(range(len(source)))
        if keys is not None:
            todo = [i for i in todo if not self._cached(keys[i], out, i)]
        if todo:
            subset = _Subset(source, todo)
            codes, reasons = encode(
                subset, extractor, self._backbone.preprocessing, batch_size=self.batch_size, device=self.device,
                amp=self.amp,
            )  # fmt: skip
            bad = [(source.ids[todo[j]], r) for j, r in enumerate(reasons) if r]
            if bad:
                raise ImageDecodeError(*bad[0])
            block = np.concatenate([codes[k] for k in extractor.code_dims()], axis=1)
            out[todo] = block
            if keys is not None:
                for j, i in enumerate(todo):
                    self._store(keys[i], block[j])
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``"{tap}__{pooling}_{k}"`` for every output column."""
        check_is_fitted(self, "fingerprint_")
        names = []
        for (tap, pooling), dims in zip(((t, p) for t in self.taps_ for p in self.poolings_), self.dims_):
            names += [f"{tap}__{pooling}_{k}" for k in range(dims)]
        return np.asarray(names, dtype=object)

    # -- per-image code cache -----------------------------------------------------------------------------------------
    def _cache_dir(self) -> Path:
        location = getattr(self.memory, "location", self.memory)
        config = json.dumps(
            [self.fingerprint_, self.taps_, self.poolings_, self.relu, self._backbone.preprocessing.to_dict(),
             numerics(resolve_device(self.device), self.amp)]
        )  # fmt: skip
        return Path(location) / "cnncodes-codes" / hashlib.sha256(config.encode()).hexdigest()[:16]

    def _cache_keys(self, source: ImageSource) -> list[str | None]:
        keys: list[str | None] = []
        for i in range(len(source)):
            try:
                image = source.load(i)
            except ImageDecodeError:
                keys.append(None)
                continue
            digest = hashlib.blake2b(image.tobytes(), digest_size=16)
            digest.update(f"{image.size}{image.mode}".encode())
            keys.append(digest.hexdigest())
        return keys

    def _cached(self, key: str | None, out: np.ndarray, i: int) -> bool:
        if key is None:
            return False
        path = self._cache_dir() / f"{key}.npy"
        if not path.exists():
            return False
        try:
            row = np.load(path, allow_pickle=False)
            if row.shape != out[i].shape or not np.isfinite(row).all():
                raise ValueError(f"shape {row.shape}")
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)  # a damaged entry (a kill mid-write, a full disk) is a miss: recompute it
            return False
        out[i] = row
        return True

    def _store(self, key: str | None, row: np.ndarray) -> None:
        if key is None:
            return
        folder = self._cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, row, allow_pickle=False)
        os.replace(tmp, folder / f"{key}.npy")

    # -- pickling without the weights ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_backbone", None)
        state.pop("_extractor", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "poolings" not in state:  # pickled by cnncodes 0.1, which spelled it `pooling`
            state = {**state, "poolings": state.get("pooling") or "avg", "pooling": None}
        super().__setstate__(state)

    def __sklearn_tags__(self):  # noqa: D105 - scikit-learn protocol
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.non_deterministic = False
        tags.input_tags.two_d_array = False  # images, not feature matrices
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        return tags


class _Subset(ImageSource):
    """Some items of another source, in the given order."""

    def __init__(self, source: ImageSource, index: list[int]) -> None:
        super().__init__([source.ids[i] for i in index], source.labels[index], source.classes, source.description)
        self._source = source
        self._rows = index

    def load(self, i: int):
        return self._source.load(self._rows[i])
