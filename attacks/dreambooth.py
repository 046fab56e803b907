"""Personalisation attacks: DreamBooth (Ruiz et al., CVPR'23) as Anti-DreamBooth's attacker (METHODS.md 1.7), and
DreamBooth with LoRA adapters (diffusers ``train_dreambooth_lora.py``; METHODS.md 1.6 / 5.3).

Both follow diffusers' ``train_dreambooth.py`` loss: a batch is the instance images (+ as many class images with
prior preservation), loss = instance MSE + prior_loss_weight * prior MSE, with the METHODS.md 1.2 denoising loss.
Unlike the originals, every random draw (batch order, VAE sample, t, eps, LoRA init) comes from generators seeded
from ``ctx.seed``, so a run is reproducible (METHODS.md 8.3: "fix seeds everywhere; the originals do not").
Images are encoded once by the frozen VAE (``LatentCache``); prompt embeddings are cached when the text encoder is
frozen.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")

from bench import models
from bench.diffusion import LatentCache, adamw, denoising_loss, encode_prompt, to_tensor
from bench.plugins import ATTACKS, Attack, Image, RunContext
from bench.precision import autocast_for
from bench.profiles import PROXY_FINETUNE

CLASS_IMAGE_SEED_OFFSET = 500_000  # class images never share initial noise with evaluation images (seed + 1000 i + j)
CLASS_IMAGE_BATCH = 8  # Anti-DreamBooth scripts: --sample_batch_size 8 or 16


@dataclass(frozen=True)
class DreamBoothParams:
    """Anti-DreamBooth's attacker flags (METHODS.md 1.7, ``scripts/*.sh`` + ``train_dreambooth.py``)."""

    learning_rate: float = 5e-7  # --learning_rate=5e-7
    max_train_steps: int = 1000  # --max_train_steps=1000
    train_batch_size: int = 2  # --train_batch_size=2 (instance images per step)
    train_text_encoder: bool = True  # --train_text_encoder
    with_prior_preservation: bool = True  # --with_prior_preservation
    prior_loss_weight: float = 1.0  # --prior_loss_weight=1.0
    num_class_images: int = 200  # --num_class_images=200
    adam_betas: tuple[float, ...] = (0.9, 0.999)  # train_dreambooth.py defaults
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # --lr_scheduler=constant
    lr_warmup_steps: int = 0  # --lr_warmup_steps=0
    mixed_precision: Literal["no", "bf16"] = "bf16"  # --mixed_precision=bf16; CUDA and bf16 CPUs (recorded)
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _validate_common(self)


@dataclass(frozen=True)
class LoraDreamBoothParams:
    """DreamBooth-LoRA as diffusers ``train_dreambooth_lora.py`` with the sources of each default noted."""

    learning_rate: float = 1e-4  # METHODS.md 5.3: Mist-v2's LoRA evaluation, lr 1e-4
    max_train_steps: int = 1000  # METHODS.md 1.7: the attacker's step count
    train_batch_size: int = 2  # METHODS.md 1.7
    rank: int = 4  # METHODS.md 1.6 (ASPL-LoRA --rank 4) and 5.3 (rank 4)
    lora_alpha: int = 4  # train_dreambooth_lora.py: lora_alpha = rank
    train_text_encoder: bool = False  # METHODS.md 1.6: text-encoder LoRA optional
    with_prior_preservation: bool = True  # as train_dreambooth_lora.py --with_prior_preservation
    prior_loss_weight: float = 1.0  # METHODS.md 1.7
    num_class_images: int = 200  # METHODS.md 1.7
    adam_betas: tuple[float, ...] = (0.9, 0.999)  # train_dreambooth_lora.py defaults
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: Literal["no", "bf16"] = "bf16"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _validate_common(self)
        if self.rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"rank must be >= 1 and lora_alpha > 0, got {self.rank}, {self.lora_alpha}")


def _validate_common(p: Any) -> None:
    if not p.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {p.learning_rate}")
    if p.max_train_steps < 1 or p.train_batch_size < 1:
        raise ValueError(f"max_train_steps and train_batch_size must be >= 1, got {p.max_train_steps}, {p.train_batch_size}")
    if len(p.adam_betas) != 2 or not all(0 <= b < 1 for b in p.adam_betas):
        raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(p.adam_betas)}")
    if p.with_prior_preservation and p.num_class_images < 1:
        raise ValueError("num_class_images must be >= 1 with prior preservation")


