"""Attacker-side bypass transforms (METHODS.md 6.1), applied to the training images before fine-tuning.

Every transform maps a uint8 HxWx3 RGB image to a uint8 RGB image and is deterministic given the
``numpy.random.Generator`` it is handed (random choices are drawn from it, never from global state).
Parameter defaults are the settings of the paper/code named in each class docstring.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage

from bench.plugins import TRANSFORMS, Image, Transform


def check_image(image: Image, where: str) -> None:
    """Raise ValueError unless ``image`` is a uint8 (H, W, 3) array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"{where}: expected a uint8 HxWx3 RGB array, got {got}")


def _pil_bicubic(image: Image, width: int, height: int) -> Image:
    """PIL bicubic resize of a uint8 RGB array to (height, width)."""
    return np.asarray(PILImage.fromarray(image).resize((width, height), PILImage.Resampling.BICUBIC))


@dataclass(frozen=True)
class JpegParams:
    quality: int = 75  # PIL JPEG quality (MetaCloak --jpeg_quality 75, DiffShortcut --quality=75)

    def validate(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")


@TRANSFORMS.register("jpeg", version=1)
class Jpeg(Transform):
    """JPEG re-encoding through PIL in memory, PIL's default 4:2:0 chroma subsampling
    (MetaCloak ``--jpeg_transform``, DiffShortcut ``jpeg.sh``)."""

    Params = JpegParams
    paper = "MetaCloak (Liu et al., CVPR'24) train_dreambooth.py --jpeg_quality 75"

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        check_image(image, "jpeg")
        buf = io.BytesIO()
        PILImage.fromarray(image).save(buf, format="JPEG", quality=self.params.quality)
        buf.seek(0)
        with PILImage.open(buf) as out:
            return np.asarray(out.convert("RGB"))


@dataclass(frozen=True)
class BlurParams:
    kernel: int = 7  # kernel side in pixels (MetaCloak gauK=7)
    sigma_min: float = 0.1  # pixels; sigma ~ U(sigma_min, sigma_max) per image, as torchvision GaussianBlur
    sigma_max: float = 2.0

    def validate(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer, got {self.kernel}")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")


@TRANSFORMS.register("gaussian-blur", version=1)
class GaussianBlur(Transform):
    """Gaussian blur as torchvision ``GaussianBlur(kernel_size=7, sigma=(0.1, 2.0))`` in MetaCloak: one sigma
    (pixels) drawn per image from ``rng``; sigma_min == sigma_max gives a fixed sigma. Computed with
    ``cv2.GaussianBlur`` with reflect-101 borders (torch's ``pad(mode="reflect")``: edge pixel not repeated)."""

    Params = BlurParams
    paper = "MetaCloak (Liu et al., CVPR'24) gauK=7, sigma ~ U(0.1, 2.0)"

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        check_image(image, "gaussian-blur")
        sigma = float(rng.uniform(self.params.sigma_min, self.params.sigma_max))
        k = self.params.kernel
        return cv2.GaussianBlur(image, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


@dataclass(frozen=True)
class FlipParams:
    p: float = 0.5  # probability of a horizontal flip (DreamBooth --random_flip)

    def validate(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")


@TRANSFORMS.register("hflip", version=1)
class HFlip(Transform):
    """Horizontal flip with probability p, drawn from ``rng`` (one draw per image, also when p is 0 or 1)."""

    Params = FlipParams
    paper = "MetaCloak / CAAT / Hoenig et al. fine-tuning with --random_flip (p=0.5)"

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        check_image(image, "hflip")
        flip = rng.random() < self.params.p
        return np.ascontiguousarray(image[:, ::-1]) if flip else image


@dataclass(frozen=True)
class ResizeParams:
    size: int  # target length of the shorter side, pixels (no paper default: must be given)

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


@TRANSFORMS.register("resize", version=1)
class Resize(Transform):
    """PIL bicubic resize so the shorter side is ``size`` pixels, keeping the aspect ratio (as torchvision
    ``Resize(size)``); a square image becomes size x size. The output keeps the new size."""

    Params = ResizeParams
    paper = "MetaCloak --transform_sr / DiffShortcut sr.py resize step (size 128)"

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        check_image(image, "resize")
        h, w = image.shape[:2]
        s = self.params.size
        new_h, new_w = (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s)
        return _pil_bicubic(image, new_w, new_h)


@dataclass(frozen=True)
class CropResizeParams:
    crop: int = 384  # side of the centre crop at the reference resolution, pixels
    reference: int = 512  # resolution at which ``crop`` is stated (Mist: 512 -> 384 -> 512)

    def validate(self) -> None:
        if not 1 <= self.crop <= self.reference:
            raise ValueError(f"need 1 <= crop <= reference, got crop={self.crop}, reference={self.reference}")


def crop_box(height: int, width: int, crop: int, reference: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the centred crop, scaled as crop_px = round(crop * side / reference)."""
    ch = max(1, round(crop * height / reference))
    cw = max(1, round(crop * width / reference))
    return (height - ch) // 2, (width - cw) // 2, ch, cw


@TRANSFORMS.register("crop-resize", version=1)
class CropResize(Transform):
    """Centre crop then PIL bicubic resize back to the input size (Mist ``utils/postprocess.py``: 512 -> crop 384
    -> 512). At other resolutions the crop scales with the image: crop_px = round(crop * H / reference)."""

    Params = CropResizeParams
    paper = "Mist (Liang & Wu, arXiv 2305.12683) utils/postprocess.py"

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        check_image(image, "crop-resize")
        h, w = image.shape[:2]
        top, left, ch, cw = crop_box(h, w, self.params.crop, self.params.reference)
        cropped = np.ascontiguousarray(image[top:top + ch, left:left + cw])
        return _pil_bicubic(cropped, w, h)


@dataclass(frozen=True)
class NoiseParams:
    sigma: float = 0.05  # standard deviation in [0, 1] pixel units (0.05 = 12.75/255)

    def validate(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")


@TRANSFORMS.register("gaussian-noise", version=1)
class GaussianNoise(Transform):
    """Additive Gaussian noise: ``skimage.util.random_noise(mode="gaussian", var=sigma**2, clip=True)`` drawing
    from ``rng``, then rounded back to uint8."""

    Params = NoiseParams
    paper = "scikit-image random_noise (gaussian mode), sigma in [0, 1] units"

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        check_image(image, "gaussian-noise")
        from skimage.util import random_noise  # imports scipy.stats (~1 s): only when applied

        noisy = random_noise(image, mode="gaussian", var=self.params.sigma ** 2, clip=True, rng=rng)
        return np.round(noisy * 255.0).astype(np.uint8)
