"""Per-image cost (seconds) of the DINO / CLIP embeddings behind dino, clip-i, clip-t (metrics/fidelity.py), on this
machine, with RANDOM weights of the real architectures (ViT-S/16, CLIP ViT-B/32, and with --large ViT-L/14): the
cost depends on the architecture only, the values are meaningless.

    .venv/bin/python benchmarks/fidelity_costs.py [--repeat 3] [--n 16] [--large]

Images are 512x512 (the paper profile's resolution). Reports the median over ``repeat`` passes after a warm-up pass
that loads the model. --large saves a ~1.7 GB random ViT-L/14 to a temp folder first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics.fidelity import clip_image_embeddings, clip_text_embeddings, dino_embeddings  # noqa: E402

CLIP_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14, image_size=224),
    projection_dim=768)


def per_image(fn: Callable[[], object], n: int, repeat: int) -> float:
    fn()  # warm-up: loads the model
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def build_dino(folder: Path) -> str:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16)  # facebook/dino-vits16's shape
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def build_clip(folder: Path, large: bool) -> str:
    from transformers import CLIPConfig, CLIPModel

    from bench.models import build_tokenizer

    tokenizer = build_tokenizer(folder.parent / f"{folder.name}-tok")
    CLIPModel(CLIPConfig(**CLIP_L14) if large else CLIPConfig()).save_pretrained(folder)  # defaults: ViT-B/32
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n", type=int, default=16, help="images (and prompts) per pass")
    parser.add_argument("--large", action="store_true", help="also time CLIP ViT-L/14 (saves ~1.7 GB)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(args.n)]
    prompts = [f"a photo of sks person number {i} in the park" for i in range(args.n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dino = build_dino(Path(tmp) / "vits16")
        rows.append(("dino ViT-S/16 image", per_image(lambda: dino_embeddings(images, dino), args.n, args.repeat)))
        for label, large in [("CLIP ViT-B/32", False)] + ([("CLIP ViT-L/14", True)] if args.large else []):
            clip = build_clip(Path(tmp) / label.replace("/", "").replace(" ", "-"), large)
            rows.append((f"{label} image", per_image(lambda: clip_image_embeddings(images, clip), args.n,
                                                     args.repeat)))
            rows.append((f"{label} text", per_image(lambda: clip_text_embeddings(prompts, clip), args.n,
                                                    args.repeat)))
    print(f"{'embedding (random weights, 512 px)':<36} {'s/item':>9}")
    for name, sec in rows:
        print(f"{name:<36} {sec:9.4f}")


if __name__ == "__main__":
    main()
