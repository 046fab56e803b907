"""Identity of synthetic subjects: the synthetic dataset's analogue of ArcFace, and two metrics in the shape of the
face protocols (ISM, and an identification rate in the place of FDFR), so that leaderboards over the built-in
synthetic subjects carry a protection-effectiveness column.

The identity model (``synthid``) is a small CNN embedding network trained by the harness, deterministically, on
synthetic subjects disjoint from the evaluation subjects (seeds ``IDENTITY_SEED_BASE``..; evaluation subjects use
seeds 0..999, proxy/tiny pre-training 1000..1999): a cosine-softmax subject classifier (the ArcFace family's
normalised-softmax training, without the margin) plus shape / pattern / colour heads, with noise, blur, colour and
flip augmentation so that generated (blurry, noisy) images embed near their subject. It is built on first use
(about 1-2 minutes on one CPU core) into the weights root (``bench weights list`` shows it as ``synthetic-identity-v1``)
and never downloaded. Same build parameters -> the same weight bytes (CPU).

Protocols (``higher_is_better`` from the defender's side):
- ``subject-ism/synthid-v1/ref=AB``: cosine of each generated image's embedding to the mean embedding of the
  subject's clean set_A + set_B, mean over images (every generated image has an embedding: no "no face" case).
- ``subject-idr/synthid-v1/ref=AB/candidates=10``: fraction of generated images whose nearest reference (cosine)
  among the subject and ``candidates - 1`` fixed distractor subjects (seeds ``DISTRACTOR_SEED_BASE``..) is the
  subject; chance is 1/candidates.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from bench import weights
from bench.images import checked_rgb
from bench.plugins import METRICS, Image, Metric, MetricInputs, subject_name
from bench.registry import Requirements

IDENTITY_VERSION = 1
IDENTITY_SEED_BASE = 2000  # training subjects (disjoint from evaluation 0..999 and model pre-training 1000..1999)
DISTRACTOR_SEED_BASE = 3000  # the identification rate's fixed distractor subjects
DISTRACTOR_IMAGES = 8  # reference images per distractor (indices 0..7), as set_A + set_B of a 4+4 subject
INPUT_PX = 32  # the network's input size (the proxy resolution): images are resized to it (PIL bilinear)
WEIGHTS_NAME = f"synthetic-identity-v{IDENTITY_VERSION}"


@dataclass(frozen=True)
class IdentityTraining:
    """How ``synthid`` is trained (hashed into nothing: bump IDENTITY_VERSION when any of these change)."""

    subjects: int = 384
    images_per_subject: int = 8
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3  # OneCycle peak, AdamW
    weight_decay: float = 1e-4
    embedding_dim: int = 64
    logit_scale: float = 16.0
    seed: int = 0


TRAINING = IdentityTraining()
CHANNELS = (24, 48, 64, 96)


def _network(n_subjects: int, dim: int):
    import torch
    from torch import nn

    class SubjectEmbedder(nn.Module):
        """4 stride-2 stages (conv-GN-SiLU x2), global average pool, linear embedding; training heads: cosine
        classifier over the training subjects and shape (8) / pattern (4) / colour (8) attribute heads."""

        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for a, b in zip((3,) + CHANNELS[:-1], CHANNELS):
                layers += [nn.Conv2d(a, b, 3, 2, 1), nn.GroupNorm(8, b), nn.SiLU(),
                           nn.Conv2d(b, b, 3, 1, 1), nn.GroupNorm(8, b), nn.SiLU()]
            self.body = nn.Sequential(*layers)
            self.embedding = nn.Linear(CHANNELS[-1], dim)
            self.classes = nn.Parameter(torch.randn(n_subjects, dim) * 0.1)
            self.shape = nn.Linear(dim, 8)
            self.pattern = nn.Linear(dim, 4)
            self.colour = nn.Linear(dim, 8)

        def forward(self, x):
            return self.embedding(self.body(x).mean((2, 3)))

    return SubjectEmbedder()


def _augment(x, gen):
    """Noise (sigma <= 0.15), a random mix with a 3x3 box blur, gain and colour shift, horizontal flip."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    x = x + torch.rand(n, 1, 1, 1, generator=gen) * 0.15 * torch.randn(x.shape, generator=gen)
    k = torch.rand(n, 1, 1, 1, generator=gen)
    x = x * (1 - k) + F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) * k
    x = x * (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)) + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.1
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x).clamp(-1, 1)


