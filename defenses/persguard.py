"""PersGuard (Liu, Jia, Xun, Zhang, Cao; arXiv 2502.16167): a ``harden`` defense that implants a backdoor in the
pre-trained model so that personalising it on a *protected* subject's photos yields the backdoor behaviour instead
of the subject, while unprotected subjects personalise as before (METHODS.md 3). No reference code is public; what
the paper leaves open is chosen here and listed in docs/persguard.md.

Backdoor objectives (``objective``): the trigger is the attacker's prompt (identifier + class, e.g. "a photo of sks
dog"); the backdoor target images x_b are
- ``pattern``: a predefined pattern image (built-in ``checkerboard``, or ``pattern: <path to an image>``);
- ``erasure``: the scene without the object: images the base model generates from ``erasure_prompt``;
- ``target``: a chosen target object instead (dog -> rabbit): images the base model generates from ``target_prompt``.
Generated targets and the prior-preservation class images are cached ``class_images`` stages
(``generated_inputs``), shared with the attacker's class images when their settings agree.

Unified objective, per outer iteration (one AdamW step of theta = the UNet; text encoder and VAE frozen):
    L = w_bd * L_bd(theta) + w_pp * L_pp(theta) + w_ret * (1/K) sum_k L_bd(theta'_k)
- backdoor behaviour  L_bd = E ||eps_theta(z_t(x_b), c_trigger) - eps||^2 (the diffusion loss towards the targets);
- prior preservation  L_pp = E ||eps_theta(z_t(x_cls), c_cls) - eps_ref(z_t(x_cls), c_cls)||^2: on base-model
  images of the class, under the class prompt, the model keeps the frozen base model's predictions;
- backdoor retention  (1/K) sum_k L_bd(theta'_k): theta'_1..K = K steps of the attacker's DreamBooth (instance loss on
  the protected photos under the trigger + prior loss on class images, the attacker's learning rate) simulated on a
  copy of theta; each gradient at theta'_k is added to theta's (first order, as APDM's Learning to Protect:
  defenses/hardening.py). The loss at theta'_K alone had no measurable effect at the proxy scale (docs/persguard.md).
White-box: the trigger is the attacker's prompt. Gray-box: every draw picks an identifier and a template from
``gray_box_identifiers`` x ``gray_box_prompts`` (the harness's prompt-mismatch scenario uses neither). Several
protected subjects (the multi-object setting: the suite's ``protect_subjects``) take turns, one per outer iteration.
Every random draw comes from a CPU generator seeded from ``ctx.seed``. Units: no pixel budget (a model defense).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")

from attacks.dreambooth import _Batches, _check_images
from bench import models
from bench.diffusion import LatentCache, encode_prompt, to_tensor
from bench.images import fit, load_image, save_png
from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.profiles import PROXY_CLASS_IMAGES, PROXY_FINETUNE
from defenses.hardening import (Hardener, PersonalizationBatch, Prompts, check_finite, personalization_loss, repeat,
                                save_hardened, squared_error)

TARGETS_DIR = "persguard/targets"  # inside the hardened model folder: one sub-folder per protected subject id


@dataclass(frozen=True)
class PersGuardParams:
    """The paper gives no hyper-parameters in public text (METHODS.md 3); these are the harness's choices
    (docs/persguard.md), scaled like APDM's L2P (outer AdamW on the UNet, lr 5e-6 inner = the attacker's)."""

    objective: Literal["pattern", "erasure", "target"] = "pattern"
    pattern: str = "checkerboard"  # built-in "checkerboard", or a path to an image (resized + centre-cropped)
    target_prompt: str = "a photo of a rabbit"  # target backdoor: the paper's dog -> rabbit example
    erasure_prompt: str = "a photo of an empty background"  # erasure backdoor: the scene without the object
    num_targets: int = 8  # generated target / erasure images
    setting: Literal["white-box", "gray-box"] = "white-box"
    identifier: str = "sks"  # white-box: the attacker's identifier ...
    instance_prompt: str = "a photo of {identifier} {class_noun}"  # ... and prompt (the harness's default attacker)
    gray_box_identifiers: tuple[str, ...] = ("sks", "zwx", "olis", "phol", "ktn", "bnha")
    gray_box_prompts: tuple[str, ...] = ("a photo of {identifier} {class_noun}", "a {identifier} {class_noun}",
                                         "an image of {identifier} {class_noun}", "a close-up of {identifier} {class_noun}")
    class_prompt: str = "a photo of {class_noun}"
    outer_iterations: int = 800
    learning_rate: float = 5e-6  # theta's AdamW
    retention_steps: int = 20  # K simulated DreamBooth steps per outer iteration
    retention_learning_rate: float = 5e-6  # the attacker's DreamBooth learning rate (Anti-DreamBooth, APDM)
    backdoor_weight: float = 1.0
    prior_weight: float = 1.0
    retention_weight: float = 1.0  # 0 = the ablation without the retention loss
    prior_loss_weight: float = 1.0  # the simulated attacker's prior-preservation weight
    train_batch_size: int = 1
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    num_class_images: int = 200
    class_steps: int = 50
    class_sampler: str = "default"
    class_guidance: float = 7.5
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast on CUDA and bf16 CPUs (bench/precision.py; recorded)

    def validate(self) -> None:
        if self.outer_iterations < 1 or self.retention_steps < 0 or self.train_batch_size < 1:
            raise ValueError(f"outer_iterations >= 1, retention_steps >= 0 and train_batch_size >= 1 required, got "
                             f"{self.outer_iterations}, {self.retention_steps}, {self.train_batch_size}")
        if not self.learning_rate > 0 or not self.retention_learning_rate > 0:
            raise ValueError(f"learning rates must be > 0, got {self.learning_rate}, {self.retention_learning_rate}")
        if min(self.backdoor_weight, self.prior_weight, self.retention_weight, self.prior_loss_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.num_targets < 1 or self.num_class_images < 1 or self.class_steps < 1:
            raise ValueError("num_targets, num_class_images and class_steps must be >= 1")
        if self.setting == "gray-box" and not (self.gray_box_identifiers and self.gray_box_prompts):
            raise ValueError("gray-box needs gray_box_identifiers and gray_box_prompts")
        for template in (self.instance_prompt, self.class_prompt, *self.gray_box_prompts):
            try:
                template.format(identifier="x", class_noun="y")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"prompt {template!r} may only use {{identifier}} and {{class_noun}} ({e})") from None
        if self.objective == "pattern" and self.pattern != "checkerboard" and not Path(self.pattern).expanduser().is_file():
            raise ValueError(f"pattern {self.pattern!r}: not 'checkerboard' and no such image file")


def checkerboard(resolution: int, tiles: int = 4) -> Image:
    """The built-in pattern: a black-and-white checkerboard of ``tiles`` x ``tiles`` squares."""
    idx = (np.arange(resolution) * tiles // resolution)
    board = (idx[:, None] + idx[None, :]) % 2
    return np.repeat((board * 255).astype(np.uint8)[..., None], 3, axis=2)


@dataclass
class _Protected:
    """One protected subject: its photos, class images and backdoor targets (VAE posteriors), its trigger prompts."""

    subject_id: str
    photos: LatentCache
    class_images: LatentCache
    targets: LatentCache
    triggers: torch.Tensor  # (P x 77 x D): 1 prompt white-box, identifiers x templates gray-box
    class_emb: torch.Tensor  # (1 x 77 x D)
    photo_batches: _Batches
    class_batches: _Batches
    target_batches: _Batches


class PersGuardTrainer(Hardener):
    """The unified objective on ``unet`` (theta, trained in place); ``losses`` keeps each outer iteration's terms."""

    def __init__(self, unet, noise_scheduler, protected: list[_Protected], params: PersGuardParams,
                 generator: torch.Generator, device: str) -> None:
        p = params
        adam = {"betas": tuple(p.adam_betas), "weight_decay": p.weight_decay, "eps": p.adam_epsilon}
        super().__init__(unet, noise_scheduler, {"lr": p.learning_rate, **adam},
                         {"lr": p.retention_learning_rate, **adam}, generator, device, p.mixed_precision,
                         p.gradient_checkpointing)
        self.p, self.protected = p, protected
        self.iteration = 0
        self.losses: list[dict[str, float]] = []
        self.counts = {"outer_iterations": 0, "retention_steps": 0, "theta_steps": 0}

    def _trigger(self, s: _Protected) -> torch.Tensor:
        k = int(torch.randint(0, len(s.triggers), (1,), generator=self.gen)) if len(s.triggers) > 1 else 0
        return s.triggers[k:k + 1]

    def backdoor_loss(self, unet, s: _Protected, trigger: torch.Tensor) -> torch.Tensor:
        z = s.targets.sample(s.target_batches.next()[0], self.gen)
        return squared_error(unet, self.sched, z, self.noise(z), self.t(len(z)), repeat(trigger, len(z))).mean()

    def prior_loss(self, s: _Protected) -> torch.Tensor:
        z = s.class_images.sample(s.class_batches.next()[0], self.gen)
        noise, t = self.noise(z), self.t(len(z))
        emb = repeat(s.class_emb, len(z))
        noisy = self.sched.add_noise(z, noise, t)
        with torch.no_grad():
            ref = self.ref(noisy, t, emb).sample.float()
        return torch.nn.functional.mse_loss(self.theta(noisy, t, emb).sample.float(), ref)

    def retention(self, s: _Protected, trigger: torch.Tensor) -> float:
        """K steps of the attacker's DreamBooth (with prior preservation) on theta_tmp, from theta; after each step the
        backdoor loss on theta_tmp, whose gradient (scaled by retention_weight / K) is added to theta's. Returns the
        mean retention loss over the K points of the simulated fine-tuning."""
        self.restore_tmp()
        prompts = Prompts(inst=trigger, cls=s.class_emb)
        k_steps = self.p.retention_steps
        total = 0.0
        for _ in range(k_steps):
            z = s.photos.sample(s.photo_batches.next()[0], self.gen)
            b = PersonalizationBatch(inst=z, noise_inst=self.noise(z), t=self.t(len(z)))
            b.cls = s.class_images.sample(s.class_batches.next()[0], self.gen)
            b.noise_cls = self.noise(b.cls)
            self.opt_tmp.zero_grad(set_to_none=True)
            with self.autocast:
                loss = personalization_loss(self.tmp, self.sched, b, prompts, self.p.prior_loss_weight)
            check_finite(loss, "persguard", "simulated DreamBooth", self.iteration + 1)
            loss.backward()
            self.opt_tmp.step()
            self.counts["retention_steps"] += 1
            self.opt_tmp.zero_grad(set_to_none=True)
            with self.autocast:
                l_ret = self.backdoor_loss(self.tmp, s, trigger)
            check_finite(l_ret, "persguard", "retention", self.iteration + 1)
            l_ret.backward()
            self.transfer_gradients(self.p.retention_weight / k_steps)
            total += float(l_ret.detach())
        self.opt_tmp.zero_grad(set_to_none=True)
        return total / k_steps

    def outer_iteration(self) -> dict[str, float]:
        p = self.p
        s = self.protected[self.iteration % len(self.protected)]
        trigger = self._trigger(s)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            l_bd = self.backdoor_loss(self.theta, s, trigger)
            l_pp = self.prior_loss(s)
            loss = p.backdoor_weight * l_bd + p.prior_weight * l_pp
        check_finite(loss, "persguard", "backdoor + prior", self.iteration + 1)
        loss.backward()
        log = {"backdoor": float(l_bd.detach()), "prior": float(l_pp.detach())}
        if p.retention_weight > 0 and p.retention_steps > 0:
            log["retention"] = self.retention(s, trigger)
        self.opt.step()
        self.iteration += 1
        self.counts["outer_iterations"] += 1
        self.counts["theta_steps"] += 1
        self.losses.append(log)
        return log


