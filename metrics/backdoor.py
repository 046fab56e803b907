"""Backdoor success of a model-level backdoor defense (PersGuard, Liu et al., arXiv 2502.16167; METHODS.md 3): after
the attacker personalised the backdoored model, do its generations show the backdoor target (pattern, erased scene,
target object) rather than the subject?

``backdoor-success``: the share of generated images whose embedding is closer (cosine) to the mean embedding of the
backdoor target images than to the mean embedding of the subject's clean photos (set_A + set_B). In [0, 1]; higher =
the backdoor won (better for the defender). The targets are the ones the defense trained on, read from the hardened
model (``persguard/targets/<subject id>/``; a subject the model does not protect is scored against every protected
subject's targets pooled). Cells of defenses without backdoor targets report NaN.

Backbones: ``dino`` (DINO ViT-S/16 CLS, the DreamBooth fidelity backbone; weights fetched with ``bench weights
fetch``) at the paper scale; ``synthid`` (the synthetic subjects' identity network, metrics/subject_identity.py) at
the tiny and proxy scales, where DINO's 224 px features say little about 32 px images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from bench.plugins import METRICS, Image, Metric, MetricInputs, explained
from bench.registry import Requirements
from bench.stages import load_images

TARGETS_DIR = "model/persguard/targets"  # inside the protect stage's folder (defenses/persguard.py TARGETS_DIR)


@dataclass(frozen=True)
class BackdoorParams:
    backbone: Literal["dino", "synthid"] = "dino"


def backdoor_targets(defense_dir: Path | None, subject_id: str) -> list[Image]:
    """The subject's backdoor targets, or every protected subject's pooled; [] if the defense left none."""
    if defense_dir is None or not (defense_dir / TARGETS_DIR).is_dir():
        return []
    root = defense_dir / TARGETS_DIR
    own = root / subject_id
    folders = [own] if own.is_dir() else sorted(d for d in root.iterdir() if d.is_dir())
    return [img for d in folders for img in load_images(d)]


def unit_mean(e: np.ndarray) -> np.ndarray:
    m = e.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def closer_to_target_rate(generated: np.ndarray, targets: np.ndarray, subject: np.ndarray) -> float:
    """Share of rows of ``generated`` (L2-normalised embeddings) closer to the targets' mean than to the subject's."""
    return float(np.mean(generated @ unit_mean(targets) > generated @ unit_mean(subject)))


@METRICS.register("backdoor-success", version=1)
class BackdoorSuccess(Metric):
    """Share of generations closer to the backdoor targets than to the subject (higher = the backdoor won)."""

    Params = BackdoorParams
    target = "generated"
    higher_is_better = True
    description = "share of generations closer to the backdoor targets than to the subject's photos (PersGuard)"
    paper = "PersGuard (Liu et al., arXiv 2502.16167): backdoor behaviour after the attacker's fine-tuning"
    profiles = {"tiny": {"backbone": "synthid"}, "proxy": {"backbone": "synthid"}}

    requires = Requirements(modules=("transformers",))  # DINO weights only with backbone dino: weight_names

    def weight_names(self) -> tuple[str, ...]:
        from metrics.fidelity import DINO_VITS16

        return (DINO_VITS16.name,) if self.params.backbone == "dino" else ()

    def protocol_id(self) -> str:
        if self.params.backbone == "dino":
            from metrics.fidelity import DINO_VITS16, backbone_token

            backbone = f"{backbone_token(DINO_VITS16.name)}-cls"
        else:
            from metrics.subject_identity import IDENTITY_VERSION

            backbone = f"synthid-v{IDENTITY_VERSION}"
        return f"backdoor-success/{backbone}/closer-to-targets-than-subject-AB"

    def _embed(self, images: list[Image]) -> np.ndarray:
        if self.params.backbone == "dino":
            from metrics.fidelity import dino_embeddings

            return dino_embeddings(images)
        from metrics.subject_identity import identity_model

        return identity_model().embed(images, "image")

    def compute(self, inputs: MetricInputs) -> float:
        targets = backdoor_targets(inputs.defense_dir, inputs.subject.id)
        if not targets:
            return explained(math.nan, f"not applicable: defense {inputs.defense or '?'} planted no backdoor targets")
        if not inputs.generated:
            raise ValueError(f"{self.name}: no generated images")
        subject = [im for split in ("A", "B") for im in inputs.subject.load(split, inputs.resolution)]
        return closer_to_target_rate(self._embed(inputs.generated), self._embed(targets), self._embed(subject))
