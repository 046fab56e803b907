"""APDM (defenses/apdm.py): DPO loss, L2P gradient bookkeeping, and the hardened model end to end on tiny:a."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import defenses.apdm  # noqa: F401  (registers "apdm")
from attacks.dreambooth import generate_class_images
from bench import models
from bench.datasets import SyntheticDataset, SyntheticParams, render_synthetic
from bench.plugins import ATTACKS, DEFENSES, RunContext
from bench.registry import ConfigError
from defenses.apdm import dpo_loss, personalization_loss, protection_loss, quoted_prompt
from tests.test_models import TEST_PRETRAIN, build_tiny
from tests.conftest import held_out_loss

INSTANCE = "a photo of sks toy"
CLASS = "a photo of toy"
UNRELATED_SEED = 77  # a synthetic subject the defense never saw
MICRO = {"outer_iterations": 1, "inner_iterations": 3, "num_class_images": 2, "class_steps": 2}


@pytest.fixture(scope="session")
def tiny_a(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory, "a-test", "a", TEST_PRETRAIN)


@pytest.fixture(scope="module")
def subject():
    return SyntheticDataset(SyntheticParams(num_subjects=1)).subjects(None)[0]


def make_ctx(tmp_path: Path, seed: int = 0) -> RunContext:
    return RunContext(seed=seed, device="cpu", profile="tiny", resolution=64, work_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- params, loss

def test_params_paper_defaults_tiny_profile_and_validation():
    paper = DEFENSES.create("apdm")
    p = paper.params
    assert (p.outer_iterations, p.inner_iterations, p.learning_rate, p.train_batch_size) == (800, 20, 5e-6, 1)
    assert (p.beta, p.reduction, p.in_ppl, p.grad_accum, p.num_class_images, p.class_steps) == (1.0, "element", True, "sum", 200, 50)
    assert not p.quirk_carry_personalization_grads and not p.quirk_quoted_prompt and p.negatives_split == "B"
    assert paper.defense_kind == "harden" and paper.budget_255() is None and paper.model_roles() == ("default",)
    assert DEFENSES.create("apdm", profile="tiny").params.outer_iterations == 10
    assert paper.prompts("person") == {"instance": "a photo of sks person", "class": "a photo of person",
                                       "positive": "a photo of person"}
    quoted = DEFENSES.create("apdm", {"quirk_quoted_prompt": True}).prompts("person")
    assert quoted["instance"] == '"a_photo_of_sks_person"' == quoted_prompt("a photo of sks person")
    with pytest.raises(ConfigError, match="inner_iterations must be >= 1"):
        DEFENSES.create("apdm", {"inner_iterations": 0})
    with pytest.raises(ConfigError, match=r"instance_prompt: .* only use the placeholder \{class_noun\}"):
        DEFENSES.create("apdm", {"instance_prompt": "a photo of {identifier} {class_noun}"})
    with pytest.raises(ConfigError, match="is not one of"):
        DEFENSES.create("apdm", {"reduction": "batch"})


def test_dpo_element_vs_sample_reduction():
    g = torch.Generator().manual_seed(0)
    mp, rp, mn, rn = (torch.rand(2, 4, 8, 8, generator=g) for _ in range(4))
    beta = 3.0
    element = dpo_loss(mp, rp, mn, rn, beta, "element")
    sample = dpo_loss(mp, rp, mn, rn, beta, "sample")
    diff = (mp - rp) - (mn - rn)
    assert torch.allclose(element, torch.nn.functional.softplus(beta * diff).mean())  # -logsigmoid(-x) = softplus(x)
    per_sample = diff.mean(dim=(1, 2, 3))
    assert torch.allclose(sample, torch.nn.functional.softplus(beta * per_sample).mean())
    assert abs(float(element) - float(sample)) > 1e-3  # same batch, different values (Jensen: element >= sample)
    assert float(element) > float(sample)
    # No change from the reference: log 2 either way; worse negatives (larger Delta-) lower the loss.
    assert math.isclose(float(dpo_loss(mp, mp, mn, mn, beta)), math.log(2), rel_tol=1e-6)
    assert float(dpo_loss(mp, mp, mn + 0.1, mn, beta)) < math.log(2)
    with pytest.raises(ValueError, match="reduction"):
        dpo_loss(mp, rp, mn, rn, beta, "batch")


# ----------------------------------------------------------------------------------------------- L2P bookkeeping

def _outer_grads(tiny_a, subject, tmp_path, **over):
    """One recorded outer iteration without the theta step: (trainer, theta.grad per parameter)."""
    defense = DEFENSES.create("apdm", {**MICRO, **over}, profile="tiny")
    trainer, _, _ = defense.build(make_ctx(tmp_path), tiny_a, subject.load("B", 64), subject.class_noun, record=True)
    before = [p.detach().clone() for p in trainer.theta_params]
    trainer.outer_iteration(step=False)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.theta_params))  # no step taken
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in trainer.theta_params]
    return trainer, grads


def _replay(trainer, carry_db: bool) -> list[torch.Tensor]:
    """Recompute the expected transferred gradient from the recorded batches on a fresh copy of the initial UNet."""
    p = trainer.p
    unet = copy.deepcopy(trainer.ref).requires_grad_(True).train()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=p.learning_rate, betas=tuple(p.adam_betas), weight_decay=p.weight_decay,
                            eps=p.adam_epsilon)
    total = [torch.zeros_like(q) for q in params]

    def grad(loss):
        return [torch.zeros_like(q) if g is None else g for q, g in
                zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    for pb, qb in trainer.trace:
        g_db = grad(personalization_loss(unet, trainer.sched, pb, trainer.prompts, p.prior_loss_weight))
        for q, g in zip(params, g_db):
            q.grad = g
        opt.step()
        loss, _ = protection_loss(unet, trainer.ref, trainer.sched, qb, trainer.prompts, p.beta, p.reduction,
                                  p.prior_loss_weight)
        g_prot = grad(loss)
        total = [t + gp + (gd if carry_db else 0) for t, gp, gd in zip(total, g_prot, g_db)]
    return total


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative L2 distance of two gradient lists."""
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.pow(2).sum()) for y in b)
    return math.sqrt(num / den)


