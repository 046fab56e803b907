"""Face metrics under pinned protocols: FDFR and ISM (Anti-DreamBooth, Le et al., ICCV'23, ``evaluations/``), IMS and
SDS (MetaCloak, Liu et al., CVPR'24, ``robust_facecloak/eval_score.py``); METHODS.md 1.8 and 5.7.

A *backend* is a face detector with its settings plus an embedder. A *protocol* is a backend, the reference split,
the aggregation and what a generated image without a face counts as; the largest detected face is used everywhere.
The protocol id pins all of it (DESIGN.md "Metric"):

- ``ism/<backend>/ref=AB/skip-noface``: cosine to the mean embedding of clean set_A + set_B, mean over generated
  images with a face (Anti-DreamBooth).
- ``ims/<backend>/ref=C/noface=-1``: mean cosine to each set_C image (MetaCloak's 1 - mean cosine distance); an image
  without a face scores -1 and stays in the mean.
- ``fdfr/<detector>``: images without a face / all images (Anti-DreamBooth).
- ``face-det-score/<detector>/faces=mean/noface=0``: detector confidence, mean over faces, 0 without (MetaCloak SDS).

Backends (``backend`` parameter):

- ``dlib-hog``: ``dlib.get_frontal_face_detector()`` run ``upsample`` times upsampled (score: SVM margin), with the
  68-point landmarks (``lm68`` in the ids: face_recognition's default 5-point alignment scores differently) +
  ``dlib_face_recognition_resnet_model_v1`` 128-d embedding (``face-recognition-models``).
- ``dlib-cnn``: dlib's MMOD CNN ``mmod_human_face_detector.dat`` (same package; ~7 s per 512 px image at
  upsample 1, ~2 s at 0, on a 2-core CPU) with the same embedder.
- ``insightface``: insightface ``buffalo_l``: SCRFD-10GF ``det_10g.onnx`` (640x640 input, score >= 0.9 as
  Anti-DreamBooth's RetinaFace, NMS 0.4) + ArcFace ResNet50/WebFace600K ``w600k_r50.onnx`` on the 5-point aligned
  112 px crop. The papers ran deepface's RetinaFace + ArcFace (Anti-DreamBooth) and VGG-Face + OpenCV (MetaCloak),
  whose weights cannot be had here; buffalo_l is the closest maintained equivalent, hence its own ids.
- ``retinaface``: RetinaFace ResNet-50 of ``retinaface-pytorch`` (the detector family of Anti-DreamBooth's FDFR, at its
  0.9 threshold; weights ``bench weights fetch retinaface-resnet50``, kept as safetensors) at the image's own size,
  + the same ArcFace on its 5-point aligned crop; FDFR and the detection score need only the detector.

Detections and embeddings are cached per image content and backend settings, reference embeddings per (subject
fingerprint, split, backend); models load once per process. ``higher_is_better`` is from the defender's side.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from bench import weights
from bench.images import checked_rgb
from bench.plugins import METRICS, Image, Metric, MetricInputs, NotProvided, explained, subject_name
from bench.registry import Requirements

SHAPE_PREDICTOR = "shape_predictor_68_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"
MMOD = "mmod_human_face_detector.dat"
DET_FILE, REC_FILE = "det_10g.onnx", "w600k_r50.onnx"
INSIGHTFACE_DET_SIZE = (640, 640)
INSIGHTFACE_NMS = 0.4
DEFAULT_THRESHOLD = {"dlib-hog": 0.0, "dlib-cnn": 0.0, "insightface": 0.9, "retinaface": 0.9}
INSIGHTFACE_MODULES = ("insightface", "onnxruntime", "onnx")
INSIGHTFACE_INSTALL = ("pip install onnx onnxruntime && pip install --no-deps insightface "
                       "(--no-deps: its opencv-python requirement clashes with opencv-python-headless)")
RETINAFACE_MODULES = ("retinaface", "torchvision")
RETINAFACE_INSTALL = ("pip install --no-deps retinaface-pytorch (--no-deps: it pins torch 1.9 and albumentations 1.0; "
                      "the backend uses only its network and box decoding)")
RETINAFACE_FILE = "retinaface_resnet50_2020-07-20.safetensors"
RETINAFACE_PRIORS = {"min_sizes": [[16, 32], [64, 128], [256, 512]], "steps": [8, 16, 32]}  # retinaface-pytorch's
RETINAFACE_NMS = 0.4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # its albumentations.Normalize defaults
Backend = Literal["dlib-hog", "dlib-cnn", "insightface", "retinaface"]
NON_DLIB_BACKENDS = ("insightface", "retinaface")  # dlib's settings (upsample, num_jitters) are refused with these


def _fetch_buffalo_l(folder: Path) -> None:
    """Download insightface's buffalo_l.zip and keep the detector and recognition ONNX files."""
    archive = weights.download(BUFFALO_L.source, folder / "buffalo_l.zip")
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            if Path(member).name in BUFFALO_L.files:
                (folder / Path(member).name).write_bytes(zf.read(member))
    archive.unlink()


