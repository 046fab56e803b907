"""Face metrics (metrics/faces.py): pinned detector facts and identity checks on the real faces in ../shared/data
(skipped with a reason when absent), the ISM (Anti-DreamBooth) and IMS (MetaCloak) definitions against hand
computations, FDFR's denominator, and the insightface backend: its offline messages, and its plumbing through
insightface's own model classes on small fake ONNX models built here (the buffalo_l weights cannot be fetched)."""
from __future__ import annotations

import importlib.util
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.plugins import METRICS, MetricInputs
from bench.registry import ConfigError, build_params
from bench.weights import WeightsUnavailable
from metrics import faces as F
from metrics.faces import FaceDetScore, Fdfr, IdentityProtocol, Ims, Ism, SerFiq

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
IDS = ("n000033", "n000050")
HOG = F.make_backend("dlib-hog")
GREY = np.full((512, 512, 3), 128, np.uint8)
# Measured with dlib-bin 20.0.1 HOG at upsample 1: every image has one face except these.
HOG_UP1_FACES = {"n000033/set_A/0275_01.jpg": 0, "n000033/set_C/0254_01.jpg": 0, "n000033/set_B/0233_02.jpg": 2}


def make(cls, **params):
    return cls(build_params(cls, params, None, f"metric {cls.__name__}"))


def inputs(subject, images) -> MetricInputs:
    return MetricInputs(subject=subject, resolution=512, generated=list(images))


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


class FakeSubject:
    """What the face metrics use of bench.datasets.Subject: ``load(split, resolution)``, ``fingerprint()``."""

    def __init__(self, name: str, splits: dict[str, list[np.ndarray]], class_noun: str = "person") -> None:
        self.name, self.splits, self.class_noun = name, splits, class_noun

    def load(self, split: str, resolution: int | None) -> list[np.ndarray]:
        return list(self.splits[split])

    def fingerprint(self) -> str:
        return f"fake:{self.name}:{id(self)}"


@pytest.fixture(scope="module")
def subjects():
    if not FACES.is_dir():
        pytest.skip(f"real face data not found at {FACES}: these tests need the shared data folder beside the repo")
    from bench.datasets import VGGFace2

    return {s.id: s for s in VGGFace2().subjects(FACES)}


def named(subject, split: str) -> dict[str, np.ndarray]:
    """``{"<id>/set_<split>/<file>": image}`` for one split."""
    return {f"{subject.id}/set_{split}/{Path(src).name}": img
            for src, img in zip(subject.splits[split], subject.load(split, None))}


# --- pinned detector facts ------------------------------------------------------------------------------------

def test_dlib_hog_up1_on_real_faces(subjects):
    images = {k: v for s in subjects.values() for split in "ABC" for k, v in named(s, split).items()}
    found = dict(zip(images, HOG.faces(list(images.values()))))
    assert len(found) == 24
    assert {k: len(v) for k, v in found.items() if len(v) != 1} == HOG_UP1_FACES
    two = found["n000033/set_B/0233_02.jpg"]  # the small second face has the higher SVM score; the largest is used
    small, big = sorted(two, key=lambda f: f.area)
    assert small.score > big.score and F.largest(two) is big and big.box == (167, 118, 391, 342)


def test_dlib_cnn_finds_the_faces_hog_misses(subjects):
    s = subjects["n000033"]
    missed = [named(s, "A")["n000033/set_A/0275_01.jpg"], named(s, "C")["n000033/set_C/0254_01.jpg"]]
    cnn = make(Fdfr, backend="dlib-cnn").backend()
    found = cnn.faces(missed)  # the only dlib CNN run of the suite (~7 s per image); the metrics below reuse it
    assert [len(f) for f in found] == [1, 1] and [len(f) for f in HOG.faces(missed)] == [0, 0]
    for (face,) in found:
        assert 0.5 < face.score < 1.5 and face.box[0] < 256 < face.box[2] and face.box[1] < 256 < face.box[3]
    assert make(Fdfr, backend="dlib-cnn").compute(inputs(s, missed)) == 0.0
    assert make(Fdfr).compute(inputs(s, missed)) == 1.0
    sds = make(FaceDetScore, backend="dlib-cnn").compute(inputs(s, missed))
    assert sds == pytest.approx((found[0][0].score + found[1][0].score) / 2, abs=1e-12)
    assert make(FaceDetScore).compute(inputs(s, missed)) == 0.0


