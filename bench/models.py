"""Base models: tiny SD-shaped models built offline, real checkpoints resolved from local folders or the Hugging
Face cache, safety checks (safetensors only), weight hashes, loading, samplers and seeded generation.

Model references are strings (MODELS.md: ids are configuration, never constants in code):
- ``tiny:a`` / ``tiny:b``: two distinct Stable-Diffusion-shaped variants with random, briefly pre-trained weights
  (DEPENDENCIES.md "A Stable-Diffusion-shaped pipeline with no downloaded weights"); different channels and
  init seeds, so that "model mismatch" exists at tiny scale. Built by :func:`prepare_tiny`.
- ``proxy:a`` / ``proxy:b``: text-conditioned 32 px variants (KL-f4 VAE) pre-trained on attribute captions of
  synthetic subjects, so that personalisation and protection are measurable on a CPU (``PROXY_VARIANTS``).
  Built by :func:`prepare_builtin`, like every ``family:variant`` reference.
- ``tiny:ddpm`` / ``proxy:ddpm`` and ``tiny:upscaler`` / ``proxy:upscaler``: small purifier models of the classes
  DiffPure/GrIDPure (``UNet2DModel`` + ``DDPMScheduler``) and noisy upscaling (``StableDiffusionUpscalePipeline``)
  load at paper scale, pre-trained for seconds on the same synthetic images (:func:`prepare_purifier`).
- a Hugging Face id (``owner/name``): the local HF cache snapshot, never downloaded at run time unless
  ``BENCH_ALLOW_DOWNLOAD=1``.
- a local folder in diffusers layout.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")

from bench.images import file_sha256  # noqa: F401  (re-exported: weight hashes)

CLIP_VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SAFE_LIBRARIES = {"diffusers", "transformers"}
HF_ALLOW_PATTERNS = ["*.json", "*.txt", "*/diffusion_pytorch_model*.safetensors", "*/model*.safetensors"]
HF_IGNORE_PATTERNS = ["safety_checker/*", "*fp16*", "*non_ema*", "*ema_only*"]
HF_UNSAFE_PATTERNS = ["*/diffusion_pytorch_model*.bin", "*/pytorch_model*.bin"]


class ModelUnavailable(Exception):
    """A model reference that cannot be resolved here (not cached, not a folder, not a diffusers layout)."""


class UnsafeWeights(Exception):
    """A component has only pickled weights (.bin/.ckpt/.pt/.pth), which can execute code when loaded."""


# ----------------------------------------------------------------------------------------------- tokenizer

def _bpe_vocab_path() -> Path:
    """CLIP's BPE merges as shipped in the open-clip-torch wheel, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("the CLIP BPE vocabulary comes from the open-clip-torch wheel: "
                               "pip install --no-deps open-clip-torch")
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path}: missing from the installed open-clip-torch wheel")
    return path


