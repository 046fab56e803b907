"""Stage runners: each is a pure function of its parameters and input artifacts, writing into a fresh folder.

``run_stage`` is what an executor calls (in this process, or in a worker on a cluster node); it returns a
small record (wall time, peak memory, what the stage wants in the result row) and never touches the ledger.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.datasets import DataError
from bench.images import ImageError, load_png, save_png
from bench.planner import Stage
from bench.plugins import ATTACKS, DATASETS, DEFENSES, METRICS, TRANSFORMS, Image, MetricInputs, RunContext, ScenarioSpec
from bench.registry import build_params
from bench.scenarios import compose_training_set
from bench.store import ArtifactStore

_SUBJECT_CACHE: dict[str, dict[str, Any]] = {}


def subject_from_spec(spec: dict):
    cache_key = json.dumps([spec["dataset"], spec["root"], spec["dataset_params"]], sort_keys=True)
    if cache_key not in _SUBJECT_CACHE:
        cls = DATASETS.get(spec["dataset"])
        ds = cls(build_params(cls, spec["dataset_params"], None, f"dataset {spec['dataset']}"))
        _SUBJECT_CACHE[cache_key] = {s.id: s for s in ds.subjects(Path(spec["root"]) if spec["root"] else None)}
    subject = _SUBJECT_CACHE[cache_key][spec["id"]]
    if subject.fingerprint() != spec["fingerprint"]:
        raise RuntimeError(f"subject {subject.key()} changed on disk since the plan was made; run again")
    return subject


def _plugin(registry, spec: dict):
    """Re-create a plug-in from a stage's spec (its parameters were fully resolved, profile included, at planning)."""
    cls = registry.get(spec["name"])
    return cls(build_params(cls, spec["params"], None, f"{registry.kind} {spec['name']}"))


def save_images(images: list[Image], folder: Path, names: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, folder / (names[i] if names else f"{i:03d}.png"))


def load_images(folder: Path) -> list[Image]:
    return [load_png(p) for p in sorted(folder.glob("*.png"))]


def model_dir_of(store: ArtifactStore, stage: Stage) -> Path:
    """The diffusers folder a model-producing stage (model, or protect of a harden defense) stands for."""
    path = store.path(stage.kind, stage.key)
    pointer = path / "model.json"
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    return path / "model"


@dataclass
class StageEnv:
    """What runners need besides the stage: the store, the plan's stages, run-wide options."""

    store: ArtifactStore
    stages: dict[str, Stage]
    profile: str
    device: str
    allow_unsafe_weights: bool = False
    progress: Callable[[int, int], None] = lambda d, t: None

    def dep(self, stage: Stage, kind: str) -> Stage:
        found = [self.stages[k] for k in stage.deps if self.stages[k].kind == kind]
        if not found:
            raise KeyError(f"{stage.kind} stage has no {kind} input")
        return found[0]

    def model_input(self, stage: Stage) -> Path:
        for k in stage.deps:
            dep = self.stages[k]
            if dep.kind == "model" or (dep.kind == "protect" and dep.params["kind"] == "harden"):
                return model_dir_of(self.store, dep)
        raise KeyError(f"{stage.kind} stage has no model input")


def run_model(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    from bench import models

    ref = stage.params["ref"]
    if models.builtin_family(ref):
        models.prepare_builtin(ref, ctx.work_dir / "model", stage.params["pretrain"], seed=0,
                               resolution=stage.params["resolution"])
        path = ctx.work_dir / "model"
    else:
        path = models.resolve_model(ref, env.allow_unsafe_weights)
        models.check_safe(path, env.allow_unsafe_weights)
        (ctx.work_dir / "model.json").write_text(json.dumps({"path": str(path), "ref": ref}))
    ctx.extra["weights_sha256"] = models.weight_hashes(path)


def run_protect(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    p = stage.params
    defense = _plugin(DEFENSES, p["defense"])
    ctx.models = {role: model_dir_of(env.store, env.stages[k]) for role, k in zip(p["model_roles"], stage.deps)}
    ctx.generated = {name: load_images(env.store.path("class_images", key) / "images")
                     for name, key in p.get("generated", {}).items()}
    model_dir = next(iter(ctx.models.values()), None)
    if p["kind"] == "harden":  # the owners publish unmodified photos; the model carries the protection
        subjects = [subject_from_spec(s) for s in p["subjects"]]
        ctx.extra["n_images"] = sum(len(s.file_names("B")) for s in subjects)
        defense.harden(ctx, model_dir, subjects, ctx.work_dir / "model")
        return
    subject = subject_from_spec(p["subject"])
    clean = subject.load("B", p["resolution"])
    names = [Path(n).stem + ".png" for n in subject.file_names("B")]
    ctx.extra["n_images"] = len(clean)  # the cost columns are per published image
    published = defense.protect(ctx, clean, subject, model_dir)
    _check_published(published, clean, defense, p["defense"]["name"])
    if p["kind"] == "watermark":
        defense.save_detector(ctx, subject, ctx.work_dir / "detector")
    save_images(published, ctx.work_dir / "images", names)
    if published is not clean:
        diff = max(int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max()) for a, c in zip(published, clean))
        ctx.extra["realised_linf_255"] = diff


def _check_published(published: list[Image], clean: list[Image], defense, name: str) -> None:
    if len(published) != len(clean):
        raise RuntimeError(f"defense {name} returned {len(published)} images for {len(clean)} inputs")
    budget = defense.budget_255()
    for i, (a, c) in enumerate(zip(published, clean)):
        if a.dtype != np.uint8 or a.shape != c.shape:
            raise RuntimeError(f"defense {name} returned image {i} as {a.dtype}{a.shape}, expected uint8{c.shape}")
        if budget is not None:
            linf = int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max())
            if linf > math.floor(budget + 1e-9):
                raise RuntimeError(f"defense {name} exceeded its budget on image {i}: L-inf {linf}/255 > {budget}/255")


