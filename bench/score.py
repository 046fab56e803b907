"""``bench score``: metrics on folders the harness did not make (a paper's released protected images, images from a
tool we do not implement, generations of a model trained elsewhere), under the same protocol ids as a run and with the
same numbers on the same images (tests/test_score.py), no fine-tuning.

Per subject the value over all its images (the number a run reports for a cell) and one value per image.
Subjects: ``--subject-layout NAME=ROOT`` scores ``IMAGES/<subject id>/`` against that subject of dataset NAME
(references, clean set_B), or ``--reference DIR`` scores ``IMAGES`` against one subject whose references are the
images of DIR (every split). Metrics of protected images pair each image with the clean image of the same file stem
(``--clean DIR``, else the subject's set_B). A ``prompts.json`` beside generated images ({file name: prompt}, as a
run's generate stage writes it) gives their prompts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.datasets import IMAGE_SUFFIXES, Subject
from bench.images import ImageError, load_image
from bench.plugins import DATASETS, MetricInputs
from bench.profiles import get_profile
from bench.registry import ConfigError, load_builtins
from bench.suites import Entry, _metric_entry

ALL = "(all)"  # the image column of a subject's aggregate row


@dataclass
class ScoreJob:
    subject: Subject
    images: dict[str, Path]  # file name -> path, sorted by name
    clean: dict[str, Path]  # file stem -> clean image (protected-image metrics)
    prompts: dict[str, str]


def parse_metric(text: str, profile: str) -> Entry:
    """``ism`` or a YAML mapping as in a suite, ``{name: ism, backend: insightface}``; validated like a suite entry
    (parameters, profile overrides, missing weights refused with the fetch command)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--metric {text!r}: invalid YAML ({e})") from None
    entry = _metric_entry(raw, f"--metric {text!r}", profile)
    if entry.unavailable:
        raise ConfigError(entry.unavailable)
    cls = entry.plugin_cls
    if cls.target == "model":
        raise ConfigError(f"--metric {entry.name}: measures samples of a base model with its own prompt list; "
                          f"score those samples with a metric of generated images, or run a suite")
    if cls.needs_baseline or getattr(cls, "needs_detector", False):
        raise ConfigError(f"--metric {entry.name}: needs a watermark defense's detector and the undefended run's "
                          f"generations; it can only be computed in a run")
    return entry


