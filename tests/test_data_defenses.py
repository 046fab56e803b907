"""The rest of the field's data-level protections (issue 12) on tiny models: PID, SimAC, ... Each: budget to the last
pixel, adversarial beats same-budget random noise on the method's own objective, same seed same bytes, and the step
that distinguishes it counted or observed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import defenses.pid as pid
from bench.datasets import render_synthetic
from bench.diffusion import to_tensor
from bench.models import load_components
from bench.plugins import DEFENSES, RunContext
from bench.registry import ConfigError
from defenses.baselines import RandomNoise, RandomNoiseParams

RES = 64


@pytest.fixture(scope="module")
def model_dir(tiny_model_a) -> Path:
    return tiny_model_a


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [render_synthetic(3, i, RES) for i in range(2)]


def ctx_for(seed: int = 0, **kw) -> RunContext:
    return RunContext(seed=seed, device="cpu", profile="tiny", resolution=RES, work_dir=Path("."), **kw)


def protect(name: str, images, model_dir, seed: int = 0, subject=None, **params):
    defense = DEFENSES.create(name, params, profile="tiny")
    ctx = ctx_for(seed)
    return defense.protect(ctx, images, subject, model_dir), ctx, defense


def linf(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def random_noise(images, eps: float) -> list[np.ndarray]:
    return RandomNoise(RandomNoiseParams(eps=eps, distribution="sign")).protect(ctx_for(), images, None, None)


# ----------------------------------------------------------------------------------------------- PID

def pid_objective(vae, clean, out) -> float:
    with torch.no_grad():
        c = vae.encode(to_tensor(clean)).latent_dist
        a = vae.encode(to_tensor(out)).latent_dist
        return float(pid.pid_loss("add-log", c, a, torch.Generator()).mean())


def test_pid_budget_objective_and_no_unet_call(images, model_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = []
    real = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("PID loaded a UNet")))
    out, ctx, _ = protect("pid", images, model_dir, steps=15)
    assert calls == [] and ctx.extra["unet_calls"] == 0  # encoder only
    for o, c in zip(out, images):
        assert o.dtype == np.uint8 and o.shape == c.shape and linf(o, c) <= 12  # floor(12.75)
    assert ctx.extra["pgd_realised_linf_255"] == 12 and ctx.extra["saved_budget_255"] == 12
    assert ctx.extra["pid_loss"] == "add-log" and ctx.extra["pid_updates"] == 15
    monkeypatch.undo()
    vae = load_components(model_dir).vae
    adv, noise = pid_objective(vae, images, out), pid_objective(vae, images, random_noise(images, 12.75))
    assert adv > 3 * noise and ctx.extra["pid_loss_last"] > ctx.extra["pid_loss_first"], (adv, noise)


def test_pid_same_seed_same_bytes_and_options(images, model_dir):
    a, _, _ = protect("pid", images[:1], model_dir, seed=3, steps=3)
    b, _, _ = protect("pid", images[:1], model_dir, seed=3, steps=3)
    c, _, _ = protect("pid", images[:1], model_dir, seed=4, steps=3)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert pid.effective_steps(1000, True) == 975 and pid.effective_steps(1000, False) == 1000
    _, ctx, _ = protect("pid", images[:1], model_dir, steps=27, quirk_save_every_25=True, loss="kl")
    assert ctx.extra["pid_updates"] == 25 and ctx.extra["pgd_steps"] == 25
    d = DEFENSES.create("pid", {})
    assert (d.params.eps, d.params.alpha, d.params.steps, d.params.loss) == (12.75, 1.0, 1000, "add-log")
    with pytest.raises(ConfigError, match="loss"):
        DEFENSES.create("pid", {"loss": "l1"})