def build_tokenizer(dir: Path):
    """Write CLIP's tokenizer files (vocab.json, merges.txt; 49,408 tokens) to ``dir`` and return a
    ``CLIPTokenizer`` (max length 77, pad = ``<|endoftext|>`` as SD 1.x). The vocabulary is built the way CLIP's
    ``SimpleTokenizer`` builds it: 256 byte symbols, the same with ``</w>``, the 48,894 merges, 2 specials."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(_bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != CLIP_VOCAB_SIZE:
        raise ModelUnavailable(f"{_bpe_vocab_path()}: built {len(vocab_list)} tokens, expected {CLIP_VOCAB_SIZE}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}, ensure_ascii=False))
    (dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(vocab=str(dir / "vocab.json"), merges=str(dir / "merges.txt"), model_max_length=77)


# ----------------------------------------------------------------------------------------------- tiny models

@dataclass(frozen=True)
class TinyVariant:
    """Architecture of one tiny SD-shaped model (UNet/VAE channels, text width) and its init-seed offset."""

    unet_channels: tuple[int, ...]
    unet_groups: int
    unet_layers: int
    head_dim: int
    text_hidden: int
    text_layers: int
    vae_channels: tuple[int, ...]  # one down/up block each: 4 blocks = KL-f8 (SD), 3 = f4
    seed_offset: int


TINY_VARIANTS: dict[str, TinyVariant] = {
    "a": TinyVariant(unet_channels=(32, 64), unet_groups=32, unet_layers=1, head_dim=8, text_hidden=32,
                     text_layers=2, vae_channels=(16, 32, 32, 32), seed_offset=0),
    "b": TinyVariant(unet_channels=(48, 64), unet_groups=16, unet_layers=1, head_dim=16, text_hidden=48,
                     text_layers=2, vae_channels=(16, 32, 32, 48), seed_offset=7919),
}

# The proxy scale (DESIGN.md "profile"): text-conditioned small models in which personalisation is real on a CPU.
# Same classes and the same 8x8x4 latents as tiny, but at 32 px through a KL-f4 VAE (12x compression): measured, a
# KL-f8 VAE at 64 px (SD's 48x) trained for the minutes a CPU allows loses the synthetic subjects' colours (held-out
# reconstruction MSE 0.064, every hue drawn orange or cyan), the f4 one at 32 px keeps them (0.043 after 400 steps).
# Trained longer on captioned subjects: see PROXY_PRETRAIN in bench/profiles.py.
PROXY_VARIANTS: dict[str, TinyVariant] = {
    "a": TinyVariant(unet_channels=(32, 64), unet_groups=16, unet_layers=1, head_dim=8, text_hidden=32,
                     text_layers=2, vae_channels=(16, 32, 32), seed_offset=0),
    "b": TinyVariant(unet_channels=(48, 64), unet_groups=16, unet_layers=1, head_dim=16, text_hidden=48,
                     text_layers=2, vae_channels=(16, 32, 48), seed_offset=7919),
}
MODEL_FAMILIES: dict[str, dict[str, TinyVariant]] = {"tiny": TINY_VARIANTS, "proxy": PROXY_VARIANTS}

# Defaults of a built model's ``pretrain`` dict; a profile's ``pretrain`` may override any of them.
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "vae_steps": 100,  # autoencoder steps (reconstruction + tiny KL)
    "unet_steps": 200,  # denoising steps
    "batch_size": 8,
    "lr": 1e-3,  # AdamW, for both phases
    "vae_lr": None,  # None: lr
    "vae_batch_size": None,  # None: batch_size
    "kl_weight": 1e-6,  # LDM's KL weight for KL-f8 autoencoders
    "train_text_encoder": True,
    "num_subjects": 48,  # synthetic subjects with seeds 1000.. (evaluation subjects use small seeds)
    "images_per_subject": 4,
    "class_noun": "toy",  # the synthetic dataset's class noun
    # "class": every caption is "a photo of a {class_noun}"; "attributes": each subject's synthetic_caption
    # ("a photo of a red striped star toy"), with caption_dropout empty captions (classifier-free guidance) and
    # class_caption_rate class-only captions (the prior that DreamBooth's class prompt asks for)
    "captions": "class",
    "caption_dropout": 0.0,
    "class_caption_rate": 0.0,
    "warmup_steps": 0,  # linear learning-rate warm-up of the denoising phase
    "max_grad_norm": 0.0,  # 0: no clipping
    "ema_decay": 0.0,  # > 0: save an exponential moving average of the denoising phase's weights (as SD did)
}
PRETRAIN_SEED_BASE = 1000


def builtin_family(ref: str) -> str | None:
    """``"tiny:a"`` -> ``"tiny"``, ``"proxy:b"`` -> ``"proxy"``; None for a checkpoint reference."""
    family = ref.split(":", 1)[0] if ":" in ref else None
    return family if family in MODEL_FAMILIES else None


def tiny_variant(ref: str) -> str | None:
    """``"tiny:a"`` -> ``"a"`` (likewise ``proxy:``); None for any other reference."""
    family = builtin_family(ref)
    if family is None:
        return None
    name = ref.split(":", 1)[1]
    variants = MODEL_FAMILIES[family]
    if name in PURIFIER_VARIANTS:
        return name
    if name not in variants:
        raise ModelUnavailable(f"unknown {family} model {ref!r}; known: {', '.join(f'{family}:' + k for k in variants)}")
    return name


def _sd_scheduler():
    """SD's training scheduler: scaled_linear betas 0.00085..0.012, 1000 steps, epsilon prediction."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", clip_sample=False, steps_offset=1)
    # SD's scheduler_config also carries these, so DDIM/PNDM built with from_config match SD's samplers.
    sched.register_to_config(set_alpha_to_one=False, skip_prk_steps=True)
    return sched