def test_l2p_counts_and_gradient_accumulation(tiny_a, subject, tmp_path):
    paper, g_paper = _outer_grads(tiny_a, subject, tmp_path)
    c = paper.counts
    assert (c.outer_iterations, c.personalization_steps, c.protection_backwards, c.theta_steps) == (1, 3, 3, 0)
    assert len(paper.trace) == 3
    assert all(torch.equal(a, b) for a, b in zip(paper.ref.parameters(), paper.theta_params))  # ref = initial theta
    # theta.grad is the sum of the inner protection gradients (each at the personalised theta_tmp).
    assert _close(g_paper, _replay(paper, carry_db=False)) < 1e-5
    # The reference code's quirk adds the personalisation gradients.
    quirk, g_quirk = _outer_grads(tiny_a, subject, tmp_path, quirk_carry_personalization_grads=True)
    assert _close(g_quirk, _replay(quirk, carry_db=True)) < 1e-5
    assert _close(g_quirk, g_paper) > 1e-2
    # "mean" divides the same sum by the number of inner iterations.
    _, g_mean = _outer_grads(tiny_a, subject, tmp_path, grad_accum="mean")
    assert _close(g_mean, [g / 3 for g in g_paper]) < 1e-5
    # Gradient checkpointing (a memory option) recomputes activations: same gradients.
    ckpt, g_ckpt = _outer_grads(tiny_a, subject, tmp_path, gradient_checkpointing=True)
    assert ckpt.tmp.is_gradient_checkpointing and ckpt.precision == "fp32"
    assert _close(g_ckpt, g_paper) < 1e-4
    # A full outer iteration steps theta once; the next one starts theta_tmp from the stepped theta.
    before = [p.detach().clone() for p in paper.theta_params]
    paper.record = False
    paper.outer_iteration()
    assert paper.counts.theta_steps == 1 and paper.counts.personalization_steps == 6
    assert any(not torch.equal(a, p) for a, p in zip(before, paper.theta_params))
    paper.restore_tmp()
    assert all(torch.equal(a, b) for a, b in zip(paper.theta_params, paper.tmp_params))
    assert not paper.opt_tmp.state