# Tiny profile: few steps and a learning rate high enough that personalisation shows on tiny pre-trained models
# (measured: 40 steps at 3e-4 lower the subject's denoising loss at t >= 200 by ~5%, 80 steps by ~8%).
_TINY = {"max_train_steps": 40, "num_class_images": 4, "mixed_precision": "no"}


# ----------------------------------------------------------------------------------------------- training

@dataclass
class _Batches:
    """diffusers' DreamBoothDataset order: an epoch is max(n_instance, n_class) examples, shuffled; example k is
    instance image k mod n_instance (+ class image k mod n_class)."""

    n_instance: int
    n_class: int
    batch_size: int
    generator: torch.Generator

    def __post_init__(self) -> None:
        self._queue: list[int] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(self.n_instance, self.n_class)
        if not self._queue:
            self._queue = torch.randperm(length, generator=self.generator).tolist()
        ks, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        k = torch.tensor(ks)
        return k % self.n_instance, (k % self.n_class if self.n_class else k[:0])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _check_images(images: list[Image], resolution: int, what: str) -> None:
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.shape != (resolution, resolution, 3):
            got = f"{getattr(im, 'dtype', type(im).__name__)}{getattr(im, 'shape', '')}"
            raise ValueError(f"{what} image {i}: expected uint8 ({resolution}, {resolution}, 3), got {got}")


def check_training_images(name: str, resolution: int, images: list[Image], class_images: list[Image],
                          prior: bool) -> None:
    """At least one training image, and (with prior preservation) class images, all uint8 at ``resolution``."""
    _check_images(images, resolution, f"{name}: training")
    if not images:
        raise ValueError(f"{name}: no training images")
    if prior:
        if not class_images:
            raise ValueError(f"{name}: with_prior_preservation needs class images, got none")
        _check_images(class_images, resolution, f"{name}: class")


def fit(ctx: RunContext, p: Any, name: str, trainable: list[torch.nn.Parameter], step_loss: Callable[[], torch.Tensor],
        *, learning_rate: float | None = None, accumulation: int = 1, before_clip: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None) -> list[float]:
    """The optimisation loop of diffusers' ``train_*.py`` scripts, shared by the attacks: AdamW (``p.adam_betas``,
    ``p.weight_decay``, ``p.adam_epsilon``; ``learning_rate`` or ``p.learning_rate``), ``p.lr_scheduler`` with
    ``p.lr_warmup_steps``; each of ``p.max_train_steps`` optimizer steps backpropagates ``accumulation`` micro-batch
    losses ``step_loss()`` each divided by ``accumulation`` (accelerate's gradient accumulation), then
    ``before_clip``, gradient-norm clipping to ``p.max_grad_norm`` (when ``p`` has one), the step, ``after_step``.
    Returns each step's loss (mean over its micro-batches); a non-finite loss raises naming the step."""
    from diffusers.optimization import get_scheduler

    opt = adamw(trainable, lr=p.learning_rate if learning_rate is None else learning_rate,
                betas=tuple(p.adam_betas), weight_decay=p.weight_decay, eps=p.adam_epsilon)
    sched = get_scheduler(p.lr_scheduler, optimizer=opt, num_warmup_steps=p.lr_warmup_steps,
                          num_training_steps=p.max_train_steps)
    max_grad_norm = getattr(p, "max_grad_norm", None)
    losses: list[float] = []
    for step in range(p.max_train_steps):
        total = 0.0
        for _ in range(accumulation):
            loss = step_loss()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: loss is {float(loss.detach())} at step {step + 1}/{p.max_train_steps}; "
                                         f"check the training images and lower learning_rate ({p.learning_rate})")
            (loss if accumulation == 1 else loss / accumulation).backward()
            total += float(loss.detach())
        if before_clip is not None:
            before_clip()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(total / accumulation)
        ctx.progress(step + 1, p.max_train_steps)
    return losses