def published_images(env: StageEnv, protect: Stage, subject) -> list[Image]:
    """The subject's set_B as its owner published it: a harden defense's owners publish unmodified photos."""
    if protect.params["kind"] == "harden":
        return subject.load("B", protect.params["resolution"])
    return load_images(env.store.path("protect", protect.key) / "images")


def run_compose(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    p = stage.params
    subject = subject_from_spec(p["subject"])
    published = published_images(env, env.dep(stage, "protect"), subject)
    clean_b = subject.load("B", p["resolution"])
    clean_c = subject.load("C", p["resolution"]) if subject.splits.get("C") else []
    sc = dict(p["scenario"])
    sc["transforms"] = tuple((n, tuple(tuple(kv) for kv in params)) for n, params in sc["transforms"])
    images, origin = compose_training_set(published, clean_b, clean_c, ScenarioSpec(**sc), ctx.rng())
    save_images(images, ctx.work_dir / "images")
    (ctx.work_dir / "origin.json").write_text(json.dumps(origin))
    ctx.extra["training_set"] = origin


def run_purify(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    """The attacker's purification (attacks/purification.py) of a composed training set: the scenario's transform
    chain from its first model transform on, model transforms through ``purify`` (their roles in ``ctx.models``),
    the others through ``apply``."""
    p = stage.params
    images = load_images(env.store.path("compose", env.dep(stage, "compose").key) / "images")
    models = {role: model_dir_of(env.store, env.stages[k]) for role, k in zip(p["model_roles"], stage.deps[1:])}
    rng = ctx.rng()
    for name, params in p["transforms"]:
        transform = TRANSFORMS.create(name, {k: v for k, v in params}, where=f"purify transform {name}")
        roles = transform.model_roles()
        if roles:
            ctx.models = {r: models[r] for r in roles}
            out = transform.purify(ctx, images, p["class_noun"])
        else:
            out = [transform.apply(img, rng) for img in images]
        if len(out) != len(images) or any(o.dtype != np.uint8 or o.shape != i.shape for o, i in zip(out, images)):
            raise RuntimeError(f"transform {name} returned {[(o.dtype, o.shape) for o in out]} for "
                               f"{len(images)} uint8 images of shape {images[0].shape}")
        images = out
    save_images(images, ctx.work_dir / "images")


def training_images(env: StageEnv, stage: Stage) -> list[Image]:
    """An attack's training set: its ``purify`` input where the scenario purifies, else its ``compose`` input."""
    kind = "purify" if any(env.stages[k].kind == "purify" for k in stage.deps) else "compose"
    return load_images(env.store.path(kind, env.dep(stage, kind).key) / "images")


def run_class_images(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    from attacks.dreambooth import generate_class_images

    p = stage.params
    images = generate_class_images(env.model_input(stage), p["prompt"], p["n"], ctx, p["sampler"], p["steps"], p["guidance"])
    save_images(images, ctx.work_dir / "images")


def run_attack(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    p = stage.params
    attack = _plugin(ATTACKS, p["attack"])
    images = training_images(env, stage)
    class_images: list[Image] = []
    if any(env.stages[k].kind == "class_images" for k in stage.deps):
        class_images = load_images(env.store.path("class_images", env.dep(stage, "class_images").key) / "images")
    attack.train(ctx, env.model_input(stage), images, p["instance_prompt"], p["class_prompt"], class_images,
                 ctx.work_dir / "trained", **p.get("words", {}))


def run_generate(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    from bench.models import generate, set_sampler

    p = stage.params
    attack = _plugin(ATTACKS, p["attack"])
    trained = env.store.path("attack", env.dep(stage, "attack").key) / "trained"
    pipe = set_sampler(attack.load_pipeline(env.model_input(stage), trained, ctx.device, env.allow_unsafe_weights),
                       p["sampler"])
    out = generate(pipe, p["prompts"], p["n_per_prompt"], p["steps"], p["guidance"], p["seed"], p["resolution"])
    _save_generated(out, ctx.work_dir)


def run_sample(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    """Images of the (unpersonalised) model a metric of target "model" measures."""
    from bench.models import generate, load_pipeline

    p = stage.params
    pipe = load_pipeline(env.model_input(stage), ctx.device, p["sampler"], env.allow_unsafe_weights)
    out = generate(pipe, p["prompts"], p["n_per_prompt"], p["steps"], p["guidance"], p["seed"], p["resolution"])
    _save_generated(out, ctx.work_dir)


def _save_generated(out: list[tuple[str, Image]], folder: Path) -> None:
    names = [f"{i:04d}.png" for i in range(len(out))]
    save_images([img for _, img in out], folder / "images", names)
    (folder / "prompts.json").write_text(json.dumps(dict(zip(names, [p for p, _ in out]))))


def run_measure(stage: Stage, env: StageEnv, ctx: RunContext) -> None:
    p = stage.params
    metric = _plugin(METRICS, p["metric"])
    subject = subject_from_spec(p["subject"])
    protect = env.dep(stage, "protect")
    ppath = env.store.path("protect", protect.key)
    inputs = MetricInputs(subject=subject, resolution=p["resolution"], defense=p["defense"])
    inputs.defense_dir = ppath
    if (ppath / "detector").is_dir():
        inputs.detector_dir = ppath / "detector"
    if p["target"] == "protected":
        inputs.protected = published_images(env, protect, subject)
        inputs.clean = subject.load("B", p["resolution"])
    else:
        source = "sample" if p["target"] == "model" else "generate"
        gpath = env.store.path(source, env.dep(stage, source).key)
        prompts = json.loads((gpath / "prompts.json").read_text())
        inputs.generated_names = sorted(prompts)
        if p.get("prompt") is not None:  # a per-prompt column: that prompt's images only
            inputs.generated_names = [n for n in inputs.generated_names if prompts[n] == p["prompt"]]
        inputs.generated = [load_png(gpath / "images" / n) for n in inputs.generated_names]
        inputs.prompts = [prompts[n] for n in inputs.generated_names]
        baseline = [k for k in stage.deps if env.stages[k].kind == "generate"][1:]
        if baseline:  # a needs_baseline metric of a watermark defense: the undefended run's images
            inputs.baseline_generated = load_images(env.store.path("generate", baseline[0]) / "images")
    out: dict[str, Any] = {"protocol": p["protocol"]}
    if metric.applies_to(subject):
        value = metric.compute(inputs)
        out["value"] = float(value)
        if not math.isfinite(value):
            out["reason"] = getattr(value, "reason", f"{metric.name} returned {float(value)} (it gave no reason)")
    else:
        out.update(value=math.nan, reason=metric.not_applicable_reason(subject))
    (ctx.work_dir / "value.json").write_text(json.dumps(out))


RUNNERS: dict[str, Callable[[Stage, StageEnv, RunContext], None]] = {
    "model": run_model, "protect": run_protect, "compose": run_compose, "purify": run_purify, "class_images": run_class_images,
    "attack": run_attack, "generate": run_generate, "sample": run_sample, "measure": run_measure,
}


# Linux's per-process kernel interface (procfs), built from the filesystem root rather than written as a path
_PROC_SELF = Path(os.sep, "proc", "self")
_STATUS, _CLEAR_REFS = _PROC_SELF / "status", _PROC_SELF / "clear_refs"


def reset_peak_memory() -> str:
    """Start a stage's peak-memory window: "stage" where Linux lets a process reset its peak RSS (writing 5 to
    /proc/self/clear_refs resets VmHWM), else "process" (the peak since the process started); also resets
    torch's CUDA peak counter."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return "stage"
    except OSError:
        return "process"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since ``reset_peak_memory`` where it could reset it), MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclass
class StageResult:
    key: str
    ok: bool
    error: str = ""
    record: dict | None = None
    retryable: bool = True  # False: bad input (a corrupt image, a wrong folder layout), the same on every attempt


def run_stage(stage: Stage, env: StageEnv) -> StageResult:
    """Run one stage into the store; errors become a result, never a crash of the driver."""
    store = env.store
    if store.is_done(stage.kind, stage.key):
        return StageResult(stage.key, True, record=store.record(stage.kind, stage.key))
    tmp = store.begin(stage.kind, stage.key)
    seed = int(stage.params.get("seed", 0))
    ctx = RunContext(seed=seed, device=env.device, profile=env.profile,
                     resolution=int(stage.params.get("resolution", 0) or 0), work_dir=tmp,
                     allow_unsafe_weights=env.allow_unsafe_weights, progress=env.progress)
    scope = reset_peak_memory()
    start = time.perf_counter()
    try:
        _seed_everything(seed)
        RUNNERS[stage.kind](stage, env, ctx)
    except Exception as e:  # recorded for the cell; the rest of the suite goes on
        store.abort(tmp)
        return StageResult(stage.key, False, error=_reason(e), retryable=not isinstance(e, (ImageError, DataError)))
    except BaseException:  # Ctrl-C, SystemExit: no half-written temp folder left behind
        store.abort(tmp)
        raise
    record = {"kind": stage.kind, "key": stage.key, "label": stage.label, "params": stage.params, "deps": list(stage.deps),
              "wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
              "peak_rss_scope": scope, "peak_gpu_mb": _peak_gpu_mb(), "extra": ctx.extra}
    store.commit(stage.kind, stage.key, tmp, record)
    return StageResult(stage.key, True, record=record)


def _reason(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _peak_gpu_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None
