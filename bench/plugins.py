"""The plug-in kinds (DESIGN.md "Plug-ins") and their registries.

Images travel between stages as ``uint8`` arrays of shape (H, W, 3), RGB. Every L-inf budget is in
/255 pixel units, whatever space a method computes in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import numpy as np

from bench.registry import Plugin, Registry

if TYPE_CHECKING:
    from bench.datasets import Subject

Image = np.ndarray  # uint8, HxWx3


@dataclass
class RunContext:
    """What a stage gets besides its inputs."""

    seed: int
    device: str
    profile: str
    resolution: int
    work_dir: Path  # where the stage writes its artifact (a temp dir renamed on success)
    allow_unsafe_weights: bool = False
    progress: Callable[[int, int], None] = lambda done, total: None
    extra: dict[str, Any] = field(default_factory=dict)  # measurements the stage wants in the row
    models: dict[str, Path] = field(default_factory=dict)  # model role or reference -> diffusers folder
    generated: dict[str, list] = field(default_factory=dict)  # Defense.generated_inputs name -> uint8 images

    def torch_generator(self, offset: int = 0):
        import torch

        return torch.Generator(device="cpu").manual_seed(self.seed + offset)

    def rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + offset)


class Defense(Plugin):
    """A protection. ``defense_kind`` picks the data-flow path (DESIGN.md)."""

    defense_kind: ClassVar[Literal["perturb", "harden", "watermark"]] = "perturb"
    needs_model: ClassVar[bool] = False  # needs a surrogate model (white-box)

    def model_roles(self) -> tuple[str, ...]:
        """Surrogate models: profile roles ("default", "mismatch", or any key of ``Profile.models``) or model
        references. The first is passed as ``model_dir``; all are in ``ctx.models`` (ensembles)."""
        return ("default",) if (self.needs_model or self.defense_kind == "harden") else ()

    def generated_inputs(self, class_nouns: list[str]) -> dict[str, dict]:
        """Images the defense needs from its first surrogate model, as cached ``class_images`` stages shared with any
        other stage asking for the same: name -> {"prompt", "n", "sampler", "steps", "guidance"}; the protect stage
        gets them in ``ctx.generated[name]``. ``class_nouns``: the protected subjects' classes."""
        return {}

    def protect(self, ctx: RunContext, images: list[Image], subject: "Subject", model_dir: Path | None) -> list[Image]:
        """perturb/watermark: the published images (same shapes, uint8)."""
        raise NotImplementedError

    def harden(self, ctx: RunContext, model_dir: Path, subjects: list["Subject"], out_dir: Path) -> None:
        """harden: write a diffusers model folder (safetensors) to ``out_dir`` that protects ``subjects`` (one, or
        several when the suite hardens once for a list: ``protect_subjects``)."""
        raise NotImplementedError

    def save_detector(self, ctx: RunContext, subject: "Subject", out_dir: Path) -> None:
        """watermark: write what ``detect`` needs to ``out_dir``."""
        raise NotImplementedError

    @classmethod
    def detect(cls, detector_dir: Path, images: list[Image]) -> np.ndarray:
        """watermark: one score per image, higher = more likely watermarked."""
        raise NotImplementedError

    def budget_255(self) -> float | None:
        """The declared L-inf budget in /255 pixel units, or None for unbounded kinds."""
        return getattr(self.params, "eps", None)


class Transform(Plugin):
    """Attacker-side image -> image bypass, applied before fine-tuning. A transform without models (``apply``) runs
    in the ``compose`` stage; one that declares ``model_roles`` (a purifier: DiffPure, noisy upscaling, IMPRESS) runs
    with the rest of its scenario's chain in the cached ``purify`` stage (``purify``), on the device like other
    model stages."""

    def apply(self, image: Image, rng: np.random.Generator) -> Image:
        raise NotImplementedError

    def model_roles(self) -> tuple[str, ...]:
        """Models this transform needs: profile roles (keys of ``Profile.models``, e.g. "diffpure", "upscaler",
        "default": the attacker's base model) or model references. Empty: an ordinary transform."""
        return ()

    def purify(self, ctx: RunContext, images: list[Image], class_noun: str) -> list[Image]:
        """A model transform: the attacker's training set -> the purified set (same count and shapes, uint8).
        ``ctx.models`` maps this transform's roles to diffusers folders; random draws come from ``ctx.rng()`` /
        ``ctx.torch_generator()``; ``class_noun`` is the subject's class (for prompts)."""
        raise NotImplementedError