# --- identity ------------------------------------------------------------------------------------------------

def test_reference_skips_and_counts_faceless_images(subjects):
    ref33, ref50 = (F.mean_reference(subjects[i], HOG) for i in IDS)
    assert (ref33.n_used, ref33.n_noface) == (7, 1)  # set_A/0275_01.jpg has no HOG face
    assert (ref50.n_used, ref50.n_noface) == (8, 0)
    assert ref33.embedding.shape == (128,)
    embs = F.reference_embeddings(subjects["n000033"], ("A", "B"), HOG)
    assert F.reference_embeddings(subjects["n000033"], ("A", "B"), HOG) is embs  # cached per subject fingerprint
    assert [e is None for e in embs] == [False, False, False, True, False, False, False, False]


def test_own_identity_beats_the_other_under_ism_and_ims(subjects):
    refs = {sid: F.mean_reference(s, HOG).embedding for sid, s in subjects.items()}
    for sid, subject in subjects.items():
        other = next(o for o in IDS if o != sid)
        set_c = subject.load("C", None)
        embs = [e for e in HOG.embeddings(set_c) if e is not None]
        assert len(embs) == (3 if sid == "n000033" else 4)
        for e in embs:
            assert cos(e, refs[sid]) > cos(e, refs[other])
        own = make(Ism).compute(inputs(subject, set_c))
        cross = make(Ism).compute(inputs(subjects[other], set_c))
        assert own > cross + 0.05
        assert own == pytest.approx(np.mean([cos(e, refs[sid]) for e in embs]), abs=1e-12)  # skip-noface
        assert make(Fdfr).compute(inputs(subject, set_c)) == (0.25 if sid == "n000033" else 0.0)
        # IMS references are set_C, so score the A+B images against each identity's set_C
        gen = subject.load("A", None) + subject.load("B", None)
        ims = make(Ims).protocol()
        pairs = [(o, x) for o, x in zip(ims.image_scores(gen, subject), ims.image_scores(gen, subjects[other]))
                 if o is not None]
        assert len(pairs) == (7 if sid == "n000033" else 8) and all(o > x for o, x in pairs)
        assert make(Ims).compute(inputs(subject, gen)) > make(Ims).compute(inputs(subjects[other], gen))


def test_corrupted_face_is_missed_or_scores_low(subjects):
    import cv2

    subject = subjects["n000050"]
    ref = F.mean_reference(subject, HOG).embedding
    img = subject.load("C", None)[0]
    clean_sim, clean_det = cos(HOG.embeddings([img])[0], ref), F.detection_score(HOG.faces([img])[0])
    rng = np.random.default_rng(0)
    noised = np.clip(img.astype(float) + rng.normal(0, 80, img.shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=12)
    blocks = cv2.resize(cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA), (512, 512),
                        interpolation=cv2.INTER_NEAREST)  # 32 px mosaic
    assert HOG.faces([blocks]) == [[]]
    for bad in (noised, blurred, blocks):
        e = HOG.embeddings([bad])[0]
        assert e is None or cos(e, ref) < clean_sim
        assert F.detection_score(HOG.faces([bad])[0]) < clean_det
    assert make(FaceDetScore).compute(inputs(subject, [noised, blurred, blocks])) < clean_det / 2


# --- protocol definitions --------------------------------------------------------------------------------------

