"""Purifications that need a model (attacks/purification.py) and the cached ``purify`` stage: output contract, DiffPure
at t=0 and growing with t, GrIDPure's blending, IMPRESS's objective, one purify stage shared by attacks and cached
on rerun, keys of scenarios without model transforms unchanged, and the effect of a purifier on a protected image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.purification import GridPureParams, ImpressParams, grid_purify, impress_optimise
from bench.cli import main
from bench.datasets import SyntheticDataset
from bench.diffusion import to_tensor
from bench.models import prepare_purifier
from bench.plugins import TRANSFORMS, RunContext
from bench.registry import ConfigError, load_builtins
from tests.conftest import write_suite

RES = 64
FAST_PURIFIERS = {"ddpm": {"steps": 40}, "upscaler": {"vae_steps": 10, "unet_steps": 10}}
TINY = {"diffpure": {"t": 20}, "gridpure": {"t": 4, "iterations": 2}, "noisy-upscale": {"steps": 3},
        "impress": {"iterations": 10, "similarity": "none"}}


@pytest.fixture(scope="module")
def purifier_models(tmp_path_factory, tiny_model_a) -> dict[str, Path]:
    """Role -> folder: built-in purifiers with a few pre-training steps, and the tiny profile's tiny:a (IMPRESS's VAE)."""
    root = tmp_path_factory.mktemp("purifiers")
    for variant, steps in FAST_PURIFIERS.items():
        prepare_purifier(variant, root / variant, seed=0, resolution=RES, pretrain=steps)
    return {"diffpure": root / "ddpm", "upscaler": root / "upscaler", "default": tiny_model_a}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return SyntheticDataset().subjects(None)[0].load("B", RES)[:2]


def purify(name: str, params: dict, images, models, seed: int = 0):
    ctx = RunContext(seed=seed, device="cpu", profile="tiny", resolution=RES, work_dir=Path("."), models=dict(models))
    return TRANSFORMS.create(name, params).purify(ctx, images, "toy"), ctx


def mean_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x.astype(np.int16) - y.astype(np.int16)).mean() for x, y in zip(a, b)]))


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_purifier_keeps_shape_dtype_and_range_and_changes_the_image(name, images, purifier_models):
    out, _ = purify(name, TINY[name], images, purifier_models)
    assert len(out) == len(images)
    for o, x in zip(out, images):
        assert o.dtype == np.uint8 and o.shape == x.shape
        assert o.std() > 2, f"{name} returned a flat image"  # an image, not a constant
    assert mean_abs(out, images) > 0.5, name
    again, _ = purify(name, TINY[name], images, purifier_models)
    assert all(np.array_equal(a, b) for a, b in zip(out, again)), f"{name} is not deterministic given the seed"


def test_diffpure_is_the_identity_at_t0_and_moves_further_with_more_steps(images, purifier_models):
    same, _ = purify("diffpure", {"t": 0}, images, purifier_models)
    assert all(np.array_equal(a, b) for a, b in zip(same, images))
    dist = [mean_abs(purify("diffpure", {"t": t}, images, purifier_models)[0], images) for t in (2, 10, 60)]
    assert dist[0] < dist[1] < dist[2], dist


def test_gridpure_rounds_blend_with_gamma_and_cover_every_pixel():
    """A stand-in purifier mapping every window to mid-grey c=0: each round gives (1-gamma)*c + gamma*x quantised, so
    after k rounds x - c shrinks like gamma^k everywhere (windows and the corners' composite cover every pixel)."""
    x = to_tensor(SyntheticDataset().subjects(None)[0].load("B", RES)[:1])
    grey = lambda batch: torch.zeros_like(batch)  # noqa: E731
    assert torch.equal(grid_purify(x, grey, GridPureParams(iterations=0)), x)
    one = grid_purify(x, grey, GridPureParams(iterations=1, gamma=1.0))
    assert torch.allclose(one, x, atol=1 / 127.5)  # gamma 1: the input back (up to uint8 levels)
    for k, gamma in ((1, 0.5), (2, 0.5), (3, 0.2)):
        out = grid_purify(x, grey, GridPureParams(iterations=k, gamma=gamma))
        assert torch.allclose(out, x * gamma ** k, atol=k / 127.5), (k, gamma)
    windows = []
    grid_purify(x, lambda b: windows.append(b.shape) or b, GridPureParams(iterations=1))
    assert windows == [(10, 3, 32, 32)]  # 64 px: 32 px windows at stride 16 (3 x 3) + the corners' composite


def test_impress_lowers_its_objective_and_its_lpips_hinge_holds_the_image(images, purifier_models):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(purifier_models["default"], subfolder="vae").eval().requires_grad_(False)
    x = to_tensor(images)
    gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
    _, losses = impress_optimise(vae, x, ImpressParams(iterations=30, lr=0.01), gens)
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    # a stand-in perceptual distance (RMSE): with a large alpha the hinge keeps x_p within delta of x_adv
    dist = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3)).sqrt()  # noqa: E731
    gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
    held, _ = impress_optimise(vae, x, ImpressParams(iterations=30, alpha=100.0, delta=0.05), gens, dist)
    gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
    free, _ = impress_optimise(vae, x, ImpressParams(iterations=30, similarity="none"), gens)
    assert float(dist(held, x).max()) < float(dist(free, x).min())


def test_impress_needs_the_lpips_weights_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))  # an empty weights root: VGG16 absent
    load_builtins()
    assert "torchvision-vgg16" in (TRANSFORMS.get("impress")().missing_weights() or "")
    assert TRANSFORMS.create("impress", {"similarity": "none"}).missing_weights() is None


