"""Attacker-side purifications that need a model (METHODS.md 6.2, 6.3, 6.5, 6.6): DiffPure, GrIDPure, noisy
upscaling and IMPRESS. Each is a transform with ``model_roles`` (profile roles the suite's profile maps to model
references), run by the cached ``purify`` stage on the attacker's whole training set (leaked clean images included)
on the stage's device. Parameter defaults are the references' settings.

Pixel convention: uint8 HxWx3 between stages; float NCHW in [-1, 1] inside models (``bench.diffusion.to_tensor``),
back to uint8 with ``to_uint8`` (round half up). Random draws: image i of a stage uses ``ctx.torch_generator(i)``
(and ``ctx.rng(i)`` for numpy noise), so results do not depend on batching.

Models (``bench/profiles.py``): role ``diffpure`` (a diffusers ``UNet2DModel`` + ``DDPMScheduler`` folder or Hugging Face
id; tiny/proxy: ``tiny:ddpm``/``proxy:ddpm`` built by the harness), ``upscaler`` (a ``StableDiffusionUpscalePipeline``;
tiny/proxy: ``tiny:upscaler``/``proxy:upscaler``), ``default`` (the attacker's SD model, whose VAE IMPRESS uses).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from bench.lazy import lazy_import
from bench.plugins import TRANSFORMS, Image, RunContext, Transform

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


# ---------------------------------------------------------------------------------------------- shared pieces

def resize(x: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """Bicubic (antialiased) resize of an NCHW tensor in [-1, 1] to ``size`` (H, W); unchanged when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def model_size(unet) -> tuple[int, int]:
    s = unet.config.sample_size
    return (s, s) if isinstance(s, int) else tuple(s)


def load_ddpm(folder: Path, device: str, allow_unsafe: bool = False):
    """(``UNet2DModel``, ``DDPMScheduler``) of a diffusers folder (``unet/``, ``scheduler/``), safetensors only unless
    ``allow_unsafe``."""
    from diffusers import DDPMScheduler, UNet2DModel

    from bench.models import check_safe

    check_safe(folder, allow_unsafe)
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=None if allow_unsafe else True,
                                       local_files_only=True).to(device).eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return unet, sched


def sdedit(unet, scheduler, x0: "torch.Tensor", t: int, generators: list) -> "torch.Tensor":
    """DiffPure's purification (Nie et al., ICML'22; GrIDPure ``diffpure_guided.image_editing_sample``): diffuse
    ``x0`` (NCHW in [-1, 1], the model's size) to noise level t-1 of the T training steps in one draw,
    x = sqrt(abar) x0 + sqrt(1 - abar) eps, then run the t ancestral DDPM steps t-1 .. 0 back. t=0 returns ``x0``.
    ``generators``: one CPU generator per batch element (the same object may repeat: it is drawn from in turn)."""
    if t == 0:
        return x0
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(sched.config.num_train_timesteps)  # every step: prev_t = t - 1
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators]).to(x0.device, x0.dtype)
    x = sched.add_noise(x0, noise, torch.full((len(x0),), t - 1, dtype=torch.long))
    with torch.no_grad():
        for step in range(t - 1, -1, -1):
            out = unet(x, step).sample
            x = sched.step(out, step, x, generator=generators).prev_sample
    return x.clamp(-1, 1)


def _check_t(t: int, what: str) -> None:
    if not 0 <= t <= 1000:
        raise ValueError(f"{what} must be in [0, 1000] (diffusion steps of the model's T=1000), got {t}")


# ---------------------------------------------------------------------------------------------- DiffPure

@dataclass(frozen=True)
class DiffPureParams:
    t: int = 100  # diffusion steps to noise to and back, of T=1000 (t* = 0.1; GrIDPure diffpure.py --pure_steps=100)
    batch_size: int = 8  # images per UNet call (results do not depend on it)

    def validate(self) -> None:
        _check_t(self.t, "t")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@TRANSFORMS.register("diffpure", version=1)
