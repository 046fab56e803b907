"""Watermark detection on generated images (for ``watermark`` defenses, DESIGN.md; GenWatermark, Ma et al.,
arXiv 2306.07754, reports detection accuracy). The defense's own detector artifact scores each image.

- ``watermark-detect-rate``: share of the attacker's generated images flagged at the detector's threshold.
- ``watermark-accuracy``, ``watermark-auc``, ``watermark-tpr@fpr``: a two-class test. Positives = the images the
  attacker's model generates after fine-tuning on the *watermarked* images (the cell's own generations); negatives =
  the images the same attack generates after fine-tuning on the subject's *undefended* images (same scenario, seed
  and prompts; the planner adds that run). AUC and the ROC come from scikit-learn. TPR at a false-positive rate is
  the highest TPR whose FPR is <= the target on the empirical ROC: with n negatives the FPR moves in steps of 1/n,
  so below 100 negatives "TPR at 1% FPR" is the TPR at FPR 0. GenWatermark's exact protocol is not public
  (METHODS.md 4).

Cells of other defense kinds report NaN (no detector). Higher is better for the defender throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.plugins import DEFENSES, Metric, MetricInputs, METRICS, explained
from bench.registry import Requirements


@dataclass(frozen=True)
class DetectRateParams:
    threshold: float = 0.5


def _scores(inputs: MetricInputs, images) -> np.ndarray:
    return np.asarray(DEFENSES.get(inputs.defense).detect(inputs.detector_dir, images), dtype=np.float64)


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
        if inputs.detector_dir is None:
            return explained(math.nan, _NO_DETECTOR.format(inputs.defense or "?"))
        if not inputs.generated:
            return explained(math.nan, "no generated images to test")
        return float((_scores(inputs, inputs.generated) >= self.params.threshold).mean())


_NO_DETECTOR = "not applicable: defense {} is not a watermark defense (no detector)"


class _TwoClassMetric(Metric):
    target = "generated"
    higher_is_better = True
    needs_baseline = True
    requires = Requirements(modules=("sklearn",))
    paper = "GenWatermark (Ma et al., arXiv 2306.07754): detection of subject-model generations"

    def compute(self, inputs: MetricInputs) -> float:
        if inputs.detector_dir is None:
            return explained(math.nan, _NO_DETECTOR.format(inputs.defense or "?"))
        if not inputs.generated or not inputs.baseline_generated:
            raise ValueError(f"{self.name}: needs the watermarked run's and the undefended run's generations "
                             f"(got {len(inputs.generated)} and {len(inputs.baseline_generated)})")
        pos, neg = _scores(inputs, inputs.generated), _scores(inputs, inputs.baseline_generated)
        if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
            raise ValueError(f"{self.name}: the detector returned non-finite scores")
        labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        return self.from_scores(labels, np.r_[pos, neg])

    def from_scores(self, labels: np.ndarray, scores: np.ndarray) -> float:
        raise NotImplementedError


@METRICS.register("watermark-accuracy")
class WatermarkAccuracy(_TwoClassMetric):
    """Detection accuracy at the detector's threshold over watermarked-run (positive) and undefended-run
    (negative) generations, in [0, 1]."""

    Params = DetectRateParams
    description = ("accuracy of the watermark detector at its threshold: watermarked-run vs undefended-run "
                   "generations of the same attack")

    def protocol_id(self) -> str:
        return f"wm-accuracy/own-detector/threshold={self.params.threshold:g}/neg=undefended-run"

    def from_scores(self, labels: np.ndarray, scores: np.ndarray) -> float:
        return float(((scores >= self.params.threshold) == labels.astype(bool)).mean())


@METRICS.register("watermark-auc")
class WatermarkAuc(_TwoClassMetric):
    """ROC AUC (scikit-learn) of the detector's scores, watermarked-run vs undefended-run generations; 0.5 = chance."""

    description = "ROC AUC of the watermark detector: watermarked-run vs undefended-run generations (sklearn)"

    def protocol_id(self) -> str:
        return "wm-auc/own-detector/neg=undefended-run"

    def from_scores(self, labels: np.ndarray, scores: np.ndarray) -> float:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class TprParams:
    fpr: float = 0.01

    def validate(self) -> None:
        if not 0.0 <= self.fpr < 1.0:
            raise ValueError(f"fpr must be in [0, 1), got {self.fpr}")


@METRICS.register("watermark-tpr@fpr")
class WatermarkTprAtFpr(_TwoClassMetric):
    """True-positive rate at a false-positive rate (default 1%) on the empirical ROC (scikit-learn roc_curve)."""

    Params = TprParams
    description = "TPR of the watermark detector at a fixed FPR (default 1%), undefended-run generations as negatives"

    def protocol_id(self) -> str:
        return f"wm-tpr@fpr={self.params.fpr:g}/own-detector/neg=undefended-run"

    def from_scores(self, labels: np.ndarray, scores: np.ndarray) -> float:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(labels, scores)
        return float(tpr[fpr <= self.params.fpr + 1e-12].max())
