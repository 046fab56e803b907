"""PID, the prompt-independent defense (Li et al., ICML 2024, "Towards Prompt-Agnostic / Prompt-Independent
Defense"; PKU-ML/Diffusion-PID-Protection ``PID.py`` + ``PID.sh``), as a ``perturb`` defense.

PID never calls the UNet nor a text encoder: it perturbs the images so that the VAE *encoder's* posterior
q(z|x+delta) = N(mu, sigma^2) moves away from the clean posterior, by signed L-inf ascent on (``loss``, PID.sh's
``--attack_type add-log`` by default)

    L = MSE(log sigma^2(x+delta), log sigma^2(x)) + MSE(mu(x+delta), mu(x))       (means over latent elements)

Other reference objectives are options: ``mean``, ``var`` (MSE of the std), ``add`` (mean + std MSE), ``kl``
(KL(N(mu_c, s_c) || N(mu_p, s_p)) averaged), ``latent_vector`` (MSE of posterior samples).

Defaults (PID.sh / PID.py): budget 12.75/255 (``--eps 12.75`` over 255 in the [0, 1] space), step 1/255,
``max_train_steps=1000`` passes over the images (batch 1: 1000 steps per image), uniform random start in the
eps-ball, fp32, SD v1.5's VAE. Units here: /255 pixels; the PGD runs in [-1, 1] (``defenses.pgd``). Each image's
loss only involves its own delta, so all images of a subject are attacked in one batch with summed per-image losses
(the same gradient signs as the reference's shuffled batch-1 loop).

Departures (documented in docs/data_defenses.md): the reference writes PNGs only when ``step % 25 == 0``, *before*
that step's update, so with 1000 steps the saved images carry 975 updates; ``quirk_save_every_25`` reproduces that.
Saving uses the harness's round-to-nearest quantisation clipped to floor(eps) (the reference's ``ToPILImage``
truncates). The random start is clipped to the valid pixel range at once (the reference clips after the first step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

from bench.plugins import DEFENSES, Defense, Image, RunContext
from bench.precision import autocast_for
from bench.registry import Requirements
from defenses.pgd import pgd_step, random_start
from defenses.single_model import _common_checks, _record, load_surrogate, run_batches

PAPER = ("Li et al., Towards Prompt-Agnostic / Prompt-Independent Defense, ICML 2024; "
         "PKU-ML/Diffusion-PID-Protection PID.py, PID.sh")
LOSSES = ("add-log", "mean", "var", "add", "kl", "latent_vector")
SAVE_EVERY = 25  # PID.py writes the images when step % 25 == 0, before the step's update


@dataclass(frozen=True)
class PIDParams:
    eps: float = 12.75  # /255 pixels (PID.sh --eps 12.75, i.e. 12.75/255 in [0, 1])
    alpha: float = 1.0  # /255 pixels (PID.py step 1/255 in [0, 1])
    steps: int = 1000  # PID.sh --max_train_steps=1000 (one step per image per pass)
    loss: Literal["add-log", "mean", "var", "add", "kl", "latent_vector"] = "add-log"  # PID.sh --attack_type
    random_start: bool = True  # delta ~ U(-eps, eps)
    quirk_save_every_25: bool = False  # reference: output = the images written at the last step % 25 == 0
    batch_size: int = 0  # images per PGD batch; 0 = all at once
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # PID.py runs fp32
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _common_checks(self)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")


def pid_loss(kind: str, clean, adv, gen: torch.Generator) -> torch.Tensor:
    """Per-image PID objective between the clean and perturbed VAE posteriors (diffusers ``latent_dist``), mean over
    the latent elements of each image (PID.py's ``reduction="mean"`` per batch-1 image)."""
    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(a.float(), b.float(), reduction="none").flatten(1).mean(1)

    if kind == "add-log":
        return mse(adv.logvar, clean.logvar) + mse(adv.mean, clean.mean)
    if kind == "mean":
        return mse(adv.mean, clean.mean)
    if kind == "var":
        return mse(adv.std, clean.std)
    if kind == "add":
        return mse(adv.mean, clean.mean) + mse(adv.std, clean.std)
    if kind == "kl":  # KL(N(mu_c, s_c) || N(mu_p, s_p)) per element
        s1, m1, s2, m2 = clean.std.float(), clean.mean.float(), adv.std.float(), adv.mean.float()
        kl = torch.log(s2 / s1) - 0.5 + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2)
        return kl.flatten(1).mean(1)
    if kind == "latent_vector":
        draw = lambda d: d.mean + d.std * torch.randn(d.mean.shape, generator=gen).to(d.mean)  # noqa: E731
        return mse(draw(adv), draw(clean))
    raise ValueError(f"unknown PID loss {kind!r}; known: {list(LOSSES)}")


def effective_steps(steps: int, quirk_save_every_25: bool) -> int:
    """Updates the saved images carry: ``steps``, or the reference's last multiple of 25 below ``steps``."""
    return (steps - 1) // SAVE_EVERY * SAVE_EVERY if quirk_save_every_25 else steps


@DEFENSES.register("pid", version=1)
class PID(Defense):
    """PID: L-inf PGD ascent on the distance between the VAE encoder's posteriors of the perturbed and the clean
    image (mean and log-variance by default); encoder only: no UNet, no prompt (ICML 2024)."""

    Params = PIDParams
    needs_model = True
    # paper-profile GPU estimate: VAE encoder, fp32, 512 px, batch 1: benchmarks/data_defense_costs.py
    requires = Requirements(white_box=True, gpu_memory_gb=4.3)
    profiles = {"tiny": {"steps": 20}}
    paper = PAPER

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        sur = load_surrogate(ctx, model_dir, None, p.gradient_checkpointing, self.name)  # VAE only
        autocast, precision = autocast_for(p.mixed_precision, ctx.device)
        steps = effective_steps(p.steps, p.quirk_save_every_25)

        def attack(x0: torch.Tensor, gen: torch.Generator, tick: Callable[[], None]):
            with torch.no_grad(), autocast:
                clean = sur.vae.encode(x0).latent_dist
            x = random_start(x0, p.eps, gen) if p.random_start else x0.clone()
            losses = []
            for _ in range(steps):
                x.requires_grad_(True)
                with autocast:
                    per = pid_loss(p.loss, clean, sur.vae.encode(x).latent_dist, gen)
                grad, = torch.autograd.grad(per.sum(), x)
                x = pgd_step(x.detach(), x0, grad, p.alpha, p.eps, ascend=True)
                losses.append(float(per.detach().mean()))
                tick()
            return x, {"pid_loss_first": losses[0] if losses else 0.0, "pid_loss_last": losses[-1] if losses else 0.0}

        out = run_batches(ctx, images, p.eps, max(steps, 1), p.batch_size, attack)
        _record(ctx, precision, p.gradient_checkpointing, sur)
        ctx.extra.update({"pid_loss": p.loss, "pid_updates": steps, "quirk_save_every_25": p.quirk_save_every_25})
        return out
