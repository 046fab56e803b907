"""Utility of the attacker's base model itself (``target = "model"``): does a model-level defense (APDM, a
``harden`` defense) keep the model useful for everything else? APDM (Lee et al., NeurIPS'25) ``evaluate.py``: FID on
MS-COCO val2014 5k captions/images with pytorch-fid's InceptionV3 pool3 (2048-d), and CLIP score (OpenAI ViT-L/14,
mean cosine of image and caption) on the same generations, PNDM 20 steps, CFG 7.5, seed 0 (METHODS.md 2.4).

The harness samples one image per prompt from the model the attacker would fine-tune (the hardened model in a
harden defense's rows, the undefended base model elsewhere) in a ``sample`` stage shared by every metric that asks
for the same prompts and sampler. ``higher_is_better`` is from the defender's point of view, and for utility the
defender is the model provider who wants the model to stay good: lower FID and higher CLIP score are better.

Prompts: ``prompts_file`` (a .txt with one prompt per line, or a .csv with a ``caption``, ``text`` or ``prompt``
column, such as APDM's ``coco_list/coco_val2014_5k.csv``), or the built-in ``generic-10`` list below when empty.
FID reference: ``reference`` = a folder of images (e.g. the COCO val2014 5k images) or a pytorch-fid ``.npz`` with
``mu`` and ``sigma``. COCO is not shipped: fetch it yourself (its own terms apply).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from bench import weights
from bench.plugins import METRICS, Image, Metric, MetricInputs
from bench.registry import Requirements

GENERIC_PROMPTS = (  # varied everyday scenes, no subject identifier: what the base model must still draw well
    "a photo of a red bus driving down a city street",
    "a bowl of fruit on a wooden kitchen table",
    "a cat sleeping on a sofa next to a window",
    "a mountain lake at sunrise with pine trees",
    "a person riding a bicycle on a country road",
    "a plate of pasta with tomato sauce and basil",
    "two dogs playing with a ball on the grass",
    "a lighthouse on a rocky coast under a cloudy sky",
    "a living room with a fireplace and bookshelves",
    "a train crossing a bridge over a river",
)

FID_INCEPTION = weights.register(weights.Weights(
    name="fid-inception",
    what="pytorch-fid's FID InceptionV3 (TF 2015-12-05 weights ported by pytorch-fid), pool3 2048-d features",
    used_by="fid",
    files=("pt_inception-2015-12-05.safetensors",),
    source="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    fetcher=lambda folder: weights.pickle_to_safetensors(
        weights.download(FID_INCEPTION.source, folder / "pt_inception.pth"),
        folder / "pt_inception-2015-12-05.safetensors"),
    license="Apache-2.0 (pytorch-fid), weights from TensorFlow's Inception",
))


def load_prompts(prompts_file: str, num_prompts: int) -> list[str]:
    """The prompt list: the file's prompts (first ``num_prompts``; 0 = all) or the built-in generic list."""
    if not prompts_file:
        prompts = list(GENERIC_PROMPTS)
    else:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise ValueError(f"prompts_file {path}: no such file")
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                column = next((c for c in ("caption", "text", "prompt") if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise ValueError(f"prompts_file {path}: no 'caption', 'text' or 'prompt' column "
                                     f"(columns: {reader.fieldnames})")
                prompts = [row[column].strip() for row in reader if row[column].strip()]
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file {path}: no prompts in it")
    return prompts[:num_prompts] if num_prompts else prompts


def _short_name(ref: str, label: str = "", empty: str = "generic-10") -> str:
    """A protocol-id token for a prompt file or reference set: ``label`` when given (e.g. "coco-val2014-5k", so that
    a paper's reference table can name the column), else the name plus a short hash of the content (a file's bytes;
    a folder's file names and sizes), never an absolute path."""
    if label:
        return label
    if not ref:
        return empty
    path = Path(ref).expanduser()
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.iterdir()):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    elif path.is_file():
        h.update(path.read_bytes())
    return f"{path.stem}-{h.hexdigest()[:8]}"


@dataclass(frozen=True)
class SamplingParams:
    prompts_file: str = ""
    prompts_label: str = ""  # protocol-id name of the prompt list (default: file name + content hash)
    num_prompts: int = 0  # 0 = every prompt of the file (APDM: 5000 COCO captions)
    sampler: str = "pndm"  # APDM evaluate.py: PNDM, 20 steps, CFG 7.5
    steps: int = 20
    guidance: float = 7.5

    def validate(self) -> None:
        if self.num_prompts < 0 or self.steps < 1:
            raise ValueError("num_prompts must be >= 0 and steps >= 1")


class _UtilityMetric(Metric):
    target = "model"
    profiles = {"tiny": {"sampler": "ddim", "steps": 10, "guidance": 3.0},
                "proxy": {"sampler": "ddim", "steps": 20, "guidance": 5.0}}

    def sampling(self) -> dict:
        p = self.params
        return {"prompts": load_prompts(p.prompts_file, p.num_prompts), "sampler": p.sampler, "steps": p.steps,
                "guidance": p.guidance, "n_per_prompt": 1}

    def _sampling_id(self) -> str:
        p = self.params
        n = len(load_prompts(p.prompts_file, p.num_prompts))
        return f"prompts={_short_name(p.prompts_file, p.prompts_label)}:{n}/{p.sampler}{p.steps}-cfg{p.guidance:g}"


# ---------------------------------------------------------------- FID (pytorch-fid)

@contextlib.contextmanager
def _weights_from(state: dict) -> Iterator[None]:
    """pytorch-fid builds its Inception and then fetches the weights from a URL; hand it ours instead."""
    import pytorch_fid.inception as inception

    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *a, **k: state
    try:
        yield
    finally:
        inception.load_state_dict_from_url = original


@functools.lru_cache(maxsize=4)
def inception_model(weights_file: str, dims: int = 2048, device: str = "cpu"):
    """pytorch-fid's ``InceptionV3`` up to the block giving ``dims`` features (2048 = pool3; resize to 299 bilinear,
    inputs in [0, 1]) with weights from our safetensors file; built once per process."""
    from pytorch_fid.inception import InceptionV3

    with _weights_from(weights.load_safetensors(Path(weights_file))):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=True, normalize_input=True,
                            use_fid_inception=True)
    return model.eval().to(device)


