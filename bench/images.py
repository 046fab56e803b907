"""Image I/O for the harness: strict loading, DreamBooth-style resize + centre crop, atomic PNG writes.

Every image that travels between stages is a ``uint8`` array of shape (H, W, 3), RGB (``bench.plugins``).
``load_image`` is the one door for user-supplied files: it applies the EXIF orientation, converts every
supported mode to RGB, flattens transparency on white and refuses files that are missing, corrupt,
truncated, too small or too large, always with a message that names the file.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 64  # px; smaller images cannot be used for 64-px training
MAX_PIXELS = 64_000_000  # 64 megapixels; refused before decoding

_RGB_MODES = {"1", "L", "P", "RGB", "RGBX", "YCbCr", "LAB", "HSV", "CMYK"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, Image.DecompressionBombError)


class ImageError(ValueError):
    """A bad image file; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def checked_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as a C-contiguous uint8 HxWx3 array; ValueError naming ``what`` for anything else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what}: expected a uint8 HxWx3 RGB array, got a {desc}")
    return np.ascontiguousarray(image)


def _flatten_on_white(img: Image.Image) -> np.ndarray:
    """Alpha composite over a white background (straight alpha), rounded to uint8."""
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:4] / 255.0
    out = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to uint8 RGB."""
    mode = img.mode
    if mode == "P" and ("transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"):
        return _flatten_on_white(img)
    if mode in _ALPHA_MODES:
        return _flatten_on_white(img)
    if mode in _RGB_MODES:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit data (PNG/TIFF): scale 0..65535 onto 0..255 (x/257), never clip at 255.
        data = np.asarray(img, dtype=np.int64)
        if data.min() < 0 or data.max() > 65535:
            raise ImageError(path, f"mode {mode} values span [{data.min()}, {data.max()}], outside the 16-bit range")
        gray = np.rint(data / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        # Float images: values in [0, 1] are scaled by 255; values in [0, 255] are taken as 8-bit levels.
        data = np.asarray(img, dtype=np.float64)
        if not np.isfinite(data).all():
            raise ImageError(path, "float image (mode F) contains NaN or infinite values")
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi > 255:
            raise ImageError(path, f"float image (mode F) values span [{lo}, {hi}], outside [0, 1] and [0, 255]")
        gray = np.rint(data * 255.0 if hi <= 1.0 else data).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    raise ImageError(path, f"unsupported image mode {mode!r}")


def load_image(path: Path) -> np.ndarray:
    """Load a user image as uint8 HxWx3 RGB with its EXIF orientation applied; raise ImageError otherwise.

    The file is fully decoded (so truncated files fail here, not later), unless some other code has set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    try:
        with warnings.catch_warnings():
            # our MAX_PIXELS check below says it with the file's name; PIL's own warning would leak to the user
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(path, f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, more than the "
                                       f"{MAX_PIXELS / 1e6:.1f} allowed (refused before decoding)")
            try:
                img.load()
            except _DECODE_ERRORS as e:
                truncated = "truncated" in str(e).lower() or isinstance(e, EOFError)
                raise ImageError(path, f"{'truncated' if truncated else 'corrupt'} image data ({e})") from None
            try:
                oriented = ImageOps.exif_transpose(img)
            except (*_DECODE_ERRORS, KeyError, struct.error) as e:
                raise ImageError(path, f"malformed EXIF orientation data ({type(e).__name__}: {e})") from None
            rgb = _to_rgb(oriented if oriented is not None else img, path)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image is too large (decompression bomb guard: {e})") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image, or a corrupt or unsupported image file") from None
    except _DECODE_ERRORS as e:
        raise ImageError(path, f"cannot read image ({type(e).__name__}: {e})") from None
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(path, f"image is {w}x{h} px; both sides must be at least {MIN_SIDE} px")
    return rgb


def fit(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` px and centre-crop to a square, as DreamBooth's
    ``--center_crop`` (torchvision Resize + CenterCrop arithmetic); PIL bicubic when enlarging, LANCZOS when
    shrinking, no resampling when the shorter side already matches."""
    checked_rgb(image, "fit")
    if resolution < 1:
        raise ValueError(f"fit: resolution must be a positive number of pixels, got {resolution}")
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    if short != resolution:
        new_long = int(resolution * long / short)
        size = (resolution, new_long) if w <= h else (new_long, resolution)  # PIL size is (width, height)
        method = Image.Resampling.LANCZOS if short > resolution else Image.Resampling.BICUBIC
        image = np.asarray(Image.fromarray(image).resize(size, method), dtype=np.uint8)
        h, w = image.shape[:2]
    top = int(round((h - resolution) / 2.0))
    left = int(round((w - resolution) / 2.0))
    return np.ascontiguousarray(image[top:top + resolution, left:left + resolution])


def save_png(image: np.ndarray, path: Path) -> None:
    """Write ``image`` as an RGB PNG atomically (temp file in the same folder, then ``os.replace``)."""
    checked_rgb(image, f"save_png {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(image, mode="RGB").save(fh, format="PNG")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_png(path: Path) -> np.ndarray:
    """Read a PNG written by ``save_png`` back bit-exactly (no size limits, no conversion but to RGB)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.format != "PNG":
                raise ImageError(path, f"expected a PNG file, found {img.format}")
            return np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    except ImageError:
        raise
    except (UnidentifiedImageError, *_DECODE_ERRORS) as e:
        raise ImageError(path, f"cannot read PNG ({type(e).__name__}: {e})") from None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


__all__ = ["MIN_SIDE", "MAX_PIXELS", "ImageError", "load_image", "fit", "save_png", "load_png", "file_sha256"]