BUFFALO_L = weights.register(weights.Weights(
    name="insightface-buffalo_l",
    what="insightface buffalo_l: SCRFD-10GF face detector (det_10g.onnx) + ArcFace ResNet50 trained on WebFace600K "
         "(w600k_r50.onnx)",
    used_by="fdfr, ism, ims, face-det-score with backend=insightface",
    files=(DET_FILE, REC_FILE),
    source="https://github.com/deepinsight/insightface/releases/download/model-zoo/buffalo_l.zip",
    fetcher=_fetch_buffalo_l,
    license="insightface pretrained models: non-commercial research only",
))


def _fetch_retinaface(folder: Path) -> None:
    """Download retinaface-pytorch's ResNet-50 release (a zip holding one pickled state dict) and keep it as
    safetensors (read with ``weights_only=True``: tensors only, no code)."""
    archive = weights.download(RETINAFACE.source, folder / "retinaface.zip")
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m.endswith((".pth", ".pt"))]
        if len(members) != 1:
            raise weights.WeightsUnavailable(f"{RETINAFACE.source}: expected one .pth in the zip, found {members}")
        pth = folder / Path(members[0]).name
        pth.write_bytes(zf.read(members[0]))
    archive.unlink()
    weights.pickle_to_safetensors(pth, folder / RETINAFACE_FILE)
    pth.unlink()


RETINAFACE = weights.register(weights.Weights(
    name="retinaface-resnet50",
    what="RetinaFace ResNet-50 face detector (retinaface-pytorch 'resnet50_2020-07-20', trained on WIDER FACE)",
    used_by="fdfr, ism, ims, face-det-score with backend=retinaface (ism/ims also need insightface-buffalo_l's ArcFace)",
    files=(RETINAFACE_FILE,),
    source="https://github.com/ternaus/retinaface/releases/download/0.01/retinaface_resnet50_2020-07-20-f168fae3c.zip",
    fetcher=_fetch_retinaface,
    license="MIT (ternaus/retinaface); trained on WIDER FACE (research use)",
))


# --- models (loaded once per process) -------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=None)
def _dlib_model(name: str) -> Any:
    import dlib

    if name == "hog":
        return dlib.get_frontal_face_detector()
    loaders = {MMOD: dlib.cnn_face_detection_model_v1, SHAPE_PREDICTOR: dlib.shape_predictor,
               RESNET: dlib.face_recognition_model_v1}
    return loaders[name](str(model_file(name)))


def _ort_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@functools.lru_cache(maxsize=2)
def _insightface_models(folder: str) -> tuple[Any, Any]:
    """(SCRFD detector, ArcFace embedder) from the ONNX files in ``folder``, through insightface's own classes."""
    import onnxruntime
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    det_path, rec_path = str(Path(folder) / DET_FILE), str(Path(folder) / REC_FILE)
    det = SCRFD(model_file=det_path, session=onnxruntime.InferenceSession(det_path, providers=_ort_providers()))
    rec = ArcFaceONNX(model_file=rec_path, session=onnxruntime.InferenceSession(rec_path, providers=_ort_providers()))
    det.nms_thresh = INSIGHTFACE_NMS
    return det, rec


@functools.lru_cache(maxsize=2)
def _retinaface_model(path: str) -> Any:
    """retinaface-pytorch's RetinaFace ResNet-50 network with the safetensors weights at ``path``, in eval mode."""
    from safetensors.torch import load_file
    from retinaface.network import RetinaFace

    with warnings.catch_warnings():  # it passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = RetinaFace(name="Resnet50", pretrained=False, return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                         in_channels=256, out_channels=256)
    net.load_state_dict(load_file(path))
    return net.eval()