def test_ism_and_ims_differ_exactly_as_defined(subjects):
    subject = subjects["n000050"]
    gen = [GREY] + subject.load("A", None) + [np.zeros((512, 512, 3), np.uint8)]
    embs = HOG.embeddings(gen)
    assert [e is None for e in embs] == [True, False, False, False, False, True]
    faces = [e for e in embs if e is not None]
    mean_ab = np.mean([e for e in F.reference_embeddings(subject, ("A", "B"), HOG) if e is not None], axis=0)
    set_c = [e for e in F.reference_embeddings(subject, ("C",), HOG) if e is not None]
    per_ref = [np.mean([cos(e, c) for c in set_c]) for e in faces]
    expected_ism = np.mean([cos(e, mean_ab) for e in faces])  # skip-noface: 4 images
    expected_ims = (sum(per_ref) - 1.0 * 2) / len(gen)  # noface=-1: the 2 faceless images stay in the mean of 6
    ism, ims = make(Ism).compute(inputs(subject, gen)), make(Ims).compute(inputs(subject, gen))
    assert ism == pytest.approx(expected_ism, abs=1e-9) and ims == pytest.approx(expected_ims, abs=1e-9)
    assert ism - ims > 0.3
    # each axis of the protocol on its own
    assert IdentityProtocol(HOG, ("A", "B"), "mean-ref", -1.0).score(gen, subject) == pytest.approx(
        (sum(cos(e, mean_ab) for e in faces) - 2) / 6, abs=1e-9)
    assert IdentityProtocol(HOG, ("C",), "per-ref", None).score(gen, subject) == pytest.approx(
        np.mean(per_ref), abs=1e-9)
    assert IdentityProtocol(HOG, ("C",), "per-ref", None).id == "ims/dlib-resnet-lm68-hog-up1/ref=C/skip-noface"
    # MetaCloak's deepface-find gate: only set_C images within the distance count, no match -> -1
    dists = [[1 - cos(e, c) for c in set_c] for e in faces]
    gate = float(np.median([d for row in dists for d in row]))  # some pairs pass, some do not
    gated = [np.mean([1 - d for d in row if d <= gate]) if any(d <= gate for d in row) else -1.0 for row in dists]
    ims_gated = make(Ims, match_distance=gate)
    assert ims_gated.compute(inputs(subject, gen)) == pytest.approx((sum(gated) - 2) / 6, abs=1e-9)
    assert ims_gated.compute(inputs(subject, gen)) != pytest.approx(ims, abs=1e-6)
    assert ims_gated.protocol_id() == f"ims/dlib-resnet-lm68-hog-up1/ref=C/match-dist<={gate:g}/noface=-1"


def test_fdfr_counts_every_image(subjects):
    subject = subjects["n000050"]
    set_c = subject.load("C", None)
    gen = [GREY, np.zeros_like(GREY), set_c[0], set_c[1], np.full_like(GREY, 255)]
    assert make(Fdfr).compute(inputs(subject, gen)) == 3 / 5
    assert make(Fdfr).compute(inputs(subject, set_c[:1])) == 0.0
    with pytest.raises(ValueError, match="no generated"):
        make(Fdfr).compute(inputs(subject, []))


def test_no_face_gives_fdfr_one_ism_nan_ims_minus_one(subjects):
    rng = np.random.default_rng(0)
    noise = inputs(subjects["n000050"], [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)])
    assert make(Fdfr).compute(noise) == 1.0
    assert math.isnan(make(Ism).compute(noise))
    assert make(Ims).compute(noise) == -1.0
    assert make(FaceDetScore).compute(noise) == 0.0
    with pytest.raises(ValueError, match=r"face image 0: expected a uint8 HxWx3"):
        make(Fdfr).compute(inputs(None, [np.zeros((8, 8), np.uint8)]))


def test_reference_without_any_face_is_a_clear_error():
    rng = np.random.default_rng(0)
    faceless = FakeSubject("faceless", {s: [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] for s in "ABC"})
    with pytest.raises(ValueError, match=r"finds no face in any of the 2 set_A\+B images of subject 'faceless'"):
        F.mean_reference(faceless, HOG)
    with pytest.raises(ValueError, match=r"set_C images of subject 'faceless'"):
        make(Ims).compute(inputs(faceless, [GREY]))


