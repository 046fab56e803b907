"""DINO, CLIP-I and CLIP-T (metrics/fidelity.py).

Real weights cannot be fetched here, so most tests run on random-weight models of the same architecture families
(transformers ViTModel / CLIPModel from tiny configs): "random weights: plumbing only" -- they check pairing,
averaging, preprocessing, caching, truncation and error paths, never the values' meaning. The value tests at the end
need the real weights in the local Hugging Face cache and skip with the reason otherwise.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from bench import weights
from bench.plugins import METRICS, MetricInputs
from bench.registry import ConfigError, build_params
from metrics import fidelity
from metrics.fidelity import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ClipI, ClipT, Dino, all_pairs_mean,
                              backbone_token, clip_image_embeddings, clip_text_embeddings, dino_embeddings, load_clip,
                              load_dino, preprocess)

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
CLIP_SIZE = 32  # input size of the tiny random CLIP


@dataclass
class StandInSubject:
    """What the metrics use of bench.datasets.Subject: ``load(split, resolution)``, ``fingerprint()``, ``key()``;
    records every load."""

    name: str
    splits: dict[str, list[np.ndarray]]
    loads: list[str] = field(default_factory=list)

    def load(self, split: str, resolution: int | None) -> list[np.ndarray]:
        self.loads.append(split)
        return [im.copy() for im in self.splits.get(split, [])]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for split in sorted(self.splits):
            for im in self.splits[split]:
                h.update(split.encode() + im.tobytes())
        return h.hexdigest()

    def key(self) -> str:
        return f"stand-in/{self.name}"


def images(seed: int, n: int, shape: tuple[int, int] = (96, 80)) -> list[np.ndarray]:
    """Smooth random colour fields (bicubic-upsampled noise), so resizing keeps them distinct."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(np.asarray(PILImage.fromarray(small).resize((shape[1], shape[0]), PILImage.Resampling.BICUBIC)))
    return out


def make(cls, **params):
    return cls(build_params(cls, params, None, f"metric {cls.name}"))


def inputs_for(subject, generated, prompts=None) -> MetricInputs:
    return MetricInputs(subject=subject, resolution=64, generated=list(generated),
                        prompts=list(prompts) if prompts is not None else [])


# ------------------------------------------------------------------ random-weight models (plumbing only)

