"""CAAT, Cross-Attention Adversarial Training (Xu et al., arXiv 2404.15081; CO2-cityao/CAAT ``CAAT.py``,
``scripts/train_CAAT.sh``; METHODS.md 0 and 5.8) as a ``perturb`` defense.

The perturbation and Custom Diffusion's cross-attention key/value projections (``freeze_model=crossattn_kv``:
diffusers' ``CustomDiffusionAttnProcessor2_0`` with ``train_kv=True`` on every ``attn2``, initialised from the
UNet's own ``to_k``/``to_v``; every other weight frozen) are trained jointly. Each of ``steps`` = 250 steps, on all
images at once:
1. L_dn = mean MSE(eps_theta(z_t, t, c), eps) with z = scaled VAE posterior sample, one (t, eps) per image,
   c = "a photo of a person" (no identifier); backward into both the pixels and the K/V weights;
2. K/V gradient norm clipped to 1; x <- clip(x0 + clip(x + alpha * sign(grad_x) - x0, +-eps), [-1, 1]);
3. AdamW step on K/V (lr 1e-5, constant, no warm-up).
Budget 0.05 in [-1, 1] = 6.375 /255 pixels (saved <= 6); step 5e-3 = 0.6375 /255 pixels; no random start.

As coded, ``--hflip`` (and the crop/scale augmentation) only shape the unused DreamBooth dataset, not the PGD batch,
so neither appears here; the prior-preservation script chunks the instance batch in two (a bug), so the prior
variant is not offered. Custom Diffusion's processor detaches the first (BOS) token's K/V, as in the reference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")

from attacks.custom_diffusion import install_kv_processors  # Custom Diffusion's crossattn_kv processors
from bench import models as bench_models
from bench.diffusion import adamw, denoising_loss, encode_prompt, to_tensor
from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.precision import autocast_for
from bench.registry import Requirements
from defenses.pgd import pgd_step, save_within_budget
from defenses.single_model import _peak_rss_mb

PAPER = "Xu et al., CAAT, arXiv 2404.15081 (CVPR 2024); CO2-cityao/CAAT CAAT.py + scripts/train_CAAT.sh"
GEN_OFFSET = 80_000


@dataclass(frozen=True)
class CAATParams:
    eps: float = 6.375  # --eps=0.05 in [-1, 1]
    alpha: float = 0.6375  # --alpha=5e-3 in [-1, 1]
    steps: int = 250  # --max_train_steps
    learning_rate: float = 1e-5  # K/V AdamW, constant schedule
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    instance_prompt: str = "a photo of a {class_noun}"  # "a photo of a person"
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast on CUDA and bf16 CPUs (bench/precision.py)

    def validate(self) -> None:
        if not 0 < self.eps <= 255 or not 0 < self.alpha <= 255:
            raise ValueError(f"eps and alpha must be in (0, 255] (/255 pixel units), got {self.eps}, {self.alpha}")
        if self.steps < 1 or not self.learning_rate > 0 or self.max_grad_norm < 0:
            raise ValueError("steps >= 1, learning_rate > 0 and max_grad_norm >= 0 required")
        try:
            self.instance_prompt.format(class_noun="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"instance_prompt: only {{class_noun}} may be used ({e})") from None


@DEFENSES.register("caat", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class CAAT(Defense):
    """CAAT: PGD on the denoising loss jointly with AdamW training of the cross-attention K/V projections only."""

    Params = CAATParams
    needs_model = True
    # paper-profile GPU estimate: fp32 weights, bf16 autocast, 4 images: benchmarks/data_defense_costs.py
    requires = Requirements(white_box=True, gpu_memory_gb=16.9)
    profiles = {"tiny": {"steps": 40, "learning_rate": 1e-3, "mixed_precision": "no"},
                # proxy: the paper's schedule, K/V lr 100x the paper's (proxy models train at raised rates; not tuned)
                "proxy": {"learning_rate": 1e-3, "mixed_precision": "no"}}
    paper = PAPER

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.comps: bench_models.SDComponents | None = None
        self.trainable: list[torch.nn.Parameter] = []

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        if model_dir is None:
            raise ValueError(f"defense {self.name}: needs a surrogate model, got none")
        start = time.perf_counter()
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        c = bench_models.load_components(Path(model_dir), ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
        c.vae.requires_grad_(False).eval()
        c.text_encoder.requires_grad_(False).eval()
        self.comps, self.trainable = c, install_kv_processors(c.unet, who="CAAT")
        c.unet.train()
        prompt = p.instance_prompt.format(class_noun=subject.class_noun if subject is not None else "person")
        with torch.no_grad():
            emb = encode_prompt(c.tokenizer, c.text_encoder, [prompt])
        opt = adamw(self.trainable, lr=p.learning_rate, betas=(0.9, 0.999), weight_decay=p.adam_weight_decay,
                    eps=1e-8)
        gen = ctx.torch_generator(GEN_OFFSET)
        x0 = to_tensor(images).to(ctx.device)
        x, losses = x0.clone(), []
        sf = float(c.vae.config.scaling_factor)
        for step in range(p.steps):
            x.requires_grad_(True)
            with autocast:
                dist = c.vae.encode(x).latent_dist
                z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean)) * sf
                loss = denoising_loss(c.unet, c.noise_scheduler, z, emb.expand(len(x), -1, -1), gen)
            loss.backward()
            if p.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, p.max_grad_norm)
            x = pgd_step(x.detach(), x0, x.grad, p.alpha, p.eps, ascend=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            ctx.progress(step + 1, p.steps)
        out = save_within_budget(x, images, p.eps)
        ctx.extra.update({
            "eps_255": p.eps, "alpha_255": p.alpha, "precision": precision, "instance_prompt": prompt,
            "realised_linf_255": max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(out, images)),
            "trainable_params": int(sum(q.numel() for q in self.trainable)), "kv_layers": len(self.trainable) // 2,
            "loss_first_last": [losses[0], losses[-1]], "defense_wall_s": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
        })
        return out