def inception_features(images: list[Image], weights_file: Path, dims: int = 2048, batch_size: int = 16) -> np.ndarray:
    """(n, dims) float64 features of uint8 HxWx3 images (pytorch-fid's own preprocessing and global pooling)."""
    import torch

    model = inception_model(str(weights_file), dims)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images[i:i + batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)
            out = model(x)[0]
            if out.shape[2:] != (1, 1):  # earlier blocks: global average pooling, as pytorch-fid's get_activations
                out = torch.nn.functional.adaptive_avg_pool2d(out, (1, 1))
            feats.append(out.squeeze(-1).squeeze(-1).double().numpy())
    return np.concatenate(feats)


def _load_folder(folder: Path) -> list[Image]:
    from bench.images import load_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"fid reference {folder}: no .png/.jpg/.jpeg/.webp images in it")
    return [load_image(p) for p in files]


_REFERENCE_STATS: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}


def reference_statistics(reference: str, weights_file: Path, dims: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference set: a pytorch-fid ``.npz`` or a folder of images (cached per process)."""
    key = (reference, str(weights_file), dims)
    if key not in _REFERENCE_STATS:
        path = Path(reference).expanduser()
        if path.is_file() and path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if "mu" not in f or "sigma" not in f:
                    raise ValueError(f"fid reference {path}: an .npz needs arrays 'mu' and 'sigma'")
                if f["mu"].shape != (dims,):
                    raise ValueError(f"fid reference {path}: mu has shape {f['mu'].shape}, expected ({dims},)")
                _REFERENCE_STATS[key] = (f["mu"], f["sigma"])
        elif path.is_dir():
            feats = inception_features(_load_folder(path), weights_file, dims)
            _REFERENCE_STATS[key] = (feats.mean(axis=0), np.cov(feats, rowvar=False))
        else:
            raise ValueError(f"fid reference {path}: neither a folder of images nor an .npz with mu/sigma")
    return _REFERENCE_STATS[key]


def frechet_distance(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    if len(feats) < 2:
        raise ValueError(f"fid: needs at least 2 generated images, got {len(feats)}")
    return float(calculate_frechet_distance(feats.mean(axis=0), np.cov(feats, rowvar=False), mu_ref, sigma_ref))


@dataclass(frozen=True)
class FidParams(SamplingParams):
    reference: str = ""  # folder of reference images or pytorch-fid .npz (mu, sigma); required
    reference_label: str = ""  # protocol-id name of the reference set (default: name + content hash)
    dims: Literal[64, 192, 768, 2048] = 2048  # pytorch-fid --dims; 2048 = pool3 (APDM and every paper)

    def validate(self) -> None:
        super().validate()
        if not self.reference:
            raise ValueError("fid needs `reference`: a folder of real images (APDM: MS-COCO val2014 5k) or a "
                             "pytorch-fid .npz with mu and sigma")
        if not Path(self.reference).expanduser().exists():
            raise ValueError(f"fid reference {self.reference}: no such file or folder")


@METRICS.register("fid", version=1)
class Fid(_UtilityMetric):
    """FID (pytorch-fid InceptionV3 pool3) of the base model's images on a prompt list against a reference image
    set (APDM evaluate.py: COCO val2014 5k). Unitless, >= 0; lower = closer to real images = the model kept its
    utility, better for the provider. With fewer images than 2048 the covariance is singular and pytorch-fid adds
    its epsilon offset: small-sample FID is biased upwards, compare only equal sample sizes. ``dims`` < 2048 (an
earlier Inception block, pytorch-fid's --dims) is for quick checks; scipy's sqrtm of a 2048x2048 matrix takes
~20-50 s on one CPU core per FID."""

    Params = FidParams
    higher_is_better = False
    description = ("FID (pytorch-fid Inception pool3) of the attacker's base model's samples on a prompt list vs a "
                   "reference image set; model utility, lower is better")
    requires = Requirements(modules=("pytorch_fid", "torchvision", "scipy"), extra="metrics",
                            weights=("fid-inception",))
    paper = "APDM (Lee et al., NeurIPS'25) evaluate.py, pytorch-fid"

    def protocol_id(self) -> str:
        feats = "pool3" if self.params.dims == 2048 else f"dims{self.params.dims}"
        ref = _short_name(self.params.reference, self.params.reference_label, "unset")
        return f"fid/pytorch-fid-{feats}/ref={ref}/{self._sampling_id()}"

    def compute(self, inputs: MetricInputs) -> float:
        if not inputs.generated:
            raise ValueError("fid: no sampled images given")
        wfile = FID_INCEPTION.path() / FID_INCEPTION.files[0]
        mu, sigma = reference_statistics(self.params.reference, wfile, self.params.dims)
        return frechet_distance(inception_features(inputs.generated, wfile, self.params.dims), mu, sigma)


# ---------------------------------------------------------------- CLIP score

@dataclass(frozen=True)
class ClipScoreParams(SamplingParams):
    model: str = "clip-vit-large-patch14"  # APDM: OpenAI CLIP ViT-L/14


@METRICS.register("clip-score", version=1)
class ClipScore(_UtilityMetric):
    """CLIP score as APDM reports it: mean cosine similarity of CLIP image and text embeddings of the base model's
    samples and their prompts (no x100, no clipping at 0), in [-1, 1]; higher = the model still follows prompts,
    better for the provider."""

    Params = ClipScoreParams
    higher_is_better = True
    description = ("mean CLIP image-text cosine of the attacker's base model's samples on a prompt list; model "
                   "utility, higher is better")
    requires = Requirements(modules=("transformers",))
    paper = "APDM (Lee et al., NeurIPS'25) evaluate.py"

    def weight_names(self) -> tuple[str, ...]:
        return (self.params.model,)

    def protocol_id(self) -> str:
        from metrics.fidelity import backbone_token

        return f"clip-score/{backbone_token(self.params.model)}/{self._sampling_id()}"

    def compute(self, inputs: MetricInputs) -> float:
        from metrics.fidelity import image_text_cosine

        if not inputs.generated:
            raise ValueError("clip-score: no sampled images given")
        return image_text_cosine(inputs.generated, inputs.prompts, self.params.model)
