"""Anti-DreamBooth defenses (defenses/anti_dreambooth.py) on tiny models: budget after saving, effect on the surrogate's
denoising loss against random noise at the same budget, targeted variants, determinism, the ASPL alternation,
in-place restore == deep copy (bit for bit), the reference-quirk options, ensembles and the LoRA surrogate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import defenses.anti_dreambooth as ad
from bench.datasets import SyntheticDataset
from bench.diffusion import denoising_loss, encode_prompt, to_tensor
from bench.models import load_components, prepare_tiny
from bench.plugins import DEFENSES, RunContext
from bench.registry import ConfigError, build_params
from defenses.baselines import RandomNoise, RandomNoiseParams
from tests.conftest import SHARED_DATA

RES = 64
FAST = {"num_class_images": 2}  # prior preservation stays on; fewer generated class images


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A briefly pre-trained tiny:a ("default") and an untrained tiny:b ("mismatch"), built once."""
    root = tmp_path_factory.mktemp("adb_models")
    prepare_tiny("a", root / "a", {"vae_steps": 30, "unet_steps": 40, "num_subjects": 8}, seed=0, resolution=RES)
    prepare_tiny("b", root / "b", {"vae_steps": 0, "unet_steps": 0}, seed=0, resolution=RES)
    return {"default": root / "a", "mismatch": root / "b"}


@pytest.fixture(scope="module")
def subject():
    return SyntheticDataset().subjects(None)[0]


def make(name: str, **params):
    cls = DEFENSES.get(name)
    return cls(build_params(cls, {**FAST, **params}, "tiny", name))


def run(defense, subject, models: dict[str, Path], seed: int = 0, options: ad.LoopOptions | None = None):
    if options is not None:
        defense.loop_options = options
    ctx = RunContext(seed=seed, device="cpu", profile="tiny", resolution=RES, work_dir=Path("."), models=dict(models))
    clean = subject.load("B", RES)
    out = defense.protect(ctx, clean, subject, models["default"])
    return clean, out, ctx


def weights(defense) -> torch.Tensor:
    return torch.cat([q.detach().flatten() for q in defense.models[0].trainable])


def assert_within_budget(clean, out, eps=6.375):
    assert len(out) == len(clean)
    for c, o in zip(clean, out):
        assert o.dtype == np.uint8 and o.shape == c.shape
        assert np.abs(o.astype(np.int16) - c.astype(np.int16)).max() <= int(np.floor(eps))


@pytest.fixture(scope="module")
def aspl_run(tiny_models, subject):
    d = make("aspl", rounds=2, surrogate_steps=3, pgd_steps=6, train_steps=3)
    clean, out, ctx = run(d, subject, tiny_models)
    return d, clean, out, ctx


def test_aspl_alternates_exactly_and_respects_the_budget(aspl_run):
    d, clean, out, ctx = aspl_run
    kinds = [ev[0] for ev in d.trace]
    one_round = ["snapshot"] + ["surrogate_step"] * 3 + ["pgd_step"] * 6 + ["restore"] + ["train_step"] * 3
    assert kinds == one_round * 2
    assert_within_budget(clean, out)
    assert ctx.extra["realised_linf_255"] == 6  # 10 steps of 0.6375 reach the 6/255 ceiling somewhere
    # paper schedule: the surrogate cycles through all 4 set_A images across rounds (0,1,2 then 3,0,1)
    assert [ev[2] for ev in d.trace if ev[0] == "surrogate_step"] == [0, 1, 2, 3, 0, 1]
    for key in ("precision", "gradient_checkpointing", "attention_processor", "surrogate_copy", "prompt_cache",
                "use_8bit_adam", "snapshot_device", "pgd_batch_size", "lora_surrogate", "eps_255"):
        assert key in ctx.extra, key
    assert ctx.extra["precision"].startswith("fp32")  # CPU: no bf16, recorded


def test_in_place_restore_equals_deep_copy_bit_for_bit(aspl_run, tiny_models, subject):
    d, _, out, _ = aspl_run
    naive = make("aspl", rounds=2, surrogate_steps=3, pgd_steps=6, train_steps=3)
    _, out_naive, ctx = run(naive, subject, tiny_models, options=ad.NAIVE)
    assert ctx.extra["surrogate_copy"] == "deepcopy" and "restore" not in ctx.extra["step_counts"]
    assert all(np.array_equal(a, b) for a, b in zip(out, out_naive))
    assert torch.equal(weights(d), weights(naive))  # the persistent model ends identical too


