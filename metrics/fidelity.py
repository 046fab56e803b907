"""Subject and prompt fidelity of the attacker's generated images: DINO, CLIP-I and CLIP-T.

- DINO (DreamBooth, Ruiz et al., CVPR'23; APDM, Lee et al., NeurIPS'25 ``evaluate_db.py``): CLS token of the last
  hidden state of ``facebook/dino-vits16`` (transformers ``ViTModel``) after Resize(256, bicubic, shorter side) ->
  CenterCrop(224) -> ImageNet mean/std; mean cosine similarity over all (clean reference, generated) pairs.
- CLIP-I (DreamBooth): the same all-pairs mean with CLIP image embeddings.
- CLIP-T (DreamBooth; APDM with OpenAI ViT-L/14): mean cosine of each generated image's CLIP embedding with the CLIP
  text embedding of its own prompt (truncated to CLIP's 77 tokens).

CLIP images are preprocessed as OpenAI's ``clip.load`` does (Resize(n, bicubic, shorter side) -> CenterCrop(n) ->
CLIP mean/std, n = the model's input size), with PIL here; a folder's ``preprocessor_config.json`` is not used, so
the value does not depend on the transformers image-processor backend.

``higher_is_better`` is from the defender's point of view (see metrics/faces.py). All three measure how well the
attack worked on the personalised model's images, so lower is better for the defender: DINO and CLIP-I are subject
fidelity; CLIP-T is prompt fidelity, which DreamBooth reports as the second half of personalisation success, and a
defense that wrecks the personalised model's outputs (Anti-DreamBooth-style artefacts) lowers it. CLIP-T alone does
not show protection (a model that drops the identity but draws the scene keeps it high): read it with DINO/ISM.
The provider's view of prompt following (the base model must stay useful) is ``clip-score`` (metrics/utility.py),
where higher is better.

Models load once per process (float32, eval mode, inference mode, batches of ``BATCH_SIZE``); reference embeddings
are cached per subject fingerprint, split and model. Weights come only from the local cache (``bench.weights``).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image as PILImage

from bench import weights
from bench.images import checked_rgb
from bench.plugins import METRICS, Image, Metric, MetricInputs, subject_name
from bench.registry import Requirements

BATCH_SIZE = 16
CLIP_MAX_TOKENS = 77
DINO_RESIZE, DINO_CROP = 256, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
REFERENCE_SPLITS: dict[str, tuple[str, ...]] = {"A": ("A",), "AB": ("A", "B"), "C": ("C",)}

DINO_VITS16 = weights.register(weights.Weights(
    name="dino-vits16", hf_repo="facebook/dino-vits16",
    what="DINO ViT-S/16 (self-supervised on ImageNet-1k, Caron et al. 2021), transformers ViTModel",
    used_by="dino", license="Apache-2.0"))
CLIP_VIT_L14 = weights.register(weights.Weights(
    name="clip-vit-large-patch14", hf_repo="openai/clip-vit-large-patch14",
    what="OpenAI CLIP ViT-L/14, 224 px (Radford et al. 2021), transformers CLIPModel + tokenizer",
    used_by="clip-i, clip-t, clip-score", license="MIT (OpenAI CLIP)"))
CLIP_VIT_B32 = weights.register(weights.Weights(
    name="clip-vit-base-patch32", hf_repo="openai/clip-vit-base-patch32",
    what="OpenAI CLIP ViT-B/32, 224 px (Radford et al. 2021), transformers CLIPModel + tokenizer",
    used_by="clip-i, clip-t, clip-score with model=clip-vit-base-patch32 (MetaCloak's IMS_CLIP)",
    license="MIT (OpenAI CLIP)"))

# Hugging Face repository -> protocol-id token (a registered name and its repository give the same token)
_BACKBONE_TOKENS = {
    "facebook/dino-vits16": "vits16",
    "openai/clip-vit-large-patch14": "vit-l14-openai",
    "openai/clip-vit-base-patch32": "vit-b32-openai",
}


# ---------------------------------------------------------------------------------------------- model references

def _entry(model_ref: str) -> weights.Weights:
    try:
        return weights.get(model_ref)
    except KeyError as e:
        raise ValueError(f"model {model_ref!r}: not a registered weights name, a Hugging Face id (owner/name) or "
                         f"an existing folder ({e.args[0]})") from None


def _folder_digest(folder: Path) -> str:
    """Short sha256 over the config and safetensors files of a local model folder (content, not path)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix == ".safetensors" or f.name == "config.json"):
            stat = f.stat()
            h.update(f"{f.relative_to(folder).as_posix()} {_file_digest(str(f), stat.st_size, stat.st_mtime_ns)}\n"
                     .encode())
    return h.hexdigest()[:8]


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def backbone_token(model_ref: str) -> str:
    """The protocol-id token of a model reference: a short name for the known backbones, ``owner--name`` for other
    Hugging Face ids, ``<folder name>-<content hash>`` for a local folder (no absolute path in an id)."""
    entry = _entry(model_ref)
    repo = entry.hf_repo or entry.name
    if repo in _BACKBONE_TOKENS:
        return _BACKBONE_TOKENS[repo]
    local = Path(repo).expanduser()
    if local.is_dir():
        return f"{local.resolve().name}-{_folder_digest(local.resolve())}"
    return repo.replace("/", "--")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolved(model_ref: str) -> str:
    """The local folder holding ``model_ref``'s weights (raises WeightsUnavailable; never downloads)."""
    return str(_entry(model_ref).path())


