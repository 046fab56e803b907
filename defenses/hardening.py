"""What model-level (``harden``) defenses share: APDM (defenses/apdm.py) and PersGuard (defenses/persguard.py) both
train the base model's UNet (theta) so that the attacker's later DreamBooth fails, by simulating that DreamBooth on a
persistent copy theta_tmp and transferring the gradients of a loss taken *after* the simulated steps back to theta
(first order, as APDM's Learning to Protect, METHODS.md 2.2).

- ``squared_error`` / ``personalization_loss``: the diffusion losses, epsilon or (correct) v-prediction targets.
- ``Hardener``: theta (trained in place), theta_tmp (restored from theta with ``copy_``, AdamW state cleared), the
  frozen reference copy of the initial theta, the draws (t, eps from one CPU generator), precision, checkpointing.
- ``save_hardened``: the base pipeline with the hardened UNet, as safetensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

from bench import models
from bench.diffusion import adamw
from bench.plugins import RunContext
from bench.precision import autocast_for


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # the correct velocity (APDM's reference passes model_pred here: METHODS.md 2.2)
        return noise_scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon or v_prediction)")


def squared_error(unet, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  emb: torch.Tensor) -> torch.Tensor:
    """Elementwise (N, C, H, W) squared error of the UNet's prediction at z_t = add_noise(latents, noise, t)."""
    pred = unet(noise_scheduler.add_noise(latents, noise, t), t, emb).sample
    return F.mse_loss(pred.float(), prediction_target(noise_scheduler, latents, noise, t).float(), reduction="none")


def repeat(emb: torch.Tensor, n: int) -> torch.Tensor:
    """A (1 x 77 x D) prompt embedding repeated for a batch of ``n``."""
    return emb.expand(n, -1, -1)


@dataclass
class PersonalizationBatch:
    """One simulated DreamBooth step: instance latents (+ class latents), one t shared by both (as APDM's protect.py
    and diffusers' train_dreambooth.py, which draw one t per concatenated example)."""

    inst: torch.Tensor
    noise_inst: torch.Tensor
    t: torch.Tensor
    cls: torch.Tensor | None = None
    noise_cls: torch.Tensor | None = None


@dataclass
class Prompts:
    """Frozen text-encoder embeddings (1 x 77 x D) of the instance and class prompts."""

    inst: torch.Tensor
    cls: torch.Tensor


def personalization_loss(unet, noise_scheduler, b: PersonalizationBatch, prompts: Prompts,
                         prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth loss: instance MSE + prior_loss_weight * class MSE (METHODS.md 2.2), one forward pass."""
    n = len(b.inst)
    if b.cls is None:
        return squared_error(unet, noise_scheduler, b.inst, b.noise_inst, b.t, repeat(prompts.inst, n)).mean()
    latents = torch.cat([b.inst, b.cls])
    noise = torch.cat([b.noise_inst, b.noise_cls])
    emb = torch.cat([repeat(prompts.inst, n), repeat(prompts.cls, len(b.cls))])
    err = squared_error(unet, noise_scheduler, latents, noise, torch.cat([b.t, b.t[:len(b.cls)]]), emb)
    return err[:n].mean() + prior_loss_weight * err[n:].mean()


def check_finite(loss: torch.Tensor, defense: str, what: str, outer_iteration: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{defense}: {what} loss is {float(loss.detach())} at outer iteration "
                                 f"{outer_iteration}; lower learning_rate or check the subject images")


class Hardener:
    """theta = ``unet`` (trained in place by ``opt``), theta_tmp = one persistent copy (trained by ``opt_tmp``) for
    the simulated personalisation, ``ref`` = a frozen copy of the initial theta."""

    def __init__(self, unet, noise_scheduler, adam: dict, tmp_adam: dict, generator: torch.Generator, device: str,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False) -> None:
        self.sched, self.gen = noise_scheduler, generator
        self.theta = unet
        self.tmp = copy.deepcopy(unet)
        self.ref = copy.deepcopy(unet).requires_grad_(False).eval()
        self.theta.requires_grad_(True)
        self.tmp.requires_grad_(True).train()
        if gradient_checkpointing:
            self.tmp.enable_gradient_checkpointing()
        self.theta_params = list(self.theta.parameters())
        self.tmp_params = list(self.tmp.parameters())
        self.opt = adamw(self.theta_params, **adam)
        self.opt_tmp = adamw(self.tmp_params, **tmp_adam)
        self.autocast, self.precision = autocast_for(mixed_precision, device)

    def t(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.sched.config.num_train_timesteps, (n,), generator=self.gen)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.gen, dtype=like.dtype).to(like.device)

    def restore_tmp(self) -> None:
        """theta_tmp <- theta, its AdamW state cleared (the references re-create both every outer iteration)."""
        with torch.no_grad():
            for p, q in zip(self.theta_params, self.tmp_params):
                q.copy_(p)
        self.opt_tmp.state.clear()
        self.opt_tmp.zero_grad(set_to_none=True)

    def transfer_gradients(self, scale: float = 1.0) -> None:
        """theta.grad += scale * theta_tmp.grad (first-order transfer, METHODS.md 2.2)."""
        with torch.no_grad():
            for p, q in zip(self.theta_params, self.tmp_params):
                if q.grad is None:
                    continue
                g = q.grad if scale == 1.0 else q.grad * scale
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)


def save_hardened(ctx: RunContext, model_dir: Path, unet, out_dir: Path) -> None:
    """The base pipeline with the hardened UNet, as safetensors (text encoder, VAE, tokenizer unchanged)."""
    unet = unet.to("cpu").eval()
    unet.requires_grad_(False)
    pipe = models.load_pipeline(model_dir, "cpu", "default", ctx.allow_unsafe_weights, unet=unet)
    pipe.save_pretrained(out_dir, safe_serialization=True)
