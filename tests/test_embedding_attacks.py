"""Textual Inversion and Custom Diffusion on the tiny model: what trains (every other tensor bit-identical), the
learned token in generation, the data augmentation, errors, and a suite run through the harness."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attacks.custom_diffusion import augment
from attacks.textual_inversion import EMBEDS_FILE
from bench import models
from bench.cli import main
from bench.datasets import render_synthetic
from bench.plugins import ATTACKS, RunContext
from tests.conftest import MICRO, write_suite
from tests.test_attacks import tiny_a  # noqa: F401  (the session's tiny model fixture)

INSTANCE = "a photo of sks toy"
CLASS = "a photo of toy"
WORDS = {"identifier": "sks", "class_noun": "toy"}


@pytest.fixture(scope="module")
def subject_images() -> list[np.ndarray]:
    return [render_synthetic(3, i, 64) for i in range(4)]


@pytest.fixture(scope="module")
def class_images() -> list[np.ndarray]:  # stand-ins: the loop only needs images of the right shape
    return [render_synthetic(40 + i, 0, 64) for i in range(4)]


@pytest.fixture(scope="module")
def base(tiny_a):  # noqa: F811
    return models.load_components(tiny_a)


def ctx_for(tmp_path: Path, seed: int = 0) -> RunContext:
    return RunContext(seed=seed, device="cpu", profile="tiny", resolution=64, work_dir=tmp_path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed(before: torch.nn.Module, after: dict[str, torch.Tensor]) -> set[str]:
    """Names of ``before``'s tensors that differ in ``after`` (a missing one counts as changed)."""
    return {k for k, v in before.state_dict().items() if k not in after or not torch.equal(v, after[k])}


def token_row_checks(base, pipe, saved: Path) -> torch.Tensor:
    """The pipeline's text encoder = the base one + one row for "sks" (the saved one); returns that row."""
    emb_key = "embeddings.token_embedding.weight"
    after = pipe.text_encoder.state_dict()
    assert changed(base.text_encoder, after) == {emb_key}
    old, new = base.text_encoder.state_dict()[emb_key], after[emb_key]
    assert new.shape == (len(old) + 1, old.shape[1]) and torch.equal(new[:len(old)], old)
    assert pipe.tokenizer.convert_tokens_to_ids("sks") == len(old)
    from safetensors.torch import load_file

    stored = load_file(str(saved))
    assert list(stored) == ["sks"] and torch.equal(stored["sks"][0], new[-1])
    return new[-1]


def test_defaults_follow_the_examples():
    ti, cd = ATTACKS.create("textual-inversion"), ATTACKS.create("custom-diffusion")
    p = ti.params
    assert (p.learning_rate, p.scale_lr, p.max_train_steps, p.train_batch_size, p.gradient_accumulation_steps,
            p.lr_scheduler, p.lr_warmup_steps) == (5e-4, True, 3000, 1, 4, "constant", 0)
    q = cd.params
    assert (q.learning_rate, q.scale_lr, q.max_train_steps, q.train_batch_size, q.num_class_images,
            q.initializer_token, q.hflip, q.lr_warmup_steps) == (1e-5, True, 250, 2, 200, "ktn", True, 0)
    assert ti.class_images_needed() == 0 and cd.class_images_needed() == 200
    assert ti.learns_token and cd.learns_token and not ATTACKS.create("dreambooth").learns_token
    assert ti.token_words("sks", "dog") == {"identifier": "sks", "class_noun": "dog"}
    assert ATTACKS.create("dreambooth").token_words("sks", "dog") == {}


def test_textual_inversion_trains_one_embedding_row(tiny_a, base, subject_images, tmp_path):  # noqa: F811
    attack = ATTACKS.create("textual-inversion", {"max_train_steps": 4}, profile="tiny")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        attack.train(ctx_for(tmp_path, seed), tiny_a, subject_images, INSTANCE, CLASS, [], tmp_path / name, **WORDS)
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} == {EMBEDS_FILE, "train_log.json"}
    assert sha(out / EMBEDS_FILE) == sha(tmp_path / "b" / EMBEDS_FILE) != sha(tmp_path / "c" / EMBEDS_FILE)
    log = json.loads((out / "train_log.json").read_text())
    assert log["effective_learning_rate"] == pytest.approx(2e-3) and len(log["losses"]) == 4
    pipe = models.set_sampler(attack.load_pipeline(tiny_a, out, "cpu"), "ddim")
    assert not changed(base.unet, pipe.unet.state_dict()) and not changed(base.vae, pipe.vae.state_dict())
    row = token_row_checks(base, pipe, out / EMBEDS_FILE)
    toy = base.text_encoder.get_input_embeddings().weight[base.tokenizer.encode("toy", add_special_tokens=False)[0]]
    assert not torch.equal(row, toy)  # initialised from "toy", then trained
    # The learned word changes generation; prompts without it are the base model's, byte for byte.
    base_pipe = models.load_pipeline(tiny_a, "cpu", "ddim")
    gen = models.generate(pipe, [INSTANCE, CLASS], 1, 3, 3.0, seed=0, resolution=64)
    again = models.generate(pipe, [INSTANCE, CLASS], 1, 3, 3.0, seed=0, resolution=64)
    ref = models.generate(base_pipe, [INSTANCE, CLASS], 1, 3, 3.0, seed=0, resolution=64)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(gen, again))
    assert not np.array_equal(gen[0][1], ref[0][1]) and np.array_equal(gen[1][1], ref[1][1])