@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> str:
    """Random weights: plumbing only. A ViTModel (224 px, patch 16) with a 32-wide, 2-layer encoder."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-dino"
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16, initializer_range=0.2)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """Random weights: plumbing only. A CLIPModel with tiny text/vision towers and CLIP's real 49,408-token BPE
    tokenizer (built offline by bench.models.build_tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from bench.models import build_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-clip"
    tokenizer = build_tokenizer(folder / "_tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=CLIP_SIZE, patch_size=8),
        projection_dim=16, initializer_factor=1.0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    return str(folder)


@pytest.fixture
def subject() -> StandInSubject:
    return StandInSubject("s1", {"A": images(1, 3), "B": images(2, 2, (64, 120)), "C": images(3, 2)})


# ------------------------------------------------------------------ registration, params, protocol ids

def test_registered_with_defender_direction_and_weights():
    for name, cls in (("dino", Dino), ("clip-i", ClipI), ("clip-t", ClipT)):
        assert METRICS.get(name) is cls and cls.version == 1 and cls.target == "generated"
        assert cls.higher_is_better is False and cls.description and cls.paper
        assert cls.requires.modules == ("transformers",)
    assert weights.get("dino-vits16").hf_repo == "facebook/dino-vits16"
    assert weights.get("clip-vit-large-patch14").hf_repo == "openai/clip-vit-large-patch14"
    assert weights.get("clip-vit-base-patch32").hf_repo == "openai/clip-vit-base-patch32"
    assert make(Dino).weight_names() == ("dino-vits16",)
    assert make(ClipT, model="clip-vit-base-patch32").weight_names() == ("clip-vit-base-patch32",)


def test_default_protocol_ids():
    assert make(Dino).protocol_id() == "dino/vits16-cls/resize256-crop224/ref=A/all-pairs/gen=first100"
    assert make(ClipI).protocol_id() == "clip-i/vit-l14-openai/openai-preproc/ref=A/all-pairs/gen=first100"
    assert make(ClipT).protocol_id() == "clip-t/vit-l14-openai/openai-preproc/trunc77/gen=first100"


def test_protocol_ids_differ_by_backbone_split_and_cap():
    ids = {make(ClipI).protocol_id(), make(ClipI, model="clip-vit-base-patch32").protocol_id(),
           make(ClipI, reference_split="AB").protocol_id(), make(ClipI, reference_split="C").protocol_id(),
           make(ClipI, max_generated=50).protocol_id()}
    assert len(ids) == 5
    assert make(Dino, reference_split="AB").protocol_id() != make(Dino).protocol_id()
    assert make(ClipT, model="clip-vit-base-patch32").protocol_id().startswith("clip-t/vit-b32-openai/")
    # a registered name and its Hugging Face repository are the same weights: one column
    assert make(ClipT, model="openai/clip-vit-large-patch14").protocol_id() == make(ClipT).protocol_id()
    assert make(Dino, model="facebook/dino-vits16").protocol_id() == make(Dino).protocol_id()
    assert make(ClipT, model="laion/CLIP-ViT-B-32").protocol_id().startswith("clip-t/laion--CLIP-ViT-B-32/")


def test_local_folder_token_has_no_path_and_follows_content(tiny_dino, tmp_path):
    token = backbone_token(tiny_dino)
    assert token.startswith("tiny-dino-") and "/" not in token
    pid = make(Dino, model=tiny_dino).protocol_id()
    assert str(tmp_path.parent) not in pid and str(Path(tiny_dino).parent) not in pid
    copy = tmp_path / "tiny-dino"
    shutil.copytree(tiny_dino, copy)
    assert backbone_token(str(copy)) == token  # same weights elsewhere: same column
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_act"', '"layer_norm_eps_x": 1, "hidden_act"'))
    assert backbone_token(str(copy)) != token  # changed content: another column


@pytest.mark.parametrize("params, problem", [
    ({"reference_split": "B"}, "reference_split"), ({"max_generated": 0}, "max_generated"),
    ({"model": "no-such-weights"}, "no-such-weights"), ({"model": "{tmp}/no-such-folder"}, "no-such-folder")])
def test_bad_params_are_config_errors(params, problem, tmp_path):
    params = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in params.items()}
    with pytest.raises(ConfigError, match=problem):
        make(Dino, **params)


# ------------------------------------------------------------------ preprocessing

def torchvision_reference(image: np.ndarray, resize: int, crop: int, mean, std) -> np.ndarray:
    """The APDM/DreamBooth evaluation transform, independently: torchvision Resize/CenterCrop/ToTensor/Normalize."""
    T = pytest.importorskip("torchvision.transforms")
    t = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop), T.ToTensor(),
                   T.Normalize(mean, std)])
    return t(PILImage.fromarray(image)).numpy()


