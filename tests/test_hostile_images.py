"""Hostile image files: decompression bombs, unusual pixel modes, EXIF orientation, corruption.

Every failure must be one ``ImageLoadError`` line naming the file, never an exception from deep
inside PIL, and every decoded image must be 8-bit RGB of the size ``image_size`` reports.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image, ImageFile, ImageOps

from hyperfeatures.datasets import ImageLoadError, image_size, iter_image_paths, load_image
from hyperfeatures.datasets import images as images_module

# ----------------------------------------------------------------------------------------------
# Decompression bombs
# ----------------------------------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A real 1 x 1 PNG whose IHDR is patched to claim ``width x height`` (CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1), 7).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixels fail loudly (proves a check ran on the header)."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{self.filename} was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(
    ("width", "height", "claim"),
    [
        (100_000, 100_000, "10,000,000,000 pixels"),  # beyond PIL's own error threshold
        (10_000, 10_000, "10000 x 10000 = 100,000,000 pixels"),  # PIL would only warn
    ],
)
def test_header_claiming_too_many_pixels_is_refused_before_decoding(
    tmp_path: Path, width: int, height: int, claim: str, no_decoding: None
) -> None:
    bomb = _png_claiming(tmp_path / "bomb.png", width, height)
    assert bomb.stat().st_size < 100
    for read in (load_image, image_size):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning either
            with pytest.raises(ImageLoadError) as info:
                read(bomb, context="entry 3 of pairs.json")
        message = str(info.value)
        assert "\n" not in message
        assert str(bomb) in message and "entry 3 of pairs.json" in message
        assert claim in message and "89,478,485" in message and "Downscale" in message


def test_pixel_limit_is_the_module_constant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 199)
    with pytest.raises(ImageLoadError, match=r"20 x 10 = 200 pixels, more than the limit of 199"):
        load_image(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match="limit of 199"):
        image_size(tmp_path / "small.png")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 200)
    assert load_image(tmp_path / "small.png").size == image_size(tmp_path / "small.png")


# ----------------------------------------------------------------------------------------------
# Pixel modes
# ----------------------------------------------------------------------------------------------

RAMP16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)  # 0 .. 65535


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_ramp_becomes_an_8_bit_ramp(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ramp16{suffix}"
    Image.fromarray(np.tile(RAMP16, (3, 1))).save(path)
    assert Image.open(path).mode.startswith("I;16")
    pixels = np.asarray(load_image(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 256, 3)
    np.testing.assert_array_equal(pixels[0, :, 0], np.arange(256))  # not clamped to 255
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_16_bit_rounding_and_big_endian(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 32896, 65407, 65535]], dtype=np.uint16)
    path = tmp_path / "big.tif"
    Image.frombytes("I;16B", (6, 1), values.astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    grey = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(grey, [0, 0, 1, 128, 255, 255])  # round(v / 257)


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    ints = np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32)
    Image.fromarray(ints).save(tmp_path / "int.tif")
    assert Image.open(tmp_path / "int.tif").mode == "I"
    grey = np.asarray(load_image(tmp_path / "int.tif"))[0, :, 0]
    np.testing.assert_array_equal(grey, [0, 0, 1, 255, 255])  # 16-bit range, clipped

    unit = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    grey = np.asarray(load_image(tmp_path / "unit.tif"))[0, :, 0]
    np.testing.assert_array_equal(grey, [0, 128, 255, 0])  # [0, 1] -> x255, NaN -> 0

    wide = np.array([[-3.0, 12.4, 200.0, 300.0]], dtype=np.float32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    grey = np.asarray(load_image(tmp_path / "wide.tif"))[0, :, 0]
    np.testing.assert_array_equal(grey, [0, 12, 200, 255])  # 0..255 intensities, clipped


def _palette_with_transparency() -> tuple[Image.Image, dict[str, int]]:
    image = Image.new("P", (7, 5), 3)
    image.putpalette([0, 0, 0, 10, 20, 30, 0, 0, 0, 40, 50, 60] * 64)
    return image, {"transparency": 3}


MODE_FILES = {
    "1.png": (lambda: Image.new("1", (7, 5), 1), {}, "1"),
    "L.png": (lambda: Image.new("L", (7, 5), 9), {}, "L"),
    "LA.png": (lambda: Image.new("LA", (7, 5), (9, 0)), {}, "LA"),
    "P-transparent.png": (lambda: _palette_with_transparency()[0], {"transparency": 3}, "P"),
    "P-transparent.gif": (lambda: _palette_with_transparency()[0], {"transparency": 3}, "P"),
    "RGBA.png": (lambda: Image.new("RGBA", (7, 5), (1, 2, 3, 0)), {}, "RGBA"),
    "RGBA.tif": (lambda: Image.new("RGBA", (7, 5), (1, 2, 3, 4)), {}, "RGBA"),
    "CMYK.jpg": (lambda: Image.new("CMYK", (7, 5), (0, 255, 0, 0)), {}, "CMYK"),
    "CMYK.tif": (lambda: Image.new("CMYK", (7, 5), (0, 255, 0, 0)), {}, "CMYK"),
    "YCbCr.tif": (lambda: Image.new("YCbCr", (7, 5), (100, 128, 128)), {}, "YCbCr"),
    "LAB.tif": (lambda: Image.new("LAB", (7, 5), (50, 128, 128)), {}, "LAB"),
    "I16.png": (lambda: Image.fromarray(np.full((5, 7), 65535, np.uint16)), {}, "I;16"),
    "I16.tif": (lambda: Image.fromarray(np.full((5, 7), 65535, np.uint16)), {}, "I;16"),
    "I32.tif": (lambda: Image.fromarray(np.full((5, 7), 65535, np.int32)), {}, "I"),
    "F.tif": (lambda: Image.fromarray(np.full((5, 7), 0.5, np.float32)), {}, "F"),
}


@pytest.mark.parametrize("name", sorted(MODE_FILES))
def test_every_mode_decodes_to_8_bit_rgb_of_the_header_size(tmp_path: Path, name: str) -> None:
    make, options, mode = MODE_FILES[name]
    path = tmp_path / name
    make().save(path, **options)
    written = Image.open(path).mode
    if written != mode:  # Pillow < 13 writes YCbCr TIFFs as RGB: nothing of that mode to read
        pytest.skip(f"Pillow {PIL.__version__} writes {name} in mode {written}, not {mode}")
    image = load_image(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (7, 5) == image_size(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (5, 7, 3)


def test_mode_values(tmp_path: Path) -> None:
    Image.new("1", (3, 2), 1).save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png").getpixel((0, 0)) == (255, 255, 255)
    image, options = _palette_with_transparency()
    image.save(tmp_path / "p.png", **options)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (40, 50, 60)  # alpha dropped
    Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert load_image(tmp_path / "white16.png").getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((2, 3), 257 * 40, np.uint16)).save(tmp_path / "grey16.png")
    assert load_image(tmp_path / "grey16.png").getpixel((0, 0)) == (40, 40, 40)


# ----------------------------------------------------------------------------------------------
# EXIF orientation
# ----------------------------------------------------------------------------------------------


def _oriented(path: Path, orientation: int) -> Path:
    """A 40 x 20 image, left half red, right half blue, tagged with ``orientation``."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