def image_files(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` (not recursive, hidden files skipped) by name; ConfigError when there are none."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: " + ("a file, not a folder" if folder.exists() else "no such folder"))
    files = {p.name: p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    if not files:
        raise ConfigError(f"{folder}: no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    return files


def _prompts(folder: Path) -> dict[str, str]:
    path = folder / "prompts.json"
    if not path.is_file():
        return {}
    try:
        prompts = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ConfigError(f"{path}: expected {{image file name: prompt}}")
    return prompts


def folder_subject(reference: Path, class_noun: str) -> Subject:
    """One subject whose every split is the images of ``reference`` (an identity metric's mean reference embedding
    is unchanged by listing the same images in two splits)."""
    refs = tuple(image_files(reference).values())
    return Subject("folder", reference.name, class_noun, {"A": refs, "B": refs, "C": refs},
                   folders={s: reference for s in "ABC"})


def plan_jobs(images: Path, reference: Path | None, layout: tuple[str, Path | None] | None, clean: Path | None,
              class_noun: str) -> list[ScoreJob]:
    if (reference is None) == (layout is None):
        raise ConfigError("bench score: give exactly one of --reference DIR (one subject) or --subject-layout "
                          "NAME=ROOT (IMAGES/<subject id>/ per subject of dataset NAME)")
    if reference is not None:
        subject = folder_subject(reference, class_noun)
        return [ScoreJob(subject, image_files(images), _clean(clean), _prompts(images))]
    name, root = layout  # type: ignore[misc]
    load_builtins()
    try:
        subjects = {s.id: s for s in DATASETS.create(name, where=f"--subject-layout {name}").subjects(root)}
    except ValueError as e:  # DataError
        raise ConfigError(f"--subject-layout {name}={root}: {e}") from None
    if not images.is_dir():
        raise ConfigError(f"--images {images}: no such folder")
    folders = sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    unknown = [f.name for f in folders if f.name not in subjects]
    if unknown or not folders:
        raise ConfigError(f"--images {images}: expected one folder per subject of {name} "
                          f"(e.g. {next(iter(subjects))}/); " + (f"unknown subject(s) {unknown}" if unknown else
                                                                 "found none"))
    return [ScoreJob(subjects[f.name], image_files(f), _clean(clean / f.name if clean else None), _prompts(f))
            for f in folders]


def _clean(folder: Path | None) -> dict[str, Path]:
    return {p.stem: p for p in image_files(folder).values()} if folder is not None else {}


def _load(path: Path) -> Any:
    try:
        return load_image(path)
    except ImageError as e:
        raise ConfigError(str(e)) from None


def _inputs(job: ScoreJob, names: list[str], target: str, resolution: int) -> MetricInputs:
    inputs = MetricInputs(subject=job.subject, resolution=resolution)
    images = [_load(job.images[n]) for n in names]
    if target == "protected":
        inputs.protected = images
        inputs.clean = [_clean_pair(job, n, img.shape, resolution) for n, img in zip(names, images)]
    else:
        inputs.generated, inputs.generated_names = images, names
        inputs.prompts = [job.prompts.get(n, "") for n in names]
    return inputs


def _clean_pair(job: ScoreJob, name: str, shape: tuple[int, ...], resolution: int) -> Any:
    stem = Path(name).stem
    if job.clean:
        if stem not in job.clean:
            raise ConfigError(f"{job.images[name]}: no clean image named {stem}.* in the --clean folder")
        img = _load(job.clean[stem])
    else:
        by_stem = {Path(n).stem: i for i, n in enumerate(job.subject.file_names("B"))}
        if stem not in by_stem:
            raise ConfigError(f"{job.images[name]}: subject {job.subject.key()} has no set_B image named {stem}.*; "
                              f"give the originals with --clean DIR")
        img = job.subject.load("B", resolution if shape[0] == shape[1] == resolution else None)[by_stem[stem]]
    if img.shape != shape:
        raise ConfigError(f"{job.images[name]}: {shape[1]}x{shape[0]} px, its clean original {img.shape[1]}x"
                          f"{img.shape[0]} px: a protected image must keep its original's size")
    return img


def score(jobs: list[ScoreJob], metrics: list[Entry], profile: str) -> list[dict[str, Any]]:
    """Rows ``{subject, image, <protocol id>: value, ...}``: per subject the aggregate row (image ``(all)``, the
    value a run reports) then one row per image. NaN where the metric does not apply or finds nothing."""
    resolution = get_profile(profile).resolution
    rows = []
    for job in jobs:
        names = list(job.images)
        agg: dict[str, Any] = {"subject": job.subject.key(), "image": ALL, "n_images": len(names)}
        per = [{"subject": job.subject.key(), "image": n, "n_images": 1} for n in names]
        for entry in metrics:
            metric = entry.create()
            pid = metric.protocol_id()
            if not metric.applies_to(job.subject):
                agg[pid] = math.nan
                for row in per:
                    row[pid] = math.nan
                continue
            agg[pid] = float(metric.compute(_inputs(job, names, metric.target, resolution)))
            for row, name in zip(per, names):
                row[pid] = _per_image(metric, _inputs(job, [name], metric.target, resolution))
        rows += [agg] + per
    return rows


def _per_image(metric: Any, inputs: MetricInputs) -> float:
    """One image's value; NaN where the protocol has none for a lone image (e.g. a set-level distribution metric)."""
    try:
        return float(metric.compute(inputs))
    except ValueError:
        return math.nan