def test_custom_diffusion_trains_only_cross_attention_kv_and_the_token(tiny_a, base, subject_images, class_images,
                                                                      tmp_path):  # noqa: F811
    attack = ATTACKS.create("custom-diffusion", {"max_train_steps": 4}, profile="tiny")
    out = tmp_path / "cd"
    attack.train(ctx_for(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, class_images, out, **WORDS)
    assert {p.name for p in out.iterdir()} == {EMBEDS_FILE, "pytorch_custom_diffusion_weights.safetensors",
                                               "train_log.json"}
    log = json.loads((out / "train_log.json").read_text())
    assert log["n_class"] == 4 and log["effective_learning_rate"] == pytest.approx(1e-3 * 2 * 2)
    pipe = models.set_sampler(attack.load_pipeline(tiny_a, out, "cpu"), "ddim")
    unet = pipe.unet.state_dict()
    assert not changed(base.unet, unet) and not changed(base.vae, pipe.vae.state_dict())
    token_row_checks(base, pipe, out / EMBEDS_FILE)
    # The only new UNet tensors: each cross-attention layer's processor K and V, all moved from the layer's own.
    extra = {k for k in unet if k not in base.unet.state_dict()}
    attn2 = [n for n, _ in base.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and extra == {f"{n}.processor.to_{w}_custom_diffusion.weight" for n in attn2 for w in "kv"}
    base_sd = base.unet.state_dict()
    assert all(not torch.equal(unet[k], base_sd[k.replace(".processor.", ".").replace("_custom_diffusion", "")])
               for k in extra)
    gen = models.generate(pipe, [INSTANCE], 2, 3, 3.0, seed=0, resolution=64)
    again = models.generate(pipe, [INSTANCE], 2, 3, 3.0, seed=0, resolution=64)
    ref = models.generate(models.load_pipeline(tiny_a, "cpu", "ddim"), [INSTANCE], 2, 3, 3.0, seed=0, resolution=64)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(gen, again))
    assert all(not np.array_equal(a, b) for (_, a), (_, b) in zip(gen, ref))


@pytest.mark.parametrize("size,factor", [(512, 8), (64, 8), (32, 4)])
def test_custom_diffusion_augmentation(size, factor):
    rng, image = np.random.default_rng(0), render_synthetic(3, 0, size)
    for _ in range(60):
        out, mask, prompt = augment(image, INSTANCE, size, factor, rng, hflip=True, aug=True)
        assert out.shape == (size, size, 3) and out.dtype == np.float32 and -1 <= out.min() <= out.max() <= 1
        assert mask.shape == (size // factor, size // factor) and mask.any() and set(np.unique(mask)) <= {0.0, 1.0}
        prefix = prompt[:-len(INSTANCE)]
        assert prompt.endswith(INSTANCE) and prefix in ("", "a far away ", "very small ", "zoomed in ", "close up ")
        if prefix in ("zoomed in ", "close up "):
            assert mask.all()  # cropped from a larger image: all valid
    out, mask, prompt = augment(image, INSTANCE, size, factor, rng, hflip=False, aug=False)
    assert prompt == INSTANCE and np.allclose(out, image / 127.5 - 1.0, atol=1e-6)
    assert mask[1:-1, 1:-1].all() and not mask[0].any()  # eroded by one latent pixel


def test_errors_are_named(tiny_a, subject_images, tmp_path):  # noqa: F811
    ti = ATTACKS.create("textual-inversion", {"max_train_steps": 1}, profile="tiny")
    with pytest.raises(ValueError, match="needs identifier="):
        ti.train(ctx_for(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, [], tmp_path / "x")
    with pytest.raises(ValueError, match="already has the token"):
        ti.train(ctx_for(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, [], tmp_path / "x",
                 identifier="toy</w>", class_noun="toy")
    with pytest.raises(FileNotFoundError, match=EMBEDS_FILE):
        ti.load_pipeline(tiny_a, tmp_path / "empty", "cpu")
    cd = ATTACKS.create("custom-diffusion", {"max_train_steps": 1}, profile="tiny")
    with pytest.raises(ValueError, match="needs class images"):
        cd.train(ctx_for(tmp_path), tiny_a, subject_images, INSTANCE, CLASS, [], tmp_path / "x", **WORDS)
    with pytest.raises(FileNotFoundError, match="pytorch_custom_diffusion_weights.safetensors"):
        cd.load_pipeline(tiny_a, tmp_path / "empty", "cpu")


def test_suite_with_token_attacks_produces_leaderboard_rows(out_dir, tmp_path):
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none]") \
                .replace("attacks: [{name: dreambooth, max_train_steps: 4, num_class_images: 2}]",
                         "attacks: [{name: dreambooth, max_train_steps: 1, num_class_images: 2}, "
                         "{name: textual-inversion, max_train_steps: 2}, "
                         "{name: custom-diffusion, max_train_steps: 2, num_class_images: 2}]") \
                .replace("metrics: [linf, psnr, brisque]", "metrics: [brisque]")
    assert main(["run", "--suite", str(write_suite(tmp_path, body)), "--out", str(out_dir)]) == 0
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv").set_index("attack")
    assert "(attacker's best)" in df.index  # the worst-case row over the three attacks
    df = df.drop(index="(attacker's best)")
    assert {label.split("(")[0] for label in df.index} == {"dreambooth", "textual-inversion", "custom-diffusion"}
    assert df["brisque/pypi-brisque/native"].notna().all()
    words = {}
    for done in (out_dir / "cache" / "attack").glob("*/done.json"):
        params = json.loads(done.read_text())["params"]
        words[params["attack"]["name"]] = params.get("words")
    # the token attacks get the identifier and class noun; DreamBooth's stage parameters (and key) are unchanged
    assert words == {"dreambooth": None, "textual-inversion": WORDS, "custom-diffusion": WORDS}
