"""PAP, Prompt-Agnostic adversarial Perturbation (Wan et al., NeurIPS 2024, arXiv 2408.10571; vancyland/Prompt-
Agnostic-Adversarial-Perturbation-for-Customized-Diffusion-Models.github.io ``attack/papv2.py`` ``upa_attack``,
``scripts/pap2.sh``; METHODS.md 0 and 5.9) as a ``perturb`` defense.

Every PGD step (``rounds`` = 20 calls x ``pgd_steps`` = 6 = 120 steps, on all images at once, surrogate fixed: the
reference's surrogate fine-tuning is commented out):
1. z = scaled VAE posterior sample of x (with its graph), one (t, eps) per image; c0 = E_text(prompt);
   L0 = MSE(eps_theta(z_t, t, c0), eps);
2. ``prompt_steps`` = 20 gradient-descent steps on the embedding, c <- c - ``prompt_lr`` (1000) * dL/dc -> c*;
3. Laplace approximation: H_inv = (||c0 - c*||^2 / (L * D)) * 0.5 / |L0 - L(c*)|;
4. c ~ N(c*, std = H_inv^2) elementwise (the reference passes the square as the standard deviation);
5. ascend x on MSE(eps_theta(z_t, t, c), eps): x <- clip(x0 + clip(x + alpha * sign(grad) - x0, +-eps)).
So the conditioning differs at every step. Budget 0.05 in [-1, 1] = 6.375 /255 pixels (saved <= 6); the step is
hard-coded 1/255 in [-1, 1] = 0.5 /255 pixels (``--pgd_alpha`` is ignored); no random start.

``version="v1"`` (``attack/papv1.py``): the Laplace sampling only runs at the first step of each call; on the others
the reference's diff is 0 and the step is plain L_dn with c0. L * D is the embedding's size (77 x 768 for SD1.5, the
reference's hard-coded constants). The optional target-shift term (``--target_image_path``) is not offered.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

from bench import models as bench_models
from bench.diffusion import encode_prompt, to_tensor
from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.precision import autocast_for
from bench.registry import Requirements
from defenses.pgd import pgd_step, save_within_budget
from defenses.single_model import _peak_rss_mb

PAPER = ("Wan et al., Prompt-Agnostic Adversarial Perturbation, NeurIPS 2024 (arXiv 2408.10571); "
         "attack/papv2.py upa_attack + scripts/pap2.sh")
GEN_OFFSET = 81_000


@dataclass(frozen=True)
class PAPParams:
    eps: float = 6.375  # --pgd_eps=5e-2 in [-1, 1]
    alpha: float = 0.5  # hard-coded 1/255 in [-1, 1]
    rounds: int = 20  # --max_train_steps
    pgd_steps: int = 6  # --max_adv_train_steps
    prompt_steps: int = 20  # the inner loop on the embedding ("max = 20")
    prompt_lr: float = 1000.0  # r
    identifier: str = "sks"
    instance_prompt: str = "a photo of {identifier} {class_noun}"  # "a photo of sks person"
    version: Literal["v2", "v1"] = "v2"
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # the reference casts to bf16; autocast here (bench/precision.py)

    def validate(self) -> None:
        if not 0 < self.eps <= 255 or not 0 < self.alpha <= 255:
            raise ValueError(f"eps and alpha must be in (0, 255] (/255 pixel units), got {self.eps}, {self.alpha}")
        if min(self.rounds, self.pgd_steps, self.prompt_steps) < 1 or not self.prompt_lr > 0:
            raise ValueError("rounds, pgd_steps and prompt_steps must be >= 1, prompt_lr > 0")
        if self.version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {self.version!r}")
        try:
            self.instance_prompt.format(identifier="x", class_noun="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"instance_prompt: only {{identifier}} and {{class_noun}} may be used ({e})") from None


def laplace_prompt(unet, zt: torch.Tensor, t: torch.Tensor, target: torch.Tensor, c0: torch.Tensor, loss0: float,
                   steps: int, lr: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """PAP steps 2-4: descend the embedding from ``c0`` (``steps`` x ``lr``), then sample c ~ N(c*, H_inv^2).
    ``zt`` is detached here: only the embedding moves. Returns (c, H_inv)."""
    z = zt.detach()
    c = c0.detach().clone()
    for _ in range(steps):
        c.requires_grad_(True)
        loss = F.mse_loss(unet(z, t, c).sample.float(), target.float())
        g, = torch.autograd.grad(loss, c)
        c = (c - lr * g).detach()
    with torch.no_grad():
        loss_star = float(F.mse_loss(unet(z, t, c).sample.float(), target.float()))
        spread = float((c0 - c).pow(2).sum()) / (c0.shape[-2] * c0.shape[-1])
        h_inv = spread * 0.5 / max(abs(loss0 - loss_star), 1e-12)
        noise = torch.randn(c.shape, generator=gen).to(c)
        return c + h_inv ** 2 * noise, h_inv


@DEFENSES.register("pap", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py)
class PAP(Defense):
    """PAP v2: PGD on the denoising loss under a prompt embedding sampled at every step from the Laplace
    approximation around the loss-minimising embedding (NeurIPS 2024)."""

    Params = PAPParams
    needs_model = True
    # paper-profile GPU estimate: bf16 weights, 4 images: benchmarks/data_defense_costs.py
    requires = Requirements(white_box=True, gpu_memory_gb=14.5)
    profiles = {"tiny": {"rounds": 3, "pgd_steps": 2, "prompt_steps": 5, "mixed_precision": "no"},
                "proxy": {"mixed_precision": "no"}}
    paper = PAPER

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.prompt_trace: list[torch.Tensor] = []  # the conditioning used by each PGD step (tests)

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        if model_dir is None:
            raise ValueError(f"defense {self.name}: needs a surrogate model, got none")
        start = time.perf_counter()
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        c = bench_models.load_components(Path(model_dir), ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
        for mod in (c.vae, c.unet, c.text_encoder):
            mod.requires_grad_(False).eval()
        noun = subject.class_noun if subject is not None else "person"
        prompt = p.instance_prompt.format(identifier=p.identifier, class_noun=noun)
        gen = ctx.torch_generator(GEN_OFFSET)
        x0 = to_tensor(images).to(ctx.device)
        x, n = x0.clone(), len(x0)
        with torch.no_grad():
            c0 = encode_prompt(c.tokenizer, c.text_encoder, [prompt]).expand(n, -1, -1).contiguous()
        sf = float(c.vae.config.scaling_factor)
        self.prompt_trace, losses, h_invs = [], [], []
        for r in range(p.rounds):
            for k in range(p.pgd_steps):
                x.requires_grad_(True)
                with autocast:
                    dist = c.vae.encode(x).latent_dist
                    z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean)) * sf
                    t = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (n,), generator=gen).to(x.device)
                    noise = torch.randn(z.shape, generator=gen).to(z)
                    zt = c.noise_scheduler.add_noise(z, noise, t)
                    target = noise if c.noise_scheduler.config.prediction_type == "epsilon" else \
                        c.noise_scheduler.get_velocity(z, noise, t)
                    if p.version == "v2" or k == 0:
                        with torch.no_grad():
                            loss0 = float(F.mse_loss(c.unet(zt, t, c0).sample.float(), target.float()))
                        cond, h_inv = laplace_prompt(c.unet, zt, t, target, c0, loss0, p.prompt_steps, p.prompt_lr, gen)
                        h_invs.append(h_inv)
                    else:  # v1 after the first step of a call: diff = 0, plain L_dn under c0
                        cond = c0
                    loss = F.mse_loss(c.unet(zt, t, cond).sample.float(), target.float())
                grad, = torch.autograd.grad(loss, x)
                x = pgd_step(x.detach(), x0, grad, p.alpha, p.eps, ascend=True)
                self.prompt_trace.append(cond.detach()[0].clone())
                losses.append(float(loss.detach()))
            ctx.progress(r + 1, p.rounds)
        out = save_within_budget(x, images, p.eps)
        ctx.extra.update({
            "eps_255": p.eps, "alpha_255": p.alpha, "precision": precision, "instance_prompt": prompt,
            "pap_version": p.version, "pgd_steps_total": len(losses), "laplace_samples": len(h_invs),
            "realised_linf_255": max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(out, images)),
            "h_inv_mean": float(np.mean(h_invs)) if h_invs else 0.0, "loss_first_last": [losses[0], losses[-1]],
            "defense_wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
        })
        return out