class Attack(Plugin):
    """Personalization: base model + training images -> fine-tuned weights in ``out_dir``."""

    # True for attacks that add the prompts' identifier to the tokenizer as a new word with its own learned embedding
    # (Textual Inversion's placeholder, Custom Diffusion's modifier token): ``train`` then also gets the keywords
    # ``token_words`` returns, and they are part of the attack stage's key. Generation prompts keep the identifier.
    learns_token: ClassVar[bool] = False

    def token_words(self, identifier: str, class_noun: str) -> dict[str, str]:
        """The extra keywords of ``train``: ``identifier`` (the new word) and ``class_noun`` (its default
        initialisation) when ``learns_token``, else none."""
        return {"identifier": identifier, "class_noun": class_noun} if self.learns_token else {}

    def class_images_needed(self) -> int:
        return int(getattr(self.params, "num_class_images", 0) if getattr(self.params, "with_prior_preservation", False) else 0)

    def train(self, ctx: RunContext, model_dir: Path, images: list[Image], instance_prompt: str,
              class_prompt: str, class_images: list[Image], out_dir: Path) -> None:
        raise NotImplementedError

    def load_pipeline(self, model_dir: Path, trained_dir: Path, device: str, allow_unsafe: bool = False):
        """The personalised diffusers pipeline, for generation."""
        raise NotImplementedError


@dataclass
class MetricInputs:
    """Everything a metric may look at; each metric reads what its protocol names."""

    subject: "Subject"
    resolution: int
    generated: list[Image] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # one per generated image
    protected: list[Image] = field(default_factory=list)  # set_B after the defense
    clean: list[Image] = field(default_factory=list)  # set_B before the defense
    detector_dir: Path | None = None  # watermark defenses only
    defense_dir: Path | None = None  # the protect stage's folder (a harden defense's model/, its own records)
    defense: str = ""
    generated_names: list[str] = field(default_factory=list)
    baseline_generated: list[Image] = field(default_factory=list)  # needs_baseline metrics of watermark defenses


def subject_name(subject: Any) -> str:
    """A subject's name for messages (``Subject.key()``, or a stand-in's ``name``/``id``)."""
    key = getattr(subject, "key", None)
    return str(key() if callable(key) else getattr(subject, "name", None) or getattr(subject, "id", None) or subject)


class Explained(float):
    """A metric value that is not an ordinary number (NaN: undefined; inf: e.g. PSNR of identical images) together
    with why; it is a float, so callers that only compare numbers are unaffected. The measure stage writes
    ``reason`` next to the value and the leaderboard shows it instead of an empty cell."""

    reason: str

    def __new__(cls, value: float, reason: str) -> "Explained":
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj


def explained(value: float, reason: str) -> float:
    """``value`` (NaN or inf) carrying ``reason`` (see ``Explained``)."""
    return Explained(value, reason)


class Metric(Plugin):
    """A number computed under a fixed protocol (``protocol_id`` is the leaderboard column).

    ``target``: "generated" (the personalised model's images), "protected" (set_B after the defense, with the clean
    originals) or "model" (utility of the attacker's base model itself, hardened or not: ``sampling()`` says what
    to generate from it, and ``MetricInputs.generated``/``prompts`` hold those images)."""

    target: ClassVar[Literal["protected", "generated", "model"]] = "generated"
    higher_is_better: ClassVar[bool] = True
    description: ClassVar[str] = ""
    # watermark defenses: also give the metric the same attack's images from the undefended training set
    # (``MetricInputs.baseline_generated``, the negatives of a detection metric)
    needs_baseline: ClassVar[bool] = False

    def protocol_id(self) -> str:
        raise NotImplementedError

    # the subjects a protocol is defined for, for the reason a cell of another subject gives ("face subjects")
    applies_description: ClassVar[str] = ""

    def applies_to(self, subject: "Subject") -> bool:
        """False where the protocol is undefined (face metrics on a dog): the cell reports NaN, not a failure."""
        return True

    def not_applicable_reason(self, subject: "Subject") -> str:
        """Why the cell of ``subject`` is NaN when ``applies_to`` is False."""
        what = f"{self.name} is defined for {self.applies_description} only" if self.applies_description \
            else f"{self.name} is undefined here"
        return (f"not applicable: {what}, not for {getattr(subject, 'dataset', '?')} subjects of class "
                f"{getattr(subject, 'class_noun', '?')!r}")

    def compute(self, inputs: MetricInputs) -> float:
        raise NotImplementedError

    def cannot_measure(self, resolution: int, harness_models: bool) -> str | None:
        """Why this metric can measure nothing at this scale (generated images of ``resolution`` px; models built by
        the harness, tiny/proxy), said before a run; None when it can."""
        return None

    def sampling(self) -> dict:
        """target "model" only: {"prompts": [...], "sampler", "steps", "guidance", "n_per_prompt"} (hashed into the
        ``sample`` stage's key, so metrics that ask for the same images share one stage)."""
        raise NotImplementedError


