"""Per-image cost (seconds) of every registered metric that can run here (modules and weights present), on the
real faces of ../shared/data (512 px) and on the same faces downscaled to 64 px (the tiny profile's resolution).

    .venv/bin/python benchmarks/metric_costs.py [--repeat 3] [--cnn]

Reports the median over ``repeat`` passes of the per-image time (total / #images) after a warm-up pass that
loads the models; the face metrics' per-process detection/embedding caches are cleared before every pass, so each
pass pays for detection. Face-metric reference embeddings (computed once per subject and cached) are timed separately,
per reference image. ``--cnn`` adds the dlib CNN backend (~7 s per 512 px image on one CPU core). Metrics whose
weights are missing are listed with the reason (``bench weights fetch``). Utility metrics (target "model") need a
model's samples and are measured by a suite run, not here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plugins import METRICS, MetricInputs  # noqa: E402
from bench.registry import build_params, load_builtins  # noqa: E402
from metrics import faces  # noqa: E402

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


class FolderSubject:
    """Minimal subject: ``load(split, resolution)`` and ``fingerprint()`` over ``<root>/set_<split>``."""

    def __init__(self, root: Path) -> None:
        self.name, self.root = root.name, root

    def load(self, split: str, resolution: int | None) -> list[np.ndarray]:
        return [load_rgb(p, resolution) for p in sorted((self.root / f"set_{split}").glob("*.*"))]

    def fingerprint(self) -> str:
        return f"bench:{self.root}"


def load_rgb(path: Path, resolution: int | None) -> np.ndarray:
    with PILImage.open(path) as im:
        im = im.convert("RGB")
        if resolution is not None:
            im = im.resize((resolution, resolution), PILImage.Resampling.BICUBIC)
        return np.asarray(im)


def noised(images: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(i.astype(np.int16) + rng.integers(-6, 7, i.shape), 0, 255).astype(np.uint8) for i in images]


def clear_face_caches(references: bool = True) -> None:
    """Per-image detection/embedding caches; ``references``: also the per-subject reference embeddings."""
    faces._DETECTIONS.data.clear()
    faces._EMBEDDINGS.data.clear()
    if references:
        faces._REFERENCES.clear()


def per_image(fn: Callable[[], object], n: int, repeat: int) -> float:
    fn()  # warm-up: loads models
    times = []
    for _ in range(repeat):
        clear_face_caches(references=False)  # generated images pay for detection; references stay cached
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def variants(cnn: bool) -> list[tuple[str, dict]]:
    """(metric name, params) for every registered metric measurable on images; face metrics per backend."""
    load_builtins()
    out: list[tuple[str, dict]] = []
    for name, cls in METRICS.items():
        if cls.target == "model" or cls.needs_baseline or name.startswith("watermark"):
            continue
        if name in ("fdfr", "ism", "ims", "face-det-score"):
            out += [(name, {"backend": b}) for b in ("dlib-hog", "insightface") + (("dlib-cnn",) if cnn else ())]
        else:
            out.append((name, {}))
    return out


def run(resolution: int | None, repeat: int, cnn: bool) -> list[tuple[str, str, float]]:
    subject = FolderSubject(FACES / "n000050")
    images = subject.load("C", resolution) + FolderSubject(FACES / "n000033").load("C", resolution)
    label = f"{resolution or 512}px"
    inputs = MetricInputs(subject=subject, resolution=resolution or 512, generated=images,
                          protected=noised(images), clean=images)
    rows = []
    for name, params in variants(cnn):
        cls = METRICS.get(name)
        metric = cls(build_params(cls, params, None, name))
        reason = cls.missing_modules() or metric.missing_weights()
        if reason:
            rows.append((label, f"{name} {params or ''}: unavailable ({reason[:70]}...)", float("nan")))
            continue
        if cls.target == "generated" and name in ("ism", "ims"):
            refs = ("A", "B") if name == "ism" else ("C",)
            n_ref = sum(len(subject.load(r, None)) for r in refs)

            def reference(metric=metric) -> None:
                clear_face_caches()
                metric.compute(MetricInputs(subject=subject, resolution=512, generated=images[:1]))

            rows.append((label, f"{metric.protocol_id()} reference (per image, + 1 generated)",
                         per_image(reference, n_ref, repeat)))
        rows.append((label, metric.protocol_id(), per_image(lambda: metric.compute(inputs), len(images), repeat)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cnn", action="store_true", help="also time the dlib CNN face backend (slow)")
    args = parser.parse_args()
    if not FACES.is_dir():
        sys.exit(f"real face data not found at {FACES}; nothing to measure")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # brisque 0.2 on numpy 2.3
    rows = run(None, args.repeat, args.cnn) + run(64, args.repeat, args.cnn)
    print(f"{'images':>7}  {'metric':<70} {'s/image':>9}")
    for label, name, sec in rows:
        print(f"{label:>7}  {name:<70} {'' if np.isnan(sec) else f'{sec:9.4f}'}")


if __name__ == "__main__":
    main()