@dataclass
class _Run:
    """One fine-tuning run: frozen VAE, trainable parameters, cached latents and (when frozen) prompt embeddings."""

    comps: models.SDComponents
    params: Any
    ctx: RunContext
    trainable: list[torch.nn.Parameter]
    text_trainable: bool

    def train(self, images: list[Image], instance_prompt: str, class_prompt: str, class_images: list[Image],
              name: str) -> dict[str, Any]:
        p, ctx, c = self.params, self.ctx, self.comps
        prior = bool(p.with_prior_preservation)
        check_training_images(name, ctx.resolution, images, class_images, prior)
        c.vae.requires_grad_(False)
        inst = LatentCache(c.vae, to_tensor(images))
        cls = LatentCache(c.vae, to_tensor(class_images)) if prior else None
        prompts = [instance_prompt, class_prompt] if prior else [instance_prompt]
        fixed = None
        if not self.text_trainable:
            with torch.no_grad():
                fixed = encode_prompt(c.tokenizer, c.text_encoder, prompts).detach()
        gen = ctx.torch_generator()
        batches = _Batches(len(images), len(class_images) if prior else 0, p.train_batch_size, gen)
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)

        def step_loss() -> torch.Tensor:
            i_idx, c_idx = batches.next()
            latents = inst.sample(i_idx, gen)
            if prior:
                latents = torch.cat([latents, cls.sample(c_idx, gen)])
            with autocast:
                emb = fixed if fixed is not None else encode_prompt(c.tokenizer, c.text_encoder, prompts)
                which = torch.cat([torch.zeros(len(i_idx), dtype=torch.long), torch.ones(len(c_idx), dtype=torch.long)])
                _, per = denoising_loss(c.unet, c.noise_scheduler, latents, emb[which.to(emb.device)], gen, per_sample=True)
            loss = per[:len(i_idx)].mean()
            if prior:
                loss = loss + p.prior_loss_weight * per[len(i_idx):].mean()
            return loss

        c.unet.train()
        c.text_encoder.train(self.text_trainable)
        start = time.perf_counter()
        losses = fit(ctx, p, name, self.trainable, step_loss)
        c.unet.eval()
        c.text_encoder.eval()
        wall = time.perf_counter() - start
        ctx.extra.update({"train_precision": precision, "train_wall_s": round(wall, 3), "final_loss": losses[-1]})
        return {"attack": name, "params": _jsonable(asdict(p)), "seed": ctx.seed, "device": ctx.device,
                "precision": precision, "n_instance": len(images), "n_class": len(class_images) if prior else 0,
                "instance_prompt": instance_prompt, "class_prompt": class_prompt if prior else None,
                "losses": losses, "wall_s": wall, "peak_rss_mb": _peak_rss_mb(),
                "trainable_params": sum(t.numel() for t in self.trainable)}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _write_log(out_dir: Path, log: dict[str, Any]) -> None:
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))


