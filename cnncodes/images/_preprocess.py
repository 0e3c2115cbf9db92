"""Image preprocessing: the plain view and the seeded augmentation views.

A :class:`Preprocessing` travels with every backbone, lands in every store manifest and every probe bundle, so a code
is always reproducible from the description alone. Augmented views are seeded per ``(seed, image, view)`` so their
pixels never depend on batch size, worker count or the point a run was resumed from.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import ParameterError

__all__ = [
    "Preprocessing",
    "AUGMENTATIONS",
    "normalize",
    "pixel_transform",
    "plain_transform",
    "view_transform",
    "view_seed",
    "render_views_hwc",
]

_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
    "lanczos": v2.InterpolationMode.LANCZOS,
}

#: Augmentations a view may combine (``--augment crop,flip``).
AUGMENTATIONS = ("crop", "flip", "color")
_MAX_SIDE = 8192  # pixels: larger inputs are a mistake, not a model
# Seeded views reseed torch's global generator (in a fork_rng); two threads doing that at once would swap seeds.
_SEEDED = threading.Lock()


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes a normalized tensor for a backbone.

    Parameters
    ----------
    input_size : int
        Side of the square crop fed to the network.
    resize_size : int
        The shorter image side is resized to this before the center crop (``resize_size >= input_size``).
    mean, std : tuple of 3 floats
        Per-channel normalization applied to pixels scaled to [0, 1].
    interpolation : {"bilinear", "bicubic", "nearest", "lanczos"}
        Resampling filter used by resize and random-resized-crop.

    Examples
    --------
    >>> Preprocessing(input_size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3).with_input_size(96).resize_size
    110
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ParameterError(
                f"interpolation={self.interpolation!r} is not supported; use one of {sorted(_INTERPOLATIONS)}."
            )
        for name in ("input_size", "resize_size"):
            if type(getattr(self, name)) is not int:
                raise ParameterError(f"{name} must be an integer, got {getattr(self, name)!r}.")
        if not 8 <= self.input_size <= self.resize_size <= _MAX_SIDE:
            raise ParameterError(
                f"need 8 <= input_size <= resize_size <= {_MAX_SIDE}, got input_size={self.input_size}, "
                f"resize_size={self.resize_size}."
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ParameterError(f"{name} must have 3 values (R, G, B), got {value!r}.")
            value = tuple(float(v) for v in value)
            if not all(math.isfinite(v) for v in value) or (name == "std" and min(value) <= 0):
                raise ParameterError(f"{name} must be finite{' and positive' if name == 'std' else ''}, got {value!r}.")
            object.__setattr__(self, name, value)

    def with_input_size(self, input_size: int | None) -> Preprocessing:
        """Same preprocessing at another input size, keeping the resize/crop ratio."""
        if input_size is None or input_size == self.input_size:
            return self
        ratio = self.resize_size / self.input_size
        return Preprocessing(
            input_size=int(input_size),
            resize_size=int(math.floor(input_size * ratio)),
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used in manifests and bundles)."""
        out = asdict(self)
        out.pop("extra")
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; anything malformed is a :class:`ParameterError` naming the field."""
        try:
            return cls(
                input_size=data["input_size"],
                resize_size=data["resize_size"],
                mean=tuple(data["mean"]),
                std=tuple(data["std"]),
                interpolation=str(data["interpolation"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, ParameterError):
                raise
            raise ParameterError(
                f"preprocessing {str(data)[:120]} is malformed ({type(exc).__name__}: {exc})."
            ) from None


class PixelNormalizer:
    """uint8 pixels (B, 3, H, W) -> float32 normalized as ``pre`` says, with the constants built once on ``device``.

    Extraction ships uint8 batches to the device (4x less host-to-device traffic) and normalizes there; building the
    constants once keeps two blocking host-to-device copies out of every batch.
    """

    def __init__(self, pre: Preprocessing, device: torch.device | str = "cpu") -> None:
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in pre.std], device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(pre.mean, pre.std)], device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # One fresh float tensor, scaled and shifted in place: the same two roundings as ``x * scale - shift`` (so
        # the same values) without two more batch-sized allocations. The memory format of ``pixels`` is kept.
        x = pixels.to(torch.float32, copy=True)
        return x.mul_(self.scale).sub_(self.shift)


def normalize(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) on any device -> float32 normalized as ``pre`` says (see :class:`PixelNormalizer`)."""
    return PixelNormalizer(pre, pixels.device)(pixels)


