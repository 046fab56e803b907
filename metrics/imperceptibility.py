"""Imperceptibility of a perturbation: protected set_B images against their clean originals.

``target = "protected"``: these metrics read ``MetricInputs.protected`` and ``MetricInputs.clean`` (equal-length
lists of equal-shape uint8 HxWx3 arrays). ``higher_is_better`` is from the defender's point of view: a less
visible perturbation is better, so L-inf is lower-is-better and PSNR/SSIM are higher-is-better.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.plugins import METRICS, Image, Metric, MetricInputs


def image_pairs(inputs: MetricInputs, metric: str) -> list[tuple[Image, Image]]:
    """(protected, clean) pairs, checked: same count, same shape, uint8, at least one pair."""
    prot, clean = inputs.protected, inputs.clean
    if not prot:
        raise ValueError(f"{metric}: no protected images given (MetricInputs.protected is empty)")
    if len(prot) != len(clean):
        raise ValueError(f"{metric}: {len(prot)} protected images but {len(clean)} clean ones")
    for i, (p, c) in enumerate(zip(prot, clean)):
        for what, a in (("protected", p), ("clean", c)):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"{metric}: {what}[{i}] is not a uint8 HxWx3 array ({a.dtype}, {a.shape})")
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
        return mean_over_pairs(inputs, "psnr", _psnr)


def _ssim(p: Image, c: Image) -> float:
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