class DiffPure(Transform):
    """DiffPure as the GrIDPure repo runs it on protected images (Zhao et al., arXiv 2312.00084, ``diffpure.py``):
    resize to the model's size (reference: 512 -> 256, bicubic here), noise to t = 100 of 1000 (t* = 0.1), DDPM
    reverse to 0, resize back; t = 0 returns the input. Model role ``diffpure``: a diffusers ``UNet2DModel`` +
    ``DDPMScheduler`` folder or id. The reference model, guided-diffusion's ImageNet 256x256 unconditional UNet, is an
    OpenAI ``.pt`` pickle with no diffusers class; the paper profile uses ``google/ddpm-ema-celebahq-256`` (DDPM on
    CelebA-HQ faces, the same linear betas, fixed-small variance instead of ADM's learned one; the Hub listing shows
    pickled weights only: convert them to safetensors, or pass ``--allow-unsafe-weights``). A 6-channel (learned-sigma)
    diffusers conversion of the ADM model with a ``DDPMScheduler`` of ``variance_type: learned_range`` would be closer."""

    Params = DiffPureParams
    paper = "DiffPure (Nie et al., ICML'22) as in GrIDPure (Zhao et al., arXiv 2312.00084) diffpure.py, pure_steps=100"

    def model_roles(self) -> tuple[str, ...]:
        return ("diffpure",)

    def purify(self, ctx: RunContext, images: list[Image], class_noun: str) -> list[Image]:
        from bench.diffusion import to_tensor, to_uint8

        if self.params.t == 0:  # no diffusion: the identity (no resize round trip either)
            return list(images)
        unet, sched = load_ddpm(ctx.models["diffpure"], ctx.device, ctx.allow_unsafe_weights)
        size = model_size(unet)
        out: list[Image] = []
        bs = self.params.batch_size
        for start in range(0, len(images), bs):
            chunk = images[start:start + bs]
            x = to_tensor(chunk).to(ctx.device)
            gens = [ctx.torch_generator(start + i) for i in range(len(chunk))]
            y = resize(sdedit(unet, sched, resize(x, size), self.params.t, gens), tuple(x.shape[-2:]))
            out += to_uint8(y)
        return out


# ---------------------------------------------------------------------------------------------- GrIDPure

@dataclass(frozen=True)
class GridPureParams:
    t: int = 10  # diffusion steps per purification (GrIDPure --pure_steps=10), of T=1000
    iterations: int = 20  # purification rounds (--pure_iter_num=20)
    gamma: float = 0.1  # each round outputs (1 - gamma) * purified + gamma * that round's input (--gamma=0.1)
    window: int = 256  # window side, pixels at the reference resolution
    stride: int = 128  # window stride, pixels at the reference resolution
    reference: int = 512  # the resolution window and stride are stated at (GrIDPure purifies 512 px images)

    def validate(self) -> None:
        _check_t(self.t, "t")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 2 <= self.window <= self.reference or not 1 <= self.stride <= self.window:
            raise ValueError(f"need 2 <= window <= reference and 1 <= stride <= window, got window={self.window}, "
                             f"stride={self.stride}, reference={self.reference}")


