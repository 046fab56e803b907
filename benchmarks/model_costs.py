"""CPU cost (seconds) of the tiny-profile model work: pre-training each tiny variant, one DreamBooth step, one
LoRA-DreamBooth step, generating one image, and encode-once (LatentCache) versus re-encoding every step.

    .venv/bin/python benchmarks/model_costs.py [--variants a b] [--steps 10]

Per-step costs are the difference between a run of ``steps + 2`` and a run of 2 steps, divided by ``steps``, so
model loading and warm-up are not counted. Numbers depend on the machine's load: run it alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.dreambooth import generate_class_images  # noqa: E402
from bench import models  # noqa: E402
from bench.datasets import render_synthetic  # noqa: E402
from bench.diffusion import LatentCache, to_tensor  # noqa: E402
from bench.plugins import ATTACKS, RunContext  # noqa: E402
from bench.profiles import PROFILES  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_cost(name: str, model: Path, images, class_images, work: Path, steps: int) -> float:
    """Seconds per training step of attack ``name`` at the tiny profile (batch 2 + 2 prior images)."""
    ctx = RunContext(seed=0, device="cpu", profile="tiny", resolution=64, work_dir=work)
    walls = []
    for n in (2, steps + 2):
        attack = ATTACKS.create(name, {"max_train_steps": n}, profile="tiny")
        attack.train(ctx, model, images, "a photo of sks toy", "a photo of a toy", class_images, work / f"{name}{n}")
        walls.append(json.loads((work / f"{name}{n}" / "train_log.json").read_text())["wall_s"])
    return (walls[1] - walls[0]) / steps


def encode_costs(model: Path, images, repeat: int) -> tuple[float, float]:
    """(seconds to VAE-encode a batch of 4 and sample, seconds to sample the same batch from a LatentCache)."""
    c = models.load_components(model)
    x = to_tensor(images)
    cache = LatentCache(c.vae, x)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc = min(timed(lambda: c.vae.encode(x).latent_dist.sample(generator=gen)) for _ in range(repeat))
    cached = min(timed(lambda: cache.sample(range(len(x)), gen)) for _ in range(repeat))
    return enc, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["a", "b"])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    profile = PROFILES["tiny"]
    pretrain = {**models.PRETRAIN_DEFAULTS, **profile.pretrain}
    work = Path(tempfile.mkdtemp(prefix="model_costs-"))
    rows = []
    for v in args.variants:
        t = timed(lambda: models.prepare_tiny(v, work / f"tiny-{v}", profile.pretrain, seed=0,
                                              resolution=profile.resolution))
        rows.append((f"pre-train tiny:{v} (vae {pretrain['vae_steps']} + unet {pretrain['unet_steps']} steps, "
                     f"batch {pretrain['batch_size']})", t))
    model = work / f"tiny-{args.variants[0]}"
    images = [render_synthetic(3, i, profile.resolution) for i in range(4)]
    ctx = RunContext(seed=0, device="cpu", profile="tiny", resolution=profile.resolution, work_dir=work)
    gen = profile.generation
    generate_class_images(model, "a photo of a toy", 1, ctx, gen.sampler, gen.steps, gen.guidance)  # warm-up
    t = timed(lambda: generate_class_images(model, "a photo of a toy", 8, ctx, gen.sampler, gen.steps, gen.guidance))
    rows.append((f"generate, per image ({gen.sampler}, {gen.steps} steps, CFG {gen.guidance}, batch 8, incl. load)", t / 8))
    class_images = generate_class_images(model, "a photo of a toy", 4, ctx, gen.sampler, gen.steps, gen.guidance)
    db = step_cost("dreambooth", model, images, class_images, work, args.steps)
    rows.append(("dreambooth step (2 instance + 2 prior, UNet + text encoder)", db))
    rows.append(("lora-dreambooth step (2 instance + 2 prior, rank 4)", step_cost("lora-dreambooth", model, images,
                                                                                 class_images, work, args.steps)))
    enc, cached = encode_costs(model, images, 5)
    rows.append(("VAE encode + sample, 4 images (re-encode every step)", enc))
    rows.append(("LatentCache sample, 4 images (encode once)", cached))
    rows.append((f"dreambooth step speed-up from encoding once: x{(db + enc) / (db + cached):.2f}", float("nan")))
    width = max(len(r[0]) for r in rows)
    for name, sec in rows:
        print(f"{name:<{width}}  " + ("" if sec != sec else f"{sec:8.3f} s"))


if __name__ == "__main__":
    main()
