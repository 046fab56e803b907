"""The proxy scale (bench/profiles.py "proxy"): text-conditioned small models built by the harness, in which
personalisation is real on a CPU and a protection's effect is measurable with the synthetic identity model.
The numbers these tests pin are measured with benchmarks/proxy_scale.py (closing note of the proxy-scale issue)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import models
from bench.cli import main
from bench.datasets import SyntheticDataset, SyntheticParams, synthetic_attributes, synthetic_caption
from bench.plugins import ATTACKS
from bench.profiles import PROFILES
from metrics import subject_identity as S
from tests.conftest import caption_losses, personalisation_scores, write_suite

PROXY = PROFILES["proxy"]
RES = PROXY.resolution
# Thresholds below the measured values (benchmarks/proxy_scale.py on proxy:a; closing note of the proxy-scale issue)
TEXT_GAP_HIGH_NOISE = 0.15  # measured: matching caption 28% below a mismatched one at t >= 600 (10% over all t)
COLOUR_ACCURACY = 0.7  # measured: 84% of generations show the captioned colour (32 held-out subjects)

def test_proxy_build_is_deterministic_and_captioned(tmp_path):
    """The proxy code path (attribute captions, caption dropout, warm-up, clipping, EMA) on a micro schedule: the same
    arguments give the same weight bytes, and the captions are the subjects' attributes."""
    micro = {**PROXY.pretrain, "vae_steps": 2, "unet_steps": 4, "num_subjects": 4, "images_per_subject": 2,
             "batch_size": 4, "warmup_steps": 2}
    for name in ("one", "two"):
        models.prepare_builtin("proxy:a", tmp_path / name, micro, seed=0, resolution=RES)
    assert models.weight_hashes(tmp_path / "one") == models.weight_hashes(tmp_path / "two")
    log = json.loads((tmp_path / "one" / "pretrain_log.json").read_text())
    assert log["family"] == "proxy" and log["pretrain"]["captions"] == "attributes"
    a = synthetic_attributes(1000)
    assert synthetic_caption(1000) == f"a photo of a {a['colour']} {dict(stripes='striped', checker='checkered', dots='dotted', rings='ringed')[a['pattern']]} {a['shape']} toy".replace("a o", "an o")
    with pytest.raises(models.ModelUnavailable, match="proxy"):
        models.prepare_builtin("proxy:z", tmp_path / "z", micro, seed=0)


def test_planner_knows_every_built_model_family():
    from bench.planner import BUILT_MODEL_FAMILIES

    assert set(BUILT_MODEL_FAMILIES) == set(models.MODEL_FAMILIES)
    assert models.builtin_family("proxy:a") == "proxy" and models.builtin_family("owner/name") is None
    with pytest.raises(models.ModelUnavailable, match="proxy:z"):
        models.tiny_variant("proxy:z")


def test_every_plugin_runs_at_the_paper_budget_on_proxy():
    """The proxy profile never changes a budget: each defense's eps is its paper default."""
    from bench.plugins import DEFENSES
    from bench.registry import load_builtins

    load_builtins()
    for name, cls in DEFENSES.items():
        assert "eps" not in cls.profiles.get("proxy", {}), f"{name} changes its budget at the proxy scale"


def test_text_conditioning_at_high_noise(proxy_a):
    """Held-out subjects (seeds 0..15): at t >= 600 their own attribute caption predicts the noise clearly better than
    another subject's caption and than the empty caption (the model reads the text); averaged over all t the gap is
    smaller (text matters little at low noise)."""
    r = caption_losses(proxy_a, list(range(16)), RES)
    hi = r["t"] >= 600
    gap_hi = 1 - r["match"][hi].mean() / r["mismatch"][hi].mean()
    gap_all = 1 - r["match"].mean() / r["mismatch"].mean()
    assert gap_hi >= TEXT_GAP_HIGH_NOISE, f"t>=600: matching caption only {gap_hi:.1%} below a mismatched one"
    assert r["match"][hi].mean() < r["empty"][hi].mean()
    assert 0 < gap_all < gap_hi


def test_generations_show_the_captioned_attributes(proxy_a):
    """Captions naming a held-out subject's attributes give images that the identity model's attribute heads read
    back (colour, the attribute the text carries most)."""
    idm = S.identity_model()
    pipe = models.load_pipeline(proxy_a, "cpu", PROXY.generation.sampler)
    images, truth = [], []
    for s in range(12):
        pairs = models.generate(pipe, [synthetic_caption(s)], 2, PROXY.generation.steps, PROXY.generation.guidance,
                                seed=s, resolution=RES)
        images += [im for _, im in pairs]
        truth += [synthetic_attributes(s)["colour_index"]] * len(pairs)
    colour = (idm.attributes(images)[:, 2] == np.asarray(truth)).mean()
    assert colour >= COLOUR_ACCURACY, f"captioned colour shown in {colour:.0%} of generations"


def test_dreambooth_personalises_a_held_out_subject(proxy_a, tmp_path):
    """The harness's DreamBooth at its proxy settings on a clean held-out subject: generations of "a photo of sks toy"
    are identified as the subject among 10 candidates, and the identity score rises well above the base model's."""
    subjects = SyntheticDataset(SyntheticParams(num_subjects=2)).subjects(None)
    for got in personalisation_scores(proxy_a, subjects, tmp_path, ATTACKS.create("dreambooth", {}, profile="proxy")):
        assert got["after"][1] >= 0.8, f"identified in {got['after'][1]:.0%} of generations ({got})"
        assert got["after"][0] > got["before"][0] + 0.3, got


PROTECT = """
name: proxy-protect
datasets: [{name: synthetic, num_subjects: 3}]
defenses: [{name: random-noise, label: noise, eps: 16}, advdm]
scenarios: [clean]
attacks: [dreambooth]
metrics: [subject-ism, subject-idr, linf]
seeds: [0]
"""


def test_advdm_protects_more_than_noise_of_its_budget_end_to_end(proxy_cache, tmp_path):
    """Through `bench run --profile proxy` on 3 subjects: AdvDM at its paper budget (16/255, 100 steps) leaves the
    attacker's DreamBooth generations less like the subjects than uniform noise of the same budget does (measured per
    subject ISM -0.021, +0.004, -0.393: the effect is uneven across subjects; a defense with no effect moves the
    mean by a few hundredths either way, e.g. ASPL at 6.375/255 +0.04). CI over more subjects: the benchmark."""
    out = tmp_path / "out"
    shutil.copytree(proxy_cache, out / "cache" / "model")
    assert main(["run", "--suite", str(write_suite(tmp_path, PROTECT)), "--profile", "proxy", "--out", str(out)]) == 0
    from bench.leaderboard import cells_frame
    from bench.ledger import Ledger

    df = cells_frame(Ledger(out / "ledger.sqlite").cells("proxy-protect")).set_index(["defense", "subject"])
    assert df["linf/255/protected-vs-clean"].max() <= 16
    ism = "subject-ism/synthid-v1/ref=AB"
    diff = df.loc["advdm", ism] - df.loc["noise", ism]
    assert diff.mean() < -0.08, f"AdvDM - noise ISM per subject: {diff.to_dict()}"


@pytest.mark.parametrize("suite", ["robustness", "smoke", "proxy-protection"])
@pytest.mark.parametrize("profile", ["tiny", "proxy"])
def test_built_in_suites_plan_on_both_cpu_profiles(suite, profile, capsys):
    assert main(["validate", suite, "--profile", profile]) == 0
    assert "cells:" in capsys.readouterr().out
