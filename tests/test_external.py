"""Protections made elsewhere (defenses/external.py): `external` reads each subject's published set_B from a folder,
checks it against the clean set (size, realised L-inf, a declared budget) and runs like any defense; `external-model`
uses a hardened model made elsewhere as the attacker's base model (issue 16)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.datasets import SyntheticDataset
from bench.images import save_png
from bench.plugins import DEFENSES, RunContext
from bench.registry import ConfigError, build_params
from tests.conftest import MICRO, write_suite

SUBJECT = SyntheticDataset(build_params(SyntheticDataset, {"num_subjects": 1}, None, "t")).subjects(None)[0]


def publish(folder: Path, delta: int, layout: str = "set_B") -> Path:
    """The subject's set_B at native size with a +-delta checkerboard, as an outside tool would publish it."""
    place = folder / SUBJECT.id / layout if layout else folder / SUBJECT.id
    for name, img in zip(SUBJECT.file_names("B"), SUBJECT.load("B", None)):
        sign = np.where((np.indices(img.shape[:2]).sum(0) % 2)[..., None] == 0, 1, -1)
        save_png(np.clip(img.astype(int) + delta * sign, 0, 255).astype(np.uint8), place / f"{Path(name).stem}.png")
    return folder


def external(**params):
    cls = DEFENSES.get("external")
    return cls(build_params(cls, params, None, "t"))


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(seed=0, device="cpu", profile="tiny", resolution=64, work_dir=tmp_path)


def test_external_reads_checks_and_fits_the_published_set(tmp_path):
    clean = SUBJECT.load("B", 64)
    for layout in ("set_B", ""):
        folder = publish(tmp_path / f"pub{layout}", 5, layout)
        c = ctx(tmp_path)
        out = external(folder=str(folder), eps=5).protect(c, clean, SUBJECT, None)
        assert c.extra["external_linf_255"] == 5 and len(out) == 4
        assert all(o.shape == x.shape and o.dtype == np.uint8 and not np.array_equal(o, x) for o, x in zip(out, clean))
    folder = publish(tmp_path / "over", 9)
    with pytest.raises(ValueError, match=r"\.png: L-inf distance to its clean original is 9/255, over the declared budget eps=8"):
        external(folder=str(folder), eps=8).protect(ctx(tmp_path), clean, SUBJECT, None)
    first = sorted((folder / SUBJECT.id / "set_B").iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"no published version of synthetic/{SUBJECT.id} set_B image .*expected"):
        external(folder=str(folder)).protect(ctx(tmp_path), clean, SUBJECT, None)
    save_png(np.zeros((100, 80, 3), np.uint8), first)
    with pytest.raises(ValueError, match="80x100 px, its clean original .* 512x512 px"):
        external(folder=str(folder)).protect(ctx(tmp_path), clean, SUBJECT, None)
    with pytest.raises(ConfigError, match="required|missing"):
        build_params(DEFENSES.get("external"), {}, None, "defenses[0]")
    assert "does not exist" in external(folder=str(tmp_path / "nope")).missing_weights()


def test_external_defenses_run_end_to_end_and_key_on_file_content(out_dir, tmp_path, tiny_model_a, capsys):
    folder = publish(tmp_path / "published", 6)
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]",
                         f"defenses: [none, {{name: external, folder: '{folder}', eps: 8, tool: checkerboard}}, "
                         f"{{name: external-model, model: '{tiny_model_a}'}}]").replace(
        "metrics: [linf, psnr, brisque]", "metrics: [linf]")
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv").set_index("defense")
    assert len(df) == 3 and df["linf/255/protected-vs-clean"].max() <= 8
    ext = df.loc[[d for d in df.index if d.startswith("external(")][0]]
    assert ext["linf/255/protected-vs-clean"] >= 1  # the checkerboard survives the resize to 64 px
    records = [json.loads(p.read_text()) for p in (out_dir / "cache" / "protect").glob("*/done.json")]
    assert any(r.get("extra", {}).get("external_linf_255") == 6 for r in records) or \
        any("external_linf_255" in json.dumps(r) for r in records)
    pointer = [p for p in (out_dir / "cache" / "protect").glob("*/model.json")]
    assert len(pointer) == 1 and json.loads(pointer[0].read_text())["path"] == str(tiny_model_a.resolve())
    capsys.readouterr()
    # same files: nothing recomputed; one file changed: its protect stage (and what follows) recomputed
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    assert json.loads((out_dir / "summary.json").read_text())["stages_run"] == 0
    publish(folder, 4)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    assert json.loads((out_dir / "summary.json").read_text())["stages_run"] >= 4
    # an external model that is not there: refused before anything runs, listed by validate
    missing = write_suite(tmp_path, body.replace(str(tiny_model_a), str(tmp_path / "no-model")), "missing.yaml")
    assert main(["run", "--suite", str(missing), "--out", str(tmp_path / "o2")]) == 2
    assert "external-model" in capsys.readouterr().err
    assert main(["validate", str(missing)]) == 0
    assert "cannot run here" in capsys.readouterr().out
