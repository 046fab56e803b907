"""Bypass transforms (METHODS.md 6.1): exact parameters, shapes, determinism under a seeded rng."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import attacks.transforms
from attacks.transforms import CropResize, GaussianBlur, GaussianNoise, HFlip, Jpeg, Resize
from bench.plugins import TRANSFORMS
from bench.registry import ConfigError, build_params

CLASSES = {cls.name: cls for cls in (Jpeg, GaussianBlur, HFlip, Resize, CropResize, GaussianNoise)}


def make(name: str, **params):
    """Build with the registry's validation, without importing the other built-in plug-in modules."""
    cls = CLASSES[name]
    return cls(build_params(cls, params, None, f"transform {name}"))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A textured 64x64 RGB image (smooth gradients + noise) so every transform changes it."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image512() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)


ALL = [("jpeg", {}), ("gaussian-blur", {}), ("hflip", {}), ("resize", {"size": 32}), ("crop-resize", {}),
       ("gaussian-noise", {})]


def test_all_registered():
    assert sorted(CLASSES) == sorted(n for n, _ in ALL)
    for name, cls in CLASSES.items():
        assert TRANSFORMS.get(name) is cls


@pytest.mark.parametrize("name,params", ALL)
def test_uint8_rgb_and_deterministic(name, params, image):
    t = make(name, **params)
    outs = [t.apply(image, np.random.default_rng(42)) for _ in range(2)]
    assert outs[0].dtype == np.uint8 and outs[0].ndim == 3 and outs[0].shape[2] == 3
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.shares_memory(outs[0], image) or name == "hflip"


@pytest.mark.parametrize("name,params", ALL)
def test_rejects_non_uint8(name, params, image):
    with pytest.raises(ValueError, match=name):
        make(name, **params).apply(image.astype(np.float32), np.random.default_rng(0))


def test_paper_defaults():
    assert make("jpeg").params.quality == 75
    blur = make("gaussian-blur").params
    assert (blur.kernel, blur.sigma_min, blur.sigma_max) == (7, 0.1, 2.0)
    assert make("hflip").params.p == 0.5
    assert (make("crop-resize").params.crop, make("crop-resize").params.reference) == (384, 512)
    assert make("gaussian-noise").params.sigma == 0.05


def test_jpeg_changes_pixels_keeps_shape(image):
    out = make("jpeg").apply(image, np.random.default_rng(0))
    assert out.shape == image.shape
    assert np.abs(out.astype(int) - image).max() > 0
    low = make("jpeg", quality=10).apply(image, np.random.default_rng(0))
    assert np.abs(low.astype(int) - image).mean() > np.abs(out.astype(int) - image).mean()


def test_blur_fixed_sigma_equals_cv2(image):
    out = make("gaussian-blur", sigma_min=1.5, sigma_max=1.5).apply(image, np.random.default_rng(0))
    ref = cv2.GaussianBlur(image, (7, 7), sigmaX=1.5, sigmaY=1.5, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_array_equal(out, ref)


def test_blur_sigma_drawn_per_image(image):
    """Sigma ~ U(0.1, 2.0) from the rng: the result equals cv2 at the first uniform draw of that rng."""
    t = make("gaussian-blur")
    sigma = np.random.default_rng(7).uniform(0.1, 2.0)
    ref = cv2.GaussianBlur(image, (7, 7), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_array_equal(t.apply(image, np.random.default_rng(7)), ref)
    rng = np.random.default_rng(7)
    first, second = t.apply(image, rng), t.apply(image, rng)
    assert not np.array_equal(first, second)  # a fresh sigma for each image


def test_hflip(image):
    np.testing.assert_array_equal(make("hflip", p=1.0).apply(image, np.random.default_rng(0)), np.fliplr(image))
    np.testing.assert_array_equal(make("hflip", p=0.0).apply(image, np.random.default_rng(0)), image)
    rng = np.random.default_rng(3)
    flips = [not np.array_equal(make("hflip").apply(image, rng), image) for _ in range(200)]
    assert 70 < sum(flips) < 130  # p = 0.5


def test_resize(image):
    out = make("resize", size=32).apply(image, np.random.default_rng(0))
    assert out.shape == (32, 32, 3)
    wide = np.zeros((40, 80, 3), np.uint8)
    assert make("resize", size=20).apply(wide, np.random.default_rng(0)).shape == (20, 40, 3)


def test_crop_resize_512_crops_384(image512):
    out = make("crop-resize").apply(image512, np.random.default_rng(0))
    assert out.shape == image512.shape
    assert attacks.transforms.crop_box(512, 512, 384, 512) == (64, 64, 384, 384)
    # equals PIL's bicubic upscaling of the central 384x384 crop
    from PIL import Image as PILImage
    ref = np.asarray(PILImage.fromarray(image512[64:448, 64:448]).resize((512, 512), PILImage.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, ref)


def test_crop_resize_scales_with_resolution(image):
    assert attacks.transforms.crop_box(64, 64, 384, 512) == (8, 8, 48, 48)
    out = make("crop-resize").apply(image, np.random.default_rng(0))
    assert out.shape == image.shape
    assert not np.array_equal(out, image)


def test_noise_matches_skimage_and_sigma(image):
    from skimage.util import random_noise

    out = make("gaussian-noise", sigma=0.05).apply(image, np.random.default_rng(5))
    ref = np.round(random_noise(image, mode="gaussian", var=0.05 ** 2, clip=True, rng=np.random.default_rng(5)) * 255)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    mid = np.full((64, 64, 3), 128, np.uint8)  # away from the clip, the residual std is sigma * 255
    resid = make("gaussian-noise", sigma=0.05).apply(mid, np.random.default_rng(5)).astype(float) - 128
    assert abs(resid.std() - 12.75) < 0.5
    assert not np.array_equal(make("gaussian-noise").apply(image, np.random.default_rng(6)), out)


@pytest.mark.parametrize("name,params", [("jpeg", {"quality": 0}), ("gaussian-blur", {"kernel": 6}),
                                         ("gaussian-blur", {"sigma_min": 2.0, "sigma_max": 1.0}),
                                         ("hflip", {"p": 1.5}), ("crop-resize", {"crop": 600}),
                                         ("gaussian-noise", {"sigma": -0.1}), ("resize", {"size": 0})])
def test_bad_params_are_config_errors(name, params):
    with pytest.raises(ConfigError, match=name):
        make(name, **params)


def test_resize_needs_size():
    with pytest.raises(ConfigError, match="size"):
        make("resize")
