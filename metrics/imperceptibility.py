"""Imperceptibility of a perturbation: protected set_B images against their clean originals.

``target = "protected"``: these metrics read ``MetricInputs.protected`` and ``MetricInputs.clean`` (equal-length
lists of equal-shape uint8 HxWx3 arrays). ``higher_is_better`` is from the defender's point of view: a less
visible perturbation is better, so L-inf and LPIPS are lower-is-better and PSNR/SSIM are higher-is-better.

LPIPS (Zhang et al., CVPR'18) is the ``lpips`` package's v0.1 model at native resolution, inputs scaled to [-1, 1].
Its linear layers ship inside the package (``lpips/weights/v0.1/<net>.pth``, read with ``weights_only=True``); its
backbone is torchvision's ImageNet AlexNet/VGG16, which lpips would download: here it comes from the
``torchvision-alexnet`` / ``torchvision-vgg16`` entries of ``bench.weights`` (the ``features`` trunk as safetensors).
"""
from __future__ import annotations

import math

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from bench import weights
from bench.images import checked_rgb
from bench.plugins import METRICS, Image, Metric, MetricInputs, explained
from bench.registry import Requirements


def image_pairs(inputs: MetricInputs, metric: str) -> list[tuple[Image, Image]]:
    """(protected, clean) pairs, checked: same count, same shape, uint8, at least one pair."""
    prot, clean = inputs.protected, inputs.clean
    if not prot:
        raise ValueError(f"{metric}: no protected images given (MetricInputs.protected is empty)")
    if len(prot) != len(clean):
        raise ValueError(f"{metric}: {len(prot)} protected images but {len(clean)} clean ones")
    for i, (p, c) in enumerate(zip(prot, clean)):
        for what, a in (("protected", p), ("clean", c)):
            checked_rgb(a, f"{metric}: {what}[{i}]")
        if p.shape != c.shape:
            raise ValueError(f"{metric}: protected[{i}] has shape {p.shape} but clean[{i}] has {c.shape}")
    return list(zip(prot, clean))


def mean_over_pairs(inputs: MetricInputs, metric: str, fn: Callable[[Image, Image], float]) -> float:
    values = [float(fn(p, c)) for p, c in image_pairs(inputs, metric)]
    return float(np.mean(values))


@METRICS.register("linf", version=1)
class Linf(Metric):
    """Realised L-inf distance: max |protected - clean| over all pixels and channels of all images, in /255
    pixel units (6.0 means 6/255). Defender's view: lower (less visible) is better."""

    target = "protected"
    higher_is_better = False
    description = "max |protected - clean| over all images, /255 units; lower = less visible (better for the defender)"

    def protocol_id(self) -> str:
        return "linf/255/protected-vs-clean"

    def compute(self, inputs: MetricInputs) -> float:
        pairs = image_pairs(inputs, "linf")
        return float(max(int(np.abs(p.astype(np.int16) - c.astype(np.int16)).max()) for p, c in pairs))


def _psnr(p: Image, c: Image) -> float:
    with np.errstate(divide="ignore"):  # identical images: MSE 0 -> inf, reported as inf
        from skimage.metrics import peak_signal_noise_ratio  # scipy (~1 s): only when measured

        return peak_signal_noise_ratio(c, p, data_range=255)


@METRICS.register("psnr", version=1)
class Psnr(Metric):
    """PSNR in dB, ``skimage.metrics.peak_signal_noise_ratio(data_range=255)``, mean over images. An identical
    pair gives inf, and the mean is then inf. Defender's view: higher (less visible) is better."""

    target = "protected"
    higher_is_better = True
    description = "PSNR (dB, skimage, data_range=255) protected vs clean, mean over images; higher = less visible"

    def protocol_id(self) -> str:
        return "psnr/skimage/protected-vs-clean"

    def compute(self, inputs: MetricInputs) -> float:
        value = mean_over_pairs(inputs, "psnr", _psnr)
        if math.isinf(value):
            return explained(value, "inf: a protected image is identical to its clean original (MSE 0), "
                                    "as for the undefended `none` row")
        return value


def _ssim(p: Image, c: Image) -> float:
    from skimage.metrics import structural_similarity

    return structural_similarity(c, p, channel_axis=-1, data_range=255)


@METRICS.register("ssim", version=1)
class Ssim(Metric):
    """SSIM, ``skimage.metrics.structural_similarity(channel_axis=-1, data_range=255)`` with skimage's defaults
    (7x7 uniform window), mean over images; unitless, 1 = identical. Defender's view: higher is better."""

    target = "protected"
    higher_is_better = True
    description = "SSIM (skimage, 7x7 uniform window, data_range=255) protected vs clean, mean; higher = less visible"

    def protocol_id(self) -> str:
        return "ssim/skimage-win7/protected-vs-clean"

    def compute(self, inputs: MetricInputs) -> float:
        return mean_over_pairs(inputs, "ssim", _ssim)


# ---------------------------------------------------------------- LPIPS

LPIPS_VERSION = "0.1"
LPIPS_CHUNK = 8  # pairs per forward pass
TORCHVISION_BACKBONES = {  # lpips net -> (torchvision's IMAGENET1K_V1 checkpoint, the features trunk we keep)
    "alex": ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
             "alexnet-owt-7be5be79-features.safetensors"),
    "vgg": ("https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16-397923af-features.safetensors"),
}


