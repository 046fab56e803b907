"""Face metrics with the offline dlib backend (Anti-DreamBooth's FDFR and ISM protocol, METHODS.md 1.8, with dlib in
place of RetinaFace + ArcFace, whose weights cannot be had offline).

Backend: ``dlib.get_frontal_face_detector()`` (HOG + linear SVM, ``upsample`` times upsampled), the 68-point
``shape_predictor_68_face_landmarks`` and ``dlib_face_recognition_resnet_model_v1`` (128-d embedding), all from the
``face-recognition-models`` package. Models load once per process.

``higher_is_better`` is from the defender's point of view for every metric: a defense wants generated images
without a recognisable face of the subject, so a higher FDFR and a lower ISM are better for the defender.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.plugins import METRICS, Image, Metric, MetricInputs
from bench.registry import Requirements

_REQUIRES = Requirements(modules=("dlib", "face_recognition_models"))
SHAPE_PREDICTOR = "shape_predictor_68_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"


def model_file(name: str) -> Path:
    """Path of a model file shipped in the ``face_recognition_models`` package (no pkg_resources needed)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face metrics need the 'face-recognition-models' package "
                                  "(pip install face-recognition-models)")
    path = Path(spec.submodule_search_locations[0]) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dlib model file missing from face_recognition_models")
    return path


@functools.lru_cache(maxsize=1)
def _detector() -> Any:
    import dlib

    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=1)
def _shape_predictor() -> Any:
    import dlib

    return dlib.shape_predictor(str(model_file(SHAPE_PREDICTOR)))


@functools.lru_cache(maxsize=1)
def _face_encoder() -> Any:
    import dlib

    return dlib.face_recognition_model_v1(str(model_file(RESNET)))


def _checked(image: Image, where: str) -> Image:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected a uint8 HxWx3 RGB array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    return np.ascontiguousarray(image)


def detect_faces(image: Image, upsample: int = 1) -> list[Any]:
    """Face boxes (``dlib.rectangle``, pixel coordinates) found by dlib's HOG detector after ``upsample``
    2x upsamplings of the image."""
    return list(_detector()(_checked(image, "detect_faces"), upsample))


def embed(image: Image, upsample: int = 1, num_jitters: int = 1) -> np.ndarray | None:
    """128-d dlib ResNet embedding (float64) of the largest detected face, or None when no face is found."""
    image = _checked(image, "embed")
    faces = detect_faces(image, upsample)
    if not faces:
        return None
    largest = max(faces, key=lambda r: r.width() * r.height())
    shape = _shape_predictor()(image, largest)
    return np.asarray(_face_encoder().compute_face_descriptor(image, shape, num_jitters), dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass(frozen=True)
class Reference:
    """The identity reference: mean embedding over the clean images where a face was found."""

    embedding: np.ndarray
    n_used: int
    n_noface: int


_REFERENCES: dict[tuple[str, int, int], Reference] = {}


def subject_name(subject: Any) -> str:
    return str(getattr(subject, "name", None) or getattr(subject, "id", None) or subject)


def reference_embedding(subject: Any, upsample: int = 1, num_jitters: int = 1) -> Reference:
    """Mean embedding of the subject's clean set_A + set_B at native resolution (Anti-DreamBooth ``test.py``).
    Images without a face are skipped and counted in ``n_noface``. Cached per subject fingerprint."""
    key = (str(subject.fingerprint()), upsample, num_jitters)
    if key not in _REFERENCES:
        images = list(subject.load("A", None)) + list(subject.load("B", None))
        embs = [embed(img, upsample, num_jitters) for img in images]
        found = [e for e in embs if e is not None]
        if not found:
            raise ValueError(f"ism: no face found by dlib HOG (upsample={upsample}) in any of the {len(images)} "
                             f"set_A + set_B images of subject {subject_name(subject)!r}")
        _REFERENCES[key] = Reference(np.mean(found, axis=0), len(found), len(images) - len(found))
    return _REFERENCES[key]


@dataclass(frozen=True)
class FaceParams:
    upsample: int = 1  # dlib HOG upsampling count (face_recognition's default number_of_times_to_upsample)

    def validate(self) -> None:
        if not 0 <= self.upsample <= 4:
            raise ValueError(f"upsample must be in [0, 4], got {self.upsample}")


def _generated(inputs: MetricInputs, metric: str) -> list[Image]:
    if not inputs.generated:
        raise ValueError(f"{metric}: no generated images given (MetricInputs.generated is empty)")
    return inputs.generated


class _FaceMetric(Metric):
    """Face metrics are defined for face subjects only (class noun "person"); elsewhere the cell reports NaN."""

    def applies_to(self, subject) -> bool:
        return getattr(subject, "class_noun", "person") == "person"


@METRICS.register("fdfr", version=1)
class Fdfr(_FaceMetric):
    """Face detection failure rate: (#generated images with no face) / (#generated images), in [0, 1]
    (Anti-DreamBooth: every image counts in the denominator). A defense wants the attacker's model to produce
    no detectable face, so higher is better for the defender."""

    Params = FaceParams
    target = "generated"
    higher_is_better = True
    description = ("fraction of generated images where dlib HOG finds no face; higher = the attacker's images fail "
                   "more often, better for the defender")
    requires = _REQUIRES
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/ism_fdfr.py, dlib HOG in place of RetinaFace"

    def protocol_id(self) -> str:
        return f"fdfr/dlib-hog-up{self.params.upsample}"

    def compute(self, inputs: MetricInputs) -> float:
        images = _generated(inputs, "fdfr")
        misses = sum(1 for img in images if not detect_faces(img, self.params.upsample))
        return misses / len(images)


@dataclass(frozen=True)
class IsmParams(FaceParams):
    num_jitters: int = 1  # dlib compute_face_descriptor jitters (face_recognition's default)

    def validate(self) -> None:
        super().validate()
        if self.num_jitters < 1:
            raise ValueError(f"num_jitters must be >= 1, got {self.num_jitters}")


@METRICS.register("ism", version=1)
class Ism(_FaceMetric):
    """Identity score matching: cosine similarity between each generated image's embedding (largest face) and the
    mean embedding of the subject's clean set_A + set_B (native resolution), averaged over generated images with a
    face (Anti-DreamBooth's skip-noface policy); NaN when no generated image has a face. In [-1, 1]; a defense
    wants low identity similarity, so lower is better for the defender."""

    Params = IsmParams
    target = "generated"
    higher_is_better = False
    description = ("cosine similarity of dlib ResNet face embeddings to the subject's mean clean set_A+B embedding, "
                   "mean over generated images with a face (NaN if none); lower is better for the defender")
    requires = _REQUIRES
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/ism_fdfr.py + test.py, dlib in place of ArcFace"

    def protocol_id(self) -> str:
        jit = "" if self.params.num_jitters == 1 else f"-jit{self.params.num_jitters}"
        return f"ism/dlib-resnet{jit}-hog-up{self.params.upsample}/ref=AB/skip-noface"

    def compute(self, inputs: MetricInputs) -> float:
        images = _generated(inputs, "ism")
        ref = reference_embedding(inputs.subject, self.params.upsample, self.params.num_jitters)
        sims = [cosine(e, ref.embedding) for img in images
                if (e := embed(img, self.params.upsample, self.params.num_jitters)) is not None]
        return float(np.mean(sims)) if sims else float("nan")
