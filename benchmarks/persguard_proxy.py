"""PersGuard (defenses/persguard.py) at the proxy scale: does the backdoor survive the attacker's DreamBooth on the
protected subject, and does an unprotected subject still personalise?

    .venv/bin/python benchmarks/persguard_proxy.py [--protected 0] [--unprotected 1,2] [--variants full,no-retention]
        [--set key=value ...]

For each variant: harden proxy:a for the protected synthetic subject(s), then the proxy profile's DreamBooth on each
protected and unprotected subject's clean set_B, on the hardened and on the unhardened model; prints the synthetic
identity score (subject-ism, lower = less of the subject) and backdoor-success (share of generations closer to the
backdoor targets than to the subject) of "a photo of sks toy" generations, and wall times. Nothing is asserted here
(tests/test_persguard.py does).
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

from bench.cli import configure_threads  # noqa: E402
from bench.datasets import SyntheticDataset, SyntheticParams  # noqa: E402
from bench.plugins import ATTACKS, DEFENSES, RunContext  # noqa: E402
from bench.profiles import PROFILES  # noqa: E402
from bench.registry import load_builtins  # noqa: E402
import numpy as np  # noqa: E402

from metrics.backdoor import closer_to_target_rate, unit_mean  # noqa: E402
from metrics.subject_identity import identity_model  # noqa: E402
from tests.conftest import personalisation_scores  # noqa: E402

VARIANTS = {"full": {}, "no-retention": {"retention_weight": 0.0}}


def harden(base: Path, subjects: list, out: Path, overrides: dict) -> tuple[Path, float]:
    model = out / "model"
    if not (model / "model_index.json").is_file():
        ctx = RunContext(seed=0, device="cpu", profile="proxy", resolution=PROFILES["proxy"].resolution, work_dir=out)
        start = time.perf_counter()
        DEFENSES.create("persguard", overrides, profile="proxy").harden(ctx, base, subjects, model)
        (out / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - start}))
    return model, json.loads((out / "wall.json").read_text())["wall_s"]


def report(label: str, model: Path, subjects: list, protected: set, targets: list, work: Path) -> dict:
    ident = identity_model()
    attack = ATTACKS.create("dreambooth", profile="proxy")
    rows = personalisation_scores(model, subjects, work, attack)
    t_emb = ident.embed(targets)
    out = {}
    for s, r in zip(subjects, rows):
        subj = ident.embed([im for sp in ("A", "B") for im in s.load(sp, PROFILES["proxy"].resolution)])
        gen = ident.embed(r["images"])
        bd = closer_to_target_rate(gen, t_emb, subj)
        to_target = float(np.mean(gen @ unit_mean(t_emb)))
        tag = "protected" if s.id in protected else "unprotected"
        out[s.id] = {"ism": r["after"][0], "idr": r["after"][1], "backdoor": bd, "target_cos": to_target}
        print(f"{label:>14} {s.id} ({tag:>11}): subject-ism {r['after'][0]:+.3f}  idr {r['after'][1]:.2f}  "
              f"backdoor-success {bd:.2f}  cos to targets {to_target:+.3f}  (DreamBooth {r['train_s']:.0f} s)",
              flush=True)
    return out


def before_attack(model: Path, subject, targets: list) -> None:
    """backdoor-success of the hardened model itself (no personalisation) on the trigger prompt."""
    from bench import models

    p, g = PROFILES["proxy"], PROFILES["proxy"].generation
    ident = identity_model()
    prompt = p.instance_prompt.format(identifier=p.identifier, class_noun="toy")
    images = [im for _, im in models.generate(models.load_pipeline(model, "cpu", g.sampler), [prompt], 8, g.steps,
                                               g.guidance, 0, p.resolution)]
    subj = ident.embed([im for sp in ("A", "B") for im in subject.load(sp, p.resolution)])
    print(f"  before the attack: backdoor-success {closer_to_target_rate(ident.embed(images), ident.embed(targets), subj):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/proxy-scale"))
    ap.add_argument("--protected", default="0")
    ap.add_argument("--unprotected", default="1")
    ap.add_argument("--variants", default="full,no-retention")
    ap.add_argument("--set", action="append", default=[], help="persguard parameter override key=value (JSON value)")
    args = ap.parse_args()
    configure_threads()
    load_builtins()
    base = args.work / "proxy-a"
    if not (base / "model_index.json").is_file():
        sys.exit(f"{base}: build it first with benchmarks/proxy_scale.py build")
    prot_ids = [int(x) for x in args.protected.split(",")]
    unprot_ids = [int(x) for x in args.unprotected.split(",") if x]
    n = max(prot_ids + unprot_ids) + 1
    subjects = SyntheticDataset(SyntheticParams(num_subjects=n)).subjects(None)
    protected = [subjects[i] for i in prot_ids]
    evaluated = protected + [subjects[i] for i in unprot_ids]
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    tag = "-".join(f"{k}={v}" for k, v in sorted(extra.items())) or "default"
    results = {}
    for variant in args.variants.split(","):
        overrides = {**extra, **VARIANTS[variant]}
        out = args.work / "persguard" / f"{variant}-{tag}-p{args.protected}"
        model, wall = harden(base, protected, out, overrides)
        print(f"{variant}: hardened in {wall:.0f} s ({overrides or 'proxy profile'})", flush=True)
        from bench.stages import load_images

        targets = load_images(model / "persguard" / "targets" / protected[0].id)
        before_attack(model, protected[0], targets)
        results[variant] = report(variant, model, evaluated, {s.id for s in protected}, targets, out / "attack")
    results["unhardened"] = report("unhardened", base, evaluated, {s.id for s in protected}, targets,
                                   args.work / "persguard" / f"unhardened-p{args.protected}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
