"""cnncodes: CNN codes + linear probes. Find the best layer of a frozen CNN for your images, with measurements.

Layout (one owner per concept):

* :mod:`cnncodes.backbones` -- a model spec becomes a frozen model, its preprocessing and a fingerprint
* :mod:`cnncodes.taps` -- the tap catalogue (where codes can be taken) and tap selection
* :mod:`cnncodes.pooling` -- poolings applied on the device
* :mod:`cnncodes.extractor` -- tensor-in, codes-out module (compute only)
* :mod:`cnncodes.sources` -- user input becomes RGB images (IO only)
* :mod:`cnncodes.preprocess` -- plain and seeded augmented views
* :mod:`cnncodes.store` -- the on-disk code store format, shard stores and their merge
* :mod:`cnncodes.shards` -- how extraction splits into shards (``I/N``, devices, launchers)
* :mod:`cnncodes.extract` -- the extraction run that joins them
* :mod:`cnncodes.sweep`, :mod:`cnncodes.report`, :mod:`cnncodes.bundle`, :mod:`cnncodes.deploy` -- probes, results,
  saved probes
* :mod:`cnncodes.cli` -- the command line
"""

__version__ = "0.1.0"

from .backbones import Backbone, BackboneError, WeightsUnavailableError, load_backbone
from .extract import extract
from .extractor import CodeExtractor
from .pooling import Pooling
from .preprocess import Preprocessing
from .sources import ImageDecodeError, ImageSource, SourceError, open_source
from .store import CodeStore, StoreError, merge_shards
from .taps import TapCatalogue, TapInfo, TapSelectionError, list_taps

__all__ = [
    "Backbone",
    "BackboneError",
    "CodeExtractor",
    "CodeStore",
    "ImageDecodeError",
    "ImageSource",
    "Pooling",
    "Preprocessing",
    "SourceError",
    "StoreError",
    "TapCatalogue",
    "TapInfo",
    "TapSelectionError",
    "WeightsUnavailableError",
    "extract",
    "list_taps",
    "load_backbone",
    "merge_shards",
    "open_source",
    "__version__",
]
