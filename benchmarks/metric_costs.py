"""Per-image cost (seconds) of each built-in metric, on the real faces of ../shared/data (512 px) and on the
same faces downscaled to 64 px (the tiny profile's resolution).

    .venv/bin/python benchmarks/metric_costs.py [--repeat 3]

Reports the median over ``repeat`` passes of the per-image time (total / #images) after a warm-up pass that
loads the models. ISM's reference embedding (set_A + set_B, computed once per subject and cached) is timed
separately as ``ism-reference``, per reference image.
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

from bench.plugins import MetricInputs  # noqa: E402
from bench.registry import build_params  # noqa: E402
from metrics import faces  # noqa: E402
from metrics.faces import Fdfr, Ism  # noqa: E402
from metrics.imperceptibility import Linf, Psnr, Ssim  # noqa: E402
from metrics.quality import Brisque  # noqa: E402

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


def per_image(fn: Callable[[], object], n: int, repeat: int) -> float:
    fn()  # warm-up: loads models
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def run(resolution: int | None, repeat: int) -> list[tuple[str, str, float]]:
    subject = FolderSubject(FACES / "n000050")
    images = subject.load("C", resolution) + FolderSubject(FACES / "n000033").load("C", resolution)
    label = f"{resolution or 512}px"
    inputs = MetricInputs(subject=subject, resolution=resolution or 512, generated=images,
                          protected=noised(images), clean=images)
    rows = []
    for cls in (Linf, Psnr, Ssim, Brisque, Fdfr, Ism):
        metric = cls(build_params(cls, {}, None, cls.__name__))
        rows.append((label, metric.protocol_id(), per_image(lambda: metric.compute(inputs), len(images), repeat)))

    n_ref = len(subject.load("A", None)) + len(subject.load("B", None))

    def reference() -> None:
        faces._REFERENCES.clear()
        faces.reference_embedding(subject)

    rows.append((label, "ism-reference (native 512 px, per A+B image)", per_image(reference, n_ref, repeat)))
    found = sum(1 for i in images if faces.detect_faces(i, 1))
    rows.append((label, f"(dlib HOG up1 finds a face in {found}/{len(images)} images)", float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not FACES.is_dir():
        sys.exit(f"real face data not found at {FACES}; nothing to measure")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # brisque 0.2 on numpy 2.3
    rows = run(None, args.repeat) + run(64, args.repeat)
    print(f"{'images':>7}  {'metric':<52} {'s/image':>9}")
    for label, name, sec in rows:
        print(f"{label:>7}  {name:<52} {'' if np.isnan(sec) else f'{sec:9.4f}'}")


if __name__ == "__main__":
    main()
