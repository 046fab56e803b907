"""CPU cost of one PGD step of the single-surrogate defenses (AdvDM, Mist, PhotoGuard, SDS), batched over a
subject's 4 images versus one image at a time, on the tiny model and on a medium SD-shaped model (UNet
block_out_channels (64, 128, 256), 128 px), both with random weights (timing does not depend on training).

    .venv/bin/python benchmarks/pgd_costs.py [--configs tiny medium] [--methods advdm mist photoguard sds] [--steps 3]

Per-step cost = (wall of a run of ``2 + steps`` PGD steps - wall of a run of 2 steps) / steps, so loading and
warm-up are not counted; every measurement runs in its own process, so "peak RSS" is that process's maximum
resident memory (Python + torch + the surrogate + the attack). Single-threaded torch, as the harness runs it on CPU.
Numbers depend on the machine's load: run it alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("advdm", "mist", "photoguard", "sds")
CONFIGS = {  # name -> (TinyVariant fields, resolution)
    "tiny": (None, 64),
    "medium": (dict(unet_channels=(64, 128, 256), unet_groups=32, unet_layers=1, head_dim=8, text_hidden=64,
                    text_layers=2, vae_channels=(32, 64, 64, 64), seed_offset=0), 128),
}
N_IMAGES = 4


def build(config: str, out: Path) -> Path:
    """A random-weight diffusers folder for ``config`` (prepare_tiny with no pre-training steps)."""
    from bench import models
    from bench.cli import configure_threads

    configure_threads()
    fields, resolution = CONFIGS[config]
    variant = "a"
    if fields is not None:
        variant = f"bench-{config}"
        models.TINY_VARIANTS[variant] = models.TinyVariant(**fields)  # this process only
    models.prepare_tiny(variant, out, {"vae_steps": 0, "unet_steps": 0}, seed=0, resolution=resolution)
    return out


def worker(method: str, model: Path, resolution: int, batch_size: int, steps: int) -> dict:
    """Seconds per PGD step (whole set of N_IMAGES) and this process's peak RSS."""
    import resource

    import torch

    from bench.cli import configure_threads
    from bench.datasets import render_synthetic
    from bench.plugins import DEFENSES, RunContext
    import defenses.single_model  # noqa: F401  (registers the defenses)

    configure_threads()
    images = [render_synthetic(3, i, resolution) for i in range(N_IMAGES)]
    walls = []
    for n in (2, 2 + steps):
        ctx = RunContext(seed=0, device="cpu", profile="tiny", resolution=resolution, work_dir=model.parent)
        DEFENSES.create(method, {"steps": n, "batch_size": batch_size}).protect(ctx, images, None, model)
        walls.append(ctx.extra["pgd_wall_s"])
    return {"s_per_step": (walls[1] - walls[0]) / steps, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", nargs=5, metavar=("METHOD", "MODEL", "RES", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, model, res, batch, steps = args.worker
        print(json.dumps(worker(m, Path(model), int(res), int(batch), int(steps))))
        return
    from tabulate import tabulate

    work = Path(tempfile.mkdtemp(prefix="pgd_costs-"))
    rows = []
    for config in args.configs:
        resolution = CONFIGS[config][1]
        model = work / config
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
                        f"from benchmarks.pgd_costs import build; from pathlib import Path; build({config!r}, Path({str(model)!r}))"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for method in args.methods:
            for batch in (0, 1):
                out = subprocess.run([sys.executable, __file__, "--worker", method, str(model), str(resolution), str(batch),
                                      str(args.steps)], check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append([config, f"{resolution} px", method, "4 at once" if batch == 0 else "1 at a time",
                             round(r["s_per_step"], 4), round(r["s_per_step"] / N_IMAGES, 4), round(r["peak_rss_mb"])])
                print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["model", "res", "method", "batching", f"s/step ({N_IMAGES} images)", "s/step/image",
                                  "peak RSS MB"], tablefmt="github"))


if __name__ == "__main__":
    main()
