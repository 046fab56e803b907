"""GenWatermark (defenses/genwatermark.py; Ma et al., arXiv 2306.07754) at the proxy scale, on synthetic subjects:

    .venv/bin/python benchmarks/genwatermark_proxy.py [--subjects 3] [--model runs/proxy-scale/proxy-a] [--eval 16]

Per subject: the defense's protect (phase 1 + phase 2 at the proxy profile, ``budget: linf, eps: 8``) on set_B; the
phase-1 detector's AUC on held-out images (set_A + set_C, watermarked by G vs clean); the realised budget; phase 2's
synthesised-image count; then the attacker: the proxy profile's DreamBooth on the watermarked set_B and on the clean
set_B (evaluation seed 0 = the cell seed, the profile's evaluation prompt, which phase 2 never used), ``--eval``
generations each, scored by the detector after phase 2 (and, for comparison, as phase 1 left it). AUCs with 95%
intervals: per subject Hanley-McNeil; the mean over subjects with the Hanley-McNeil standard errors combined and with
a stratified bootstrap (images resampled within each subject's positives and negatives). Wall times per phase.
Every number is printed; tests/test_genwatermark.py pins them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.plugins import RunContext  # noqa: E402
from bench.profiles import PROFILES  # noqa: E402

PROFILE = PROFILES["proxy"]
RES = PROFILE.resolution
DEFENSE_PARAMS = {"budget": "linf", "eps": 8}


def hanley_mcneil(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil, Radiology 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def acc(pos: np.ndarray, neg: np.ndarray, threshold: float = 0.5) -> float:
    """Detection accuracy at the detector's threshold (``watermark-accuracy``)."""
    return float(np.r_[pos >= threshold, neg < threshold].mean())


def uncalibrated(r: dict) -> tuple[np.ndarray, np.ndarray]:
    """The phase-2 detector's scores before its calibration shift (sigmoid(logit + shift))."""
    shift = r["info"].get("genwatermark_calibration_logit_shift", 0.0)

    def undo(sc):
        logit = np.log(np.clip(sc, 1e-12, 1 - 1e-12)) - np.log(np.clip(1 - sc, 1e-12, 1))
        return 1 / (1 + np.exp(-(logit + shift)))

    return undo(r["pos2"]), undo(r["neg2"])