def pixel_transform(pre: Preprocessing) -> v2.Compose:
    """Resize the shorter side and center-crop: the un-augmented view as uint8 (3, S, S)."""
    interp = _INTERPOLATIONS[pre.interpolation]
    return v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=interp, antialias=True),
            v2.CenterCrop(pre.input_size),
            v2.PILToTensor(),
        ]
    )


def plain_transform(pre: Preprocessing) -> v2.Compose:
    """The plain view, normalized: float32 (3, S, S) ready for the network."""
    return v2.Compose([pixel_transform(pre), v2.Lambda(lambda t: normalize(t[None], pre)[0])])


def parse_augment(augment: str | Sequence[str]) -> tuple[str, ...]:
    """Validate an augmentation list such as ``"crop,flip"``."""
    names = tuple(a.strip() for a in (augment.split(",") if isinstance(augment, str) else augment) if a.strip())
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown or not names:
        raise ParameterError(
            f"augment={augment!r}: unknown or empty augmentation {unknown}; combine any of {list(AUGMENTATIONS)}, "
            "for example --augment crop,flip."
        )
    return names


def view_transform(pre: Preprocessing, augment: str | Sequence[str] = ("crop", "flip")) -> v2.Compose:
    """The random transform of an augmented view (uint8 out); seed it with :func:`view_seed` for reproducible pixels."""
    names = parse_augment(augment)
    interp = _INTERPOLATIONS[pre.interpolation]
    steps: list[v2.Transform] = []
    if "crop" in names:
        steps.append(v2.RandomResizedCrop(pre.input_size, scale=(0.25, 1.0), interpolation=interp, antialias=True))
    else:
        steps += [v2.Resize(pre.resize_size, interpolation=interp, antialias=True), v2.CenterCrop(pre.input_size)]
    if "flip" in names:
        steps.append(v2.RandomHorizontalFlip())
    if "color" in names:
        steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3))
    return v2.Compose(steps + [v2.PILToTensor()])


def view_seed(seed: int, image_index: int, view: int) -> int:
    """A 63-bit seed that depends only on ``(seed, image_index, view)``."""
    state = np.random.SeedSequence([int(seed), int(image_index), int(view)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def render_views(
    image: Image.Image,
    image_index: int,
    n_views: int,
    seed: int,
    plain: v2.Compose,
    augmented: v2.Compose | None,
) -> torch.Tensor:
    """Stack the plain view and ``n_views`` seeded augmented views of one image: uint8 (1 + n_views, 3, S, S)."""
    return torch.stack([render_view(image, image_index, v, seed, plain, augmented) for v in range(n_views + 1)])


def render_view(
    image: Image.Image,
    image_index: int,
    view: int,
    seed: int,
    plain: v2.Compose,
    augmented: v2.Compose | None,
) -> torch.Tensor:
    """View ``view`` of one image, uint8 (3, S, S): 0 is the plain view, ``k >= 1`` the k-th seeded augmented view
    (the same pixels however many views are rendered, and in whatever order)."""
    if view == 0:
        return plain(image)
    # fork_rng keeps the global generator untouched, so user code and other views are unaffected; the lock keeps
    # views rendered on several threads from drawing from each other's seeds.
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed, image_index, view))
        return augmented(image)  # type: ignore[misc]


def render_views_hwc(
    image: Image.Image,
    image_index: int,
    n_views: int,
    seed: int,
    plain: v2.Compose,
    augmented: v2.Compose | None,
) -> np.ndarray:
    """:func:`render_views` laid out channels last: uint8 ndarray (1 + n_views, S, S, 3), the same pixels.

    PIL hands pixels over in this layout (the CHW views are permuted views of it), so nothing is transposed here, and
    a batch of these read as (B, 3, S, S) is already in ``torch.channels_last``, the format the network runs in.
    """
    views = [render_view(image, image_index, v, seed, plain, augmented) for v in range(n_views + 1)]
    hwc = [v.permute(1, 2, 0).numpy() for v in views]
    return hwc[0][None] if n_views == 0 else np.stack(hwc)
