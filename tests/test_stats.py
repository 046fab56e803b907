"""Confidence intervals, paired tests and the leaderboard's reasons for missing values (bench/stats.py,
bench/leaderboard.py): simulations with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.leaderboard import compare_frame, leaderboard_frame, render_markdown
from bench.stats import bootstrap_ci, paired_test


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    """Subjects with their own offset (sd 1) and seeds around it (sd 0.5): the two-stage bootstrap's 95% interval
    contains the true mean (0) in about 95% of 400 simulated studies of 12 subjects x 3 seeds."""
    rng = np.random.default_rng(1)
    hits, widths = 0, []
    for _ in range(400):
        offsets = rng.normal(0, 1, 12)
        groups = [o + rng.normal(0, 0.5, 3) for o in offsets]
        lo, hi = bootstrap_ci(groups, n_boot=500, seed=int(rng.integers(1 << 30)))
        hits += lo <= 0 <= hi
        widths.append(hi - lo)
    assert 0.88 <= hits / 400 <= 0.99, hits
    # about 2 x 1.96 x the standard error of a mean of 12 subject means (sd sqrt(1 + 0.25/3))
    assert 1.0 < np.mean(widths) < 1.4


def test_one_subject_several_seeds_and_degenerate_cases():
    lo, hi = bootstrap_ci([np.array([1.0, 2.0, 3.0, 4.0])])  # one subject: the seeds are resampled
    assert lo < 2.5 < hi and lo >= 1 and hi <= 4
    assert bootstrap_ci([np.array([1.0, 2.0])]) == bootstrap_ci([np.array([1.0, 2.0])])  # seeded: deterministic
    assert all(math.isnan(x) for x in bootstrap_ci([np.array([1.0])]))  # one value: no interval
    assert all(math.isnan(x) for x in bootstrap_ci([np.array([1.0, math.inf])]))
    assert bootstrap_ci([np.array([3.0]), np.array([3.0])]) == (3.0, 3.0)


def _pairs(rng, n: int, shift: float) -> tuple[dict, dict]:
    base = rng.normal(0, 1, n)  # subjects differ a lot; the defenses differ by ``shift`` plus noise
    a = {(f"s{i}", 0): base[i] + rng.normal(0, 0.3) for i in range(n)}
    b = {(f"s{i}", 0): base[i] + shift + rng.normal(0, 0.3) for i in range(n)}
    return a, b


def test_paired_test_finds_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(2)
    found = sum(bool(paired_test(*_pairs(rng, 15, 0.4), n_boot=500).significant) for _ in range(100))
    false = sum(bool(paired_test(*_pairs(rng, 15, 0.0), n_boot=500).significant) for _ in range(100))
    assert found >= 90, found  # 0.4 / (0.3 sqrt 2) = 0.94 sd of the differences: power near 1 with 15 pairs
    assert false <= 12, false  # nominal 5%
    t = paired_test(*_pairs(np.random.default_rng(3), 15, 0.4))
    assert t.n == 15 and t.diff > 0 and t.p_wilcoxon < 0.05 and t.cohen_dz > 0.5 and t.rank_biserial > 0.5
    # the unpaired view would miss it: subjects' spread (sd 1) dwarfs the shift
    a, b = _pairs(np.random.default_rng(3), 15, 0.4)
    assert np.std(list(a.values())) > 2 * t.diff


def _cell(subject: str, defense: str, metrics: dict, notes: dict | None = None, seed: int = 0, status: str = "ok",
          reason: str = "") -> dict:
    prov = {"config_hash": "h", "code_rev": "r"}
    if notes:
        prov["metric_notes"] = notes
    return {"dataset": "d", "subject": subject, "defense": defense, "scenario": "clean", "attack": "db",
            "seed": seed, "status": status, "reason": reason, "metrics": metrics, "provenance": prov}


def test_leaderboard_intervals_significance_and_reasons():
    rng = np.random.default_rng(4)
    noface = "no face detected (or matched to the references) in any of the 4 generated images"
    identical = "inf: a protected image is identical to its clean original (MSE 0)"
    cells = []
    for i in range(8):
        v = rng.normal(0.5, 0.2)
        cells.append(_cell(f"s{i}", "none", {"ism": v, "psnr": math.inf, "fdfr": 0.1 + 0.01 * i},
                           {"psnr": identical}))
        cells.append(_cell(f"s{i}", "aspl", {"ism": math.nan, "psnr": 35.0 + i, "fdfr": 0.1 + 0.01 * i + 1e-4 * (i % 3 - 1)},
                           {"ism": noface}))
        cells.append(_cell(f"s{i}", "mist", {"ism": v - 0.3 + rng.normal(0, 0.02), "psnr": 33.0, "fdfr": 0.9}))
    cells.append(_cell("s0", "broken", {}, status="failed", reason="protect stage failed (x): CUDA out of memory"))
    df = leaderboard_frame(cells).set_index("defense")
    # intervals bracket the mean; mist's drop in ISM is significant, aspl's FDFR change is not
    assert df.loc["mist", "ism ci_low"] < df.loc["mist", "ism"] < df.loc["mist", "ism ci_high"]
    assert df.loc["mist", "ism sig_vs_none"] == 1.0 and df.loc["aspl", "fdfr sig_vs_none"] == 0.0
    assert math.isnan(df.loc["none", "ism sig_vs_none"])
    # reasons instead of n = 0; inf is reported as inf with n counting it, never "inf, n = 0"
    assert math.isnan(df.loc["aspl", "ism"]) and df.loc["aspl", "ism n"] == 0 and df.loc["aspl", "ism note"] == noface
    assert df.loc["none", "psnr"] == math.inf and df.loc["none", "psnr n"] == 8
    assert df.loc["none", "psnr note"] == identical and math.isnan(df.loc["none", "psnr ci_low"])
    assert df.loc["broken", "ism note"] == "all 1 cells failed: protect stage failed (x): CUDA out of memory"
    md = render_markdown(leaderboard_frame(cells), "t")
    assert noface in md and identical in md and "CUDA out of memory" in md
    row = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| d ")}
    assert " ns" in row["aspl"] and "n/a (" in row["aspl"] and "inf (" in row["none"]
    assert "ns" not in row["mist"].split("|")[8]  # ism column of mist: significant


def test_compare_frame_is_paired_and_names_the_better_defense():
    cells = [_cell(f"s{i}", d, {"ism": 0.5 + 0.1 * i - (0.2 if d == "aspl" else 0.0) + 0.001 * (i % 2)}, seed=s)
             for i in range(6) for s in (0, 1) for d in ("random-noise", "aspl")]
    df = compare_frame(cells, "random-noise", "aspl", {"ism": False})
    r = df.iloc[0]
    assert r["pairs"] == 12 and r["subjects"] == 6 and r["significant"] == "yes"
    assert r["diff (aspl - random-noise)"] == pytest.approx(-0.2, abs=0.01) and r["better for defender"] == "aspl"
    with pytest.raises(ValueError, match="no finished cells of defense 'x'"):
        compare_frame(cells, "x", "aspl")


def _suite_ids_and_labels(name: str) -> tuple[set[str], set[str]]:
    """The protocol ids (paper profile) and the defense/scenario/attack labels of a built-in suite, read from its
    YAML without the availability checks (the paper metrics' weights are absent here)."""
    import yaml

    from bench.plugins import METRICS
    from bench.registry import build_params, load_builtins
    from bench.suites import _label, suite_path

    load_builtins()
    doc = yaml.safe_load(suite_path(name).read_text())
    ids = set()
    for m in doc["metrics"]:
        raw = {"name": m} if isinstance(m, str) else dict(m)
        params = {k: v for k, v in raw.items() if k not in ("name", "label", "per_prompt", "by_profile")}
        params.update((raw.get("by_profile") or {}).get("paper", {}))
        cls = METRICS.get(raw["name"])
        ids.add(cls(build_params(cls, params, "paper", name)).protocol_id())
    labels = set()
    for kind in ("defenses", "scenarios", "attacks"):
        for e in doc[kind]:
            raw = {"name": e} if isinstance(e, str) else dict(e)
            labels.add(raw.get("label") or _label(raw["name"], {k: v for k, v in raw.items()
                                                                 if k not in ("name", "by_profile")}))
    return ids, labels


REFERENCE_SUITES = {"apdm_reference": "paper-apdm", "genwatermark_reference": "paper-genwatermark",
                    "dapb_aspl_reference": "paper-aspl-dapb"}


def test_every_reference_table_names_our_protocol_ids_and_a_suite_that_reproduces_it():
    import pandas as pd

    from bench.leaderboard import GROUP, REFERENCE_DIR

    assert {p.stem for p in REFERENCE_DIR.glob("*.csv")} == set(REFERENCE_SUITES)
    readme = (REFERENCE_DIR / "README.md").read_text()
    for table, suite in REFERENCE_SUITES.items():
        ref = pd.read_csv(REFERENCE_DIR / f"{table}.csv")
        assert f"`{table}.csv` | `{suite}`" in readme and ref["source"].notna().all()
        ids, labels = _suite_ids_and_labels(suite)
        cols = {c for c in ref.columns if c not in GROUP and c != "source"}
        if table == "apdm_reference":  # its utility columns need the COCO prompt list (exact ids: test_utility.py)
            ids |= {c for c in cols if c.startswith(("fid/", "clip-score/")) and "coco-val2014-5k" in c}
        assert cols <= ids, (table, cols - ids)
        for key in ("defense", "scenario", "attack"):
            assert set(ref[key]) <= labels, (table, key, set(ref[key]) - labels)


def test_worst_case_row_is_the_attackers_best_row_and_names_it():
    """Per defense and metric, the worst-case row holds the value of the row best for the attacker (min of a metric
    higher-is-better for the defender, max of the other), its interval and its name; rows where the attacker got
    leaked clean images are not choices; metrics of the published images are copied."""
    rows = {("clean", "db"): (0.30, 0.8), ("jpeg", "db"): (0.55, 0.3), ("clean", "lora"): (0.20, 0.5),
            ("jpeg", "lora"): (0.45, 0.9), ("leak-1", "db"): (0.90, 0.0)}
    cells = []
    for (scenario, attack), (ism, fdfr) in rows.items():
        for i in range(4):
            for d, shift in (("aspl", 0.0), ("none", 0.4)):
                c = _cell(f"s{i}", d, {"ism": ism + shift + 0.01 * i, "fdfr": fdfr - shift / 2 + 0.01 * i,
                                       "psnr": 35.0 + 0.1 * i})
                c.update(scenario=scenario, attack=attack)
                c["provenance"]["config"] = {"scenario": {"leak": 1 if scenario == "leak-1" else 0}}
                cells.append(c)
    directions = {"ism": (False, "generated"), "fdfr": (True, "generated"), "psnr": (True, "protected")}
    plain = leaderboard_frame(cells)
    df = leaderboard_frame(cells, directions)
    assert len(df) == len(plain) + 2 and "(worst case)" not in set(plain.scenario)
    for d in ("aspl", "none"):
        mine = df[(df.defense == d) & (df.scenario != "(worst case)") & (df.scenario != "leak-1")]
        worst = df[(df.defense == d) & (df.scenario == "(worst case)")].iloc[0]
        assert worst.attack == "(attacker's best)" and worst.n == mine.n.sum()
        best_ism = mine.loc[mine.ism.idxmax()]  # lower ISM is better for the defender: the attacker takes the max
        assert worst.ism == best_ism.ism == mine.ism.max() and worst["ism worst_of"] == "jpeg / db"
        assert worst["ism ci_low"] == best_ism["ism ci_low"] and worst["ism ci_high"] == best_ism["ism ci_high"]
        assert worst.fdfr == mine.fdfr.min() and worst["fdfr worst_of"] == "jpeg / db"  # higher FDFR protects
        assert worst.psnr == mine.psnr.iloc[0] and not isinstance(worst.get("psnr worst_of"), str)
        assert worst.ism < df[(df.defense == d) & (df.scenario == "leak-1")].ism.iloc[0]  # the leak row is no choice
    # the summary row follows its defense's rows; Markdown names the row it took
    assert list(df.defense) == sorted(df.defense) and df.scenario.iloc[len(df) // 2 - 1] == "(worst case)"
    md = render_markdown(df, "t")
    line = next(l for l in md.splitlines() if "(worst case)" in l and "| aspl " in l)
    assert "by jpeg / db" in line and "worst_of" not in md