def test_same_seed_same_hardened_bytes(tiny_a, subject, tmp_path):
    defense = DEFENSES.create("apdm", {**MICRO, "outer_iterations": 2, "inner_iterations": 1}, profile="tiny")
    shas = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        defense.harden(make_ctx(tmp_path, seed), tiny_a, [subject], tmp_path / name)
        shas.append(models.weight_hashes(tmp_path / name))
    assert shas[0] == shas[1] and shas[0]["unet"] != shas[2]["unet"]
    assert shas[0]["vae"] == shas[2]["vae"] and shas[0]["text_encoder"] == shas[2]["text_encoder"]


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def hardened(tiny_a, subject, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("apdm") / "model"
    ctx = make_ctx(out.parent)
    calls: list = []
    ctx.progress = lambda d, t: calls.append((d, t))
    DEFENSES.create("apdm", profile="tiny").harden(ctx, tiny_a, [subject], out)
    return out, {"extra": ctx.extra, "calls": calls}


@pytest.fixture(scope="module")
def attacked(tiny_a, subject, hardened, tmp_path_factory) -> dict[str, float]:
    """APDM's attacker (METHODS.md 2.4: UNet only, batch 1) at tiny scale, on the base and the hardened model."""
    work = tmp_path_factory.mktemp("apdm-attack")
    images = subject.load("B", 64)
    unrelated = [render_synthetic(UNRELATED_SEED, i, 64) for i in range(4)]
    attack = ATTACKS.create("dreambooth", {"train_text_encoder": False, "train_batch_size": 1}, profile="tiny")
    out: dict[str, float] = {}
    for name, model in (("base", tiny_a), ("hard", hardened[0])):
        cls = generate_class_images(model, CLASS, attack.params.num_class_images, make_ctx(work), "ddim", 10, 3.0)
        trained = work / name
        attack.train(make_ctx(work), model, images, INSTANCE, CLASS, cls, trained)
        out[f"{name}_subject"] = held_out_loss(model, images, trained)
        out[f"{name}_unrelated"] = held_out_loss(model, unrelated, trained)
    print("APDM tiny held-out losses after DreamBooth:", json.dumps({k: round(v, 4) for k, v in out.items()}))
    return out


def test_hardened_model_resists_dreambooth(attacked):
    # Measured (tiny:a, seed 0): subject 0.3499 -> 0.3608 (+3.1%); unrelated subject 0.3482 -> 0.3597 (+3.3%).
    assert attacked["hard_subject"] > 1.015 * attacked["base_subject"], attacked


@pytest.mark.xfail(strict=True, reason="at tiny scale the protection is not subject-specific: the tiny text encoder "
                   "ignores the prompt and every synthetic toy shifts alike (measured: subject +3.1%, unrelated +3.3%; "
                   "before the attack +60.9% vs +60.9%; with real-image positives (positives_dir, other synthetic "
                   "subjects) +70.7% vs +71.0%; DreamBooth on the unrelated subject instead: +3.1%). A 17.8M UNet at 128 px starts to "
                   "separate them (+62.5% vs +42.7% before, +3.5% vs +2.8% after the attack); so does the text-conditioned "
                   "proxy:a (+63.5% vs +25.7% before the attack) but after the attacker's DreamBooth the rises are equal "
                   "(+4.5% vs +4.9%; beta 1000: the same): benchmarks/apdm_specificity.py --scale proxy")
def test_protection_is_subject_specific_at_tiny_scale(attacked):
    subject_rise = attacked["hard_subject"] / attacked["base_subject"] - 1
    unrelated_rise = attacked["hard_unrelated"] / attacked["base_unrelated"] - 1
    assert unrelated_rise < 0.5 * subject_rise, attacked


def test_hardened_folder_loads_back_and_generates(tiny_a, hardened):
    from diffusers import StableDiffusionPipeline

    out, info = hardened
    extra = info["extra"]
    assert (extra["apdm_outer_iterations"], extra["apdm_personalization_steps"], extra["apdm_protection_backwards"],
            extra["apdm_theta_steps"]) == (10, 40, 40, 10)
    assert extra["apdm_precision"] == "fp32" and extra["apdm_instance_prompt"] == INSTANCE
    assert info["calls"][-10:] == [(i + 1, 10) for i in range(10)]  # after the class-image progress
    assert not list(out.rglob("*.bin")) and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    log = json.loads((out / "apdm_log.json").read_text())
    assert len(log["losses"]) == 10 and all(np.isfinite(d["dpo"]) for d in log["losses"])
    pipe = StableDiffusionPipeline.from_pretrained(out, use_safetensors=True, local_files_only=True)
    base = models.load_components(tiny_a)
    hard = pipe.unet.state_dict()
    assert any(not torch.equal(v, hard[k]) for k, v in base.unet.state_dict().items())
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in base.vae.state_dict().items())
    assert models.weight_hashes(out)["text_encoder"] == models.weight_hashes(tiny_a)["text_encoder"]
    images = models.generate(models.set_sampler(pipe, "ddim"), [INSTANCE], 1, 4, 3.0, seed=0, resolution=64)
    assert images[0][1].shape == (64, 64, 3) and images[0][1].dtype == np.uint8 and images[0][1].std() > 0


def test_positives_from_a_folder_as_the_reference_paired_dataset(tiny_a, tmp_path):
    """positives_dir (the reference's --loss_dpo_paired_dataset_dir): x+ are the folder's first images by name,
    fitted to the resolution; the class images still come from the base model."""
    from PIL import Image

    folder = tmp_path / "paired"
    folder.mkdir()
    for name, seed in (("b.png", 301), ("a.png", 300), ("c.png", 302)):
        Image.fromarray(render_synthetic(seed, 0, 96)).save(folder / name)
    defense = DEFENSES.create("apdm", {**MICRO, "positives_dir": str(folder)}, profile="tiny")
    class_images, positives = defense._generated(make_ctx(tmp_path), tiny_a, defense.prompts("toy"), 2)
    from bench.images import fit

    assert [p.shape for p in positives] == [(64, 64, 3)] * 2
    assert np.array_equal(positives[0], fit(render_synthetic(300, 0, 96), 64))  # a.png first
    assert np.array_equal(positives[1], fit(render_synthetic(301, 0, 96), 64))
    assert len(class_images) == 2 and not any(np.array_equal(c, p) for c in class_images for p in positives)
    with pytest.raises(ValueError, match="3 images, but one per negative \\(4\\)"):
        defense._generated(make_ctx(tmp_path), tiny_a, defense.prompts("toy"), 4)