def pil_reference(image: np.ndarray, resize: int, crop: int, mean, std) -> np.ndarray:
    """The same transform written by hand with PIL.crop (no torchvision)."""
    h, w = image.shape[:2]
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    im = PILImage.fromarray(image).resize(size, PILImage.Resampling.BICUBIC)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    x = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(300, 200), (200, 333), (256, 256), (97, 511)])
def test_preprocess_matches_independent_transforms(shape):
    image = images(7, 1, shape)[0]
    got = preprocess([image], 256, 224, IMAGENET_MEAN, IMAGENET_STD)[0]
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, pil_reference(image, 256, 224, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    np.testing.assert_allclose(got, torchvision_reference(image, 256, 224, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)


def capture_pixels(module: torch.nn.Module) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        seen.append((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).detach().clone())

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_random_weights_plumbing_dino_model_sees_resize256_crop224_imagenet(tiny_dino):
    image = images(8, 1, (300, 210))[0]
    model = load_dino(str(Path(tiny_dino).resolve()), "cpu")
    seen, handle = capture_pixels(model)
    try:
        dino_embeddings([image], tiny_dino)
    finally:
        handle.remove()
    expected = torchvision_reference(image, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(seen[0][0].numpy(), expected, atol=1e-5)


def test_random_weights_plumbing_clip_model_sees_openai_preprocessing(tiny_clip):
    image = images(9, 1, (120, 90))[0]
    model, _ = load_clip(str(Path(tiny_clip).resolve()), "cpu")
    seen, handle = capture_pixels(model.vision_model)
    try:
        clip_image_embeddings([image], tiny_clip)
    finally:
        handle.remove()
    expected = torchvision_reference(image, CLIP_SIZE, CLIP_SIZE, CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(seen[0][0].numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------ embeddings and scores (random weights)

def test_random_weights_plumbing_dino_is_the_cls_token(tiny_dino):
    imgs = images(11, 2, (260, 300))
    model = load_dino(str(Path(tiny_dino).resolve()), "cpu")
    x = torch.from_numpy(np.stack([torchvision_reference(i, 256, 224, IMAGENET_MEAN, IMAGENET_STD) for i in imgs]))
    with torch.no_grad():
        cls = model(x).last_hidden_state[:, 0].double().numpy()
    expected = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    np.testing.assert_allclose(dino_embeddings(imgs, tiny_dino), expected, atol=1e-5)


def test_random_weights_plumbing_clip_embeddings_match_clipmodel_forward(tiny_clip):
    imgs = images(12, 2)
    texts = ["a photo of sks dog", "a dslr portrait of sks person wearing a red hat"]
    model, tokenizer = load_clip(str(Path(tiny_clip).resolve()), "cpu")
    pixels = torch.from_numpy(np.stack([torchvision_reference(i, CLIP_SIZE, CLIP_SIZE, CLIP_MEAN, CLIP_STD)
                                        for i in imgs]))
    with torch.no_grad():  # CLIPModel.forward normalises image_embeds/text_embeds itself; one prompt at a time, no padding
        image_embeds = model(input_ids=tokenizer(texts[:1], return_tensors="pt")["input_ids"],
                             pixel_values=pixels).image_embeds.double().numpy()
        text_embeds = np.concatenate([model(input_ids=tokenizer([t], return_tensors="pt")["input_ids"],
                                            pixel_values=pixels[:1]).text_embeds.double().numpy() for t in texts])
    np.testing.assert_allclose(clip_image_embeddings(imgs, tiny_clip), image_embeds, atol=1e-5)
    np.testing.assert_allclose(clip_text_embeddings(texts, tiny_clip), text_embeds, atol=1e-5)


def test_random_weights_plumbing_embeddings_are_normalised_and_batch_independent(tiny_dino, tiny_clip):
    imgs = images(10, fidelity.BATCH_SIZE + 3)  # two batches
    for emb in (dino_embeddings(imgs, tiny_dino), clip_image_embeddings(imgs, tiny_clip)):
        assert emb.shape[0] == len(imgs) and emb.dtype == np.float64
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(dino_embeddings(imgs[-2:], tiny_dino), dino_embeddings(imgs, tiny_dino)[-2:],
                               atol=1e-5)
    txt = clip_text_embeddings(["a photo of sks dog", "a red bus"], tiny_clip)
    assert txt.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("cls, family", [(Dino, "dino"), (ClipI, "clip")])
def test_random_weights_plumbing_all_pairs_mean_equals_explicit_loop(cls, family, subject, tiny_dino, tiny_clip):
    model = tiny_dino if family == "dino" else tiny_clip
    embed = dino_embeddings if family == "dino" else clip_image_embeddings
    generated = images(20, 5)
    value = make(cls, model=model).compute(inputs_for(subject, generated))
    ref, gen = embed(subject.splits["A"], model), embed(generated, model)
    loop = [float(np.dot(r, g)) for r in ref for g in gen]
    assert len(loop) == 3 * 5
    assert value == pytest.approx(sum(loop) / len(loop), abs=1e-9)
    assert value == pytest.approx(all_pairs_mean(ref, gen), abs=1e-9)


@pytest.mark.parametrize("cls, family", [(Dino, "dino"), (ClipI, "clip")])
def test_random_weights_plumbing_identical_beats_unrelated(cls, family, tiny_dino, tiny_clip):
    model = tiny_dino if family == "dino" else tiny_clip
    ref = images(30, 1)
    subj = StandInSubject(f"one-{family}", {"A": ref})
    metric = make(cls, model=model)
    same = metric.compute(inputs_for(subj, ref))
    noise = np.random.default_rng(31).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    other = metric.compute(inputs_for(subj, [noise]))
    assert same == pytest.approx(1.0, abs=1e-5)
    assert other < same - 1e-3


def test_random_weights_plumbing_reference_split_ab_uses_a_and_b(subject, tiny_dino):
    generated = images(40, 2)
    value = make(Dino, model=tiny_dino, reference_split="AB").compute(inputs_for(subject, generated))
    assert subject.loads == ["A", "B"]
    ref = dino_embeddings(subject.splits["A"] + subject.splits["B"], tiny_dino)
    assert value == pytest.approx(all_pairs_mean(ref, dino_embeddings(generated, tiny_dino)), abs=1e-9)
    value_c = make(Dino, model=tiny_dino, reference_split="C").compute(inputs_for(subject, generated))
    assert subject.loads[-1] == "C" and value_c != pytest.approx(value, abs=1e-9)


def test_random_weights_plumbing_max_generated_scores_the_first_n(subject, tiny_dino):
    generated = images(50, 4)
    capped = make(Dino, model=tiny_dino, max_generated=2).compute(inputs_for(subject, generated))
    first_two = make(Dino, model=tiny_dino).compute(inputs_for(subject, generated[:2]))
    everything = make(Dino, model=tiny_dino).compute(inputs_for(subject, generated))
    assert capped == pytest.approx(first_two, abs=1e-9) and capped != pytest.approx(everything, abs=1e-9)


def test_random_weights_plumbing_clip_t_pairs_image_i_with_prompt_i(tiny_clip):
    generated = images(60, 3)
    prompts = ["a photo of sks dog on the beach", "a red bus in the city", "an oil painting of a cat"]
    metric = make(ClipT, model=tiny_clip)
    value = metric.compute(inputs_for(None, generated, prompts))
    img, txt = clip_image_embeddings(generated, tiny_clip), clip_text_embeddings(prompts, tiny_clip)
    assert value == pytest.approx(np.mean([np.dot(img[i], txt[i]) for i in range(3)]), abs=1e-9)
    permuted = metric.compute(inputs_for(None, generated, prompts[1:] + prompts[:1]))
    assert abs(permuted - value) > 1e-4
    capped = make(ClipT, model=tiny_clip, max_generated=2).compute(inputs_for(None, generated, prompts))
    assert capped == pytest.approx(np.mean([np.dot(img[i], txt[i]) for i in range(2)]), abs=1e-9)


def test_random_weights_plumbing_prompts_truncated_to_77_tokens(tiny_clip):
    long = " ".join(["photo"] * 100)  # > 77 tokens: must be truncated, not crash on 77 position embeddings
    a, b = clip_text_embeddings([long, long + " of a completely different red bus"], tiny_clip)
    np.testing.assert_allclose(a, b, atol=1e-6)
    short = clip_text_embeddings([" ".join(["photo"] * 10)], tiny_clip)[0]
    assert abs(float(np.dot(a, short)) - 1.0) > 1e-6


# ------------------------------------------------------------------ caching

def test_random_weights_plumbing_models_load_once(tiny_dino, tiny_clip):
    imgs = images(70, 2)
    dino_embeddings(imgs, tiny_dino)
    before = load_dino.cache_info()
    dino_embeddings(imgs, tiny_dino)
    after = load_dino.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert load_dino(str(Path(tiny_dino).resolve()), "cpu") is load_dino(str(Path(tiny_dino).resolve()), "cpu")
    clip_image_embeddings(imgs, tiny_clip)
    misses = load_clip.cache_info().misses
    clip_text_embeddings(["a"], tiny_clip)
    clip_image_embeddings(imgs, tiny_clip)
    assert load_clip.cache_info().misses == misses
    model = load_dino(str(Path(tiny_dino).resolve()), "cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_random_weights_plumbing_reference_embeddings_cached_per_subject(tiny_dino):
    subj = StandInSubject("cache-me", {"A": images(80, 2)})
    metric = make(Dino, model=tiny_dino)
    v1 = metric.compute(inputs_for(subj, images(81, 2)))
    v2 = metric.compute(inputs_for(subj, images(81, 2)))
    assert subj.loads == ["A"] and v1 == v2
    other = StandInSubject("cache-me", {"A": images(82, 2)})  # same name, other images: other fingerprint
    metric.compute(inputs_for(other, images(81, 2)))
    assert other.loads == ["A"]


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("cls", [Dino, ClipI, ClipT])
def test_empty_generated_names_the_metric(cls, subject, tiny_dino, tiny_clip):
    metric = make(cls, model=tiny_dino if cls is Dino else tiny_clip)
    with pytest.raises(ValueError, match=rf"^{cls.name}: no generated images"):
        metric.compute(inputs_for(subject, []))


def test_prompt_count_mismatch(tiny_clip):
    with pytest.raises(ValueError, match=r"^clip-t: 2 generated images but 1 prompts"):
        make(ClipT, model=tiny_clip).compute(inputs_for(None, images(90, 2), ["only one"]))


@pytest.mark.parametrize("cls", [Dino, ClipI])
def test_empty_reference_split(cls, tiny_dino, tiny_clip):
    from bench.datasets import Subject

    metric = make(cls, model=tiny_dino if cls is Dino else tiny_clip, reference_split="C")
    empty = StandInSubject("no-c", {"A": images(91, 1)})
    with pytest.raises(ValueError, match=rf"^{cls.name}: reference split C of subject 'stand-in/no-c' has no images"):
        metric.compute(inputs_for(empty, images(92, 1)))
    real = Subject(dataset="synthetic", id="x", class_noun="dog", splits={"A": (), "B": (), "C": ()})
    with pytest.raises(ValueError, match=rf"^{cls.name}: reference split C of subject 'synthetic/x': .*no images"):
        metric.compute(inputs_for(real, images(92, 1)))


def test_bad_image_and_wrong_model_family(tiny_dino, tiny_clip):
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        dino_embeddings([np.zeros((8, 8), np.uint8)], tiny_dino)
    with pytest.raises(ValueError, match="model_type 'clip', expected 'vit'"):
        dino_embeddings(images(93, 1), tiny_clip)
    with pytest.raises(ValueError, match="nothing to embed"):
        clip_text_embeddings([], tiny_clip)


def test_uncached_hf_model_raises_weights_unavailable_with_fetch_hint(subject):
    ref = "openai/clip-vit-base-patch16"  # not registered, not cached (HF_HUB_OFFLINE=1 in conftest)
    metric = make(ClipI, model=ref)
    reason = metric.missing_weights()
    assert reason and "bench weights fetch" in reason and ref in reason
    with pytest.raises(weights.WeightsUnavailable, match=r"bench weights fetch .*openai/clip-vit-base-patch16"):
        metric.compute(inputs_for(subject, images(94, 1)))
    with pytest.raises(weights.WeightsUnavailable, match="bench weights fetch"):
        clip_text_embeddings(["a"], ref)


@pytest.mark.parametrize("cls, name", [(Dino, "dino-vits16"), (ClipT, "clip-vit-large-patch14")])
def test_unavailable_reason_names_default_weights(cls, name):
    if weights.get(name).missing() is None:
        pytest.skip(f"{name} is cached here: nothing is unavailable")
    reason = cls.unavailable_reason()
    assert reason and f"bench weights fetch {name}" in reason


# ------------------------------------------------------------------ real weights (skipped when not cached)

def real_weights(name: str) -> str:
    reason = weights.get(name).missing()
    if reason:
        pytest.skip(f"real weights {name} not cached: {reason[:160]}")
    return name


def face_subject(identity: str) -> StandInSubject:
    if not (FACES / identity).is_dir():
        pytest.skip(f"real face data not found at {FACES}")
    splits = {}
    for s in ("A", "B"):
        files = sorted((FACES / identity / f"set_{s}").iterdir())
        splits[s] = [np.asarray(PILImage.open(p).convert("RGB")) for p in files]
    return StandInSubject(identity, splits)


@pytest.mark.parametrize("cls, name", [(Dino, "dino-vits16"), (ClipI, "clip-vit-large-patch14")])
def test_real_weights_same_identity_scores_higher(cls, name):
    real_weights(name)
    a, b = face_subject("n000050"), face_subject("n000033")
    metric = make(cls)
    same = metric.compute(inputs_for(a, a.splits["B"]))
    other = metric.compute(inputs_for(a, b.splits["B"]))
    assert 0.0 < other < same < 1.0


def test_real_weights_clip_t_prefers_the_right_prompt():
    real_weights("clip-vit-large-patch14")
    faces = face_subject("n000050").splits["B"]
    metric = make(ClipT)
    right = metric.compute(inputs_for(None, faces, ["a photo of a person's face"] * len(faces)))
    wrong = metric.compute(inputs_for(None, faces, ["a photo of a red double-decker bus"] * len(faces)))
    assert right > wrong + 0.05