def test_memory_options_do_not_change_the_result(aspl_run, tiny_models, subject):
    d, _, out, _ = aspl_run
    lean = make("aspl", rounds=2, surrogate_steps=3, pgd_steps=6, train_steps=3, gradient_checkpointing=True,
                pgd_batch_size=1, snapshot_device="same")
    _, out_lean, ctx = run(lean, subject, tiny_models)
    assert ctx.extra["gradient_checkpointing"] and ctx.extra["pgd_batch_size"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(out, out_lean))
    assert torch.equal(weights(d), weights(lean))


def test_same_seed_same_bytes_other_seed_differs(aspl_run, tiny_models, subject):
    _, _, out, _ = aspl_run
    _, again, _ = run(make("aspl", rounds=2, surrogate_steps=3, pgd_steps=6, train_steps=3), subject, tiny_models)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    _, other, _ = run(make("aspl", rounds=1, surrogate_steps=1, pgd_steps=2, train_steps=1), subject, tiny_models, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(out, other))


def test_training_schedule_paper_and_quirk():
    counters: dict[str, int] = {}
    paper = [ad.training_schedule(counters, "surrogate", 3, 4, 200, False) for _ in range(2)]
    assert [i for call in paper for i, _ in call] == [0, 1, 2, 3, 0, 1]
    assert [j for call in paper for _, j in call] == [0, 1, 2, 3, 4, 5]
    quirk = [ad.training_schedule({}, "surrogate", 3, 4, 200, True) for _ in range(2)]
    assert [i for call in quirk for i, _ in call] == [0, 1, 2, 0, 1, 2]  # image 3 never trains the surrogate
    assert ad.training_schedule({}, "x", 2, 4, 0, False) == [(0, -1), (1, -1)]  # no prior preservation


def test_quirk_first_three_images_changes_the_images_used(tiny_models, subject):
    d = make("aspl", rounds=2, surrogate_steps=3, pgd_steps=1, train_steps=3, quirk_first_three_images=True)
    run(d, subject, tiny_models)
    assert [ev[2] for ev in d.trace if ev[0] == "surrogate_step"] == [0, 1, 2, 0, 1, 2]
    assert [ev[2] for ev in d.trace if ev[0] == "train_step"] == [0, 1, 2, 0, 1, 2]


def test_target_term_at_t_zero_paper_and_quirk(tiny_models):
    sched = load_components(tiny_models["default"]).noise_scheduler
    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, 4, 8, 8), generator=g)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([0, 500])
    paper = ad.target_at_t_minus_one(sched, z, noise, t, wraps=False)
    quirk = ad.target_at_t_minus_one(sched, z, noise, t, wraps=True)
    assert torch.equal(paper[0], z[0])  # x_{-1} := z_tgt
    a = sched.alphas_cumprod[-1]
    assert torch.allclose(quirk[0], a.sqrt() * z[0] + (1 - a).sqrt() * noise[0])  # alphas_cumprod[-1]: ~pure noise
    assert torch.equal(paper[1], quirk[1])
    assert torch.allclose(paper[1], sched.add_noise(z[1:], noise[1:], torch.tensor([499]))[0])


def _fixed_draw_loss(comps, images, prompt: str, draws: int = 24) -> float:
    """Mean denoising loss over fixed (VAE sample, t, eps) draws: the same draws for every image set."""
    gen = torch.Generator().manual_seed(1234)
    x = to_tensor(images)
    with torch.no_grad():
        dist = comps.vae.encode(x).latent_dist
        emb = encode_prompt(comps.tokenizer, comps.text_encoder, [prompt]).expand(len(x), -1, -1)
        total = 0.0
        for _ in range(draws):
            z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * comps.vae.config.scaling_factor
            total += float(denoising_loss(comps.unet, comps.noise_scheduler, z0, emb, gen))
    return total / draws


def _random_noise(clean, seed=0):
    ctx = RunContext(seed=seed, device="cpu", profile="tiny", resolution=RES, work_dir=Path("."))
    return RandomNoise(RandomNoiseParams(eps=6.375, distribution="sign")).protect(ctx, clean, None, None)


@pytest.mark.parametrize("name,params", [("fsmg", {"reference_steps": 10, "pgd_steps": 25}),
                                         ("aspl", {"rounds": 4})])
def test_protection_raises_the_surrogate_loss_more_than_random_noise(name, params, tiny_models, subject):
    d = make(name, **params)
    clean, out, ctx = run(d, subject, tiny_models)
    assert_within_budget(clean, out)
    comps = d.models[0].comps  # FSMG: the trained reference model; ASPL: the persistent model after its last round
    comps.unet.eval()
    prompt = d.models[0].instance_prompt
    l_clean = _fixed_draw_loss(comps, clean, prompt)
    l_noise = _fixed_draw_loss(comps, _random_noise(clean), prompt)
    l_prot = _fixed_draw_loss(comps, out, prompt)
    assert l_prot - l_clean > 2 * abs(l_noise - l_clean), (l_clean, l_noise, l_prot)
    assert l_prot > l_noise


