"""Trust nothing on disk: damaged cache artifacts are detected and recomputed (never used), `bench verify` finds and
removes them, a damaged ledger is set aside and rebuilt, an unusable --out or an empty grid exits 2."""
from __future__ import annotations

import json
from pathlib import Path

from bench.cli import main
from tests.conftest import MICRO, write_suite


def _leaderboard(out: Path) -> str:
    """The leaderboard without the measured cost columns (a recomputed protect stage takes another wall time)."""
    import pandas as pd

    from bench.leaderboard import COST_COLS

    df = pd.read_csv(out / "leaderboards" / "micro.csv")
    return df.drop(columns=[c for c in COST_COLS if c in df]).to_csv(index=False)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _stage(out: Path, kind: str, pred=lambda rec: True) -> Path:
    for done in sorted((out / "cache" / kind).glob("*/done.json")):
        if pred(json.loads(done.read_text())):
            return done.parent
    raise AssertionError(f"no {kind} stage")


def test_damaged_artifacts_are_recomputed_not_used(out_dir, tmp_path, capsys):
    suite = write_suite(tmp_path, MICRO)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    clean_board = _leaderboard(out_dir)
    # an edited metric value, an image deleted from a published set, deleted prior-preservation images
    linf = _stage(out_dir, "measure", lambda r: r["params"]["protocol"].startswith("linf")
                  and r["params"]["defense"] == "random-noise")
    (linf / "value.json").write_text(json.dumps({"protocol": "linf", "value": 99.0}))
    protect = _stage(out_dir, "protect", lambda r: r["params"]["defense"]["name"] == "random-noise")
    sorted((protect / "images").glob("*.png"))[0].unlink()
    cls = _stage(out_dir, "class_images")
    for f in (cls / "images").glob("*.png"):
        f.unlink()
    assert main(["verify", "--out", str(out_dir)]) == 1
    report = capsys.readouterr().out
    assert str(linf / "value.json") in report and "3 damaged" in report
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    summary = _summary(out_dir)
    assert summary["stages_run"] == 3 and len(summary["damaged_artifacts_recomputed"]) == 3
    assert "recomputing" in capsys.readouterr().err
    assert _leaderboard(out_dir) == clean_board  # the 99 never reached a row
    assert main(["verify", "--out", str(out_dir)]) == 0


def test_damaged_weights_are_caught_before_a_new_stage_reads_them(out_dir, tmp_path, capsys):
    """Flipped bytes in a cached model's weights (same size): the next stage that loads them gets a recomputed
    model, and the row's weight hash is the one of the bytes actually used."""
    suite = write_suite(tmp_path, MICRO)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    model = _stage(out_dir, "model", lambda r: r["params"]["ref"] == "tiny:a")
    weights = model / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    recorded = json.loads((model / "done.json").read_text())["extra"]["weights_sha256"]
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0xFF
    weights.write_bytes(bytes(blob))
    more = write_suite(tmp_path, MICRO.replace("max_train_steps: 4", "max_train_steps: 5"), "more.yaml")
    assert main(["run", "--suite", str(more), "--out", str(out_dir)]) == 0
    assert any("diffusion_pytorch_model.safetensors" in r for r in _summary(out_dir)["damaged_artifacts_recomputed"].values())
    assert json.loads((model / "done.json").read_text())["extra"]["weights_sha256"] == recorded
    assert main(["verify", "--out", str(out_dir)]) == 0


def test_verify_fix_deletes_damaged_artifacts(out_dir, tmp_path, capsys):
    suite = write_suite(tmp_path, MICRO)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    gen = _stage(out_dir, "generate")
    (gen / "prompts.json").write_text("{}")
    assert main(["verify", "--out", str(out_dir), "--fix"]) == 0
    assert "1 damaged and deleted" in capsys.readouterr().out and not gen.exists()
    assert main(["verify", "--out", str(out_dir)]) == 0