def _check_model_type(path: str, expected: str) -> None:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model folder {path}: no config.json")
    found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if found != expected:
        raise ValueError(f"model folder {path}: model_type {found!r}, expected {expected!r}")


@functools.lru_cache(maxsize=4)
def load_dino(path: str, device: str) -> Any:
    """A transformers ``ViTModel`` (no pooler) from a local folder, float32, eval mode; once per path and device."""
    from transformers import ViTModel

    _check_model_type(path, "vit")
    model = ViTModel.from_pretrained(path, local_files_only=True, use_safetensors=True, add_pooling_layer=False)
    return model.float().eval().to(device)


@functools.lru_cache(maxsize=4)
def load_clip(path: str, device: str) -> tuple[Any, Any]:
    """A transformers ``CLIPModel`` (float32, eval mode) and its ``CLIPTokenizer``; once per path and device."""
    from transformers import CLIPModel, CLIPTokenizer

    _check_model_type(path, "clip")
    model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return model.float().eval().to(device), tokenizer


# ---------------------------------------------------------------------------------------------- embeddings

def preprocess(images: Sequence[Image], resize: int, crop: int, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """(n, 3, crop, crop) float32: PIL bicubic resize of the shorter side to ``resize`` (longer side truncated, as
    torchvision's ``Resize(int)``), centre crop (torchvision's rounding), /255, per-channel mean/std."""
    out = np.empty((len(images), 3, crop, crop), dtype=np.float32)
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for i, image in enumerate(images):
        pil = PILImage.fromarray(checked_rgb(image, "preprocess"))
        w, h = pil.size
        nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        pil = pil.resize((nw, nh), PILImage.Resampling.BICUBIC)
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
        x = np.asarray(pil, dtype=np.float32)[top:top + crop, left:left + crop] / 255.0
        out[i] = ((x - m) / s).transpose(2, 0, 1)
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _features(out: Any) -> Any:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return out if hasattr(out, "ndim") else out.pooler_output


def _batched(items: Sequence[Any], fn: Callable[[Sequence[Any]], Any], where: str) -> np.ndarray:
    import torch

    if not items:
        raise ValueError(f"{where}: nothing to embed (empty list)")
    with torch.inference_mode():
        parts = [fn(items[i:i + BATCH_SIZE]).double().cpu().numpy() for i in range(0, len(items), BATCH_SIZE)]
    return _l2(np.concatenate(parts))


def dino_embeddings(images: Sequence[Image], model_ref: str = DINO_VITS16.name) -> np.ndarray:
    """(n, d) float64 L2-normalised DINO CLS embeddings (``last_hidden_state[:, 0]``), resize 256 / crop 224."""
    import torch

    device = _device()
    model = load_dino(_resolved(model_ref), device)

    def run(batch: Sequence[Image]) -> Any:
        x = torch.from_numpy(preprocess(batch, DINO_RESIZE, DINO_CROP, IMAGENET_MEAN, IMAGENET_STD)).to(device)
        return model(pixel_values=x).last_hidden_state[:, 0]

    return _batched(list(images), run, "dino_embeddings")


def clip_image_embeddings(images: Sequence[Image], model_ref: str = CLIP_VIT_L14.name) -> np.ndarray:
    """(n, d) float64 L2-normalised CLIP image embeddings (projected), OpenAI ``clip.load`` preprocessing."""
    import torch

    device = _device()
    model, _ = load_clip(_resolved(model_ref), device)
    n = int(model.config.vision_config.image_size)

    def run(batch: Sequence[Image]) -> Any:
        x = torch.from_numpy(preprocess(batch, n, n, CLIP_MEAN, CLIP_STD)).to(device)
        return _features(model.get_image_features(pixel_values=x))

    return _batched(list(images), run, "clip_image_embeddings")


def clip_text_embeddings(texts: Sequence[str], model_ref: str = CLIP_VIT_L14.name) -> np.ndarray:
    """(n, d) float64 L2-normalised CLIP text embeddings (projected); texts padded/truncated to 77 tokens."""
    device = _device()
    model, tokenizer = load_clip(_resolved(model_ref), device)

    def run(batch: Sequence[str]) -> Any:
        tok = tokenizer(list(batch), padding="max_length", truncation=True, max_length=CLIP_MAX_TOKENS,
                        return_tensors="pt")
        return _features(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                 attention_mask=tok["attention_mask"].to(device)))

    return _batched([str(t) for t in texts], run, "clip_text_embeddings")


