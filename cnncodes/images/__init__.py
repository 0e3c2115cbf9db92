"""Images: what the user gives (folders, CSVs, arrays, datasets) becomes RGB images, and RGB images become the
plain or seeded augmented pixel views a network is fed. The only room that decodes image files."""

from ._preprocess import (
    AUGMENTATIONS,
    PixelNormalizer,
    Preprocessing,
    normalize,
    parse_augment,
    pixel_transform,
    plain_transform,
    render_view,
    render_views,
    render_views_hwc,
    view_seed,
    view_transform,
)
from ._sources import (
    DEMOS,
    MULTILABEL_SEP,
    ArraySource,
    DatasetSource,
    FileSource,
    ImageSource,
    as_source,
    decode_image,
    open_source,
)

__all__ = [
    "AUGMENTATIONS",
    "DEMOS",
    "MULTILABEL_SEP",
    "ArraySource",
    "DatasetSource",
    "FileSource",
    "ImageSource",
    "Preprocessing",
    "as_source",
    "decode_image",
    "PixelNormalizer",
    "normalize",
    "open_source",
    "parse_augment",
    "pixel_transform",
    "plain_transform",
    "render_view",
    "render_views",
    "render_views_hwc",
    "view_seed",
    "view_transform",
]
