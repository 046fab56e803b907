"""Single-surrogate L-inf PGD defenses: AdvDM, Mist v1 (fused), PhotoGuard (encoder attack), SDS(+/-) / SDS-T.

Specs: METHODS.md sections 0, 5.1, 5.2, 5.4 and 5.5. Budgets ``eps`` and steps ``alpha`` are in /255 pixel units;
the PGD runs in the [-1, 1] tensor space of the reference code (``defenses.pgd``), over all images of the subject at
once (one VAE/UNet forward per step for the whole batch, ``batch_size`` splits it when memory is short). Per-image
losses are summed, so each image's gradient is the one it would get alone. The surrogate is frozen
(``requires_grad_(False)``, eval mode): only the input receives gradients. Every random draw (start, VAE posterior
samples, timesteps, noise, crops) comes from one CPU ``torch.Generator`` seeded with ``ctx.seed``, so the same seed
gives the same bytes on CPU. ``mixed_precision`` is autocast on CUDA and bf16 autocast on CPUs with bf16 instructions
(bench/precision.py); elsewhere on CPU everything runs in fp32; ``ctx.extra["precision"]`` says which.

Latents: ``E(x)`` is a sample of the VAE posterior times the VAE scaling factor, as LDM's
``get_first_stage_encoding`` (AdvDM, Mist, SDS); PhotoGuard uses the unscaled posterior mean, as its notebooks.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")

from bench.diffusion import LatentCache, denoising_loss, draw_timesteps_noise, encode_prompt, to_tensor
from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.precision import autocast_for
from bench.registry import Requirements
from defenses.pgd import pgd_step, random_start, save_within_budget

BUILTIN_TARGET = "builtin:mist-like"
PRECISIONS = ("no", "bf16", "fp16")

# An attack on one batch: (clean batch in [-1, 1], generator, tick) -> (adversarial batch in [-1, 1], stats).
BatchAttack = Callable[["torch.Tensor", "torch.Generator", Callable[[], None]], tuple["torch.Tensor", dict[str, float]]]


# ----------------------------------------------------------------------------------------------- target images

def mist_like_pattern(resolution: int) -> np.ndarray:
    """A deterministic high-frequency colour texture (uint8, resolution x resolution x 3) standing in for Mist's
    ``MIST.png``, which cannot be shipped. Oriented gratings with periods 1/32, 1/24 and 1/40 of the image side
    (16, ~21 and ~13 px at 512) times a checkerboard of 1/16 of the side, one orientation per channel; defined in
    relative coordinates, so it looks the same at every resolution."""
    if resolution < 8:
        raise ValueError(f"mist_like_pattern: resolution must be >= 8 px, got {resolution}")
    u, v = np.meshgrid(np.arange(resolution) / resolution, np.arange(resolution) / resolution)
    checker = np.where((np.floor(u * 16) + np.floor(v * 16)) % 2 == 0, 1.0, -1.0)
    channels = []
    for period, angle in ((32, 0.3), (24, 1.2), (40, 2.2)):
        grating = np.sin(2 * np.pi * period * (u * np.cos(angle) + v * np.sin(angle)))
        channels.append(0.5 + 0.5 * np.sign(grating) * (0.6 + 0.4 * checker))
    return np.clip(np.rint(np.stack(channels, axis=-1) * 255), 0, 255).astype(np.uint8)


def load_target(spec: str, resolution: int, param: str = "target_image") -> np.ndarray:
    """The target image for a textural/latent term: ``builtin:mist-like`` or an image file (resized + centre-cropped
    to ``resolution`` like the subject's images)."""
    from bench.images import fit, load_image

    if spec == BUILTIN_TARGET:
        return mist_like_pattern(resolution)
    if spec.startswith("builtin:"):
        raise ValueError(f"{param}: unknown built-in target {spec!r}; known: {BUILTIN_TARGET!r}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{param}: {path}: no such image file")
    return fit(load_image(path), resolution)


# ----------------------------------------------------------------------------------------------- surrogate

@dataclass
class Surrogate:
    """Frozen surrogate pieces for one protection run."""

    vae: Any
    unet: Any = None
    noise_scheduler: Any = None
    cond: torch.Tensor | None = None  # 1 x 77 x D prompt embedding, encoded once
    unet_calls: int = 0

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def eps_pred(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """UNet output for the whole batch (one call)."""
        self.unet_calls += 1
        return self.unet(z_t, t, self.cond.expand(len(z_t), -1, -1)).sample

    def semantic_loss(self, z0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Per-image LDM loss ||eps_theta(z_t, t, c) - eps||^2 (mean over elements) with ONE (t, eps) draw per image
        (METHODS.md 1.2 / 5.1); one UNet call for the batch."""
        self.unet_calls += 1
        _, per = denoising_loss(self.unet, self.noise_scheduler, z0, self.cond.expand(len(z0), -1, -1), gen,
                                per_sample=True)
        return per


def load_surrogate(ctx: RunContext, model_dir: Path | None, prompt: str | None, gradient_checkpointing: bool,
                   what: str) -> Surrogate:
    """Load the surrogate from ``model_dir`` (safetensors only), freeze it, encode ``prompt`` once. With
    ``prompt=None`` only the VAE is loaded (PhotoGuard's encoder attack needs nothing else)."""
    from bench import models

    if model_dir is None:
        raise ValueError(f"{what}: needs a surrogate model (model_dir is None); the profile must provide a default model")
    if prompt is None:
        from diffusers import AutoencoderKL

        models.check_safe(Path(model_dir), ctx.allow_unsafe_weights)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True,
                                            use_safetensors=None if ctx.allow_unsafe_weights else True).to(ctx.device)
        sur = Surrogate(vae=vae)
    else:
        comps = models.load_components(Path(model_dir), ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
        comps.text_encoder.requires_grad_(False).eval()
        with torch.no_grad():
            cond = encode_prompt(comps.tokenizer, comps.text_encoder, [prompt]).detach()
        sur = Surrogate(vae=comps.vae, unet=comps.unet, noise_scheduler=comps.noise_scheduler, cond=cond)
        sur.unet.requires_grad_(False).eval()
    sur.vae.requires_grad_(False).eval()
    if gradient_checkpointing:
        sur.vae.enable_gradient_checkpointing()
        if sur.unet is not None:
            sur.unet.enable_gradient_checkpointing()
    return sur


def sample_latent(dist, gen: torch.Generator, scale: float) -> torch.Tensor:
    """``scale * (mean + std * n)``, n ~ N(0, I) from the CPU generator (LDM's ``get_first_stage_encoding``)."""
    noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * noise) * scale


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One ``RandomCrop(size)`` per image (offsets from ``gen``), as Mist's ``pre_process``."""
    n, _, h, w = x.shape
    if size >= min(h, w):
        return x
    top = torch.randint(0, h - size + 1, (n,), generator=gen).tolist()
    left = torch.randint(0, w - size + 1, (n,), generator=gen).tolist()
    return torch.stack([x[i, :, a:a + size, b:b + size] for i, (a, b) in enumerate(zip(top, left))])


def photoguard_step_sizes(step_255: float, iters: int) -> np.ndarray:
    """PhotoGuard's schedule: s_i = s - (s - s/100) / iters * i, i = 0..iters-1 (linear from s toward s/100)."""
    i = np.arange(iters, dtype=np.float64)
    return step_255 - (step_255 - step_255 / 100.0) / iters * i


# ----------------------------------------------------------------------------------------------- driver

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_batches(ctx: RunContext, images: list[Image], eps_255: float, steps: int, batch_size: int,
                attack: BatchAttack) -> list[Image]:
    """Run ``attack`` on batches of ``batch_size`` images (0 = all at once), quantise and clip every saved image to
    floor(eps) around its clean version, and record budget, timing and memory in ``ctx.extra``."""
    if not images:
        raise ValueError("no images to protect")
    gen = ctx.torch_generator()
    size = batch_size or len(images)
    total = steps * math.ceil(len(images) / size)
    done = [0]

    def tick() -> None:
        done[0] += 1
        ctx.progress(done[0], total)

    out: list[Image] = []
    stats: list[dict[str, float]] = []
    start = time.perf_counter()
    for first in range(0, len(images), size):
        chunk = images[first:first + size]
        x0 = to_tensor(chunk).to(ctx.device)
        x_adv, st = attack(x0, gen, tick)
        out.extend(save_within_budget(x_adv, chunk, eps_255))
        stats.append(st)
    wall = time.perf_counter() - start
    realised = max(int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max()) for a, c in zip(out, images))
    ctx.extra.update({
        "eps_255": eps_255, "saved_budget_255": math.floor(eps_255 + 1e-9), "pgd_realised_linf_255": realised,
        "pgd_steps": steps, "pgd_batch_size": size, "pgd_wall_s": round(wall, 3),
        "pgd_s_per_step": round(wall / max(total, 1), 4), "peak_rss_mb": round(_peak_rss_mb(), 1),
    })
    for key in stats[0]:
        ctx.extra[key] = float(np.mean([s[key] for s in stats]))
    return out


def _record(ctx: RunContext, precision: str, gradient_checkpointing: bool, sur: Surrogate) -> None:
    ctx.extra.update({"precision": precision, "gradient_checkpointing": gradient_checkpointing,
                      "unet_calls": sur.unet_calls})


def _common_checks(p: Any) -> None:
    if not 0 < p.eps <= 255:
        raise ValueError(f"eps must be in (0, 255] (/255 pixel units), got {p.eps}")
    if not p.alpha > 0:
        raise ValueError(f"alpha must be > 0 (/255 pixel units per step), got {p.alpha}")
    if p.steps < 1:
        raise ValueError(f"steps must be >= 1, got {p.steps}")
    if p.batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0 = all images in one batch), got {p.batch_size}")
    if p.mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, got {p.mixed_precision!r}")


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise ValueError("prompt must not be empty")


_REQ = Requirements(white_box=True)


# ----------------------------------------------------------------------------------------------- AdvDM

@dataclass(frozen=True)
class AdvDMParams:
    eps: float = 16.0  # L-inf budget, /255 pixels (METHODS.md 0: epsilon=16)
    alpha: float = 1.0  # step, /255 pixels
    steps: int = 100
    prompt: str = "a photo"  # mist "object" prompt and Diff-Protect's default (METHODS.md 5.1)
    mode: Literal["+", "-"] = "+"  # "+": maximise the LDM loss (AdvDM); "-": minimise it (Diff-Protect AdvDM(-))
    random_start: bool = True  # advertorch LinfPGDAttack rand_init=True (uniform in the eps-ball)
    batch_size: int = 0  # images per PGD batch; 0 = all of the subject's images at once
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # the LDM reference code runs fp32
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _common_checks(self)
        _check_prompt(self.prompt)


@DEFENSES.register("advdm", version=1)
class AdvDM(Defense):
    """AdvDM (Liang et al., ICML'23): PGD on the pixels that maximises the LDM training loss
    E_{t,eps} ||eps_theta(z_t(E(x+delta)), t, c) - eps||^2, one Monte-Carlo (t, eps) draw per step and image, z a
    posterior sample of the VAE encoder (METHODS.md 5.1). ``mode="-"`` minimises it (AdvDM(-), Diff-Protect)."""

    Params = AdvDMParams
    needs_model = True
    requires = _REQ
    profiles = {"tiny": {"steps": 10}}
    paper = "Liang et al., ICML'23 (arXiv 2302.04578); psyker-team/mist mist_v3.py --mode 0; METHODS.md 5.1"

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        sur = load_surrogate(ctx, model_dir, p.prompt, p.gradient_checkpointing, self.name)
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        ascend = p.mode == "+"

        def attack(x0: torch.Tensor, gen: torch.Generator, tick: Callable[[], None]):
            x = random_start(x0, p.eps, gen) if p.random_start else x0.clone()
            losses = []
            for _ in range(p.steps):
                x.requires_grad_(True)
                with autocast:
                    z = sample_latent(sur.vae.encode(x).latent_dist, gen, sur.scaling_factor)
                    per = sur.semantic_loss(z, gen)
                grad, = torch.autograd.grad(per.sum(), x)
                x = pgd_step(x.detach(), x0, grad, p.alpha, p.eps, ascend=ascend)
                losses.append(float(per.detach().mean()))
                tick()
            return x, {"loss_first": losses[0], "loss_last": losses[-1]}

        out = run_batches(ctx, images, p.eps, p.steps, p.batch_size, attack)
        _record(ctx, precision, p.gradient_checkpointing, sur)
        return out


# ----------------------------------------------------------------------------------------------- Mist v1

@dataclass(frozen=True)
class MistParams:
    eps: float = 16.0  # /255 pixels (mist_utils.py defaults)
    alpha: float = 1.0
    steps: int = 100
    rate: float = 1e4  # 10 ** (rate_arg + 3) with mist's default rate_arg 1 (METHODS.md 5.2)
    target_image: str = BUILTIN_TARGET  # a path, or "builtin:mist-like" (MIST.png cannot be shipped)
    prompt: str = "a photo"  # Diff-Protect mode='mist' default; mist_v3.py uses "a painting" for styles
    semantic_crop_512: int = 512  # RandomCrop size for L_sem at 512 px, scaled by resolution/512 (512: identity)
    random_start: bool = True  # advertorch LinfPGDAttack rand_init=True
    batch_size: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _common_checks(self)
        _check_prompt(self.prompt)
        if self.rate < 0:
            raise ValueError(f"rate must be >= 0, got {self.rate}")
        if not 8 <= self.semantic_crop_512 <= 512:
            raise ValueError(f"semantic_crop_512 must be in [8, 512] (crop size in px at 512 px), got {self.semantic_crop_512}")


def crop_size(crop_512: int, resolution: int, multiple: int) -> int:
    """``crop_512`` scaled to ``resolution``, rounded down to a multiple of ``multiple`` px (VAE x UNet downsampling),
    never below ``multiple`` nor above ``resolution``."""
    size = int(round(crop_512 * resolution / 512))
    return max(multiple, min(resolution, size // multiple * multiple))


@DEFENSES.register("mist", version=1)
class Mist(Defense):
    """Mist v1 fused mode (Liang & Wu, arXiv 2305.12683; ``mist_v3.py --mode 2``): minimise
    ||E(x) - E(x_tgt)||^2_sum - rate * L_sem, the textural pull toward a target image plus the weighted AdvDM term
    (METHODS.md 5.2), with E(.) = scaled posterior samples (the target's is re-drawn every step, as mist re-encodes
    it). L_sem is computed on a RandomCrop of x (``pre_process``); in mist_v3 the crop size equals the block size
    (512 // block_num), so at the defaults (512 px, one block) the crop is the whole image: ``semantic_crop_512``
    = 512 reproduces that, smaller values crop. The identity crop uses a second, independent posterior sample of the
    same encoding (mist encodes the crop again). Target: an image path, or ``builtin:mist-like``, a deterministic
    high-frequency texture standing in for mist's ``MIST.png`` (not redistributable here; results with it are not
    those of the original target)."""

    Params = MistParams
    needs_model = True
    requires = _REQ
    profiles = {"tiny": {"steps": 10}}
    paper = "Liang & Wu, arXiv 2305.12683; psyker-team/mist mist_v3.py --mode 2; METHODS.md 5.2"

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        target = load_target(p.target_image, ctx.resolution)
        sur = load_surrogate(ctx, model_dir, p.prompt, p.gradient_checkpointing, self.name)
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        tgt = LatentCache(sur.vae, to_tensor([target]))
        multiple = 8 * 2 ** (len(sur.unet.config.block_out_channels) - 1)
        crop = crop_size(p.semantic_crop_512, ctx.resolution, multiple)

        def attack(x0: torch.Tensor, gen: torch.Generator, tick: Callable[[], None]):
            x = random_start(x0, p.eps, gen) if p.random_start else x0.clone()
            tex_hist, sem_hist = [], []
            zeros = torch.zeros(len(x0), dtype=torch.long)
            for _ in range(p.steps):
                x.requires_grad_(True)
                with autocast:
                    dist = sur.vae.encode(x).latent_dist
                    zx = sample_latent(dist, gen, sur.scaling_factor)
                    zy = tgt.sample(zeros, gen)
                    tex = (zx.float() - zy).pow(2).flatten(1).sum(dim=1)
                    if crop < x.shape[-1]:
                        dist = sur.vae.encode(random_crops(x, crop, gen)).latent_dist
                    sem = sur.semantic_loss(sample_latent(dist, gen, sur.scaling_factor), gen)
                grad, = torch.autograd.grad((tex - p.rate * sem).sum(), x)
                x = pgd_step(x.detach(), x0, grad, p.alpha, p.eps, ascend=False)
                tex_hist.append(float(tex.detach().mean()))
                sem_hist.append(float(sem.detach().mean()))
                tick()
            return x, {"textural_first": tex_hist[0], "textural_last": tex_hist[-1],
                       "semantic_first": sem_hist[0], "semantic_last": sem_hist[-1]}

        out = run_batches(ctx, images, p.eps, p.steps, p.batch_size, attack)
        _record(ctx, precision, p.gradient_checkpointing, sur)
        ctx.extra.update({"semantic_crop_px": crop, "target_image": p.target_image})
        return out


# ----------------------------------------------------------------------------------------------- PhotoGuard

@dataclass(frozen=True)
class PhotoGuardParams:
    eps: float = 7.65  # 0.06 in [-1, 1] (demo_simple_attack_img2img), /255 pixels; saved images keep floor = 7
    alpha: float = 2.55  # initial step s = 0.02 in [-1, 1], /255 pixels; decays linearly toward s/100
    steps: int = 1000
    target_image: str = "zero"  # "zero": z_tgt = 0 (img2img demo); else a path or "builtin:mist-like": E(target).mean
    batch_size: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "fp16"  # the notebooks run the encoder under fp16 autocast
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _common_checks(self)


@DEFENSES.register("photoguard", version=1)
class PhotoGuard(Defense):
    """PhotoGuard encoder attack (Salman et al., ICML'23; ``MadryLab/photoguard`` img2img demo): minimise
    ||E(x+delta).latent_dist.mean - z_tgt||_2 by L-inf PGD with sign steps from a uniform random start, step size
    s_i = s - (s - s/100) i / iters (METHODS.md 5.4). z_tgt = 0, or the posterior mean of ``target_image``.
    Not implemented: the inpainting variant (masked, s = 0.01) and the diffusion ("complex") attack through the
    4-step inpainting pipeline. Only the VAE of the surrogate is loaded."""

    Params = PhotoGuardParams
    needs_model = True
    requires = _REQ
    profiles = {"tiny": {"steps": 20}}
    paper = "Salman et al., ICML'23; MadryLab/photoguard notebooks (demo_simple_attack_img2img); METHODS.md 5.4"

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        sur = load_surrogate(ctx, model_dir, None, p.gradient_checkpointing, self.name)
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        if p.target_image == "zero":
            z_tgt = None
        else:
            z_tgt = LatentCache(sur.vae, to_tensor([load_target(p.target_image, ctx.resolution)])).mean
        schedule = photoguard_step_sizes(p.alpha, p.steps)

        def attack(x0: torch.Tensor, gen: torch.Generator, tick: Callable[[], None]):
            x = random_start(x0, p.eps, gen)
            dists = []
            for i in range(p.steps):
                x.requires_grad_(True)
                with autocast:
                    mean = sur.vae.encode(x).latent_dist.mean.float()
                dist = (mean if z_tgt is None else mean - z_tgt).flatten(1).norm(dim=1)
                grad, = torch.autograd.grad(dist.sum(), x)
                x = pgd_step(x.detach(), x0, grad, float(schedule[i]), p.eps, ascend=False)
                dists.append(float(dist.detach().mean()))
                tick()
            return x, {"latent_distance_first": dists[0], "latent_distance_last": dists[-1]}

        out = run_batches(ctx, images, p.eps, p.steps, p.batch_size, attack)
        _record(ctx, precision, p.gradient_checkpointing, sur)
        ctx.extra.update({"step_first_255": float(schedule[0]), "step_last_255": float(schedule[-1]),
                          "target_image": p.target_image})
        return out


# ----------------------------------------------------------------------------------------------- SDS

@dataclass(frozen=True)
class SDSParams:
    eps: float = 16.0  # /255 pixels (Diff-Protect configs/attack/base.yaml)
    alpha: float = 1.0
    steps: int = 100
    mode: Literal["+", "-"] = "-"  # "-": SDS(-), minimise (the paper's recommended and the repo's default); "+": ascend
    prompt: str = "a photo"
    random_start: bool = False  # pgd_sds default
    use_target: bool = False  # SDS-T: add a textural pull toward target_image (METHODS.md 5.5)
    target_rate: float = 5.0  # SDS-T weight of the SDS gradient
    target_image: str = BUILTIN_TARGET
    batch_size: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _common_checks(self)
        _check_prompt(self.prompt)
        if self.target_rate < 0:
            raise ValueError(f"target_rate must be >= 0, got {self.target_rate}")


@DEFENSES.register("sds", version=1)
class SDS(Defense):
    """SDS(+/-) (Xue et al., ICLR'24; Diff-Protect ``Linf_PGD.pgd_sds``): the score-distillation gradient
    g_z = eps_theta(z_t, t, c) - eps (no UNet Jacobian, no w(t); the velocity target for v-prediction models) is
    pushed to the pixels through the VAE encoder only (``z.backward(gradient=g_z)``), and
    x <- x + g_dir * alpha * sign(grad_x), g_dir = +1 for ``mode="+"``, -1 for ``"-"`` (METHODS.md 5.5). The default
    is SDS(-), the variant the paper recommends and Diff-Protect's default. ``use_target`` gives SDS-T:
    x <- x + alpha * sign(g_dir * target_rate * grad_sds - grad ||E(x) - E(x_tgt)||^2_sum). Differences from the
    repo, same distributions: one encoder pass per step serves the UNet input and the backward pass (the repo
    encodes twice, drawing two posterior samples), and SDS-T's textural gradient goes through the same pass."""

    Params = SDSParams
    needs_model = True
    requires = _REQ
    profiles = {"tiny": {"steps": 10}}
    paper = "Xue et al., ICLR'24 (Toward Effective Protection against Diffusion-based Mimicry); xavihart/Diff-Protect; METHODS.md 5.5"

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        sur = load_surrogate(ctx, model_dir, p.prompt, p.gradient_checkpointing, self.name)
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        tgt = LatentCache(sur.vae, to_tensor([load_target(p.target_image, ctx.resolution)])) if p.use_target else None
        g_dir = 1.0 if p.mode == "+" else -1.0
        kind = sur.noise_scheduler.config.prediction_type

        def attack(x0: torch.Tensor, gen: torch.Generator, tick: Callable[[], None]):
            x = random_start(x0, p.eps, gen) if p.random_start else x0.clone()
            norms = []
            zeros = torch.zeros(len(x0), dtype=torch.long)
            for _ in range(p.steps):
                x.requires_grad_(True)
                with autocast:
                    z = sample_latent(sur.vae.encode(x).latent_dist, gen, sur.scaling_factor)
                    with torch.no_grad():
                        zd = z.detach()
                        t, noise = draw_timesteps_noise(sur.noise_scheduler, zd, gen)
                        pred = sur.eps_pred(sur.noise_scheduler.add_noise(zd, noise, t), t).float()
                        target = noise if kind == "epsilon" else sur.noise_scheduler.get_velocity(zd, noise, t)
                        g_z = pred - target.float()
                direction = g_dir * g_z
                if tgt is not None:
                    direction = p.target_rate * direction - 2.0 * (zd.float() - tgt.sample(zeros, gen))
                grad, = torch.autograd.grad(z, x, grad_outputs=direction.to(z.dtype))
                x = pgd_step(x.detach(), x0, grad, p.alpha, p.eps, ascend=True)
                norms.append(float(g_z.flatten(1).norm(dim=1).mean()))
                tick()
            return x, {"sds_norm_first": norms[0], "sds_norm_last": norms[-1]}

        out = run_batches(ctx, images, p.eps, p.steps, p.batch_size, attack)
        _record(ctx, precision, p.gradient_checkpointing, sur)
        ctx.extra.update({"sds_mode": p.mode, "use_target": p.use_target})
        return out
