"""bench.models and bench.diffusion on tiny models (built once per session under pytest's base temp dir)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import models
from bench.datasets import render_synthetic
from bench.diffusion import LatentCache, denoising_loss, draw_timesteps_noise, encode_prompt, to_tensor, to_uint8

# Short pre-training for tests; the tiny profile's own is longer (see bench/profiles.py).
TEST_PRETRAIN = {"vae_steps": 40, "unet_steps": 80, "batch_size": 8, "num_subjects": 16, "images_per_subject": 4}
NO_PRETRAIN = {"vae_steps": 0, "unet_steps": 0}
MICRO_PRETRAIN = {"vae_steps": 2, "unet_steps": 2, "batch_size": 2, "num_subjects": 2, "images_per_subject": 2}
HELD_OUT_SEEDS = range(5000, 5004)  # neither evaluation subjects (small seeds) nor pre-training ones (1000..)


def build_tiny(tmp_path_factory, name: str, variant: str, pretrain: dict, seed: int = 0) -> Path:
    """A tiny model under the session's base temp dir, built at most once per session (shared by test files)."""
    out = tmp_path_factory.getbasetemp() / f"model-{name}"
    if not (out / "model_index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        models.prepare_tiny(variant, out, pretrain, seed=seed, resolution=64)
    return out


@pytest.fixture(scope="session")
def tiny_a(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory, "a-test", "a", TEST_PRETRAIN)


@pytest.fixture(scope="session")
def tiny_a_init(tmp_path_factory) -> Path:
    """Variant a with the same seed and no pre-training: the random initialisation pre-training started from."""
    return build_tiny(tmp_path_factory, "a-init", "a", NO_PRETRAIN)


@pytest.fixture(scope="session")
def micro_a(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory, "a-micro", "a", MICRO_PRETRAIN)


def held_out_images() -> torch.Tensor:
    return to_tensor([render_synthetic(s, i, 64) for s in HELD_OUT_SEEDS for i in range(2)])


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_clip_bpe(tmp_path):
    tok = models.build_tokenizer(tmp_path)
    assert len(tok) == 49408
    assert tok("a photo of sks person").input_ids == [49406, 320, 1125, 539, 48136, 2533, 49407]
    assert tok.model_max_length == 77
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()


# ----------------------------------------------------------------------------------------------- tiny models


def test_tiny_folder_round_trips_with_diffusers(tiny_a):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": True, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(tiny_a, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(tiny_a, subfolder="vae", **kw)
    te = CLIPTextModel.from_pretrained(tiny_a, subfolder="text_encoder", **kw)
    tok = CLIPTokenizer.from_pretrained(tiny_a, subfolder="tokenizer", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(tiny_a, subfolder="scheduler", local_files_only=True)
    assert tok("a photo of sks person").input_ids == [49406, 320, 1125, 539, 48136, 2533, 49407]
    assert list(unet.config.block_out_channels) == [32, 64] and unet.config.cross_attention_dim == te.config.hidden_size
    assert len(vae.config.down_block_types) == 4  # 8x downsampling: 64 px -> 8x8 latents
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    assert vae.config.scaling_factor != 0.18215  # set from the pre-trained latents' std
    pipe = StableDiffusionPipeline.from_pretrained(tiny_a, safety_checker=None, requires_safety_checker=False, **kw)
    assert pipe.unet.config.block_out_channels == unet.config.block_out_channels
    assert not list(tiny_a.rglob("*.bin")) and len(list(tiny_a.rglob("*.safetensors"))) == 3
    hashes = models.weight_hashes(tiny_a)
    assert set(hashes) == {"unet", "vae", "text_encoder"}
    expected = hashlib.sha256((tiny_a / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert hashes["unet"] == expected


def test_same_seed_same_bytes_and_variants_differ(micro_a, tmp_path):
    again = tmp_path / "again"
    models.prepare_tiny("a", again, MICRO_PRETRAIN, seed=0)
    assert models.weight_hashes(again) == models.weight_hashes(micro_a)
    other_seed = tmp_path / "seed1"
    models.prepare_tiny("a", other_seed, MICRO_PRETRAIN, seed=1)
    b = tmp_path / "b"
    models.prepare_tiny("b", b, MICRO_PRETRAIN, seed=0)
    ha, h1, hb = models.weight_hashes(micro_a), models.weight_hashes(other_seed), models.weight_hashes(b)
    assert all(ha[k] != h1[k] for k in ha) and all(ha[k] != hb[k] for k in ha)
    ua = json.loads((micro_a / "unet" / "config.json").read_text())
    ub = json.loads((b / "unet" / "config.json").read_text())
    assert ua["block_out_channels"] != ub["block_out_channels"]


def test_prepare_tiny_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'vae_stepz'"):
        models.prepare_tiny("a", tmp_path / "x", {"vae_stepz": 3}, seed=0)
    with pytest.raises(models.ModelUnavailable, match="unknown tiny model variant 'z'"):
        models.prepare_tiny("z", tmp_path / "x", {}, seed=0)
    assert models.tiny_variant("tiny:b") == "b" and models.tiny_variant("owner/name") is None


def test_pretraining_lowers_denoising_and_reconstruction_loss(tiny_a, tiny_a_init):
    pre = models.load_components(tiny_a)
    init = models.load_components(tiny_a_init)
    x = held_out_images()
    with torch.no_grad():
        rec_pre = float(((pre.vae.decode(pre.vae.encode(x).latent_dist.mean).sample - x) ** 2).mean())
        rec_init = float(((init.vae.decode(init.vae.encode(x).latent_dist.mean).sample - x) ** 2).mean())
        latents = LatentCache(pre.vae, x).sample(torch.arange(len(x)), torch.Generator().manual_seed(11))
        t, noise = draw_timesteps_noise(pre.noise_scheduler, latents, torch.Generator().manual_seed(12))
        losses = {}
        for name, c in (("pre", pre), ("init", init)):
            emb = encode_prompt(c.tokenizer, c.text_encoder, ["a photo of a toy"]).expand(len(x), -1, -1)
            losses[name] = float(denoising_loss(c.unet, pre.noise_scheduler, latents, emb, None, timesteps=t, noise=noise))
    # Measured with TEST_PRETRAIN: reconstruction 0.13 vs 0.28, denoising 0.70 vs 1.14.
    assert rec_pre < 0.6 * rec_init, (rec_pre, rec_init)
    assert losses["pre"] < 0.8 * losses["init"], losses
    log = json.loads((tiny_a / "pretrain_log.json").read_text())
    assert np.mean(log["unet_losses"][-10:]) < np.mean(log["unet_losses"][:10])


# ----------------------------------------------------------------------------------------------- safety, resolving


def _pickle_component(model_dir: Path, comp: str) -> Path:
    from safetensors.torch import load_file

    st = next((model_dir / comp).glob("*.safetensors"))
    target = st.with_suffix(".bin")
    torch.save(load_file(st), target)
    st.unlink()
    return target


def test_pickled_only_weights_are_refused(micro_a, tmp_path):
    unsafe = tmp_path / "unsafe"
    shutil.copytree(micro_a, unsafe)
    pickled = _pickle_component(unsafe, "unet")
    with pytest.raises(models.UnsafeWeights, match=pickled.name) as e:
        models.check_safe(unsafe, allow_unsafe=False)
    assert str(unsafe / "unet") in str(e.value)
    with pytest.raises(models.UnsafeWeights):
        models.load_components(unsafe)
    models.check_safe(unsafe, allow_unsafe=True)
    comps = models.load_components(unsafe, allow_unsafe=True)
    ref = models.load_components(micro_a)
    for (k, v), (_, w) in zip(comps.unet.state_dict().items(), ref.unet.state_dict().items()):
        assert torch.equal(v, w), k


def test_remote_code_component_is_refused(micro_a, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(micro_a, custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["unet"] = ["my_pipeline_code", "EvilUNet"]
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(models.UnsafeWeights, match="my_pipeline_code"):
        models.check_safe(custom, allow_unsafe=True)


def test_resolve_model(micro_a, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("BENCH_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(models.ModelUnavailable) as e:
        models.resolve_model("nobody-here/no-such-model")
    assert 'huggingface-cli download nobody-here/no-such-model --include "*.json" "*.txt" "*.safetensors"' in str(e.value)
    with pytest.raises(models.ModelUnavailable, match="no such folder"):
        models.resolve_model(str(tmp_path / "missing"))
    assert models.resolve_model(str(micro_a)) == micro_a.resolve()
    # A cached snapshot (the Hugging Face cache layout) resolves without any network access.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(micro_a, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = models.resolve_model("someone/tiny-sd")
    assert path == repo / "snapshots" / commit
    assert models.weight_hashes(path) == models.weight_hashes(micro_a)
    (tmp_path / "notdiffusers").mkdir()
    with pytest.raises(models.ModelUnavailable, match="model_index.json"):
        models.check_safe(tmp_path / "notdiffusers", allow_unsafe=False)


# ----------------------------------------------------------------------------------------------- generation


def test_generation_is_seeded_and_batch_size_independent(tiny_a):
    pipe = models.load_pipeline(tiny_a, "cpu", "ddim")
    prompts = ["a photo of a toy", "a photo of sks toy"]
    out = models.generate(pipe, prompts, 2, 4, 3.0, seed=5, resolution=64, batch_size=4)
    again = models.generate(pipe, prompts, 2, 4, 3.0, seed=5, resolution=64, batch_size=4)
    single = models.generate(pipe, prompts, 2, 4, 3.0, seed=5, resolution=64, batch_size=1)
    other = models.generate(pipe, prompts, 2, 4, 3.0, seed=6, resolution=64, batch_size=4)
    assert [p for p, _ in out] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert all(im.dtype == np.uint8 and im.shape == (64, 64, 3) for _, im in out)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(out, again))  # bit-identical rerun
    # Batching changes float summation order only: at most 1-2 levels apart, never a different image.
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for (_, a), (_, b) in zip(out, single)) <= 2
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 2 for (_, a), (_, b) in zip(out, other))


def test_samplers(micro_a):
    pipe = models.load_pipeline(micro_a, "cpu", "default")
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.safety_checker is None
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm-solver++": "DPMSolverMultistepScheduler"}
    for sampler, cls in expected.items():
        assert type(models.set_sampler(pipe, sampler).scheduler).__name__ == cls
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="unknown sampler 'heun2'"):
        models.set_sampler(pipe, "heun2")


# ----------------------------------------------------------------------------------------------- diffusion pieces


def test_pixel_conversions_round_trip():
    values = np.arange(256, dtype=np.uint8)
    im = np.stack([np.tile(values, (256, 1))] * 3, axis=-1)
    t = to_tensor([im])
    assert t.shape == (1, 3, 256, 256) and t.dtype == torch.float32
    assert float(t.min()) == -1.0 and float(t.max()) == 1.0
    assert np.array_equal(to_uint8(t)[0], im)
    # Anti-DreamBooth quantisation: floor(x * 127.5 + 128), clamped.
    x = torch.tensor([-2.0, -1.0, 0.0, 0.003, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0][0, :, 0].tolist() == [0, 0, 128, 128, 255, 255]
    with pytest.raises(ValueError, match="one shape"):
        to_tensor([im, im[:8]])


def test_latent_cache_matches_vae_sampling(micro_a):
    c = models.load_components(micro_a)
    x = held_out_images()[:3]
    cache = LatentCache(c.vae, x, batch_size=2)
    got = cache.sample([0, 1, 2], torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = c.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * c.vae.config.scaling_factor
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not torch.equal(cache.sample([0], torch.Generator().manual_seed(4)), got[:1])


class _Oracle(torch.nn.Module):
    """A 'UNet' that returns a given tensor, to check which target the loss compares against."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, sample, timestep, encoder_hidden_states):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.out)


def test_denoising_loss_targets():
    from diffusers import DDPMScheduler

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, noise = draw_timesteps_noise(DDPMScheduler(), latents, torch.Generator().manual_seed(1))
    eps = DDPMScheduler(prediction_type="epsilon")
    assert float(denoising_loss(_Oracle(noise), eps, latents, None, None, timesteps=t, noise=noise)) == 0.0
    vpred = DDPMScheduler(prediction_type="v_prediction")
    velocity = vpred.get_velocity(latents, noise, t)
    assert float(denoising_loss(_Oracle(velocity), vpred, latents, None, None, timesteps=t, noise=noise)) == 0.0
    assert float(denoising_loss(_Oracle(noise), vpred, latents, None, None, timesteps=t, noise=noise)) > 0.01
    zeros = torch.zeros_like(noise)
    loss, per = denoising_loss(_Oracle(zeros), eps, latents, None, None, timesteps=t, noise=noise, per_sample=True)
    torch.testing.assert_close(per, (noise ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(loss, per.mean())
    # Drawn t and eps come from the generator: same seed, same loss.
    a = denoising_loss(_Oracle(zeros), eps, latents, None, torch.Generator().manual_seed(9))
    b = denoising_loss(_Oracle(zeros), eps, latents, None, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