def mean_auc_ci(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean per-subject AUC; 95% intervals from combined Hanley-McNeil errors and a stratified bootstrap."""
    aucs = [auc(p, n) for p, n in pairs]
    se = math.sqrt(sum(hanley_mcneil(a, len(p), len(n)) ** 2 for a, (p, n) in zip(aucs, pairs))) / len(pairs)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        boot.append(np.mean([auc(rng.choice(p, len(p)), rng.choice(n, len(n))) for p, n in pairs]))
    m = float(np.mean(aucs))
    return {"aucs": aucs, "mean": m, "hm_ci": (m - 1.96 * se, m + 1.96 * se),
            "boot_ci": tuple(float(v) for v in np.percentile(boot, [2.5, 97.5]))}


def run_subject(model: Path, subject, work: Path, n_eval: int, defense_params: dict | None = None,
                attack_params: dict | None = None, heldout: bool = True) -> dict:
    """protect (phase 1 + 2) -> detector; attacker's DreamBooth on watermarked and clean set_B -> ``n_eval``
    generations each of the profile's evaluation prompt (seed 0); scores of both detectors, counts, times.
    ``heldout``: also re-train phase 1 (same seed, so the same G and D) and score set_A + set_C."""
    from attacks.dreambooth import generate_class_images
    from bench import models
    from bench.plugins import ATTACKS, DEFENSES
    from defenses.genwatermark import GenWatermark, scores, train_phase1, watermark

    g = PROFILE.generation
    defense = DEFENSES.create("genwatermark", {**DEFENSE_PARAMS, **(defense_params or {})}, profile="proxy")
    clean = subject.load("B", RES)
    ctx = RunContext(seed=0, device="cpu", profile="proxy", resolution=RES, work_dir=work)
    t0 = time.perf_counter()
    published = defense.protect(ctx, clean, subject, model)
    protect_s = time.perf_counter() - t0
    defense.save_detector(ctx, subject, work / "detector")
    info = dict(ctx.extra)
    # phase 1 on held-out images: the same G/D as inside protect (same seed), scored on set_A + set_C
    phase1_auc, held_linf = math.nan, -1
    if heldout:
        held = subject.load("A", RES) + subject.load("C", RES)
        ph1 = train_phase1(clean, defense.params, 0)
        held_w = watermark(ph1.generator, held, defense.params)
        phase1_auc = auc(scores(ph1.detector, held_w), scores(ph1.detector, held))
        held_linf = max(int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max()) for a, c in zip(held_w, held))
    # the attacker (the evaluation's settings: cell seed 0, the profile's prompts)
    attack = ATTACKS.create("dreambooth", attack_params or {}, profile="proxy")
    actx = RunContext(seed=0, device="cpu", profile="proxy", resolution=RES, work_dir=work)
    fill = dict(identifier=PROFILE.identifier, class_noun=subject.class_noun)
    instance, class_prompt = PROFILE.instance_prompt.format(**fill), PROFILE.class_prompt.format(**fill)
    prompts = [t.format(**fill) for t in g.prompts]
    t0 = time.perf_counter()
    cls = generate_class_images(model, class_prompt, attack.class_images_needed(), actx, PROFILE.class_sampler,
                                PROFILE.class_steps, g.guidance)
    gens = {}
    for label, train in (("watermarked", published), ("clean", clean)):
        attack.train(actx, model, train, instance, class_prompt, cls, work / label)
        pipe = models.set_sampler(attack.load_pipeline(model, work / label, "cpu"), g.sampler)
        gens[label] = [im for _, im in models.generate(pipe, prompts, n_eval, g.steps, g.guidance, 0, RES)]
    attack_s = time.perf_counter() - t0
    det = work / "detector"
    out = {"subject": subject.id, "info": info, "phase1_heldout_auc": phase1_auc, "heldout_linf": held_linf,
           "protect_s": protect_s, "attack_eval_s": attack_s, "eval_prompts": prompts,
           "phase2_prompts": info.get("genwatermark_phase2_prompts")}
    for phase in (1, 2):
        out[f"pos{phase}"] = GenWatermark.detect(det, gens["watermarked"], phase=phase)
        out[f"neg{phase}"] = GenWatermark.detect(det, gens["clean"], phase=phase)
    return out


def main() -> None:
    from bench.cli import configure_threads, quiet_libraries
    from bench.datasets import SyntheticDataset, SyntheticParams
    from bench.registry import load_builtins

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/proxy-scale/proxy-a"), help="a built proxy:a folder")
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--eval", type=int, default=16, help="attacker generations per model")
    a = ap.parse_args()
    configure_threads()
    quiet_libraries()
    load_builtins()
    if not (a.model / "model_index.json").is_file():
        sys.exit(f"{a.model}: no proxy:a model; build it with benchmarks/proxy_scale.py build")
    subjects = SyntheticDataset(SyntheticParams(num_subjects=a.subjects)).subjects(None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in subjects:
            r = run_subject(a.model, s, Path(tmp) / s.id, a.eval)
            i = r["info"]
            sec = i.get("genwatermark_phase2_seconds", {})
            print(f"{s.id}: phase-1 held-out AUC {r['phase1_heldout_auc']:.3f} (held-out L-inf {r['heldout_linf']}/255); "
                  f"published L-inf {i['realised_linf_255']}/255, PSNR {i['psnr_db']:.2f} dB; phase 2 trained on "
                  f"{i['genwatermark_phase2_synth_images']} synthesised images "
                  f"(train acc {i['genwatermark_phase2_train_accuracy']:.3f}); attacker AUC phase-2 detector "
                  f"{auc(r['pos2'], r['neg2']):.3f} (accuracy at 0.5: {acc(r['pos2'], r['neg2']):.3f} calibrated, "
                  f"{acc(*uncalibrated(r)):.3f} without calibration), phase-1 detector "
                  f"{auc(r['pos1'], r['neg1']):.3f} "
                  f"({len(r['pos2'])}+{len(r['neg2'])} images); wall: phase 1 {i['genwatermark_phase1_wall_s']:.1f} s, "
                  f"phase 2 {i['genwatermark_phase2_wall_s']:.1f} s {sec}, protect {r['protect_s']:.1f} s, "
                  f"attacker+eval {r['attack_eval_s']:.1f} s", flush=True)
            rows.append(r)
    for phase in (2, 1):
        ci = mean_auc_ci([(r[f"pos{phase}"], r[f"neg{phase}"]) for r in rows])
        print(f"attacker-generation AUC, phase-{phase} detector, mean over {len(rows)} subjects: {ci['mean']:.3f} "
              f"(per subject {', '.join(f'{v:.3f}' for v in ci['aucs'])}); 95% CI Hanley-McNeil "
              f"[{ci['hm_ci'][0]:.3f}, {ci['hm_ci'][1]:.3f}], stratified bootstrap "
              f"[{ci['boot_ci'][0]:.3f}, {ci['boot_ci'][1]:.3f}]")
    for what, accs in (("calibrated", [acc(r["pos2"], r["neg2"]) for r in rows]),
                       ("without calibration", [acc(*uncalibrated(r)) for r in rows])):
        print(f"attacker-generation accuracy at 0.5, phase-2 detector {what}: mean {np.mean(accs):.3f} "
              f"(per subject {', '.join(f'{v:.3f}' for v in accs)})")
    held = ", ".join(f"{r['phase1_heldout_auc']:.3f}" for r in rows)
    print(f"phase-1 held-out AUC (set_A + set_C, G-watermarked vs clean): {held}")


if __name__ == "__main__":
    main()
