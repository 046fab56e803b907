"""Textual Inversion (Gal et al., ICLR'23) as diffusers' ``examples/textual_inversion/textual_inversion.py`` runs it
with its README's "cat toy" flags: ``--train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=3000
--learning_rate=5.0e-04 --scale_lr --lr_scheduler=constant --lr_warmup_steps=0``, ``--learnable_property=object``.

The prompts' identifier (the profile's "sks") is added to the tokenizer as a new word whose embedding row starts as
the initializer word's (the subject's class noun, as the README's ``--initializer_token=toy``); only that row trains:
the whole token-embedding matrix is in AdamW (as in the script) and every other row is restored after each step, so
every other weight stays bit-identical. Each example is one training image, horizontally flipped with p = 0.5 and
captioned by a random one of the script's "object" templates filled with the new word ("a photo of a sks"); the
dataset is the images repeated ``repeats`` = 100 times, shuffled each epoch. Loss: the METHODS.md 1.2 denoising loss.
The harness's instance prompt is not a training caption (it is recorded in the log): under prompt mismatch only the
identifier changes for this attack. No class images, no gradient clipping (the script has neither).

Learning rate: the script's ``--scale_lr`` multiplies ``learning_rate`` by gradient_accumulation_steps x
train_batch_size x processes, and the README passes it: the defaults train at 5e-4 x 4 x 1 = 2e-3 (one process;
``scale_lr=False`` trains at ``learning_rate`` itself). ``max_train_steps`` counts optimizer steps (each 4 micro-batches
of 1 image). As in DreamBooth here, every draw (order, flip, template, VAE sample, t, eps) comes from generators seeded
from ``ctx.seed``, and images are encoded once (both orientations) by the frozen VAE.

Output: ``learned_embeds.safetensors`` = {word: 1 x D embedding} (the script's ``save_progress`` format, which
diffusers' ``load_textual_inversion`` reads) + ``train_log.json``; ``load_pipeline`` adds it to the base model.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.lazy import lazy_import
torch = lazy_import("torch")

from attacks.dreambooth import (_Batches, _jsonable, _peak_rss_mb, _write_log, check_training_images,
                                fit)
from bench import models
from bench.diffusion import LatentCache, denoising_loss, encode_prompt, to_tensor
from bench.plugins import ATTACKS, Attack, Image, RunContext
from bench.precision import autocast_for

EMBEDS_FILE = "learned_embeds.safetensors"  # the script's final file name (safe serialization)

# The script's ``imagenet_templates_small`` (learnable_property "object"), from the paper's code
# (rinongal/textual_inversion ``ldm/data/personalized.py``); "{}" is the new word.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


@dataclass(frozen=True)
class TextualInversionParams:
    """The README's cat-toy command (see the module docstring); the rest are ``textual_inversion.py`` defaults."""

    learning_rate: float = 5e-4  # --learning_rate=5.0e-04, before --scale_lr
    scale_lr: bool = True  # --scale_lr: x gradient_accumulation_steps x train_batch_size (= 2e-3 here)
    max_train_steps: int = 3000  # --max_train_steps=3000 (optimizer steps)
    train_batch_size: int = 1  # --train_batch_size=1
    gradient_accumulation_steps: int = 4  # --gradient_accumulation_steps=4
    initializer_token: str = ""  # "" = the subject's class noun (README: --initializer_token="toy" for a toy)
    repeats: int = 100  # --repeats default: the dataset is the images x 100
    flip_p: float = 0.5  # TextualInversionDataset's RandomHorizontalFlip
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-2  # --adam_weight_decay
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # --lr_scheduler="constant"
    lr_warmup_steps: int = 0  # --lr_warmup_steps=0 (script default 500)
    mixed_precision: Literal["no", "bf16"] = "no"  # script default; autocast: bench/precision.py

    def validate(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if min(self.max_train_steps, self.train_batch_size, self.gradient_accumulation_steps, self.repeats) < 1:
            raise ValueError("max_train_steps, train_batch_size, gradient_accumulation_steps and repeats must be >= 1")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")


def effective_lr(learning_rate: float, scale_lr: bool, *factors: int) -> float:
    """diffusers' ``--scale_lr``: the base rate times the batch factors (one process), else the base rate."""
    if not scale_lr:
        return learning_rate
    for f in factors:
        learning_rate *= f
    return learning_rate


class NewToken:
    """A new word in the tokenizer with its own embedding row (Textual Inversion's placeholder, Custom Diffusion's
    modifier token), initialised from ``initializer``'s row (the mean of its rows if it is several tokens; the
    scripts refuse those). Freezes the rest of the text encoder; the embedding matrix is the trainable tensor, and
    ``restore_others`` puts every other row back after a step (``zero_other_grads``: Custom Diffusion's gradient
    mask)."""

    def __init__(self, tokenizer, text_encoder, word: str, initializer: str, who: str) -> None:
        if not word or word != word.strip() or " " in word:
            raise ValueError(f"{who}: the identifier must be one word without spaces, got {word!r}")
        init_ids = tokenizer.encode(initializer, add_special_tokens=False)
        if not init_ids:
            raise ValueError(f"{who}: initializer {initializer!r} has no tokens")
        if word in tokenizer.get_vocab() or tokenizer.add_tokens(word) != 1:
            raise ValueError(f"{who}: the tokenizer already has the token {word!r}; use another identifier")
        self.word, self.initializer, self.initializer_ids = word, initializer, list(init_ids)
        self.id = tokenizer.convert_tokens_to_ids(word)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        text_encoder.requires_grad_(False)
        self.weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            self.weight[self.id] = self.weight[init_ids].mean(0)
        self.weight.requires_grad_(True)
        self.original = self.weight.detach().clone()
        self.others = torch.ones(len(self.weight), dtype=torch.bool)
        self.others[self.id] = False

    def zero_other_grads(self) -> None:
        if self.weight.grad is not None:
            self.weight.grad[self.others.to(self.weight.device)] = 0

    def restore_others(self) -> None:
        with torch.no_grad():
            keep = self.others.to(self.weight.device)
            self.weight[keep] = self.original[keep]

    def save(self, path: Path) -> None:
        """{word: 1 x D} as safetensors, the format ``load_textual_inversion`` reads."""
        from safetensors.torch import save_file

        row = self.weight.detach()[self.id:self.id + 1].float().cpu().contiguous()
        save_file({self.word: row}, str(path), metadata={"format": "pt"})

    def log(self) -> dict[str, Any]:
        return {"token": self.word, "token_id": int(self.id), "initializer": self.initializer,
                "initializer_ids": self.initializer_ids}


def token_words(who: str, identifier: str | None, class_noun: str | None, initializer: str) -> tuple[str, str]:
    """(new word, initializer word) from the stage's words; a clear error when the caller did not pass them."""
    if not identifier:
        raise ValueError(f"{who}: learns a token for the prompts' identifier; train() needs identifier= "
                         f"(the attack stage passes Attack.token_words)")
    init = initializer or class_noun
    if not init:
        raise ValueError(f"{who}: no initializer word: set initializer_token or pass class_noun=")
    return identifier, init


def load_with_token(model_dir: Path, trained_dir: Path, who: str, allow_unsafe: bool):
    """The base pipeline (on CPU) with the learned word of ``trained_dir`` added by ``load_textual_inversion``."""
    f = Path(trained_dir) / EMBEDS_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; not a {who} output folder")
    pipe = models.load_pipeline(model_dir, "cpu", "default", allow_unsafe)
    pipe.load_textual_inversion(str(f))
    return pipe


@ATTACKS.register("textual-inversion", version=1)
class TextualInversion(Attack):
    """Textual Inversion: one new token embedding learned on the training images, every model weight frozen."""

    Params = TextualInversionParams
    learns_token = True
    # tiny/proxy: fewer steps at the README's rate. Proxy, 4 synthetic subjects (`benchmarks/proxy_scale.py personalise
    # --attack textual-inversion`): subject-ism 0.07 -> 0.34, identified among 10 0.16 -> 0.31 (~20 s a run; DreamBooth: 1.0)
    profiles = {"tiny": {"max_train_steps": 10}, "proxy": {"max_train_steps": 100}}
    paper = "Gal et al., ICLR'23; diffusers examples/textual_inversion README (cat toy) + textual_inversion.py"

    def train(self, ctx: RunContext, model_dir: Path, images: list[Image], instance_prompt: str,
              class_prompt: str, class_images: list[Image], out_dir: Path, identifier: str | None = None,
              class_noun: str | None = None) -> None:
        p = self.params
        word, init = token_words(self.name, identifier, class_noun, p.initializer_token)
        check_training_images(self.name, ctx.resolution, images, [], False)
        c = models.load_components(model_dir, ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
        c.vae.requires_grad_(False)
        c.unet.requires_grad_(False)
        token = NewToken(c.tokenizer, c.text_encoder, word, init, self.name)
        x = to_tensor(images)
        cache = LatentCache(c.vae, torch.cat([x, x.flip(-1)]))  # image i, then its mirror at i + n
        n = len(images)
        prompts = [t.format(word) for t in OBJECT_TEMPLATES]
        gen = ctx.torch_generator()
        batches = _Batches(n * p.repeats, 0, p.train_batch_size, gen)
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)

        def step_loss() -> torch.Tensor:
            k, _ = batches.next()
            flip = (torch.rand(len(k), generator=gen) < p.flip_p).long()
            latents = cache.sample(k % n + n * flip, gen)
            which = torch.randint(len(prompts), (len(k),), generator=gen).tolist()
            with autocast:
                emb = encode_prompt(c.tokenizer, c.text_encoder, [prompts[i] for i in which])
                return denoising_loss(c.unet, c.noise_scheduler, latents, emb, gen)

        lr = effective_lr(p.learning_rate, p.scale_lr, p.gradient_accumulation_steps, p.train_batch_size)
        c.text_encoder.train()
        start = time.perf_counter()
        losses = fit(ctx, p, self.name, [token.weight], step_loss, learning_rate=lr,
                     accumulation=p.gradient_accumulation_steps, after_step=token.restore_others)
        c.text_encoder.eval()
        wall = time.perf_counter() - start
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        token.save(out_dir / EMBEDS_FILE)
        ctx.extra.update({"train_precision": precision, "train_wall_s": round(wall, 3), "final_loss": losses[-1]})
        _write_log(out_dir, {
            "attack": self.name, "params": _jsonable(asdict(p)), "seed": ctx.seed, "device": ctx.device,
            "precision": precision, "n_instance": n, "n_class": 0, "effective_learning_rate": lr,
            "instance_prompt": instance_prompt, "train_prompts": "OBJECT_TEMPLATES with the token", **token.log(),
            "losses": losses, "wall_s": wall, "peak_rss_mb": _peak_rss_mb(), "trainable_params": int(token.weight.shape[1])})

    def load_pipeline(self, model_dir: Path, trained_dir: Path, device: str, allow_unsafe: bool = False):
        """The base pipeline with the learned word added to its tokenizer and text encoder."""
        return load_with_token(model_dir, trained_dir, self.name, allow_unsafe).to(device)
