from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.cli import configure_threads, quiet_libraries  # noqa: E402

configure_threads()
quiet_libraries()

import tests.plugins_for_tests  # noqa: E402,F401  (registers the test-only harden/watermark defenses)

MICRO = """
name: micro
datasets: [{name: synthetic, num_subjects: 1}]
defenses: [none, {name: random-noise, eps: 8}]
scenarios: [clean]
attacks: [{name: dreambooth, max_train_steps: 4, num_class_images: 2}]
metrics: [linf, psnr, brisque]
seeds: [0]
"""


def write_suite(folder: Path, body: str, name: str = "suite.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(textwrap.dedent(body))
    return p


@pytest.fixture(scope="session")
def warm_models(tmp_path_factory) -> Path:
    """Build the tiny base models once (as `model` stages) for every end-to-end test to copy."""
    from bench.cli import main

    d = tmp_path_factory.mktemp("warm")
    suite = write_suite(d, MICRO.replace("scenarios: [clean]", "scenarios: [clean, model-mismatch]")
                        .replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none]")
                        .replace("metrics: [linf, psnr, brisque]", "metrics: [linf]"))
    assert main(["run", "--suite", str(suite), "--out", str(d / "out")]) == 0
    return d / "out" / "cache" / "model"


@pytest.fixture
def out_dir(tmp_path, warm_models) -> Path:
    out = tmp_path / "out"
    shutil.copytree(warm_models, out / "cache" / "model")
    return out


@pytest.fixture(scope="session")
def tiny_model_a(warm_models) -> Path:
    """The tiny profile's `tiny:a` base model folder (built once by `warm_models`, with the profile's pre-training)."""
    import json

    for stage in warm_models.iterdir():
        if json.loads((stage / "done.json").read_text())["params"]["ref"] == "tiny:a":
            return stage / "model"
    raise AssertionError("warm_models has no tiny:a")
