"""Where one training step and one PGD step spend their time at the medium scale (issue 14 "step cost"), and what
the optimiser implementation and CPU bf16 change.

    .venv/bin/python benchmarks/step_profile.py [--steps 3] [--precision no bf16] [--compile]

Model: the medium SD-shaped variant of benchmarks/aspl_memory.py (UNet (64, 128, 256), 24 M parameters, 128 px,
untrained: timing only), one thread. Steps, as ASPL and the DreamBooth attack run them (defenses/anti_dreambooth.py,
attacks/dreambooth.py): a training step (batch 1 instance + 1 class latent, UNet + text encoder trainable, loss,
backward, gradient clipping, AdamW), a PGD step (4 images through the VAE encoder with gradient, UNet forward and
backward to the pixels, signed step, projection). For each: CPU time per step (best of ``--steps`` after a warm-up),
and from torch.profiler the share of self CPU time in model compute (convolutions, matrix products, attention,
normalisation, activations, their backward) against everything else (optimiser, element-wise glue, allocation,
Python). AdamW: the default for-loop implementation on CPU against ``foreach=True`` and ``fused=True`` on the same
trainable parameters (per step, and whether the updated weights are bit-identical). ``--compile``: the same steps
with the UNet under ``torch.compile`` (inductor; its compile time is printed), to see whether it pays.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMPUTE = ("conv", "mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "attention", "softmax", "group_norm",
           "layer_norm", "native_group_norm", "native_layer_norm", "silu", "gelu", "mkldnn")


def _is_compute(name: str) -> bool:
    n = name.lower()
    return any(k in n for k in COMPUTE)


def _best_cpu(fn, steps: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive caches)
    best = float("inf")
    for _ in range(steps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def _profile(fn) -> tuple[float, list[tuple[str, float]]]:
    """(share of self CPU time in model compute, top-8 ops by self CPU time in ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    compute = sum(t for k, t in events if _is_compute(k))
    return compute / total, sorted(events, key=lambda e: -e[1])[:8]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time the steps with torch.compile(unet)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bench.diffusion import LatentCache, denoising_loss, encode_prompt
    from bench.models import load_components
    from bench.precision import precision_for
    from benchmarks.aspl_memory import _medium_model

    with tempfile.TemporaryDirectory() as tmp:
        _medium_model(Path(tmp) / "m")
        comps = load_components(Path(tmp) / "m")
    unet, te, vae, sched = comps.unet, comps.text_encoder, comps.vae, comps.noise_scheduler
    vae.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 128, 128, generator=gen) * 2 - 1
    cache = LatentCache(vae, images)
    params = [p for p in (*unet.parameters(), *te.parameters())]
    print(f"medium: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M, text encoder "
          f"{sum(p.numel() for p in te.parameters()) / 1e6:.1f} M trainable; CPU time per step, one thread")

    eager_unet = unet
    variants = [(r, False) for r in args.precision] + ([(r, True) for r in args.precision] if args.compile else [])
    for requested, compiled in variants:
        prec = precision_for(requested, "cpu")
        unet = eager_unet
        if compiled:
            unet = torch.compile(eager_unet)
        opt = torch.optim.AdamW(params, lr=5e-7, weight_decay=1e-2)

        def train_step() -> None:
            lat = cache.sample([0, 1], gen)
            with prec.autocast():
                emb = encode_prompt(comps.tokenizer, te, ["a photo of sks person", "a photo of person"])
                loss = denoising_loss(unet, sched, lat, emb, gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            emb1 = encode_prompt(comps.tokenizer, te, ["a photo of sks person"]).expand(4, -1, -1)
        delta = torch.zeros_like(images, requires_grad=True)

        def pgd_step() -> None:
            with prec.autocast():
                lat = vae.encode(images + delta).latent_dist.sample(gen) * vae.config.scaling_factor
                loss = denoising_loss(unet, sched, lat, emb1, gen)
            loss.backward()
            with torch.no_grad():
                delta.add_(delta.grad.sign(), alpha=0.005).clamp_(-0.05, 0.05)
            delta.grad = None

        t0 = time.perf_counter()
        if compiled:
            pgd_step()
            print(f"torch.compile: first PGD step (compilation) {time.perf_counter() - t0:.0f} s wall", flush=True)
        pgd_s = _best_cpu(pgd_step, args.steps)
        pgd_share, pgd_top = _profile(pgd_step)
        for p in params:
            p.requires_grad_(True)
        train_s = _best_cpu(train_step, args.steps)
        train_share, train_top = _profile(train_step)
        print(f"\n[{prec.label}{', torch.compile(unet)' if compiled else ''}]")
        for what, s, share, top in (("training step", train_s, train_share, train_top),
                                    ("PGD step (4 images)", pgd_s, pgd_share, pgd_top)):
            print(f"{what:20s} {s:7.3f} s; model compute {100 * share:5.1f}% of self CPU time; top ops (ms): "
                  + ", ".join(f"{k} {t:.0f}" for k, t in top[:6]))

    # AdamW implementations on the same gradients
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    start = [p.detach().clone() for p in params]
    results = {}
    for impl, kw in (("for-loop (CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused", {"fused": True})):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        try:
            opt = torch.optim.AdamW(params, lr=5e-7, weight_decay=1e-2, **kw)
        except (RuntimeError, ValueError) as e:
            print(f"AdamW {impl}: unavailable ({e})")
            continue
        s = _best_cpu(opt.step, args.steps)
        opt = torch.optim.AdamW(params, lr=5e-7, weight_decay=1e-2, **kw)
        with torch.no_grad():
            for p, s0 in zip(params, start):
                p.copy_(s0)
        opt.step()
        results[impl] = ([p.detach().clone() for p in params], s)
    base, base_s = results["for-loop (CPU default)"]
    print(f"\nAdamW step on {sum(p.numel() for p in params) / 1e6:.1f} M parameters:")
    for impl, (after, s) in results.items():
        same = all(torch.equal(a, b) for a, b in zip(after, base))
        diff = max((a - b).abs().max().item() for a, b in zip(after, base))
        print(f"  {impl:24s} {s * 1e3:8.1f} ms ({s / base_s:4.2f}x)  weights {'bit-identical' if same else f'max diff {diff:.2e}'}")


if __name__ == "__main__":
    main()
