"""Anti-DreamBooth (Van Le et al., ICCV 2023; VinAIResearch/Anti-DreamBooth @30b3537) as ``perturb`` defenses:
FSMG, ASPL, their targeted (T-FSMG, T-ASPL) and ensemble (E-FSMG, E-ASPL) variants, and ASPL-LoRA
(METHODS.md 0, 1.2-1.6).

Units: ``eps`` and ``alpha`` are /255 pixel units (defaults 6.375 and 0.6375 = the reference's 0.05 and 5e-3 in
[-1, 1]); PGD runs in [-1, 1] tensor space (``defenses.pgd``) and saving clips to floor(eps), i.e. <= 6/255.

PGD loss (METHODS.md 1.2): z0 = VAE posterior sample x scaling factor, one t ~ U{0..T-1} and eps ~ N(0, I) per image,
MSE of the UNet output against eps (or the velocity), prompt "a photo of {identifier} {class_noun}"; signed ascent
on all set_B images jointly; no prior term. Targeted variants subtract MSE(x_hat_{t-1}, add_noise(z_tgt, eps, t-1))
with x_hat_{t-1} = ``DDPMScheduler.step(eps_pred, t, z_t).prev_sample`` (stochastic for t > 0).

Where this code departs from the reference scripts (same algorithm, documented, each quirk an explicit option):
- every random draw comes from CPU generators seeded from ``ctx.seed``: same seed, same bytes (CPU);
- memory (the reference needs 32-40 GB, METHODS.md 7): ONE surrogate module is trained in place on clean data and
  restored from a weight snapshot afterwards (the reference deep-copies UNet + text encoder up to 3 times per round);
  parameter gradients are off during PGD; prompt embeddings are encoded once whenever the text encoder is frozen;
  options ``gradient_checkpointing``, ``mixed_precision``, ``use_8bit_adam``, ``pgd_batch_size``, ``offload_idle_models``,
  ``snapshot_device`` and the LoRA surrogate (``aspl-lora``). ``LoopOptions`` re-enables the reference's deep copies
  and per-step prompt encoding for verification: tests show both give the same bytes;
- gradient clipping clips: aspl.py hands an already-consumed ``itertools.chain`` to ``clip_grad_norm_`` (a no-op);
  ``max_grad_norm=0`` reproduces that;
- aspl.py casts UNet, text encoder and VAE to bf16 and trains the bf16 weights (``mixed_precision="bf16-weights"``);
  with lr 5e-7 nearly every AdamW update is below bf16 resolution there, so the default is bf16 autocast over fp32
  weights (on CUDA, and on CPUs with bf16 instructions: bench/precision.py; the label is recorded);
- the surrogate trains on all images in turn (paper) instead of only instance images 0, 1, 2
  (``quirk_first_three_images``), and at t = 0 the target term is the distance to the clean target latent z_tgt
  (paper) instead of reading ``alphas_cumprod[-1]`` (``quirk_t_minus_one_wraps``).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

from bench import models as bench_models
from bench.diffusion import LatentCache, adamw, denoising_loss, encode_prompt, to_tensor
from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.precision import Precision, precision_for
from bench.profiles import PROXY_CLASS_IMAGES, PROXY_FINETUNE
from bench.registry import Requirements
from defenses.pgd import pgd_step, save_within_budget

PAPER = "Van Le et al., Anti-DreamBooth, ICCV 2023 (arXiv 2303.15433); VinAIResearch/Anti-DreamBooth @30b3537"
LORA_PAPER = "Anti-DreamBooth attacks/aspl_lora.py @1b0e363 (PR #29/#30), METHODS.md 1.6"
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # METHODS.md 1.6
GEN_OFFSET = 77_000  # generator offset of the defense's own draws (class images use CLASS_IMAGE_SEED_OFFSET)
TARGET_CELLS = 8  # built-in target: an 8 x 8 checkerboard


# ----------------------------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class _Common:
    """Shared by every variant. Budgets in /255 pixel units."""

    eps: float = 6.375  # --pgd_eps=5e-2 in [-1, 1] (METHODS.md 0)
    alpha: float = 0.6375  # --pgd_alpha=5e-3 in [-1, 1]
    identifier: str = "sks"
    instance_prompt: str = "a photo of {identifier} {class_noun}"  # "a photo of sks person"
    class_prompt: str = "a photo of {class_noun}"  # "a photo of person"
    learning_rate: float = 5e-7  # surrogate / reference-model training (METHODS.md 1.4, 1.7)
    train_text_encoder: bool = True  # --train_text_encoder
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 200  # generated from the surrogate model with attacks.dreambooth.generate_class_images
    class_sampler: str = "default"  # the pipeline's default sampler, 50 steps, CFG 7.5 (issue #23)
    class_steps: int = 50
    class_guidance: float = 7.5
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping (what aspl.py effectively does, see the module docstring)
    mixed_precision: Literal["no", "bf16", "fp16", "bf16-weights"] = "bf16"  # autocast: CUDA, bf16 CPUs (bench/precision.py)
    gradient_checkpointing: bool = False
    pgd_batch_size: int = 0  # images per PGD forward/backward; 0 = all jointly (same result, less activation memory)
    target_image: str = ""  # targeted variants only: path; "" = built-in checkerboard (see builtin_target)
    quirk_t_minus_one_wraps: bool = False  # reference: at t = 0 the target term reads alphas_cumprod[-1]

    def validate(self) -> None:
        if not 0 < self.eps <= 255 or not 0 < self.alpha <= 255:
            raise ValueError(f"eps and alpha must be in (0, 255] (/255 pixel units), got {self.eps}, {self.alpha}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.with_prior_preservation and self.num_class_images < 1:
            raise ValueError("num_class_images must be >= 1 with prior preservation")
        if self.max_grad_norm < 0 or self.pgd_batch_size < 0:
            raise ValueError(f"max_grad_norm and pgd_batch_size must be >= 0, got {self.max_grad_norm}, {self.pgd_batch_size}")
        for name in ("instance_prompt", "class_prompt"):
            try:
                getattr(self, name).format(identifier="x", class_noun="y")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{name}: only {{identifier}} and {{class_noun}} may be used ({e})") from None
        if self.target_image and not Path(self.target_image).expanduser().is_file():
            raise ValueError(f"target_image: {self.target_image}: no such file")


@dataclass(frozen=True)
class FSMGParams(_Common):
    """FSMG (METHODS.md 1.3): a clean DreamBooth reference model on set_A, then PGD against it."""

    rounds: int = 1  # E-FSMG: outer steps, each running ``pgd_steps`` per model then averaging
    pgd_steps: int = 100  # --max_train_steps=100 in attacks/fsmg.py
    reference_steps: int = 1000  # the attacker's DreamBooth on set_A (METHODS.md 1.7), checkpoint-1000
    reference_batch_size: int = 2

    def validate(self) -> None:
        super().validate()
        if min(self.rounds, self.pgd_steps, self.reference_steps, self.reference_batch_size) < 1:
            raise ValueError("rounds, pgd_steps, reference_steps and reference_batch_size must be >= 1")
        if self.mixed_precision == "bf16-weights":
            raise ValueError("mixed_precision 'bf16-weights' is aspl.py's mode; FSMG's reference model trains with "
                             "fp32 weights (use 'bf16': autocast)")


@dataclass(frozen=True)
class ASPLParams(_Common):
    """ASPL (METHODS.md 1.4): rounds x [surrogate on clean set_A, PGD on set_B, persistent model on perturbed set_B]."""

    rounds: int = 50  # --max_train_steps=50
    surrogate_steps: int = 3  # --max_f_train_steps=3 (clean data)
    pgd_steps: int = 6  # --max_adv_train_steps=6
    train_steps: int = 3  # --max_f_train_steps=3 (perturbed data)
    quirk_first_three_images: bool = False  # reference: train_dataset[step % 200] -> instance images 0, 1, 2 only
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (CUDA); error when bitsandbytes is not importable
    snapshot_device: Literal["cpu", "same"] = "cpu"  # where the persistent weights wait while the surrogate trains
    lora_surrogate: bool = False  # peft LoRA on the UNet attention (METHODS.md 1.6), text encoder frozen
    lora_rank: int = 4
    restore_surrogate: bool = True  # False: clean-data steps stay in the persistent model (aspl_lora.py does this)

    def validate(self) -> None:
        super().validate()
        if min(self.rounds, self.pgd_steps) < 1 or min(self.surrogate_steps, self.train_steps) < 0:
            raise ValueError("rounds and pgd_steps must be >= 1, surrogate_steps and train_steps >= 0")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes; CUDA only)")


@dataclass(frozen=True)
class _EnsembleFields:
    models: tuple[str, ...] = ("sd14", "sd15", "sd21")  # profile roles (or model references)
    ensemble: Literal["images", "gradients"] = "images"  # paper: average the per-model images
    offload_idle_models: bool = False  # keep models not in use on the CPU (images mode)


@dataclass(frozen=True)
class EFSMGParams(FSMGParams, _EnsembleFields):
    rounds: int = 60  # attacks/ensemble_fsmg.py --max_train_steps=60
    pgd_steps: int = 12  # --max_adv_train_steps=12 per model

    def validate(self) -> None:
        super().validate()
        _check_models(self.models)


@dataclass(frozen=True)
class EASPLParams(ASPLParams, _EnsembleFields):
    def validate(self) -> None:
        super().validate()
        _check_models(self.models)


@dataclass(frozen=True)
class ASPLLoRAParams(ASPLParams):
    """aspl_lora.py defaults (METHODS.md 1.6): lr 5e-6, 20 x (10, 10, 10), pgd_alpha 1/255 in [-1, 1], rank 4."""

    learning_rate: float = 5e-6
    rounds: int = 20
    surrogate_steps: int = 10
    pgd_steps: int = 10
    train_steps: int = 10
    alpha: float = 0.5  # 1/255 in [-1, 1] = 0.5 /255 pixel units
    lora_surrogate: bool = True


def _check_models(roles: tuple[str, ...]) -> None:
    if len(roles) < 1 or len(set(roles)) != len(roles):
        raise ValueError(f"models must be distinct model roles, got {list(roles)}")


_TINY = {"num_class_images": 4, "class_sampler": "ddim", "class_steps": 10, "class_guidance": 3.0,
         "mixed_precision": "no", "learning_rate": 3e-4}
_TINY_FSMG = {**_TINY, "reference_steps": 40, "pgd_steps": 20}
_TINY_ASPL = {**_TINY, "rounds": 5}
_ENSEMBLE_TINY = {"models": ("default", "mismatch")}
# Proxy: the paper's schedules (rounds, PGD steps, eps, alpha) with the proxy attacker's fine-tuning settings; FSMG's
# reference model is trained like the proxy attacker (its step count, not the paper's 1000).
_PROXY = {**PROXY_FINETUNE, **PROXY_CLASS_IMAGES}
_PROXY_FSMG = {**_PROXY, "reference_steps": 200}


# ----------------------------------------------------------------------------------------------- loop pieces

@dataclass(frozen=True)
class LoopOptions:
    """How the loop is executed, not what it computes (hence not a parameter): ``NAIVE`` is the reference's way
    (deep-copied surrogate each round, prompts encoded at every step, parameter gradients kept during PGD);
    tests/test_anti_dreambooth.py checks that it gives the same bytes as the default."""

    surrogate_copy: Literal["restore", "deepcopy"] = "restore"
    cache_prompts: bool = True
    freeze_params_in_pgd: bool = True


NAIVE = LoopOptions(surrogate_copy="deepcopy", cache_prompts=False, freeze_params_in_pgd=False)


@dataclass
class _Model:
    """One surrogate model (persistent weights) with what its loop needs: caches of its own VAE latents and prompts."""

    role: str
    comps: bench_models.SDComponents
    lora: bool
    train_te: bool
    trainable: list[torch.nn.Parameter]
    instance_prompt: str
    class_prompt: str
    clean: LatentCache | None = None  # set_A posteriors (ASPL surrogate data)
    classes: LatentCache | None = None  # prior-preservation images
    target: torch.Tensor | None = None  # z_tgt (1 x C x h x w), targeted variants
    frozen_emb: torch.Tensor | None = None  # [instance, class] embeddings when the text encoder is frozen
    counters: dict[str, int] = field(default_factory=dict)  # position of each training schedule (paper cycling)

    @property
    def device(self) -> torch.device:
        return next(self.comps.unet.parameters()).device


def _trainable(comps: bench_models.SDComponents, lora: bool, train_te: bool) -> list[torch.nn.Parameter]:
    params = [t for t in comps.unet.parameters() if t.requires_grad] if lora else list(comps.unet.parameters())
    return params + (list(comps.text_encoder.parameters()) if train_te else [])


def _load_model(role: str, model_dir: Path, ctx: RunContext, p: _Common, subject, prec: Precision,
                lora: bool, device: str) -> _Model:
    """Components of ``model_dir`` on ``device``: VAE frozen; UNet (or its LoRA adapters) and, when trained, the text
    encoder trainable; LoRA initialised from ``ctx.seed`` (peft draws from the global RNG)."""
    comps = bench_models.load_components(model_dir, device, allow_unsafe=ctx.allow_unsafe_weights)
    comps.vae.requires_grad_(False)
    comps.vae.eval()
    train_te = bool(p.train_text_encoder) and not lora
    comps.text_encoder.requires_grad_(train_te)
    if lora:
        from peft import LoraConfig

        comps.unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            comps.unet.add_adapter(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_rank, init_lora_weights="gaussian",
                                              target_modules=list(UNET_LORA_TARGETS)))
    else:
        comps.unet.requires_grad_(True)
    if prec.dtype != torch.float32:
        for m in (comps.unet, comps.text_encoder, comps.vae):
            m.to(dtype=prec.dtype)
    if p.gradient_checkpointing:  # the VAE too: PGD back-propagates through its encoder to the pixels
        comps.unet.enable_gradient_checkpointing()
        comps.vae.enable_gradient_checkpointing()
        if train_te:  # transformers 5 renamed gradient_checkpointing_enable
            te = comps.text_encoder
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    comps.unet.train()  # as the reference; SD and the tiny models have no dropout, so train/eval give the same math
    comps.text_encoder.train(train_te)
    fmt = _fmt(p, subject)
    return _Model(role, comps, lora, train_te, _trainable(comps, lora, train_te),
                  p.instance_prompt.format(**fmt), p.class_prompt.format(**fmt))


def _fmt(p: _Common, subject) -> dict[str, str]:
    return {"identifier": p.identifier, "class_noun": subject.class_noun}


def _encode(m: _Model, prompts: list[str]) -> torch.Tensor:
    return encode_prompt(m.comps.tokenizer, m.comps.text_encoder, prompts)


def _frozen_embeddings(m: _Model) -> torch.Tensor:
    with torch.no_grad():
        return _encode(m, [m.instance_prompt, m.class_prompt]).detach()


def _latent_shape(vae, n: int, resolution: int) -> tuple[int, ...]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (n, int(vae.config.latent_channels), resolution // factor, resolution // factor)


def builtin_target(resolution: int) -> np.ndarray:
    """The default target of the targeted variants: an 8 x 8 black/white checkerboard (uint8 HxWx3), a high-contrast
    pattern standing in for Anti-DreamBooth's ``data/target.jpg`` (set ``target_image`` to use that file)."""
    cells = (np.arange(resolution) * TARGET_CELLS // resolution)
    board = ((cells[:, None] + cells[None, :]) % 2).astype(np.uint8) * 255
    return np.repeat(board[:, :, None], 3, axis=2)


def load_target(path: str, resolution: int) -> np.ndarray:
    """``path`` fitted to ``resolution`` (bench.images.fit), or ``builtin_target`` when ``path`` is empty."""
    if not path:
        return builtin_target(resolution)
    from bench.images import fit, load_image

    return fit(load_image(Path(path).expanduser()), resolution)


def target_at_t_minus_one(noise_scheduler, z_tgt: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                          wraps: bool) -> torch.Tensor:
    """x_{t-1}^tgt = add_noise(z_tgt, eps, t - 1). At t = 0 the paper's x_{-1} is the clean target latent z_tgt
    (``wraps=False``); the reference indexes ``alphas_cumprod[-1]`` there, i.e. nearly pure noise (``wraps=True``)."""
    if wraps:
        return noise_scheduler.add_noise(z_tgt, noise, t - 1)
    noisy = noise_scheduler.add_noise(z_tgt, noise, (t - 1).clamp(min=0))
    at_zero = (t == 0).view(-1, *([1] * (z_tgt.ndim - 1)))
    return torch.where(at_zero, z_tgt.to(noisy.dtype), noisy)


def training_schedule(counters: dict[str, int], purpose: str, steps: int, n_instance: int, n_class: int,
                      quirk_first_three: bool) -> list[tuple[int, int]]:
    """(instance index, class index or -1) of each step of one training call (batch = 1 instance + 1 class image).
    Paper: cycle through all images, continuing where the previous call of the same ``purpose`` stopped. Quirk
    (aspl.py): ``train_dataset[step % len]`` with len = max(n_class, n_instance), restarted at every call."""
    out = []
    for step in range(steps):
        if quirk_first_three:
            k = step % max(n_class, n_instance)
        else:
            k = counters.get(purpose, 0)
            counters[purpose] = k + 1
        out.append((k % n_instance, k % n_class if n_class else -1))
    return out


def _snapshot(params: list[torch.nn.Parameter], where: str) -> list[torch.Tensor]:
    device = torch.device("cpu") if where == "cpu" else None
    return [t.detach().to(device or t.device, copy=True) for t in params]


def _restore(params: list[torch.nn.Parameter], snap: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(params, snap):
            t.copy_(s)


def _deepcopy_model(m: _Model) -> _Model:
    """The reference's surrogate: a deep copy of UNet and text encoder (VAE, tokenizer, scheduler shared)."""
    comps = dataclasses.replace(m.comps, unet=copy.deepcopy(m.comps.unet), text_encoder=copy.deepcopy(m.comps.text_encoder))
    return dataclasses.replace(m, comps=comps, trainable=_trainable(comps, m.lora, m.train_te))


def _optimizer(params: list[torch.nn.Parameter], p: _Common):
    """A fresh AdamW per training call, as train_one_epoch (states do not survive between calls)."""
    kw = {"lr": p.learning_rate, "betas": tuple(p.adam_betas), "weight_decay": p.weight_decay, "eps": p.adam_epsilon}
    if getattr(p, "use_8bit_adam", False):
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError(f"use_8bit_adam: cannot import bitsandbytes ({e}); pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kw)
    return adamw(params, **kw)


# ----------------------------------------------------------------------------------------------- the engine

class _Engine:
    """Training steps and PGD shared by every variant; ``trace`` records each step for tests and ``ctx.extra``."""

    def __init__(self, p: _Common, ctx: RunContext, prec: Precision, opts: LoopOptions, targeted: bool) -> None:
        self.p, self.ctx, self.prec, self.opts, self.targeted = p, ctx, prec, opts, targeted
        self.gen = ctx.torch_generator(GEN_OFFSET)
        self.trace: list[tuple] = []
        self.losses: list[float] = []

    # ------------------------------------------------------------------ training (train_one_epoch)
    def _train_embeddings(self, m: _Model) -> torch.Tensor:
        if m.frozen_emb is not None and self.opts.cache_prompts:
            return m.frozen_emb
        with torch.set_grad_enabled(m.train_te):
            return _encode(m, [m.instance_prompt, m.class_prompt])

    def train(self, m: _Model, data: LatentCache, steps: int, purpose: str) -> None:
        """``steps`` AdamW steps, each on 1 image of ``data`` + 1 class image: instance MSE + w * prior MSE."""
        p = self.p
        n_class = len(m.classes) if (p.with_prior_preservation and m.classes is not None) else 0
        schedule = training_schedule(m.counters, purpose, steps, len(data), n_class,
                                     bool(getattr(p, "quirk_first_three_images", False)))
        if not schedule:
            return
        opt = _optimizer(m.trainable, p)
        dtype = next(m.comps.unet.parameters()).dtype
        for i, j in schedule:
            latents = data.sample([i], self.gen)
            if j >= 0:
                latents = torch.cat([latents, m.classes.sample([j], self.gen)])
            with self.prec.autocast():
                emb = self._train_embeddings(m)[:len(latents)]
                _, per = denoising_loss(m.comps.unet, m.comps.noise_scheduler, latents.to(dtype), emb, self.gen,
                                        per_sample=True)
            loss = per[0] + (p.prior_loss_weight * per[1] if j >= 0 else 0.0)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{purpose} training of model {m.role!r}: loss is {float(loss)}; "
                                         f"lower learning_rate ({p.learning_rate})")
            scaler = self.prec.scaler
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if p.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(m.trainable, p.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            self.trace.append((f"{purpose}_step", m.role, i, j))

    # ------------------------------------------------------------------ surrogate copy / restore
    def begin_surrogate(self, m: _Model, restore: bool = True) -> tuple[_Model, list[torch.Tensor] | None]:
        """Train a surrogate on clean set_A from ``m``'s current weights: in place after a snapshot (default) or on a
        deep copy (``LoopOptions.surrogate_copy="deepcopy"``, the reference); ``restore=False`` trains ``m`` itself."""
        snap = None
        if not restore:
            sur = m
        elif self.opts.surrogate_copy == "deepcopy":
            sur = _deepcopy_model(m)
            self.trace.append(("copy", m.role))
        else:
            snap = _snapshot(m.trainable, getattr(self.p, "snapshot_device", "cpu"))
            sur = m
            self.trace.append(("snapshot", m.role))
        self.train(sur, m.clean, getattr(self.p, "surrogate_steps", 0), "surrogate")
        return sur, snap

    def end_surrogate(self, m: _Model, sur: _Model, snap: list[torch.Tensor] | None) -> None:
        if snap is not None:
            _restore(m.trainable, snap)
            for t in m.trainable:
                t.grad = None
            self.trace.append(("restore", m.role))
        elif sur is not m:
            del sur

    # ------------------------------------------------------------------ PGD (pgd_attack)
    def _pgd_embedding(self, m: _Model) -> torch.Tensor:
        if m.frozen_emb is not None:
            return m.frozen_emb[:1]
        with torch.no_grad():
            return _encode(m, [m.instance_prompt]).detach()

    def draw_timesteps(self, noise_scheduler, n: int) -> torch.Tensor:
        """PGD timesteps, one per image: t ~ U{0..T-1} (SimAC overrides: t from each image's selected set)."""
        return torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=self.gen)

    def extra_loss(self, m: _Model, sl: slice, n: int, noise: torch.Tensor, t: torch.Tensor,
                   emb: torch.Tensor) -> torch.Tensor | None:
        """A term added to the PGD loss of images ``sl`` right after the UNet call (None: none; SimAC's features)."""
        return None

    def input_gradient(self, m: _Model, x: torch.Tensor, emb: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """d L / d x for the METHODS.md 1.2 loss (mean over images), computed ``pgd_batch_size`` images at a time
        with every draw (VAE sample, t, eps, DDPM variance noise) taken in image order from one generator."""
        c, p, n = m.comps, self.p, len(x)
        vae_eps = torch.randn(_latent_shape(c.vae, n, x.shape[-1]), generator=self.gen)
        t_all = self.draw_timesteps(c.noise_scheduler, n)
        noise_all = torch.randn(vae_eps.shape, generator=self.gen)
        chunk = p.pgd_batch_size or n
        grad = torch.zeros_like(x)
        total = 0.0
        dtype = next(c.vae.parameters()).dtype
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            xs = x[sl].detach().clone().requires_grad_(True)
            t = t_all[sl].to(x.device)
            noise = noise_all[sl].to(x.device, dtype)
            with self.prec.autocast():
                dist = c.vae.encode(xs.to(dtype)).latent_dist
                z0 = (dist.mean + dist.std * vae_eps[sl].to(x.device, dist.mean.dtype)) * c.vae.config.scaling_factor
                zt = c.noise_scheduler.add_noise(z0, noise, t)
                e = emb if emb is not None else _encode(m, [m.instance_prompt])
                pred = c.unet(zt, t, e.expand(len(xs), -1, -1)).sample
            kind = c.noise_scheduler.config.prediction_type
            if kind == "epsilon":
                target = noise
            elif kind == "v_prediction":
                target = c.noise_scheduler.get_velocity(z0, noise, t)
            else:
                raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config")
            per_elem = pred[0].numel()
            loss = F.mse_loss(pred.float(), target.float(), reduction="sum") / (n * per_elem)
            extra = self.extra_loss(m, sl, n, noise, t, e)
            if extra is not None:
                loss = loss + extra
            if self.targeted:
                prev = torch.cat([c.noise_scheduler.step(pred[k:k + 1], int(t[k]), zt[k:k + 1], generator=self.gen).prev_sample
                                  for k in range(len(xs))])
                tgt = target_at_t_minus_one(c.noise_scheduler, m.target.expand(len(xs), -1, -1, -1).to(noise.dtype),
                                            noise, t, bool(p.quirk_t_minus_one_wraps))
                loss = loss - F.mse_loss(prev.float(), tgt.float(), reduction="sum") / (n * per_elem)
            if self.opts.freeze_params_in_pgd:
                (g,) = torch.autograd.grad(loss, xs)
            else:  # the reference: backward into the parameters too, then discard their gradients
                loss.backward()
                g = xs.grad
                for q in m.trainable:
                    q.grad = None
            grad[sl] = g.to(grad.dtype)
            total += float(loss.detach())
        return grad, total

    def pgd(self, ms: list[_Model], x: torch.Tensor, x0: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` signed ascent steps against the models in ``ms`` (several: their gradients averaged)."""
        frozen: list[tuple[torch.nn.Parameter, bool]] = []
        if self.opts.freeze_params_in_pgd:
            frozen = [(q, q.requires_grad) for m in ms for q in m.trainable]
            for q, _ in frozen:
                q.requires_grad_(False)
        try:
            embs = [self._pgd_embedding(m) if self.opts.cache_prompts else None for m in ms]
            for _ in range(steps):
                grad = torch.zeros_like(x)
                loss = 0.0
                for m, emb in zip(ms, embs):
                    g, value = self.input_gradient(m, x, emb)
                    grad += g / len(ms)
                    loss += value / len(ms)
                x = pgd_step(x, x0, grad, self.p.alpha, self.p.eps, ascend=True)
                self.losses.append(loss)
                self.trace.append(("pgd_step", ",".join(m.role for m in ms)))
        finally:
            for q, flag in frozen:
                q.requires_grad_(flag)
        return x


def _move(m: _Model, device: str) -> None:
    for mod in (m.comps.unet, m.comps.text_encoder, m.comps.vae):
        mod.to(device)


# ----------------------------------------------------------------------------------------------- plug-ins

class _AntiDreamBooth(Defense):
    """Shared set-up: models, class images, latent caches, target latents, ``ctx.extra`` records."""

    needs_model: ClassVar[bool] = True
    targeted: ClassVar[bool] = False
    ensemble_kind: ClassVar[bool] = False
    # paper profile with the default options (fp32 weights + bf16 autocast), estimated by benchmarks/aspl_memory.py;
    # 16 GB with gradient_checkpointing + pgd_batch_size 1 + use_8bit_adam (12.9 GB) or the LoRA surrogate (6.4 GB)
    requires = Requirements(white_box=True, gpu_memory_gb=24.0)
    paper = PAPER

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.loop_options = LoopOptions()
        self.trace: list[tuple] = []
        self.models: list[_Model] = []  # the loaded models of the last run (tests inspect them)

    def model_roles(self) -> tuple[str, ...]:
        return tuple(self.params.models) if self.ensemble_kind else ("default",)

    def _roles(self, ctx: RunContext, model_dir: Path | None) -> list[tuple[str, Path]]:
        roles = self.model_roles()
        if not self.ensemble_kind:
            if model_dir is None:
                raise ValueError(f"defense {self.name}: needs a surrogate model, got none")
            return [(roles[0], Path(model_dir))]
        missing = [r for r in roles if r not in ctx.models]
        if missing:
            raise ValueError(f"defense {self.name}: model role(s) {missing} not in ctx.models "
                             f"(have {sorted(ctx.models)}); the profile must define them")
        return [(r, Path(ctx.models[r])) for r in roles]

    def _class_images(self, ctx: RunContext, model_dir: Path, prompt: str) -> list[Image]:
        p = self.params
        if not p.with_prior_preservation:
            return []
        from attacks.dreambooth import generate_class_images

        return generate_class_images(model_dir, prompt, p.num_class_images, ctx, p.class_sampler, p.class_steps,
                                     p.class_guidance)

    def _prepare(self, ctx: RunContext, engine: _Engine, role: str, model_dir: Path, subject, clean_a: list[Image],
                 device: str, lora: bool = False, class_images: list[Image] | None = None) -> _Model:
        p = self.params
        m = _load_model(role, model_dir, ctx, p, subject, engine.prec, lora, device)
        if class_images is None:
            class_images = self._class_images(ctx, model_dir, m.class_prompt)
        dtype = next(m.comps.vae.parameters()).dtype
        m.classes = LatentCache(m.comps.vae, to_tensor(class_images).to(dtype)) if class_images else None
        m.clean = LatentCache(m.comps.vae, to_tensor(clean_a).to(dtype)) if clean_a else None
        if not m.train_te:
            m.frozen_emb = _frozen_embeddings(m)
        if self.targeted:
            tgt = to_tensor([load_target(p.target_image, ctx.resolution)]).to(m.device, dtype)
            with torch.no_grad():
                m.target = m.comps.vae.encode(tgt).latent_dist.sample(generator=engine.gen) * m.comps.vae.config.scaling_factor
        return m

    def _record(self, ctx: RunContext, engine: _Engine, out: list[Image], clean: list[Image], wall: float) -> None:
        p = self.params
        counts: dict[str, int] = {}
        for ev in engine.trace:
            counts[ev[0]] = counts.get(ev[0], 0) + 1
        unet = self.models[0].comps.unet if self.models else None
        ctx.extra.update({
            "eps_255": p.eps, "alpha_255": p.alpha,
            "realised_linf_255": max(int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max()) for a, c in zip(out, clean)),
            "precision": engine.prec.label, "gradient_checkpointing": p.gradient_checkpointing,
            "attention_processor": sorted({type(v).__name__ for v in unet.attn_processors.values()}) if unet is not None else [],
            "pgd_batch_size": p.pgd_batch_size or len(clean), "surrogate_copy": engine.opts.surrogate_copy,
            "prompt_cache": engine.opts.cache_prompts, "param_grads_in_pgd": not engine.opts.freeze_params_in_pgd,
            "text_encoder_trained": any(m.train_te for m in self.models), "models": [m.role for m in self.models],
            "num_class_images": p.num_class_images if p.with_prior_preservation else 0,
            "step_counts": counts, "pgd_loss_first_last": [engine.losses[0], engine.losses[-1]] if engine.losses else [],
            "defense_wall_s": round(wall, 3), "device": ctx.device, "targeted": self.targeted,
        })
        if self.targeted:
            ctx.extra["target_image"] = p.target_image or f"built-in {TARGET_CELLS}x{TARGET_CELLS} checkerboard"

    def _engine(self, ctx: RunContext) -> _Engine:
        return _Engine(self.params, ctx, precision_for(self.params.mixed_precision, ctx.device), self.loop_options,
                       self.targeted)

    def _setup(self, ctx: RunContext, subject, model_dir: Path | None):
        """What every variant needs first: the engine, clean set_A, the (role, folder) surrogates, the ensemble mode
        and whether idle ensemble members are offloaded to the CPU."""
        p = self.params
        roles = self._roles(ctx, model_dir)
        mode = getattr(p, "ensemble", "images")
        offload = bool(getattr(p, "offload_idle_models", False)) and len(roles) > 1 and mode == "images"
        return self._engine(ctx), subject.load("A", ctx.resolution), roles, mode, offload


class _FSMGBase(_AntiDreamBooth):
    """FSMG / T-FSMG / E-FSMG (METHODS.md 1.3, 1.5): DreamBooth reference model(s) trained on clean set_A with the
    attacker's hyper-parameters (attacks.dreambooth), then PGD on set_B against the fixed model(s)."""

    Params = FSMGParams
    profiles = {"tiny": _TINY_FSMG, "proxy": _PROXY_FSMG}

    def _train_reference(self, ctx: RunContext, m: _Model, clean_a: list[Image], class_images: list[Image]) -> dict:
        from attacks.dreambooth import DreamBoothParams, _Run

        p = self.params
        db = DreamBoothParams(learning_rate=p.learning_rate, max_train_steps=p.reference_steps,
                              train_batch_size=p.reference_batch_size, train_text_encoder=p.train_text_encoder,
                              with_prior_preservation=p.with_prior_preservation, prior_loss_weight=p.prior_loss_weight,
                              num_class_images=p.num_class_images, adam_betas=tuple(p.adam_betas),
                              weight_decay=p.weight_decay, adam_epsilon=p.adam_epsilon, max_grad_norm=p.max_grad_norm,
                              mixed_precision="bf16" if p.mixed_precision != "no" else "no",
                              gradient_checkpointing=p.gradient_checkpointing)
        saved = {k: ctx.extra.pop(k) for k in ("train_precision", "train_wall_s", "final_loss") if k in ctx.extra}
        log = _Run(m.comps, db, ctx, m.trainable, m.train_te).train(clean_a, m.instance_prompt, m.class_prompt,
                                                                     class_images, f"{self.name}-reference")
        info = {k: ctx.extra.pop(k) for k in ("train_precision", "train_wall_s", "final_loss") if k in ctx.extra}
        ctx.extra.update(saved)
        m.comps.unet.train()
        m.comps.text_encoder.train(m.train_te)
        return {**info, "steps": p.reference_steps, "trainable_params": log["trainable_params"]}

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        start = time.perf_counter()
        engine, clean_a, roles, mode, offload = self._setup(ctx, subject, model_dir)
        self.models, refs = [], {}
        for role, folder in roles:
            class_images = self._class_images(ctx, folder, p.class_prompt.format(**_fmt(p, subject)))
            m = self._prepare(ctx, engine, role, folder, subject, [], ctx.device, class_images=class_images)
            refs[role] = self._train_reference(ctx, m, clean_a, class_images)
            if offload:
                _move(m, "cpu")
            self.models.append(m)
        x0 = to_tensor(images).to(ctx.device)
        x = x0.clone()
        for r in range(p.rounds):
            if len(self.models) == 1 or mode == "gradients":
                x = engine.pgd(self.models, x, x0, p.pgd_steps)
            else:
                outs = []
                for m in self.models:
                    if offload:
                        _move(m, ctx.device)
                    outs.append(engine.pgd([m], x, x0, p.pgd_steps))
                    if offload:
                        _move(m, "cpu")
                x = torch.stack(outs).mean(0)  # X <- mean_j X_j (stays in the eps-ball: it is convex)
            ctx.progress(r + 1, p.rounds)
        out = save_within_budget(x, images, p.eps)
        self.trace = engine.trace
        self._record(ctx, engine, out, images, time.perf_counter() - start)
        ctx.extra.update({"reference_training": refs, "pgd_steps_total": p.rounds * p.pgd_steps,
                          "ensemble": mode if self.ensemble_kind else None, "offload_idle_models": offload})
        return out


@DEFENSES.register("fsmg", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class FSMG(_FSMGBase):
    """Fully-trained Surrogate Model Guidance: 100 PGD steps against a DreamBooth model trained on clean set_A."""


@DEFENSES.register("t-fsmg", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class TargetedFSMG(_FSMGBase):
    """FSMG with the target-shift term towards ``target_image`` (METHODS.md 1.2 targeted variant)."""

    targeted = True


@DEFENSES.register("e-fsmg", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class EnsembleFSMG(_FSMGBase):
    """E-FSMG: one reference model per role in ``models``; 60 rounds x 12 PGD steps per model from the shared X,
    X <- mean of the per-model results (``ensemble="images"``, the paper) or one step on the averaged gradient of all
    models (``"gradients"``: every step sees every model, but the models' losses mix before the sign)."""

    Params = EFSMGParams
    ensemble_kind = True
    requires = Requirements(white_box=True, gpu_memory_gb=34.0)  # + 2 resident models (offload_idle_models: 24)
    profiles = {"tiny": {**_TINY_FSMG, **_ENSEMBLE_TINY, "rounds": 5, "pgd_steps": 4, "reference_steps": 20},
                "proxy": {**_PROXY_FSMG, **_ENSEMBLE_TINY}}


class _ASPLBase(_AntiDreamBooth):
    """ASPL / T-ASPL / E-ASPL / ASPL-LoRA (METHODS.md 1.4-1.6)."""

    Params = ASPLParams
    profiles = {"tiny": _TINY_ASPL, "proxy": _PROXY}

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        start = time.perf_counter()
        engine, clean_a, roles, mode, offload = self._setup(ctx, subject, model_dir)
        self.models = []
        for role, folder in roles:
            m = self._prepare(ctx, engine, role, folder, subject, clean_a, ctx.device, lora=p.lora_surrogate)
            if offload:
                _move(m, "cpu")
            self.models.append(m)
        x0 = to_tensor(images).to(ctx.device)
        x = x0.clone()
        self._before_rounds(ctx, engine, x0)
        for r in range(p.rounds):
            if len(self.models) == 1 or mode == "gradients":
                x = self._round_joint(engine, x, x0)
            else:
                x = self._round_images(engine, x, x0, offload, ctx.device)
            ctx.progress(r + 1, p.rounds)
        out = save_within_budget(x, images, p.eps)
        self.trace = engine.trace
        self._record(ctx, engine, out, images, time.perf_counter() - start)
        ctx.extra.update({"pgd_steps_total": p.rounds * p.pgd_steps, "use_8bit_adam": p.use_8bit_adam,
                          "snapshot_device": p.snapshot_device, "lora_surrogate": p.lora_surrogate,
                          "lora_rank": p.lora_rank if p.lora_surrogate else None,
                          "restore_surrogate": p.restore_surrogate,
                          "quirk_first_three_images": p.quirk_first_three_images,
                          "ensemble": mode if self.ensemble_kind else None,
                          "offload_idle_models": offload})
        return out

    def _before_rounds(self, ctx: RunContext, engine: _Engine, x0: torch.Tensor) -> None:
        """Work between loading the models and the first round (SimAC's timestep selection)."""

    def _train_on(self, engine: _Engine, m: _Model, x: torch.Tensor) -> None:
        """The persistent model's steps on the perturbed images (fresh posteriors of the new pixels)."""
        dtype = next(m.comps.vae.parameters()).dtype
        engine.train(m, LatentCache(m.comps.vae, x.detach().to(dtype)), self.params.train_steps, "train")

    def _round_joint(self, engine: _Engine, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """One round with every model's surrogate in the same PGD (single model, or gradient ensembling)."""
        surs = [engine.begin_surrogate(m, self.params.restore_surrogate) for m in self.models]
        x = engine.pgd([s for s, _ in surs], x, x0, self.params.pgd_steps)
        for m, (sur, snap) in zip(self.models, surs):
            engine.end_surrogate(m, sur, snap)
        del surs
        for m in self.models:
            self._train_on(engine, m, x)
        return x

    def _round_images(self, engine: _Engine, x: torch.Tensor, x0: torch.Tensor, offload: bool, device: str) -> torch.Tensor:
        """E-ASPL round (ensemble_aspl.py): per model j, surrogate + PGD from the shared X -> X_j, train model j on
        X_j; then X <- mean_j X_j."""
        outs = []
        for m in self.models:
            if offload:
                _move(m, device)
            sur, snap = engine.begin_surrogate(m, self.params.restore_surrogate)
            xj = engine.pgd([sur], x, x0, self.params.pgd_steps)
            engine.end_surrogate(m, sur, snap)
            del sur
            self._train_on(engine, m, xj)
            outs.append(xj)
            if offload:
                _move(m, "cpu")
        return torch.stack(outs).mean(0)


@DEFENSES.register("aspl", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class ASPL(_ASPLBase):
    """Alternating Surrogate and Perturbation Learning: 50 x [3 surrogate steps on clean set_A (from the persistent
    weights), 6 PGD steps on set_B, 3 persistent-model steps on the perturbed set_B]."""


@DEFENSES.register("t-aspl", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class TargetedASPL(_ASPLBase):
    """ASPL with the target-shift term towards ``target_image``."""

    targeted = True


@DEFENSES.register("e-aspl", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class EnsembleASPL(_ASPLBase):
    """E-ASPL: ASPL over the models in ``models``; ``ensemble="images"`` (paper: X <- mean_j X_j, each model's PGD
    from the shared X) or ``"gradients"`` (all surrogates in one PGD, gradients averaged before the sign)."""

    Params = EASPLParams
    ensemble_kind = True
    requires = Requirements(white_box=True, gpu_memory_gb=34.0)  # + 2 resident models (offload_idle_models: 24)
    profiles = {"tiny": {**_TINY_ASPL, **_ENSEMBLE_TINY, "rounds": 3}, "proxy": {**_PROXY, **_ENSEMBLE_TINY}}


@DEFENSES.register("aspl-lora", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class ASPLLoRA(_ASPLBase):
    """ASPL with a LoRA surrogate (rank 4 on the UNet attention projections; base weights and text encoder frozen,
    prompt embeddings cached): the 24 GB variant of aspl_lora.py, with its defaults (METHODS.md 1.6)."""

    Params = ASPLLoRAParams
    paper = LORA_PAPER
    requires = Requirements(white_box=True, gpu_memory_gb=17.0)  # 6.4 with gradient_checkpointing + pgd_batch_size 1
    profiles = {"tiny": {**_TINY, "rounds": 2, "learning_rate": 1e-3}, "proxy": {**_PROXY, "learning_rate": 2e-3}}