def grid_boxes(height: int, width: int, win: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the win x win windows at ``stride``, plus the last window flush with each border."""
    def starts(side: int) -> list[int]:
        s = list(range(0, side - win + 1, stride))
        return s if s[-1] == side - win else s + [side - win]
    return [(y, x) for y in starts(height) for x in starts(width)]


def grid_purify(x: "torch.Tensor", purify_windows: Callable[["torch.Tensor"], "torch.Tensor"],
                p: GridPureParams) -> "torch.Tensor":
    """GrIDPure's rounds on one image ``x`` (1x3xHxW in [-1, 1]): purify every window and the composite of the four
    corner squares (side win/2) in one batch, average overlapping outputs, blend with gamma, and quantise to uint8
    levels each round as the reference does (it goes through PIL between rounds). Windows scale with the image:
    win = window * H / reference (rounded to even), likewise the stride."""
    h, w = x.shape[-2:]
    win = max(2, 2 * round(p.window * min(h, w) / p.reference / 2))
    stride = max(1, round(p.stride * min(h, w) / p.reference))
    half = win // 2
    boxes = grid_boxes(h, w, win, stride)
    corners = [(0, 0), (0, w - half), (h - half, 0), (h - half, w - half)]  # composite quadrants TL, TR, BL, BR
    quads = [(0, 0), (0, half), (half, 0), (half, half)]
    count = torch.zeros_like(x)
    for y0, x0 in boxes:
        count[..., y0:y0 + win, x0:x0 + win] += 1
    for y0, x0 in corners:
        count[..., y0:y0 + half, x0:x0 + half] += 1
    for _ in range(p.iterations):
        crops = [x[..., y0:y0 + win, x0:x0 + win] for y0, x0 in boxes]
        comp = torch.zeros((1, 3, win, win), dtype=x.dtype, device=x.device)
        for (cy, cx), (qy, qx) in zip(corners, quads):
            comp[..., qy:qy + half, qx:qx + half] = x[..., cy:cy + half, cx:cx + half]
        pure = purify_windows(torch.cat(crops + [comp]))
        merged = torch.zeros_like(x)
        for (y0, x0), patch in zip(boxes, pure[:-1]):
            merged[..., y0:y0 + win, x0:x0 + win] += patch
        for (cy, cx), (qy, qx) in zip(corners, quads):
            merged[..., cy:cy + half, cx:cx + half] += pure[-1:, :, qy:qy + half, qx:qx + half]
        x = (1 - p.gamma) * merged / count + p.gamma * x
        x = ((x * 127.5 + 128.0).clamp(0, 255).floor() - 127.5) / 127.5  # uint8 levels, as to_uint8
    return x


@TRANSFORMS.register("gridpure", version=1)
class GridPure(Transform):
    """GrIDPure (Zhao et al., "Can protective perturbation safeguard personal data from being exploited by stable
    diffusion?", CVPR'24, arXiv 2312.00084; ``gridpure.py``): DiffPure with t = 10 on 256x256 windows at stride 128
    plus one composite of the four 128x128 corners, overlaps averaged, 20 rounds, each round's output
    0.9 * purified + 0.1 * its input. Windows are resized to the ``diffpure`` model's size when they differ (at the
    reference they are the model's 256). Model role ``diffpure`` (see ``diffpure``)."""

    Params = GridPureParams
    paper = "GrIDPure (Zhao et al., arXiv 2312.00084) gridpure.py: pure_steps 10, pure_iter_num 20, gamma 0.1"

    def model_roles(self) -> tuple[str, ...]:
        return ("diffpure",)

    def purify(self, ctx: RunContext, images: list[Image], class_noun: str) -> list[Image]:
        from bench.diffusion import to_tensor, to_uint8

        unet, sched = load_ddpm(ctx.models["diffpure"], ctx.device, ctx.allow_unsafe_weights)
        size = model_size(unet)
        out: list[Image] = []
        for i, image in enumerate(images):
            gen = ctx.torch_generator(i)

            def windows(batch: "torch.Tensor") -> "torch.Tensor":
                pure = sdedit(unet, sched, resize(batch, size), self.params.t, [gen] * len(batch))
                return resize(pure, tuple(batch.shape[-2:]))

            out += to_uint8(grid_purify(to_tensor([image]).to(ctx.device), windows, self.params))
        return out


# ---------------------------------------------------------------------------------------------- noisy upscaling

@dataclass(frozen=True)
class NoisyUpscaleParams:
    sigma: float = 0.1  # Gaussian noise std, [0, 1] pixel units (README example 0.1; 0.05 = "Gaussian noising")
    noise_level: int = 320  # the upscaler's noise augmentation of its low-res input (upscale.py noise_level=320)
    steps: int = 75  # denoising steps (StableDiffusionUpscalePipeline's default, which upscale.py keeps)
    guidance: float = 9.0  # classifier-free guidance (the pipeline's default, which upscale.py keeps)
    prompt: str = "a photo of a {class_noun}"  # stands in for upscale.py's per-image BLIP captions (caption.py)

    def validate(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 0 <= self.noise_level <= 350:
            raise ValueError(f"noise_level must be in [0, 350] (the upscaler's max_noise_level), got {self.noise_level}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        try:
            self.prompt.format(class_noun="toy")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt {self.prompt!r}: the only placeholder is {{class_noun}} ({e!r})") from None


@TRANSFORMS.register("noisy-upscale", version=1)
class NoisyUpscale(Transform):
    """Noisy upscaling (Hoenig et al., "Adversarial perturbations cannot reliably protect artists from generative
    AI", arXiv 2406.12027; ``ethz-spylab/robust-style-mimicry`` ``noise.py`` + ``upscale.py``): skimage Gaussian noise
    (sigma 0.1, saved as uint8) then the SD x4 upscaler with noise_level 320. Differences: the output (4x) is resized
    back (PIL bicubic) to the input size, because the attacker's fine-tuning here trains at the profile's resolution
    (the reference keeps 2048 px and fine-tunes SD2.1 at 768); upscale.py also passes ``noise_level_sub=320``, an
    argument of the authors' diffusers fork that mainline diffusers lacks; the prompt is the subject's class prompt,
    not a per-image caption. ``sigma: 0`` is plain upscaling (chain it after ``jpeg`` for JPEG then upscaling). Model
    role ``upscaler``: a ``StableDiffusionUpscalePipeline`` folder (paper: ``stabilityai/stable-diffusion-x4-upscaler``)."""

    Params = NoisyUpscaleParams
    paper = "Hoenig et al., arXiv 2406.12027 (robust-style-mimicry noise.py + upscale.py): sigma 0.1, noise_level 320"

    def model_roles(self) -> tuple[str, ...]:
        return ("upscaler",)

    def purify(self, ctx: RunContext, images: list[Image], class_noun: str) -> list[Image]:
        from diffusers import StableDiffusionUpscalePipeline
        from PIL import Image as PILImage

        from attacks.transforms import GaussianNoise, NoiseParams, _pil_bicubic
        from bench.models import check_safe

        folder = ctx.models["upscaler"]
        check_safe(folder, ctx.allow_unsafe_weights)
        pipe = StableDiffusionUpscalePipeline.from_pretrained(
            folder, use_safetensors=None if ctx.allow_unsafe_weights else True, local_files_only=True).to(ctx.device)
        pipe.set_progress_bar_config(disable=True)
        noise = GaussianNoise(NoiseParams(self.params.sigma))
        prompt = self.params.prompt.format(class_noun=class_noun)
        out: list[Image] = []
        for i, image in enumerate(images):
            noisy = noise.apply(image, ctx.rng(i)) if self.params.sigma > 0 else image
            with torch.no_grad():
                up = pipe(prompt=prompt, image=PILImage.fromarray(noisy), noise_level=self.params.noise_level,
                          num_inference_steps=self.params.steps, guidance_scale=self.params.guidance,
                          generator=ctx.torch_generator(i), output_type="np").images[0]
            up8 = np.clip(np.round(np.asarray(up) * 255.0), 0, 255).astype(np.uint8)
            out.append(_pil_bicubic(up8, image.shape[1], image.shape[0]))
        return out


# ---------------------------------------------------------------------------------------------- IMPRESS

@dataclass(frozen=True)
class ImpressParams:
    iterations: int = 3000  # Adam steps (README default)
    lr: float = 0.01  # Adam learning rate, cosine-annealed to lr_min over the iterations
    lr_min: float = 1e-5
    delta: float = 0.1  # LPIPS bound: the LPIPS term is max(LPIPS(x_p, x_adv) - delta, 0)
    alpha: float = 0.1  # weight of the LPIPS term
    noise: float = 0.1  # std of the initial Gaussian noise, [-1, 1] units (the VAE's input space): 12.75/255
    # "lpips-vgg": the reference's LPIPS (VGG16 backbone weights `torchvision-vgg16`, see `bench weights`); "none": no
    # LPIPS term (only the consistency loss; for machines without those weights; say so in the suite)
    similarity: Literal["lpips-vgg", "none"] = "lpips-vgg"
    batch_size: int = 4  # images optimised together (their losses add, so each image's optimisation is unchanged)

    def validate(self) -> None:
        if self.iterations < 0 or self.lr <= 0 or self.lr_min < 0 or self.noise < 0 or self.batch_size < 1:
            raise ValueError("need iterations >= 0, lr > 0, lr_min >= 0, noise >= 0, batch_size >= 1")


def impress_optimise(vae, x_adv: "torch.Tensor", p: ImpressParams, generators: list,
                     lpips: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"] | None = None
                     ) -> tuple["torch.Tensor", list[float]]:
    """IMPRESS (Cao et al., NeurIPS'23): x_p = x_adv + N(0, noise^2), then ``iterations`` Adam steps (eps 1e-5, cosine
    lr to lr_min) on sum over images of mean((D(E(x_p)) - x_p)^2) + alpha * max(lpips(x_p, x_adv) - delta, 0), x_p
    clamped to [-1, 1] after each step. E: the VAE posterior's mode (``vae(x).sample``). Returns x_p and the loss per
    step."""
    noise = torch.cat([torch.randn((1, *x_adv.shape[1:]), generator=g) for g in generators]).to(x_adv.device)
    x_p = (x_adv + p.noise * noise).clamp(-1, 1).detach().requires_grad_(True)
    opt = torch.optim.Adam([x_p], lr=p.lr, eps=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(p.iterations, 1), eta_min=p.lr_min)
    losses = []
    with torch.enable_grad():
        for _ in range(p.iterations):
            recon = vae(x_p).sample
            loss = ((recon - x_p) ** 2).mean(dim=(1, 2, 3))
            if lpips is not None:
                loss = loss + p.alpha * (lpips(x_p, x_adv).flatten() - p.delta).clamp(min=0)
            loss = loss.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x_p.clamp_(-1, 1)
            losses.append(float(loss.detach()))
    return x_p.detach(), losses


@TRANSFORMS.register("impress", version=1)
class Impress(Transform):
    """IMPRESS (Cao et al., "IMPRESS: Evaluating the resilience of imperceptible perturbations against unauthorized
    data usage in diffusion-based generative AI", NeurIPS'23; ``AAAAAAsuka/Impress`` ``impress.py`` + README): make
    the image consistent under the attacker's SD VAE while staying within LPIPS-VGG 0.1 of the protected image, Adam
    lr 0.01 (cosine to 1e-5), 3000 iterations, alpha 0.1, initial noise 0.1 (``impress_optimise``). Model role
    ``default``: the profile's default base model (its VAE; after a harden defense the attacker fine-tunes the hardened
    model, whose VAE such defenses leave unchanged). Differences: images are optimised in [-1, 1] (the VAE's and
    lpips' input space; the reference's default clamp range is [0, 1]) in float32 (the reference uses half);
    ``similarity: none`` drops the LPIPS term where the VGG weights are absent (tiny/proxy suites say so)."""

    Params = ImpressParams
    paper = "IMPRESS (Cao et al., NeurIPS'23) impress.py + README: 3000 iters, lr 0.01, Delta 0.1, alpha 0.1"

    def model_roles(self) -> tuple[str, ...]:
        return ("default",)

    def weight_names(self) -> tuple[str, ...]:
        from metrics.imperceptibility import LPIPS_BACKBONES

        return (LPIPS_BACKBONES["vgg"].name,) if self.params.similarity == "lpips-vgg" else ()

    def purify(self, ctx: RunContext, images: list[Image], class_noun: str) -> list[Image]:
        from diffusers import AutoencoderKL

        from bench.diffusion import to_tensor, to_uint8
        from bench.models import check_safe

        folder = ctx.models["default"]
        check_safe(folder, ctx.allow_unsafe_weights)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=None if ctx.allow_unsafe_weights
                                            else True, local_files_only=True).to(ctx.device).eval().requires_grad_(False)
        lpips = None
        if self.params.similarity == "lpips-vgg":
            from metrics.imperceptibility import LPIPS_BACKBONES, lpips_model

            entry = LPIPS_BACKBONES["vgg"]
            lpips = lpips_model("vgg", str(entry.path() / entry.files[0])).to(ctx.device).requires_grad_(False)
        out: list[Image] = []
        bs = self.params.batch_size
        for start in range(0, len(images), bs):
            chunk = images[start:start + bs]
            gens = [ctx.torch_generator(start + i) for i in range(len(chunk))]
            x_p, losses = impress_optimise(vae, to_tensor(chunk).to(ctx.device), self.params, gens, lpips)
            ctx.extra.setdefault("impress_loss_first_last", []).append([losses[0], losses[-1]] if losses else [])
            out += to_uint8(x_p)
        return out
