"""Is APDM's protection subject-specific? Held-out denoising loss of the protected subject and of an unrelated one,
on the hardened vs the unhardened model, before and after the attacker's DreamBooth (UNet only, batch 1; the
unrelated subject is attacked with its own images), for a list of APDM parameter sets.

    .venv/bin/python benchmarks/apdm_specificity.py --scale tiny '[{}, {"reduction": "sample", "beta": 1000}]'
    .venv/bin/python benchmarks/apdm_specificity.py --scale medium '[...]'
    .venv/bin/python benchmarks/apdm_specificity.py --scale proxy '[{}]'

``tiny`` is tiny:a (0.79M UNet, 64 px, the tests' short pre-training); ``medium`` is a UNet of 64/128/256 channels
(17.8M, 128 px) pre-trained 300 steps (~6 min on one CPU core, cached in --work); ``proxy`` is proxy:a (the proxy
profile's text-conditioned model, 32 px) with the proxy profile's DreamBooth and APDM settings. Each line prints the rise of the
loss over the unhardened model: specific protection means the subject's rise clearly exceeds the unrelated one's.
Parameters not given take APDM's tiny-profile values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from attacks.dreambooth import generate_class_images  # noqa: E402
from bench import models  # noqa: E402
from bench.datasets import SyntheticDataset, SyntheticParams, render_synthetic  # noqa: E402
from bench.plugins import ATTACKS, DEFENSES, RunContext  # noqa: E402
from bench.profiles import PROFILES  # noqa: E402
from bench.registry import load_builtins  # noqa: E402
from tests.conftest import held_out_loss  # noqa: E402

SCALES = {
    "proxy": ("proxy:a", 32, PROFILES["proxy"].pretrain),
    "tiny": ("a", 64, {"vae_steps": 40, "unet_steps": 80, "batch_size": 8, "num_subjects": 16, "images_per_subject": 4}),
    "medium": ("m", 128, {"vae_steps": 150, "unet_steps": 300, "batch_size": 8, "num_subjects": 16,
                          "images_per_subject": 4}),
}
models.TINY_VARIANTS.setdefault("m", models.TinyVariant(
    unet_channels=(64, 128, 256), unet_groups=32, unet_layers=1, head_dim=8, text_hidden=64, text_layers=2,
    vae_channels=(16, 32, 64, 64), seed_offset=0))
UNRELATED_SEED = 77


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", help="JSON list of APDM parameter dicts")
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--work", default="runs/apdm-specificity", help="cache of models and runs (default under ./runs)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))
    load_builtins()
    variant, res, pretrain = SCALES[a.scale]
    work = Path(a.work) / a.scale
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (base / "model_index.json").is_file():
        start = time.perf_counter()
        if ":" in variant:
            models.prepare_builtin(variant, base, pretrain, seed=0, resolution=res)
        else:
            models.prepare_tiny(variant, base, pretrain, seed=0, resolution=res)
        print(f"pre-trained the {a.scale} model in {time.perf_counter() - start:.0f} s", flush=True)
    subject = SyntheticDataset(SyntheticParams(num_subjects=1)).subjects(None)[0]
    images = subject.load("B", res)
    unrelated = [render_synthetic(UNRELATED_SEED, i, res) for i in range(4)]

    profile = "proxy" if a.scale == "proxy" else "tiny"
    gen = PROFILES[profile]
    class_prompt = gen.class_prompt.format(class_noun="toy")

    def ctx() -> RunContext:
        return RunContext(seed=0, device="cpu", profile=profile, resolution=res, work_dir=work)

    attack = ATTACKS.create("dreambooth", {"train_text_encoder": False, "train_batch_size": 1}, profile=profile)

    def losses(model: Path, tag: str) -> dict[str, float]:
        cls = generate_class_images(model, class_prompt, attack.params.num_class_images, ctx(), gen.class_sampler,
                                    gen.class_steps, gen.generation.guidance)
        out = {"pre_subject": held_out_loss(model, images), "pre_unrelated": held_out_loss(model, unrelated)}
        for name, imgs in (("subject", images), ("unrelated", unrelated)):
            trained = work / f"attack-{tag}-{name}"
            attack.train(ctx(), model, imgs, "a photo of sks toy", class_prompt, cls, trained)
            out[f"post_{name}"] = held_out_loss(model, imgs, trained)
        return out

    ref = losses(base, "base")
    print("unhardened:", json.dumps({k: round(v, 5) for k, v in ref.items()}), flush=True)
    for i, cfg in enumerate(json.loads(a.configs)):
        start = time.perf_counter()
        out = work / f"hardened-{i}"
        DEFENSES.create("apdm", cfg, profile=profile).harden(ctx(), base, [subject], out)
        got = losses(out, f"h{i}")
        rise = {k: got[k] / ref[k] - 1 for k in got}
        print(f"{json.dumps(cfg)}: before attack subject {rise['pre_subject']:+.1%} unrelated {rise['pre_unrelated']:+.1%}"
              f" | after attack subject {rise['post_subject']:+.1%} unrelated {rise['post_unrelated']:+.1%}"
              f" ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