def fetch_torchvision_trunk(net: str, folder: Path) -> None:
    """torchvision's pickled checkpoint -> safetensors (``pickle_to_safetensors``), keeping only ``features.*``."""
    url, name = TORCHVISION_BACKBONES[net]
    full = weights.pickle_to_safetensors(weights.download(url, folder / "full.pth"), folder / "full.safetensors")
    trunk = {k: v for k, v in weights.load_safetensors(full).items() if k.startswith("features.")}
    from safetensors.torch import save_file

    save_file(trunk, str(folder / name))
    for f in (folder / "full.pth", full):
        f.unlink()


LPIPS_BACKBONES = {
    "alex": weights.register(weights.Weights(
        name="torchvision-alexnet", what="torchvision AlexNet IMAGENET1K_V1, convolutional trunk (features.*)",
        used_by="lpips (net=alex)", files=(TORCHVISION_BACKBONES["alex"][1],), source=TORCHVISION_BACKBONES["alex"][0],
        fetcher=lambda folder: fetch_torchvision_trunk("alex", folder), license="BSD-3-Clause (torchvision)")),
    "vgg": weights.register(weights.Weights(
        name="torchvision-vgg16", what="torchvision VGG16 IMAGENET1K_V1, convolutional trunk (features.*)",
        used_by="lpips (net=vgg)", files=(TORCHVISION_BACKBONES["vgg"][1],), source=TORCHVISION_BACKBONES["vgg"][0],
        fetcher=lambda folder: fetch_torchvision_trunk("vgg", folder), license="BSD-3-Clause (torchvision)")),
}


def lpips_linear_file(net: str) -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"


@functools.lru_cache(maxsize=4)
def lpips_model(net: str, trunk_file: str) -> Any:
    """``lpips.LPIPS(net, version="0.1")`` in eval mode, float32, CPU: built with a random trunk (``pnet_rand``: no
    download) and no linear weights, then given the package's linear layers and our trunk, both strictly checked."""
    import lpips
    import torch

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, version=LPIPS_VERSION, pretrained=False, pnet_rand=True, verbose=False)
    lins = torch.load(lpips_linear_file(net), map_location="cpu", weights_only=True)
    result = model.load_state_dict(lins, strict=False)
    linear_keys = {k for k in model.state_dict() if k[:3] == "lin" and k[3].isdigit()}  # `lins.*` aliases them
    if result.unexpected_keys or linear_keys & set(result.missing_keys):
        raise RuntimeError(f"lpips {net}: linear weights do not fit ({result})")
    trunk = weights.load_safetensors(Path(trunk_file))
    # lpips slices torchvision's `features` without renumbering: net.sliceK.<i>.* is features.<i>.*
    wanted = {k: f"features.{k.split('.', 1)[1]}" for k in model.net.state_dict()}
    absent = sorted(v for v in wanted.values() if v not in trunk)
    if absent:
        raise RuntimeError(f"{trunk_file}: not a torchvision {net} trunk (missing {', '.join(absent[:3])})")
    model.net.load_state_dict({k: trunk[v] for k, v in wanted.items()})
    return model.eval().float()


def lpips_input(arrays: list[Image]) -> Any:
    """uint8 HxWx3 arrays -> (N, 3, H, W) float32 in [-1, 1], bit for bit ``lpips.im2tensor`` (x / 127.5 - 1 in
    float64, then float32)."""
    import torch

    scaled = (np.stack(arrays) / 127.5 - 1).astype(np.float32)
    return torch.from_numpy(scaled).permute(0, 3, 1, 2).contiguous()


def lpips_distances(pairs: list[tuple[Image, Image]], net: str) -> list[float]:
    """LPIPS of each (protected, clean) pair, equal-shape pairs batched."""
    import torch

    model = lpips_model(net, str(LPIPS_BACKBONES[net].path() / LPIPS_BACKBONES[net].files[0]))
    out = [0.0] * len(pairs)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(pairs):
        by_shape.setdefault(p.shape, []).append(i)
    with torch.inference_mode():
        for idx in by_shape.values():
            for start in range(0, len(idx), LPIPS_CHUNK):
                chunk = idx[start:start + LPIPS_CHUNK]
                d = model(lpips_input([pairs[i][0] for i in chunk]), lpips_input([pairs[i][1] for i in chunk]))
                for i, v in zip(chunk, d.reshape(-1).tolist()):
                    out[i] = float(v)
    return out


@dataclass(frozen=True)
class LpipsParams:
    net: Literal["alex", "vgg"] = "alex"  # alex: LPIPS paper's default, DiffAdvPerturbationBench; vgg: IMPRESS

    def validate(self) -> None:
        if self.net not in TORCHVISION_BACKBONES:
            raise ValueError(f"net must be one of {sorted(TORCHVISION_BACKBONES)}, got {self.net!r}")


@METRICS.register("lpips", version=1)
class Lpips(Metric):
    """LPIPS v0.1 (``lpips`` package) protected vs clean at native resolution, mean over images; 0 = identical.
    Defender's view: lower (less visible) is better."""

    Params = LpipsParams
    target = "protected"
    higher_is_better = False
    description = ("LPIPS v0.1 (lpips, AlexNet or VGG16 trunk) protected vs clean, native resolution, mean; lower = "
                   "less visible (Zhang et al., CVPR'18)")
    requires = Requirements(modules=("lpips", "torchvision"), extra="metrics")
    paper = "LPIPS (Zhang et al., CVPR'18); net=alex as DiffAdvPerturbationBench, net=vgg as IMPRESS"

    def weight_names(self) -> tuple[str, ...]:
        return (LPIPS_BACKBONES[self.params.net].name,)

    def protocol_id(self) -> str:
        return f"lpips/{self.params.net}-v{LPIPS_VERSION}/protected-vs-clean"

    def compute(self, inputs: MetricInputs) -> float:
        return float(np.mean(lpips_distances(image_pairs(inputs, "lpips"), self.params.net)))