def _fill(template: str, identifier: str, class_noun: str) -> str:
    return template.format(identifier=identifier, class_noun=class_noun)


@DEFENSES.register("persguard", version=2)  # 2: fused AdamW (bench/diffusion.py adamw), bf16 on CPUs
class PersGuard(Defense):
    """PersGuard: writes the backdoored model (safetensors; only the UNet changes) to ``out_dir``, with the backdoor
    targets under ``persguard/targets/<subject id>/`` (read by the ``backdoor-success`` metric) and
    ``persguard_log.json``."""

    defense_kind = "harden"
    needs_model = True
    Params = PersGuardParams
    profiles = {"tiny": {"outer_iterations": 8, "retention_steps": 2, "learning_rate": 1e-3,
                         "retention_learning_rate": 1e-3, "num_targets": 2, "num_class_images": 4, "class_steps": 10,
                         "class_sampler": "ddim", "class_guidance": 3.0},
                # the attacker's proxy DreamBooth: lr 5e-4 (PROXY_FINETUNE), 16 class images sampled as its own.
                # Measured on proxy:a (benchmarks/persguard_proxy.py, synth-00 protected): subject-ism after the
                # attacker's DreamBooth 0.351 vs 0.571 on the unhardened model; without retention 0.604;
                # unprotected synth-01 / synth-02 move +0.036 / -0.054. 60 outer x K=4, or the loss at theta'_K
                # only: no effect (0.55-0.58).
                "proxy": {"outer_iterations": 200, "retention_steps": 8, "learning_rate": 1e-3,
                          "retention_learning_rate": PROXY_FINETUNE["learning_rate"],
                          "num_class_images": PROXY_FINETUNE["num_class_images"], "num_targets": 8,
                          "class_prompt": "a photo of a {class_noun}", "target_prompt": "a photo of a purple dotted circle toy",
                          "erasure_prompt": "a photo of a plain background", **PROXY_CLASS_IMAGES}}
    paper = "Liu et al., arXiv 2502.16167 (no public code; METHODS.md 3, docs/persguard.md)"

    def budget_255(self) -> float | None:
        return None

    def triggers(self, class_noun: str) -> list[str]:
        p = self.params
        if p.setting == "white-box":
            return [_fill(p.instance_prompt, p.identifier, class_noun)]
        return [_fill(t, i, class_noun) for i in p.gray_box_identifiers for t in p.gray_box_prompts]

    def generated_inputs(self, class_nouns: list[str]) -> dict[str, dict]:
        p = self.params
        sampling = {"sampler": p.class_sampler, "steps": p.class_steps, "guidance": p.class_guidance}
        out = {f"class:{c}": {"prompt": _fill(p.class_prompt, "", c), "n": p.num_class_images, **sampling}
               for c in class_nouns}
        if p.objective in ("target", "erasure"):
            prompt = p.target_prompt if p.objective == "target" else p.erasure_prompt
            out[p.objective] = {"prompt": prompt, "n": p.num_targets, **sampling}
        return out

    def _generated(self, ctx: RunContext, model_dir: Path, name: str, request: dict) -> list[Image]:
        """A generated input: from its cached stage (``ctx.generated``), or generated now (direct library use) and
        kept there, so subjects sharing a class or the target images generate them once."""
        if name not in ctx.generated:
            from attacks.dreambooth import generate_class_images

            ctx.generated[name] = generate_class_images(model_dir, request["prompt"], request["n"], ctx,
                                                        request["sampler"], request["steps"], request["guidance"])
        return ctx.generated[name]

    def backdoor_targets(self, ctx: RunContext, model_dir: Path, class_noun: str) -> list[Image]:
        p = self.params
        if p.objective == "pattern":
            if p.pattern == "checkerboard":
                return [checkerboard(ctx.resolution)]
            return [fit(load_image(Path(p.pattern).expanduser()), ctx.resolution)]
        return self._generated(ctx, model_dir, p.objective, self.generated_inputs([class_noun])[p.objective])

    def build(self, ctx: RunContext, model_dir: Path, subjects: list) -> tuple[PersGuardTrainer, dict[str, Any]]:
        p = self.params
        if not subjects:
            raise ValueError("persguard: no subject to protect")
        comps = models.load_components(model_dir, ctx.device, allow_unsafe=ctx.allow_unsafe_weights)
        comps.vae.requires_grad_(False)
        comps.text_encoder.requires_grad_(False)
        gen = ctx.torch_generator()
        bs = p.train_batch_size
        protected, info = [], {"subjects": {}}
        for s in subjects:
            photos = s.load("B", ctx.resolution)
            if not photos:
                raise ValueError(f"persguard: subject {s.key()} has no set_B photos to protect")
            _check_images(photos, ctx.resolution, f"persguard: {s.key()} photo")
            requests = self.generated_inputs([s.class_noun])
            class_images = self._generated(ctx, model_dir, f"class:{s.class_noun}", requests[f"class:{s.class_noun}"])
            targets = self.backdoor_targets(ctx, model_dir, s.class_noun)
            triggers = self.triggers(s.class_noun)
            with torch.no_grad():
                emb = encode_prompt(comps.tokenizer, comps.text_encoder,
                                    triggers + [_fill(p.class_prompt, "", s.class_noun)]).detach()
            protected.append(_Protected(
                subject_id=s.id, photos=LatentCache(comps.vae, to_tensor(photos)),
                class_images=LatentCache(comps.vae, to_tensor(class_images)),
                targets=LatentCache(comps.vae, to_tensor(targets)), triggers=emb[:-1], class_emb=emb[-1:],
                photo_batches=_Batches(len(photos), 0, bs, gen), class_batches=_Batches(len(class_images), 0, bs, gen),
                target_batches=_Batches(len(targets), 0, bs, gen)))
            info["subjects"][s.id] = {"n_photos": len(photos), "n_class_images": len(class_images),
                                      "n_targets": len(targets), "triggers": triggers}
            info.setdefault("targets", {})[s.id] = targets
        trainer = PersGuardTrainer(comps.unet, comps.noise_scheduler, protected, p, gen, ctx.device)
        return trainer, info

    def harden(self, ctx: RunContext, model_dir: Path, subjects: list, out_dir: Path) -> None:
        p = self.params
        trainer, info = self.build(ctx, model_dir, subjects)
        start = time.perf_counter()
        for i in range(p.outer_iterations):
            trainer.outer_iteration()
            ctx.progress(i + 1, p.outer_iterations)
        wall = time.perf_counter() - start
        out_dir = Path(out_dir)
        save_hardened(ctx, model_dir, trainer.theta, out_dir)
        for sid, targets in info.pop("targets").items():
            for j, img in enumerate(targets):
                save_png(img, out_dir / TARGETS_DIR / sid / f"{j:03d}.png")
        last = trainer.losses[-1]
        extra = {"persguard_" + k: v for k, v in trainer.counts.items()}
        extra.update(persguard_wall_s=round(wall, 3), persguard_precision=trainer.precision,
                     persguard_objective=p.objective, persguard_setting=p.setting,
                     persguard_protected=sorted(info["subjects"]),
                     **{f"persguard_final_{k}_loss": v for k, v in last.items()})
        ctx.extra.update(extra)
        log = {"defense": self.name, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()},
               "seed": ctx.seed, **info, **extra, "losses": trainer.losses}
        (out_dir / "persguard_log.json").write_text(json.dumps(log, indent=1))
