from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# runs stay in the test process (monkeypatched profiles and registries reach the stages); the parallel executor's own
# tests pass --jobs
os.environ.setdefault("BENCH_JOBS", "1")

from bench.cli import configure_threads, quiet_libraries  # noqa: E402

configure_threads()
quiet_libraries()

import tests.plugins_for_tests  # noqa: E402,F401  (registers the test-only harden/watermark defenses)

MICRO = """
name: micro
datasets: [{name: synthetic, num_subjects: 1}]
defenses: [none, {name: random-noise, eps: 8}]
scenarios: [clean]
attacks: [{name: dreambooth, max_train_steps: 4, num_class_images: 2}]
metrics: [linf, psnr, brisque]
seeds: [0]
"""


def write_suite(folder: Path, body: str, name: str = "suite.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(textwrap.dedent(body))
    return p


@pytest.fixture(scope="session")
def warm_models(tmp_path_factory) -> Path:
    """Build the tiny base models once (as `model` stages) for every end-to-end test to copy."""
    from bench.cli import main

    d = tmp_path_factory.mktemp("warm")
    suite = write_suite(d, MICRO.replace("scenarios: [clean]", "scenarios: [clean, model-mismatch]")
                        .replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none]")
                        .replace("metrics: [linf, psnr, brisque]", "metrics: [linf]"))
    assert main(["run", "--suite", str(suite), "--out", str(d / "out")]) == 0
    return d / "out" / "cache" / "model"


@pytest.fixture
def out_dir(tmp_path, warm_models) -> Path:
    out = tmp_path / "out"
    shutil.copytree(warm_models, out / "cache" / "model")
    return out


def built_model(model_stages: Path, ref: str) -> Path:
    """The diffusers folder of the `model` stage of ``ref`` among a run's ``cache/model`` stages."""
    import json

    for stage in model_stages.iterdir():
        if json.loads((stage / "done.json").read_text())["params"]["ref"] == ref:
            return stage / "model"
    raise AssertionError(f"no {ref} model stage in {model_stages}")


@pytest.fixture(scope="session")
def tiny_model_a(warm_models) -> Path:
    """The tiny profile's `tiny:a` base model folder (built once by `warm_models`, with the profile's pre-training)."""
    return built_model(warm_models, "tiny:a")


PROXY_WARM = """
name: warm-proxy
datasets: [{name: synthetic, num_subjects: 1}]
defenses: [none]
scenarios: [clean]
attacks: [{name: dreambooth, max_train_steps: 1}]
metrics: [linf]
seeds: [0]
"""


@pytest.fixture(scope="session")
def proxy_cache(tmp_path_factory) -> Path:
    """proxy:a built once (shared by every proxy-scale test file), as the harness builds it (a `model` stage of `bench run --profile proxy`)."""
    from bench.cli import main

    d = tmp_path_factory.mktemp("proxy")
    assert main(["run", "--suite", str(write_suite(d, PROXY_WARM)), "--profile", "proxy", "--out", str(d / "out")]) == 0
    return d / "out" / "cache" / "model"


@pytest.fixture(scope="session")
def proxy_a(proxy_cache) -> Path:
    return built_model(proxy_cache, "proxy:a")


