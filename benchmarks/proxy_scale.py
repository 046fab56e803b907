"""What the proxy scale can show on a CPU (issue: "a CPU proxy scale where personalization works"). Sections:

    .venv/bin/python benchmarks/proxy_scale.py build        # time to build proxy:a, proxy:b and the identity model
    .venv/bin/python benchmarks/proxy_scale.py text         # text conditioning: loss gap, attributes of generations
    .venv/bin/python benchmarks/proxy_scale.py personalise  # DreamBooth on clean held-out subjects vs the base model
    .venv/bin/python benchmarks/proxy_scale.py personalise --attack textual-inversion   # or custom-diffusion, lora-dreambooth
    .venv/bin/python benchmarks/proxy_scale.py protect      # bench run: ASPL / AdvDM vs random noise, paired CI
    .venv/bin/python benchmarks/proxy_scale.py protect --eps 6.375,16,32   # budget sweep

Models are built once into --work (default runs/proxy-scale) as the harness builds them (``bench.models.
prepare_builtin`` with the proxy profile's pre-training); the identity model lives in the weights root. Torch runs
single-threaded (BENCH_CPU_THREADS). Every number is printed; nothing is asserted here (tests/test_proxy.py does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import models  # noqa: E402
from bench.datasets import SyntheticDataset, SyntheticParams, synthetic_attributes, synthetic_caption  # noqa: E402
from bench.plugins import ATTACKS  # noqa: E402
from bench.profiles import PROFILES  # noqa: E402
from bench.registry import load_builtins  # noqa: E402
from metrics import subject_identity as S  # noqa: E402
from tests.conftest import caption_losses, personalisation_scores  # noqa: E402

PROFILE = PROFILES["proxy"]
RES = PROFILE.resolution


def model_dir(work: Path, variant: str = "a") -> Path:
    folder = work / f"proxy-{variant}"
    if not (folder / "model_index.json").is_file():
        start = time.perf_counter()
        models.prepare_builtin(f"proxy:{variant}", folder, PROFILE.pretrain, seed=0, resolution=RES)
        print(f"built proxy:{variant} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of paired differences."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def section_build(work: Path) -> None:
    for v in ("a", "b"):
        model_dir(work, v)
    start = time.perf_counter()
    folder = S.IDENTITY_WEIGHTS.folder()
    if folder.exists():
        print(f"identity model already built at {folder} (delete it to time a build)")
    else:
        S.identity_model()
        print(f"built the identity model in {time.perf_counter() - start:.0f} s")
    for v in ("a", "b"):
        log = json.loads((work / f"proxy-{v}" / "pretrain_log.json").read_text())
        print(f"proxy:{v}: vae {log['vae_wall_s']} s, total {log['wall_s']} s, final losses "
              f"vae {np.mean(log['vae_losses'][-20:]):.4f} unet {np.mean(log['unet_losses'][-100:]):.4f}")


def section_text(work: Path, n_subjects: int) -> None:
    model = model_dir(work)
    seeds = list(range(n_subjects))
    r = caption_losses(model, seeds, RES)
    hi = r["t"] >= 600
    for k in ("match", "mismatch", "empty", "class"):
        print(f"loss with {k:8s} caption: all t {r[k].mean():.4f}   t>=600 {r[k][hi].mean():.4f}")
    for where, m in (("all t", slice(None)), ("t>=600", hi)):
        gap = 1 - r["match"][m].mean() / r["mismatch"][m].mean()
        d = (r["mismatch"][m] - r["match"][m])
        print(f"matching vs mismatched caption, {where}: {gap:+.1%} lower (paired mean diff {d.mean():.4f} +- "
              f"{1.96 * d.std(ddof=1) / math.sqrt(len(d)):.4f})")
    pipe = models.load_pipeline(model, "cpu", PROFILE.generation.sampler)
    idm = S.identity_model()
    truth, images, owner = [], [], []
    for s in seeds:
        pairs = models.generate(pipe, [synthetic_caption(s)], 4, PROFILE.generation.steps, PROFILE.generation.guidance,
                                seed=s, resolution=RES)
        images += [im for _, im in pairs]
        a = synthetic_attributes(s)
        truth += [[a["shape_index"], a["pattern_index"], a["colour_index"]]] * len(pairs)
        owner += [s] * len(pairs)
    pred = idm.attributes(images)
    ok = pred == np.asarray(truth)
    print(f"generations from held-out captions ({len(images)} images, {n_subjects} subjects): shape {ok[:, 0].mean():.2f}"
          f" pattern {ok[:, 1].mean():.2f} colour {ok[:, 2].mean():.2f} all three {ok.all(1).mean():.2f}"
          f" (attribute heads on clean renders: see tests/test_subject_identity.py)")
    subjects = SyntheticDataset(SyntheticParams(num_subjects=n_subjects)).subjects(None)
    refs = np.stack([S.subject_reference(idm, subj) for subj in subjects])
    sims = idm.embed(images) @ refs.T
    print(f"identified as the captioned subject among {n_subjects}: {(sims.argmax(1) == np.asarray(owner)).mean():.2f} "
          f"(chance {1 / n_subjects:.2f})")


def section_personalise(work: Path, n_subjects: int, steps: int | None, lr: float | None, name: str) -> None:
    model = model_dir(work)
    given = {k: v for k, v in (("max_train_steps", steps), ("learning_rate", lr)) if v is not None}
    attack = ATTACKS.create(name, given, profile="proxy")
    subjects = SyntheticDataset(SyntheticParams(num_subjects=n_subjects)).subjects(None)
    rows = personalisation_scores(model, subjects, work, attack)
    for row in rows:
        print(f"{row['subject']}: ISM {row['before'][0]:.3f} -> {row['after'][0]:.3f}, identified among 10 "
              f"{row['before'][1]:.2f} -> {row['after'][1]:.2f} ({name} {attack.params.max_train_steps} steps "
              f"lr {attack.params.learning_rate:g}: {row['train_s']:.0f} s)", flush=True)
    for k, name in ((0, "ISM"), (1, "identification rate")):
        m, lo, hi = t_interval([r["after"][k] - r["before"][k] for r in rows])
        print(f"{name}: mean after {np.mean([r['after'][k] for r in rows]):.3f}, rise {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")


def section_protect(work: Path, n_subjects: int, pairs: list[tuple[str, float]]) -> None:
    """``pairs``: (defense, eps /255); each is compared with random noise at the same budget, subject by subject."""
    from bench.cli import main as bench_main
    from bench.leaderboard import cells_frame
    from bench.ledger import Ledger

    entries = ["none"] + [f"{{name: random-noise, label: noise-{eps:g}, eps: {eps}}}" for eps in sorted({e for _, e in pairs})]
    entries += [f"{{name: {d}, label: {d}-{eps:g}, eps: {eps}}}" for d, eps in pairs]
    suite = work / "protect.yaml"
    suite.write_text(textwrap.dedent(f"""\
        name: proxy-protect
        datasets: [{{name: synthetic, num_subjects: {n_subjects}}}]
        defenses: [{", ".join(entries)}]
        scenarios: [clean]
        attacks: [dreambooth]
        metrics: [subject-ism, subject-idr, linf]
        seeds: [0]
        """))
    start = time.perf_counter()
    code = bench_main(["run", "--suite", str(suite), "--profile", "proxy", "--out", str(work / "protect")])
    print(f"bench run exit {code} in {time.perf_counter() - start:.0f} s")
    df = cells_frame(Ledger(work / "protect" / "ledger.sqlite").cells("proxy-protect"))
    cols = [c for c in df.columns if c.startswith(("subject-ism", "subject-idr", "linf"))]
    print(df.groupby("defense")[cols].mean().to_string(float_format=lambda v: f"{v:.3f}"))
    for d, eps in pairs:
        noise = df[df.defense == f"noise-{eps:g}"].set_index("subject")
        rows = df[df.defense == f"{d}-{eps:g}"].set_index("subject")
        for col in [c for c in cols if not c.startswith("linf")]:
            m, lo, hi = t_interval(list((rows[col] - noise[col]).dropna()))
            print(f"{d} - random noise at eps {eps:g}/255, {col.split('/')[0]}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                  f"(95% t-interval over {len(rows)} subjects; negative = less like the subject)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=("build", "text", "personalise", "protect"))
    ap.add_argument("--work", default="runs/proxy-scale")
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--attack", default="dreambooth", help="personalise: the attack (default dreambooth)")
    ap.add_argument("--steps", type=int, default=None, help="personalise: the attack's steps (default: proxy profile)")
    ap.add_argument("--lr", type=float, default=None, help="personalise: the attack's learning rate")
    ap.add_argument("--defenses", default="aspl:6.375,advdm:16",
                    help="protect: defense:eps pairs (eps in /255; default: each paper's budget)")
    ap.add_argument("--eps", default="", help="protect: a budget sweep, comma-separated, applied to every defense")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))
    load_builtins()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.section == "build":
        section_build(work)
    elif a.section == "text":
        section_text(work, a.subjects or 16)
    elif a.section == "personalise":
        section_personalise(work, a.subjects or 4, a.steps, a.lr, a.attack)
    else:
        pairs = [(d.split(":")[0], float(d.split(":")[1])) for d in a.defenses.split(",")]
        if a.eps:
            pairs = [(d, float(e)) for d in dict(pairs) for e in a.eps.split(",")]
        section_protect(work, a.subjects or 4, pairs)


if __name__ == "__main__":
    main()