# --- ids, parameters, registration ---------------------------------------------------------------------------

def test_protocol_ids_pin_backend_reference_and_policy():
    ids = {
        (Fdfr, ()): "fdfr/dlib-hog-up1",  # unchanged since v1: older results stay comparable
        (Fdfr, (("upsample", 0),)): "fdfr/dlib-hog-up0",
        (Fdfr, (("threshold", 0.5),)): "fdfr/dlib-hog-up1-t0.5",
        (Fdfr, (("backend", "dlib-cnn"),)): "fdfr/dlib-cnn-up1",
        (Fdfr, (("backend", "insightface"),)): "fdfr/scrfd10g0.9",
        (Fdfr, (("backend", "insightface"), ("threshold", 0.9))): "fdfr/scrfd10g0.9",
        (Fdfr, (("backend", "insightface"), ("threshold", 0.8))): "fdfr/scrfd10g0.8",
        (Ism, ()): "ism/dlib-resnet-lm68-hog-up1/ref=AB/skip-noface",
        (Ism, (("num_jitters", 5), ("upsample", 2))): "ism/dlib-resnet-lm68-jit5-hog-up2/ref=AB/skip-noface",
        (Ism, (("backend", "dlib-cnn"),)): "ism/dlib-resnet-lm68-cnn-up1/ref=AB/skip-noface",
        (Ism, (("backend", "insightface"),)): "ism/arcface-w600k_r50-scrfd10g0.9/ref=AB/skip-noface",
        (Ims, ()): "ims/dlib-resnet-lm68-hog-up1/ref=C/noface=-1",
        (Ims, (("backend", "insightface"),)): "ims/arcface-w600k_r50-scrfd10g0.9/ref=C/noface=-1",
        (FaceDetScore, ()): "face-det-score/dlib-hog-up1/faces=mean/noface=0",
        (FaceDetScore, (("backend", "insightface"),)): "face-det-score/scrfd10g0.9/faces=mean/noface=0",
    }
    for (cls, params), expected in ids.items():
        assert make(cls, **dict(params)).protocol_id() == expected
    assert Fdfr.higher_is_better and not any(c.higher_is_better for c in (Ism, Ims, FaceDetScore, SerFiq))
    dog = FakeSubject("dog", {}, class_noun="dog")
    for cls in (Fdfr, Ism, Ims, FaceDetScore, SerFiq):
        assert METRICS.get(cls.name) is cls and cls.target == "generated" and cls.version == (2 if cls in (Ism, Ims) else 1)
        assert cls.description and ("Anti-DreamBooth" in cls.paper or "MetaCloak" in cls.paper)
        assert not cls().applies_to(dog) and cls().applies_to(FakeSubject("p", {}))


def test_dlib_identity_is_aligned_by_the_68_point_model_named_in_the_id(subjects):
    """The dlib embedder aligns with the 68-point predictor, whose embedding differs from face_recognition's default
    5-point alignment on the same face: hence `lm68` in the ISM/IMS ids (issue 16)."""
    import dlib

    img = subjects["n000050"].load("A", None)[0]
    face = F.largest(HOG.detector.detect([img])[0])
    ours = HOG.embedder.embed([(img, face)])[0]
    rect = dlib.rectangle(*(int(v) for v in face.box[:2]), int(face.box[2]) - 1, int(face.box[3]) - 1)
    resnet = F._dlib_model(F.RESNET)
    five = dlib.shape_predictor(str(F.model_file("shape_predictor_5_face_landmarks.dat")))(img, rect)
    sixty_eight = F._dlib_model(F.SHAPE_PREDICTOR)(img, rect)
    assert F.SHAPE_PREDICTOR == "shape_predictor_68_face_landmarks.dat" and sixty_eight.num_parts == 68
    np.testing.assert_array_equal(ours, np.asarray(resnet.compute_face_descriptor(img, sixty_eight, 1)))
    assert np.linalg.norm(ours - np.asarray(resnet.compute_face_descriptor(img, five, 1))) > 1e-3
    assert "lm68" in make(Ism).protocol_id() and "68-point" in Ism.description and "68-point" in Ims.description