def held_out_loss(model_dir: Path, images: list, trained: Path | None = None,
                  prompt: str = "a photo of sks toy") -> float:
    """Denoising loss of ``images`` under ``prompt`` with fixed draws no training run uses (VAE sample, eps, t in
    [200, 1000), 8 per image; low t is left out: there tiny models' loss is dominated by detail they cannot model).
    ``trained``: a DreamBooth output folder whose unet/ (and text_encoder/, if present) replace the base ones."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from bench import models
    from bench.diffusion import LatentCache, denoising_loss, encode_prompt, to_tensor

    c = models.load_components(model_dir)
    if trained is not None:
        c.unet = UNet2DConditionModel.from_pretrained(trained / "unet", local_files_only=True, use_safetensors=True)
        if (trained / "text_encoder").is_dir():
            c.text_encoder = CLIPTextModel.from_pretrained(trained / "text_encoder", local_files_only=True,
                                                           use_safetensors=True)
    with torch.no_grad():
        idx = torch.arange(len(images)).repeat(8)
        latents = LatentCache(c.vae, to_tensor(images)).sample(idx, torch.Generator().manual_seed(101))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(102))
        t = torch.randint(200, 1000, (len(idx),), generator=torch.Generator().manual_seed(103))
        emb = encode_prompt(c.tokenizer, c.text_encoder, [prompt]).expand(len(idx), -1, -1)
        return float(denoising_loss(c.unet, c.noise_scheduler, latents, emb, None, timesteps=t, noise=noise))


def caption_losses(model: Path, seeds: list[int], resolution: int, repeats: int = 8) -> dict:
    """Per-draw denoising losses of held-out subjects' images under their own caption, another subject's caption,
    the empty caption and the class caption, with the same (t, eps, VAE sample) draws; also returns t."""
    import torch

    from bench import models
    from bench.datasets import SyntheticDataset, SyntheticParams, synthetic_caption
    from bench.diffusion import LatentCache, denoising_loss, encode_prompt, to_tensor

    c = models.load_components(model)
    images = [im for s in seeds for im in SyntheticDataset(SyntheticParams(num_subjects=max(seeds) + 1))
              .subjects(None)[s].load("A", resolution)]
    owner = [s for s in seeds for _ in range(len(images) // len(seeds))]
    cache = LatentCache(c.vae, to_tensor(images))
    gen = torch.Generator().manual_seed(7)
    out: dict[str, list] = {"match": [], "mismatch": [], "empty": [], "class": [], "t": []}
    captions = {
        "match": [synthetic_caption(s) for s in owner],
        # another subject 7 seeds on: a different shape and a hue 0.33 turns away (seed + 8 would keep shape and hue)
        "mismatch": [synthetic_caption(seeds[(seeds.index(s) + 7) % len(seeds)]) for s in owner],
        "empty": [""] * len(owner), "class": ["a photo of a toy"] * len(owner)}
    with torch.no_grad():
        emb = {k: encode_prompt(c.tokenizer, c.text_encoder, v) for k, v in captions.items()}
        for _ in range(repeats):
            z = cache.sample(torch.arange(len(images)), gen)
            t = torch.randint(0, 1000, (len(images),), generator=gen)
            eps = torch.randn(z.shape, generator=gen)
            out["t"].append(t)
            for k in captions:
                out[k].append(denoising_loss(c.unet, c.noise_scheduler, z, emb[k], None, t, eps, per_sample=True)[1])
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def personalisation_scores(model: Path, subjects: list, work: Path, attack, n_images: int = 8) -> list[dict]:
    """The proxy profile's ``attack`` (DreamBooth, or any other) on each subject's clean set_B, and the synthetic identity metrics
    (subject-ism, subject-idr) of "a photo of sks toy" generations before (base model, generated once) and after:
    [{"subject", "before": (ism, idr), "after": (ism, idr), "train_s", "images": the generations after}]."""
    import time

    from attacks.dreambooth import generate_class_images
    from bench import models
    from bench.plugins import METRICS, MetricInputs, RunContext
    from bench.profiles import PROFILES

    p, g = PROFILES["proxy"], PROFILES["proxy"].generation
    ctx = RunContext(seed=0, device="cpu", profile="proxy", resolution=p.resolution, work_dir=work)
    class_prompt = p.class_prompt.format(class_noun="toy")
    instance = p.instance_prompt.format(identifier=p.identifier, class_noun="toy")
    cls = generate_class_images(model, class_prompt, attack.class_images_needed(), ctx, p.class_sampler,
                                p.class_steps, g.guidance)
    metrics = (METRICS.create("subject-ism"), METRICS.create("subject-idr"))

    def images(pipe) -> list:
        return [im for _, im in models.generate(pipe, [instance], n_images, g.steps, g.guidance, 0, p.resolution)]

    def scores(subject, imgs) -> tuple[float, float]:
        inputs = MetricInputs(subject=subject, resolution=p.resolution, generated=imgs)
        return tuple(m.compute(inputs) for m in metrics)

    base = images(models.load_pipeline(model, "cpu", g.sampler))
    rows = []
    for subject in subjects:
        start = time.perf_counter()
        attack.train(ctx, model, subject.load("B", p.resolution), instance, class_prompt, cls, work / subject.id,
                     **attack.token_words(p.identifier, "toy"))
        train_s = time.perf_counter() - start
        after = images(attack.load_pipeline(model, work / subject.id, "cpu"))
        rows.append({"subject": subject.id, "before": scores(subject, base), "after": scores(subject, after),
                     "train_s": train_s, "images": after})
    return rows
