"""Baseline defenses: ``none`` (publish the clean photos) and ``random-noise`` (random perturbation at the same
L-inf budget as the adversarial defenses: the baseline Anti-DreamBooth users asked for, issue #10).

Budgets are L-inf in /255 pixel units. Saved images are uint8, so the realised budget is floor(eps)/255.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from bench.plugins import DEFENSES, Defense, Image, RunContext


def project_to_budget(clean: Image, perturbed: np.ndarray, eps_255: float) -> Image:
    """Round to uint8 and clip so that max |out - clean| <= floor(eps) and pixels stay in [0, 255]."""
    limit = math.floor(eps_255 + 1e-9)
    delta = np.clip(np.rint(perturbed.astype(np.float64) - clean), -limit, limit)
    return np.clip(clean.astype(np.int16) + delta.astype(np.int16), 0, 255).astype(np.uint8)


@DEFENSES.register("none")
class NoDefense(Defense):
    """No protection: the undefended baseline row of every table."""

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        return [img.copy() for img in images]

    def budget_255(self) -> float | None:
        return 0.0


@dataclass(frozen=True)
class RandomNoiseParams:
    eps: float = 6.375  # L-inf budget in /255 units; default = Anti-DreamBooth's 0.05 in [-1, 1] (METHODS.md 0)
    distribution: Literal["uniform", "sign"] = "uniform"  # U(-eps, eps), or +-eps per pixel (PGD-like sign pattern)

    def validate(self) -> None:
        if not 0 < self.eps <= 255:
            raise ValueError(f"eps must be in (0, 255] (/255 pixel units), got {self.eps}")


@DEFENSES.register("random-noise")
class RandomNoise(Defense):
    """Random noise at the adversarial defenses' L-inf budget (a control: does the *adversarial* part matter?)."""

    Params = RandomNoiseParams

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        rng = ctx.rng()
        eps = self.params.eps
        out = []
        for img in images:
            if self.params.distribution == "uniform":
                noise = rng.uniform(-eps, eps, size=img.shape)
            else:
                noise = eps * rng.choice([-1.0, 1.0], size=img.shape)
            out.append(project_to_budget(img, img + noise, eps))
        return out