def build_identity_model(folder: Path, training: IdentityTraining = TRAINING) -> None:
    """Train ``synthid`` and write ``model.safetensors``, ``config.json`` and ``train_log.json`` to ``folder``."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from bench.datasets import render_synthetic, synthetic_attributes
    from bench.diffusion import to_tensor

    t = training
    start = time.perf_counter()
    seeds = range(IDENTITY_SEED_BASE, IDENTITY_SEED_BASE + t.subjects)
    x = to_tensor([render_synthetic(s, i, INPUT_PX) for s in seeds for i in range(t.images_per_subject)])
    labels = torch.arange(t.subjects).repeat_interleave(t.images_per_subject)
    attrs = torch.tensor([[a["shape_index"], a["pattern_index"], a["colour_index"]]
                          for a in (synthetic_attributes(s) for s in seeds)]).repeat_interleave(t.images_per_subject, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        net = _network(t.subjects, t.embedding_dim)
    gen = torch.Generator().manual_seed(t.seed + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, t.lr, total_steps=t.steps, pct_start=0.1)
    losses = []
    net.train()
    for _ in range(t.steps):
        idx = torch.randint(0, len(x), (t.batch_size,), generator=gen)
        e = net(_augment(x[idx], gen))
        logits = F.normalize(e, dim=1) @ F.normalize(net.classes, dim=1).T * t.logit_scale
        a = attrs[idx]
        loss = (F.cross_entropy(logits, labels[idx]) + F.cross_entropy(net.shape(e), a[:, 0])
                + F.cross_entropy(net.pattern(e), a[:, 1]) + F.cross_entropy(net.colour(e), a[:, 2]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"version": IDENTITY_VERSION, "input_px": INPUT_PX, "channels": list(CHANNELS), **asdict(t)}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "train_log.json").write_text(json.dumps({"losses": losses, "wall_s": time.perf_counter() - start}))


IDENTITY_WEIGHTS = weights.register(weights.Weights(
    name=WEIGHTS_NAME, what=f"synthid v{IDENTITY_VERSION}: CNN embedding of synthetic subjects, trained by the harness",
    used_by="subject-ism, subject-idr", files=("model.safetensors", "config.json"),
    source="built on this machine on first use (no download)", fetcher=build_identity_model, builds_locally=True))


class IdentityModel:
    """The trained ``synthid`` network in eval mode: ``embed(images)`` -> L2-normalised (N, dim) float64 arrays."""

    def __init__(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        if config.get("version") != IDENTITY_VERSION or tuple(config.get("channels", ())) != CHANNELS:
            raise RuntimeError(f"{folder}: synthid version {config.get('version')} does not match the code's "
                               f"{IDENTITY_VERSION}; delete the folder to rebuild it")
        self.net = _network(int(config["subjects"]), int(config["embedding_dim"]))
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.net.eval()
        self.torch = torch
        self.folder = str(folder)

    def _raw(self, images: list[Image], what: str):
        from bench.diffusion import to_tensor

        rgb = [_input(checked_rgb(im, f"{what} {i}")) for i, im in enumerate(images)]
        with self.torch.no_grad():
            return self.torch.cat([self.net(to_tensor(rgb[k:k + 64])) for k in range(0, len(rgb), 64)])

    def embed(self, images: list[Image], what: str = "image") -> np.ndarray:
        return self.torch.nn.functional.normalize(self._raw(images, what), dim=1).double().numpy()

    def attributes(self, images: list[Image], what: str = "image") -> np.ndarray:
        """(N, 3) predicted (shape, pattern, colour) indices, as ``bench.datasets.synthetic_attributes`` numbers them."""
        e = self._raw(images, what)
        with self.torch.no_grad():
            heads = (self.net.shape, self.net.pattern, self.net.colour)
            return np.stack([h(e).argmax(1).numpy() for h in heads], axis=1)


def _input(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == (INPUT_PX, INPUT_PX):
        return image
    from PIL import Image as PILImage

    return np.asarray(PILImage.fromarray(image).resize((INPUT_PX, INPUT_PX), PILImage.BILINEAR))


_MODEL: dict[str, IdentityModel] = {}
_REFS: dict[tuple, np.ndarray] = {}


def identity_model() -> IdentityModel:
    """The identity model, built (once per weights root) if absent."""
    folder = IDENTITY_WEIGHTS.path()
    if str(folder) not in _MODEL:
        _MODEL[str(folder)] = IdentityModel(folder)
    return _MODEL[str(folder)]


def reference_embedding(model: IdentityModel, images: list[Image]) -> np.ndarray:
    """Mean of the normalised embeddings of ``images``, normalised (Anti-DreamBooth ISM's mean reference)."""
    mean = model.embed(images, "reference image").mean(0)
    return mean / max(np.linalg.norm(mean), 1e-12)


def subject_reference(model: IdentityModel, subject) -> np.ndarray:
    key = (model.folder, "subject", subject.key(), subject.fingerprint())
    if key not in _REFS:
        images = [im for split in ("A", "B") for im in subject.load(split, INPUT_PX)]
        _REFS[key] = reference_embedding(model, images)
    return _REFS[key]


def distractor_references(model: IdentityModel, n: int) -> np.ndarray:
    """(n, dim) mean references of the fixed distractor subjects ``DISTRACTOR_SEED_BASE + k``."""
    from bench.datasets import render_synthetic

    key = (model.folder, "distractors", n)
    if key not in _REFS:
        _REFS[key] = np.stack([reference_embedding(model, [render_synthetic(DISTRACTOR_SEED_BASE + k, i, INPUT_PX)
                                                           for i in range(DISTRACTOR_IMAGES)]) for k in range(n)])
    return _REFS[key]


@dataclass(frozen=True)
class IdentityParams:
    candidates: int = 10  # subject-idr: the subject + candidates-1 distractors

    def validate(self) -> None:
        if not 2 <= self.candidates <= 1000:
            raise ValueError(f"candidates must be in 2..1000, got {self.candidates}")


class _SubjectIdentityMetric(Metric):
    """Defined for the built-in synthetic subjects only; elsewhere the cell reports NaN."""

    Params = IdentityParams
    target = "generated"
    higher_is_better = False
    requires = Requirements()
    paper: ClassVar[str] = "built in: the synthetic analogue of Anti-DreamBooth's ISM (ArcFace) and of face identification"

    applies_description = "the synthetic dataset's subjects (synthid knows no others)"

    def applies_to(self, subject) -> bool:
        return getattr(subject, "dataset", "") == "synthetic"

    def _embeddings(self, inputs: MetricInputs) -> tuple[IdentityModel, np.ndarray]:
        if not inputs.generated:
            raise ValueError(f"{self.name}: no generated images for {subject_name(inputs.subject)}")
        model = identity_model()
        return model, model.embed(inputs.generated, "generated image")


@METRICS.register("subject-ism", version=1)
class SubjectIsm(_SubjectIdentityMetric):
    """Identity score of synthetic subjects (synthid): cosine of each generated image's embedding to the mean clean
    set_A + set_B embedding, mean over generated images. In [-1, 1]; lower is better for the defender."""

    description = "cosine of synthid embeddings to the mean clean set_A+B embedding (synthetic subjects; ISM's shape)"

    def protocol_id(self) -> str:
        return f"subject-ism/synthid-v{IDENTITY_VERSION}/ref=AB"

    def compute(self, inputs: MetricInputs) -> float:
        model, gen = self._embeddings(inputs)
        return float(np.mean(gen @ subject_reference(model, inputs.subject)))


@METRICS.register("subject-idr", version=1)
class SubjectIdr(_SubjectIdentityMetric):
    """Identification rate of synthetic subjects (synthid): fraction of generated images whose nearest mean
    reference among the subject and ``candidates - 1`` fixed distractor subjects is the subject. In [0, 1], chance
    1/candidates; lower is better for the defender."""

    description = ("fraction of generated images identified as the subject among it and candidates-1 fixed synthetic "
                   "distractors (synthid, cosine to mean set_A+B references)")

    def protocol_id(self) -> str:
        return f"subject-idr/synthid-v{IDENTITY_VERSION}/ref=AB/candidates={self.params.candidates}"

    def compute(self, inputs: MetricInputs) -> float:
        model, gen = self._embeddings(inputs)
        refs = np.vstack([subject_reference(model, inputs.subject)[None],
                          distractor_references(model, self.params.candidates - 1)])
        return float(np.mean((gen @ refs.T).argmax(1) == 0))