class NotProvided(Metric):
    """A metric some paper reports that the harness cannot provide: registered so that `bench list` says why and a
    suite naming it is refused with that reason before anything runs. Subclasses set ``reason`` and ``pid``."""

    reason: ClassVar[str] = ""
    pid: ClassVar[str] = ""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return cls.reason

    def missing_weights(self) -> str | None:
        return self.reason

    def protocol_id(self) -> str:
        return self.pid

    def compute(self, inputs: MetricInputs) -> float:
        raise RuntimeError(f"{self.name}: {self.reason}")


class Dataset(Plugin):
    """A source of subjects. ``root`` is None for built-in data."""

    needs_root: ClassVar[bool] = True
    manifest: ClassVar[str] = ""  # file under data_manifests/

    def subjects(self, root: Path | None) -> list["Subject"]:
        raise NotImplementedError


@dataclass(frozen=True)
class ScenarioSpec:
    """What the attacker gets (DESIGN.md "Scenario")."""

    leak: int | str = 0  # clean images among the N training images: an int, "N-1" or "N"
    transforms: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (name, sorted params)
    attacker_model: Literal["same", "mismatch"] = "same"
    identifier: str | None = None  # None: the profile's ("sks")
    instance_prompt: str | None = None  # template with {identifier} and {class_noun}


class Scenario(Plugin):
    def spec(self) -> ScenarioSpec:
        raise NotImplementedError


class Executor(Plugin):
    """Supplies workers to the scheduler (bench/scheduler.py). Workers compute artifacts; only the driver writes the
    ledger. ``start`` gets the picklable ``call`` (stage key -> StageResult, ``call.env.stages`` the plan) and
    ``jobs`` (--jobs; 0 = the executor's default); ``wait`` blocks until at least one submitted attempt ends and
    returns ``bench.scheduler.Finished`` records; ``stop`` ends the workers (``interrupted``: Ctrl-C)."""

    def start(self, call: Callable[[str], Any], jobs: int = 0) -> None:
        raise NotImplementedError

    def has_room(self, kind: str) -> bool:
        raise NotImplementedError

    def submit(self, key: str) -> None:
        """Start (or queue for the next ``flush``) one attempt of stage ``key``."""
        raise NotImplementedError

    def flush(self) -> list[tuple[str, str, str]]:
        """Send what ``submit`` queued; (key, where it runs, job id or "") of each attempt started since last call."""
        raise NotImplementedError

    def wait(self) -> list[Any]:
        raise NotImplementedError

    def adopt(self, jobs: dict[str, str]) -> dict[str, str]:
        """After ``start``: follow the attempts an earlier driver of this --out left running ({stage key: job id});
        ``wait`` reports those still running or finished like submitted ones. Returns {key: why} of lost attempts."""
        return {k: f"job {j}: the {self.name} executor cannot follow it" for k, j in jobs.items()}

    def stop(self, interrupted: bool = False) -> None:
        pass

    def describe(self) -> str:
        """Workers as the run summary states them."""
        return self.name


DEFENSES: Registry[Defense] = Registry("defense", Defense, "antipersonalization_bench.defenses")
TRANSFORMS: Registry[Transform] = Registry("transform", Transform, "antipersonalization_bench.transforms")
ATTACKS: Registry[Attack] = Registry("attack", Attack, "antipersonalization_bench.attacks")
METRICS: Registry[Metric] = Registry("metric", Metric, "antipersonalization_bench.metrics")
DATASETS: Registry[Dataset] = Registry("dataset", Dataset, "antipersonalization_bench.datasets")
SCENARIOS: Registry[Scenario] = Registry("scenario", Scenario, "antipersonalization_bench.scenarios")
EXECUTORS: Registry[Executor] = Registry("executor", Executor, "antipersonalization_bench.executors")

REGISTRIES: dict[str, Registry] = {
    "defenses": DEFENSES, "transforms": TRANSFORMS, "attacks": ATTACKS, "metrics": METRICS,
    "datasets": DATASETS, "scenarios": SCENARIOS, "executors": EXECUTORS,
}