# --- detections, embeddings and their caches --------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Face:
    """One detection: box (left, top, right, bottom; right/bottom exclusive, pixels), detector score, landmarks."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None  # (5, 2) keypoints (SCRFD) or None

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def largest(faces: list[Face]) -> Face | None:
    """The face with the largest box (the first of equals), as Anti-DreamBooth picks it; None for no face."""
    return max(faces, key=lambda f: f.area) if faces else None


class _Lru:
    """A bounded in-process cache (image content -> detections / embedding)."""

    def __init__(self, size: int = 4096) -> None:
        self.size, self.data = size, OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        self.data[key] = value
        while len(self.data) > self.size:
            self.data.popitem(last=False)


_DETECTIONS, _EMBEDDINGS = _Lru(), _Lru()


def _digest(image: Image) -> str:
    return hashlib.blake2b(repr(image.shape).encode() + image.tobytes(), digest_size=16).hexdigest()


def _missing_modules(modules: tuple[str, ...], how: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"missing Python module(s) {', '.join(absent)} ({how})" if absent else None


class Detector:
    """Finds faces; ``id`` names it with every setting that changes its output."""

    id: str = ""
    tag: str = ""  # the detector's part of a backend id
    modules: tuple[str, ...] = ()
    weight_names: tuple[str, ...] = ()
    min_face_px: int = 0  # smallest face it finds in an image as given (0: it rescales its input, no limit)

    @property
    def cache_key(self) -> str:
        """``id`` plus where its weights live (two folders of one weights name must not share cached results)."""
        return "|".join([self.id] + [str(weights.get(n).folder()) for n in self.weight_names])

    def detect(self, images: list[Image]) -> list[list[Face]]:
        """Faces per image (batched over the images not cached yet)."""
        keys = [(self.cache_key, _digest(img)) for img in images]
        out = [_DETECTIONS.get(k) for k in keys]
        todo = [i for i, faces in enumerate(out) if faces is None]
        for i, faces in zip(todo, self._detect([images[i] for i in todo]) if todo else []):
            _DETECTIONS.put(keys[i], faces)
            out[i] = faces
        return out

    def _detect(self, images: list[Image]) -> list[list[Face]]:
        raise NotImplementedError


def _dlib_face(rect: Any, score: float) -> Face:
    return Face((rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1), float(score))


class _Dlib(Detector):
    """Shared id of the dlib detectors: ``dlib-<kind>-up<upsample>[-t<threshold>]``."""

    kind = ""
    upsample: int
    threshold: float

    @property
    def tag(self) -> str:  # type: ignore[override]
        return f"{self.kind}-up{self.upsample}" + (f"-t{self.threshold:g}" if self.threshold else "")

    @property
    def id(self) -> str:  # type: ignore[override]
        return f"dlib-{self.tag}"

    @property
    def min_face_px(self) -> int:  # type: ignore[override]
        """dlib's detectors find faces of about 80x80 px and larger; each upsampling halves that."""
        return max(1, 80 // 2 ** self.upsample)


@dataclass(frozen=True)
class DlibHog(_Dlib):
    """dlib HOG + linear SVM; score = SVM margin (``run()``), kept when above ``threshold``."""

    upsample: int = 1
    threshold: float = 0.0
    kind = "hog"
    modules = ("dlib",)

    def _detect(self, images: list[Image]) -> list[list[Face]]:
        out = []
        for img in images:
            rects, scores, _ = _dlib_model("hog").run(img, self.upsample, self.threshold)
            out.append([_dlib_face(r, s) for r, s in zip(rects, scores)])
        return out


@dataclass(frozen=True)
class DlibCnn(_Dlib):
    """dlib MMOD CNN; score = MMOD confidence, kept when >= ``threshold``. Batched over images of one size."""

    upsample: int = 1
    threshold: float = 0.0
    batch_size: int = 4
    kind = "cnn"
    modules = ("dlib", "face_recognition_models")

    def _detect(self, images: list[Image]) -> list[list[Face]]:
        out: list[list[Face]] = [[] for _ in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(img.shape, []).append(i)
        for idx in by_shape.values():
            found = _dlib_model(MMOD)([images[i] for i in idx], self.upsample, batch_size=self.batch_size)
            for i, dets in zip(idx, found):
                out[i] = [_dlib_face(d.rect, d.confidence) for d in dets if d.confidence >= self.threshold]
        return out


@dataclass(frozen=True)
class Scrfd(Detector):
    """insightface buffalo_l SCRFD-10GF on a 640x640 letterboxed input; score = face probability >= ``threshold``."""

    threshold: float = 0.9
    modules = INSIGHTFACE_MODULES
    weight_names = (BUFFALO_L.name,)

    @property
    def tag(self) -> str:  # type: ignore[override]
        return f"scrfd10g{self.threshold:g}"

    @property
    def id(self) -> str:  # type: ignore[override]
        return self.tag

    def _detect(self, images: list[Image]) -> list[list[Face]]:
        det, _ = _insightface_models(str(BUFFALO_L.path()))
        det.det_thresh = self.threshold  # shared model, per-call threshold (insightface 0.7 and 2.x both read it)
        out = []
        for img in images:
            boxes, kps = det.detect(np.ascontiguousarray(img[..., ::-1]), input_size=INSIGHTFACE_DET_SIZE)
            out.append([Face(tuple(float(v) for v in b[:4]), float(b[4]),  # type: ignore[arg-type]
                             None if kps is None else np.asarray(kps[j], np.float64)) for j, b in enumerate(boxes)])
        return out


@dataclass(frozen=True)
class RetinaFaceR50(Detector):
    """RetinaFace ResNet-50 (retinaface-pytorch) at the image's own size, ImageNet-normalised RGB; faces with
    probability above ``threshold`` (Anti-DreamBooth's RetinaFace uses 0.9), NMS 0.4, five landmarks. The package's
    ``Model.predict_jsons`` first resizes the longest side to a ``max_size``; detecting at the native size keeps the
    protocol free of that choice (generated images are 512 px at the paper profile)."""

    threshold: float = 0.9
    modules = RETINAFACE_MODULES
    weight_names = (RETINAFACE.name,)

    @property
    def tag(self) -> str:  # type: ignore[override]
        return f"retinaface-r50-t{self.threshold:g}"

    @property
    def id(self) -> str:  # type: ignore[override]
        return self.tag

    def _detect(self, images: list[Image]) -> list[list[Face]]:
        import torch
        from retinaface.box_utils import decode, decode_landm
        from retinaface.prior_box import priorbox
        from torchvision.ops import nms

        net = _retinaface_model(str(RETINAFACE.path() / RETINAFACE_FILE))
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        out = []
        for img in images:
            h, w = img.shape[:2]
            x = (torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255 - mean) / std
            with torch.no_grad():
                loc, conf, land = net(x.unsqueeze(0))
            priors = priorbox(clip=False, image_size=(h, w), **RETINAFACE_PRIORS)
            boxes = decode(loc[0], priors, [0.1, 0.2]) * torch.tensor([w, h, w, h], dtype=torch.float32)
            marks = decode_landm(land[0], priors, [0.1, 0.2]) * torch.tensor([w, h] * 5, dtype=torch.float32)
            scores = torch.softmax(conf[0], dim=-1)[:, 1]
            keep = torch.where(scores > self.threshold)[0]
            keep = keep[nms(boxes[keep], scores[keep], RETINAFACE_NMS)]
            out.append([Face(tuple(float(v) for v in boxes[k]), float(scores[k]),  # type: ignore[arg-type]
                             marks[k].double().numpy().reshape(5, 2)) for k in keep.tolist()])
        return out


class Embedder:
    """Face -> identity embedding; ``id`` names it with its settings."""

    id: str = ""
    modules: tuple[str, ...] = ()
    weight_names: tuple[str, ...] = ()

    def embed(self, items: list[tuple[Image, Face]]) -> list[np.ndarray]:
        raise NotImplementedError


@dataclass(frozen=True)
class DlibResnet(Embedder):
    """dlib's ResNet (128-d, float64) on the face aligned by the 68-point landmark predictor
    (``shape_predictor_68_face_landmarks``; ``lm68`` in the id), ``num_jitters`` as face_recognition passes it.
    face_recognition's default is the 5-point predictor, which moves distances on the same photos by up to 0.06:
    scores under the two alignments do not compare, hence the landmark model in the id."""

    num_jitters: int = 1
    modules = ("dlib", "face_recognition_models")

    @property
    def id(self) -> str:  # type: ignore[override]
        return "dlib-resnet-lm68" + ("" if self.num_jitters == 1 else f"-jit{self.num_jitters}")

    def embed(self, items: list[tuple[Image, Face]]) -> list[np.ndarray]:
        import dlib

        out = []
        for img, face in items:
            left, top, right, bottom = (int(v) for v in face.box)
            shape = _dlib_model(SHAPE_PREDICTOR)(img, dlib.rectangle(left, top, right - 1, bottom - 1))
            out.append(np.asarray(_dlib_model(RESNET).compute_face_descriptor(img, shape, self.num_jitters),
                                  dtype=np.float64))
        return out


@dataclass(frozen=True)
class ArcFace(Embedder):
    """insightface ArcFace w600k_r50 (512-d) on the 5-point ``norm_crop`` (112 px), one batched ONNX run."""

    id = "arcface-w600k_r50"
    modules = INSIGHTFACE_MODULES
    weight_names = (BUFFALO_L.name,)

    def embed(self, items: list[tuple[Image, Face]]) -> list[np.ndarray]:
        from insightface.utils import face_align

        _, rec = _insightface_models(str(BUFFALO_L.path()))
        with warnings.catch_warnings():  # insightface calls skimage's deprecated SimilarityTransform.estimate
            warnings.simplefilter("ignore", FutureWarning)
            crops = [face_align.norm_crop(np.ascontiguousarray(img[..., ::-1]), landmark=face.landmarks,
                                          image_size=rec.input_size[0]) for img, face in items]
        batch = 1 if isinstance(rec.input_shape[0], int) else 32  # a model exported with a fixed batch of 1
        feats = [rec.get_feat(crops[i:i + batch]) for i in range(0, len(crops), batch)]
        return list(np.concatenate(feats).astype(np.float64)) if feats else []


@dataclass(frozen=True)
class FaceBackend:
    """A detector + an embedder. ``id`` is the backend part of ISM/IMS protocol ids."""

    detector: Detector
    embedder: Embedder
    install: str = "pip install dlib-bin face-recognition-models"

    @property
    def id(self) -> str:
        return f"{self.embedder.id}-{self.detector.tag}"

    @property
    def weight_names(self) -> tuple[str, ...]:
        """Detector and embedder weights (``detector_weight_names`` for the detection-only metrics)."""
        return tuple(dict.fromkeys(self.detector.weight_names + self.embedder.weight_names))

    @property
    def cache_key(self) -> str:
        return f"{self.embedder.id}|{self.detector.cache_key}"

    def missing_modules(self, embeds: bool = True) -> str | None:
        modules = self.detector.modules + (self.embedder.modules if embeds else ())
        return _missing_modules(tuple(dict.fromkeys(modules)), self.install)

    def missing_weights(self, embeds: bool = True) -> str | None:
        names = self.weight_names if embeds else self.detector.weight_names
        return next((r for r in (weights.get(n).missing() for n in names) if r), None)

    def missing(self, embeds: bool = True) -> str | None:
        """None when usable here, else every missing module and weights entry and how to get them. ``embeds``
        False: the detector's needs only (FDFR, detection score)."""
        reasons = [r for r in (self.missing_modules(embeds), self.missing_weights(embeds)) if r]
        return "; ".join(reasons) or None

    def faces(self, images: list[Image]) -> list[list[Face]]:
        return self.detector.detect([checked_rgb(img, f"face image {i}") for i, img in enumerate(images)])

    def embeddings(self, images: list[Image]) -> list[np.ndarray | None]:
        """Embedding of each image's largest face (None where no face is found); batched, cached."""
        images = [checked_rgb(img, f"face image {i}") for i, img in enumerate(images)]
        keys = [(self.cache_key, _digest(img)) for img in images]
        cached = [_EMBEDDINGS.get(k) for k in keys]  # an array, False (no face) or None (not cached)
        todo = [i for i, e in enumerate(cached) if e is None]
        chosen = [largest(f) for f in self.detector.detect([images[i] for i in todo])] if todo else []
        with_face = [(i, face) for i, face in zip(todo, chosen) if face is not None]
        for i in todo:
            cached[i] = False
        embs = self.embedder.embed([(images[i], f) for i, f in with_face]) if with_face else []
        for (i, _), e in zip(with_face, embs):
            cached[i] = e
        for i in todo:
            _EMBEDDINGS.put(keys[i], cached[i])
        return [None if e is False else e for e in cached]


@functools.lru_cache(maxsize=None)
def make_backend(backend: Backend, upsample: int = 1, threshold: float | None = None,
                 num_jitters: int = 1) -> FaceBackend:
    """The backend for these settings (``threshold`` None = the backend's default)."""
    t = DEFAULT_THRESHOLD[backend] if threshold is None else float(threshold)
    if backend == "dlib-hog":
        return FaceBackend(DlibHog(upsample, t), DlibResnet(num_jitters))
    if backend == "dlib-cnn":
        return FaceBackend(DlibCnn(upsample, t), DlibResnet(num_jitters))
    if backend == "retinaface":
        return FaceBackend(RetinaFaceR50(t), ArcFace(), install=f"{RETINAFACE_INSTALL}; {INSIGHTFACE_INSTALL}")
    return FaceBackend(Scrfd(t), ArcFace(), install=INSIGHTFACE_INSTALL)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- references and the identity protocol -------------------------------------------------------------------

_REFERENCES: dict[tuple[str, tuple[str, ...], str], list[np.ndarray | None]] = {}


def reference_embeddings(subject: Any, splits: tuple[str, ...], backend: FaceBackend) -> list[np.ndarray | None]:
    """Per-image embeddings (None: no face) of the subject's clean ``splits`` at native resolution, in split order.
    Cached per (subject fingerprint, splits, backend id)."""
    key = (str(subject.fingerprint()), tuple(splits), backend.cache_key)
    if key not in _REFERENCES:
        images = [img for split in splits for img in subject.load(split, None)]
        _REFERENCES[key] = backend.embeddings(images)
    return _REFERENCES[key]


@dataclass(frozen=True)
class Reference:
    """The identity reference: mean embedding over the clean images where a face was found."""

    embedding: np.ndarray
    n_used: int
    n_noface: int


def mean_reference(subject: Any, backend: FaceBackend, splits: tuple[str, ...] = ("A", "B")) -> Reference:
    """Anti-DreamBooth's reference (``test.py``): mean over the clean images with a face; the others are counted."""
    embs = _found(subject, splits, backend)
    n_all = len(reference_embeddings(subject, splits, backend))
    return Reference(np.mean(embs, axis=0), len(embs), n_all - len(embs))


def _found(subject: Any, splits: tuple[str, ...], backend: FaceBackend) -> list[np.ndarray]:
    embs = reference_embeddings(subject, splits, backend)
    found = [e for e in embs if e is not None]
    if not found:
        raise ValueError(f"face reference: {backend.id} finds no face in any of the {len(embs)} "
                         f"set_{'+'.join(splits)} images of subject {subject_name(subject)!r}")
    return found


@dataclass(frozen=True)
class IdentityProtocol:
    """Backend + reference split + aggregation + no-face policy, on the largest face of each image.

    ``aggregation`` "mean-ref": cosine to the mean reference embedding (ISM, Anti-DreamBooth); "per-ref": mean of the
    cosines to each reference image (IMS, MetaCloak). ``noface`` None skips images without a face (NaN if all lack
    one); a number is such an image's score, kept in the mean. ``match_distance`` (per-ref only; MetaCloak's deepface
    ``find``): only references within this cosine distance count, and an image none of them matches scores
    ``noface`` too (MetaCloak: 1 - 2 = -1)."""

    backend: FaceBackend
    splits: tuple[str, ...]
    aggregation: Literal["mean-ref", "per-ref"]
    noface: float | None = None
    match_distance: float | None = None

    @property
    def id(self) -> str:
        name = "ism" if self.aggregation == "mean-ref" else "ims"
        policy = "skip-noface" if self.noface is None else f"noface={self.noface:g}"
        match = "" if self.match_distance is None else f"/match-dist<={self.match_distance:g}"
        return f"{name}/{self.backend.id}/ref={''.join(self.splits)}{match}/{policy}"

    def references(self, subject: Any) -> np.ndarray:
        """(k, d) reference rows: the mean (k = 1) or every reference image with a face."""
        found = _found(subject, self.splits, self.backend)
        return np.mean(found, axis=0)[None] if self.aggregation == "mean-ref" else np.stack(found)

    def image_scores(self, images: list[Image], subject: Any) -> list[float | None]:
        """Per generated image: mean cosine to the reference rows (those within ``match_distance``), None where no
        face is found or no reference matches."""
        refs = self.references(subject)
        out: list[float | None] = []
        for e in self.backend.embeddings(images):
            sims = [] if e is None else [cosine(e, r) for r in refs]
            if self.match_distance is not None:
                sims = [c for c in sims if 1.0 - c <= self.match_distance]
            out.append(float(np.mean(sims)) if sims else None)
        return out

    def score(self, images: list[Image], subject: Any) -> float:
        scores = self.image_scores(images, subject)
        if self.noface is not None:
            return float(np.mean([self.noface if s is None else s for s in scores]))
        kept = [s for s in scores if s is not None]
        if kept:
            return float(np.mean(kept))
        return explained(math.nan, f"no face detected (or matched to the references) in any of the {len(scores)} "
                                   f"generated images")


# --- parameters and metrics --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceParams:
    backend: Backend = "dlib-hog"
    upsample: int = 1  # dlib detectors: 2x upsamplings (face_recognition's default 1); insightface: must stay 1
    threshold: float | None = None  # detector score threshold; None = the backend's (dlib 0, insightface 0.9)

    def validate(self) -> None:
        if not 0 <= self.upsample <= 4:
            raise ValueError(f"upsample must be in [0, 4], got {self.upsample}")
        if self.backend in NON_DLIB_BACKENDS and self.upsample != 1:
            raise ValueError(f"upsample is a dlib setting; the {self.backend} backend sets its own input size "
                             f"(leave it at 1)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        if self.backend in NON_DLIB_BACKENDS and self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"{self.backend} threshold is a probability in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class IdentityParams(FaceParams):
    num_jitters: int = 1  # dlib compute_face_descriptor jitters (face_recognition's default); insightface: 1

    def validate(self) -> None:
        super().validate()
        if self.num_jitters < 1:
            raise ValueError(f"num_jitters must be >= 1, got {self.num_jitters}")
        if self.backend in NON_DLIB_BACKENDS and self.num_jitters != 1:
            raise ValueError(f"num_jitters is a dlib setting; leave it at 1 with the {self.backend} backend")


def _generated(inputs: MetricInputs, metric: str) -> list[Image]:
    if not inputs.generated:
        raise ValueError(f"{metric}: no generated images given (MetricInputs.generated is empty)")
    return inputs.generated


class _FaceMetric(Metric):
    """Face metrics are defined for face subjects only (class noun "person"); elsewhere the cell reports NaN.
    What the chosen backend needs (modules, weights) is checked per instance."""

    Params = FaceParams
    target = "generated"
    requires = Requirements(modules=("dlib", "face_recognition_models"))
    embeds: ClassVar[bool] = True  # False: detection only (FDFR, detection score) needs only the detector's weights

    applies_description = "face subjects (class noun person)"

    def applies_to(self, subject) -> bool:
        return getattr(subject, "class_noun", "person") == "person"

    def cannot_measure(self, resolution: int, harness_models: bool) -> str | None:
        if harness_models:
            return ("the harness-built tiny/proxy models do not generate faces, so no face is found in any generated "
                    "image (FDFR 1.0, ISM/IMS empty); face metrics measure at the paper profile (real Stable Diffusion)")
        limit = self.backend().detector.min_face_px
        if resolution < limit:
            return (f"{self.backend().detector.id} finds faces of {limit} px and larger, and generated images are "
                    f"{resolution} px: no face can be found (raise `upsample`, or use a larger resolution)")
        return None

    def backend(self) -> FaceBackend:
        p = self.params
        return make_backend(p.backend, p.upsample, p.threshold, getattr(p, "num_jitters", 1))

    def weight_names(self) -> tuple[str, ...]:
        backend = self.backend()
        return backend.weight_names if self.embeds else tuple(backend.detector.weight_names)

    def missing_weights(self) -> str | None:
        """Also the backend's modules: ``bench list`` and suite validation see them per parameter set."""
        return self.backend().missing(self.embeds)

    def _ready(self) -> FaceBackend:
        """The backend, else WeightsUnavailable (naming the files and `bench weights fetch NAME`) or
        ModuleNotFoundError; never another backend in its place."""
        backend = self.backend()
        reason = backend.missing(self.embeds)
        if reason:
            error = weights.WeightsUnavailable if backend.missing_weights(self.embeds) else ModuleNotFoundError
            raise error(f"{self.name} with backend {self.params.backend!r}: {reason}")
        return backend


@METRICS.register("fdfr", version=1)
class Fdfr(_FaceMetric):
    """Face detection failure rate (Anti-DreamBooth FDFR); backends dlib-hog, dlib-cnn, insightface.

    (#generated images with no face) / (#generated images), in [0, 1]; every image counts in the denominator
    (``ism_fdfr.py``). Higher is better for the defender."""

    higher_is_better = True
    embeds = False
    description = "fraction of generated images where the face detector finds no face (Anti-DreamBooth FDFR)"
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/ism_fdfr.py, detector per backend"

    def protocol_id(self) -> str:
        return f"fdfr/{self.backend().detector.id}"

    def compute(self, inputs: MetricInputs) -> float:
        images = _generated(inputs, "fdfr")
        faces = self._ready().faces(images)
        return sum(1 for f in faces if not f) / len(images)


@METRICS.register("ism", version=2)
class Ism(_FaceMetric):
    """Identity score matching (Anti-DreamBooth ISM); backends dlib-hog, dlib-cnn, insightface.

    Cosine of each generated image's largest-face embedding to the mean embedding of the subject's clean set_A +
    set_B (native size), mean over images with a face; NaN when none has one. In [-1, 1]; lower is better for the
    defender."""

    Params = IdentityParams
    higher_is_better = False
    description = ("cosine of face embeddings to the mean clean set_A+B embedding, mean over generated images with a "
                   "face (Anti-DreamBooth ISM); dlib backends align faces with the 68-point landmark model (lm68)")
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/ism_fdfr.py + test.py, backbone per backend"

    def protocol(self) -> IdentityProtocol:
        return IdentityProtocol(self.backend(), ("A", "B"), "mean-ref", None)

    def protocol_id(self) -> str:
        return self.protocol().id

    def compute(self, inputs: MetricInputs) -> float:
        images = _generated(inputs, "ism")
        self._ready()
        return self.protocol().score(images, inputs.subject)


@dataclass(frozen=True)
class ImsParams(IdentityParams):
    # MetaCloak's eval_score.py runs deepface's find: only set_C images within the recogniser's verification
    # threshold (VGG-Face cosine 0.40) count, and an image matching none scores -1. None = every set_C image counts
    # (METHODS.md 5.7's reading). The threshold is the backbone's: pick the one your backend is verified with.
    match_distance: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.match_distance is not None and not 0 <= self.match_distance <= 2:
            raise ValueError(f"match_distance is a cosine distance in [0, 2], got {self.match_distance}")


@METRICS.register("ims", version=2)
class Ims(_FaceMetric):
    """Identity matching score (MetaCloak IMS); backends dlib-hog, dlib-cnn, insightface.

    Per generated image, the mean cosine of its largest-face embedding to each clean set_C image with a face
    (= 1 - mean cosine distance); an image without a face scores -1 and stays in the mean. ``match_distance``
    reproduces MetaCloak's code more closely (only references within that distance count; no match = -1); MetaCloak
    also embeds a face-less image whole (deepface ``enforce_detection=False``) and takes deepface's first face, where
    this scores it -1 and takes the largest. Lower is better for the defender."""

    Params = ImsParams
    higher_is_better = False
    description = ("mean cosine of face embeddings to each clean set_C image, -1 for an image without a face "
                   "(MetaCloak IMS); dlib backends align faces with the 68-point landmark model (lm68)")
    paper = "MetaCloak (Liu et al., CVPR'24) robust_facecloak/eval_score.py IMS, backbone per backend"

    def protocol(self) -> IdentityProtocol:
        return IdentityProtocol(self.backend(), ("C",), "per-ref", -1.0, self.params.match_distance)

    def protocol_id(self) -> str:
        return self.protocol().id

    def compute(self, inputs: MetricInputs) -> float:
        images = _generated(inputs, "ims")
        self._ready()
        return self.protocol().score(images, inputs.subject)


def detection_score(faces: list[Face]) -> float:
    """MetaCloak's per-image SDS: mean detector score over the detected faces, 0 when there is none."""
    return float(np.mean([f.score for f in faces])) if faces else 0.0


@METRICS.register("face-det-score", version=1)
class FaceDetScore(_FaceMetric):
    """Face detection score (MetaCloak SDS); backends dlib-hog, dlib-cnn, insightface.

    Per generated image the mean detector score of its faces (0 without a face), mean over images. Scales differ per
    detector (SCRFD: probability >= threshold, like MetaCloak's RetinaFace; dlib CNN: MMOD confidence, about 1;
    dlib HOG: SVM margin, about 0-3), so only values under one protocol id compare. Lower is better for the
    defender."""

    higher_is_better = False
    embeds = False
    description = "mean face-detector confidence over generated images, 0 without a face (MetaCloak SDS)"
    paper = "MetaCloak (Liu et al., CVPR'24) robust_facecloak/eval_score.py SDS, detector per backend"

    def protocol_id(self) -> str:
        return f"face-det-score/{self.backend().detector.id}/faces=mean/noface=0"

    def compute(self, inputs: MetricInputs) -> float:
        images = _generated(inputs, "face-det-score")
        return float(np.mean([detection_score(f) for f in self._ready().faces(images)]))


SER_FIQ_REASON = ("SER-FIQ has no maintained implementation: Anti-DreamBooth's evaluations/ser_fiq.py needs MXNet, "
                  "insightface's MXNet model files from a Google Drive link and numpy==1.22 (METHODS.md 1.8); "
                  "not ported")


@METRICS.register("ser-fiq", version=1)
class SerFiq(NotProvided):
    """SER-FIQ face quality (Terhoerst et al., CVPR'20) as Anti-DreamBooth's ``evaluations/ser_fiq.py`` runs it
    (MTCNN alignment, T=100 dropout passes); always unavailable, listed so `bench list` says why."""

    higher_is_better = False
    description = "SER-FIQ face image quality (Anti-DreamBooth); unavailable: no maintained implementation"
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/ser_fiq.py; SER-FIQ (Terhoerst et al., CVPR'20)"
    reason = SER_FIQ_REASON
    pid = "ser-fiq/mxnet-arcface-mtcnn/T100"

    def applies_to(self, subject) -> bool:
        return getattr(subject, "class_noun", "person") == "person"
