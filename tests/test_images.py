"""bench.images: strict loading of awkward files (generated in tmp_path), fit, atomic PNG round-trip."""
from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.images import MAX_PIXELS, MIN_SIDE, ImageError, file_sha256, fit, load_image, load_png, save_png


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height, with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _raises_naming(path: Path, *words: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert path.name in msg, msg
    for w in words:
        assert w in msg.lower(), msg
    return info.value


# --- errors ----------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    _raises_naming(tmp_path / "absent.png", "not found")


def test_corrupt_bytes(tmp_path):
    p = tmp_path / "garbage.png"
    p.write_bytes(b"this is not an image at all" * 40)
    _raises_naming(p, "not an image")


def test_corrupt_png_body(tmp_path):
    p = tmp_path / "broken.png"
    Image.fromarray(_noise(96, 96)).save(p)
    data = bytearray(p.read_bytes())
    data[60:200] = bytes(140)  # zero out part of the compressed IDAT stream
    p.write_bytes(bytes(data))
    _raises_naming(p)


def test_truncated_jpeg_is_refused(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.fromarray(_noise(256, 256)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _raises_naming(p, "truncated")


def test_tiny_image_is_refused(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(_noise(40, 40)).save(p)
    _raises_naming(p, "40x40", str(MIN_SIDE))


def test_one_short_side_is_refused(tmp_path):
    p = tmp_path / "strip.png"
    Image.fromarray(_noise(63, 300)).save(p)
    _raises_naming(p, "300x63")


def test_huge_declared_image_is_refused_before_decoding(tmp_path):
    side = int(np.sqrt(MAX_PIXELS)) + 100  # above our limit, below PIL's own bomb limit
    p = _png_header_only(tmp_path / "huge.png", side, side)
    _raises_naming(p, "megapixels", "before decoding")


def test_decompression_bomb_is_caught(tmp_path):
    p = _png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 MP: PIL refuses in Image.open
    _raises_naming(p, "too large")


def test_directory_is_refused(tmp_path):
    d = tmp_path / "folder.png"
    d.mkdir()
    _raises_naming(d, "not a regular file")


# --- conversions -----------------------------------------------------------------------------------------------

def test_rgb_png_is_exact(tmp_path):
    arr = _noise(70, 90)
    p = tmp_path / "rgb.png"
    Image.fromarray(arr).save(p)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (70, 90, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, size=(64, 80), dtype=np.uint8)
    p = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(p)
    out = load_image(p)
    assert out.shape == (64, 80, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_cmyk_jpeg_colours(tmp_path):
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :48] = (200, 40, 20)
    rgb[:, 48:] = (20, 60, 220)
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.shape == (64, 96, 3)
    assert np.abs(out[32, 10].astype(int) - (200, 40, 20)).max() <= 12
    assert np.abs(out[32, 80].astype(int) - (20, 60, 220)).max() <= 12


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 1000, 257 * 100, 32896, 65535], dtype=np.uint16)
    img16 = np.tile(np.repeat(values, 16), (64, 1))  # 64 x 80
    p = tmp_path / "deep.png"
    Image.fromarray(img16).save(p)
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    expected = np.rint(values / 257.0).astype(np.uint8)  # 0, 4, 100, 128, 255
    assert out[0, ::16, 0].tolist() == expected.tolist()
    assert (out[..., 0] == out[..., 2]).all()


def test_float_tiff_is_scaled_and_out_of_range_refused(tmp_path):
    data = np.tile(np.array([0.0, 0.5, 1.0], np.float32).repeat(32), (64, 1))  # 64 x 96, values in [0, 1]
    Image.fromarray(data, mode="F").save(tmp_path / "unit.tif")
    assert load_image(tmp_path / "unit.tif")[0, ::32, 1].tolist() == [0, 128, 255]
    Image.fromarray(data * 1000.0, mode="F").save(tmp_path / "wide.tif")
    _raises_naming(tmp_path / "wide.tif", "outside")


def test_rgba_is_flattened_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :32, 3] = 0  # fully transparent -> white
    rgba[:, 32:, 3] = 128  # half transparent red over white
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    out = load_image(p)
    assert out[5, 5].tolist() == [255, 255, 255]
    assert out[5, 50].tolist() == [255, 127, 127]


def test_la_and_palette_transparency_flatten_on_white(tmp_path):
    la = Image.new("LA", (64, 64), (0, 0))  # black, fully transparent
    la.save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png") == 255).all()
    pal = Image.new("P", (64, 64), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 12))
    pal.info["transparency"] = 3
    pal.save(tmp_path / "pal.png", transparency=3)
    assert (load_image(tmp_path / "pal.png") == 255).all()
    pal2 = Image.new("P", (64, 64), 1)
    pal2.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    pal2.save(tmp_path / "pal2.png")
    assert load_image(tmp_path / "pal2.png")[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path):
    # Stored 96 wide x 64 high, red block in the stored top-left corner. EXIF orientation 6 means "rotate 90
    # degrees clockwise to display": the displayed image is 64 wide x 96 high with the block at the top-right.
    stored = np.full((64, 96, 3), 128, np.uint8)
    stored[:16, :16] = (255, 0, 0)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    p = tmp_path / "rotated.jpg"
    img.save(p, quality=95, exif=exif.tobytes())
    out = load_image(p)
    assert out.shape == (96, 64, 3)
    top_right, top_left = out[:12, -12:].mean(axis=(0, 1)), out[:12, :12].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[1] < 60, top_right
    assert abs(top_left - 128).max() < 20, top_left
    bottom_left = out[-12:, :12].mean(axis=(0, 1))
    assert abs(bottom_left - 128).max() < 20


