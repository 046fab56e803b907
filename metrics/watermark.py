"""Watermark detection on generated images (for ``watermark`` defenses, DESIGN.md): the defense's own detector
artifact scores each generated image; the metric is the fraction flagged at the detector's threshold.
Cells of other defense kinds report NaN (no detector)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bench.plugins import DEFENSES, Metric, MetricInputs, METRICS


@dataclass(frozen=True)
class DetectRateParams:
    threshold: float = 0.5


@METRICS.register("watermark-detect-rate")
class WatermarkDetectRate(Metric):
    """Fraction of generated images in which the defense's detector finds its watermark (higher = defender wins)."""

    Params = DetectRateParams
    target = "generated"
    higher_is_better = True
    description = "share of generated images flagged by the watermark defense's own detector"

    def protocol_id(self) -> str:
        return f"wm-detect/own-detector/threshold={self.params.threshold:g}"

    def compute(self, inputs: MetricInputs) -> float:
        if inputs.detector_dir is None or not inputs.generated:
            return math.nan
        scores = DEFENSES.get(inputs.defense).detect(inputs.detector_dir, inputs.generated)
        return float((scores >= self.params.threshold).mean())