def test_damaged_ledger_is_set_aside_and_rebuilt(out_dir, tmp_path, capsys):
    suite = write_suite(tmp_path, MICRO)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    board = _leaderboard(out_dir)
    (out_dir / "ledger.sqlite").write_bytes(bytes(range(256)) * 64)
    assert main(["leaderboard", "--out", str(out_dir)]) == 0  # no traceback: set aside, empty
    assert "set aside" in capsys.readouterr().err
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    assert _summary(out_dir)["stages_run"] == 0 and _leaderboard(out_dir) == board
    assert len(list(out_dir.glob("ledger.sqlite.damaged-*"))) == 1


def test_unusable_out_and_empty_grid_exit_2(tmp_path, capsys):
    suite = write_suite(tmp_path, MICRO)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "under"):
        assert main(["run", "--suite", str(suite), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "cannot write results there" in err and "Traceback" not in err
    empty = write_suite(tmp_path, MICRO.replace("seeds: [0]", "seeds: []"), "empty.yaml")
    assert main(["run", "--suite", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "non-empty list" in capsys.readouterr().err


def test_data_path_that_is_a_file_and_huge_image_warning(tmp_path, capsys):
    import warnings

    import numpy as np
    from PIL import Image

    from bench.images import ImageError, load_image

    a_file = tmp_path / "faces.zip"
    a_file.write_text("x")
    assert main(["run", "--suite", "smoke", "--data", f"vggface2={a_file}", "--out", str(tmp_path / "o")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # over our limit and PIL's warning threshold, under its error
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((side, 8), np.uint8)).resize((side, side)).save(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            load_image(big)
            raise AssertionError("a huge image was accepted")
        except ImageError as e:
            assert "big.png" in str(e) and "megapixels" in str(e)


def test_validate_and_data_verify_decode_every_image(tmp_path, capsys):
    """`bench validate --data` and `bench data verify` open every image a run would open and name each bad file
    (exit 1); an empty subject folder is skipped with a warning, not planned."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for split in ("A", "B"):
        (root / "n001" / f"set_{split}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "n001" / f"set_{split}" / f"{i}.png")
    (root / "n002" / "set_A").mkdir(parents=True)  # an empty subject
    good = write_suite(tmp_path, MICRO)
    assert main(["validate", str(good), "--data", f"vggface2={root}"]) == 0
    out = capsys.readouterr()
    assert "cells: 2" in out.out and "n002" in out.err and "skipped" in out.err  # one subject x two defenses
    broken = root / "n001" / "set_B" / "1.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    for argv in (["validate", str(good)], ["run", "--suite", str(good), "--dry-run"]):
        assert main([*argv, "--data", f"vggface2={root}"]) == 1
        assert str(broken) in capsys.readouterr().err
    assert main(["data", "verify", f"vggface2={root}"]) == 1
    out = capsys.readouterr().out
    assert str(broken) in out and "not in the manifest: n001/set_A/0.png" in out


def test_misspelt_data_name_blames_the_command_line(tmp_path, capsys):
    suite = write_suite(tmp_path, MICRO)
    assert main(["run", "--suite", str(suite), "--data", f"vgface2={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--data vgface2={tmp_path}" in err and "did you mean 'vggface2'" in err and str(suite) not in err


def test_missing_checkpoint_is_refused_before_anything_runs(tmp_path, capsys):
    """A paper-profile run without its base model: exit 2 with the fetch hint said once (--dry-run too); `bench
    validate` says the suite is well formed (exit 0) and lists what is missing here with the same hint."""
    for argv in (["run", "--suite", "smoke", "--profile", "paper", "--dry-run"],
                 ["run", "--suite", "smoke", "--profile", "paper", "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("not in the local Hugging Face cache") == 1 and "huggingface-cli download" in err, err
    assert not (tmp_path / "o" / "cache").exists()
    assert main(["validate", "smoke", "--profile", "paper"]) == 0
    out = capsys.readouterr().out
    assert "valid (well formed)" in out and "cannot run here" in out
    assert out.count("not in the local Hugging Face cache") == 1 and "huggingface-cli download" in out
    assert main(["validate", "smoke", "--profile", "tiny"]) == 0
    assert "runs here at the tiny profile" in capsys.readouterr().out
