"""AdvDM, Mist, PhotoGuard and SDS on one tiny surrogate (defenses/single_model.py): budget, effect on the surrogate,
determinism, PhotoGuard's step schedule, AdvDM's one (t, eps) draw per step, parameter checks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.diffusion
import defenses.baselines  # noqa: F401  (registers random-noise)
import defenses.single_model as sm
from bench.datasets import render_synthetic
from bench.diffusion import LatentCache, denoising_loss, encode_prompt, to_tensor
from bench.models import load_components
from bench.plugins import DEFENSES, RunContext
from bench.registry import ConfigError

RES = 64
METHODS = ("advdm", "mist", "photoguard", "sds")


@pytest.fixture(scope="module")
def model_dir(tiny_model_a) -> Path:
    """Tiny model "a" with the tiny profile's pre-training (shared with the end-to-end tests)."""
    return tiny_model_a


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [render_synthetic(3, i, RES) for i in range(4)]


@pytest.fixture(scope="module")
def surrogate(model_dir):
    comps = load_components(model_dir)
    with torch.no_grad():
        cond = encode_prompt(comps.tokenizer, comps.text_encoder, ["a photo"])
    return comps, cond


def protect(name: str, images, model_dir, seed: int = 0, **params):
    defense = DEFENSES.create(name, params, profile="tiny")
    ctx = RunContext(seed=seed, device="cpu", profile="tiny", resolution=RES, work_dir=Path("."))
    return defense.protect(ctx, images, None, model_dir), ctx


def latent_means(comps, images) -> torch.Tensor:
    with torch.no_grad():
        return LatentCache(comps.vae, to_tensor(images)).mean


def eval_denoising_loss(surrogate, images, draws: int = 48) -> float:
    """The surrogate's LDM loss on the images' posterior means, averaged over ``draws`` fixed (t, eps) draws."""
    comps, cond = surrogate
    gen = torch.Generator().manual_seed(1234)
    z = latent_means(comps, images) * comps.vae.config.scaling_factor
    with torch.no_grad():
        return float(np.mean([float(denoising_loss(comps.unet, comps.noise_scheduler, z, cond.expand(len(z), -1, -1), gen))
                              for _ in range(draws)]))


