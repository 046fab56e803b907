"""Imperceptibility and BRISQUE metrics: exact values on crafted arrays, and pinned facts on the real faces in
../shared/data (skipped with a reason when that folder is absent). Face metrics: test_faces.py."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from bench.plugins import METRICS, MetricInputs
from bench.registry import ConfigError, build_params
from metrics.faces import Fdfr, Ism
from metrics.imperceptibility import Linf, Psnr, Ssim
from metrics.quality import Brisque

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = DATA / "faces"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # brisque 0.2 float(ndarray) on numpy 2.3


def needs_faces() -> None:
    if not FACES.is_dir():
        pytest.skip(f"real face data not found at {FACES}: these tests need the shared data folder beside the repo")


def make(cls, **params):
    return cls(build_params(cls, params, None, f"metric {cls.__name__}"))


def blank(resolution: int = 64) -> MetricInputs:
    return MetricInputs(subject=None, resolution=resolution)  # type: ignore[arg-type]


# --- imperceptibility --------------------------------------------------------------------------------------

def pair_inputs(protected, clean) -> MetricInputs:
    inputs = blank()
    inputs.protected, inputs.clean = list(protected), list(clean)
    return inputs


def test_linf_is_exact_max_difference():
    rng = np.random.default_rng(0)
    clean = [rng.integers(20, 236, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    prot = [c.copy() for c in clean]
    prot[0][1, 2, 0] += 5
    prot[2][7, 7, 2] -= 11  # the largest change, negative: |.| must be taken without uint8 wrap-around
    prot[1][3, 3, 1] += 9
    assert make(Linf).compute(pair_inputs(prot, clean)) == 11.0
    assert make(Linf).compute(pair_inputs(clean, clean)) == 0.0
    extreme = pair_inputs([np.full((4, 4, 3), 255, np.uint8)], [np.zeros((4, 4, 3), np.uint8)])
    assert make(Linf).compute(extreme) == 255.0


def test_psnr_inf_and_finite():
    rng = np.random.default_rng(1)
    clean = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    assert make(Psnr).compute(pair_inputs(clean, clean)) == math.inf
    prot = [c.copy() for c in clean]
    prot[0][0, 0, 0] ^= 1  # one pixel changed by exactly 1 in the first image -> MSE = 1 / (32*32*3)
    value = make(Psnr).compute(pair_inputs(prot, clean))
    assert value == math.inf  # the mean of (finite, inf) is inf
    prot[1][5, 5, 1] ^= 1
    expected = 10 * math.log10(255 ** 2 / (1 / (32 * 32 * 3)))
    assert make(Psnr).compute(pair_inputs(prot, clean)) == pytest.approx(expected, rel=1e-12)


def test_ssim_identical_is_one_and_is_skimage_mean():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    clean = [smooth, smooth[::-1].copy()]
    assert make(Ssim).compute(pair_inputs(clean, clean)) == pytest.approx(1.0)
    noisy = [np.clip(c.astype(int) + rng.integers(-40, 41, c.shape), 0, 255).astype(np.uint8) for c in clean]
    value = make(Ssim).compute(pair_inputs(noisy, clean))
    expected = np.mean([structural_similarity(c, n, channel_axis=-1, data_range=255) for n, c in zip(noisy, clean)])
    assert value == pytest.approx(expected, abs=1e-12)
    assert value < 0.8


@pytest.mark.parametrize("cls", [Linf, Psnr, Ssim])
def test_imperceptibility_checks_inputs(cls):
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="no protected"):
        make(cls).compute(pair_inputs([], []))
    with pytest.raises(ValueError, match="2 protected images but 1 clean"):
        make(cls).compute(pair_inputs([a, a], [a]))
    with pytest.raises(ValueError, match=r"protected\[0\] has shape"):
        make(cls).compute(pair_inputs([np.zeros((9, 8, 3), np.uint8)], [a]))


def test_protocol_ids_and_directions():
    assert make(Linf).protocol_id() == "linf/255/protected-vs-clean" and not Linf.higher_is_better
    assert make(Psnr).protocol_id() == "psnr/skimage/protected-vs-clean" and Psnr.higher_is_better
    assert make(Ssim).protocol_id() == "ssim/skimage-win7/protected-vs-clean"
    assert make(Brisque).protocol_id() == "brisque/pypi-brisque/native" and Brisque.higher_is_better
    assert make(Fdfr).protocol_id() == "fdfr/dlib-hog-up1" and Fdfr.higher_is_better
    assert make(Fdfr, upsample=0).protocol_id() == "fdfr/dlib-hog-up0"
    assert make(Ism).protocol_id() == "ism/dlib-resnet-lm68-hog-up1/ref=AB/skip-noface" and not Ism.higher_is_better
    assert make(Ism, num_jitters=5, upsample=2).protocol_id() == "ism/dlib-resnet-lm68-jit5-hog-up2/ref=AB/skip-noface"
    for cls in (Linf, Psnr, Ssim):
        assert cls.target == "protected"
    for cls in (Brisque, Fdfr, Ism):
        assert cls.target == "generated" and cls.description
    with pytest.raises(ConfigError, match="upsample"):
        make(Fdfr, upsample=-1)


def test_registered():
    for cls in (Linf, Psnr, Ssim, Brisque, Fdfr, Ism):
        assert METRICS.get(cls.name) is cls


# --- BRISQUE -------------------------------------------------------------------------------------------------

def test_brisque_equals_package_and_rises_with_noise():
    needs_faces()
    from brisque import BRISQUE

    path = FACES / "n000050" / "set_A" / "0003_01.png"
    with PILImage.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    direct = BRISQUE(url=False).score(PILImage.fromarray(img))
    inputs = blank(512)
    inputs.generated = [img]
    assert make(Brisque).compute(inputs) == pytest.approx(direct, abs=1e-6)
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(float) + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    inputs.generated = [noisy]
    assert make(Brisque).compute(inputs) > direct + 5


def test_brisque_nan_names_the_image():
    rng = np.random.default_rng(0)
    inputs = blank()
    inputs.generated = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((64, 64, 3), 128, np.uint8)]
    with pytest.raises(ValueError, match="generated image 1"):
        with np.errstate(invalid="ignore"):
            make(Brisque).compute(inputs)
    with pytest.raises(ValueError, match="no generated"):
        make(Brisque).compute(blank())


# Face metrics (fdfr, ism, ims, face-det-score, ser-fiq): tests/test_faces.py.
