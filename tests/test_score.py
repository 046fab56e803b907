"""`bench score` (bench/score.py): folders the harness did not make, scored under the same protocol ids with the same
numbers as a run on the same images (issue 16)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.images import save_png
from tests.conftest import MICRO, write_suite

SUITE = MICRO.replace("metrics: [linf, psnr, brisque]", "metrics: [linf, psnr, brisque, subject-ism]")
GEN_COLS = ("brisque/pypi-brisque/native", "subject-ism/synthid-v1/ref=AB")
PROT_COLS = ("linf/255/protected-vs-clean", "psnr/skimage/protected-vs-clean")


def run_values(out: Path, protocol: str) -> set[float]:
    """Every value the run measured under ``protocol`` (its measure stages' value.json)."""
    values = [json.loads(p.read_text()) for p in (out / "cache" / "measure").glob("*/value.json")]
    return {v["value"] for v in values if v["protocol"] == protocol}


@pytest.fixture(scope="module")
def run_out(tmp_path_factory, warm_models) -> Path:
    d = tmp_path_factory.mktemp("score")
    out = d / "out"
    shutil.copytree(warm_models, out / "cache" / "model")
    assert main(["run", "--suite", str(write_suite(d, SUITE)), "--out", str(out), "--keep-weights"]) == 0
    return out


def test_score_equals_the_run_on_the_same_images(run_out, tmp_path):
    """The run's published images and generations, scored from folders: the same values to the last bit."""
    prot_dir = tmp_path / "prot" / "synth-00"
    noise = [d for d in (run_out / "cache" / "protect").glob("*/done.json") if '"random-noise"' in d.read_text()]
    shutil.copytree(noise[0].parent / "images", prot_dir)
    out_csv = tmp_path / "prot.csv"
    assert main(["score", "--metric", "linf", "--metric", "psnr", "--images", str(prot_dir.parent),
                 "--subject-layout", "synthetic", "--profile", "tiny", "--out", str(out_csv)]) == 0
    scored = pd.read_csv(out_csv, float_precision="round_trip")
    agg = scored[scored.image == "(all)"].iloc[0]
    for col in PROT_COLS:
        assert agg[col] in run_values(run_out, col) and math.isfinite(agg[col]), col
    per = scored[scored.image != "(all)"]
    assert len(per) == 4 and per[PROT_COLS[0]].max() == agg[PROT_COLS[0]] == 8
    got: dict[str, set[float]] = {c: set() for c in GEN_COLS}
    for gdir in (run_out / "cache" / "generate").glob("*/images"):  # the two cells' generations
        gen_dir = tmp_path / gdir.parent.name / "synth-00"
        shutil.copytree(gdir, gen_dir)
        shutil.copy(gdir.parent / "prompts.json", gen_dir / "prompts.json")
        csv = tmp_path / f"{gdir.parent.name}.csv"
        assert main(["score", "--metric", "brisque", "--metric", "subject-ism", "--images", str(gen_dir.parent),
                     "--subject-layout", "synthetic", "--profile", "tiny", "--out", str(csv)]) == 0
        row = pd.read_csv(csv, float_precision="round_trip").query("image == '(all)'").iloc[0]
        for c in GEN_COLS:
            got[c].add(float(row[c]))
    for c in GEN_COLS:
        assert got[c] == run_values(run_out, c) and len(got[c]) == 2, c


def test_score_against_a_reference_folder_and_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref, imgs, clean = tmp_path / "ref", tmp_path / "imgs", tmp_path / "clean"
    for i in range(2):
        base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        save_png(base, ref / f"r{i}.png")
        save_png(base, clean / f"x{i}.png")
        save_png(np.clip(base.astype(int) + 3, 0, 255).astype(np.uint8), imgs / f"x{i}.png")
    csv = tmp_path / "s.csv"
    assert main(["score", "--metric", "linf", "--metric", "{name: psnr}", "--images", str(imgs), "--reference", str(ref),
                 "--clean", str(clean), "--out", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df.image) == ["(all)", "x0.png", "x1.png"] and (df["linf/255/protected-vs-clean"] <= 3).all()
    assert df["linf/255/protected-vs-clean"].iloc[0] == 3
    # unknown metric, a watermark metric, no subject given, a size mismatch: exit 2 naming the problem
    assert main(["score", "--metric", "ismm", "--images", str(imgs), "--reference", str(ref)]) == 2
    assert "did you mean 'ism'" in capsys.readouterr().err
    assert main(["score", "--metric", "linf", "--images", str(imgs)]) == 2
    assert "--reference DIR" in capsys.readouterr().err
    save_png(np.zeros((80, 80, 3), np.uint8), clean / "x1.png")
    assert main(["score", "--metric", "linf", "--images", str(imgs), "--reference", str(ref), "--clean", str(clean)]) == 2
    err = capsys.readouterr().err
    assert "x1.png" in err and "must keep its original's size" in err
    assert math.isfinite(df["psnr/skimage/protected-vs-clean"].iloc[0])