def linf(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("name,params,limit", [
    ("advdm", {"steps": 3}, 16), ("advdm", {"steps": 3, "eps": 5.5, "alpha": 2}, 5), ("mist", {"steps": 3}, 16),
    ("mist", {"steps": 2, "semantic_crop_512": 256}, 16), ("photoguard", {"steps": 6}, 7),
    ("sds", {"steps": 3, "mode": "+", "alpha": 6}, 16), ("sds", {"steps": 2, "use_target": True}, 16),
])
def test_saved_images_respect_the_budget(name, params, limit, images, model_dir):
    out, ctx = protect(name, images, model_dir, **params)
    assert len(out) == len(images)
    for o, c in zip(out, images):
        assert o.dtype == np.uint8 and o.shape == c.shape
        assert linf(o, c) <= limit == math.floor(DEFENSES.create(name, params).budget_255())
    assert max(linf(o, c) for o, c in zip(out, images)) >= 1  # something was perturbed
    assert ctx.extra["pgd_realised_linf_255"] <= limit and ctx.extra["saved_budget_255"] == limit
    assert ctx.extra["precision"].startswith("fp32")  # CPU: no autocast


def test_photoguard_fp16_request_runs_fp32_on_cpu_and_reaches_floor_of_765(images, model_dir):
    out, ctx = protect("photoguard", images, model_dir, steps=6)
    assert ctx.extra["eps_255"] == 7.65 and ctx.extra["pgd_realised_linf_255"] == 7
    assert ctx.extra["precision"].startswith("fp32 (fp16 requested")


def test_advdm_and_sds_plus_raise_the_denoising_loss_more_than_random_noise(images, model_dir, surrogate):
    clean = eval_denoising_loss(surrogate, images)
    noise = eval_denoising_loss(surrogate, protect("random-noise", images, model_dir, eps=16)[0]) - clean
    advdm = eval_denoising_loss(surrogate, protect("advdm", images, model_dir, steps=20)[0]) - clean
    sds_plus = eval_denoising_loss(surrogate, protect("sds", images, model_dir, steps=20, mode="+")[0]) - clean
    sds_minus = eval_denoising_loss(surrogate, protect("sds", images, model_dir, steps=20, mode="-")[0]) - clean
    # measured (tiny:a, seed 0, 48 draws): clean 0.2876, noise +0.0000, AdvDM +0.0120, SDS(+) +0.0114, SDS(-) -0.0070
    assert advdm > 0.002 and advdm > 5 * abs(noise), (advdm, noise)
    assert sds_plus > 0.002 and sds_plus > 5 * abs(noise), (sds_plus, noise)
    assert sds_minus < -0.002, sds_minus  # the sign of the mode matters


def test_photoguard_pulls_the_latent_mean_toward_zero(images, model_dir, surrogate):
    comps, _ = surrogate
    norm = lambda imgs: float(latent_means(comps, imgs).flatten(1).norm(dim=1).mean())  # noqa: E731
    clean = norm(images)
    noise = norm(protect("random-noise", images, model_dir, eps=7.65)[0])
    pg = norm(protect("photoguard", images, model_dir, steps=20)[0])
    assert clean - pg > 0.04 * clean and clean - pg > 10 * abs(clean - noise), (clean, pg, noise)


def test_mist_textural_term_moves_the_latent_toward_the_target(images, model_dir, surrogate):
    comps, _ = surrogate
    target = latent_means(comps, [sm.mist_like_pattern(RES)])
    dist = lambda imgs: float((latent_means(comps, imgs) - target).flatten(1).norm(dim=1).mean())  # noqa: E731
    clean = dist(images)
    noise = dist(protect("random-noise", images, model_dir, eps=16)[0])
    mist, ctx = protect("mist", images, model_dir, steps=20)
    assert clean - dist(mist) > 0.05 * clean and clean - dist(mist) > 10 * abs(clean - noise)
    assert ctx.extra["textural_last"] < ctx.extra["textural_first"]


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_bytes_different_seed_different(name, images, model_dir):
    a, _ = protect(name, images[:2], model_dir, seed=5, steps=2)
    b, _ = protect(name, images[:2], model_dir, seed=5, steps=2)
    c, _ = protect(name, images[:2], model_dir, seed=6, steps=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_photoguard_step_schedule_decays_linearly_from_s_to_s_over_100(images, model_dir, monkeypatch):
    s, iters = 2.55, 1000
    sched = sm.photoguard_step_sizes(s, iters)
    assert len(sched) == iters and sched[0] == pytest.approx(s)
    steps = np.diff(sched)
    assert np.allclose(steps, -(s - s / 100) / iters)  # linear, constant decrement
    assert sched[-1] + steps[0] == pytest.approx(s / 100)  # reaches s/100 at i = iters
    used: list[float] = []
    real = sm.pgd_step

    def spy(x, x0, grad, alpha_255, eps_255, ascend=True):
        used.append(alpha_255)
        assert not ascend and eps_255 == 7.65
        return real(x, x0, grad, alpha_255, eps_255, ascend)

    monkeypatch.setattr(sm, "pgd_step", spy)
    protect("photoguard", images, model_dir, steps=8)
    assert np.allclose(used, sm.photoguard_step_sizes(2.55, 8))


def test_advdm_draws_exactly_one_t_eps_per_step_for_the_whole_batch(images, model_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls: list[int] = []
    draws: list[tuple[int, ...]] = []
    forward, draw = UNet2DConditionModel.forward, bench.diffusion.draw_timesteps_noise

    def counting_forward(self, sample, *a, **k):
        calls.append(sample.shape[0])
        return forward(self, sample, *a, **k)

    def counting_draw(sched, latents, gen):
        t, n = draw(sched, latents, gen)
        draws.append(tuple(t.shape))
        return t, n

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting_forward)
    monkeypatch.setattr(bench.diffusion, "draw_timesteps_noise", counting_draw)
    _, ctx = protect("advdm", images, model_dir, steps=5)
    assert calls == [len(images)] * 5 and draws == [(len(images),)] * 5  # one t (and eps) per image per step
    assert ctx.extra["unet_calls"] == 5
    calls.clear()
    protect("advdm", images, model_dir, steps=2, batch_size=1)  # one image at a time
    assert calls == [1] * (2 * len(images))


@pytest.mark.parametrize("name,params,fragment", [
    ("advdm", {"eps": 0}, "eps"), ("advdm", {"mode": "x"}, "mode"), ("mist", {"semantic_crop_512": 4}, "semantic_crop_512"),
    ("photoguard", {"steps": 0}, "steps"), ("sds", {"mixed_precision": "fp8"}, "mixed_precision"),
    ("sds", {"prompt": " "}, "prompt"),
])
def test_invalid_parameters_are_refused_with_the_key(name, params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        DEFENSES.create(name, params)


def test_target_image_errors_name_the_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match="target_image"):
        sm.load_target(str(tmp_path / "missing.png"), RES)
    with pytest.raises(ValueError, match="builtin:mist-like"):
        sm.load_target("builtin:nope", RES)


def test_builtin_target_is_deterministic_high_frequency_and_sized():
    a, b = sm.mist_like_pattern(RES), sm.mist_like_pattern(RES)
    assert a.shape == (RES, RES, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert sm.mist_like_pattern(512).shape == (512, 512, 3)
    horizontal = np.abs(np.diff(a.astype(np.int16), axis=1)).mean()
    assert horizontal > 30  # high-frequency texture, not a flat or smooth image


def test_crop_size_scales_with_resolution():
    assert sm.crop_size(512, 512, 64) == 512 and sm.crop_size(512, 64, 16) == 64
    assert sm.crop_size(256, 512, 64) == 256 and sm.crop_size(256, 64, 16) == 32
    assert sm.crop_size(8, 64, 16) == 16
