"""GenWatermark (defenses/genwatermark.py; Ma et al., arXiv 2306.07754): phase 1 on held-out images, the budget to
the last pixel, phase 2's synthesised training set and its separation from the evaluation, determinism, the LPIPS
budget's refusal without weights, the harness path (`bench run`), and detection of the attacker's generations at the
proxy scale (numbers measured with benchmarks/genwatermark_proxy.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import defenses.genwatermark as gw
from bench.cli import main
from bench.datasets import SyntheticDataset, SyntheticParams
from bench.plugins import DEFENSES, RunContext
from bench.profiles import PROFILES
from bench.registry import ConfigError, build_params
from tests.conftest import write_suite

LINF8 = {"budget": "linf", "eps": 8}


def _subject(i: int = 0):
    return SyntheticDataset(SyntheticParams(num_subjects=i + 1)).subjects(None)[i]


def _auc(pos, neg) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


@pytest.mark.parametrize("eps", [8, 6.375])
def test_phase1_detects_held_out_images_within_the_budget(eps):
    """G and D trained on set_A only (32 px); on set_B + set_C, which training never saw, D separates G's
    watermarked images from the clean ones, and every published pixel is within floor(eps)/255 of the clean one."""
    p = build_params(gw.GenWatermark, {"budget": "linf", "eps": eps, "phase1_steps": 120, "channels": 16,
                                       "batch_size": 8}, None, "test")
    s = _subject(1)
    train, held = s.load("A", 32), s.load("B", 32) + s.load("C", 32)
    r = gw.train_phase1(train, p, seed=0)
    published = gw.watermark(r.generator, held, p)
    assert all(w.dtype == np.uint8 and w.shape == c.shape for w, c in zip(published, held))
    linf = [int(np.abs(w.astype(np.int16) - c.astype(np.int16)).max()) for w, c in zip(published, held)]
    assert max(linf) <= int(eps) and min(linf) >= 1, linf  # within budget, and not a no-op
    got = _auc(gw.scores(r.detector, published), gw.scores(r.detector, held))
    assert got > 0.9, f"phase-1 held-out AUC {got:.3f}"


def test_params_are_validated_and_the_budget_is_declared():
    for bad, match in (({"budget": "linf"}, "needs eps"), ({"eps": 8}, "applies to budget 'linf' only"), ({"p": 0}, "p"),
                       ({**LINF8, "phase2_prompts": ["a {who}"]}, "identifier"), ({**LINF8, "channels": 0}, "channels")):
        with pytest.raises(ConfigError, match=match):
            DEFENSES.create("genwatermark", bad)
    assert DEFENSES.create("genwatermark", LINF8).budget_255() == 8
    assert DEFENSES.create("genwatermark", {}).budget_255() is None
    for profile in ("tiny", "proxy"):  # small scales change steps and counts, never the budget
        d = DEFENSES.create("genwatermark", {}, profile=profile)
        assert (d.params.budget, d.params.p, d.params.eps) == ("lpips", 0.05, None)


def test_lpips_budget_is_refused_without_weights_and_linf_runs(tmp_path, monkeypatch):
    """No LPIPS trunk here: `budget: lpips` (the default) is refused at suite validation, naming the weights and the
    fetch command; the explicit `budget: linf` alternative validates."""
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "empty-weights"))
    from bench.suites import load_suite

    body = """
    name: gw
    datasets: [{name: synthetic, num_subjects: 1}]
    defenses: [%s]
    scenarios: [clean]
    attacks: [dreambooth]
    metrics: [linf, watermark-auc]
    """
    with pytest.raises(ConfigError) as e:
        load_suite(str(write_suite(tmp_path, body % "genwatermark", "a.yaml")), "tiny")
    msg = str(e.value)
    assert "genwatermark" in msg and "torchvision-alexnet" in msg and "bench weights fetch torchvision-alexnet" in msg
    assert "budget: linf" in msg
    with pytest.raises(ConfigError, match="torchvision-vgg16"):
        load_suite(str(write_suite(tmp_path, body % "{name: genwatermark, lpips_net: vgg}", "b.yaml")), "tiny")
    suite = load_suite(str(write_suite(tmp_path, body % "{name: genwatermark, budget: linf, eps: 8}", "c.yaml")), "tiny")
    assert suite.defenses[0].params.budget == "linf" and suite.defenses[0].create().budget_255() == 8
    assert DEFENSES.get("genwatermark").unavailable_reason()  # `bench list` says why the default is unavailable


def test_lpips_hinge_bounds_the_watermark(tmp_path, monkeypatch):
    """The paper's budget path, mechanically: with an AlexNet trunk of *random* weights in a temporary weights root
    (the real ImageNet trunk is not on this machine, so the LPIPS values are not the published metric's), phase 1's
    hinge max(LPIPS - p, 0) holds the watermark's LPIPS well below what the same training reaches without it
    (budget_weight 0), and G is not clipped to an L-inf ball (budget_255() is None)."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from metrics.imperceptibility import LPIPS_BACKBONES, lpips_distances

    entry = LPIPS_BACKBONES["alex"]
    folder = tmp_path / "weights" / entry.name
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    trunk = torchvision.models.alexnet(weights=None).features.state_dict()
    save_file({f"features.{k}": v.contiguous() for k, v in trunk.items()}, str(folder / entry.files[0]))
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "weights"))
    d = DEFENSES.create("genwatermark", {"phase1_steps": 80, "channels": 16, "batch_size": 8, "p": 0.05})
    assert d.missing_weights() is None and d.budget_255() is None
    s = _subject()
    images = s.load("B", 32)
    got = {}
    for weight in (10.0, 0.0):
        p = build_params(gw.GenWatermark, {"phase1_steps": 80, "channels": 16, "batch_size": 8,
                                           "budget_weight": weight}, None, "test")
        r = gw.train_phase1(images, p, seed=0)
        got[weight] = float(np.mean(lpips_distances(list(zip(gw.watermark(r.generator, images, p), images)), "alex")))
    assert got[10.0] < 0.5 * got[0.0] and got[10.0] < 0.1, got