def test_targeted_variant_moves_latents_towards_the_target(tiny_models, subject):
    d = make("t-fsmg", reference_steps=5, pgd_steps=25)
    clean, out, ctx = run(d, subject, tiny_models)
    assert_within_budget(clean, out)
    assert ctx.extra["targeted"] and "checkerboard" in ctx.extra["target_image"]
    vae = d.models[0].comps.vae
    z_tgt = d.models[0].target / vae.config.scaling_factor

    def dist(images):
        with torch.no_grad():
            return float((vae.encode(to_tensor(images)).latent_dist.mean - z_tgt).pow(2).mean())

    d_clean, d_noise, d_prot = dist(clean), dist(_random_noise(clean)), dist(out)
    assert d_prot < d_clean and d_prot < d_noise, (d_clean, d_noise, d_prot)


def test_real_target_image_loads_when_present():
    path = SHARED_DATA / "faces" / "_target" / "target.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared/data is optional)")
    img = ad.load_target(str(path), RES)
    assert img.shape == (RES, RES, 3) and img.dtype == np.uint8 and img.std() > 10
    assert not np.array_equal(img, ad.builtin_target(RES))


def test_ensembles_images_and_gradients(tiny_models, subject):
    d = make("e-aspl", rounds=1, surrogate_steps=1, pgd_steps=3, train_steps=1)
    assert d.model_roles() == ("default", "mismatch")
    assert DEFENSES.get("e-aspl")().model_roles() == ("sd14", "sd15", "sd21")  # paper default
    clean, out_img, ctx = run(d, subject, tiny_models)
    assert_within_budget(clean, out_img)
    roles = [ev[1] for ev in d.trace if ev[0] == "pgd_step"]
    assert roles == ["default"] * 3 + ["mismatch"] * 3  # each model's PGD from the shared X, then the mean
    g = make("e-aspl", rounds=1, surrogate_steps=1, pgd_steps=3, train_steps=1, ensemble="gradients")
    _, out_grad, ctx_g = run(g, subject, tiny_models)
    assert_within_budget(clean, out_grad)
    assert [ev[1] for ev in g.trace if ev[0] == "pgd_step"] == ["default,mismatch"] * 3
    assert ctx_g.extra["ensemble"] == "gradients" and ctx.extra["ensemble"] == "images"
    assert not all(np.array_equal(a, b) for a, b in zip(out_img, out_grad))
    with pytest.raises(ValueError, match="not in ctx.models"):
        run(make("e-aspl", models=["default", "sd21"], rounds=1), subject, tiny_models)


def test_lora_surrogate_trains_only_adapters(tiny_models, subject):
    d = make("aspl-lora", rounds=1, surrogate_steps=2, pgd_steps=2, train_steps=2)
    clean, out, ctx = run(d, subject, tiny_models)
    assert_within_budget(clean, out)
    assert ctx.extra["lora_surrogate"] and not ctx.extra["text_encoder_trained"]
    unet = d.models[0].comps.unet
    lora = {n: q for n, q in unet.named_parameters() if "lora" in n}
    assert lora and all(q.requires_grad for q in lora.values())
    assert any(float(q.detach().abs().sum()) > 0 for n, q in lora.items() if "lora_B" in n)  # zero-initialised, then trained
    base = load_components(tiny_models["default"]).unet.state_dict()
    for n, q in unet.state_dict().items():
        if "lora" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(q, base[key]), n


def test_parameters_are_validated():
    with pytest.raises(ConfigError, match="eps"):
        make("aspl", eps=0)
    with pytest.raises(ConfigError, match="no parameter"):
        make("fsmg", pgd_step=3)
    with pytest.raises(ConfigError, match="bf16-weights"):
        make("fsmg", mixed_precision="bf16-weights")
    with pytest.raises(ConfigError, match="target_image"):
        make("t-aspl", target_image=str(Path(__file__).parent / "no-such-target.jpg"))
    if not ad.importlib.util.find_spec("bitsandbytes"):
        with pytest.raises(ConfigError, match="bitsandbytes"):
            make("aspl", use_8bit_adam=True)
    assert DEFENSES.get("aspl")().params.rounds == 50 and DEFENSES.get("fsmg")().params.pgd_steps == 100
    assert DEFENSES.get("aspl-lora")().params.learning_rate == 5e-6
