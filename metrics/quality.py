"""No-reference image quality of generated images.

BRISQUE as Anti-DreamBooth (``evaluations/brisques.py``) and APDM report it: the PyPI ``brisque`` package,
``BRISQUE(url=False).score(PIL.Image)`` at native resolution, mean over generated images. Scores are unitless,
roughly 0-100, lower = better-looking image. ``higher_is_better`` is from the defender's point of view: a defense
wants the personalised model's images to look bad, so a higher BRISQUE is better for the defender.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image as PILImage

from bench.plugins import METRICS, Image, Metric, MetricInputs
from bench.registry import Requirements


@functools.lru_cache(maxsize=1)
def brisque_model() -> Any:
    """The ``brisque`` package's SVM model, loaded once per process."""
    from brisque import BRISQUE

    return BRISQUE(url=False)


def brisque_score(image: Image) -> float:
    """BRISQUE score of one uint8 HxWx3 RGB image, exactly ``BRISQUE(url=False).score(PIL image)``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"brisque: expected a uint8 HxWx3 array, got {image.dtype} {image.shape}")
    return float(brisque_model().score(PILImage.fromarray(image)))


@METRICS.register("brisque", version=1)
class Brisque(Metric):
    """Mean BRISQUE over the generated images (PyPI ``brisque`` 0.2, native resolution). An image whose score is
    NaN (e.g. a constant image) raises ValueError naming its index rather than being averaged."""

    target = "generated"
    higher_is_better = True
    description = ("BRISQUE (PyPI brisque, native resolution) of generated images, mean; lower = better image "
                   "quality, so higher is better for the defender")
    requires = Requirements(modules=("brisque",))
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/brisques.py; APDM"

    def protocol_id(self) -> str:
        return "brisque/pypi-brisque/native"

    def compute(self, inputs: MetricInputs) -> float:
        if not inputs.generated:
            raise ValueError("brisque: no generated images given (MetricInputs.generated is empty)")
        scores = []
        for i, image in enumerate(inputs.generated):
            s = brisque_score(image)
            if math.isnan(s):
                name = inputs.generated_names[i] if i < len(inputs.generated_names) else ""
                raise ValueError(f"brisque: generated image {i}{f' ({name})' if name else ''} gives NaN "
                                 f"(constant or degenerate image?)")
            scores.append(s)
        return float(np.mean(scores))
