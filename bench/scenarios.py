"""Scenarios: what the attacker actually gets (DESIGN.md). Each plug-in turns its parameters into a
``ScenarioSpec``; ``compose_training_set`` applies it to a protected subject.

- ``clean``: the protected set_B as published.
- ``leak``: k of the N training images are replaced by clean images (MetaCloak's ``--poison_rate``, the
  uncontrolled setting of Anti-DreamBooth); k may be an integer, "N-1" or "N".
- ``transform``: attacker-side bypass transforms applied in order to every training image; from the first one that
  needs a model (a purifier, attacks/purification.py) on, the chain runs in the cached ``purify`` stage.
- ``model-mismatch``: the attacker fine-tunes the profile's ``mismatch`` base model, not the defense's.
- ``prompt-mismatch``: the attacker trains with another identifier and/or prompt than the defense assumed.
- ``model-prompt-mismatch``: both at once (GenWatermark's "unknown models and text prompts", arXiv 2306.07754).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.plugins import SCENARIOS, TRANSFORMS, Image, Scenario, ScenarioSpec
from bench.registry import ConfigError, build_params, params_dict


@SCENARIOS.register("clean")
class Clean(Scenario):
    """The attacker trains on the protected images exactly as published."""

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec()


@dataclass(frozen=True)
class LeakParams:
    k: int | str = 1  # number of clean images among N, or "N-1" / "N"

    def validate(self) -> None:
        if isinstance(self.k, str) and self.k not in ("N", "N-1"):
            raise ValueError(f"k must be an integer, 'N-1' or 'N', got {self.k!r}")
        if isinstance(self.k, int) and self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")


@SCENARIOS.register("leak")
class Leak(Scenario):
    """k of N training images replaced by clean images: first the subject's set_C, then (if set_C is too short,
    as in the DreamBooth dataset) the clean originals of the replaced images. Replaced positions are the last k."""

    Params = LeakParams

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec(leak=self.params.k)


@dataclass(frozen=True)
class TransformParams:
    transforms: tuple[dict, ...] = ()  # [{name: jpeg, quality: 75}, ...]

    def validate(self) -> None:
        if not self.transforms:
            raise ValueError("transforms: give at least one, e.g. [{name: jpeg, quality: 75}]")


def normalise_transform(entry: Any, where: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """{name: jpeg, quality: 75} or "jpeg" -> ("jpeg", (("quality", 75),)) with defaults filled in."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: a transform is a name or a mapping with a 'name' key, got {entry!r}")
    given = {k: v for k, v in entry.items() if k != "name"}
    cls = TRANSFORMS.get(entry["name"], where)
    params = build_params(cls, given, None, f"{where}.{entry['name']}")
    return entry["name"], tuple(sorted(params_dict(params).items()))


@SCENARIOS.register("transform")
class TransformScenario(Scenario):
    """Bypass transforms (METHODS.md 6.1) applied by the attacker before fine-tuning."""

    Params = TransformParams

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec(transforms=tuple(normalise_transform(t, f"transforms[{i}]")
                                             for i, t in enumerate(self.params.transforms)))

    def weight_names(self) -> tuple[str, ...]:
        """The weights its transforms need (IMPRESS's LPIPS backbone), so a suite missing them is refused up front."""
        return tuple(w for name, params in self.spec().transforms
                     for w in TRANSFORMS.create(name, dict(params)).weight_names())


@SCENARIOS.register("model-mismatch")
class ModelMismatch(Scenario):
    """The attacker fine-tunes another base model than the one the defense used (Anti-DreamBooth 5.3)."""

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec(attacker_model="mismatch")


@dataclass(frozen=True)
class PromptMismatchParams:
    identifier: str = ""  # "" = the profile's mismatch identifier
    instance_prompt: str = ""  # "" = the profile's mismatch prompt; template with {identifier}, {class_noun}


@SCENARIOS.register("prompt-mismatch")
class PromptMismatch(Scenario):
    """The attacker trains with another identifier and prompt than the defense optimised for."""

    Params = PromptMismatchParams

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec(identifier=self.params.identifier or "<mismatch>",
                            instance_prompt=self.params.instance_prompt or "<mismatch>")


@SCENARIOS.register("model-prompt-mismatch")
class ModelPromptMismatch(Scenario):
    """The attacker fine-tunes the profile's ``mismatch`` base model with another identifier and prompt than the
    defense assumed (GenWatermark, Ma et al., arXiv 2306.07754: "unknown models and text prompts")."""

    Params = PromptMismatchParams

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec(attacker_model="mismatch", identifier=self.params.identifier or "<mismatch>",
                            instance_prompt=self.params.instance_prompt or "<mismatch>")


TransformChain = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def split_at_model_transform(chain: TransformChain) -> tuple[TransformChain, TransformChain]:
    """(transforms before the first model transform, the rest): ``compose`` applies the first part, the ``purify``
    stage the rest (so "JPEG then upscaling" works, and leaked clean images are purified too)."""
    for i, (name, params) in enumerate(chain):
        if TRANSFORMS.create(name, dict(params)).model_roles():
            return chain[:i], chain[i:]
    return chain, ()


def leak_count(leak: int | str, n: int) -> int:
    k = {"N": n, "N-1": max(n - 1, 0)}.get(leak, leak) if isinstance(leak, str) else leak
    if k > n:
        raise ValueError(f"leak of {k} clean images asked but the training set has only {n}")
    return int(k)


def compose_training_set(protected: list[Image], clean_b: list[Image], clean_c: list[Image],
                         spec: ScenarioSpec, rng: np.random.Generator) -> tuple[list[Image], list[str]]:
    """The attacker's training set and, per image, where it came from ("protected", "set_C[i]", "clean_B[i]")."""
    n = len(protected)
    k = leak_count(spec.leak, n)
    images, origin = list(protected), ["protected"] * n
    for j, pos in enumerate(range(n - k, n)):
        if j < len(clean_c):
            images[pos], origin[pos] = clean_c[j], f"set_C[{j}]"
        else:
            images[pos], origin[pos] = clean_b[pos], f"clean_B[{pos}]"
    for name, params in spec.transforms:
        transform = TRANSFORMS.create(name, dict(params))
        if transform.model_roles():
            raise ValueError(f"transform {name!r} needs models {transform.model_roles()}: it runs in the purify stage "
                             f"(split the chain with split_at_model_transform)")
        images = [transform.apply(img, rng) for img in images]
    return images, origin