SUITE = """
name: purify
datasets: [{name: synthetic, num_subjects: 1}]
defenses: [none]
scenarios: [clean, {name: transform, label: jpeg, transforms: [jpeg]}%s]
attacks: [{name: dreambooth, max_train_steps: 2, num_class_images: 2}, {name: lora-dreambooth, max_train_steps: 2}]
metrics: [linf]
seeds: [0]
"""
PURIFIED = (", {name: transform, label: diffpure, transforms: [{name: diffpure, t: 5}]}, "
            "{name: transform, label: jpeg-diffpure, transforms: [jpeg, {name: diffpure, t: 5}]}")


def _plan(path: Path):
    from bench.runner import RunOptions, prepare

    return prepare(RunOptions(suite=str(path), profile="tiny", out=path.parent / "out")).plan


def test_model_transforms_plan_a_purify_stage_and_leave_other_keys_unchanged(tmp_path):
    plain = _plan(write_suite(tmp_path / "a", SUITE % ""))
    purified = _plan(write_suite(tmp_path / "b", SUITE % PURIFIED))
    kinds = lambda plan, kind: {k for k, s in plan.stages.items() if s.kind == kind}  # noqa: E731
    assert kinds(plain, "compose") == kinds(purified, "compose")  # diffpure shares clean's, jpeg-diffpure jpeg's
    assert set(plain.stages) < set(purified.stages)  # every key of the plain plan is unchanged
    purify = [purified.stages[k] for k in kinds(purified, "purify")]
    assert len(purify) == 2 and all(p.params["model_roles"] == ["diffpure"] for p in purify)
    tail = [["diffpure", [["batch_size", 8], ["t", 5]]]]
    assert all(json.loads(json.dumps(p.params["transforms"])) == tail for p in purify)
    before = {json.dumps(purified.stages[p.deps[0]].params["scenario"]["transforms"]) for p in purify}
    assert before == {"[]", json.dumps([["jpeg", [["quality", 75]]]])}  # compose applied what precedes diffpure
    attacks = [s for s in purified.stages.values() if s.kind == "attack" and set(s.deps) & kinds(purified, "purify")]
    assert len(attacks) == 4  # both attacks of both purified scenarios train on a purify stage's images


def test_compose_refuses_a_model_transform():
    from bench.plugins import ScenarioSpec
    from bench.scenarios import compose_training_set

    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="purify stage"):
        compose_training_set([img], [img], [], ScenarioSpec(transforms=(("diffpure", (("t", 5),)),)),
                             np.random.default_rng(0))


def test_purify_stage_runs_once_for_both_attacks_and_never_again(out_dir, tmp_path, monkeypatch):
    from bench import models

    fast = {**models.PURIFIER_PRETRAIN, "ddpm": {**models.PURIFIER_PRETRAIN["ddpm"], "steps": 5}}
    monkeypatch.setattr(models, "PURIFIER_PRETRAIN", fast)  # the tiny:ddpm model stage: seconds, not a minute
    body = SUITE % ", {name: transform, label: diffpure, transforms: [{name: diffpure, t: 3}]}"
    suite = write_suite(tmp_path, body.replace("scenarios: [clean, {name: transform, label: jpeg, transforms: [jpeg]}, ",
                                               "scenarios: ["))
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    purify = list((out_dir / "cache" / "purify").iterdir())
    assert len(purify) == 1
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["cells_ok"] == 2
    attack_deps = [json.loads((d / "done.json").read_text())["deps"] for d in (out_dir / "cache" / "attack").iterdir()]
    assert len(attack_deps) == 2 and all(any(d.startswith(purify[0].name) for d in deps) for deps in attack_deps)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    assert json.loads((out_dir / "summary.json").read_text())["stages_run"] == 0


def test_purifier_parameters_are_validated():
    for name, bad in (("diffpure", {"t": 1001}), ("gridpure", {"gamma": 1.5}), ("noisy-upscale", {"noise_level": 400}),
                      ("impress", {"similarity": "ssim"}), ("noisy-upscale", {"prompt": "a {subject}"})):
        with pytest.raises(ConfigError):
            TRANSFORMS.create(name, bad)


def test_diffpure_lowers_the_protections_effect_on_the_surrogate_loss(purifier_models, capsys):
    """FSMG (tiny settings of tests/test_anti_dreambooth.py) raises its surrogate's denoising loss on the protected
    images; after DiffPure (t=20, the tiny DDPM) of both sets, the protected-minus-clean gap is smaller. Measured
    (tiny:a of the tiny profile, 24 fixed draws): see the printed numbers."""
    from bench.plugins import DEFENSES
    from bench.registry import build_params
    from tests.test_anti_dreambooth import _fixed_draw_loss

    subject = SyntheticDataset().subjects(None)[0]
    cls = DEFENSES.get("fsmg")
    fsmg = cls(build_params(cls, {"num_class_images": 2, "reference_steps": 10, "pgd_steps": 25}, "tiny", "fsmg"))
    ctx = RunContext(seed=0, device="cpu", profile="tiny", resolution=RES, work_dir=Path("."),
                     models={"default": purifier_models["default"]})
    clean = subject.load("B", RES)
    protected = fsmg.protect(ctx, clean, subject, purifier_models["default"])
    comps = fsmg.models[0].comps
    comps.unet.eval()

    def loss(images) -> float:
        return _fixed_draw_loss(comps, images, fsmg.models[0].instance_prompt)

    before = loss(protected) - loss(clean)
    after = loss(purify("diffpure", {"t": 20}, protected, purifier_models)[0]) \
        - loss(purify("diffpure", {"t": 20}, clean, purifier_models)[0])
    with capsys.disabled():
        print(f"\nFSMG effect on the surrogate loss: {before:.5f} before DiffPure(t=20), {after:.5f} after")
    assert before > 0 and after < 0.8 * before, (before, after)  # measured: 0.00388 -> 0.00267
