"""SimAC (Wang et al., CVPR 2024, "SimAC: A Simple Anti-Customization Method for Protecting Face Privacy against
Text-to-Image Synthesis of Diffusion Models"; somuchtome/SimAC ``attacks/time_feature.py``,
``scripts/attack_timestep.sh``) as a ``perturb`` defense built on ASPL (defenses/anti_dreambooth.py; METHODS.md 5.6).

1. Adaptive greedy timestep selection, per image, against the initial surrogate: T = {0..N-1}; while |T| > 100
   (at most ``select_max_steps`` = 50 iterations): draw ``select_samples`` = 5 timesteps from T, score each by
   sum |d L_dn / d x| (fresh VAE sample and noise per draw), remove the window [t_min - 20, t_min + 20) around the
   lowest-scoring t (t_min clamped to [``delta_t``, N - ``delta_t``]), and take one PGD step at the highest-scoring t
   on a working copy of the image. As in the reference, that copy only steers the scores: stage 2 starts from the
   clean image.
2. ASPL: 50 rounds x [3 surrogate steps on clean set_A, 6 PGD steps, 3 steps on the perturbed set_B], the PGD
   timestep of each image drawn uniformly from its own T, and the loss L_dn + L_feat, L_feat = MSE between the
   output features (``conv2``, before the shortcut) of the ResNets of the UNet's last up block (``up_blocks[3]`` in
   SD) for the perturbed latents and for a posterior sample of the clean images, same noise and t, no gradient
   through the clean pass.

``feature_grad`` (default True, the paper): L_feat is differentiated. False reproduces the reference, which adds
``target_loss.detach().item()``: a constant, so the effective loss is L_dn on the selected timesteps (issue #3,
METHODS.md 7). Budget 16/255 in [-1, 1] = 8 /255 pixels; step 0.005 in [-1, 1] = 0.6375 /255 pixels.

Departures (docs/data_defenses.md): the reference's clean-feature pass encodes the images at the start of each PGD
call (the previous round's perturbed images after round 1); here the clean images (the paper's x). If the
iteration cap ends the selection with |T| > 100 the reference drops that image's list (then misaligns the lists);
here the remaining T is kept. N = the scheduler's ``num_train_timesteps`` (1000 in SD and the tiny models).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

from bench.diffusion import LatentCache, denoising_loss
from bench.plugins import DEFENSES, RunContext
from bench.precision import precision_for
from bench.registry import Requirements
from defenses.anti_dreambooth import _PROXY, _TINY, ASPLParams, _ASPLBase, _Engine, _Model
from defenses.pgd import pgd_step

FEATURE_GEN_OFFSET = 78_000  # the clean-feature posterior samples
PAPER = "Wang et al., SimAC, CVPR 2024 (arXiv 2312.07865); somuchtome/SimAC attacks/time_feature.py @b0c69ad"


@dataclass(frozen=True)
class SimACParams(ASPLParams):
    """scripts/attack_timestep.sh + time_feature.py defaults."""

    eps: float = 8.0  # --pgd_eps=16, divided by 255 in [-1, 1] -> 8 /255 pixels
    alpha: float = 0.6375  # --pgd_alpha=0.005 in [-1, 1]
    select_max_steps: int = 50  # --max_steps
    select_samples: int = 5  # timesteps scored per iteration
    select_keep: int = 100  # stop once |T| <= select_keep
    delta_t: int = 20  # --delta_t: clamp of the removed window's centre
    select_window: int = 20  # removed: [t - 20, t + 20)
    feature_loss: bool = True  # L_feat on the last up block's ResNet features
    feature_grad: bool = True  # False: the reference's detached (constant) feature term

    def validate(self) -> None:
        super().validate()
        if min(self.select_max_steps, self.select_samples, self.select_keep, self.select_window) < 1 or self.delta_t < 0:
            raise ValueError("select_max_steps, select_samples, select_keep and select_window must be >= 1, delta_t >= 0")
        if self.lora_surrogate:
            raise ValueError("SimAC trains the full UNet and text encoder (lora_surrogate must be false)")


def score_draw(m: _Model, x: torch.Tensor, t: int, emb: torch.Tensor, gen: torch.Generator, prec) -> tuple[float, torch.Tensor]:
    """One selection draw for one image (1xCxHxW): L_dn at timestep ``t`` with a fresh posterior sample and noise;
    returns (sum |d L / d x|, d L / d x)."""
    c = m.comps
    xs = x.detach().clone().requires_grad_(True)
    dtype = next(c.vae.parameters()).dtype
    with prec.autocast():
        dist = c.vae.encode(xs.to(dtype)).latent_dist
        vae_eps = torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
        z0 = (dist.mean + dist.std * vae_eps) * c.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        loss = denoising_loss(c.unet, c.noise_scheduler, z0, emb, None, torch.tensor([t], device=x.device), noise)
    g, = torch.autograd.grad(loss, xs)
    return float(g.abs().sum()), g


def select_timesteps(m: _Model, x0: torch.Tensor, p: SimACParams, gen: torch.Generator, prec, emb: torch.Tensor,
                     log: list[tuple] | None = None) -> list[torch.Tensor]:
    """SimAC stage 1 (``select_timestep``): for each image, the greedy set of timesteps T_i (sorted LongTensor)."""
    n_t = int(m.comps.noise_scheduler.config.num_train_timesteps)
    if not 2 * p.delta_t < n_t:
        raise ValueError(f"delta_t={p.delta_t} leaves no timestep of {n_t}")
    out = []
    for i in range(len(x0)):
        orig = x0[i:i + 1]
        x = orig.clone()
        mask = torch.ones(n_t, dtype=torch.bool)
        for _ in range(p.select_max_steps):
            remaining = torch.nonzero(mask).flatten()
            if len(remaining) <= p.select_keep:
                break
            draws = [int(remaining[int(torch.randint(0, len(remaining), (1,), generator=gen))])
                     for _ in range(p.select_samples)]
            scores = [score_draw(m, x, t, emb, gen, prec)[0] for t in draws]
            t_min = draws[min(range(len(draws)), key=lambda k: scores[k])]  # first minimum, as the reference's strict <
            t_max = draws[max(range(len(draws)), key=lambda k: scores[k])]
            centre = min(max(t_min, p.delta_t), n_t - p.delta_t)
            mask[max(centre - p.select_window, 0):centre + p.select_window] = False
            _, g = score_draw(m, x, t_max, emb, gen, prec)
            x = pgd_step(x, orig, g, p.alpha, p.eps, ascend=True)  # steers the later scores only
            if log is not None:
                log.append((i, draws, t_min, t_max))
        out.append(torch.nonzero(mask).flatten())
    return out


class _SimACEngine(_Engine):
    """ASPL's engine with SimAC's PGD: t from each image's selected set, plus the decoder-feature term."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.timesteps: list[torch.Tensor] = []  # T_i per image (set by stage 1)
        self.used_t: list[list[int]] = []  # the PGD timesteps of every step (tests)
        self.clean: LatentCache | None = None  # posteriors of the clean set_B (feature reference)
        self.features: list[torch.Tensor] = []
        self.feature_values: list[float] = []
        self.recording = False  # features are kept during PGD only (not in the training steps)
        self.feature_gen = self.ctx.torch_generator(FEATURE_GEN_OFFSET)  # own draws: feature_grad=False == no term

    def input_gradient(self, m: _Model, x: torch.Tensor, emb: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        self.recording, self.features = True, []
        try:
            return super().input_gradient(m, x, emb)
        finally:
            self.recording, self.features = False, []

    def draw_timesteps(self, noise_scheduler, n: int) -> torch.Tensor:
        if len(self.timesteps) != n:
            raise RuntimeError(f"SimAC: {len(self.timesteps)} timestep sets for {n} images")
        t = torch.stack([ts[int(torch.randint(0, len(ts), (1,), generator=self.gen))] for ts in self.timesteps])
        self.used_t.append(t.tolist())
        return t

    def hook_features(self, m: _Model) -> list:
        """Record the ``conv2`` output of every ResNet of the UNet's last up block at each forward."""
        def keep(module, args, output):
            if self.recording:
                self.features.append(output)
        return [r.conv2.register_forward_hook(keep) for r in m.comps.unet.up_blocks[-1].resnets]

    def extra_loss(self, m: _Model, sl: slice, n: int, noise: torch.Tensor, t: torch.Tensor,
                   emb: torch.Tensor) -> torch.Tensor | None:
        p = self.p
        adv, self.features = self.features, []
        if not p.feature_loss:
            return None
        c = m.comps
        with torch.no_grad(), self.prec.autocast():
            z_clean = self.clean.sample(list(range(sl.start, sl.stop)), self.feature_gen).to(noise)
            c.unet(c.noise_scheduler.add_noise(z_clean, noise, t), t, emb.expand(len(z_clean), -1, -1))
        clean, self.features = self.features, []
        per_image = sum(a[0].numel() for a in adv)
        feat = sum(F.mse_loss(a.float(), b.float(), reduction="sum") for a, b in zip(adv, clean)) / (n * per_image)
        self.feature_values.append(float(feat.detach()))
        return feat if p.feature_grad else feat.detach()


@DEFENSES.register("simac", version=2)  # 2: bf16 autocast on bf16 CPUs (bench/precision.py), fused AdamW
class SimAC(_ASPLBase):
    """SimAC: per-image adaptive timestep selection, then ASPL restricted to each image's selected timesteps with the
    decoder-feature interference loss (CVPR 2024; METHODS.md 5.6)."""

    Params = SimACParams
    paper = PAPER
    # ASPL's accounting (SD2.1-base, fp32 + bf16 autocast) plus one no-grad clean UNet pass per PGD step
    requires = Requirements(white_box=True, gpu_memory_gb=24.0)
    profiles = {"tiny": {**_TINY, "rounds": 3, "select_max_steps": 6, "select_keep": 800},
                "proxy": {**_PROXY}}

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.selection_log: list[tuple] = []

    def _engine(self, ctx: RunContext) -> _SimACEngine:
        self._last_engine = _SimACEngine(self.params, ctx, precision_for(self.params.mixed_precision, ctx.device), self.loop_options,
                            False)
        return self._last_engine

    def _before_rounds(self, ctx: RunContext, engine: _SimACEngine, x0: torch.Tensor) -> None:
        m = self.models[0]
        dtype = next(m.comps.vae.parameters()).dtype
        emb = engine._pgd_embedding(m)
        self.selection_log = []
        engine.timesteps = select_timesteps(m, x0, self.params, engine.gen, engine.prec, emb, self.selection_log)
        engine.clean = LatentCache(m.comps.vae, x0.to(dtype))
        if self.params.feature_loss:
            self._hooks = engine.hook_features(m)
        ctx.extra.update({"simac_timesteps_per_image": [len(t) for t in engine.timesteps],
                          "simac_selection_iterations": len(self.selection_log),
                          "feature_loss": self.params.feature_loss, "feature_grad": self.params.feature_grad})

    def protect(self, ctx: RunContext, images, subject, model_dir):
        self._hooks = []
        try:
            out = super().protect(ctx, images, subject, model_dir)
        finally:
            for h in self._hooks:
                h.remove()
        return out