def _build_modules(v: TinyVariant, resolution: int, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=v.text_hidden, intermediate_size=2 * v.text_hidden,
        num_hidden_layers=v.text_layers, num_attention_heads=4, max_position_embeddings=77, projection_dim=v.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 1)
    blocks = len(v.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=v.vae_channels,
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=resolution,
                        scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    n = len(v.unet_channels)
    unet = UNet2DConditionModel(sample_size=resolution // 2 ** (blocks - 1), in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
                                block_out_channels=v.unet_channels, layers_per_block=v.unet_layers,
                                norm_num_groups=v.unet_groups, cross_attention_dim=v.text_hidden,
                                attention_head_dim=v.head_dim)
    return text_encoder, vae, unet


def _pretrain_images(p: dict[str, Any], resolution: int) -> tuple[torch.Tensor, list[int]]:
    """The pre-training images (subjects ``PRETRAIN_SEED_BASE``.., ``images_per_subject`` each) and their seeds."""
    from bench.datasets import render_synthetic
    from bench.diffusion import to_tensor

    seeds = [PRETRAIN_SEED_BASE + s for s in range(int(p["num_subjects"])) for _ in range(int(p["images_per_subject"]))]
    per = int(p["images_per_subject"])
    return to_tensor([render_synthetic(seed, k % per, resolution) for k, seed in enumerate(seeds)]), seeds


def _check_pretrain(pretrain: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(pretrain) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"pretrain: unknown key(s) {unknown}; known: {sorted(PRETRAIN_DEFAULTS)}")
    p = {**PRETRAIN_DEFAULTS, **pretrain}
    if p["captions"] not in ("class", "attributes"):
        raise ValueError(f"pretrain: captions must be 'class' or 'attributes', got {p['captions']!r}")
    if not 0 <= p["caption_dropout"] + p["class_caption_rate"] <= 1:
        raise ValueError("pretrain: caption_dropout + class_caption_rate must be in [0, 1]")
    return p


def _pretrain_vae(vae, x: torch.Tensor, p: dict[str, Any], gen: torch.Generator) -> list[float]:
    """Autoencoder phase: MSE reconstruction (in [-1, 1]) + kl_weight * KL to N(0, I), per LDM's KL-f8 VAE."""
    opt = torch.optim.AdamW(vae.parameters(), lr=p["vae_lr"] or p["lr"], weight_decay=0.0)
    losses = []
    vae.train()
    for _ in range(int(p["vae_steps"])):
        batch = x[torch.randint(0, len(x), (int(p["vae_batch_size"] or p["batch_size"]),), generator=gen)]
        post = vae.encode(batch).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + p["kl_weight"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vae.eval()
    vae.requires_grad_(False)
    return losses


def _latent_scale(vae, x: torch.Tensor) -> float:
    """1 / std of the latent means, so scaled latents have unit variance (how LDM chose SD's 0.18215)."""
    with torch.no_grad():
        std = float(vae.encode(x[:64]).latent_dist.mean.std())
    return round(1.0 / max(std, 1e-6), 5)


class _Captions:
    """Per-sample captions of the denoising phase: the class caption for every sample ("class"), or each image's
    subject caption with caption dropout and class-only captions drawn per sample ("attributes")."""

    def __init__(self, p: dict[str, Any], seeds: list[int]) -> None:
        from bench.datasets import synthetic_caption

        self.p = p
        self.class_caption = f"a photo of a {p['class_noun']}"
        self.subject = [synthetic_caption(seed, p["class_noun"]) for seed in seeds]

    def draw(self, idx: torch.Tensor, gen: torch.Generator) -> list[str]:
        if self.p["captions"] == "class":
            return [self.class_caption] * len(idx)
        r = torch.rand(len(idx), generator=gen).tolist()
        drop, cls = self.p["caption_dropout"], self.p["caption_dropout"] + self.p["class_caption_rate"]
        return ["" if u < drop else self.class_caption if u < cls else self.subject[int(i)] for u, i in zip(r, idx)]


def _pretrain_unet(unet, text_encoder, tokenizer, vae, scheduler, x: torch.Tensor, seeds: list[int],
                   p: dict[str, Any], gen: torch.Generator) -> tuple[list[float], Any, Any]:
    """Denoising phase (METHODS.md 1.2 loss), VAE frozen, on ``_Captions``; returns the losses and the UNet and text
    encoder to save (their EMA when ``ema_decay`` > 0)."""
    import copy

    from bench.diffusion import LatentCache, denoising_loss, encode_prompt

    cache = LatentCache(vae, x)
    captions = _Captions(p, seeds)
    params = list(unet.parameters())
    train_te = bool(p["train_text_encoder"])
    if train_te:
        params += list(text_encoder.parameters())
    text_encoder.requires_grad_(train_te)
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0)
    warmup = int(p["warmup_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    modules = (unet, text_encoder)
    ema = tuple(copy.deepcopy(m).requires_grad_(False) for m in modules) if p["ema_decay"] else None
    frozen: dict[str, torch.Tensor] = {}
    if not train_te:  # a frozen text encoder: every distinct caption is encoded once
        texts = sorted({captions.class_caption, "", *captions.subject})
        with torch.no_grad():
            frozen = dict(zip(texts, encode_prompt(tokenizer, text_encoder, texts)))
    losses = []
    unet.train()
    text_encoder.train(train_te)
    bs = int(p["batch_size"])
    with torch.set_grad_enabled(True):
        for step in range(int(p["unet_steps"])):
            idx = torch.randint(0, len(x), (bs,), generator=gen)
            texts = captions.draw(idx, gen)
            if frozen:
                emb = torch.stack([frozen[t] for t in texts])
            elif p["captions"] == "class":
                emb = encode_prompt(tokenizer, text_encoder, texts[:1]).expand(bs, -1, -1)
            else:
                emb = encode_prompt(tokenizer, text_encoder, texts)
            loss = denoising_loss(unet, scheduler, cache.sample(idx, gen), emb, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(params, p["max_grad_norm"])
            opt.step()
            sched.step()
            if ema is not None:  # diffusers EMAModel's warm-up: decay min(ema_decay, (1 + k) / (10 + k))
                decay = min(float(p["ema_decay"]), (1 + step) / (10 + step))
                with torch.no_grad():
                    for model, avg in zip(modules, ema):
                        for w, w_avg in zip(model.parameters(), avg.parameters()):
                            w_avg.lerp_(w, 1.0 - decay)
            losses.append(float(loss.detach()))
    unet, text_encoder = ema if ema is not None else modules
    unet.eval()
    text_encoder.eval()
    return losses, unet, text_encoder


def prepare_builtin(ref: str, out_dir: Path, pretrain: dict, seed: int, resolution: int = 64) -> None:
    """Build model ``ref`` (``tiny:a``, ``proxy:b``, ...): see ``prepare_tiny``."""
    family = builtin_family(ref)
    if family is None:
        raise ModelUnavailable(f"{ref!r} is not a built-in model; known families: {', '.join(MODEL_FAMILIES)}")
    variant = tiny_variant(ref)
    if variant in PURIFIER_VARIANTS:  # the SD-shaped models' ``pretrain`` does not apply: see PURIFIER_PRETRAIN
        prepare_purifier(variant, out_dir, seed, resolution)
        return
    prepare_tiny(variant, out_dir, pretrain, seed, resolution, family)


def prepare_tiny(variant: str, out_dir: Path, pretrain: dict, seed: int, resolution: int = 64,
                 family: str = "tiny") -> None:
    """Build small SD-shaped model ``variant`` ("a"/"b") of ``family`` ("tiny"/"proxy") with seeded random weights, pre-train it briefly and
    deterministically on synthetic images (VAE as an autoencoder, then UNet + text encoder on denoising), and save
    it as a diffusers folder (safetensors) in ``out_dir``. Same arguments -> same weight bytes (CPU).
    ``pretrain`` keys: see ``PRETRAIN_DEFAULTS``; ``resolution`` in pixels (multiple of 8)."""
    from diffusers import StableDiffusionPipeline

    variants = MODEL_FAMILIES.get(family, {})
    if variant not in variants:
        raise ModelUnavailable(f"unknown {family} model variant {variant!r}; known: {sorted(variants)}")
    v = variants[variant]
    scale = 2 ** (len(v.vae_channels) - 1)
    if resolution % (2 * scale):
        raise ValueError(f"{family} model resolution must be a multiple of {2 * scale}, got {resolution}")
    p = _check_pretrain(dict(pretrain))
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "_tokenizer_src")
    text_encoder, vae, unet = _build_modules(v, resolution, seed + v.seed_offset)
    scheduler = _sd_scheduler()
    gen = torch.Generator("cpu").manual_seed(seed + v.seed_offset + 3)
    log: dict[str, Any] = {"family": family, "variant": variant, "seed": seed, "resolution": resolution, "pretrain": p}
    if p["vae_steps"] or p["unet_steps"]:
        start = time.perf_counter()
        x, seeds = _pretrain_images(p, resolution)
        log["vae_losses"] = _pretrain_vae(vae, x, p, gen)
        vae.register_to_config(scaling_factor=_latent_scale(vae, x))
        log["vae_wall_s"] = round(time.perf_counter() - start, 1)
        log["unet_losses"], unet, text_encoder = _pretrain_unet(unet, text_encoder, tokenizer, vae, scheduler, x,
                                                                seeds, p, gen)
        log["wall_s"] = round(time.perf_counter() - start, 1)
    vae.requires_grad_(True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for f in (out_dir / "_tokenizer_src").iterdir():
        f.unlink()
    (out_dir / "_tokenizer_src").rmdir()
    (out_dir / "pretrain_log.json").write_text(json.dumps(log, indent=1))


# ----------------------------------------------------------------------------------------------- purifier models

PURIFIER_VARIANTS = ("ddpm", "upscaler")
# Pre-training of the built-in purifiers (AdamW steps on the synthetic pre-training images), seconds on one core: the
# DDPM learns to denoise synthetic subjects, the upscaler to output an upscaled image rather than noise. The DDPM works
# at half the profile's resolution (DiffPure resizes to its model's size, as the reference resizes 512 px to its 256
# px model); both are fully convolutional (plus attention), so the upscaler is pre-trained on (res/4 -> res) pairs and
# used on (res -> 4 res).
PURIFIER_PRETRAIN: dict[str, dict[str, Any]] = {
    "ddpm": {"steps": 150, "batch_size": 8, "lr": 2e-3},
    "upscaler": {"vae_steps": 60, "unet_steps": 100, "batch_size": 8, "lr": 2e-3},
}
UPSCALER_NOISE_LEVELS = 350  # StableDiffusionUpscalePipeline's max_noise_level (noise_level 320 is the reference's)


def ddpm_scheduler():
    """DDPM's (and guided-diffusion's) linear schedule: betas 1e-4..0.02 over 1000 steps, epsilon prediction,
    fixed-small posterior variance, x0 clipped to [-1, 1] when sampling."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)


def _adamw_steps(params, steps: int, lr: float, loss_fn) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    with torch.set_grad_enabled(True):
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def _prepare_ddpm(out_dir: Path, seed: int, resolution: int, p: dict[str, Any]) -> dict[str, Any]:
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    size = resolution // 2
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=8)
    sched = ddpm_scheduler()
    x, _ = _pretrain_images({"num_subjects": 48, "images_per_subject": 4}, size)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    bs = int(p["batch_size"])

    def loss() -> torch.Tensor:
        batch = x[torch.randint(0, len(x), (bs,), generator=gen)]
        t = torch.randint(0, 1000, (bs,), generator=gen)
        noise = torch.randn(batch.shape, generator=gen)
        return torch.nn.functional.mse_loss(unet(sched.add_noise(batch, noise, t), t).sample, noise)

    unet.train()
    losses = _adamw_steps(unet.parameters(), int(p["steps"]), float(p["lr"]), loss)
    unet.eval()
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(out_dir, safe_serialization=True)
    return {"losses": losses}


def _prepare_upscaler(out_dir: Path, seed: int, resolution: int, p: dict[str, Any]) -> dict[str, Any]:
    """A 4x ``StableDiffusionUpscalePipeline``: KL-f4 VAE (as SD x4's, latent scale 0.08333) pre-trained as an
    autoencoder, then the 7-channel UNet (noisy latents + the noise-augmented low-res image, noise level as class
    label) on denoising, both on (resolution/4 -> resolution) pairs."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(out_dir / "_tokenizer_src")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=4 * resolution, scaling_factor=0.08333)
    unet = UNet2DConditionModel(sample_size=resolution, in_channels=7, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                num_class_embeds=1000)
    low_res = ddpm_scheduler()
    low_res.register_to_config(clip_sample=False)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear",
                          prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    hi, _ = _pretrain_images({"num_subjects": 24, "images_per_subject": 2}, resolution)
    lo = torch.nn.functional.interpolate(hi, size=(resolution // 4,) * 2, mode="bicubic", antialias=True).clamp(-1, 1)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    bs = int(p["batch_size"])
    log: dict[str, Any] = {}

    def vae_loss() -> torch.Tensor:
        batch = hi[torch.randint(0, len(hi), (bs,), generator=gen)]
        post = vae.encode(batch).latent_dist
        return torch.nn.functional.mse_loss(vae.decode(post.sample(generator=gen)).sample, batch) + 1e-6 * post.kl().mean()

    vae.train()
    log["vae_losses"] = _adamw_steps(vae.parameters(), int(p["vae_steps"]), float(p["lr"]), vae_loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(hi).latent_dist.mean * vae.config.scaling_factor
        empty = encode_prompt_ids(tokenizer, text_encoder, [""]).detach()

    def unet_loss() -> torch.Tensor:
        idx = torch.randint(0, len(hi), (bs,), generator=gen)
        level = torch.randint(0, UPSCALER_NOISE_LEVELS + 1, (bs,), generator=gen)
        cond = low_res.add_noise(lo[idx], torch.randn(lo[idx].shape, generator=gen), level)
        t = torch.randint(0, 1000, (bs,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        inp = torch.cat([sched.add_noise(latents[idx], noise, t), cond], dim=1)
        pred = unet(inp, t, empty.expand(bs, -1, -1), class_labels=level).sample
        return torch.nn.functional.mse_loss(pred, noise)

    unet.train()
    log["unet_losses"] = _adamw_steps(unet.parameters(), int(p["unet_steps"]), float(p["lr"]), unet_loss)
    unet.eval()
    vae.requires_grad_(True)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=sched, max_noise_level=UPSCALER_NOISE_LEVELS)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for f in (out_dir / "_tokenizer_src").iterdir():
        f.unlink()
    (out_dir / "_tokenizer_src").rmdir()
    return log


def encode_prompt_ids(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def prepare_purifier(variant: str, out_dir: Path, seed: int, resolution: int,
                     pretrain: dict[str, Any] | None = None) -> None:
    """Build built-in purifier ``variant`` ("ddpm": ``UNet2DModel`` + ``DDPMScheduler`` at ``resolution`` px;
    "upscaler": a 4x ``StableDiffusionUpscalePipeline`` for ``resolution`` px inputs) with seeded random weights,
    pre-train it for seconds (``PURIFIER_PRETRAIN``, or ``pretrain`` overrides) and save it as a diffusers folder
    (safetensors) in ``out_dir``. Same arguments -> same weight bytes (CPU)."""
    if variant not in PURIFIER_VARIANTS:
        raise ModelUnavailable(f"unknown purifier model {variant!r}; known: {', '.join(PURIFIER_VARIANTS)}")
    p = {**PURIFIER_PRETRAIN[variant], **(pretrain or {})}
    out_dir = Path(out_dir)
    start = time.perf_counter()
    build = _prepare_ddpm if variant == "ddpm" else _prepare_upscaler
    log = build(out_dir, seed, resolution, p)
    log.update(variant=variant, seed=seed, resolution=resolution, pretrain=p, wall_s=round(time.perf_counter() - start, 1))
    (out_dir / "pretrain_log.json").write_text(json.dumps(log, indent=1))


# ----------------------------------------------------------------------------------------------- resolving

_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _fetch_hint(ref: str) -> str:
    return (f"fetch it on a machine with internet access: huggingface-cli download {ref} "
            f"--include \"*.json\" \"*.txt\" \"*.safetensors\" (then copy the Hugging Face cache here), "
            f"or point the profile at a local diffusers folder")


def resolve_model(ref: str, allow_unsafe: bool = False) -> Path:
    """A local diffusers folder, or the cached snapshot of Hugging Face id ``ref``. Never downloads unless the
    environment variable ``BENCH_ALLOW_DOWNLOAD=1`` is set. Raises ModelUnavailable with the fetch command."""
    if builtin_family(ref):
        raise ModelUnavailable(f"{ref!r} is built, not resolved: use bench.models.prepare_builtin")
    local = Path(ref).expanduser()
    if local.is_dir():
        return local.resolve()
    if ref.startswith((".", "/", "~")) or not _HF_ID.match(ref):
        raise ModelUnavailable(f"model {ref!r}: no such folder, and not a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download

    allow_download = os.environ.get("BENCH_ALLOW_DOWNLOAD") == "1"
    patterns = HF_ALLOW_PATTERNS + (HF_UNSAFE_PATTERNS if allow_unsafe else [])
    try:
        path = snapshot_download(ref, local_files_only=not allow_download, allow_patterns=patterns,
                                 ignore_patterns=HF_IGNORE_PATTERNS)
    except Exception as e:  # huggingface_hub raises several types for "not cached" / "offline"
        raise ModelUnavailable(f"model {ref!r} is not in the local Hugging Face cache "
                               f"({type(e).__name__}); {_fetch_hint(ref)}") from None
    return Path(path)


def _model_index(model_dir: Path) -> dict[str, Any]:
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise ModelUnavailable(f"{index}: missing; {model_dir} is not a diffusers model folder")
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelUnavailable(f"{index}: invalid JSON ({e})") from None


def _components(model_dir: Path) -> dict[str, tuple[str, str]]:
    """Component folder -> (library, class) from model_index.json (null entries dropped)."""
    out = {}
    for name, value in _model_index(model_dir).items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        out[name] = (value[0], value[1])
    return out


def check_safe(model_dir: Path, allow_unsafe: bool) -> None:
    """Refuse pickled weights and remote code: every weight-bearing component folder (one with a config.json)
    must hold .safetensors weights; one with only .bin/.ckpt/.pt/.pth raises UnsafeWeights naming the file unless
    ``allow_unsafe``. Components from libraries other than diffusers/transformers (custom code) are refused."""
    model_dir = Path(model_dir)
    for name, (library, cls) in _components(model_dir).items():
        if library not in SAFE_LIBRARIES:
            raise UnsafeWeights(f"{model_dir / 'model_index.json'}: component {name!r} uses {library}.{cls}; "
                                f"only diffusers/transformers classes are loaded (no remote code)")
        folder = model_dir / name
        if not (folder / "config.json").is_file():
            continue  # tokenizer, scheduler, feature extractor: no weights
        if any(folder.glob("*.safetensors")):
            continue
        pickled = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if not pickled:
            raise ModelUnavailable(f"{folder}: no weights (.safetensors) found")
        if not allow_unsafe:
            raise UnsafeWeights(f"{pickled[0]}: pickled weights can run code when loaded and {folder} has no "
                                f".safetensors; convert it, or allow unsafe weights explicitly")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers/transformers load by default (no ``.fp16``-style variant infix)."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.stem]
    return plain or files


def weight_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of the unet, vae and text_encoder safetensors weights (MODELS.md: identity by content). One file:
    its sha256; sharded: the sha256 of the sorted "name sha256" lines of its shards."""
    out = {}
    for comp in WEIGHT_COMPONENTS:
        files = _weight_files(Path(model_dir) / comp)
        if not files:
            continue
        if len(files) == 1:
            out[comp] = file_sha256(files[0])
        else:
            lines = "\n".join(f"{f.name} {file_sha256(f)}" for f in files)
            out[comp] = hashlib.sha256(lines.encode()).hexdigest()
    return out


# ----------------------------------------------------------------------------------------------- loading

@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_components(model_dir: Path, device: str = "cpu", dtype: "torch.dtype | None" = None,
                    allow_unsafe: bool = False) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and the training DDPMScheduler of a local diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    dtype = torch.float32 if dtype is None else dtype
    check_safe(model_dir, allow_unsafe)
    kw = {"use_safetensors": None if allow_unsafe else True, "local_files_only": True}
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=dtype, **kw).to(device),
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype, **kw).to(device),
        unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype, **kw).to(device),
        noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", local_files_only=True),
    )


SAMPLERS = ("default", "ddim", "pndm", "dpm-solver++", "ddpm", "euler")


def set_sampler(pipe, sampler: str):
    """Replace ``pipe.scheduler`` by ``sampler`` built from the model's own scheduler config; returns ``pipe``."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           PNDMScheduler)

    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    if sampler == "default":
        return pipe
    if sampler == "dpm-solver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    elif sampler in classes:
        pipe.scheduler = classes[sampler].from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    return pipe


def load_pipeline(model_dir: Path, device: str, sampler: str = "default", allow_unsafe: bool = False,
                  unet=None, text_encoder=None):
    """A ``StableDiffusionPipeline`` from a local folder (safety checker off, progress bar off), with ``sampler``
    and optionally a replacement UNet / text encoder (a personalised one)."""
    from diffusers import StableDiffusionPipeline

    model_dir = Path(model_dir)
    check_safe(model_dir, allow_unsafe)
    swaps = {k: m for k, m in (("unet", unet), ("text_encoder", text_encoder)) if m is not None}
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=None if allow_unsafe else True,
                                                   local_files_only=True, **swaps)
    set_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index``: fixed whatever the batch size."""
    return seed + 1000 * prompt_index + image_index


def generate(pipe, prompts: list[str], n_per_prompt: int, steps: int, guidance: float, seed: int, resolution: int,
             batch_size: int = 4) -> list[tuple[str, np.ndarray]]:
    """``n_per_prompt`` images per prompt (uint8 HxWx3, ``resolution`` px), image j of prompt i drawn from
    ``torch.Generator("cpu").manual_seed(seed + 1000*i + j)``; returns (prompt, image) pairs in prompt order."""
    jobs = [(p, image_seed(seed, i, j)) for i, p in enumerate(prompts) for j in range(n_per_prompt)]
    pipe.set_progress_bar_config(disable=True)
    out: list[tuple[str, np.ndarray]] = []
    for start in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[start:start + max(1, batch_size)]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        with torch.no_grad():
            images = pipe(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          height=resolution, width=resolution, generator=gens, output_type="pil").images
        out.extend((p, np.asarray(img.convert("RGB"), dtype=np.uint8)) for (p, _), img in zip(chunk, images))
    return out
