"""Image sources: the one place where user input becomes RGB PIL images.

:func:`open_source` turns a folder, a CSV file, a uint8 array, a torch ``Dataset`` or a demo name into an
:class:`ImageSource`, a random-access list of images with ids, integer labels and class names. Sources hold only
plain data (paths, arrays), so they pickle cheaply into ``DataLoader`` worker processes; decoding happens lazily in
:meth:`ImageSource.load`.

One bad image must never end a long run: every per-item problem (missing file, not an image, truncated data,
decompression bomb, a dataset that raises) surfaces as :class:`ImageDecodeError`, which callers record and skip.
Problems with the source as a whole raise :class:`SourceError` when the source is opened.
"""

from __future__ import annotations

import csv
import operator
import os
import re
import stat
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .._labels import MULTILABEL_SEP
from ..errors import ImageDecodeError, ParameterError, SourceError

__all__ = [
    "ImageSource",
    "FileSource",
    "ArraySource",
    "DatasetSource",
    "DEMOS",
    "open_source",
    "as_source",
    "decode_image",
    "decode_image",
]

#: Names accepted after ``demo:`` by :func:`open_source`.
DEMOS = ("digits",)

_OPENING = threading.Lock()  # see decode_image

_ACCEPTED = (
    "an ImageSource, 'demo:digits', a path to a folder (class sub-folders or plain image files), a path to a .csv "
    "file with path,label rows, a uint8 ndarray of shape (N, H, W, 3) or (N, H, W), or a map-style torch Dataset"
)


class ImageSource:
    """A random-access list of images, each loaded as an RGB PIL image.

    Subclasses implement :meth:`load`; the constructor checks that ids, labels and classes agree.

    Parameters
    ----------
    ids : sequence of str
        One id per image: the absolute file path for files, ``'array[i]'``, ``'dataset[i]'`` or ``'digits[i]'``
        otherwise.
    labels : array-like of int of shape (n_images,) or (n_images, n_classes)
        Class index per image, ``-1`` where the image is unlabeled; or, for multi-label images, a 0/1 indicator
        matrix (row ``i``, column ``k``: image ``i`` shows class ``k``).
    classes : sequence of str
        Class names; ``classes[k]`` is the name of label ``k``. Empty when no image is labeled.
    description : str
        Short text recorded in manifests, e.g. ``'imagefolder:/data/pets'``.

    Attributes
    ----------
    ids : list of str
        One id per image.
    labels : ndarray of int64 of shape (n_images,) or (n_images, n_classes)
        Class index per image, ``-1`` where unlabeled; or the multi-label indicator matrix.
    classes : list of str
        Class names indexed by label value.
    description : str
        Short description of where the images come from.

    See Also
    --------
    open_source : Build the right source from a path, an array, a dataset or a demo name.
    """

    def __init__(self, ids: Sequence[str], labels: Any, classes: Sequence[str], description: str) -> None:
        self.ids = [str(i) for i in ids]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [str(c) for c in classes]
        self.description = str(description)
        n = len(self.ids)
        if n == 0:
            raise SourceError(f"{self.description}: the source holds no images; give at least one image.")
        if self.labels.ndim == 2:
            if self.labels.shape != (n, len(self.classes)) or not np.isin(self.labels, (0, 1)).all():
                raise SourceError(f"{self.description}: multi-label labels must be a 0/1 matrix of shape ({n}, "
                                  f"{len(self.classes)}) (images x classes), got {self.labels.shape}.")  # fmt: skip
            return
        self.labels = self.labels.reshape(-1)
        if self.labels.shape != (n,):
            raise SourceError(f"{self.description}: {n} ids but {self.labels.size} labels; give one label per image.")
        if self.labels.min() < -1 or self.labels.max() >= len(self.classes):
            raise SourceError(
                f"{self.description}: labels range from {self.labels.min()} to {self.labels.max()} but there are "
                f"{len(self.classes)} classes; labels must be -1 (unlabeled) or 0..{len(self.classes) - 1}."
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def multilabel(self) -> bool:
        """Whether an image may show several classes (``labels`` is an images x classes indicator matrix)."""
        return self.labels.ndim == 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, images={len(self)}, classes={len(self.classes)})"

    def load(self, i: int) -> Image.Image:
        """Load image ``i`` as an RGB PIL image.

        Parameters
        ----------
        i : int
            Image index, ``0 <= i < len(self)``.

        Returns
        -------
        PIL.Image.Image
            Fully loaded image in mode ``'RGB'``.

        Raises
        ------
        ImageDecodeError
            When this item cannot be turned into an image; the error carries the item id and the reason.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load(i).")

    def _index(self, i: int) -> int:
        try:
            index = operator.index(i)
        except TypeError:
            raise TypeError(f"image index must be an integer, got {type(i).__name__} {i!r}.") from None
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} is out of range for {n} images (0 to {n - 1}).")
        return index % n


class FileSource(ImageSource):
    """Images stored as files, decoded with :func:`decode_image` on each :meth:`load`.

    Parameters
    ----------
    paths : sequence of str or path-like
        Image files; relative paths are made absolute against the current directory.
    labels : array-like of shape (n_images,), optional
        Class indices (``-1`` = unlabeled) or class names (``None`` or ``''`` = unlabeled). Omit for unlabeled files.
    classes : sequence of str, optional
        Class names in label order. Defaults to the sorted unique names for string labels and ``'0'..'K'`` for
        integer labels.
    description : str, default="files"
        Short text recorded in manifests.
    max_pixels : int, optional
        Per-image pixel limit passed to :func:`decode_image`.

    Examples
    --------
    >>> src = FileSource(["/data/a.png", "/data/b.png"], labels=["cat", "dog"])
    >>> src.classes, src.labels.tolist()
    (['cat', 'dog'], [0, 1])
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Any = None,
        classes: Sequence[str] | None = None,
        *,
        description: str = "files",
        max_pixels: int | None = None,
    ) -> None:
        ids = [os.path.abspath(os.fspath(p)) for p in paths]
        label_array, class_names = _resolve_labels(labels, classes, len(ids), description)
        super().__init__(ids, label_array, class_names, description)
        self.max_pixels = _check_max_pixels(max_pixels)

    def load(self, i: int) -> Image.Image:
        """Decode file ``i`` as an RGB image; see :meth:`ImageSource.load`."""
        return decode_image(self.ids[self._index(i)], max_pixels=self.max_pixels)


