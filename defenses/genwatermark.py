"""GenWatermark, "Generative Watermarking Against Unauthorized Subject-Driven Image Synthesis" (Ma, Zhao, He, Li,
Backes, Zhang; arXiv 2306.07754): a ``watermark`` defense (DESIGN.md). The owner publishes watermarked photos; a
detector later tells whether an image was synthesised by a model personalised on them (METHODS.md 4).

What the paper fixes (abstract, METHODS.md 4), and how it is done here:

- **Phase 1: generator G and detector D learned jointly** on the subject's images. G is a small conv net producing a
  bounded residual, the published image is ``clip(x + G(x))`` saved as uint8. D is a binary CNN classifier (logit;
  ``detect`` returns sigmoid probabilities, higher = watermarked). D's loss is binary cross-entropy on clean (0) vs
  watermarked (1) images; G's loss is BCE(D(x_w), 1) + ``budget_weight`` * L_G with the paper's budget loss
  L_G = max(LPIPS(x, x_w) - p, 0). Both see the same random differentiable augmentation of x and x_w every step
  (flip, shift, blur, down-up resampling, Gaussian noise: a watermark that survives them is more likely to survive
  synthesis). Quantisation to uint8 is in the loop (straight-through rounding).
- **Phase 2: D fine-tuned on synthesised images.** The base model (``model_dir``, the profile's default model) is
  personalised through the harness's own attack plug-in (``phase2_attack``, at the profile's settings) once on the
  watermarked set and once on the clean set; each model generates ``phase2_images_per_prompt`` images for every
  ``phase2_prompts`` template; generations of the watermarked model are labelled 1, of the clean model 0, and D is
  fine-tuned on them (plus, with ``phase2_keep_phase1``, the phase-1 pairs so it does not forget the watermark).
  With ``calibrate``, D's output bias is then shifted so that the score threshold 0.5 (used by ``watermark-accuracy``)
  is the best balanced-accuracy threshold on those synthesised images (a choice of ours; the paper's is not known).
  All of this runs inside the ``protect`` stage, so it is cached with it: the fine-tuned models are temporary and only
  the published images and the detector are kept.
- Evaluation (metrics/watermark.py) uses the profile's generation prompts and seed = the cell seed. Phase 2 uses
  its own prompt list (``PHASE2_PROMPTS``, none of which is an evaluation prompt of any profile) and seeds offset by
  ``PHASE2_SEED_OFFSET`` (personalisation draws, class images) and ``PHASE2_GENERATION_SEED_OFFSET`` (initial noise),
  so the detector is evaluated on generations it never saw. ``ctx.extra`` and the detector's ``config.json`` count
  the synthesised images phase 2 trained on.

Budgets. ``budget: "lpips"`` (default, the paper's): L_G with threshold ``p`` (LPIPS v0.1, ``lpips_net`` trunk from
``bench.weights``; a suite naming it on a machine without those weights is refused before it runs, with the fetch
command); ``budget_255()`` is None and the realised LPIPS is recorded. ``budget: "linf"`` (an explicit alternative,
not the paper's): G's residual is ``tanh(.) * eps`` and the saved image is projected so every pixel is within
floor(eps)/255 of the clean one (``eps`` in /255 pixel units); ``budget_255()`` returns eps and the harness checks it
to the last pixel. The budget kind is a parameter, so it is in every cache key and in the row's params; ``ctx.extra``
gets the realised L-inf (/255), PSNR (dB) and, when measured, LPIPS.

Choices the paper leaves open (documented in docs/genwatermark.md): architectures (``Generator``, ``Detector``
below), optimiser (Adam), steps, batch size, learning rates, augmentations, p = 0.05 (not verified against the
paper), phase-2 prompt list, image counts and fine-tuning steps. Every random draw (network initialisation, batches,
augmentations, the phase-2 attack's draws and generation noise) comes from generators seeded from ``ctx.seed``;
torch on one CPU thread gives the same bytes for the same seed.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")
nn = lazy_import("torch.nn")
F = lazy_import("torch.nn.functional")

from bench.diffusion import to_tensor, to_uint8
from bench.plugins import DEFENSES, Defense, Image, RunContext
from defenses.baselines import project_to_budget

PAPER = "GenWatermark (Ma et al., arXiv 2306.07754), METHODS.md 4"
PHASE2_SEED_OFFSET = 800_000  # phase-2 personalisation draws and class images (evaluation: seed, class: +500_000)
PHASE2_GENERATION_SEED_OFFSET = 900_000  # phase-2 generation noise: image j of prompt i = seed + 900_000 + 1000 i + j
# Phase-2 prompt templates: none is an evaluation prompt of any profile (bench/profiles.py), so the detector never
# sees the evaluation's (prompt, seed) pairs.
PHASE2_PROMPTS = ("a {identifier} {class_noun}", "a picture of {identifier} {class_noun}",
                  "a close-up photo of the {identifier} {class_noun}", "{identifier} {class_noun}, high quality",
                  "a rendering of {identifier} {class_noun}", "a photo of the {identifier} {class_noun} on a table",
                  "a cropped photo of {identifier} {class_noun}", "a good photo of {identifier} {class_noun}")
INIT_OFFSET, BATCH_OFFSET, FINETUNE_OFFSET = 11, 12, 13
DETECTOR_FILE, CONFIG_FILE, GENERATOR_FILE = "detector.safetensors", "config.json", "generator.safetensors"
PHASE1_DETECTOR_FILE = "detector_phase1.safetensors"  # D before phase 2, kept for analysis (``detect(phase=1)``)


@dataclass(frozen=True)
class GenWatermarkParams:
    """Defaults: the paper where it says (LPIPS budget, two phases); otherwise documented choices (docs/genwatermark.md)."""

    budget: Literal["lpips", "linf"] = "lpips"  # the paper's LPIPS hinge, or the explicit L-inf alternative
    p: float = 0.05  # LPIPS threshold of L_G = max(LPIPS(x, x_w) - p, 0); budget "lpips" only
    lpips_net: Literal["alex", "vgg"] = "alex"
    eps: float | None = None  # budget "linf" only: L-inf bound in /255 pixel units (required there)
    budget_weight: float = 10.0  # weight of L_G in G's loss
    residual_scale: float = 1.0  # budget "lpips": G's residual is tanh(.) * residual_scale in [-1, 1] tensor units
    channels: int = 32  # width of G and D
    phase1_steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3  # Adam, G and D
    augment: bool = True
    phase2: bool = True
    phase2_attack: str = "dreambooth"  # the harness attack plug-in simulating the attacker (profile settings)
    phase2_attack_params: dict[str, Any] = field(default_factory=dict)  # overrides of that attack's parameters
    phase2_prompts: tuple[str, ...] = PHASE2_PROMPTS
    phase2_images_per_prompt: int = 8
    phase2_sampler: str = "default"
    phase2_sampling_steps: int = 50
    phase2_guidance: float = 7.5
    phase2_steps: int = 300  # D fine-tuning steps on the synthesised images
    phase2_learning_rate: float = 2e-4
    phase2_keep_phase1: bool = True  # also keep the phase-1 pairs (published = 1, clean = 0) in phase 2
    calibrate: bool = True  # shift D's bias so that score 0.5 is the best threshold on the phase-2 generations

    def validate(self) -> None:
        if self.budget == "linf":
            if self.eps is None or not 0 < self.eps <= 255:
                raise ValueError(f"budget 'linf' needs eps in (0, 255] (/255 pixel units), got {self.eps}")
        elif self.eps is not None:
            raise ValueError(f"eps ({self.eps}) applies to budget 'linf' only; budget 'lpips' uses p ({self.p})")
        if not 0 < self.p < 1:
            raise ValueError(f"p (LPIPS threshold) must be in (0, 1), got {self.p}")
        if not 0 < self.residual_scale <= 2:
            raise ValueError(f"residual_scale must be in (0, 2] ([-1, 1] tensor units), got {self.residual_scale}")
        for key in ("channels", "phase1_steps", "batch_size", "phase2_images_per_prompt", "phase2_sampling_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.phase2_steps < 0 or self.budget_weight < 0:
            raise ValueError(f"phase2_steps and budget_weight must be >= 0, got {self.phase2_steps}, {self.budget_weight}")
        if not self.learning_rate > 0 or not self.phase2_learning_rate > 0:
            raise ValueError("learning_rate and phase2_learning_rate must be > 0")
        if self.phase2 and not self.phase2_prompts:
            raise ValueError("phase2_prompts: give at least one prompt template")
        for t in self.phase2_prompts:
            try:
                t.format(identifier="x", class_noun="y")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"phase2_prompts: {t!r} may only use {{identifier}} and {{class_noun}} ({e})") from None


# ----------------------------------------------------------------------------------------------- networks

def nets():
    """``defenses.genwatermark_nets`` (the G and D networks), imported when first needed: it subclasses torch's
    nn.Module, and torch loads only when a stage computes (bench/lazy.py)."""
    from defenses import genwatermark_nets

    return genwatermark_nets


def __getattr__(name: str):  # `from defenses.genwatermark import Generator` keeps working
    if name in ("Generator", "Detector"):
        return getattr(nets(), name)
    raise AttributeError(name)


def _seeded_modules(seed: int, channels: int, bound: float) -> tuple[Generator, Detector]:
    with torch.random.fork_rng(devices=[]):  # nn init draws from the global RNG: seed it locally
        torch.manual_seed(seed)
        return nets().Generator(channels, bound), nets().Detector(channels)


# ----------------------------------------------------------------------------------------------- augmentations

def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def augment(pair: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random differentiable distortion applied identically to every image of ``pair`` (clean and watermarked
    batches stacked): identity, Gaussian blur (sigma 0.5-1.2), bilinear down-up resampling (x0.5-0.75), Gaussian noise
    (std 2-6/255), each with probability 1/4 (identity otherwise), then a random horizontal flip and a circular
    shift of up to 1/8 of the side."""
    choice = int(torch.randint(0, 4, (1,), generator=gen))
    u = float(torch.rand(1, generator=gen))
    if choice == 1:
        pair = _blur(pair, 0.5 + 0.7 * u)
    elif choice == 2:
        h, w = pair.shape[-2:]
        s = 0.5 + 0.25 * u
        small = F.interpolate(pair, size=(max(2, round(h * s)), max(2, round(w * s))), mode="bilinear", align_corners=False)
        pair = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    elif choice == 3:
        pair = pair + torch.randn(pair.shape, generator=gen) * (2 + 4 * u) * 2 / 255
    if float(torch.rand(1, generator=gen)) < 0.5:
        pair = pair.flip(-1)
    m = max(1, pair.shape[-1] // 8)
    dy, dx = (int(v) for v in torch.randint(-m, m + 1, (2,), generator=gen))
    return torch.roll(pair, shifts=(dy, dx), dims=(-2, -1)).clamp(-1, 1)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Straight-through rounding to the uint8 grid of [-1, 1] tensors (forward: the saved value; backward: identity)."""
    q = (torch.floor((x * 127.5 + 127.5) + 0.5).clamp(0, 255) - 127.5) / 127.5
    return x + (q - x).detach()


# ----------------------------------------------------------------------------------------------- phase 1

def lpips_loss_fn(net: str):
    """The differentiable LPIPS v0.1 of metrics/imperceptibility.py (same trunk from ``bench.weights``), frozen."""
    from metrics.imperceptibility import LPIPS_BACKBONES, lpips_model

    entry = LPIPS_BACKBONES[net]
    model = lpips_model(net, str(entry.path() / entry.files[0]))
    model.requires_grad_(False)
    return lambda a, b: model(a, b).reshape(-1)


@dataclass
class Phase1Result:
    generator: Generator
    detector: Detector
    log: dict[str, Any]


def train_phase1(images: list[Image], params: GenWatermarkParams, seed: int, progress=lambda d, t: None) -> Phase1Result:
    """Joint training of G and D on ``images`` (uint8 HxWx3, one shape): per step, a batch (with replacement) of the
    images, x_w = quantise(clip(x + G(x))), one augmentation shared by x and x_w; D step on BCE(clean 0, watermarked 1)
    with x_w detached, then G step on BCE(D(x_w), 1) + budget_weight * max(LPIPS(x, x_w) - p, 0) (budget "lpips") or
    BCE alone (budget "linf": G's bound tanh * eps already holds the budget). Seeds: init ``seed + 11``, batches and
    augmentations ``seed + 12``."""
    p = params
    bound = p.eps * 2 / 255 if p.budget == "linf" else p.residual_scale
    G, D = _seeded_modules(seed + INIT_OFFSET, p.channels, bound)
    lp = lpips_loss_fn(p.lpips_net) if p.budget == "lpips" else None
    x_all = to_tensor(images)
    gen = torch.Generator().manual_seed(seed + BATCH_OFFSET)
    opt_g = torch.optim.Adam(G.parameters(), lr=p.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=p.learning_rate, betas=(0.5, 0.999))
    bce = F.binary_cross_entropy_with_logits
    n = p.batch_size
    ones, zeros = torch.ones(n), torch.zeros(n)
    log: dict[str, list[float]] = {"d_loss": [], "g_bce": [], "g_budget": []}
    start = time.perf_counter()
    for step in range(p.phase1_steps):
        x = x_all[torch.randint(0, len(x_all), (n,), generator=gen)]
        xw = _quantise((x + G(x)).clamp(-1, 1))
        aug = augment(torch.cat([x, xw]), gen) if p.augment else torch.cat([x, xw])
        ax, axw = aug[:n], aug[n:]
        d_loss = bce(D(ax.detach()), zeros) + bce(D(axw.detach()), ones)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_bce = bce(D(axw), ones)
        g_budget = torch.relu(lp(xw, x) - p.p).mean() if lp is not None else torch.zeros(())
        g_loss = g_bce + p.budget_weight * g_budget
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if not torch.isfinite(g_loss) or not torch.isfinite(d_loss):
            raise FloatingPointError(f"genwatermark phase 1: non-finite loss at step {step + 1} (learning_rate "
                                     f"{p.learning_rate}); lower it")
        log["d_loss"].append(float(d_loss.detach()))
        log["g_bce"].append(float(g_bce.detach()))
        log["g_budget"].append(float(g_budget.detach()))
        progress(step + 1, p.phase1_steps)
    G.eval()
    D.eval()
    return Phase1Result(G, D, {**log, "wall_s": time.perf_counter() - start})


def watermark(G: Generator, images: list[Image], params: GenWatermarkParams) -> list[Image]:
    """Published images: uint8 of clip(x + G(x)) (bench.diffusion.to_uint8 rounding); budget "linf" projects each
    pixel to within floor(eps)/255 of the clean one (``project_to_budget``)."""
    with torch.no_grad():
        out = to_uint8((to_tensor(images) + G(to_tensor(images))).clamp(-1, 1))
    if params.budget == "linf":
        out = [project_to_budget(c, w.astype(np.float64), params.eps) for w, c in zip(out, images)]
    return [np.ascontiguousarray(o, dtype=np.uint8) for o in out]


def scores(D: Detector, images: list[Image], batch: int = 64) -> np.ndarray:
    """Sigmoid probabilities of D on uint8 images (higher = watermarked)."""
    D.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            out.append(torch.sigmoid(D(to_tensor(images[s:s + batch]))).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------------------------- phase 2

def finetune_detector(D: Detector, positives: list[Image], negatives: list[Image], steps: int, lr: float,
                      batch_size: int, seed: int, augmented: bool) -> list[float]:
    """Fine-tune D (in place) with BCE on positives (1) vs negatives (0): balanced batches of ``batch_size // 2``
    each, drawn with replacement, the same augmentation as phase 1 on the whole batch. Seed ``seed + 13``."""
    if not positives or not negatives:
        raise ValueError(f"genwatermark phase 2: needs positives and negatives (got {len(positives)}, {len(negatives)})")
    pos, neg = to_tensor(positives), to_tensor(negatives)
    gen = torch.Generator().manual_seed(seed + FINETUNE_OFFSET)
    opt = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    half = max(1, batch_size // 2)
    labels = torch.cat([torch.ones(half), torch.zeros(half)])
    D.train()
    losses = []
    for _ in range(steps):
        x = torch.cat([pos[torch.randint(0, len(pos), (half,), generator=gen)],
                       neg[torch.randint(0, len(neg), (half,), generator=gen)]])
        if augmented:
            x = augment(x, gen)
        loss = F.binary_cross_entropy_with_logits(D(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    D.eval()
    return losses


def calibrate(D: Detector, positives: list[Image], negatives: list[Image]) -> float:
    """Shift D's output bias (in place) so that the 0.5 threshold of ``detect`` is the one with the best balanced
    accuracy on phase 2's synthesised images (the midpoint between consecutive sorted logits; ties: the smallest
    shift). Only the phase-2 generations are used, never evaluation images. Returns the logit shift removed."""
    def logits(images):
        with torch.no_grad():
            return torch.cat([D(to_tensor(images[i:i + 64])) for i in range(0, len(images), 64)]).double().numpy()

    lp, ln = logits(positives), logits(negatives)
    v = np.unique(np.r_[lp, ln])
    cands = np.r_[v[0] - 1.0, (v[:-1] + v[1:]) / 2, v[-1] + 1.0] if len(v) > 1 else np.array([0.0])
    bal = np.array([((lp >= t).mean() + (ln < t).mean()) / 2 for t in cands])
    best = cands[bal >= bal.max() - 1e-12]
    t = float(best[np.argmin(np.abs(best))])
    with torch.no_grad():
        D.head.bias -= torch.tensor([t], dtype=D.head.bias.dtype)
    return t


def synthesise(ctx: RunContext, model_dir: Path, clean: list[Image], published: list[Image], class_noun: str,
               params: GenWatermarkParams) -> dict[str, Any]:
    """Phase 2's training data: the attack plug-in ``phase2_attack`` (profile settings, ``phase2_attack_params``
    overrides) personalises ``model_dir`` on ``published`` and on ``clean`` with the profile's instance and class
    prompts and the same draws (seed ``ctx.seed + PHASE2_SEED_OFFSET``); each model generates the phase-2 prompts with
    the same initial noise (``ctx.seed + PHASE2_GENERATION_SEED_OFFSET``). Returns {"positives", "negatives",
    "prompts", "seconds"}; the fine-tuned weights live in a temporary folder deleted here."""
    from attacks.dreambooth import generate_class_images
    from bench import models
    from bench.plugins import ATTACKS
    from bench.profiles import get_profile

    p = params
    prof = get_profile(ctx.profile, "genwatermark phase 2 profile")
    attack = ATTACKS.create(p.phase2_attack, dict(p.phase2_attack_params), profile=ctx.profile,
                            where=f"genwatermark phase2_attack {p.phase2_attack!r}")
    fill = dict(identifier=prof.identifier, class_noun=class_noun)
    instance_prompt = prof.instance_prompt.format(**fill)
    class_prompt = prof.class_prompt.format(**fill)
    prompts = [t.format(**fill) for t in p.phase2_prompts]
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="genwatermark-phase2-") as tmp:
        sub = RunContext(seed=ctx.seed + PHASE2_SEED_OFFSET, device=ctx.device, profile=ctx.profile,
                         resolution=ctx.resolution, work_dir=Path(tmp), allow_unsafe_weights=ctx.allow_unsafe_weights)
        start = time.perf_counter()
        n_class = attack.class_images_needed()
        class_images = generate_class_images(model_dir, class_prompt, n_class, sub, prof.class_sampler,
                                             prof.class_steps, prof.generation.guidance) if n_class else []
        timings["class_images_s"] = time.perf_counter() - start
        out: dict[str, list[Image]] = {}
        for label, train in (("positives", published), ("negatives", clean)):
            start = time.perf_counter()
            trained = Path(tmp) / label
            attack.train(sub, model_dir, train, instance_prompt, class_prompt, class_images, trained,
                         **attack.token_words(prof.identifier, class_noun))
            timings[f"train_{label}_s"] = time.perf_counter() - start
            start = time.perf_counter()
            pipe = models.set_sampler(attack.load_pipeline(model_dir, trained, ctx.device, ctx.allow_unsafe_weights),
                                      p.phase2_sampler)
            pairs = models.generate(pipe, prompts, p.phase2_images_per_prompt, p.phase2_sampling_steps,
                                    p.phase2_guidance, ctx.seed + PHASE2_GENERATION_SEED_OFFSET, ctx.resolution)
            out[label] = [im for _, im in pairs]
            timings[f"generate_{label}_s"] = time.perf_counter() - start
            del pipe
    return {**out, "prompts": prompts, "instance_prompt": instance_prompt, "n_class_images": len(class_images),
            "seconds": {k: round(v, 3) for k, v in timings.items()}}


# ----------------------------------------------------------------------------------------------- plug-in

def _psnr(a: Image, b: Image) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@DEFENSES.register("genwatermark", version=1)
class GenWatermark(Defense):
    """GenWatermark (Ma et al., arXiv 2306.07754): learned watermark generator + per-subject detector, the detector
    fine-tuned on images synthesised by models personalised on the watermarked and the clean photos (phase 2, inside
    the protect stage, cached with it). Budget: LPIPS hinge (paper) or ``budget: linf`` with ``eps`` in /255 pixel
    units (explicit alternative). See the module docstring and docs/genwatermark.md."""

    defense_kind = "watermark"
    needs_model = True  # phase 2 personalises the base model
    Params = GenWatermarkParams
    paper = PAPER
    # Small scales: steps and counts only, never the budget (tests/test_proxy.py checks that).
    profiles = {
        "tiny": {"phase1_steps": 30, "batch_size": 8, "channels": 16, "phase2_attack_params": {"max_train_steps": 1,
                 "num_class_images": 1}, "phase2_prompts": list(PHASE2_PROMPTS[:1]), "phase2_images_per_prompt": 2,
                 "phase2_sampler": "ddim", "phase2_sampling_steps": 2, "phase2_guidance": 3.0, "phase2_steps": 5},
        "proxy": {"phase1_steps": 200, "phase2_prompts": list(PHASE2_PROMPTS[:4]), "phase2_images_per_prompt": 8,
                  "phase2_sampler": "ddim", "phase2_sampling_steps": 20, "phase2_guidance": 5.0, "phase2_steps": 300},
    }

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._detector: Detector | None = None
        self._generator: Generator | None = None
        self._info: dict[str, Any] = {}
        self._phase1_state: dict[str, torch.Tensor] = {}

    def weight_names(self) -> tuple[str, ...]:
        if self.params.budget != "lpips":
            return ()
        from metrics.imperceptibility import LPIPS_BACKBONES

        return (LPIPS_BACKBONES[self.params.lpips_net].name,)

    def missing_weights(self) -> str | None:
        reason = super().missing_weights()
        if reason:
            return (f"{reason} (needed by the paper's LPIPS budget, budget: lpips; the explicit alternative is "
                    f"budget: linf with eps in /255 pixel units)")
        return None

    def budget_255(self) -> float | None:
        return self.params.eps if self.params.budget == "linf" else None

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        p = self.params
        if not images:
            raise ValueError("genwatermark: no images to protect")
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or any(im.dtype != np.uint8 for im in images):
            raise ValueError(f"genwatermark: expected uint8 HxWx3 images of one shape, got {sorted(shapes)}")
        if p.phase2 and model_dir is None:
            raise ValueError("genwatermark: phase 2 needs the base model (model_dir is None)")
        ph1 = train_phase1(images, p, ctx.seed, ctx.progress)
        published = watermark(ph1.generator, images, p)
        D = ph1.detector
        self._phase1_state = {k: v.detach().clone() for k, v in D.state_dict().items()}
        info: dict[str, Any] = {"phase1_wall_s": round(ph1.log["wall_s"], 3),
                                "phase1_final_d_loss": ph1.log["d_loss"][-1],
                                "phase1_train_accuracy": float(((scores(D, published) >= 0.5).mean()
                                                                + (scores(D, images) < 0.5).mean()) / 2)}
        n_synth = 0
        if p.phase2:
            start = time.perf_counter()
            syn = synthesise(ctx, Path(model_dir), images, published, subject.class_noun, p)
            pos, neg = list(syn["positives"]), list(syn["negatives"])
            n_synth = len(pos) + len(neg)
            if p.phase2_keep_phase1:
                pos, neg = pos + published, neg + list(images)
            t0 = time.perf_counter()
            losses = finetune_detector(D, pos, neg, p.phase2_steps, p.phase2_learning_rate, p.batch_size, ctx.seed,
                                       p.augment)
            shift = calibrate(D, syn["positives"], syn["negatives"]) if p.calibrate else 0.0
            info.update({"phase2_synth_images": n_synth, "phase2_synth_positives": len(syn["positives"]),
                         "phase2_synth_negatives": len(syn["negatives"]), "phase2_prompts": syn["prompts"],
                         "phase2_instance_prompt": syn["instance_prompt"], "phase2_class_images": syn["n_class_images"],
                         "phase2_generation_seed": ctx.seed + PHASE2_GENERATION_SEED_OFFSET,
                         "phase2_attack_seed": ctx.seed + PHASE2_SEED_OFFSET,
                         "phase2_finetune_wall_s": round(time.perf_counter() - t0, 3),
                         "phase2_final_loss": losses[-1] if losses else None, "calibration_logit_shift": shift,
                         "phase2_train_accuracy": float(((scores(D, syn["positives"]) >= 0.5).mean()
                                                         + (scores(D, syn["negatives"]) < 0.5).mean()) / 2),
                         "phase2_wall_s": round(time.perf_counter() - start, 3), "phase2_seconds": syn["seconds"]})
        else:
            info["phase2_synth_images"] = 0
        diffs = [int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max()) for a, c in zip(published, images)]
        info.update({"budget": p.budget, "realised_linf_255": max(diffs),
                     "psnr_db": float(np.mean([_psnr(a, c) for a, c in zip(published, images)]))})
        if p.budget == "lpips":
            from metrics.imperceptibility import lpips_distances

            info["lpips"] = float(np.mean(lpips_distances(list(zip(published, images)), p.lpips_net)))
        ctx.extra.update({f"genwatermark_{k}" if not k.startswith(("budget", "realised", "psnr", "lpips")) else k: v
                          for k, v in info.items()})
        # wall times go to the row only: the detector's config stays byte-identical for the same seed
        self._generator, self._detector = ph1.generator, D
        self._info = {k: v for k, v in info.items() if not k.endswith(("_s", "_seconds"))}
        return published

    def save_detector(self, ctx: RunContext, subject, out_dir: Path) -> None:
        """``detector.safetensors`` (D's state dict), ``generator.safetensors`` (G, for the record) and
        ``config.json`` (architecture, threshold, budget, phase-2 counts and seeds); also D before phase 2
        (``detector_phase1.safetensors``) so analyses can tell what phase 2 adds."""
        from safetensors.torch import save_file

        if self._detector is None or self._generator is None:
            raise RuntimeError("genwatermark: save_detector called before protect")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self._detector.state_dict().items()}, str(out_dir / DETECTOR_FILE))
        save_file({k: v.contiguous() for k, v in self._generator.state_dict().items()}, str(out_dir / GENERATOR_FILE))
        save_file({k: v.contiguous() for k, v in self._phase1_state.items()}, str(out_dir / PHASE1_DETECTOR_FILE))
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.params).items()}
        config = {"defense": self.name, "version": self.version, "paper": PAPER, "architecture": "Detector",
                  "channels": self.params.channels, "threshold": 0.5, "resolution": ctx.resolution,
                  "seed": ctx.seed, "params": params, "info": self._info}
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))

    @classmethod
    def load_detector(cls, detector_dir: Path, phase: int = 2) -> tuple[Detector, dict[str, Any]]:
        """D as used by ``detect`` (``phase=2``: after phase 2) or as phase 1 left it (``phase=1``), and the config."""
        from safetensors.torch import load_file

        detector_dir = Path(detector_dir)
        cfg_path, w_path = detector_dir / CONFIG_FILE, detector_dir / (DETECTOR_FILE if phase == 2 else PHASE1_DETECTOR_FILE)
        for f in (cfg_path, w_path):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; not a genwatermark detector folder")
        config = json.loads(cfg_path.read_text())
        D = nets().Detector(int(config["channels"]))
        D.load_state_dict(load_file(str(w_path)))
        return D.eval(), config

    @classmethod
    def detect(cls, detector_dir: Path, images: list[Image], phase: int = 2) -> np.ndarray:
        """One sigmoid probability per image (higher = watermarked; threshold 0.5). Images of another size than the
        detector's training resolution are fitted to it first (``bench.images.fit``: resize + centre crop)."""
        D, config = cls.load_detector(detector_dir, phase)
        res = int(config["resolution"])
        fixed = []
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"genwatermark detect: image {i} must be uint8 HxWx3, got "
                                 f"{getattr(im, 'dtype', type(im).__name__)}{getattr(im, 'shape', '')}")
            if im.shape[:2] != (res, res):
                from bench.images import fit

                im = fit(im, res)
            fixed.append(im)
        return scores(D, fixed)