# ---------------------------------------------------------------------------------------------- references

_REFERENCES: dict[tuple[str, str, str, str, str], np.ndarray] = {}


def reference_images(subject: Any, split: str, metric: str) -> list[Image]:
    """The subject's clean images of ``split`` ("A", "AB" = A + B, "C") at native resolution."""
    try:
        images = [img for s in REFERENCE_SPLITS[split] for img in subject.load(s, None)]
    except ValueError as e:  # DataError (empty/unknown split), ImageError (bad file)
        raise ValueError(f"{metric}: reference split {split} of subject {subject_name(subject)!r}: {e}") from e
    if not images:
        raise ValueError(f"{metric}: reference split {split} of subject {subject_name(subject)!r} has no images")
    return images


def reference_embeddings(subject: Any, split: str, model_ref: str, family: Literal["dino", "clip"],
                         metric: str) -> np.ndarray:
    """Embeddings of the reference split, cached per subject fingerprint, split, model folder and device."""
    key = (str(subject.fingerprint()), split, family, _resolved(model_ref), _device())
    if key not in _REFERENCES:
        embed = dino_embeddings if family == "dino" else clip_image_embeddings
        _REFERENCES[key] = embed(reference_images(subject, split, metric), model_ref)
    return _REFERENCES[key]


def image_text_cosine(images: Sequence[Image], texts: Sequence[str], model_ref: str) -> float:
    """Mean cosine of each image's CLIP embedding with its own text's (CLIP-T; APDM's CLIP score)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts: one prompt per image is needed")
    img, txt = clip_image_embeddings(images, model_ref), clip_text_embeddings(texts, model_ref)
    return float(np.mean(np.sum(img * txt, axis=1)))


def all_pairs_mean(reference: np.ndarray, generated: np.ndarray) -> float:
    """Mean cosine over every (reference, generated) pair of L2-normalised embeddings."""
    return float(np.mean(reference @ generated.T))


# ---------------------------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class _FidelityParams:
    model: str = CLIP_VIT_L14.name  # registered weights name, Hugging Face id or local folder (CLIPModel)
    max_generated: int = 100  # the first N generated images are scored (APDM/DreamBooth evaluations: 100)

    def validate(self) -> None:
        if self.max_generated < 1:
            raise ValueError(f"max_generated must be >= 1, got {self.max_generated}")
        _entry(self.model)


@dataclass(frozen=True)
class _ReferenceParams(_FidelityParams):
    reference_split: Literal["A", "AB", "C"] = "A"  # clean references: set_A (APDM), set_A + set_B, or set_C

    def validate(self) -> None:
        super().validate()
        if self.reference_split not in REFERENCE_SPLITS:
            raise ValueError(f"reference_split must be one of {list(REFERENCE_SPLITS)}, got {self.reference_split!r}")


@dataclass(frozen=True)
class DinoParams(_ReferenceParams):
    model: str = DINO_VITS16.name  # registered weights name, Hugging Face id or local folder (ViTModel)


@dataclass(frozen=True)
class ClipImageParams(_ReferenceParams):
    pass


@dataclass(frozen=True)
class ClipTextParams(_FidelityParams):
    pass


class _FidelityMetric(Metric):
    target = "generated"
    higher_is_better = False
    requires = Requirements(modules=("transformers",), weights=(CLIP_VIT_L14.name,))

    def weight_names(self) -> tuple[str, ...]:
        return (self.params.model,)

    def _generated(self, inputs: MetricInputs) -> list[Image]:
        if not inputs.generated:
            raise ValueError(f"{self.name}: no generated images given (MetricInputs.generated is empty)")
        return list(inputs.generated[: self.params.max_generated])

    def _gen_id(self) -> str:
        return f"gen=first{self.params.max_generated}"


@METRICS.register("dino", version=1)
class Dino(_FidelityMetric):
    """DINO subject fidelity: mean cosine of DINO ViT-S/16 CLS embeddings over all (clean reference, generated)
    pairs, in [-1, 1]; lower = less like the subject, better for the defender."""

    Params = DinoParams
    description = ("DINO ViT-S/16 CLS cosine, mean over all (clean set_A, generated) pairs (DreamBooth, APDM); "
                   "subject fidelity, lower is better for the defender")
    requires = Requirements(modules=("transformers",), weights=(DINO_VITS16.name,))
    paper = "DreamBooth (Ruiz et al., CVPR'23); APDM (Lee et al., NeurIPS'25) evaluate_db.py"

    def protocol_id(self) -> str:
        p = self.params
        return (f"dino/{backbone_token(p.model)}-cls/resize{DINO_RESIZE}-crop{DINO_CROP}/ref={p.reference_split}/"
                f"all-pairs/{self._gen_id()}")

    def compute(self, inputs: MetricInputs) -> float:
        generated = self._generated(inputs)
        ref = reference_embeddings(inputs.subject, self.params.reference_split, self.params.model, "dino", self.name)
        return all_pairs_mean(ref, dino_embeddings(generated, self.params.model))


@METRICS.register("clip-i", version=1)
class ClipI(_FidelityMetric):
    """CLIP-I subject fidelity: mean cosine of CLIP image embeddings over all (clean reference, generated) pairs,
    in [-1, 1]; lower = less like the subject, better for the defender."""

    Params = ClipImageParams
    description = ("CLIP image-embedding cosine, mean over all (clean set_A, generated) pairs (DreamBooth); "
                   "subject fidelity, lower is better for the defender")
    paper = "DreamBooth (Ruiz et al., CVPR'23)"

    def protocol_id(self) -> str:
        p = self.params
        return f"clip-i/{backbone_token(p.model)}/openai-preproc/ref={p.reference_split}/all-pairs/{self._gen_id()}"

    def compute(self, inputs: MetricInputs) -> float:
        generated = self._generated(inputs)
        ref = reference_embeddings(inputs.subject, self.params.reference_split, self.params.model, "clip", self.name)
        return all_pairs_mean(ref, clip_image_embeddings(generated, self.params.model))


@METRICS.register("clip-t", version=1)
class ClipT(_FidelityMetric):
    """CLIP-T prompt fidelity: mean cosine of each generated image's CLIP embedding with its own prompt's
    (77 tokens), in [-1, 1]; lower = the personalised model follows prompts less, better for the defender (see the
    module docstring)."""

    Params = ClipTextParams
    description = ("CLIP cosine of each generated image with its own prompt, mean (DreamBooth, APDM: ViT-L/14); "
                   "prompt fidelity of the personalised model, lower is better for the defender")
    paper = "DreamBooth (Ruiz et al., CVPR'23); APDM (Lee et al., NeurIPS'25)"

    def protocol_id(self) -> str:
        return f"clip-t/{backbone_token(self.params.model)}/openai-preproc/trunc{CLIP_MAX_TOKENS}/{self._gen_id()}"

    def compute(self, inputs: MetricInputs) -> float:
        generated = self._generated(inputs)
        if len(inputs.prompts) != len(inputs.generated):
            raise ValueError(f"{self.name}: {len(inputs.generated)} generated images but {len(inputs.prompts)} "
                             f"prompts (MetricInputs.prompts needs one prompt per generated image)")
        return image_text_cosine(generated, list(inputs.prompts[: len(generated)]), self.params.model)