@pytest.mark.parametrize("cls, params, match", [
    (Fdfr, {"backend": "mtcnn"}, "not one of"),
    (Fdfr, {"upsample": -1}, "upsample must be in"),
    (Fdfr, {"backend": "insightface", "upsample": 2}, "upsample is a dlib setting"),
    (Ism, {"backend": "insightface", "num_jitters": 3}, "num_jitters is a dlib setting"),
    (Ims, {"backend": "insightface", "threshold": 1.5}, r"probability in \(0, 1\)"),
    (Ism, {"num_jitters": 0}, "num_jitters must be >= 1"),
])
def test_bad_parameters_are_config_errors(cls, params, match):
    with pytest.raises(ConfigError, match=match):
        make(cls, **params)


def test_ser_fiq_is_listed_as_unavailable_with_its_reason(capsys):
    from bench.cli import main

    assert SerFiq.unavailable_reason() == F.SER_FIQ_REASON and "MXNet" in F.SER_FIQ_REASON
    assert SerFiq().missing_weights() == F.SER_FIQ_REASON  # suites naming it are refused before anything runs
    with pytest.raises(RuntimeError, match="no maintained implementation"):
        SerFiq().compute(inputs(None, [GREY]))
    assert main(["list", "metrics"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("ser-fiq "))
    assert "[unavailable: SER-FIQ has no maintained implementation" in line
    assert Fdfr.unavailable_reason() is None and Ism.unavailable_reason() is None  # defaults: dlib, offline


# --- insightface backend ----------------------------------------------------------------------------------------

FETCH = "bench weights fetch insightface-buffalo_l"


def test_insightface_weights_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "empty"))
    for cls in (Fdfr, Ism, Ims, FaceDetScore):
        metric = make(cls, backend="insightface")
        assert metric.weight_names() == ("insightface-buffalo_l",) and make(cls).weight_names() == ()
        reason = metric.missing_weights()
        assert "det_10g.onnx, w600k_r50.onnx" in reason and FETCH in reason and "buffalo_l.zip" in reason
        with pytest.raises(WeightsUnavailable, match=f"{cls.name} with backend 'insightface'.*{FETCH}"):
            metric.compute(inputs(FakeSubject("p", {"A": [GREY], "B": [GREY], "C": [GREY]}), [GREY]))
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""\
        datasets: [synthetic]
        defenses: [none]
        scenarios: [clean]
        attacks: [dreambooth]
        metrics: [fdfr, {name: ism, backend: insightface}]
        """))
    from bench.suites import load_suite

    with pytest.raises(ConfigError, match=f"metrics\\[1\\].*'ism' is unavailable here: .*{FETCH}"):
        load_suite(str(suite), "tiny")


def test_buffalo_l_fetcher_keeps_the_two_onnx_files(monkeypatch, tmp_path):
    import zipfile

    from bench import weights

    def fake_download(url: str, dest: Path) -> Path:  # the release zip, with its other models
        assert url == F.BUFFALO_L.source
        assert url == "https://github.com/deepinsight/insightface/releases/download/model-zoo/buffalo_l.zip"
        with zipfile.ZipFile(dest, "w") as zf:
            for name in ("det_10g.onnx", "w600k_r50.onnx", "genderage.onnx", "2d106det.onnx"):
                zf.writestr(f"buffalo_l/{name}", name)
        return dest

    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "download", fake_download)
    folder = weights.get("insightface-buffalo_l").fetch()
    assert sorted(p.name for p in folder.iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    assert (folder / "det_10g.onnx").read_text() == "det_10g.onnx" and F.BUFFALO_L.missing() is None


def test_insightface_missing_modules_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "insightface" else real(name, *a))
    reason = make(Ism, backend="insightface").missing_weights()
    assert "missing Python module(s) insightface" in reason and "--no-deps insightface" in reason and FETCH in reason
    assert make(Ism).missing_weights() is None


STRIDE, GRID = 32, 20  # the fake detector answers on SCRFD's stride-32 level (20 x 20 cells, 2 anchors each)
FAKE_FACES = [  # (cell x, cell y, anchor, score, half box side in strides)
    (10, 10, 0, 0.92, 4.0),  # the largest face, not the highest score
    (3, 3, 1, 0.95, 1.0),
    (16, 16, 0, 0.85, 2.0),  # below insightface's 0.9
]
KPS = np.array([[-1.5, -1.0], [1.5, -1.0], [0.0, 0.4], [-1.2, 1.6], [1.2, 1.6]])  # per half side, around the centre


def fake_scrfd(path: Path) -> None:
    """SCRFD-shaped ONNX (9 outputs: scores, boxes, keypoints for strides 8/16/32; input 1x3x640x640): constant
    detections, gated by the input's value range, so a flat image has no face."""
    from onnx import TensorProto, helper, numpy_helper, save

    nodes = [helper.make_node("ReduceMax", ["input.1"], ["mx"], keepdims=0),
             helper.make_node("ReduceMin", ["input.1"], ["mn"], keepdims=0),
             helper.make_node("Sub", ["mx", "mn"], ["range"]),
             helper.make_node("Min", ["range", "one"], ["gate0"]),
             helper.make_node("Reshape", ["gate0", "shape1"], ["gate"])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([1], np.int64), "shape1")]
    outs: dict[str, list] = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        n = (640 // stride) ** 2 * 2
        arrays = {"score": np.zeros((n, 1), np.float32), "bbox": np.ones((n, 4), np.float32),
                  "kps": np.zeros((n, 10), np.float32)}
        for x, y, anchor, score, half in FAKE_FACES if stride == STRIDE else []:
            k = (y * GRID + x) * 2 + anchor
            arrays["score"][k], arrays["bbox"][k], arrays["kps"][k] = score, half, (KPS * half).ravel()
        for kind, arr in arrays.items():
            inits.append(numpy_helper.from_array(arr, f"{kind}{stride}c"))
            op = ("Mul", [f"{kind}{stride}c", "gate"]) if kind == "score" else ("Identity", [f"{kind}{stride}c"])
            nodes.append(helper.make_node(op[0], op[1], [f"{kind}{stride}"]))
            outs[kind].append(helper.make_tensor_value_info(f"{kind}{stride}", TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(nodes, "fake_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                                                    [1, 3, 640, 640])],
                              outs["score"] + outs["bbox"] + outs["kps"], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def fake_arcface(path: Path) -> np.ndarray:
    """ArcFace-shaped ONNX (Nx3x112x112 -> Nx32): 14 px average pooling, then a fixed random linear map."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = np.random.default_rng(0).normal(size=(192, 32)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["data"], ["pool"], kernel_shape=[14, 14], strides=[14, 14]),
             helper.make_node("Flatten", ["pool"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["fc1"])]
    graph = helper.make_graph(nodes, "fake_arcface",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 32])],
                              [numpy_helper.from_array(w, "w")])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def expected_face(x: int, y: int, half: float, scale: float) -> tuple[tuple[float, ...], np.ndarray]:
    """Box and keypoints the fake detector encodes, in the coordinates of an image letterboxed by ``scale``."""
    centre = np.array([x, y], float) * STRIDE
    box = (*(centre - half * STRIDE), *(centre + half * STRIDE))
    return tuple(v / scale for v in box), (centre + KPS * half * STRIDE) / scale


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # insightface's norm_crop, skimage 0.26
def test_insightface_plumbing_on_fake_onnx_models(monkeypatch, tmp_path):
    for module in F.INSIGHTFACE_MODULES:
        pytest.importorskip(module, reason=f"the insightface backend needs {module} ({F.INSIGHTFACE_INSTALL})")
    import cv2
    from insightface.utils import face_align

    folder = tmp_path / "insightface-buffalo_l"
    folder.mkdir()
    fake_scrfd(folder / "det_10g.onnx")
    w = fake_arcface(folder / "w600k_r50.onnx")
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    img[..., 0] //= 2  # channels differ, so an RGB/BGR mix-up changes the embedding
    backend = make(Ism, backend="insightface").backend()
    assert backend.missing() is None
    (f1, f2), none = backend.faces([img, GREY])
    assert none == [] and (f1.score, f2.score) == pytest.approx((0.95, 0.92))  # score order; 0.85 dropped
    assert [len(f) for f in make(Fdfr, backend="insightface", threshold=0.8).backend().faces([img])] == [3]
    box, kps = expected_face(10, 10, 4.0, 640 / 512)
    assert F.largest([f1, f2]) is f2 and f2.box == pytest.approx(box, abs=1e-3)
    assert f2.landmarks == pytest.approx(kps, abs=1e-3)
    # the embedding, by hand: ArcFace alignment of the largest face, RGB, (x - 127.5) / 127.5, the fake network
    crop = face_align.norm_crop(np.ascontiguousarray(img[..., ::-1]), landmark=kps, image_size=112)[..., ::-1]
    x = ((crop.astype(np.float64) - 127.5) / 127.5).transpose(2, 0, 1)
    pooled = cv2.resize(x.transpose(1, 2, 0), (8, 8), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    emb = backend.embeddings([img, GREY])
    assert emb[1] is None and emb[0] == pytest.approx(pooled.reshape(-1) @ w, rel=1e-4, abs=1e-4)
    # the metrics on top: a fake subject whose clean images are noise (faces for the fake detector)
    splits = {s: [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(2)] for s in "ABC"}
    subject = FakeSubject("fake", splits)
    ref_ab = np.mean(backend.embeddings(splits["A"] + splits["B"]), axis=0)
    ref_c = backend.embeddings(splits["C"])
    gen = inputs(subject, [img, GREY])
    assert make(Fdfr, backend="insightface").compute(gen) == 0.5
    assert make(FaceDetScore, backend="insightface").compute(gen) == pytest.approx((0.95 + 0.92) / 4, abs=1e-6)
    assert make(Ism, backend="insightface").compute(gen) == pytest.approx(cos(emb[0], ref_ab), abs=1e-9)
    assert make(Ims, backend="insightface").compute(gen) == pytest.approx(
        (np.mean([cos(emb[0], c) for c in ref_c]) - 1) / 2, abs=1e-9)
    loads = F._insightface_models.cache_info().misses
    make(Ims, backend="insightface").compute(inputs(subject, [img[::-1].copy()]))
    assert F._insightface_models.cache_info().misses == loads  # models load once per process


# --- retinaface backend (retinaface-pytorch) --------------------------------------------------------------------

RETINA_FETCH = "bench weights fetch retinaface-resnet50"


def test_retinaface_ids_weights_and_missing_messages(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "empty"))
    assert make(Fdfr, backend="retinaface").protocol_id() == "fdfr/retinaface-r50-t0.9"
    assert make(FaceDetScore, backend="retinaface").protocol_id() == "face-det-score/retinaface-r50-t0.9/faces=mean/noface=0"
    assert make(Ism, backend="retinaface").protocol_id() == "ism/arcface-w600k_r50-retinaface-r50-t0.9/ref=AB/skip-noface"
    assert make(Fdfr, backend="retinaface").weight_names() == ("retinaface-resnet50",)  # detection only
    assert make(Ism, backend="retinaface").weight_names() == ("retinaface-resnet50", "insightface-buffalo_l")
    reason = make(Fdfr, backend="retinaface").missing_weights()
    assert RETINA_FETCH in reason and F.RETINAFACE_FILE in reason and "buffalo_l" not in reason
    with pytest.raises(WeightsUnavailable, match=f"fdfr with backend 'retinaface'.*{RETINA_FETCH}"):
        make(Fdfr, backend="retinaface").compute(inputs(FakeSubject("p", {}), [GREY]))
    with pytest.raises(ConfigError, match="upsample is a dlib setting"):
        build_params(Fdfr, {"backend": "retinaface", "upsample": 0}, None, "m")


def test_retinaface_fetcher_keeps_safetensors_only(monkeypatch, tmp_path):
    import io
    import zipfile

    import torch
    from safetensors.torch import load_file

    from bench import weights

    state = {"body.conv1.weight": torch.arange(6.0).view(1, 2, 3), "ClassHead.0.conv1x1.bias": torch.ones(4)}

    def fake_download(url: str, dest: Path) -> Path:
        assert url == F.RETINAFACE.source and url.endswith("retinaface_resnet50_2020-07-20-f168fae3c.zip")
        buf = io.BytesIO()
        torch.save(state, buf)
        with zipfile.ZipFile(dest, "w") as zf:
            zf.writestr("retinaface_resnet50_2020-07-20.pth", buf.getvalue())
        return dest

    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "download", fake_download)
    folder = weights.get("retinaface-resnet50").fetch()
    assert sorted(p.name for p in folder.iterdir()) == [F.RETINAFACE_FILE] and F.RETINAFACE.missing() is None
    loaded = load_file(str(folder / F.RETINAFACE_FILE))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_retinaface_plumbing_on_planted_head_weights(monkeypatch, tmp_path):
    """The real network with random body weights and heads whose output is their bias: on the stride-32 level every
    anchor says face with p = softmax(0, 5)[1] = 0.9933, elsewhere background; the boxes are then the priors (256 and
    512 px squares at the 32 px cell centres, in pixels of a non-square image) and NMS 0.4 keeps one of each size."""
    pytest.importorskip("retinaface", reason=F.RETINAFACE_INSTALL)
    import torch
    from safetensors.torch import save_file

    from retinaface.network import RetinaFace

    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = RetinaFace(name="Resnet50", pretrained=False, return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                           in_channels=256, out_channels=256)
    with torch.no_grad():
        for level in range(3):
            for head in (model.ClassHead, model.BboxHead, model.LandmarkHead):
                head[level].conv1x1.weight.zero_()
                head[level].conv1x1.bias.zero_()
            model.ClassHead[level].conv1x1.bias.copy_(torch.tensor([0.0, 5.0] * 2 if level == 2 else [5.0, -5.0] * 2))
    folder = tmp_path / "retinaface-resnet50"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / F.RETINAFACE_FILE))
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    F._retinaface_model.cache_clear()
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    backend = make(Fdfr, backend="retinaface").backend()
    (faces,) = backend.faces([img])
    p = float(torch.softmax(torch.tensor([0.0, 5.0]), 0)[1])
    assert len(faces) == 2 and all(f.score == pytest.approx(p, abs=1e-6) for f in faces)
    sizes = sorted(round(f.box[2] - f.box[0]) for f in faces)
    assert sizes == [256, 512] and all(round(f.box[3] - f.box[1]) == round(f.box[2] - f.box[0]) for f in faces)
    for f in faces:
        centre = np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2])
        assert (centre % 32) == pytest.approx([16, 16], abs=1e-3) and f.landmarks.shape == (5, 2)
        assert f.landmarks == pytest.approx(np.tile(centre, (5, 1)), abs=1e-3)
    gen = inputs(FakeSubject("p", {}), [img])
    assert make(Fdfr, backend="retinaface").compute(gen) == 0.0
    assert make(FaceDetScore, backend="retinaface").compute(gen) == pytest.approx(p, abs=1e-6)
    assert make(Fdfr, backend="retinaface", threshold=0.995).compute(gen) == 1.0  # 0.9933 is below it
