"""Cost of the issue-12 data-level protections beside ASPL: measured on CPU at tiny scale, counted at paper scale.

    .venv/bin/python benchmarks/data_defense_costs.py [--images 2] [--methods aspl pid ...] [--sizes tiny medium]

Measured: each method runs once in a fresh subprocess (so peak RSS is that run's) with its ``tiny`` profile on
``--images`` images of the synthetic subject, on tiny:a (64 px) and on the medium SD-shaped UNet (64, 128, 256) at
128 px of benchmarks/aspl_memory.py (untrained weights: timing only); printed per image: wall time, peak RSS, PGD
steps of the tiny schedule, seconds per PGD step and its ratio to ASPL's measured in the same sweep. Paper: PGD steps per subject at the
paper defaults, the UNet passes one PGD step costs, and ``requires.gpu_memory_gb`` (the plug-in's accounting); PID's
(VAE encoder only) is derived here from the activations autograd saves, counted on PyTorch's meta device with
benchmarks/aspl_memory.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 2**30
METHODS = ("aspl", "pid", "simac", "mist-v2", "caat", "pap", "metacloak")
# UNet passes (forward + backward to the pixels) per PGD step at the paper defaults, per image batch
UNET_PASSES = {"aspl": "1", "pid": "0 (VAE encoder only)", "simac": "1 + 1 no-grad (clean features)",
               "mist-v2": "1 (+ 2 encoder passes)", "caat": "1 (+ K/V update)", "pap": "1 + 21 (prompt descent)",
               "metacloak": "1 per EOT draw"}


def pgd_steps(name: str, p) -> int:
    """PGD steps one run takes (per subject) with parameters ``p``."""
    if name == "pid" or name == "caat":
        return p.steps
    if name == "metacloak":
        from defenses.metacloak import schedule_counts

        return schedule_counts(p)["pgd_steps"]
    return p.rounds * p.pgd_steps  # ASPL, SimAC, PAP; Mist-v2 per image


def child(name: str, model_dir: Path, n_images: int, resolution: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from bench.datasets import SyntheticDataset
    from bench.plugins import DEFENSES, RunContext

    d = DEFENSES.create(name, {"num_class_images": 2} if hasattr(DEFENSES.get(name).Params, "num_class_images") else {},
                        profile="tiny")
    subject = SyntheticDataset().subjects(None)[0]
    images = subject.load("B", resolution)[:n_images]
    ctx = RunContext(seed=0, device="cpu", profile="tiny", resolution=resolution, work_dir=Path("."),
                     models={"default": model_dir})
    start, cpu_start = time.perf_counter(), time.process_time()
    d.protect(ctx, images, subject, model_dir)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # one thread: not inflated by other load on the machine
    steps = pgd_steps(name, d.params) * (n_images if name == "mist-v2" else 1)
    return {"method": name, "wall_s_per_image": wall / n_images, "cpu_s_per_image": cpu / n_images, "pgd_steps": steps,
            "s_per_pgd_step": cpu / steps,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


def measure(methods: list[str], n_images: int, size: str) -> list[dict]:
    from bench.models import prepare_tiny
    from benchmarks.aspl_memory import _medium_model

    rows = []
    resolution = 64 if size == "tiny" else 128
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / size
        if size == "tiny":
            prepare_tiny("a", folder, {"vae_steps": 0, "unet_steps": 0}, seed=0, resolution=64)
        else:
            _medium_model(folder)
        for name in methods:
            cmd = [sys.executable, __file__, "--child", name, str(folder), str(n_images), str(resolution), size]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not line:
                raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[-1]))
            print(f"  measured {size} {name}: {rows[-1]['wall_s_per_image']:.1f} s/image", flush=True)
    return rows


def paper_gb() -> dict[str, float]:
    """GPU GB at 512 px from SD2.1-base's parameter counts and the activations autograd saves (meta device,
    benchmarks/aspl_memory.py, flash-style attention), + 0.8 GB CUDA overhead: CAAT (fp32 weights, bf16 autocast,
    4-image batch, K/V grads + AdamW negligible), PAP (bf16 weights as the reference, 4 images; the embedding
    descent keeps only a UNet graph, smaller than the PGD graph), Mist-v2 (bf16 weights, one image: max of its PGD
    step and a LoRA step of 1 instance + 1 class image, i.e. half of ASPL's batch-2 training activations)."""
    from benchmarks.aspl_memory import _sd21_base_modules, activations

    unet, te, vae = _sd21_base_modules()
    n = sum(q.numel() for m in (unet, te, vae) for q in m.parameters())
    act = activations("bf16")
    return {"caat": n * 4 / GB + act["pgd bs4"]["no_ckpt"] + 0.8,
            "pap": n * 2 / GB + act["pgd bs4"]["no_ckpt"] + 0.8,
            "mist-v2": n * 2 / GB + max(act["pgd bs1"]["no_ckpt"], act["train bs2"]["no_ckpt"] / 2) + 0.8,
            "pid": pid_paper_gb()}


def pid_paper_gb() -> float:
    """PID at 512 px, fp32, batch 1: VAE weights + the encoder's saved activations + the clean posterior + 0.8 GB."""
    import torch
    from benchmarks.aspl_memory import _sd21_base_modules, saved_activation_bytes

    _, _, vae = _sd21_base_modules()
    n_vae = sum(q.numel() for q in vae.parameters())

    def step():
        x = torch.randn(1, 3, 512, 512, device="meta", requires_grad=True)
        d = vae.encode(x).latent_dist
        return d.mean.sum() + d.logvar.sum()

    acts, _ = saved_activation_bytes(step)
    return (n_vae * 4 + acts) / GB + 0.8


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--accounting-only", action="store_true", help="skip the CPU measurements")
    ap.add_argument("--sizes", nargs="+", default=["tiny"], choices=["tiny", "medium"])
    ap.add_argument("--child", nargs=5, metavar=("METHOD", "MODEL_DIR", "IMAGES", "RES", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, folder, n, res, size = args.child
        if size == "medium":  # the medium variant's config is registered in this process only
            from benchmarks.aspl_memory import _medium_variant
            _medium_variant()
        print(json.dumps(child(name, Path(folder), int(n), int(res))))
        return
    import torch

    torch.set_num_threads(1)
    from bench.plugins import DEFENSES

    if not args.accounting_only:
        for size in args.sizes:
            rows = measure(args.methods, args.images, size)
            aspl = next((r["s_per_pgd_step"] for r in rows if r["method"] == "aspl"), None)
            print(f"\nMeasured on CPU (1 thread), {size} ({'tiny:a 64' if size == 'tiny' else 'UNet (64, 128, 256) 128'} "
                  f"px), tiny profiles, {args.images} images (wall includes model loading and class-image generation):")
            print("(CPU s: the process's CPU time, one thread; wall s includes waiting for a core on a loaded machine)")
            print(f"{'method':10s} {'wall s/img':>10s} {'CPU s/img':>9s} {'PGD steps':>9s} {'CPU s/PGD step':>14s} "
                  f"{'x ASPL':>7s} {'peak RSS GB':>11s}")
            for r in rows:
                ratio = f"{r['s_per_pgd_step'] / aspl:7.2f}" if aspl else f"{'':7s}"
                print(f"{r['method']:10s} {r['wall_s_per_image']:10.2f} {r['cpu_s_per_image']:9.2f} {r['pgd_steps']:9d} "
                      f"{r['s_per_pgd_step']:14.3f} "
                      f"{ratio} {r['peak_rss_gb']:11.3f}")
    estimates = paper_gb()
    print("\nPaper defaults (accounting; GB estimated here for CAAT, PAP, Mist-v2 and PID, ASPL's by aspl_memory.py):")
    print(f"{'method':10s} {'PGD steps/subject':>17s} {'GPU GB (requires)':>17s} {'estimated':>9s}  UNet passes per PGD step")
    for name in args.methods:
        d = DEFENSES.create(name, {})
        per = " (per image)" if name == "mist-v2" else ""
        est = f"{estimates[name]:9.1f}" if name in estimates else f"{'-':>9s}"
        print(f"{name:10s} {pgd_steps(name, d.params):>17,d} {d.requires.gpu_memory_gb or 0:17.1f} {est}  "
              f"{UNET_PASSES[name]}{per}")


if __name__ == "__main__":
    main()
