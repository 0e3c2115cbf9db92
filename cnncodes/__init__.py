"""cnncodes: CNN codes + linear probes. Find the best layer of a frozen CNN for your images, with measurements.

The public API is what this module exports (``cnncodes.__all__``) plus :mod:`cnncodes.errors`; the subpackages are
the internal rooms of the pipeline and may change between releases::

    images      user input -> RGB images -> plain or seeded augmented pixel views     (decodes files)
    network     model spec -> frozen backbone -> taps, layouts, pooled codes          (compute)
    store       codes on disk: reader, crash-safe writer, shards and their merge      (IO)
    extraction  the run joining images, network and store; sharding across processes
    probing     linear probes and the in-memory sweep                                 (compute)
    deploy      probe bundles, prediction from a bundle alone, model export
    sweeps      a sweep of a store and its report: table, CSV, plot, best probe
    adapter     CNNCodes, the scikit-learn transformer
    cli         the ``cnncodes`` command

Names are imported on first use, so ``import cnncodes`` (and ``cnncodes --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ArrayNotFoundError,
    BackboneError,
    BundleError,
    CnncodesError,
    ExtractionError,
    FingerprintMismatchError,
    ImageDecodeError,
    IncompleteStoreError,
    MissingExtraError,
    ParameterError,
    ParameterTypeError,
    PoolingError,
    SchedulerError,
    SourceError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    TapSelectionError,
    WeightsUnavailableError,
)

__version__ = "0.2.0"

#: public name -> the room that owns it
_LAZY = {
    "extract": "extraction",
    "finetune": "training",
    "depth": "training",
    "load_finetuned": "training",
    "FinetuneConfig": "training",
    "load_backbone": "network",
    "list_taps": "network",
    "Backbone": "network",
    "TapInfo": "network",
    "TapCatalogue": "network",
    "Pooling": "network",
    "CodeExtractor": "network",
    "Preprocessing": "images",
    "ImageSource": "images",
    "open_source": "images",
    "CodeStore": "store",
    "merge_shards": "store",
    "sweep": "sweeps",
    "write_report": "sweeps",
    "format_table": "sweeps",
    "sweep_codes": "probing",
    "SweepResult": "probing",
    "SweepRow": "probing",
    "SweepConfig": "probing",
    "make_probe": "probing",
    "TorchLogisticRegression": "probing",
    "TorchLinearSVC": "probing",
    "load_bundle": "deploy",
    "bundle_digest": "deploy",
    "save_probe": "deploy",
    "export_probe": "deploy",
    "DeployedProbe": "deploy",
    "ProbeBundle": "deploy",
    "CNNCodes": "adapter",
}

__all__ = [
    *sorted(_LAZY),
    "BackboneError",
    "BundleError",
    "CnncodesError",
    "ExtractionError",
    "FingerprintMismatchError",
    "ImageDecodeError",
    "ArrayNotFoundError",
    "IncompleteStoreError",
    "MissingExtraError",
    "ParameterError",
    "ParameterTypeError",
    "PoolingError",
    "SchedulerError",
    "SourceError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "TapSelectionError",
    "WeightsUnavailableError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    room = _LAZY.get(name)
    if room is None:
        raise AttributeError(f"module 'cnncodes' has no attribute {name!r}; the public names are in cnncodes.__all__.")
    value = getattr(importlib.import_module(f".{room}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what static tools see; at run time these import lazily
    from .adapter import CNNCodes
    from .deploy import DeployedProbe, ProbeBundle, bundle_digest, export_probe, load_bundle, save_probe
    from .extraction import extract
    from .images import ImageSource, Preprocessing, open_source
    from .network import Backbone, CodeExtractor, Pooling, TapCatalogue, TapInfo, list_taps, load_backbone
    from .probing import (
        SweepConfig,
        SweepResult,
        SweepRow,
        TorchLinearSVC,
        TorchLogisticRegression,
        make_probe,
        sweep_codes,
    )
    from .store import CodeStore, merge_shards
    from .sweeps import format_table, sweep, write_report
