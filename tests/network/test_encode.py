"""The encode loop's input side: batches decoded on threads equal those decoded one by one, reach the network in
channels_last and normalized as the reference transform does, and bad images stay aligned with their rows."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from cnncodes.images import as_source, pixel_transform
from cnncodes.network import CodeExtractor, ImageViews, iter_batches
from cnncodes.network._encode import _collate_views, _decode_threads
from helpers import TINY_PRE, make_images, make_tiny_backbone, write_image_folder


@pytest.mark.parametrize("views", [0, 2])
def test_a_batch_decoded_on_threads_equals_one_decoded_item_by_item(views):
    source = as_source(make_images(10, size=37)[0])
    serial = ImageViews(source, TINY_PRE, views, 4, ("crop", "flip"), threads=1)
    threaded = ImageViews(source, TINY_PRE, views, 4, ("crop", "flip"), threads=3)
    indices = list(range(10))
    for (a, i, r), (b, j, s) in zip(serial.__getitems__(indices), threaded.__getitems__(indices)):
        assert (i, r) == (j, s)
        np.testing.assert_array_equal(a, b)


def test_the_loader_hands_over_channels_last_pixels_in_image_order(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", n=9, size=37)
    (folder / "class0" / "broken.png").write_bytes(b"not a png")
    source = as_source(str(folder))
    loader = DataLoader(
        ImageViews(source, TINY_PRE, 0, 0, ("crop",), threads=2), batch_size=4, collate_fn=_collate_views
    )
    batches = list(loader)
    assert [len(index) for _, index, _ in batches] == [4, 4, 2]
    pixels = torch.cat([b for b, _, _ in batches])
    assert pixels.shape == (10, 1, TINY_PRE.input_size, TINY_PRE.input_size, 3) and pixels.dtype == torch.uint8
    assert pixels.flatten(0, 1).permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
    index = [i for _, batch, _ in batches for i in batch]
    reasons = [r for _, _, batch in batches for r in batch]
    assert index == list(range(10))
    bad = source.ids.index(str(folder / "class0" / "broken.png"))
    assert reasons[bad] and not any(r for k, r in enumerate(reasons) if k != bad)
    assert not pixels[bad].any(), "a bad image is zeros in its own row"
    tf = pixel_transform(TINY_PRE)
    for k in (0, 9):
        if k != bad:
            expected = tf(Image.open(source.ids[k]).convert("RGB")).permute(1, 2, 0)
            assert torch.equal(pixels[k, 0], expected)


def test_the_network_gets_channels_last_input_normalized_like_torchvision():
    backbone = make_tiny_backbone()
    extractor = CodeExtractor(backbone, "stages", "avg")
    seen = []
    extractor.on(torch.device("cpu")).register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    images, _ = make_images(6, size=37)
    list(iter_batches(extractor, as_source(images), TINY_PRE, dev=torch.device("cpu"), batch_size=4, workers=0))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
    reference = v2.Compose(
        [pixel_transform(TINY_PRE), v2.ToDtype(torch.float32, scale=True), v2.Normalize(TINY_PRE.mean, TINY_PRE.std)]
    )
    expected = torch.stack([reference(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(torch.cat(seen), expected, rtol=1e-6, atol=1e-6)


def test_threads_and_worker_processes_give_the_same_codes():
    backbone = make_tiny_backbone()
    extractor = CodeExtractor(backbone, "stages", "avg")
    source = as_source(make_images(10, size=37)[0])
    runs = []
    for workers in (0, 1):
        batches = iter_batches(extractor, source, TINY_PRE, dev=torch.device("cpu"), batch_size=4, workers=workers)
        runs.append({k: torch.cat(c) for k, c in _gather(batches).items()})
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key])


def _gather(batches):
    out = {}
    for b in batches:
        for key, codes in b.codes.items():
            out.setdefault(key, []).append(codes)
    return out


def test_decoding_threads_are_the_forward_threads_on_the_cpu():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert _decode_threads(torch.device("cpu")) == 3
    finally:
        torch.set_num_threads(threads)
