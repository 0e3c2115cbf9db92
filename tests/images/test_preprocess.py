"""Preprocessing: channels-last views equal the CHW views, seeded views are the same on threads, and normalization
computes ``x * scale - shift`` without touching its input."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from cnncodes.images import (
    PixelNormalizer,
    Preprocessing,
    pixel_transform,
    render_view,
    render_views,
    render_views_hwc,
    view_transform,
)
from helpers import make_images

PRE = Preprocessing(input_size=24, resize_size=28, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


@pytest.mark.parametrize("n_views", [0, 2])
def test_channels_last_views_are_the_chw_views_transposed(n_views):
    plain, augmented = pixel_transform(PRE), view_transform(PRE, "crop,flip,color")
    for i, pixels in enumerate(make_images(4, size=37)[0]):  # odd size: the resize and the crop both do something
        image = Image.fromarray(pixels)
        chw = render_views(image, i, n_views, 3, plain, augmented)
        hwc = render_views_hwc(image, i, n_views, 3, plain, augmented)
        assert hwc.dtype == np.uint8 and hwc.shape == (n_views + 1, PRE.input_size, PRE.input_size, 3)
        np.testing.assert_array_equal(hwc, chw.permute(0, 2, 3, 1).numpy())


def test_a_batch_of_channels_last_views_reads_as_a_channels_last_tensor():
    plain = pixel_transform(PRE)
    views = [render_views_hwc(Image.fromarray(p), i, 0, 0, plain, None) for i, p in enumerate(make_images(3)[0])]
    batch = torch.from_numpy(np.stack(views)).flatten(0, 1).permute(0, 3, 1, 2)
    assert batch.shape == (3, 3, PRE.input_size, PRE.input_size)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_seeded_views_rendered_on_threads_equal_the_serial_ones():
    plain, augmented = pixel_transform(PRE), view_transform(PRE, "crop,flip,color")
    images = [Image.fromarray(p) for p in make_images(16, size=37)[0]]
    jobs = [(i, v) for i in range(len(images)) for v in (1, 2)]

    def render(job):
        i, v = job
        return render_view(images[i], i, v, 5, plain, augmented)

    serial = [render(job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(render, jobs * 3))
    for k, pixels in enumerate(threaded):
        assert torch.equal(pixels, serial[k % len(jobs)]), f"view {jobs[k % len(jobs)]} drew another view's seed"


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalization_is_scale_then_shift_in_the_input_memory_format(channels_last):
    normalize = PixelNormalizer(PRE)
    pixels = torch.from_numpy(make_images(5, size=9)[0]).permute(0, 3, 1, 2)  # channels_last as it comes
    if not channels_last:
        pixels = pixels.contiguous()
    x = normalize(pixels)
    assert x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(x, pixels.float() * normalize.scale - normalize.shift)  # bitwise: the same two roundings


def test_normalization_never_writes_into_its_input():
    normalize = PixelNormalizer(PRE)
    given = torch.rand(2, 3, 4, 4) * 255
    kept = given.clone()
    normalize(given)
    assert torch.equal(given, kept)
