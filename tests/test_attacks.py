"""DreamBooth and LoRA-DreamBooth attacks on the tiny model (shared with tests/test_models.py per session)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.dreambooth import DreamBooth, DreamBoothParams, LoraDreamBooth, generate_class_images
from bench import models
from bench.datasets import render_synthetic
from bench.plugins import ATTACKS, RunContext
from bench.registry import ConfigError
from tests.test_models import TEST_PRETRAIN, build_tiny
from tests.conftest import held_out_loss

INSTANCE = "a photo of sks toy"
CLASS = "a photo of a toy"
SUBJECT_SEED = 3


@pytest.fixture(scope="session")
def tiny_a(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory, "a-test", "a", TEST_PRETRAIN)


@pytest.fixture(scope="module")
def subject_images() -> list[np.ndarray]:
    return [render_synthetic(SUBJECT_SEED, i, 64) for i in range(4)]


def make_ctx(tmp_path: Path, seed: int = 0, calls: list | None = None) -> RunContext:
    progress = (lambda d, t: calls.append((d, t))) if calls is not None else (lambda d, t: None)
    return RunContext(seed=seed, device="cpu", profile="tiny", resolution=64, work_dir=tmp_path, progress=progress)


@pytest.fixture(scope="module")
def class_images(tiny_a, tmp_path_factory) -> list[np.ndarray]:
    ctx = make_ctx(tmp_path_factory.mktemp("class"))
    return generate_class_images(tiny_a, CLASS, 4, ctx, "ddim", 4, 3.0)


def tiny_attack(name: str, **over):
    return ATTACKS.create(name, over, profile="tiny")


def test_params_defaults_and_profiles():
    paper = ATTACKS.create("dreambooth")
    assert (paper.params.learning_rate, paper.params.max_train_steps, paper.params.train_batch_size) == (5e-7, 1000, 2)
    assert paper.params.train_text_encoder and paper.params.with_prior_preservation
    assert paper.class_images_needed() == 200
    assert tiny_attack("dreambooth").params.max_train_steps == 40
    assert ATTACKS.create("dreambooth", {"with_prior_preservation": False}).class_images_needed() == 0
    lora = ATTACKS.create("lora-dreambooth")
    assert (lora.params.rank, lora.params.lora_alpha, lora.params.learning_rate) == (4, 4, 1e-4)
    assert not lora.params.train_text_encoder
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        ATTACKS.create("dreambooth", {"learning_rate": -1.0})


def test_dreambooth_personalises(tiny_a, subject_images, class_images, tmp_path):
    calls: list = []
    attack = tiny_attack("dreambooth", max_train_steps=80)
    out = tmp_path / "trained"
    attack.train(make_ctx(tmp_path, calls=calls), tiny_a, subject_images, INSTANCE, CLASS, class_images, out)
    steps = attack.params.max_train_steps
    assert calls == [(i + 1, steps) for i in range(steps)]
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == steps and all(np.isfinite(log["losses"]))
    assert log["n_class"] == 4 and log["precision"] == "fp32" and log["peak_rss_mb"] > 0
    assert {p.name for p in out.iterdir()} == {"unet", "text_encoder", "train_log.json"}
    assert not list(out.rglob("*.bin")) and len(list(out.rglob("*.safetensors"))) == 2
    base, trained = held_out_loss(tiny_a, subject_images), held_out_loss(tiny_a, subject_images, out)
    assert trained < 0.96 * base, (trained, base)  # measured: 0.92
    # The personalised pipeline generates, deterministically, and differently from the base model.
    pipe = models.set_sampler(attack.load_pipeline(tiny_a, out, "cpu"), "ddim")
    gen = models.generate(pipe, [INSTANCE], 2, 4, 3.0, seed=0, resolution=64)
    again = models.generate(pipe, [INSTANCE], 2, 4, 3.0, seed=0, resolution=64)
    before = models.generate(models.load_pipeline(tiny_a, "cpu", "ddim"), [INSTANCE], 2, 4, 3.0, seed=0, resolution=64)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(gen, again))
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(gen, before))


def test_dreambooth_same_seed_same_bytes(tiny_a, subject_images, class_images, tmp_path):
    attack = tiny_attack("dreambooth", max_train_steps=4)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        attack.train(make_ctx(tmp_path, seed), tiny_a, subject_images, INSTANCE, CLASS, class_images, tmp_path / name)
        runs[name] = {c: models.file_sha256(next((tmp_path / name / c).glob("*.safetensors"))) for c in ("unet", "text_encoder")}
    assert runs["a"] == runs["b"]
    assert runs["a"]["unet"] != runs["c"]["unet"]


def _lora_shapes(unet) -> int:
    """LoRA parameter count expected for rank 4 on every to_q/to_k/to_v/to_out.0 linear layer."""
    n = 0
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))):
            n += 4 * (mod.in_features + mod.out_features)
    return n


def test_lora_trains_only_adapters(tiny_a, subject_images, class_images, tmp_path):
    from safetensors.torch import load_file

    attack = tiny_attack("lora-dreambooth", max_train_steps=10)
    for name in ("run1", "run2"):
        attack.train(make_ctx(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, class_images, tmp_path / name)
    out = tmp_path / "run1"
    adapter = out / "unet_lora" / "adapter_model.safetensors"
    assert models.file_sha256(adapter) == models.file_sha256(tmp_path / "run2" / "unet_lora" / "adapter_model.safetensors")
    assert not list(out.rglob("*.bin")) and not (out / "unet").exists()
    weights = load_file(adapter)
    base = models.load_components(tiny_a).unet
    assert all("lora_" in k for k in weights)
    assert sum(w.numel() for w in weights.values()) == _lora_shapes(base) == json.loads(
        (out / "train_log.json").read_text())["trainable_params"]
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    # Merged into the base UNet, only the targeted projections change.
    merged = attack.load_pipeline(tiny_a, out, "cpu").unet.state_dict()
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, merged[k])}
    assert changed and all(any(t in k for t in ("to_q.", "to_k.", "to_v.", "to_out.0.")) for k in changed)


def test_nan_loss_raises_clear_error(tiny_a, subject_images, class_images, tmp_path):
    attack = DreamBooth(DreamBoothParams(learning_rate=float("inf"), max_train_steps=3, num_class_images=4,
                                         mixed_precision="no"))
    with pytest.raises(FloatingPointError, match=r"dreambooth: loss is nan at step 2/3"):
        attack.train(make_ctx(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, class_images, tmp_path / "x")


def test_bad_inputs_are_named(tiny_a, subject_images, tmp_path):
    attack = tiny_attack("lora-dreambooth", max_train_steps=1)
    small = subject_images[:1] + [subject_images[1][:32]]
    with pytest.raises(ValueError, match=r"training image 1: expected uint8 \(64, 64, 3\)"):
        attack.train(make_ctx(tmp_path), tiny_a, small, INSTANCE, CLASS, [], tmp_path / "x")
    with pytest.raises(ValueError, match="needs class images"):
        attack.train(make_ctx(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, [], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        LoraDreamBooth().load_pipeline(tiny_a, tmp_path / "empty", "cpu")


def test_class_images_are_seeded(tiny_a, class_images, tmp_path):
    assert len(class_images) == 4 and all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in class_images)
    again = generate_class_images(tiny_a, CLASS, 4, make_ctx(tmp_path), "ddim", 4, 3.0)
    assert all(np.array_equal(a, b) for a, b in zip(class_images, again))
    assert not np.array_equal(class_images[0], class_images[1])
