"""The synthetic identity model (metrics/subject_identity.py): built by the harness, deterministic, identifies held-out
synthetic subjects from images it never saw, and its two metrics follow their definitions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.datasets import SyntheticDataset, SyntheticParams, render_synthetic, synthetic_attributes
from bench.plugins import MetricInputs
from bench.registry import build_params
from bench.weights import WEIGHTS
from metrics import subject_identity as S


def make(cls, **params):
    return cls(build_params(cls, params, None, f"metric {cls.__name__}"))


@pytest.fixture(scope="module")
def model() -> S.IdentityModel:
    """The real synthid (built once per weights root: ~1.5 min on one core the first time)."""
    return S.identity_model()


@pytest.fixture(scope="module")
def subjects():
    return SyntheticDataset(SyntheticParams(num_subjects=24)).subjects(None)


def test_identifies_held_out_subjects_from_unseen_images(model, subjects):
    """Evaluation subjects (seeds 0..23) were never trained on; their set_C images are not in the references."""
    refs = np.stack([S.subject_reference(model, s) for s in subjects])
    own, other, correct = [], [], []
    for k, s in enumerate(subjects):
        sims = model.embed(s.load("C", 32)) @ refs.T
        correct.append((sims.argmax(1) == k).mean())
        own.append(sims[:, k].mean())
        other.append(np.delete(sims, k, axis=1).mean())
    assert np.mean(correct) >= 0.95, f"24-way identification on set_C: {np.mean(correct):.3f}"
    assert np.mean(own) > np.mean(other) + 0.5, (np.mean(own), np.mean(other))


def test_attribute_heads_read_colour_and_pattern(model):
    seeds = list(range(32))
    images = [render_synthetic(s, 20, 32) for s in seeds]
    truth = np.array([[synthetic_attributes(s)[k] for k in ("shape_index", "pattern_index", "colour_index")]
                      for s in seeds])
    acc = (model.attributes(images) == truth).mean(0)
    assert min(acc) >= 0.7, f"shape/pattern/colour accuracy on clean renders {acc} (measured 0.75, 0.84, 0.84)"


def test_metrics_follow_their_definitions(model, subjects):
    subject = subjects[3]
    own, other = subject.load("C", 32), subjects[4].load("C", 32)
    ism, idr = make(S.SubjectIsm), make(S.SubjectIdr, candidates=10)
    ref = S.subject_reference(model, subject)
    for images in (own, other, own[:2] + other[:2]):
        inputs = MetricInputs(subject=subject, resolution=32, generated=images)
        assert ism.compute(inputs) == pytest.approx(float(np.mean(model.embed(images) @ ref)), abs=1e-9)
        refs = np.vstack([ref[None], S.distractor_references(model, 9)])
        assert idr.compute(inputs) == pytest.approx(float(np.mean((model.embed(images) @ refs.T).argmax(1) == 0)))
    assert idr.compute(MetricInputs(subject=subject, resolution=32, generated=own)) == 1.0
    distractor = [render_synthetic(S.DISTRACTOR_SEED_BASE + 2, 20 + i, 32) for i in range(4)]  # a candidate's images
    assert idr.compute(MetricInputs(subject=subject, resolution=32, generated=distractor)) == 0.0
    # generated images at another resolution are resized to the network's input
    big = [np.asarray(render_synthetic(3, 9, 128))]
    assert ism.compute(MetricInputs(subject=subject, resolution=128, generated=big)) > 0.8


def test_protocol_ids_and_scope():
    assert make(S.SubjectIsm).protocol_id() == "subject-ism/synthid-v1/ref=AB"
    assert make(S.SubjectIdr, candidates=20).protocol_id() == "subject-idr/synthid-v1/ref=AB/candidates=20"
    synth = SyntheticDataset(SyntheticParams(num_subjects=1)).subjects(None)[0]
    person = dataclasses.replace(synth, dataset="vggface2", class_noun="person")
    assert make(S.SubjectIsm).applies_to(synth) and not make(S.SubjectIsm).applies_to(person)
    with pytest.raises(Exception, match="candidates"):
        make(S.SubjectIdr, candidates=1)
    assert S.WEIGHTS_NAME in WEIGHTS and WEIGHTS[S.WEIGHTS_NAME].missing() is None  # built here, never "missing"


def test_build_is_deterministic_and_atomic(tmp_path, monkeypatch):
    """Same training settings -> the same weight bytes; a failed build leaves nothing that looks present."""
    micro = dataclasses.replace(S.TRAINING, subjects=6, images_per_subject=2, steps=3, batch_size=4)
    S.build_identity_model(tmp_path / "one", micro)
    S.build_identity_model(tmp_path / "two", micro)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert S.IdentityModel(tmp_path / "one").embed([render_synthetic(0, 0, 32)]).shape == (1, micro.embedding_dim)

    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "root"))

    def broken(folder):
        raise RuntimeError("interrupted")

    entry = dataclasses.replace(WEIGHTS[S.WEIGHTS_NAME], fetcher=broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        entry.path()
    assert not entry.folder().exists()
