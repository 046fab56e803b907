"""Test-only plug-ins that exercise the harden and watermark data-flow paths (not registered outside tests)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.plugins import DEFENSES, Defense, Image, RunContext
from defenses.baselines import project_to_budget


@DEFENSES.register("test-harden")
class ZeroOutputHarden(Defense):
    """Hardens by zeroing the UNet's output convolution: the attacker starts from a model predicting zero noise."""

    defense_kind = "harden"
    test_only = True

    def harden(self, ctx: RunContext, model_dir: Path, subjects, out_dir: Path) -> None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
        with __import__("torch").no_grad():
            pipe.unet.conv_out.weight.zero_()
            pipe.unet.conv_out.bias.zero_()
        pipe.save_pretrained(out_dir, safe_serialization=True)

    def budget_255(self):
        return None


@dataclass(frozen=True)
class WatermarkParams:
    eps: float = 4.0


@DEFENSES.register("test-watermark")
class CheckerboardWatermark(Defense):
    """Adds a +-eps checkerboard; the detector correlates an image's high-pass residual with it."""

    defense_kind = "watermark"
    Params = WatermarkParams
    test_only = True

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir) -> list[Image]:
        out = []
        for img in images:
            pattern = _pattern(img.shape[:2])[..., None] * self.params.eps
            out.append(project_to_budget(img, img + pattern, self.params.eps))
        return out

    def save_detector(self, ctx: RunContext, subject, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "detector.json").write_text(json.dumps({"kind": "checkerboard", "eps": self.params.eps}))

    @classmethod
    def detect(cls, detector_dir: Path, images: list[Image]) -> np.ndarray:
        eps = json.loads((detector_dir / "detector.json").read_text())["eps"]
        scores = []
        for img in images:
            x = img.astype(np.float64).mean(axis=2)
            resid = x - 0.25 * (np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 1))
            scores.append(float((resid * _pattern(x.shape)).mean() / (2 * eps)))
        return np.array(scores)


def _pattern(shape) -> np.ndarray:
    yy, xx = np.indices(shape)
    return np.where((yy + xx) % 2 == 0, 1.0, -1.0)


@dataclass(frozen=True)
class FlakyParams:
    marker: str = ""  # a folder: a subject's first attempt leaves a file there and fails, later attempts succeed
    mode: str = "raise"  # "raise": the first attempt raises; "exit": its worker process dies; "always": every one raises


@DEFENSES.register("test-flaky")
class FlakyDefense(Defense):
    """Publishes the photos unchanged after failing as ``mode`` says (the scheduler's retries)."""

    Params = FlakyParams
    test_only = True

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir) -> list[Image]:
        import os

        if self.params.mode == "always":
            raise RuntimeError("test-flaky: fails on every attempt")
        marker = Path(self.params.marker) / subject.id
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            if self.params.mode == "exit":
                os._exit(3)
            raise RuntimeError("test-flaky: first attempt fails")
        return images

    def budget_255(self):
        return 0.0


@dataclass(frozen=True)
class SlowParams:
    subject: str = ""  # only this subject's protect stage is slow; "" = every subject's


@DEFENSES.register("test-slow")
class SlowDefense(Defense):
    """Publishes the photos unchanged. Where ``TEST_SLOW_RELEASE`` names a file, first sleeps until it exists (at
    most 5 minutes): a protect stage exactly as slow as a test needs (it sets the variable; runs without it are fast)."""

    Params = SlowParams
    test_only = True

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir) -> list[Image]:
        import os
        import time

        release = os.environ.get("TEST_SLOW_RELEASE")
        if release and self.params.subject in ("", subject.id):
            deadline = time.time() + 300
            while not Path(release).exists() and time.time() < deadline:
                time.sleep(0.2)
        return images

    def budget_255(self):
        return 0.0
