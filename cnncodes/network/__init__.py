"""Network: a model spec becomes a frozen backbone; its taps are found, each with the layout of its axes; codes are
pooled on the device by a :class:`CodeExtractor` that stops after the deepest tap; :func:`encode` runs it over an
image source batch by batch. Tensors in, codes out: nothing here writes files."""

from ._backbones import DEFAULT_MODEL, Backbone, load_backbone, read_state_dict, weights_fingerprint
from ._cost import LatencyTimes, TapCost, architecture_of, forward_flops, measure_latency, tap_costs
from ._encode import (
    DTYPES,
    ImageViews,
    autocast_dtype,
    default_workers,
    encode,
    images_per_batch,
    iter_batches,
    numerics,
    precision,
    resolve_device,
)
from ._extractor import CodeExtractor
from ._layout import Layout
from ._pooling import Pooling, parse_poolings
from ._taps import RELU_MODES, TapCatalogue, TapInfo, check_relu_mode, list_taps
from ._top import Top, cut_points, first_block, top_above

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "RELU_MODES",
    "Backbone",
    "CodeExtractor",
    "ImageViews",
    "Layout",
    "Pooling",
    "TapCatalogue",
    "TapCost",
    "architecture_of",
    "forward_flops",
    "measure_latency",
    "tap_costs",
    "TapInfo",
    "Top",
    "cut_points",
    "first_block",
    "top_above",
    "iter_batches",
    "autocast_dtype",
    "default_workers",
    "numerics",
    "precision",
    "check_relu_mode",
    "encode",
    "images_per_batch",
    "list_taps",
    "load_backbone",
    "parse_poolings",
    "read_state_dict",
    "resolve_device",
    "weights_fingerprint",
    "LatencyTimes",
]