def test_jpeg_with_orientation_6(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _oriented(tmp_path / "phone.jpg", 6)
    assert load_image(path).size == image_size(path) == (40, 20)  # the stored grid
    upright = load_image(path, exif_transpose=True)
    assert upright.size == (20, 40)
    red, blue = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]  # rotated 90° clockwise
    monkeypatch.setattr(ImageFile.ImageFile, "load", None)  # image_size must not decode
    assert image_size(path, exif_transpose=True) == (20, 40)
    assert image_size(path, exif_transpose=False) == (40, 20)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_orientation_agrees_with_pil_and_with_image_size(tmp_path: Path, suffix: str) -> None:
    for orientation in range(1, 9):
        path = _oriented(tmp_path / f"o{orientation}{suffix}", orientation)
        with Image.open(path) as raw:
            expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
        image = load_image(path, exif_transpose=True)
        np.testing.assert_array_equal(np.asarray(image), expected)
        assert image_size(path, exif_transpose=True) == image.size
        assert image_size(path) == load_image(path).size


def test_corrupt_exif_block_is_ignored(tmp_path: Path) -> None:
    path = _oriented(tmp_path / "bad-exif.jpg", 6)
    data = path.read_bytes()
    start = data.index(b"Exif\x00\x00") + 6
    path.write_bytes(data[:start] + b"\xff" * 8 + data[start + 8 :])  # broken TIFF header
    assert image_size(path, exif_transpose=True) == load_image(path, exif_transpose=True).size


# ----------------------------------------------------------------------------------------------
# Corrupt files: a one-line ImageLoadError, whatever the damage
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF|Truncated File):UserWarning")
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"])
def test_damaged_files_give_one_line_errors(tmp_path: Path, suffix: str) -> None:
    clean = tmp_path / f"clean{suffix}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(clean)
    data = clean.read_bytes()
    variants = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 25))]
    for position in rng.integers(0, len(data), 40):
        damaged = bytearray(data)
        damaged[int(position)] ^= 0xFF
        variants.append(bytes(damaged))
    for index, variant in enumerate(variants):
        path = tmp_path / f"v{index}{suffix}"
        path.write_bytes(variant)
        for read in (load_image, image_size):
            try:
                result = read(path)
            except ImageLoadError as exc:
                assert str(path) in str(exc) and "\n" not in str(exc)
            else:
                size = result if isinstance(result, tuple) else result.size
                assert len(size) == 2


def test_image_list_file_that_is_not_utf8(tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_bytes("caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"images\.txt is not UTF-8 text") as info:
        iter_image_paths(listing)
    assert "\n" not in str(info.value)
