"""Imperceptibility, BRISQUE and dlib face metrics: exact values on crafted arrays, and pinned facts on the real
faces in ../shared/data (skipped with a reason when that folder is absent)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from bench.plugins import METRICS, MetricInputs
from bench.registry import ConfigError, build_params
from metrics.faces import Fdfr, Ism, cosine, detect_faces, embed, reference_embedding
from metrics.imperceptibility import Linf, Psnr, Ssim
from metrics.quality import Brisque

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = DATA / "faces"
IDS = ("n000033", "n000050")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # brisque 0.2 float(ndarray) on numpy 2.3


@dataclass
class StandInSubject:
    """The part of bench.datasets.Subject that metrics use: ``load(split, resolution)`` and ``fingerprint()``."""

    name: str
    root: Path

    def files(self, split: str) -> list[Path]:
        return sorted(p for p in (self.root / f"set_{split}").iterdir() if p.suffix.lower() in (".jpg", ".png"))

    def load(self, split: str, resolution: int | None) -> list[np.ndarray]:
        out = []
        for p in self.files(split):
            with PILImage.open(p) as im:
                im = im.convert("RGB")
                if resolution is not None:
                    im = im.resize((resolution, resolution), PILImage.Resampling.BICUBIC)
                out.append(np.asarray(im))
        return out

    def fingerprint(self) -> str:
        return f"stand-in:{self.root}"


def needs_faces() -> None:
    if not FACES.is_dir():
        pytest.skip(f"real face data not found at {FACES}: these tests need the shared data folder beside the repo")


@pytest.fixture(scope="module")
def subjects() -> dict[str, StandInSubject]:
    needs_faces()
    return {i: StandInSubject(i, FACES / i) for i in IDS}


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
    assert make(Ism).protocol_id() == "ism/dlib-resnet-hog-up1/ref=AB/skip-noface" and not Ism.higher_is_better
    assert make(Ism, num_jitters=5, upsample=2).protocol_id() == "ism/dlib-resnet-jit5-hog-up2/ref=AB/skip-noface"
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


# --- faces (dlib) --------------------------------------------------------------------------------------------

# Measured with dlib-bin 20.0.1 HOG at upsample 1: every image has one face except these.
HOG_UP1_FACES = {"n000033/set_A/0275_01.jpg": 0, "n000033/set_C/0254_01.jpg": 0, "n000033/set_B/0233_02.jpg": 2}


def test_dlib_hog_up1_on_real_faces(subjects):
    found = {}
    for sid, subject in subjects.items():
        for split in "ABC":
            for path, img in zip(subject.files(split), subject.load(split, None)):
                found[f"{sid}/set_{split}/{path.name}"] = len(detect_faces(img, 1))
    assert len(found) == 24
    assert {k: v for k, v in found.items() if v != 1} == HOG_UP1_FACES


def test_reference_skips_and_counts_faceless_images(subjects):
    ref33 = reference_embedding(subjects["n000033"])
    ref50 = reference_embedding(subjects["n000050"])
    assert (ref33.n_used, ref33.n_noface) == (7, 1)  # set_A/0275_01.jpg has no HOG face
    assert (ref50.n_used, ref50.n_noface) == (8, 0)
    assert ref33.embedding.shape == (128,)
    assert reference_embedding(subjects["n000033"]) is ref33  # cached per subject fingerprint


def test_set_c_closer_to_own_identity(subjects):
    refs = {sid: reference_embedding(s).embedding for sid, s in subjects.items()}
    for sid, subject in subjects.items():
        other = next(o for o in IDS if o != sid)
        embs = [e for e in (embed(img) for img in subject.load("C", None)) if e is not None]
        assert len(embs) == (3 if sid == "n000033" else 4)
        for e in embs:
            assert cosine(e, refs[sid]) > cosine(e, refs[other])
        inputs = blank(512)
        inputs.generated = subject.load("C", None)
        inputs.subject = subject
        own = make(Ism).compute(inputs)
        inputs.subject = subjects[other]
        cross = make(Ism).compute(inputs)
        assert own > cross + 0.05
        assert own == pytest.approx(np.mean([cosine(e, refs[sid]) for e in embs]), abs=1e-12)  # skip-noface
        assert make(Fdfr).compute(inputs) == (0.25 if sid == "n000033" else 0.0)


def test_degraded_face_is_missed_or_less_similar(subjects):
    import cv2

    subject = subjects["n000050"]
    ref = reference_embedding(subject).embedding
    img = subject.load("C", None)[0]
    clean_sim = cosine(embed(img), ref)
    rng = np.random.default_rng(0)
    noised = np.clip(img.astype(float) + rng.normal(0, 80, img.shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=12)
    for bad in (noised, blurred):
        e = embed(bad)
        assert e is None or cosine(e, ref) < clean_sim


def test_no_face_gives_fdfr_one_and_ism_nan(subjects):
    rng = np.random.default_rng(0)
    inputs = blank()
    inputs.subject = subjects["n000050"]
    inputs.generated = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    assert make(Fdfr).compute(inputs) == 1.0
    assert math.isnan(make(Ism).compute(inputs))
    with pytest.raises(ValueError, match="no generated"):
        make(Fdfr).compute(blank())


def test_reference_without_any_face_is_a_clear_error():
    rng = np.random.default_rng(0)

    class Faceless:
        name = "faceless"

        def load(self, split, resolution):
            return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]

        def fingerprint(self):
            return "faceless-test"

    with pytest.raises(ValueError, match="faceless"):
        reference_embedding(Faceless())
