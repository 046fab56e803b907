"""Mist-v2 (psyker-team/mist-v2 ``attacks/mist.py``, default ``--mode lunet``; METHODS.md 0 and 5.3) as a ``perturb``
defense: an ASPL-like loop with a LoRA surrogate and no clean-data surrogate step.

``rounds`` = 5 outer steps (``max_train_steps``) of
1. PGD, one image at a time, ``pgd_steps`` = 30 steps each: z = s * E(x).mean computed WITHOUT the encoder graph,
   t ~ U{0..N-1}, eps ~ N(0, I), loss = -MSE(eps_theta(z_t, t, c), z_tgt) with z_tgt = s * a posterior sample of the
   target image; g = d loss / d z, then the encoder is run again with its graph and ``E(x).mean.backward(g)``
   gives the pixel gradient (the memory-efficient path: the UNet's and the encoder's graphs never coexist);
   x <- clip(x0 + clip(x + alpha * sign(grad) - x0, +-eps)). Ascent pulls the UNet output toward the target latent.
2. LoRA DreamBooth on the perturbed images: ``train_steps`` = 10 passes, each one AdamW step per instance image on
   L(instance) + ``prior_loss_weight`` (0.1) * L(class image), gradient norm clipped to 1; LoRA rank 4 on the UNet
   attention projections (lr 1e-4) and the text encoder's attention (lr 5e-6); base weights frozen.

Budget 8/255 in [-1, 1] = 4 /255 pixels; step 0.005 = 0.6375 /255 pixels; no random start. The target image cannot be
shipped (``data/MIST.png``): ``builtin:mist-like`` (defenses/single_model.py) stands in, or give a path.
Departures (docs/data_defenses.md): the LoRA adapters persist across rounds with a fresh AdamW per round (the
reference deep-copies and re-injects adapters each round); class images cycle over all of them (the reference pairs
instance i with class image i only); peft LoRA on ``to_q/to_k/to_v/to_out.0`` (lora_diffusion also wraps GEGLU's
projection); the scheduler's ``add_noise`` is DDPM's (identical to the DDIM scheduler the reference loads).
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
from bench.diffusion import LatentCache, adamw, denoising_loss, encode_prompt, to_tensor
from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.precision import autocast_for
from bench.profiles import PROXY_CLASS_IMAGES, PROXY_FINETUNE
from bench.registry import Requirements
from defenses.anti_dreambooth import UNET_LORA_TARGETS
from defenses.pgd import pgd_step, save_within_budget
from defenses.single_model import BUILTIN_TARGET, _peak_rss_mb, load_target

PAPER = "psyker-team/mist-v2 attacks/mist.py --mode lunet (METHODS.md 5.3)"
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # lora_diffusion's CLIPAttention linears
TRAIN_PREFIX = ("masterpiece,best quality,extremely detailed CG unity 8k wallpaper,illustration,cinematic lighting,"
                "beautiful detailed glow")  # prepended (no separator) to the instance prompt in training, as mist.py
GEN_OFFSET = 79_000


@dataclass(frozen=True)
class MistV2Params:
    eps: float = 4.0  # --pgd_eps=8/255 in [-1, 1]
    alpha: float = 0.6375  # --pgd_alpha=0.005 in [-1, 1]
    rounds: int = 5  # --max_train_steps
    pgd_steps: int = 30  # per image per round
    train_steps: int = 10  # LoRA passes per round (one optimizer step per instance image each)
    instance_prompt: str = "a picture"  # mist.py defaults
    class_prompt: str = "a picture"
    train_prompt_prefix: str = TRAIN_PREFIX  # "" trains on the bare instance prompt
    target_image: str = BUILTIN_TARGET  # data/MIST.png cannot be shipped
    lora_rank: int = 4
    learning_rate: float = 1e-4
    learning_rate_text: float = 5e-6
    train_text_encoder: bool = True  # mist.py --train_text_encoder is store_false: LoRA on the text encoder by default
    with_prior_preservation: bool = True
    prior_loss_weight: float = 0.1
    num_class_images: int = 50
    class_sampler: str = "default"
    class_steps: int = 50
    class_guidance: float = 7.5
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast on CUDA and bf16 CPUs (bench/precision.py)

    def validate(self) -> None:
        if not 0 < self.eps <= 255 or not 0 < self.alpha <= 255:
            raise ValueError(f"eps and alpha must be in (0, 255] (/255 pixel units), got {self.eps}, {self.alpha}")
        if min(self.rounds, self.pgd_steps, self.lora_rank) < 1 or self.train_steps < 0:
            raise ValueError("rounds, pgd_steps and lora_rank must be >= 1, train_steps >= 0")
        if not (self.learning_rate > 0 and self.learning_rate_text > 0):
            raise ValueError("learning rates must be > 0")
        if self.with_prior_preservation and self.num_class_images < 1:
            raise ValueError("num_class_images must be >= 1 with prior preservation")


@DEFENSES.register("mist-v2", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class MistV2(Defense):
    """Mist-v2 (lunet): PGD pulling the LoRA surrogate's noise prediction toward a target latent, gradient taken at
    the mean latent and pushed through the encoder, alternating with LoRA DreamBooth on the perturbed images."""

    Params = MistV2Params
    needs_model = True
    # paper-profile GPU estimate: benchmarks/data_defense_costs.py (bf16 weights, SD2.1-sized); README: 6 GB
    requires = Requirements(white_box=True, gpu_memory_gb=7.2)
    profiles = {"tiny": {"rounds": 2, "pgd_steps": 8, "train_steps": 2, "num_class_images": 4, "class_sampler": "ddim",
                         "class_steps": 10, "class_guidance": 3.0, "learning_rate": 1e-3, "learning_rate_text": 1e-4, "mixed_precision": "no"},
                # proxy: the paper's schedule with the proxy LoRA attacker's learning rate (lora-dreambooth: 2e-3)
                "proxy": {**PROXY_CLASS_IMAGES, "num_class_images": PROXY_FINETUNE["num_class_images"],
                          "learning_rate": 2e-3, "learning_rate_text": 1e-4, "mixed_precision": "no"}}
    paper = PAPER

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.comps: bench_models.SDComponents | None = None
        self.trace: list[tuple] = []

    # ------------------------------------------------------------------ set-up
    def _load(self, ctx: RunContext, model_dir: Path) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        from peft import LoraConfig, inject_adapter_in_model

        p = self.params
        c = bench_models.load_components(Path(model_dir), ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
        for mod in (c.vae, c.unet, c.text_encoder):
            mod.requires_grad_(False)
        c.vae.eval()
        with torch.random.fork_rng(devices=[]):  # peft initialises from the global RNG
            torch.manual_seed(ctx.seed)
            c.unet.add_adapter(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_rank, init_lora_weights="gaussian",
                                          target_modules=list(UNET_LORA_TARGETS)))
            if p.train_text_encoder:
                inject_adapter_in_model(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_rank, init_lora_weights="gaussian",
                                                   target_modules=list(TEXT_LORA_TARGETS)), c.text_encoder)
        self.comps = c
        unet_lora = [q for n, q in c.unet.named_parameters() if "lora_" in n]
        te_lora = [q for n, q in c.text_encoder.named_parameters() if "lora_" in n] if p.train_text_encoder else []
        for q in unet_lora + te_lora:  # trainable only inside _train: PGD needs no parameter gradients
            q.requires_grad_(False)
        return unet_lora, te_lora

    # ------------------------------------------------------------------ PGD (pgd_attack)
    def _pgd_image(self, x: torch.Tensor, x0: torch.Tensor, z_tgt: torch.Tensor, emb: torch.Tensor,
                   gen: torch.Generator, autocast) -> tuple[torch.Tensor, list[float]]:
        """``pgd_steps`` steps on one image from its current ``x``, projected around its clean ``x0``."""
        c, p = self.comps, self.params
        sf = float(c.vae.config.scaling_factor)
        losses: list[float] = []
        for _ in range(p.pgd_steps):
            with torch.no_grad(), autocast:
                mean = c.vae.encode(x).latent_dist.mean
            z = (mean.detach().float() * sf).requires_grad_(True)
            t = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (1,), generator=gen).to(x.device)
            noise = torch.randn(z.shape, generator=gen).to(z)
            with autocast:
                pred = c.unet(c.noise_scheduler.add_noise(z, noise, t), t, emb).sample
            loss = -F.mse_loss(pred.float(), z_tgt.float())
            g, = torch.autograd.grad(loss, z)
            xg = x.detach().clone().requires_grad_(True)
            with autocast:
                mean = c.vae.encode(xg).latent_dist.mean
            mean.backward(gradient=g.to(mean.dtype))  # through the encoder only
            x = pgd_step(x, x0, xg.grad, p.alpha, p.eps, ascend=True)
            losses.append(float(loss.detach()))
            self.trace.append(("pgd_step",))
        return x, losses

    # ------------------------------------------------------------------ LoRA DreamBooth (train_one_epoch)
    def _train(self, x: torch.Tensor, classes: LatentCache | None, params_unet, params_te, gen: torch.Generator,
               autocast, counter: list[int], prompts: tuple[str, str]) -> None:
        c, p = self.comps, self.params
        if p.train_steps == 0:
            return
        groups = [{"params": params_unet, "lr": p.learning_rate}]
        if params_te:
            groups.append({"params": params_te, "lr": p.learning_rate_text})
        opt = adamw(groups, lr=p.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        data = LatentCache(c.vae, x.detach())
        trainable = params_unet + params_te
        for q in trainable:
            q.requires_grad_(True)
        c.unet.train()
        c.text_encoder.train(bool(params_te))
        for _ in range(p.train_steps):
            for i in range(len(data)):
                with autocast:
                    emb = encode_prompt(c.tokenizer, c.text_encoder, list(prompts))
                    loss = denoising_loss(c.unet, c.noise_scheduler, data.sample([i], gen), emb[:1], gen)
                    if classes is not None:
                        j = counter[0] % len(classes)
                        counter[0] += 1
                        loss = loss + p.prior_loss_weight * denoising_loss(
                            c.unet, c.noise_scheduler, classes.sample([j], gen), emb[1:], gen)
                loss.backward()
                if p.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, p.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.trace.append(("train_step", i))
        for q in trainable:
            q.requires_grad_(False)

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        if model_dir is None:
            raise ValueError(f"defense {self.name}: needs a surrogate model, got none")
        start = time.perf_counter()
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        classes_img: list[Image] = []
        if p.with_prior_preservation and p.train_steps:
            from attacks.dreambooth import generate_class_images

            classes_img = generate_class_images(Path(model_dir), p.class_prompt, p.num_class_images, ctx,
                                                p.class_sampler, p.class_steps, p.class_guidance)
        self.trace = []
        params_unet, params_te = self._load(ctx, model_dir)
        c = self.comps
        gen = ctx.torch_generator(GEN_OFFSET)
        with torch.no_grad():
            tgt = LatentCache(c.vae, to_tensor([load_target(p.target_image, ctx.resolution)]).to(ctx.device))
            z_tgt = tgt.sample([0], gen)  # one posterior sample, as mist.py
            classes = LatentCache(c.vae, to_tensor(classes_img).to(ctx.device)) if classes_img else None
        train_prompts = (p.train_prompt_prefix + p.instance_prompt, p.class_prompt)
        x0 = to_tensor(images).to(ctx.device)
        x = x0.clone()
        losses: list[float] = []
        counter = [0]
        for r in range(p.rounds):
            with torch.no_grad():
                emb = encode_prompt(c.tokenizer, c.text_encoder, [p.instance_prompt])
            c.unet.eval()
            outs = []
            for i in range(len(x)):  # one image at a time, as the reference
                xi, li = self._pgd_image(x[i:i + 1], x0[i:i + 1], z_tgt, emb, gen, autocast)
                outs.append(xi)
                losses.extend(li)
            x = torch.cat(outs)
            self._train(x, classes, params_unet, params_te, gen, autocast, counter, train_prompts)
            ctx.progress(r + 1, p.rounds)
        out = save_within_budget(x, images, p.eps)
        ctx.extra.update({
            "eps_255": p.eps, "alpha_255": p.alpha, "precision": precision,
            "realised_linf_255": max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(out, images)),
            "pgd_steps_total": sum(1 for e in self.trace if e[0] == "pgd_step"),
            "train_steps_total": sum(1 for e in self.trace if e[0] == "train_step"),
            "lora_params": int(sum(q.numel() for q in params_unet + params_te)),
            "target_loss_first_last": [-losses[0], -losses[-1]] if losses else [],
            "num_class_images": len(classes_img), "defense_wall_s": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "target_image": p.target_image,
        })
        return out
