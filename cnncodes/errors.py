"""Every error cnncodes raises on purpose, under one base: :class:`CnncodesError`.

Catch ``CnncodesError`` to handle anything the user can fix (a bad argument, a damaged file, a model that cannot be
loaded); anything else that escapes cnncodes is a bug. Each class also derives from the builtin error a caller would
have caught before the hierarchy existed (``ValueError``, ``RuntimeError``...), so existing ``except`` clauses keep
working. The command line prints these (and OS errors such as a full disk) as one line and exits with status 2.
"""

from __future__ import annotations

__all__ = [
    "CnncodesError",
    "ParameterError",
    "ParameterTypeError",
    "BackboneError",
    "WeightsUnavailableError",
    "TapSelectionError",
    "PoolingError",
    "SourceError",
    "ImageDecodeError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "IncompleteStoreError",
    "ArrayNotFoundError",
    "ExtractionError",
    "BundleError",
    "FingerprintMismatchError",
    "MissingExtraError",
    "SchedulerError",
]


class CnncodesError(Exception):
    """Base class of every error cnncodes raises on purpose; the message says what to do next."""


class ParameterError(CnncodesError, ValueError):
    """An argument has a value cnncodes cannot use; the message names the argument and what is allowed."""


class ParameterTypeError(ParameterError, TypeError):
    """An argument has the wrong type (also a ``TypeError``, as it was before the hierarchy existed)."""


class BackboneError(CnncodesError, ValueError):
    """A model spec or weights file cannot be turned into a backbone."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights are neither cached nor downloadable (typically: offline)."""


class TapSelectionError(CnncodesError, ValueError):
    """A tap selection names an unknown tap or an impossible range."""


class PoolingError(CnncodesError, ValueError):
    """A pooling name is unknown, or does not apply to a tap's layout."""


class SourceError(CnncodesError, ValueError):
    """The image source as a whole is unusable (missing folder, empty folder, bad CSV, wrong array shape...)."""


class ImageDecodeError(CnncodesError):
    """One image could not be decoded.

    Parameters
    ----------
    id : str
        The file path or item id (``'array[3]'``, ``'dataset[7]'``) of the bad image.
    reason : str
        Short description of the problem, e.g. ``'zero-byte file'`` or ``'truncated image'``.

    Attributes
    ----------
    id : str
        Same as the parameter.
    reason : str
        Same as the parameter.
    """

    def __init__(self, id: str, reason: str) -> None:  # noqa: A002 - `id` is the public attribute name
        # Both values go to Exception.args so the error survives pickling (DataLoader workers, multiprocessing).
        super().__init__(id, reason)
        self.id = id
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot decode image {self.id!r}: {self.reason}"


class StoreError(CnncodesError, RuntimeError):
    """A code store cannot be opened or written as asked."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class StoreMismatchError(StoreError):
    """An existing store was made with different settings."""


class IncompleteStoreError(StoreError):
    """The store's extraction has not finished."""


class ArrayNotFoundError(StoreError, KeyError):
    """A store holds no array for the tap and pooling asked for (also a ``KeyError``, as before)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ExtractionError(CnncodesError, RuntimeError):
    """An extraction split over several processes failed in one of them; finished shards are kept."""


class BundleError(CnncodesError, ValueError):
    """A bundle cannot be written or is not a valid bundle."""


class FingerprintMismatchError(BundleError):
    """The backbone's weights are not the ones the probe was trained on."""


class MissingExtraError(CnncodesError, ImportError):
    """An optional dependency (a cnncodes extra) is not installed."""


class SchedulerError(CnncodesError, ConnectionError):
    """The Dask scheduler named by the user cannot be reached."""