# --- fit -------------------------------------------------------------------------------------------------------

def test_fit_shrinks_shorter_side_and_centre_crops():
    h, w = 100, 200
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w).astype(np.uint8)[None, :]  # horizontal ramp
    out = fit(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(img).resize((128, 64), Image.Resampling.LANCZOS))[:, 32:96]
    np.testing.assert_array_equal(out, ref)
    # centre crop: the middle of the output is the middle of the ramp, the edges are cut symmetrically
    assert abs(int(out[32, 32, 0]) - 128) <= 3
    assert out[32, 0, 0] > 50 and out[32, -1, 0] < 205


def test_fit_enlarges_portrait_with_bicubic():
    img = _noise(80, 50, seed=3)
    out = fit(img, 64)
    assert out.shape == (64, 64, 3)
    resized = np.asarray(Image.fromarray(img).resize((64, int(64 * 80 / 50)), Image.Resampling.BICUBIC))
    top = int(round((resized.shape[0] - 64) / 2.0))
    np.testing.assert_array_equal(out, resized[top:top + 64])


def test_fit_is_identity_at_native_square_size():
    img = _noise(64, 64, seed=4)
    np.testing.assert_array_equal(fit(img, 64), img)


def test_fit_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        fit(np.zeros((64, 64), np.uint8), 32)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        fit(np.zeros((64, 64, 3), np.float32), 32)


# --- PNG round trip and hashing --------------------------------------------------------------------------------

def test_save_png_round_trip_is_exact_and_atomic(tmp_path):
    arr = _noise(33, 47, seed=5)  # odd sizes, below MIN_SIDE: artifacts are not user inputs
    p = tmp_path / "sub" / "x.png"
    save_png(arr, p)
    np.testing.assert_array_equal(load_png(p), arr)
    arr2 = _noise(33, 47, seed=6)
    save_png(arr2, p)  # overwrite in place
    np.testing.assert_array_equal(load_png(p), arr2)
    assert sorted(x.name for x in p.parent.iterdir()) == ["x.png"]  # no temp files left


def test_save_png_refuses_bad_arrays_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="x.png"):
        save_png(np.zeros((8, 8, 3), np.float64), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_load_png_refuses_other_formats(tmp_path):
    p = tmp_path / "photo.png"
    Image.fromarray(_noise(64, 64)).save(p, format="JPEG")
    with pytest.raises(ImageError, match="photo.png.*PNG"):
        load_png(p)


def test_file_sha256(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_sha256(p) == hashlib.sha256(b"abc" * 1000).hexdigest()
