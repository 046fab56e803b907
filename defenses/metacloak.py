"""MetaCloak (Liu et al., CVPR 2024 oral; liuyixin-louis/MetaCloak ``robust_facecloak/attacks/algs/metacloak.py``,
``attacks/worker/robust_pgd_worker.py``, ``script/sub/gen/metacloak.sh``; METHODS.md 0 and 5.7) as a ``perturb``
defense built on the Anti-DreamBooth engine (defenses/anti_dreambooth.py: model loading, class images, DreamBooth
steps with prior preservation).

1. Surrogate pool: DreamBooth on the (still clean) set_B for ``pool_train_steps`` = 1000 steps (lr 5e-7, prior
   preservation, text encoder trained), keeping the weights after steps {0, 199, 399, 599, 799, 999}
   (``interval`` = 200): 6 trajectory members (kept on the CPU, as state dicts in the reference).
2. Meta loop: ``trials`` = 4 x members x (``interval`` / ``advance_steps`` = 100) iterations of
   a. robust PGD: ``pgd_steps`` = 6 signed ascent steps on L_dn (prompt "a photo of sks person", VAE posterior
      sample, one (t, eps) per image) of EOT-transformed images, ``eot_samples`` = 1 transform draw per step;
   b. ``advance_steps`` = 2 DreamBooth steps of the member on the current perturbed images (unrolled trajectory),
   each member restarting from its pool weights. Paper scale: 4 x 6 x 100 x 6 = 14,400 PGD steps
   (``schedule_counts``).
EOT (``train_mode=gau``): GaussianBlur(kernel 7, sigma ~ U(0.1, 2.0)) then RandomHorizontalFlip(0.5), one draw for
the whole batch per call (torchvision on a batched tensor); the reference's Resize(512) + CenterCrop(512) is the
identity on images already at the profile's resolution and is left out. The inner min-max attacker has radius 0 in
the reference (disabled) and is not offered. Budget r = 11 /255 pixels in the reference's [0, 255] space, step
r / 10 = 1.1, no random start. Saving rounds to the nearest pixel value (the reference truncates with
``astype(uint8)``); both stay within 11/255.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

from bench.diffusion import LatentCache, denoising_loss, to_tensor
from bench.plugins import DEFENSES, Image, RunContext
from bench.registry import Requirements
from defenses.anti_dreambooth import _PROXY, _TINY, _AntiDreamBooth, _Common, _restore, _snapshot
from defenses.pgd import pgd_step, save_within_budget

PAPER = "Liu et al., MetaCloak, CVPR 2024 (arXiv 2311.13127); liuyixin-louis/MetaCloak metacloak.py + metacloak.sh"


@dataclass(frozen=True)
class MetaCloakParams(_Common):
    eps: float = 11.0  # r = 11 in [0, 255]
    alpha: float = 1.1  # r / 10
    pool_train_steps: int = 1000  # total_train_steps
    interval: int = 200  # pool snapshot interval and meta iterations per member (x advance_steps)
    trials: int = 4  # total_trail_num
    advance_steps: int = 2  # unrolled DreamBooth steps after each PGD call
    pgd_steps: int = 6  # defense_pgd_step_num
    eot_samples: int = 1  # defense_sample_num
    blur_kernel: int = 7  # gau_kernel_size
    blur_sigma: tuple[float, ...] = (0.1, 2.0)  # torchvision GaussianBlur's default sigma range
    hflip: bool = True  # transform_hflip

    def validate(self) -> None:
        super().validate()
        if min(self.pool_train_steps, self.interval, self.trials, self.advance_steps, self.pgd_steps,
               self.eot_samples) < 1:
            raise ValueError("pool_train_steps, interval, trials, advance_steps, pgd_steps, eot_samples must be >= 1")
        if self.interval > self.pool_train_steps or self.interval < self.advance_steps:
            raise ValueError(f"need advance_steps <= interval <= pool_train_steps, got {self.advance_steps}, "
                             f"{self.interval}, {self.pool_train_steps}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and >= 1, got {self.blur_kernel}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {list(self.blur_sigma)}")


def pool_steps(total: int, interval: int) -> list[int]:
    """Training-step indices after which a pool member is kept: 0 and every interval-th step's last index."""
    return sorted({0} | {k * interval - 1 for k in range(1, total // interval + 1)})


def schedule_counts(p: MetaCloakParams) -> dict[str, int]:
    """PGD steps, unrolled training steps and pool training steps of one run (per subject)."""
    members = len(pool_steps(p.pool_train_steps, p.interval))
    iters = p.trials * members * (p.interval // p.advance_steps)
    return {"pool_members": members, "meta_iterations": iters, "pgd_steps": iters * p.pgd_steps,
            "advance_train_steps": iters * p.advance_steps, "pool_train_steps": p.pool_train_steps}


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` on NCHW: separable Gaussian of ``kernel`` taps, reflect padding."""
    half = (kernel - 1) / 2
    pos = torch.linspace(-half, half, kernel, dtype=x.dtype, device=x.device)
    w = torch.exp(-0.5 * (pos / sigma) ** 2)
    w = w / w.sum()
    c = x.shape[1]
    pad = kernel // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, w.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(y, w.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def eot_transform(x: torch.Tensor, p: MetaCloakParams, gen: torch.Generator) -> tuple[torch.Tensor, float, bool]:
    """One draw of MetaCloak's ``gau`` defense transform for the batch: blur (sigma ~ U(low, high)), then a flip
    with probability 0.5. Returns (transformed, sigma, flipped)."""
    lo, hi = p.blur_sigma
    sigma = float(lo + (hi - lo) * torch.rand((), generator=gen))
    y = gaussian_blur(x, p.blur_kernel, sigma)
    flipped = bool(p.hflip and float(torch.rand((), generator=gen)) < 0.5)
    return (torch.flip(y, dims=[-1]) if flipped else y), sigma, flipped


@DEFENSES.register("metacloak", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class MetaCloak(_AntiDreamBooth):
    """MetaCloak: robust (EOT) PGD meta-learned over a pool of DreamBooth trajectory snapshots, each unrolled by a few
    training steps on the current perturbation (CVPR 2024)."""

    Params = MetaCloakParams
    paper = PAPER
    # the Anti-DreamBooth training/PGD footprint (fp32 weights + bf16 autocast, benchmarks/aspl_memory.py); the pool's
    # 6 snapshots of UNet + text encoder (~29 GB fp32 at SD2.1-base) wait in CPU memory
    requires = Requirements(white_box=True, gpu_memory_gb=24.0)
    profiles = {"tiny": {**_TINY, "pool_train_steps": 4, "interval": 2, "trials": 1, "advance_steps": 1, "pgd_steps": 2},
                # proxy: the paper's loop shape at 1/10 of its length (the full one is 14,400 PGD steps per subject)
                "proxy": {**_PROXY, "pool_train_steps": 100, "interval": 20}}

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.eot_log: list[tuple[float, bool]] = []
        self.member_log: list[int] = []

    def _robust_pgd(self, m, x: torch.Tensor, x0: torch.Tensor, emb: torch.Tensor, gen: torch.Generator, prec) -> torch.Tensor:
        """``pgd_steps`` signed steps on the EOT-averaged L_dn (gradients of ``eot_samples`` draws summed)."""
        p, c = self.params, m.comps
        dtype = next(c.vae.parameters()).dtype
        for _ in range(p.pgd_steps):
            grad = torch.zeros_like(x)
            for _ in range(p.eot_samples):
                xs = x.detach().clone().requires_grad_(True)
                xt, sigma, flipped = eot_transform(xs, p, gen)
                self.eot_log.append((sigma, flipped))
                with prec.autocast():
                    dist = c.vae.encode(xt.to(dtype)).latent_dist
                    z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean)) \
                        * c.vae.config.scaling_factor
                    loss = denoising_loss(c.unet, c.noise_scheduler, z, emb.expand(len(z), -1, -1), gen)
                g, = torch.autograd.grad(loss, xs)
                grad += g
            x = pgd_step(x, x0, grad, p.alpha, p.eps, ascend=True)
        return x

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        start = time.perf_counter()
        engine, _, roles, _, _ = self._setup(ctx, subject, model_dir)
        role, folder = roles[0]
        m = self._prepare(ctx, engine, role, folder, subject, [], ctx.device)
        self.models = [m]
        dtype = next(m.comps.vae.parameters()).dtype
        x0 = to_tensor(images).to(ctx.device)
        # 1. the pool: DreamBooth on clean set_B, snapshots along the trajectory
        keep = pool_steps(p.pool_train_steps, p.interval)
        clean = LatentCache(m.comps.vae, x0.to(dtype))
        pool: dict[int, list[torch.Tensor]] = {}
        for step in range(p.pool_train_steps):
            engine.train(m, clean, 1, "pool")
            if step in keep:
                pool[step] = _snapshot(m.trainable, "cpu")
        # 2. the meta loop
        emb = engine._pgd_embedding(m)
        x = x0.clone()
        self.eot_log, self.member_log = [], []
        per_member = p.interval // p.advance_steps
        total, done = p.trials * len(keep) * per_member, 0
        for _ in range(p.trials):
            for key in keep:
                _restore(m.trainable, pool[key])
                self.member_log.append(key)
                for _ in range(per_member):
                    frozen = [(q, q.requires_grad) for q in m.trainable]
                    for q, _flag in frozen:
                        q.requires_grad_(False)
                    try:
                        x = self._robust_pgd(m, x, x0, emb, engine.gen, engine.prec)
                    finally:
                        for q, flag in frozen:
                            q.requires_grad_(flag)
                    engine.trace.append(("pgd_call", key))
                    engine.train(m, LatentCache(m.comps.vae, x.detach().to(dtype)), p.advance_steps, "advance")
                    done += 1
                    ctx.progress(done, total)
        out = save_within_budget(x, images, p.eps)
        self.trace = engine.trace
        self._record(ctx, engine, out, images, time.perf_counter() - start)
        counts = schedule_counts(p)
        ctx.extra.update({"pool_members": keep, "pgd_steps_total": counts["pgd_steps"], "eot_draws": len(self.eot_log),
                          "eot_flips": sum(f for _, f in self.eot_log), "schedule": counts,
                          "pgd_s_per_step": round((time.perf_counter() - start) / max(counts["pgd_steps"], 1), 4)})
        return out