def _protect(model: Path, work: Path, seed: int) -> tuple[list[np.ndarray], dict, Path]:
    d = DEFENSES.create("genwatermark", LINF8, profile="tiny")
    ctx = RunContext(seed=seed, device="cpu", profile="tiny", resolution=64, work_dir=work)
    s = _subject()
    published = d.protect(ctx, s.load("B", 64), s, model)
    d.save_detector(ctx, s, work / "detector")
    return published, ctx.extra, work / "detector"


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_a, tmp_path_factory):
    root = tmp_path_factory.mktemp("gw")
    return {name: _protect(tiny_model_a, root / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def test_same_seed_same_bytes(tiny_runs):
    """Published images and every detector file (safetensors weights, JSON config) are byte-identical for the same
    seed, and differ for another seed."""
    (pa, _, da), (pb, _, db), (pc, _, dc) = tiny_runs["a"], tiny_runs["b"], tiny_runs["c"]
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    for f in (gw.DETECTOR_FILE, gw.PHASE1_DETECTOR_FILE, gw.GENERATOR_FILE, gw.CONFIG_FILE):
        assert (da / f).read_bytes() == (db / f).read_bytes(), f
    assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))
    assert (da / gw.DETECTOR_FILE).read_bytes() != (dc / gw.DETECTOR_FILE).read_bytes()
    assert not list(da.glob("*.pt")) and not list(da.glob("*.bin"))  # safetensors + JSON only


def test_phase2_trains_on_synthesised_images_the_evaluation_never_uses(tiny_runs):
    """Phase 2 personalised the base model twice and fine-tuned D on their generations: the count is in ctx.extra and
    in the detector config, D changed, and its prompts and initial-noise seeds are disjoint from the evaluation's
    (every profile's evaluation prompts; image seeds seed + 1000 i + j) and from the class images' (seed + 500000 + j)."""
    published, extra, det = tiny_runs["a"]
    p = DEFENSES.create("genwatermark", LINF8, profile="tiny").params
    expected = 2 * len(p.phase2_prompts) * p.phase2_images_per_prompt
    assert extra["genwatermark_phase2_synth_images"] == expected
    assert extra["genwatermark_phase2_synth_positives"] == extra["genwatermark_phase2_synth_negatives"] == expected // 2
    config = json.loads((det / gw.CONFIG_FILE).read_text())
    assert config["info"]["phase2_synth_images"] == expected and config["params"]["budget"] == "linf"
    assert (det / gw.DETECTOR_FILE).read_bytes() != (det / gw.PHASE1_DETECTOR_FILE).read_bytes()
    noun = _subject().class_noun
    eval_prompts = {t.format(identifier=pr.identifier, class_noun=noun) for pr in PROFILES.values()
                    for t in pr.generation.prompts} | {t.format(identifier=pr.mismatch_identifier, class_noun=noun)
                                                       for pr in PROFILES.values() for t in pr.generation.prompts}
    assert not set(extra["genwatermark_phase2_prompts"]) & eval_prompts
    assert not set(gw.PHASE2_PROMPTS) & {t for pr in PROFILES.values() for t in pr.generation.prompts}
    seed = 0
    phase2_seeds = {extra["genwatermark_phase2_generation_seed"] + 1000 * i + j
                    for i in range(len(p.phase2_prompts)) for j in range(p.phase2_images_per_prompt)}
    eval_seeds = {seed + 1000 * i + j for pr in PROFILES.values() for i in range(len(pr.generation.prompts) + 30)
                  for j in range(pr.generation.n_per_prompt)}
    assert not phase2_seeds & eval_seeds and min(phase2_seeds) > seed + 500_000 + 1000
    assert extra["realised_linf_255"] <= 8 and extra["budget"] == "linf" and extra["psnr_db"] > 30
    assert max(int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max())
               for a, c in zip(published, _subject().load("B", 64))) <= 8
    scores = DEFENSES.get("genwatermark").detect(det, published)
    assert scores.shape == (len(published),) and ((0 <= scores) & (scores <= 1)).all()
    with pytest.raises(FileNotFoundError, match="genwatermark detector"):
        DEFENSES.get("genwatermark").detect(det.parent, published)