class ArraySource(ImageSource):
    """Images held in one uint8 array.

    Parameters
    ----------
    images : ndarray of uint8 of shape (n_images, height, width, 3) or (n_images, height, width)
        RGB or grayscale pixels. A trailing channel axis of size 1 is read as grayscale.
    labels : array-like of shape (n_images,), optional
        Class indices (``-1`` = unlabeled) or class names.
    classes : sequence of str, optional
        Class names in label order.
    description : str, default="array"
        Short text recorded in manifests.
    id_prefix : str, default="array"
        Ids are ``f"{id_prefix}[{i}]"``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Any = None,
        classes: Sequence[str] | None = None,
        *,
        description: str = "array",
        id_prefix: str = "array",
    ) -> None:
        if not isinstance(images, np.ndarray):
            raise SourceError(f"images must be a numpy ndarray, got {type(images).__name__}.")
        if images.dtype != np.uint8:
            raise SourceError(
                f"image array has dtype {images.dtype}; only uint8 (0..255) is accepted. Convert first, e.g. "
                "(x * 255).round().astype(np.uint8) for floats in [0, 1]."
            )
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise SourceError(
                f"image array has shape {images.shape}; expected (N, H, W, 3) for RGB or (N, H, W) for grayscale."
            )
        if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            raise SourceError(
                f"image array of shape {images.shape} holds no pixels; pass at least one non-empty image."
            )
        n = images.shape[0]
        label_array, class_names = _resolve_labels(labels, classes, n, description)
        super().__init__([f"{id_prefix}[{i}]" for i in range(n)], label_array, class_names, description)
        self.images = images

    def load(self, i: int) -> Image.Image:
        """Return image ``i`` as an RGB image; see :meth:`ImageSource.load`."""
        return _uint8_to_rgb(self.images[self._index(i)])


class DatasetSource(ImageSource):
    """Images from a map-style dataset whose items are ``(image, label)`` or ``image``.

    An image may be a PIL image, a uint8 HWC ndarray, or a CHW torch tensor (uint8, or float in [0, 1]). Item labels
    are not read (that would decode every image); labels come from ``labels`` or ``dataset.targets``.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset or any object with ``__len__`` and ``__getitem__``
        The dataset; it must be picklable to be used with ``DataLoader`` workers.
    labels : array-like of shape (n_images,), optional
        Class indices or names. Defaults to ``dataset.targets`` when present, else all ``-1``.
    classes : sequence of str, optional
        Class names in label order. Defaults to ``dataset.classes`` when present.
    description : str, optional
        Defaults to ``'dataset:<class name>'``.
    """

    def __init__(
        self,
        dataset: Any,
        labels: Any = None,
        classes: Sequence[str] | None = None,
        *,
        description: str | None = None,
    ) -> None:
        description = description or f"dataset:{type(dataset).__name__}"
        try:
            n = len(dataset)
        except Exception as exc:
            raise SourceError(f"{description}: len(dataset) failed ({type(exc).__name__}: {exc}).") from exc
        from_targets = labels is None and getattr(dataset, "targets", None) is not None
        if from_targets:
            labels = dataset.targets
        if classes is None and getattr(dataset, "classes", None) is not None:
            classes = [str(c) for c in dataset.classes]
        if labels is None:
            labels = np.full(n, -1, dtype=np.int64)
        try:
            label_array, class_names = _resolve_labels(labels, classes, n, description)
        except SourceError as exc:
            if not from_targets:
                raise
            raise SourceError(
                f"{exc} (labels were read from dataset.targets and classes from dataset.classes; pass labels= and "
                "classes= to open_source to override them, e.g. labels=np.full(len(dataset), -1) for unlabeled)"
            ) from exc
        super().__init__([f"dataset[{i}]" for i in range(n)], label_array, class_names, description)
        self.dataset = dataset

    def load(self, i: int) -> Image.Image:
        """Fetch item ``i`` and return its image as RGB; see :meth:`ImageSource.load`."""
        index = self._index(i)
        item_id = self.ids[index]
        try:
            item = self.dataset[index]
        except ImageDecodeError as exc:
            raise ImageDecodeError(item_id, f"{exc.id}: {exc.reason}") from exc
        except Exception as exc:
            raise ImageDecodeError(item_id, f"dataset raised {type(exc).__name__}: {exc}") from exc
        image = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
        return _item_to_rgb(image, item_id)


def open_source(
    source: Any,
    *,
    labels: Any = None,
    classes: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> ImageSource:
    """Turn user input into an :class:`ImageSource`.

    Parameters
    ----------
    source : ImageSource, str, path-like, ndarray or Dataset
        - an :class:`ImageSource`: returned unchanged;
        - ``'demo:digits'``: scikit-learn's 1797 8x8 digits, upscaled to 32x32 RGB, labeled ``'0'..'9'``;
        - a folder with class sub-folders (ImageFolder layout): classes are the sorted sub-folder names and every
          non-hidden file below a class folder is an image (a non-image file fails at load time, so it is recorded
          rather than silently skipped); files directly in the root are ignored;
        - a folder with only files: unlabeled images;
        - a ``.csv`` file with rows ``path,label`` (header optional, label optional, relative paths resolved
          against the CSV's folder);
        - a uint8 ndarray of shape (N, H, W, 3) or (N, H, W);
        - a map-style torch ``Dataset`` whose items are ``(image, label)`` or ``image``.
    labels : array-like of shape (n_images,), optional
        Labels for array and dataset sources: class indices (``-1`` = unlabeled) or class names.
    classes : sequence of str, optional
        Class names in label order, for array and dataset sources.
    max_pixels : int, optional
        Reject files with more pixels than this (see :func:`decode_image`). Applies to folder and CSV sources.

    Returns
    -------
    ImageSource
        Ids, labels, classes and description are filled in; images are decoded lazily by ``load``.

    Raises
    ------
    SourceError
        When the source is unusable as a whole: missing path, empty folder, malformed CSV, wrong array dtype or
        shape, labels of the wrong length, or an unsupported kind of input.

    Examples
    --------
    >>> src = open_source("demo:digits")
    >>> len(src), src.classes[:3], src.load(0).size
    (1797, ['0', '1', '2'], (32, 32))
    """
    max_pixels = _check_max_pixels(max_pixels)
    takes_labels = isinstance(source, np.ndarray) or _is_dataset(source)
    if not takes_labels and (labels is not None or classes is not None):
        raise SourceError(
            f"labels=/classes= apply only to array and Dataset sources, but the source is {_describe(source)}; "
            "folders take labels from class sub-folders and CSV files from their label column."
        )
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, str) and source.startswith("demo:"):
        return _open_demo(source[len("demo:") :])
    if isinstance(source, (str, os.PathLike)):
        return _open_path(os.fspath(source), max_pixels)
    if isinstance(source, np.ndarray):
        return ArraySource(source, labels, classes)
    if isinstance(source, torch.utils.data.IterableDataset):
        raise SourceError(
            f"got an IterableDataset ({type(source).__name__}); images must be addressable by index. Use a map-style "
            "Dataset (with __len__ and __getitem__) or save the images to a folder."
        )
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, os.PathLike)):
        raise SourceError(
            f"got a {type(source).__name__} of paths; wrap it as cnncodes.sources.FileSource(paths, labels=...) "
            "or write a CSV file with path,label rows."
        )
    if _is_dataset(source):
        return DatasetSource(source, labels, classes)
    raise SourceError(f"cannot read images from {_describe(source)}; accepted: {_ACCEPTED}.")


def decode_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Decode one image file into a fully loaded RGB PIL image.

    EXIF orientation is applied. Grayscale, palette (with or without transparency), alpha, CMYK and YCbCr images
    are converted to RGB (alpha is dropped, as torchvision's default loader does). 16-bit images are scaled
    (``value / 257``), not clipped; 32-bit integer images use the 16-bit scale when their values fit in 0..65535 and
    are stretched from min..max otherwise; float images are scaled by 255 when in [0, 1], kept when in [0, 255],
    and stretched otherwise. Truncated files are errors (PIL's global ``LOAD_TRUNCATED_IMAGES`` is not consulted
    or changed).

    Parameters
    ----------
    path : str or path-like
        The image file.
    max_pixels : int, optional
        Reject images with more pixels than this before their pixel data is decoded. Defaults to PIL's
        ``Image.MAX_IMAGE_PIXELS``. It can only tighten PIL's own limit, which still applies; raise
        ``PIL.Image.MAX_IMAGE_PIXELS`` yourself to accept larger images.

    Returns
    -------
    PIL.Image.Image
        An image in mode ``'RGB'``, detached from the file (no handle is left open).

    Raises
    ------
    ImageDecodeError
        With ``id`` = ``path`` as given and a short ``reason``: ``'file not found'``, ``'zero-byte file'``,
        ``'not an image (cannot identify image file)'``, ``'truncated image'``, ``'decompression bomb: ...'``, etc.
    """
    path_str = os.fspath(path)
    limit = _check_max_pixels(max_pixels)
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = Image.MAX_IMAGE_PIXELS if limit is None else min(limit, Image.MAX_IMAGE_PIXELS)

    try:
        info = os.stat(path_str)
    except FileNotFoundError:
        raise ImageDecodeError(path_str, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path_str, f"unreadable path ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError(path_str, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO or device could block forever.
        raise ImageDecodeError(path_str, "not a regular file")
    if info.st_size == 0:
        raise ImageDecodeError(path_str, "zero-byte file")

    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that, when it opens the file; turn that warning into an
        # error for the opening only. catch_warnings swaps process-wide filters, so threads that decode open one file
        # at a time; the pixel data, the slow part, is decoded outside the lock (its size is checked first).
        with _OPENING, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path_str)
        with image:
            _check_pixels(image, limit, path_str)
            image.load()
            _check_pixels(image, limit, path_str)  # some containers (ICO, ICNS) pick their image size only at load
            return _to_rgb(_apply_exif_orientation(image))
    except ImageDecodeError:
        raise
    except _UnsupportedMode as exc:
        raise ImageDecodeError(path_str, str(exc)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path_str, _bomb_reason(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path_str, "not an image (cannot identify image file)") from exc
    except PermissionError as exc:
        raise ImageDecodeError(path_str, "unreadable: permission denied") from exc
    except EOFError as exc:
        raise ImageDecodeError(path_str, "truncated image (unexpected end of file)") from exc
    except OSError as exc:
        if "truncat" in str(exc).lower():
            raise ImageDecodeError(path_str, "truncated image") from exc
        raise ImageDecodeError(path_str, f"corrupt image data ({exc})") from exc
    except Exception as exc:
        raise ImageDecodeError(path_str, f"corrupt image data ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------------------------
# decoding helpers


def _check_max_pixels(max_pixels: Any) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ParameterError(f"max_pixels must be a positive integer or None, got {max_pixels!r}.")
    return int(max_pixels)


def _check_pixels(image: Image.Image, limit: int | None, path: str) -> None:
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise ImageDecodeError(path, f"decompression bomb: {pixels} pixels > limit {limit}")


def _bomb_reason(exc: Exception) -> str:
    match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
    if match:
        return f"decompression bomb: {match.group(1)} pixels > limit {match.group(2)}"
    return f"decompression bomb: {exc}"


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # Corrupt EXIF does not make the pixels wrong; keep them unrotated, as image viewers do.
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB without clipping high-bit-depth data (an RGB image is returned as is)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        # Through RGBA: PIL warns when converting a palette image with byte transparency straight to RGB.
        if mode == "PA" or "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            return _gray_to_rgb(_stretch(values))
        return _gray_to_rgb(values / 257.0)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            return _gray_to_rgb(values * 255.0)
        if low >= 0 and high <= 255:
            return _gray_to_rgb(values)
        return _gray_to_rgb(_stretch(values))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise _UnsupportedMode(f"unsupported image mode {mode!r}") from exc


class _UnsupportedMode(Exception):
    """A PIL mode with no route to RGB; callers turn it into ImageDecodeError for their item id."""


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _item_to_rgb(image: Any, item_id: str) -> Image.Image:
    """A dataset item's image (PIL, HWC ndarray or CHW tensor) -> RGB PIL image, or ImageDecodeError."""
    if isinstance(image, Image.Image):
        try:
            image.load()
            return _to_rgb(image)
        except _UnsupportedMode as exc:
            raise ImageDecodeError(item_id, str(exc)) from exc
        except Exception as exc:
            raise ImageDecodeError(item_id, f"PIL image failed to load ({type(exc).__name__}: {exc})") from exc
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3):
            tensor = tensor.permute(1, 2, 0)
        elif tensor.ndim != 2:
            raise ImageDecodeError(
                item_id, f"tensor of shape {tuple(image.shape)}; expected (3, H, W), (1, H, W) or (H, W)"
            )
        return _pixels_to_rgb(tensor.numpy(), item_id, "tensor")
    if isinstance(image, np.ndarray):
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
            raise ImageDecodeError(item_id, f"array of shape {image.shape}; expected (H, W, 3), (H, W, 1) or (H, W)")
        return _pixels_to_rgb(image, item_id, "array")
    raise ImageDecodeError(
        item_id, f"item holds a {type(image).__name__}; expected a PIL image, a uint8 HWC array or a CHW tensor"
    )


def _pixels_to_rgb(pixels: np.ndarray, item_id: str, kind: str) -> Image.Image:
    """HWC or HW pixels (uint8, or float in [0, 1]) -> RGB PIL image."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if 0 in pixels.shape:
        raise ImageDecodeError(item_id, f"{kind} of shape {pixels.shape} holds no pixels")
    if pixels.dtype.kind == "f":
        low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        if np.isnan(pixels).any() or low < 0 or high > 1:
            raise ImageDecodeError(
                item_id,
                f"float {kind} values span {low:.3g}..{high:.3g}; expected [0, 1]. Remove Normalize from the "
                "dataset's transform: cnncodes applies the backbone's own preprocessing",
            )
        pixels = np.rint(pixels * 255.0).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ImageDecodeError(item_id, f"{kind} has dtype {pixels.dtype}; expected uint8, or float in [0, 1]")
    return _uint8_to_rgb(pixels)


def _uint8_to_rgb(pixels: np.ndarray) -> Image.Image:
    # fromarray copies RGB data but maps grayscale buffers in place; convert() then copies, so the result never
    # aliases the caller's array.
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# opening sources


def _is_dataset(source: Any) -> bool:
    if isinstance(source, (str, bytes, os.PathLike, np.ndarray, Mapping, ImageSource)):
        return False
    return hasattr(source, "__len__") and hasattr(source, "__getitem__")


def _describe(source: Any) -> str:
    if isinstance(source, np.ndarray):
        return f"an ndarray of dtype {source.dtype} and shape {source.shape}"
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"a {type(source).__module__}.{type(source).__qualname__}"


def _open_demo(name: str) -> ImageSource:
    if name != "digits":
        known = ", ".join(f"'demo:{d}'" for d in DEMOS)
        raise SourceError(f"unknown demo 'demo:{name}'; known demos: {known}.")
    from sklearn.datasets import load_digits  # only the demo needs it

    digits = load_digits()
    # 0..16 -> 0..255; 32x32 so the demo looks like a small image, the backbone's preprocessing resizes further.
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in small])
    return ArraySource(big, digits.target, [str(k) for k in range(10)], description="demo:digits", id_prefix="digits")


def _open_path(path: str, max_pixels: int | None) -> ImageSource:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise SourceError(
            f"image source path {path!r} does not exist (resolved to {full}); pass an existing folder or .csv file."
        )
    if os.path.isdir(full):
        return _open_folder(full, max_pixels)
    if full.lower().endswith(".csv"):
        return _open_csv(full, max_pixels)
    raise SourceError(
        f"{full} is a file but not a .csv; pass a folder of images, or a .csv file listing path,label rows "
        "(a single image also needs a folder or a one-row CSV)."
    )


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _list_files(folder: str) -> list[str]:
    """Every non-hidden file below ``folder`` (recursively, following links once), sorted by path."""
    found: list[str] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop; os.walk would otherwise descend until the path gets too long
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if _visible(d)]
        # Everything that is not a folder is kept (broken links, non-images) so it fails, and gets recorded, at load.
        found.extend(os.path.join(root, f) for f in files if _visible(f))
    return sorted(found)


def _open_folder(folder: str, max_pixels: int | None) -> ImageSource:
    with os.scandir(folder) as listing:
        entries = sorted((e for e in listing if _visible(e.name)), key=lambda e: e.name)
    class_dirs = [e.name for e in entries if e.is_dir()]
    if class_dirs:
        paths, labels = _class_files(folder, class_dirs)
        if not paths:
            raise SourceError(
                f"no image files found under {folder}: its class sub-folders ({', '.join(class_dirs[:5])}"
                f"{', ...' if len(class_dirs) > 5 else ''}) are empty; put images inside the class sub-folders."
            )
        return FileSource(
            paths,
            np.asarray(labels, dtype=np.int64),
            class_dirs,
            description=f"imagefolder:{folder}",
            max_pixels=max_pixels,
        )
    files = [e.path for e in entries if not e.is_dir() and (e.is_file() or e.is_symlink())]
    if not files:
        raise SourceError(
            f"no image files found under {folder}; expected class sub-folders (ImageFolder layout) or image files."
        )
    return FileSource(files, description=f"folder:{folder}", max_pixels=max_pixels)


def _class_files(folder: str, class_dirs: list[str]) -> tuple[list[str], list[int]]:
    """Every image file of every class folder, each real file once: links are resolved, and a file reached twice
    (a link inside one class folder into another, or a file linked to another) is kept once, under the folder that
    really holds it, with a warning naming the duplicates. Two class folders that are one folder are refused."""
    paths: list[str] = []
    labels: list[int] = []
    direct: list[bool] = []
    owner: dict[str, int] = {}  # real path -> its index in paths
    reached: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    real_top = os.path.realpath(folder)
    real_roots = {name: os.path.realpath(os.path.join(folder, name)) for name in class_dirs}
    for name, real_root in real_roots.items():
        holds = [other for other, r in real_roots.items() if r != real_root and _inside(r, real_root)]
        if _inside(real_top, real_root):
            raise SourceError(f"{folder}: class folder {name!r} is a link to {real_root}, which holds the image folder "
                              "itself, so its class would take the images of every class. Remove the link, or copy "
                              "that class's images into a folder of their own.")  # fmt: skip
        if holds:
            raise SourceError(f"{folder}: class folder {holds[0]!r} lies inside class folder {name!r} ({real_root}) "
                              "through a link, so one class would take the other's images. Remove the link, or copy "
                              "the images into folders of their own.")  # fmt: skip
    for k, name in enumerate(class_dirs):
        root = os.path.join(folder, name)
        real_root = real_roots[name]
        if real_root in reached:
            raise SourceError(f"{folder}: class folders {reached[real_root]!r} and {name!r} are the same folder "
                              f"({real_root}), reached through a link, so every image would be in both classes. Remove "
                              "the link, or copy the images into a folder of their own.")  # fmt: skip
        reached[real_root] = name
        for path in _list_files(root):
            real = os.path.realpath(path)
            inside = os.path.normpath(os.path.join(real_root, os.path.relpath(os.path.dirname(path), root)))
            here = not os.path.islink(path) and os.path.realpath(os.path.dirname(path)) == inside  # no link followed
            if real in owner:
                i = owner[real]
                if here and not direct[i]:  # the real place wins over the link reached first
                    dropped.append((paths[i], path))
                    paths[i], labels[i], direct[i] = path, k, True
                else:
                    dropped.append((path, paths[i]))
                continue
            owner[real] = len(paths)
            paths.append(path)
            labels.append(k)
            direct.append(here)
    if dropped:
        link, kept = dropped[0]
        warnings.warn(f"{folder}: {len(dropped)} file(s) are reached twice through links (e.g. {link} is {kept}); each "
                      "is kept once, under the folder that really holds it. Remove the links to silence this.",
                      UserWarning, stacklevel=5)  # fmt: skip
    return paths, labels


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _open_csv(csv_path: str, max_pixels: int | None) -> ImageSource:
    name = os.path.basename(csv_path)
    rows: list[tuple[int, str, str | None]] = []  # (line number, path, label or None)
    reader = None
    try:
        kind = os.stat(csv_path).st_mode
    except OSError as exc:
        raise SourceError(f"cannot read {csv_path} ({exc.strerror or exc}).") from exc
    if not stat.S_ISREG(kind):  # opening a FIFO would wait for a writer forever
        raise SourceError(f"{csv_path} is not a regular file (a FIFO, socket or device); give a CSV file of "
                          "'path,label' rows.")  # fmt: skip
    try:
        with open(csv_path, "rb") as handle:
            if handle.read(2) in (b"\xff\xfe", b"\xfe\xff"):
                raise SourceError(f"{csv_path} is UTF-16 text; save the CSV as UTF-8.")
        # utf-8-sig: spreadsheet programs often prepend a byte-order mark that would glue onto the first path.
        # surrogateescape: a path that is not UTF-8 (as a Linux disk may hold, and as cnncodes writes them to its
        # own CSVs) keeps its bytes and opens its file; checked below, so a CSV in another encoding is still refused.
        with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            first = True
            for row in reader:
                line = reader.line_num
                cells = [c.strip() for c in row]
                if not any(cells):
                    continue
                is_header = first and [c.lower() for c in cells] in (["path", "label"], ["path"])
                first = False
                if is_header:
                    continue
                if len(cells) > 2:
                    raise SourceError(
                        f"{name} line {line}: {len(cells)} fields {row!r}; expected 'path' or 'path,label' "
                        "(quote paths that contain commas)."
                    )
                if not cells[0]:
                    raise SourceError(f"{name} line {line}: empty path; every row needs an image path first.")
                if any("\x00" in c for c in cells):  # no file name or class name can hold it
                    raise SourceError(f"{name} line {line}: a NUL character in {row!r}; no path or class name may "
                                      "contain one: fix that line.")  # fmt: skip
                rows.append((line, cells[0], cells[1] if len(cells) == 2 and cells[1] else None))
    except csv.Error as exc:
        where = reader.line_num if reader is not None else "?"
        raise SourceError(f"{name} line {where}: malformed CSV ({exc}); fix or quote that line.") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"{csv_path} is not UTF-8 text ({exc}); save the CSV as UTF-8.") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {csv_path} ({exc.strerror or exc}).") from exc

    if not rows:
        raise SourceError(f"{csv_path} lists no images; expected one 'path,label' (or 'path') row per image.")
    _check_raw_bytes(csv_path, rows)
    first_line, _, first_label = rows[0]
    labeled = first_label is not None
    for line, _, label in rows:
        if (label is not None) != labeled:
            raise SourceError(
                f"{name} line {line}: {'missing' if labeled else 'unexpected'} label, but line {first_line} "
                f"{'has one' if labeled else 'has none'}; label every row or none."
            )
    _check_number_spellings(name, rows)
    base = os.path.dirname(csv_path)
    paths = [os.path.normpath(os.path.join(base, p)) for _, p, _ in rows]
    first_label: dict[str, tuple[int, str | None]] = {}
    for (line, _, label), path in zip(rows, paths):
        seen_line, seen_label = first_label.setdefault(path, (line, label))
        if seen_label != label:
            raise SourceError(f"{name} line {line}: {path} is labeled {label!r}, but line {seen_line} labels it "
                              f"{seen_label!r}; give each image one label.")  # fmt: skip
    labels = [label for _, _, label in rows] if labeled else None
    if labeled and any(MULTILABEL_SEP in label for label in labels):  # type: ignore[union-attr]
        indicator, classes = _label_sets(name, rows)
        return FileSource(paths, indicator, classes, description=f"csv:{csv_path}", max_pixels=max_pixels)
    return FileSource(paths, labels, description=f"csv:{csv_path}", max_pixels=max_pixels)


def _check_raw_bytes(csv_path: str, rows: list[tuple[int, str, str | None]]) -> None:
    """Bytes that are not UTF-8 are accepted only in a path that names an existing file by those bytes (a name
    written by an older tool); anywhere else (a label, a path that does not exist) the CSV is in another encoding."""
    base = os.path.dirname(csv_path)
    for line, path, label in rows:
        raw_label = label is not None and _escaped(label)
        if raw_label or (_escaped(path) and not os.path.isfile(os.path.join(base, path))):
            where = "its label" if raw_label else "its path, which names no file"
            raise SourceError(f"{csv_path} line {line} is not UTF-8 text ({where}); save the CSV as UTF-8.")


def _escaped(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (surrogate escapes)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _label_sets(name: str, rows: list[tuple[int, str, str | None]]) -> tuple[np.ndarray, list[str]]:
    """A multi-label column (``cat;dog``) -> (images x classes 0/1 matrix, sorted class names)."""
    sets = []
    for line, _, label in rows:
        parts = [p.strip() for p in (label or "").split(MULTILABEL_SEP)]
        if not all(parts):
            raise SourceError(f"{name} line {line}: label {label!r} has an empty class name between its "
                              f"{MULTILABEL_SEP!r} separators; write classes as cat;dog.")  # fmt: skip
        sets.append(parts)
    classes = sorted({c for parts in sets for c in parts})
    if len(classes) < 2:
        raise SourceError(f"{name}: the multi-label column names only {classes}; a probe needs at least 2 classes.")
    index = {c: k for k, c in enumerate(classes)}
    indicator = np.zeros((len(rows), len(classes)), dtype=np.int64)
    for i, parts in enumerate(sets):
        indicator[i, [index[c] for c in parts]] = 1
    return indicator, classes


def _check_number_spellings(name: str, rows: list[tuple[int, str, str | None]]) -> None:
    """Refuse one number written two ways in a label column (``2`` and ``2.0``): they would become two classes."""
    first_spelling: dict[float, tuple[str, int]] = {}
    for line, _, label in rows:
        try:
            value = float(label)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        spelling, seen_at = first_spelling.setdefault(value, (label, line))  # type: ignore[arg-type]
        if spelling != label:
            raise SourceError(
                f"{name} line {line}: label {label!r} is the number that line {seen_at} writes as {spelling!r}; "
                "they would become two classes. Write each label one way."
            )


def _resolve_labels(labels: Any, classes: Sequence[str] | None, n: int, what: str) -> tuple[np.ndarray, list[str]]:
    """Labels given as indices or names -> (int64 indices with -1 = unlabeled, class names); a 2-d 0/1 matrix with
    ``classes`` -> multi-label indicators."""
    class_names = None if classes is None else _check_classes(classes, what)
    if class_names is not None and getattr(labels, "ndim", 1) == 2:  # multi-label: checked by ImageSource
        return np.asarray(labels, dtype=np.int64), class_names
    if labels is None:
        if class_names:
            raise SourceError(f"{what}: classes= was given without labels=; pass labels too, or drop classes.")
        return np.full(n, -1, dtype=np.int64), []
    if isinstance(labels, (list, tuple)):
        kinds = {type(v).__name__ for v in labels if v is not None}
        if "str" in kinds and len(kinds) > 1:
            raise SourceError(f"{what}: labels mix types ({sorted(kinds)}); use all ints or all class-name strings.")
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if values.ndim != 1 or len(values) != n:
        raise SourceError(
            f"{what}: labels have shape {values.shape} but there are {n} images; pass one label per image."
        )

    if values.dtype.kind == "O" and all(v is None or isinstance(v, str) for v in values):
        names = np.array(["" if v is None else v for v in values], dtype=str)
        return _labels_from_names(names, class_names, what)
    if values.dtype.kind in "US":
        return _labels_from_names(values.astype(str), class_names, what)
    if values.dtype.kind == "O":
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise SourceError(
                f"{what}: labels mix types ({sorted({type(v).__name__ for v in values})}); use all ints or all "
                "class-name strings."
            ) from None
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise SourceError(f"{what}: labels are non-integer floats; pass class indices (ints) or class names.")
    elif values.dtype.kind not in "biu":
        raise SourceError(f"{what}: labels have dtype {values.dtype}; pass class indices (ints) or class names (str).")
    indices = values.astype(np.int64)
    if n and indices.min() < -1:
        raise SourceError(f"{what}: label {indices.min()} is negative; use -1 for unlabeled and 0..K-1 for classes.")
    top = int(indices.max()) if n else -1
    if class_names is None:
        class_names = [str(k) for k in range(top + 1)]
    elif top >= len(class_names):
        raise SourceError(
            f"{what}: label {top} needs at least {top + 1} classes but classes has {len(class_names)}; "
            "pass the full class list."
        )
    return indices, class_names


def _labels_from_names(names: np.ndarray, class_names: list[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    present = sorted({str(v) for v in names if v != ""})
    if class_names is None:
        class_names = present
    else:
        missing = [v for v in present if v not in class_names]
        if missing:
            raise SourceError(
                f"{what}: labels {missing[:5]} are not in classes {class_names[:10]}; add them to classes."
            )
    index = {c: k for k, c in enumerate(class_names)}
    return np.array([index[v] if v != "" else -1 for v in names], dtype=np.int64), class_names


def _check_classes(classes: Sequence[str], what: str) -> list[str]:
    if isinstance(classes, (str, bytes)):
        raise SourceError(f"{what}: classes must be a list of names, got the single string {classes!r}.")
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise SourceError(f"{what}: classes contain duplicates {dupes[:5]}; class names must be unique.")
    return names


def as_source(images: Any) -> ImageSource:
    """Image paths, PIL images, uint8 arrays (N, H, W[, C]), a folder/CSV path, or an ImageSource -> ImageSource."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise SourceError("no images given; pass image paths, PIL images or a uint8 array (N, H, W, C).")
        if all(isinstance(i, (str, os.PathLike)) for i in images):
            return FileSource([os.fspath(i) for i in images])
        if all(isinstance(i, Image.Image) for i in images):
            return DatasetSource(list(images))
        raise SourceError("a list of images must hold only paths or only PIL images.")
    return open_source(images)