def _load(model_dir: Path, ctx: RunContext, params: Any) -> models.SDComponents:
    comps = models.load_components(model_dir, ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
    if params.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if params.train_text_encoder:
            comps.text_encoder.gradient_checkpointing_enable()
    return comps


# ----------------------------------------------------------------------------------------------- plug-ins

@ATTACKS.register("dreambooth", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class DreamBooth(Attack):
    """Full fine-tuning of the UNet (+ text encoder) with prior preservation; saves the trained modules as
    safetensors (``unet/``, ``text_encoder/``) and ``train_log.json``."""

    Params = DreamBoothParams
    profiles = {"tiny": {**_TINY, "learning_rate": 3e-4}, "proxy": {**PROXY_FINETUNE, "max_train_steps": 200}}
    paper = "Ruiz et al., CVPR'23; Anti-DreamBooth (Le et al., ICCV'23) attacker flags, METHODS.md 1.7"

    def train(self, ctx: RunContext, model_dir: Path, images: list[Image], instance_prompt: str,
              class_prompt: str, class_images: list[Image], out_dir: Path) -> None:
        p = self.params
        comps = _load(model_dir, ctx, p)
        comps.unet.requires_grad_(True)
        comps.text_encoder.requires_grad_(bool(p.train_text_encoder))
        trainable = list(comps.unet.parameters())
        if p.train_text_encoder:
            trainable += list(comps.text_encoder.parameters())
        run = _Run(comps, p, ctx, trainable, bool(p.train_text_encoder))
        log = run.train(images, instance_prompt, class_prompt, class_images, self.name)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        comps.unet.save_pretrained(out_dir / "unet", safe_serialization=True)
        if p.train_text_encoder:
            comps.text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
        _write_log(out_dir, log)

    def load_pipeline(self, model_dir: Path, trained_dir: Path, device: str, allow_unsafe: bool = False):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        trained_dir = Path(trained_dir)
        if not (trained_dir / "unet").is_dir():
            raise FileNotFoundError(f"{trained_dir / 'unet'}: missing; not a {self.name} output folder")
        kw = {"use_safetensors": True, "local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(trained_dir / "unet", **kw)
        te = CLIPTextModel.from_pretrained(trained_dir / "text_encoder", **kw) if (trained_dir / "text_encoder").is_dir() else None
        return models.load_pipeline(model_dir, device, "default", allow_unsafe, unet=unet, text_encoder=te)


UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # METHODS.md 1.6
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # train_dreambooth_lora.py text-encoder targets


def _lora_config(p: LoraDreamBoothParams, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=p.rank, lora_alpha=p.lora_alpha, init_lora_weights="gaussian", target_modules=targets)


@ATTACKS.register("lora-dreambooth", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class LoraDreamBooth(Attack):
    """DreamBooth with LoRA (peft) on the UNet attention projections (optionally the text encoder); base weights
    frozen; saves only the adapters (``unet_lora/``, ``text_encoder_lora/``, peft safetensors) + ``train_log.json``."""

    Params = LoraDreamBoothParams
    profiles = {"tiny": {**_TINY, "learning_rate": 1e-3},
                "proxy": {**PROXY_FINETUNE, "max_train_steps": 200, "learning_rate": 2e-3}}
    paper = "diffusers train_dreambooth_lora.py; METHODS.md 1.6 (targets, rank) and 5.3 (lr 1e-4)"

    def train(self, ctx: RunContext, model_dir: Path, images: list[Image], instance_prompt: str,
              class_prompt: str, class_images: list[Image], out_dir: Path) -> None:
        from peft import get_peft_model

        p = self.params
        comps = _load(model_dir, ctx, p)
        comps.unet.requires_grad_(False)
        comps.text_encoder.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # LoRA A matrices are drawn from the global RNG: seed it locally
            torch.manual_seed(ctx.seed)
            comps.unet = get_peft_model(comps.unet, _lora_config(p, UNET_LORA_TARGETS))
            if p.train_text_encoder:
                comps.text_encoder = get_peft_model(comps.text_encoder, _lora_config(p, TEXT_LORA_TARGETS))
        modules = [comps.unet] + ([comps.text_encoder] if p.train_text_encoder else [])
        trainable = [t for m in modules for t in m.parameters() if t.requires_grad]
        run = _Run(comps, p, ctx, trainable, bool(p.train_text_encoder))
        log = run.train(images, instance_prompt, class_prompt, class_images, self.name)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        comps.unet.save_pretrained(out_dir / "unet_lora", safe_serialization=True)
        if p.train_text_encoder:
            comps.text_encoder.save_pretrained(out_dir / "text_encoder_lora", safe_serialization=True)
        _write_log(out_dir, log)

    def load_pipeline(self, model_dir: Path, trained_dir: Path, device: str, allow_unsafe: bool = False):
        """The base pipeline with the adapters merged into the UNet (and text encoder)."""
        from peft import PeftModel

        trained_dir = Path(trained_dir)
        adapter = trained_dir / "unet_lora" / "adapter_model.safetensors"
        if not adapter.is_file():
            raise FileNotFoundError(f"{adapter}: missing; not a {self.name} output folder")
        pipe = models.load_pipeline(model_dir, "cpu", "default", allow_unsafe)
        pipe.unet = PeftModel.from_pretrained(pipe.unet, trained_dir / "unet_lora").merge_and_unload()
        if (trained_dir / "text_encoder_lora").is_dir():
            pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, trained_dir / "text_encoder_lora").merge_and_unload()
        return pipe.to(device)


def generate_class_images(model_dir: Path, class_prompt: str, n: int, ctx: RunContext, sampler: str, steps: int,
                          guidance: float) -> list[np.ndarray]:
    """``n`` prior-preservation images of ``class_prompt`` from the base model (uint8, ``ctx.resolution`` px), seeds
    ``ctx.seed + CLASS_IMAGE_SEED_OFFSET + j`` so they never share initial noise with evaluation images."""
    pipe = models.load_pipeline(model_dir, ctx.device, sampler, ctx.allow_unsafe_weights)
    out: list[np.ndarray] = []
    for start in range(0, n, CLASS_IMAGE_BATCH):
        k = min(CLASS_IMAGE_BATCH, n - start)
        pairs = models.generate(pipe, [class_prompt], k, steps, guidance, ctx.seed + CLASS_IMAGE_SEED_OFFSET + start,
                                ctx.resolution, batch_size=CLASS_IMAGE_BATCH)
        out.extend(img for _, img in pairs)
        ctx.progress(len(out), n)
    return out