WM_SUITE = """
name: gw-run
datasets: [{name: synthetic, num_subjects: 1}]
defenses: [{name: genwatermark, budget: linf, eps: 8}]
scenarios: [clean]
attacks: [{name: dreambooth, max_train_steps: 4, num_class_images: 2}]
metrics: [linf, psnr, watermark-auc, watermark-accuracy, watermark-tpr@fpr]
seeds: [0]
"""


def test_bench_run_tiny_records_budget_and_detection(out_dir, tmp_path):
    """Through `bench run` (tiny): the protect stage writes the detector, records the budget kind in the row's
    params and the realised L-inf / PSNR in its extra; the detection metrics are numbers in [0, 1]."""
    import pandas as pd

    assert main(["run", "--suite", str(write_suite(tmp_path, WM_SUITE)), "--out", str(out_dir)]) == 0
    df = pd.read_csv(out_dir / "leaderboards" / "gw-run.csv")
    assert df["linf/255/protected-vs-clean"].max() <= 8
    for col in ("wm-auc/own-detector/neg=undefended-run", "wm-accuracy/own-detector/threshold=0.5/neg=undefended-run",
                "wm-tpr@fpr=0.01/own-detector/neg=undefended-run"):
        assert 0 <= df[col].iloc[0] <= 1, col
    records = [(p.parent, json.loads(p.read_text())) for p in (out_dir / "cache" / "protect").glob("*/done.json")]
    folder, rec = [(f, r) for f, r in records if r["params"]["defense"]["name"] == "genwatermark"][0]
    assert rec["params"]["defense"]["params"]["budget"] == "linf"
    assert rec["extra"]["budget"] == "linf" and rec["extra"]["realised_linf_255"] <= 8
    assert rec["extra"]["genwatermark_phase2_synth_images"] > 0
    folder = folder / "detector"
    assert (folder / gw.DETECTOR_FILE).is_file() and (folder / gw.CONFIG_FILE).is_file()


# Measured with benchmarks/genwatermark_proxy.py (proxy:a, budget linf 8/255, 16 + 16 attacker generations; every
# subject in docs/genwatermark.md): synth-00 attacker AUC 0.906, Hanley-McNeil 95% CI [0.797, 1.016]; mean over
# synth-00..03 0.906, CI [0.852, 0.960].
PROXY_N_EVAL = 16


def test_proxy_detects_the_attackers_generations(proxy_a, tmp_path):
    """Proxy scale, synthetic subject synth-00: GenWatermark (linf 8/255) protects set_B; the attacker's DreamBooth
    (proxy settings) on the watermarked set and on the clean set; 16 generations each of the evaluation prompt with
    the evaluation seed (neither seen by phase 2). The detector's AUC is above 0.5 with a 95% Hanley-McNeil interval
    that excludes 0.5."""
    from benchmarks.genwatermark_proxy import auc, hanley_mcneil, run_subject

    r = run_subject(proxy_a, _subject(), tmp_path, PROXY_N_EVAL, heldout=False)  # phase 1 alone: first test
    assert not set(r["eval_prompts"]) & set(r["phase2_prompts"])
    assert r["info"]["genwatermark_phase2_synth_images"] == 64 and r["info"]["realised_linf_255"] <= 8
    a = auc(r["pos2"], r["neg2"])
    lo = a - 1.96 * hanley_mcneil(a, len(r["pos2"]), len(r["neg2"]))
    assert lo > 0.5, f"attacker-generation AUC {a:.3f}, 95% CI lower bound {lo:.3f}"
