"""Tests for cnncodes.sources: every kind of input becomes RGB images, every bad item an ImageDecodeError."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from cnncodes.errors import ImageDecodeError, SourceError
from cnncodes.images import ArraySource, DatasetSource, FileSource, ImageSource, decode_image, open_source

W, H = 16, 12


def _rgb(seed: int = 0, size: tuple[int, int] = (W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------------------------------
# folders


def test_imagefolder_two_classes(tmp_path: Path) -> None:
    for cls, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            _save(_rgb(i), tmp_path / cls / f"{i}.png")
    _save(_rgb(9), tmp_path / "cat" / "nested" / "deep.png")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"junk")
    _save(_rgb(8), tmp_path / ".hidden_class" / "x.png")
    _save(_rgb(7), tmp_path / "dog" / ".hidden_dir" / "x.png")
    _save(_rgb(6), tmp_path / "stray_root_file.png")

    src = open_source(tmp_path)

    assert src.classes == ["cat", "dog"]
    expected = [tmp_path / "cat" / f"{i}.png" for i in range(3)] + [tmp_path / "cat" / "nested" / "deep.png"]
    expected += [tmp_path / "dog" / f"{i}.png" for i in range(2)]
    assert src.ids == [str(p) for p in expected]
    assert all(os.path.isabs(i) for i in src.ids)
    assert src.labels.dtype == np.int64
    assert src.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert len(src) == 6
    assert src.description == f"imagefolder:{tmp_path}"
    image = src.load(4)
    assert image.mode == "RGB" and image.size == (W, H)
    np.testing.assert_array_equal(_pixels(image), np.asarray(_rgb(0)))
    assert np.array_equal(_pixels(src.load(-1)), _pixels(src.load(5)))


def test_unlabeled_folder_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        _save(_rgb(i), tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "imgs" / ".hidden.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    src = open_source("imgs")

    assert src.ids == [str(tmp_path / "imgs" / f"{i}.jpg") for i in range(3)]
    assert src.labels.tolist() == [-1, -1, -1]
    assert src.classes == []
    assert src.description == f"folder:{tmp_path / 'imgs'}"
    assert src.load(2).size == (W, H)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files found under .*expected class sub-folders"):
        open_source(tmp_path / "empty")
    (tmp_path / "hidden_only").mkdir()
    (tmp_path / "hidden_only" / ".x.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="no image files found"):
        open_source(tmp_path / "hidden_only")
    (tmp_path / "empty_classes" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="no image files found.*class sub-folders"):
        open_source(tmp_path / "empty_classes")
    single = _save(_rgb(), tmp_path / "one.png")
    with pytest.raises(SourceError, match="not a .csv"):
        open_source(single)
    _save(_rgb(), tmp_path / "ok" / "a.png")
    with pytest.raises(SourceError, match="labels=/classes= apply only to array and Dataset"):
        open_source(tmp_path / "ok", labels=[0])


@pytest.fixture
def odd_folder(tmp_path: Path) -> dict[str, Path]:
    """One class of well-formed but unusual images, one class of broken files."""
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    files: dict[str, Path] = {}

    files["cmyk"] = _save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), good / "cmyk.jpg", quality=95)
    sixteen = np.full((H, W), 65535, dtype=np.uint16)
    sixteen[H // 2 :] = 32896
    files["16bit"] = _save(Image.fromarray(sixteen), good / "16bit.png")
    palette = Image.new("P", (W, H), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, W // 2, H))
    files["palette_trns"] = _save(palette, good / "palette_trns.png", transparency=0)
    files["rgba"] = _save(Image.new("RGBA", (W, H), (10, 20, 30, 0)), good / "rgba.png")
    files["la"] = _save(Image.new("LA", (W, H), (77, 128)), good / "la.png")
    files["gray"] = _save(Image.new("L", (W, H), 200), good / "gray.png")
    half = Image.new("RGB", (W, H), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, W // 2, H))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    files["exif6"] = _save(half, good / "exif6.jpg", exif=exif, quality=95)

    bad.mkdir(parents=True)
    files["zero"] = bad / "zero.jpg"
    files["zero"].write_bytes(b"")
    files["text"] = bad / "text.png"
    files["text"].write_text("definitely not a PNG\n")
    data = _jpeg_bytes(_rgb(3))
    files["truncated"] = bad / "truncated.jpg"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["bomb"] = _save(_rgb(4, size=(64, 64)), bad / "bomb.png")
    return files


def test_odd_images_decode_to_rgb(odd_folder: dict[str, Path]) -> None:
    src = open_source(odd_folder["cmyk"].parent.parent, max_pixels=1000)
    by_name = {Path(i).stem: i for i in src.ids}
    assert len(src) == len(odd_folder)  # non-image and broken files are listed, not skipped
    assert src.classes == ["bad", "good"]
    loaded = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        for name in ("cmyk", "16bit", "palette_trns", "rgba", "la", "gray", "exif6"):
            loaded[name] = src.load(src.ids.index(by_name[name]))
            assert loaded[name].mode == "RGB", name

    red = _pixels(loaded["cmyk"]).reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    sixteen = _pixels(loaded["16bit"])
    assert (sixteen[: H // 2] == 255).all() and (sixteen[H // 2 :] == 128).all()
    palette = _pixels(loaded["palette_trns"])
    assert (palette[:, : W // 2] == (0, 255, 0)).all() and (palette[:, W // 2 :] == (255, 0, 0)).all()
    assert (_pixels(loaded["rgba"]) == (10, 20, 30)).all()
    assert (_pixels(loaded["la"]) == 77).all()
    assert (_pixels(loaded["gray"]) == 200).all()
    rotated = _pixels(loaded["exif6"])
    assert loaded["exif6"].size == (H, W)  # width and height swapped against the stored 16x12
    assert rotated[: W // 2 - 1].mean() > 200 and rotated[W // 2 + 1 :].mean() < 50  # stored left half is now on top


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero", "zero-byte file"),
        ("text", "not an image"),
        ("truncated", "truncated image"),
        ("bomb", "decompression bomb: 4096 pixels > limit 1000"),
    ],
)
def test_bad_files_raise_decode_error(odd_folder: dict[str, Path], name: str, reason: str) -> None:
    src = open_source(odd_folder[name].parent.parent, max_pixels=1000)
    with pytest.raises(ImageDecodeError) as info:
        src.load(src.ids.index(str(odd_folder[name])))
    assert reason in info.value.reason
    assert info.value.id == str(odd_folder[name])
    assert str(odd_folder[name]) in str(info.value)


def test_decode_image_paths_and_modes(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        decode_image(tmp_path)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        decode_image(tmp_path, max_pixels=0)

    wide = _save(Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.int32)), tmp_path / "i32.tif")
    with Image.open(wide) as stored:
        assert stored.mode == "I"
    assert _pixels(decode_image(wide))[0, :, 0].tolist() == [0, 255, 128]
    stretched = _save(Image.fromarray(np.array([[-100, 0, 99900]], dtype=np.int32)), tmp_path / "i32s.tif")
    assert _pixels(decode_image(stretched))[0, :, 0].tolist() == [0, 0, 255]
    floats = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), tmp_path / "f.tif")
    with Image.open(floats) as stored:
        assert stored.mode == "F"
    assert _pixels(decode_image(floats))[0, :, 0].tolist() == [0, 128, 255]
    big_endian = Image.fromarray(np.array([[257, 65535]], dtype=np.uint16)).convert("I").convert("I;16B")
    assert _pixels(_decode_in_memory(big_endian, tmp_path / "b16.tif"))[0, :, 0].tolist() == [1, 255]


def _decode_in_memory(image: Image.Image, path: Path) -> Image.Image:
    image.save(path)
    return decode_image(path)


def test_pil_bomb_limits_are_caught_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warn_size = _save(_rgb(0, size=(40, 40)), tmp_path / "warn.png")  # 1600 px: PIL warns (limit 1000)
    error_size = _save(_rgb(0, size=(64, 64)), tmp_path / "error.png")  # 4096 px > 2 * 1000: PIL raises
    filters_before = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for path in (warn_size, error_size):
        with pytest.raises(ImageDecodeError, match="decompression bomb") as info:
            decode_image(path)
        assert info.value.id == str(path)
    with pytest.raises(ImageDecodeError, match="limit 1000"):
        decode_image(warn_size, max_pixels=10**6)  # max_pixels only tightens PIL's limit
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_decoding_on_threads_refuses_bombs_and_leaves_the_warning_filters_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warn_size = _save(_rgb(0, size=(40, 40)), tmp_path / "warn.png")  # 1600 px: PIL only warns (limit 1000)
    fine = _save(_rgb(1, size=(20, 20)), tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters_before = list(warnings.filters)

    def decode(path: Path) -> str:
        try:
            width, height = decode_image(path).size
            return f"decoded {width}x{height}"
        except ImageDecodeError as exc:
            return exc.reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, [warn_size, fine] * 40))
    assert set(results[::2]) == {"decompression bomb: 1600 pixels > limit 1000"}
    assert set(results[1::2]) == {"decoded 20x20"}
    assert warnings.filters == filters_before


@pytest.mark.slow
def test_no_file_handles_leak(odd_folder: dict[str, Path]) -> None:
    src = open_source(odd_folder["cmyk"].parent.parent, max_pixels=1000)
    fd_dir = "/proc/self/fd"
    fds_before = len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            for i in range(len(src)):
                with contextlib.suppress(ImageDecodeError):
                    src.load(i)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    if fds_before is not None:  # <=: descriptors of earlier tests (process pools, clusters) may close meanwhile
        assert len(os.listdir(fd_dir)) <= fds_before


def test_folder_source_pickles(odd_folder: dict[str, Path]) -> None:
    src = open_source(odd_folder["cmyk"].parent.parent, max_pixels=1000)
    copy = pickle.loads(pickle.dumps(src))
    assert copy.ids == src.ids and copy.classes == src.classes and copy.description == src.description
    np.testing.assert_array_equal(copy.labels, src.labels)
    good = src.ids.index(str(odd_folder["exif6"]))
    np.testing.assert_array_equal(np.asarray(copy.load(good)), np.asarray(src.load(good)))
    error = pickle.loads(pickle.dumps(ImageDecodeError("/x.png", "zero-byte file")))
    assert (error.id, error.reason) == ("/x.png", "zero-byte file")


# ---------------------------------------------------------------------------------------------------------------------
# CSV


def _images(folder: Path, n: int) -> list[Path]:
    return [_save(_rgb(i), folder / f"img{i}.png") for i in range(n)]


def test_csv_with_header_and_relative_paths(tmp_path: Path) -> None:
    paths = _images(tmp_path / "pics", 3)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\npics/img0.png,dog\n\n pics/img1.png , cat\npics/img2.png,dog\n")

    src = open_source(csv_path)

    assert src.ids == [str(p) for p in paths]
    assert src.classes == ["cat", "dog"]
    assert src.labels.tolist() == [1, 0, 1]
    assert src.description == f"csv:{csv_path}"
    np.testing.assert_array_equal(_pixels(src.load(1)), np.asarray(_rgb(1)))


def test_csv_without_header_absolute_and_unlabeled(tmp_path: Path) -> None:
    paths = _images(tmp_path / "pics", 2)
    labeled = tmp_path / "labeled.csv"
    labeled.write_text("".join(f"{p},{k}\n" for k, p in enumerate(paths)))
    src = open_source(labeled)
    assert src.ids == [str(p) for p in paths]
    assert src.classes == ["0", "1"] and src.labels.tolist() == [0, 1]

    unlabeled = tmp_path / "sub" / "unlabeled.csv"
    unlabeled.parent.mkdir()
    unlabeled.write_text("path\n../pics/img0.png\n../pics/img1.png,\n")
    src = open_source(unlabeled)
    assert src.ids == [str(p) for p in paths]
    assert src.labels.tolist() == [-1, -1] and src.classes == []


def test_csv_paths_and_labels_that_are_not_utf8_keep_their_bytes(tmp_path: Path) -> None:
    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    _rgb(3).save(os.fsencode(odd), format="PNG")
    listing = tmp_path / "list.csv"
    listing.write_bytes(b"path,label\n" + os.fsencode(odd) + b",caf\xc3\xa9\n")  # a raw name, a UTF-8 label
    src = open_source(listing)
    assert src.ids == [str(odd)] and src.classes == ["caf\u00e9"]
    np.testing.assert_array_equal(_pixels(src.load(0)), np.asarray(_rgb(3)))
    listing.write_bytes(b"path,label\n" + os.fsencode(odd) + b",cl\xe9\n")  # a Latin-1 label: another encoding
    with pytest.raises(SourceError, match=r"list\.csv line 2 is not UTF-8 text \(its label\); save the CSV as UTF-8"):
        open_source(listing)
    listing.write_bytes(b"path,label\ncaf\xe8.png,a\n")  # bytes that name no file: not a raw name either
    with pytest.raises(SourceError, match=r"line 2 is not UTF-8 text \(its path, which names no file\)"):
        open_source(listing)
    listing.write_text("path,label\na.png,cat\n", encoding="utf-16")
    with pytest.raises(SourceError, match=r"list\.csv is UTF-16 text; save the CSV as UTF-8"):
        open_source(listing)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.png,cat\nb.png\n", r"bad\.csv line 2: missing label, but line 1 has one"),
        ("path,label\na.png\nb.png,cat\n", r"bad\.csv line 3: unexpected label"),
        ("a.png,cat\nb.png,cat,extra\n", r"bad\.csv line 2: 3 fields"),
        ("a.png,cat\n,cat\n", r"bad\.csv line 2: empty path"),
        ("path,label\n\n", "lists no images"),
        ("a.png,2\nb.png,3\nc.png,2.0\n", r"bad\.csv line 3: label '2\.0' is the number that line 1 writes as '2'"),
        ("a.png,cat\n" + "x" * 200_000 + "\n", r"bad\.csv line 2: malformed CSV"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(SourceError, match=match):
        open_source(bad)


def test_csv_missing_file_is_recorded_at_load(tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("gone.png,a\n")
    src = open_source(listing)
    with pytest.raises(ImageDecodeError, match="file not found"):
        src.load(0)


# ---------------------------------------------------------------------------------------------------------------------
# arrays


def test_array_sources() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, H, W, 3), dtype=np.uint8)
    src = open_source(rgb, labels=["b", "a", "b", "c"])
    assert src.ids == [f"array[{i}]" for i in range(4)]
    assert src.classes == ["a", "b", "c"] and src.labels.tolist() == [1, 0, 1, 2]
    assert src.description == "array"
    np.testing.assert_array_equal(_pixels(src.load(2)), rgb[2])

    gray = np.ascontiguousarray(rgb[..., 0])  # contiguous rows are what PIL could map without copying
    src = open_source(gray, labels=[0, 2, -1, 2], classes=["zero", "one", "two"])
    assert src.classes == ["zero", "one", "two"] and src.labels.tolist() == [0, 2, -1, 2]
    loaded = src.load(1)
    image = _pixels(loaded)
    assert image.shape == (H, W, 3) and (image == gray[1][..., None]).all()
    gray[1] = 0  # a loaded image must not alias the source's array
    assert (_pixels(loaded) == image).all() and image.any()

    src = open_source(gray, labels=np.array([0, 3, 1, 1]))
    assert src.classes == ["0", "1", "2", "3"]
    assert open_source(gray).labels.tolist() == [-1] * 4


def test_array_errors() -> None:
    with pytest.raises(SourceError, match=r"dtype float32.*uint8"):
        open_source(np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(SourceError, match=r"shape \(2, 4, 4, 4\).*\(N, H, W, 3\)"):
        open_source(np.zeros((2, 4, 4, 4), dtype=np.uint8))
    with pytest.raises(SourceError, match="holds no pixels"):
        open_source(np.zeros((0, 4, 4), dtype=np.uint8))
    with pytest.raises(SourceError, match=r"labels have shape \(3,\) but there are 2 images"):
        open_source(np.zeros((2, 4, 4), dtype=np.uint8), labels=[0, 1, 1])
    with pytest.raises(SourceError, match="needs at least 3 classes"):
        open_source(np.zeros((2, 4, 4), dtype=np.uint8), labels=[0, 2], classes=["a", "b"])
    with pytest.raises(SourceError, match="not in classes"):
        open_source(np.zeros((2, 4, 4), dtype=np.uint8), labels=["a", "z"], classes=["a", "b"])
    src = open_source(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(IndexError, match="out of range"):
        src.load(2)


# ---------------------------------------------------------------------------------------------------------------------
# torch datasets (module level so they pickle)


class PilDataset(Dataset):
    classes = ["cat", "dog"]

    def __init__(self) -> None:
        self.targets = [1, 0, 1]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return _rgb(i).convert("L" if i == 2 else "RGB"), self.targets[i]


class TensorImages(Dataset):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == 3:
            raise RuntimeError("disk on fire")
        chw = torch.from_numpy(np.array(_rgb(i))).permute(2, 0, 1)
        if self.dtype == torch.uint8:
            return chw
        scaled = chw.to(self.dtype) / 255
        return scaled * 4 - 2 if i == 2 else scaled  # item 2 looks Normalize()d


class Stream(IterableDataset):
    def __iter__(self):
        yield _rgb()


def test_dataset_with_targets_and_classes() -> None:
    src = open_source(PilDataset())
    assert src.ids == ["dataset[0]", "dataset[1]", "dataset[2]"]
    assert src.labels.tolist() == [1, 0, 1] and src.classes == ["cat", "dog"]
    assert src.description == "dataset:PilDataset"
    np.testing.assert_array_equal(_pixels(src.load(0)), np.asarray(_rgb(0)))
    assert src.load(2).mode == "RGB"
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(_pixels(copy.load(1)), _pixels(src.load(1)))


def test_dataset_with_tensor_items() -> None:
    src = open_source(TensorImages(torch.uint8))
    assert src.labels.tolist() == [-1] * 4 and src.classes == []
    np.testing.assert_array_equal(_pixels(src.load(1)), np.asarray(_rgb(1)))
    with pytest.raises(ImageDecodeError, match="disk on fire") as info:
        src.load(3)
    assert info.value.id == "dataset[3]"

    src = open_source(TensorImages(torch.float32), labels=["x", "y", "x", "y"])
    assert src.classes == ["x", "y"]
    np.testing.assert_array_equal(_pixels(src.load(0)), np.asarray(_rgb(0)))
    with pytest.raises(ImageDecodeError, match=r"expected \[0, 1\].*Normalize"):
        src.load(2)


class MultiLabel(PilDataset):
    def __init__(self) -> None:
        self.targets = [[0, 1], [1, 0], [1, 1]]


class Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int):
        raise IndexError(i)


def test_dataset_and_other_errors() -> None:
    with pytest.raises(SourceError, match=r"shape \(3, 2\).*dataset\.targets.*labels="):
        open_source(MultiLabel())
    assert open_source(MultiLabel(), labels=[-1, -1, -1]).classes == ["cat", "dog"]
    with pytest.raises(SourceError, match="holds no images"):
        open_source(Empty())
    with pytest.raises(SourceError, match="IterableDataset"):
        open_source(Stream())
    with pytest.raises(SourceError, match="FileSource"):
        open_source(["a.png", "b.png"])
    with pytest.raises(SourceError, match=r"cannot read images from .*accepted: .*demo:digits"):
        open_source(42)
    with pytest.raises(SourceError, match="labels have shape"):
        open_source(PilDataset(), labels=[0, 1])


def test_image_source_passes_through() -> None:
    src = ArraySource(np.zeros((1, 2, 2), dtype=np.uint8))
    assert open_source(src) is src
    assert isinstance(src, ImageSource)
    with pytest.raises(SourceError, match="apply only"):
        open_source(src, labels=[0])


def test_file_source_direct(tmp_path: Path) -> None:
    paths = _images(tmp_path, 2)
    src = FileSource(paths, labels=["dog", "cat"])
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [1, 0]
    assert isinstance(DatasetSource(PilDataset()), ImageSource)


# ---------------------------------------------------------------------------------------------------------------------
# demo


def test_demo_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = open_source("demo:digits")
    assert len(src) == 1797 and src.description == "demo:digits"
    assert src.ids[:2] == ["digits[0]", "digits[1]"]
    np.testing.assert_array_equal(src.labels, digits.target)
    assert src.classes == [str(k) for k in range(10)]
    image = _pixels(src.load(0))
    assert image.shape == (32, 32, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    # Bicubic upscaling keeps the picture: block means track the original 8x8 values.
    blocks = image[..., 0].astype(float).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), digits.images[0].ravel())[0, 1] > 0.95


def test_unknown_demo_lists_known() -> None:
    with pytest.raises(SourceError, match=r"unknown demo 'demo:cifar'.*'demo:digits'"):
        open_source("demo:cifar")


def test_labels_that_mix_names_and_numbers_are_refused():
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(SourceError, match="labels mix types"):
        open_source(images, labels=[1, "cat", 2.0])


def test_links_never_put_one_file_in_two_classes(tmp_path):
    """A class folder linked to another is refused; a link inside one class folder into another (here a loop back
    to the top) reaches files twice: each is kept once, under the folder that really holds it, with a warning."""
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    (tmp_path / "kittens").symlink_to(tmp_path / "cats")
    with pytest.raises(SourceError, match="'cats' and 'kittens' are the same folder .* Remove the link"):
        open_source(str(tmp_path))
    (tmp_path / "kittens").unlink()
    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dogs" / "b.png")
    (tmp_path / "cats" / "loop").symlink_to(tmp_path)  # cats/loop/dogs/b.png is dogs/b.png, cats/loop/cats/a.png ...
    (tmp_path / "dogs" / "same.png").symlink_to(tmp_path / "dogs" / "b.png")
    with pytest.warns(UserWarning, match=r"file\(s\) are reached twice through links"):
        source = open_source(str(tmp_path))
    found = sorted(zip(source.ids, source.labels.tolist()))
    assert found == [(str(tmp_path / "cats" / "a.png"), 0), (str(tmp_path / "dogs" / "b.png"), 1)]
    (tmp_path / "all").symlink_to(".")  # a class folder that is the image folder: every image would be in it
    with pytest.raises(SourceError, match=r"class folder 'all' is a link to .*, which holds the image folder itself"):
        open_source(str(tmp_path))
    (tmp_path / "all").unlink()
    zoo = tmp_path.parent / f"{tmp_path.name}-zoo"
    (zoo / "birds").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(zoo / "birds" / "c.png")
    (tmp_path / "birds").symlink_to(zoo / "birds")
    (tmp_path / "zoo").symlink_to(zoo)  # holds the real birds/ folder: its class would take the birds
    with pytest.raises(SourceError, match=r"class folder 'birds' lies inside class folder 'zoo' .* through a link"):
        open_source(str(tmp_path))


def test_a_csv_that_is_no_regular_file_or_holds_a_nul_is_refused_where_it_enters(tmp_path: Path) -> None:
    """A FIFO named like a CSV would block the read forever; a NUL in a class name would only be refused by the
    bundle, after the whole extraction and sweep. Both are refused when the source opens, naming the file or line."""
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="pipe.csv is not a regular file"):
        open_source(str(fifo))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "nul.csv").write_text("path,label\na.png,ca\x00t\n")
    with pytest.raises(SourceError, match="nul.csv line 2: a NUL character"):
        open_source(str(tmp_path / "nul.csv"))
