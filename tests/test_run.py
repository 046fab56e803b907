"""End-to-end runs on the tiny profile: contract of `bench run`, cache, resume after a kill, failures, determinism,
and the harden / watermark data-flow paths."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from tests.conftest import MICRO, REPO, SHARED_DATA, write_suite


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_smoke_suite_contract_and_cached_rerun(out_dir, tmp_path):
    assert main(["run", "--suite", "smoke", "--profile", "tiny", "--out", str(out_dir)]) == 0
    s = summary(out_dir)
    assert s["cells_ok"] == 8 and s["cells_failed"] == 0 and s["failures"] == {}
    assert s["stages_run"] > 0 and s["stages_cached"] >= 1  # the copied base model
    csv = out_dir / "leaderboards" / "smoke.csv"
    df = pd.read_csv(csv)
    assert len(df) == 6  # defense x scenario x attack, and a worst-case row per defense
    worst = df[df.scenario == "(worst case)"].set_index("defense")
    assert set(worst.index) == {"none", "random-noise"} and (worst.attack == "(attacker's best)").all()
    sism = next(c for c in df.columns if c.startswith("subject-ism") and " " not in c)
    for d in worst.index:  # subject-ism: higher = the attacker got the subject; the worst case takes the max
        rows = df[(df.defense == d) & (df.scenario != "(worst case)")]
        assert worst.loc[d, sism] == rows[sism].max()
        assert worst.loc[d, f"{sism} worst_of"] == f"{rows.loc[rows[sism].idxmax(), 'scenario']} / dreambooth"
    for col in ["linf/255/protected-vs-clean", "brisque/pypi-brisque/native", "fdfr/dlib-hog-up1", "n", "config_hash", "code_rev"]:
        assert col in df.columns, col
    noise = df[df.defense == "random-noise"]
    assert (noise["linf/255/protected-vs-clean"] <= 6.375).all() and (noise["linf/255/protected-vs-clean"] >= 6).all()
    assert (df[df.defense == "none"]["linf/255/protected-vs-clean"] == 0).all()
    before = csv.read_bytes()
    assert main(["run", "--suite", "smoke", "--profile", "tiny", "--out", str(out_dir)]) == 0
    again = summary(out_dir)
    assert again["stages_run"] == 0 and again["stages_cached"] == s["stages_total"]
    assert csv.read_bytes() == before
    # every cell row carries provenance
    rows = sqlite3.connect(out_dir / "ledger.sqlite").execute("SELECT provenance FROM cells").fetchall()
    prov = json.loads(rows[0][0])
    assert prov["config_hash"] and prov["code_rev"] and prov["versions"]["torch"] and prov["weights_sha256"]


def _stage_dirs(out: Path) -> dict[str, float]:
    return {str(p.parent): p.stat().st_mtime_ns for p in (out / "cache").glob("*/*/done.json")}


def test_kill_and_resume_gives_the_same_leaderboard_and_bytes(out_dir, tmp_path):
    suite = write_suite(tmp_path, MICRO)
    ref_out = tmp_path / "ref"
    import shutil

    shutil.copytree(out_dir / "cache" / "model", ref_out / "cache" / "model")
    assert main(["run", "--suite", str(suite), "--out", str(ref_out)]) == 0

    cmd = [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite), "--out", str(out_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out_dir / "cache").glob("attack/*/done.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _stage_dirs(out_dir)
    assert any("/attack/" in k for k in done_before), "the run was killed before any attack finished"
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    s = summary(out_dir)
    finished = [k for k in done_before if Path(k).parent.name != "model"]  # the copied cache also holds the unused tiny:b
    assert s["stages_cached"] == len(finished) + 1  # nothing finished was recomputed (+1: the base model)
    assert s["stages_run"] == s["stages_total"] - s["stages_cached"] > 0
    after = _stage_dirs(out_dir)
    assert all(after[k] == v for k, v in done_before.items())
    a = pd.read_csv(ref_out / "leaderboards" / "micro.csv")
    b = pd.read_csv(out_dir / "leaderboards" / "micro.csv")
    from bench.leaderboard import COST_COLS  # measured wall time and memory: not part of the result

    pd.testing.assert_frame_equal(a.drop(columns=["code_rev", *COST_COLS], errors="ignore"),
                                  b.drop(columns=["code_rev", *COST_COLS], errors="ignore"))
    # same seed, same bytes: every generated image of the two runs is identical
    ga = sorted((ref_out / "cache" / "generate").glob("*/images/*.png"))
    gb = sorted((out_dir / "cache" / "generate").glob("*/images/*.png"))
    assert len(ga) == len(gb) > 0
    assert [p.read_bytes() for p in ga] == [p.read_bytes() for p in gb]


def _faces_root(tmp_path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for sid in ["good01", "bad02"]:
        for split in "ABC":
            d = root / sid / f"set_{split}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    (root / "bad02" / "set_B" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "empty03" / "set_A").mkdir(parents=True)  # a subject with an empty set_B (an empty folder is skipped)
    Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(root / "empty03" / "set_A" / "0000.png")
    return root


def test_bad_image_fails_only_its_subject(out_dir, tmp_path):
    root = _faces_root(tmp_path)
    suite = write_suite(tmp_path, MICRO)
    code = main(["run", "--suite", str(suite), "--out", str(out_dir), "--data", f"vggface2={root}"])
    assert code == 1
    s = summary(out_dir)
    assert s["cells_ok"] == 2 and s["cells_failed"] == 4
    for cell, reason in s["failures"].items():
        assert ("bad02" in cell and "0001.png" in reason) or ("empty03" in cell and "empty03/set_B" in reason)
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv")
    assert set(df["n"]) == {1} and set(df["n_failed"]) == {2}


def test_harden_and_watermark_paths(out_dir, tmp_path):
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none, test-harden, test-watermark]") \
                .replace("metrics: [linf, psnr, brisque]",
                         "metrics: [linf, watermark-detect-rate, watermark-auc, watermark-accuracy, watermark-tpr@fpr]")
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    from bench.runner import RunOptions, prepare
    from bench.stages import load_images

    plan = prepare(RunOptions(suite=str(suite), out=out_dir)).plan
    by_def = {c.keys["defense"]: c for c in plan.cells}
    harden_protect = [k for k in by_def["test-harden"].stages if plan.stages[k].kind == "protect"][0]
    attack = [plan.stages[k] for k in by_def["test-harden"].stages if plan.stages[k].kind == "attack"][0]
    assert harden_protect in attack.deps  # the hardened model is the attacker's base model
    assert (out_dir / "cache" / "protect" / harden_protect[:24] / "model" / "unet").is_dir()
    cls_h = [plan.stages[k] for k in attack.deps if plan.stages[k].kind == "class_images"][0]
    none_attack = [plan.stages[k] for k in by_def["none"].stages if plan.stages[k].kind == "attack"][0]
    cls_n = [plan.stages[k] for k in none_attack.deps if plan.stages[k].kind == "class_images"][0]
    assert cls_h.key != cls_n.key  # class images come from the hardened model
    wm_protect = [k for k in by_def["test-watermark"].stages if plan.stages[k].kind == "protect"
                  and plan.stages[k].params["defense"]["name"] == "test-watermark"][0]
    wdir = out_dir / "cache" / "protect" / wm_protect[:24]
    from bench.plugins import DEFENSES

    det = DEFENSES.get("test-watermark")
    from bench.stages import subject_from_spec

    marked = det.detect(wdir / "detector", load_images(wdir / "images"))
    clean = det.detect(wdir / "detector", subject_from_spec(plan.stages[wm_protect].params["subject"]).load("B", 64))
    assert marked.min() > 0.5 > clean.max()
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv").set_index("defense")
    col = "wm-detect/own-detector/threshold=0.5"
    assert np.isnan(df.loc["none", col]) and not np.isnan(df.loc["test-watermark", col])
    # two-class detection metrics: negatives are the undefended run of the same attack, shared with the none cell
    wm_measure = plan.stages[by_def["test-watermark"].measures["wm-auc/own-detector/neg=undefended-run"]]
    gens = [k for k in wm_measure.deps if plan.stages[k].kind == "generate"]
    none_gen = [k for k in by_def["none"].stages if plan.stages[k].kind == "generate"]
    assert len(gens) == 2 and gens[1] == none_gen[0] and gens[0] != gens[1]
    assert sum(st.kind == "generate" for st in plan.stages.values()) == 3  # no extra run for the negatives
    for c in ("wm-auc/own-detector/neg=undefended-run", "wm-accuracy/own-detector/threshold=0.5/neg=undefended-run",
              "wm-tpr@fpr=0.01/own-detector/neg=undefended-run"):
        assert np.isnan(df.loc["none", c]) and 0.0 <= df.loc["test-watermark", c] <= 1.0, c


@pytest.mark.skipif(not (SHARED_DATA / "faces").is_dir(), reason="../shared/data/faces not present")
def test_real_faces_smoke(out_dir, tmp_path):
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [{name: random-noise, eps: 8}]")
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), "--data", f"vggface2={SHARED_DATA / 'faces'}"]) == 0
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv")
    assert df["n"].tolist() == [2]  # both identities
    assert df["linf/255/protected-vs-clean"].tolist() == [8]


def test_dry_run_prints_sharing(capsys):
    assert main(["run", "--suite", "robustness", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "unique stage executions" in out and "naive per-cell" in out


def test_weights_are_pruned_and_recomputed_only_when_needed(out_dir, tmp_path):
    suite = write_suite(tmp_path, MICRO)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    attacks = list((out_dir / "cache" / "attack").iterdir())
    assert attacks and all((a / "pruned").exists() and not (a / "trained").exists() for a in attacks)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    assert summary(out_dir)["stages_run"] == 0
    # a consumer disappears (e.g. generation settings changed): its pruned attack is recomputed, nothing else
    import shutil

    gen = next((out_dir / "cache" / "generate").iterdir())
    shutil.rmtree(gen)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    s = summary(out_dir)
    assert s["stages_run"] == 2  # one attack + its generate; measures of that image set are still cached
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), "--keep-weights"]) == 0


def test_slurm_executor_through_submitit_debug_cluster(out_dir, tmp_path, capsys):
    suite = write_suite(tmp_path, MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none]"))
    profile = tmp_path / "cluster.yaml"
    profile.write_text("default: {partition: gpu, qos: normal, gpus: 1, cpus: 4, mem_gb: 16, time_min: 60}\n"
                       "measure: {partition: cpu, gpus: 0, cpus: 1, mem_gb: 2, group: 8}\n")
    code = main(["run", "--suite", str(suite), "--out", str(out_dir), "--executor", "slurm",
                 "--executor-opt", "cluster=debug", "--executor-opt", f"folder={tmp_path / 'logs'}",
                 "--executor-opt", f"profile={profile}", "--jobs", "64"])
    assert code == 0 and summary(out_dir)["cells_ok"] == 1
    jobs = sqlite3.connect(out_dir / "ledger.sqlite").execute("SELECT kind, job_id FROM stage_runs").fetchall()
    measure_jobs = {j for k, j in jobs if k == "measure"}
    # linf and psnr (of the protected images) are ready together: one job; brisque (of generations) comes later
    assert len([k for k, _ in jobs if k == "measure"]) == 3 and len(measure_jobs) == 2
    assert all(j.startswith("DEBUG_") for _, j in jobs)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), "--executor", "slurm",
                 "--executor-opt", "partitoin=gpu"]) == 2
    profile.write_text("measure: {partition: cpu, gpus: -1}\ncompsoe: {cpus: 1}\n")
    capsys.readouterr()
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), "--executor", "slurm",
                 "--executor-opt", f"profile={profile}"]) == 2
    assert f"cluster profile {profile}: unknown stage kind(s) ['compsoe']" in capsys.readouterr().err


def test_entry_point_plugins_are_loaded(monkeypatch):
    import importlib.metadata as md

    from bench.plugins import TRANSFORMS

    mod = type(sys)("thirdparty_transforms")
    sys.modules["thirdparty_transforms"] = mod

    def load():
        from bench.plugins import Transform

        @TRANSFORMS.register("thirdparty-invert")
        class Invert(Transform):
            def apply(self, image, rng):
                return 255 - image

    ep = md.EntryPoint(name="invert", value="thirdparty_transforms", group=TRANSFORMS.group)
    monkeypatch.setattr(ep.__class__, "load", lambda self: load())
    monkeypatch.setattr(md, "entry_points", lambda group=None: [ep] if group == TRANSFORMS.group else [])
    monkeypatch.setattr(TRANSFORMS, "_entry_points_loaded", False)
    try:
        assert "thirdparty-invert" in TRANSFORMS.names()
    finally:
        TRANSFORMS.unregister("thirdparty-invert")


@pytest.mark.skipif(not (SHARED_DATA / "faces").is_dir(), reason="../shared/data/faces not present")
def test_data_verify_cli(capsys, tmp_path):
    assert main(["data", "verify", f"vggface2={SHARED_DATA / 'faces'}", f"dreambooth={SHARED_DATA / 'dreambooth'}"]) == 0
    out = capsys.readouterr().out
    assert "0 missing, 0 mismatched" in out
    assert main(["data", "verify", f"dreambooth={tmp_path / 'nope'}"]) == 2


def test_every_registered_defense_runs_end_to_end(out_dir, tmp_path):
    """The per-method smoke run: every built-in defense through protect -> attack -> generate -> measure on tiny, with
    the parameters robustness gives it there (a defense whose paper budget needs weights these machines lack, such as
    GenWatermark's LPIPS, runs its explicit alternative: tests/test_core.py checks robustness names every defense)."""
    import yaml

    from bench.plugins import DEFENSES
    from bench.suites import load_suite, standard_defenses

    listed = yaml.safe_load((REPO / "bench" / "suites" / "robustness.yaml").read_text())["defenses"]
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", f"defenses: {json.dumps(listed)}") \
                .replace("metrics: [linf, psnr, brisque]", "metrics: [linf]")
    suite = write_suite(tmp_path, body)
    code = main(["run", "--suite", str(suite), "--out", str(out_dir)])
    s = summary(out_dir)
    assert code == 0, s["failures"]
    names = set(standard_defenses())
    entries = load_suite(str(suite), "tiny").defenses
    assert {d.name for d in entries} >= names and s["cells_ok"] == len(entries) >= 10
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv").set_index("defense")
    for d in entries:
        budget = d.create().budget_255()
        linf = df.loc[d.label, "linf/255/protected-vs-clean"]
        if budget is None:  # harden: the published photos are untouched
            assert linf == 0, d.label
        else:
            assert linf <= int(budget), (d.label, linf, budget)


def test_per_prompt_columns_measure_each_prompts_images(out_dir, tmp_path, monkeypatch):
    """`per_prompt: true` (Anti-DreamBooth reports FDFR/ISM per prompt): one column per prompt template, each on that
    prompt's images only; with equal images per prompt their mean is the all-prompts value."""
    import dataclasses

    from bench import profiles

    tiny = profiles.PROFILES["tiny"]
    two = dataclasses.replace(tiny, name="tiny-2prompts", generation=dataclasses.replace(
        tiny.generation, prompts=("a photo of {identifier} {class_noun}", "a dslr portrait of {identifier} {class_noun}")))
    monkeypatch.setitem(profiles.PROFILES, "tiny-2prompts", two)
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none]") \
                .replace("metrics: [linf, psnr, brisque]", "metrics: [brisque, {name: brisque, per_prompt: true, label: brisque-by-prompt}]")
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--profile", "tiny-2prompts", "--out", str(out_dir)]) == 0
    row = pd.read_csv(out_dir / "leaderboards" / "micro.csv").iloc[0]
    base = "brisque/pypi-brisque/native"
    a, b = row[f"{base}/prompt=a photo of {{identifier}} {{class_noun}}"], row[f"{base}/prompt=a dslr portrait of {{identifier}} {{class_noun}}"]
    assert a != b and (a + b) / 2 == pytest.approx(row[base], abs=2e-4)  # CSV keeps 4 decimals
    bad = write_suite(tmp_path, MICRO.replace("metrics: [linf, psnr, brisque]", "metrics: [{name: linf, per_prompt: true}]"),
                      "bad.yaml")
    assert main(["validate", str(bad)]) == 2  # linf measures protected images, not prompts'
