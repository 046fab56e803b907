"""Leaderboards: ledger rows -> one row per dataset x defense x scenario x attack, a column per metric protocol id
(mean over subjects and seeds), written as CSV and Markdown.

Per metric the CSV also has ``<id> std``, ``<id> n`` (cells with a value), ``<id> ci_low`` / ``<id> ci_high`` (95%
cluster bootstrap interval over subjects and seeds, bench/stats.py), ``<id> sig_vs_none`` (1 / 0: whether the
paired difference from the ``none`` row of the same dataset, scenario and attack is significant; empty where it
cannot be tested) and ``<id> note`` (why a value is missing or infinite: no face detected, not applicable, failed).
Cost columns: the protect stage's wall time per published image, its peak RSS and peak CUDA memory (mean wall time
and max memory over the row's protect stages). Each row carries ``config_hash`` (a hash over its cells' config
hashes: the cells themselves are in the ledger) and ``code_rev`` so that every number can be traced to the
configuration and code that produced it.

Worst case (issue 13, like AutoAttack's worst case over attacks): given the metrics' directions, each dataset x
defense with two or more rows the attacker can choose between (every scenario that hands the attacker no leaked
clean image, times every attack) gets a summary row, scenario ``(worst case)``, attack ``(attacker's best)``: per
attack-outcome metric the value of the row best for the attacker (its mean, interval, ``n``, ``sig_vs_none``), and
``<id> worst_of`` naming that row (``scenario / attack``). Metrics of the published images themselves (L-inf, PSNR)
are the same in every row and are copied.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from bench.stats import bootstrap_ci, differs, paired_test
from bench.store import atomic_write_text, stable_hash

GROUP = ["dataset", "defense", "scenario", "attack"]
BASELINE = "none"
COST_COLS = ["protect s/image", "protect peak RSS MB", "protect peak GPU MB"]
SUFFIXES = (" std", " n", " ci_low", " ci_high", " sig_vs_none", " note", " worst_of", " paper", " diff")
HIDDEN_SUFFIXES = SUFFIXES[:7]  # shown inside the metric's own Markdown cell, not as columns
WORST_SCENARIO, WORST_ATTACK = "(worst case)", "(attacker's best)"


def _record(c: dict, keys: list[str]) -> dict:
    rec = {k: c[k] for k in keys}
    rec.update(status=c["status"], config_hash=c["provenance"].get("config_hash", ""),
               code_rev=c["provenance"].get("code_rev", ""))
    for pid, v in c["metrics"].items():
        rec[pid] = v if v is not None and not (isinstance(v, float) and math.isnan(v)) else math.nan
    return rec


def cells_frame(cells: list[dict]) -> pd.DataFrame:
    """One row per cell (subject and seed kept), a column per metric protocol id: what paired comparisons need
    (e.g. a defense vs random noise, subject by subject)."""
    return pd.DataFrame.from_records([_record(c, GROUP + ["subject", "seed"]) for c in cells])


def _value(c: dict, pid: str) -> float:
    v = c["metrics"].get(pid)
    return math.nan if v is None else float(v)


def metric_ids(cells: list[dict]) -> list[str]:
    return sorted({pid for c in cells for pid in c["metrics"]})


def _note(group: list[dict], ok: list[dict], pid: str) -> str:
    """Why the cell of ``pid`` has no (finite) value, or some of its cells have none; "" when every value is finite."""
    if not ok:
        reasons = Counter(c.get("reason") or "no reason recorded" for c in group)
        reason, k = reasons.most_common(1)[0]
        return f"all {len(group)} cells failed" + (f": {reason}" if k == len(group) else f" (e.g. {reason})")
    missing = [c for c in ok if math.isnan(_value(c, pid))]
    infinite = [c for c in ok if math.isinf(_value(c, pid))]
    if not missing and not infinite:
        return ""
    if all(pid not in c["metrics"] for c in missing) and len(missing) == len(ok):
        return "not measured for this row"
    parts = []
    for subset, what in ((missing, "no value"), (infinite, "infinite")):
        if subset:
            reasons = Counter(c["provenance"].get("metric_notes", {}).get(pid, "no reason recorded") for c in subset)
            text = "; ".join(r for r, _ in reasons.most_common(2))
            share = "" if len(subset) == len(ok) else f"{len(subset)} of {len(ok)} cells {what}: "
            parts.append(share + text)
    return "; ".join(parts)


def _cost(group: list[dict]) -> dict[str, float]:
    """Mean protect wall time per image and max peak memory over the row's distinct protect stages."""
    stages = {}
    for c in group:
        cost = c["provenance"].get("protect_cost")
        if cost and cost.get("key"):
            stages[cost["key"]] = cost
    per_image = [s["wall_s"] / s["n_images"] for s in stages.values() if s.get("wall_s") is not None and s.get("n_images")]
    rss = [s["peak_rss_mb"] for s in stages.values() if s.get("peak_rss_mb") is not None]
    gpu = [s["peak_gpu_mb"] for s in stages.values() if s.get("peak_gpu_mb") is not None]
    return {"protect s/image": float(np.mean(per_image)) if per_image else math.nan,
            "protect peak RSS MB": float(max(rss)) if rss else math.nan,
            "protect peak GPU MB": float(max(gpu)) if gpu else math.nan}


def _by_subject(cells: list[dict], pid: str) -> list[np.ndarray]:
    groups: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        v = _value(c, pid)
        if not math.isnan(v):
            groups[str(c.get("subject", ""))].append(v)
    return [np.array(v) for _, v in sorted(groups.items())]


def _paired(cells: list[dict], pid: str) -> dict[tuple, float]:
    return {(str(c.get("subject", "")), c.get("seed", 0)): _value(c, pid) for c in cells}


def leaderboard_frame(cells: list[dict], directions: dict[str, tuple[bool, str]] | None = None) -> pd.DataFrame:
    """One row per dataset x defense x scenario x attack; ``directions`` (protocol id -> (higher is better for the
    defender, metric target)) adds the worst-case summary rows."""
    if not cells:
        return pd.DataFrame(columns=GROUP + ["n", "n_failed"])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[tuple(c[k] for k in GROUP)].append(c)
    metrics = metric_ids(cells)
    ok_of = {k: [c for c in g if c["status"] == "ok"] for k, g in groups.items()}
    rows = []
    for keys in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        group, ok = groups[keys], ok_of[keys]
        row: dict = dict(zip(GROUP, keys))
        row["n"] = len(ok)
        row["n_failed"] = len(group) - len(ok)
        baseline = ok_of.get((keys[0], BASELINE, keys[2], keys[3])) if keys[1] != BASELINE else None
        for m in metrics:
            present = [v for c in ok if not math.isnan(v := _value(c, m))]
            finite = [v for v in present if math.isfinite(v)]
            row[m] = float(np.mean(present)) if present else math.nan
            row[f"{m} std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 and len(finite) == len(present) else math.nan
            row[f"{m} n"] = len(present)
            row[f"{m} ci_low"], row[f"{m} ci_high"] = bootstrap_ci(_by_subject(ok, m))
            sig = differs(_paired(baseline, m), _paired(ok, m)) if baseline else None
            row[f"{m} sig_vs_none"] = math.nan if sig is None else float(sig)
            row[f"{m} note"] = _note(group, ok, m)
        row.update(_cost(group))
        row["config_hash"] = stable_hash(sorted(c["provenance"].get("config_hash", "") for c in group))[:16]
        row["code_rev"] = ";".join(sorted({c["provenance"].get("code_rev", "") for c in group}))
        rows.append(row)
    df = pd.DataFrame(rows)
    if directions:
        df = with_worst_case(df, attacker_choices(cells), directions)
    return df.drop(columns=[c for c in COST_COLS if df[c].isna().all()])  # e.g. GPU memory on a CPU run


def _leaks(cell: dict) -> bool:
    leak = cell["provenance"].get("config", {}).get("scenario", {}).get("leak", 0)
    return leak not in (0, "0", None)


def attacker_choices(cells: list[dict]) -> set[str]:
    """Scenarios the attacker can pick with the published images alone (no leaked clean image): clean, bypass
    transforms and purifications, the attacker's choice of base model or prompt."""
    return {c["scenario"] for c in cells if not _leaks(c)}


def with_worst_case(df: pd.DataFrame, scenarios: set[str], directions: dict[str, tuple[bool, str]]) -> pd.DataFrame:
    """``df`` plus, after each dataset x defense, its worst-case row (see the module docstring)."""
    summaries = []
    for (ds, defense), group in df[df.scenario.isin(scenarios)].groupby(["dataset", "defense"], sort=False):
        if len(group) < 2:
            continue
        row: dict = {"dataset": ds, "defense": defense, "scenario": WORST_SCENARIO, "attack": WORST_ATTACK,
                     "n": int(group["n"].sum()), "n_failed": int(group["n_failed"].sum())}
        for m in metric_columns(df):
            higher, target = directions.get(m, (True, "protected"))
            if target == "protected":  # the published images: the same in every row
                pick = group.iloc[0]
            else:
                values = pd.to_numeric(group[m], errors="coerce")
                if values.isna().all():
                    row.update({m: math.nan, f"{m} n": 0, f"{m} note": f"no value in any of the {len(group)} rows"})
                    continue
                pick = group.loc[values.idxmin() if higher else values.idxmax()]  # the attacker's best
                row[f"{m} worst_of"] = f"{pick.scenario} / {pick.attack}"
            row.update({c: pick[c] for c in (m, *(f"{m}{x}" for x in HIDDEN_SUFFIXES[:6])) if c in pick.index})
        row.update({c: group.iloc[0][c] for c in COST_COLS if c in group})
        row["config_hash"] = stable_hash(sorted(group["config_hash"]))[:16]
        row["code_rev"] = ";".join(sorted(set(";".join(group["code_rev"]).split(";")) - {""}))
        summaries.append(row)
    if not summaries:
        return df
    out = pd.concat([df, pd.DataFrame(summaries)], ignore_index=True)
    order = sorted(range(len(out)), key=lambda i: (str(out.dataset[i]), str(out.defense[i]),
                                                   out.scenario[i] == WORST_SCENARIO, i))
    return out.iloc[order].reset_index(drop=True)


def write_leaderboard(cells: list[dict], out_dir: Path, suite: str,
                      directions: dict[str, tuple[bool, str]] | None = None) -> tuple[Path, Path]:
    df = leaderboard_frame(cells, directions)
    csv_path = out_dir / "leaderboards" / f"{suite}.csv"
    md_path = out_dir / "leaderboards" / f"{suite}.md"
    atomic_write_text(csv_path, df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(md_path, render_markdown(df, suite))
    return csv_path, md_path


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric protocol-id columns of a leaderboard frame (those with an ``<id> n`` column)."""
    return [c for c in df.columns if f"{c} n" in df.columns]


def formatted(df: pd.DataFrame) -> tuple[list[str], list[dict[str, tuple[str, float | str]]], dict[str, int]]:
    """The shown columns, per row ``column -> (text, sort value)``, and the notes (text -> number) the texts refer to.
    A metric cell reads ``mean [95% interval]``, with ``ns`` where the paired difference from the ``none`` row is
    not significant and ``n/a (k)`` / ``inf (k)`` pointing at note k (why)."""
    metrics = set(metric_columns(df))
    shown = [c for c in df.columns if not c.endswith(HIDDEN_SUFFIXES) and c not in ("config_hash", "code_rev")]
    notes: dict[str, int] = {}
    rows = []
    for _, r in df.iterrows():
        out: dict[str, tuple[str, float | str]] = {}
        for c in shown:
            v = r[c]
            if c not in metrics:
                number = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                out[c] = ("" if number and math.isnan(v) else (_fmt(v) if number else str(v)), v)
                continue
            note = r.get(f"{c} note") if isinstance(r.get(f"{c} note"), str) else ""
            mark = f" ({notes.setdefault(note, len(notes) + 1)})" if note else ""
            if math.isnan(v):
                out[c] = ("n/a" + mark, v)
                continue
            lo, hi = r.get(f"{c} ci_low", math.nan), r.get(f"{c} ci_high", math.nan)
            text = _fmt(v) + ("" if math.isnan(lo) else f" [{_fmt(lo)}, {_fmt(hi)}]")
            if r.get(f"{c} sig_vs_none") == 0.0:
                text += " ns"
            if isinstance(r.get(f"{c} worst_of"), str):
                text += f" by {r[f'{c} worst_of']}"
            out[c] = (text + mark, v)
        rows.append(out)
    return shown, rows, notes


LEGEND = ("Mean over subjects and seeds, [95% bootstrap interval over subjects and seeds] (bench/stats.py); `ns`: "
          f"not significantly different from the `{BASELINE}` row of the same dataset, scenario and attack (paired "
          "bootstrap over the same subjects and seeds; `bench compare` gives the test in full). Higher/lower is better "
          "per metric: see `bench list metrics`. A `(worst case)` row: per metric the row of that defense best for "
          "the attacker, over every scenario without leaked clean images and every attack (`by` names it; its interval "
          "is that row's, and choosing the best row favours the attacker slightly). Cost: the protect stage's wall time per published image and its peak "
          "memory.")


def render_markdown(df: pd.DataFrame, title: str) -> str:
    if df.empty:
        return f"# {title}\n\n(no results)\n"
    shown, rows, notes = formatted(df)
    body = pd.DataFrame([{c: t for c, (t, _) in r.items()} for r in rows], columns=shown) \
        .to_markdown(index=False, disable_numparse=True)
    foot = "".join(f"\n({k}) {note}" for note, k in notes.items())
    return f"# {title}\n\n{LEGEND}\n\n{body}\n" + (f"\nNotes:\n{foot}\n" if foot else "")


REFERENCE_DIR = Path(__file__).resolve().parents[1] / "leaderboards"


def compare_with_reference(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Join a paper's published table (``leaderboards/<reference>.csv``: the same key columns, metric columns
    named by protocol id) and add ``<id> paper`` and ``<id> diff`` (ours minus theirs) columns."""
    path = Path(reference) if Path(reference).suffix == ".csv" else REFERENCE_DIR / f"{reference}.csv"
    if not path.is_file():
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.csv"))
        raise ValueError(f"no reference table {path}; known: {', '.join(known) or 'none'}")
    ref = pd.read_csv(path)
    keys = [k for k in GROUP if k in ref.columns]
    metric_cols = [c for c in ref.columns if c not in GROUP and c in df.columns]
    ref = ref[keys + metric_cols].rename(columns={c: f"{c} paper" for c in metric_cols})
    merged = df.merge(ref, on=keys, how="left")
    for c in metric_cols:
        merged[f"{c} diff"] = merged[c] - merged[f"{c} paper"]
    return merged


def compare_frame(cells: list[dict], a: str, b: str, higher_is_better: dict[str, bool] | None = None) -> pd.DataFrame:
    """Defense ``b`` against defense ``a`` (leaderboard labels) on every dataset x scenario x attack x metric both
    have: pairs are the same (subject, seed) cells (bench/stats.py ``paired_test``: mean difference b - a with its
    95% paired cluster bootstrap interval, Wilcoxon signed-rank p, Cohen's d_z, rank-biserial correlation).
    ``better for defender`` names the defense the significant difference favours (``higher_is_better`` per
    protocol id, for the defender)."""
    higher_is_better = higher_is_better or {}
    ok = [c for c in cells if c["status"] == "ok"]
    labels = {c["defense"] for c in ok}
    for name in (a, b):
        if name not in labels:
            raise ValueError(f"no finished cells of defense {name!r}; defenses here: {', '.join(sorted(labels)) or 'none'}")
    rows = []
    keys = sorted({(c["dataset"], c["scenario"], c["attack"]) for c in ok if c["defense"] in (a, b)})
    for ds, sc, at in keys:
        side = {d: [c for c in ok if (c["dataset"], c["defense"], c["scenario"], c["attack"]) == (ds, d, sc, at)]
                for d in (a, b)}
        if not side[a] or not side[b]:
            continue
        for m in sorted(set(metric_ids(side[a])) & set(metric_ids(side[b]))):
            t = paired_test(_paired(side[a], m), _paired(side[b], m))
            better = ""
            if t.significant and m in higher_is_better:
                better = b if (t.diff > 0) == higher_is_better[m] else a
            rows.append({"dataset": ds, "scenario": sc, "attack": at, "metric": m, "pairs": t.n,
                         "subjects": t.subjects, f"mean {a}": t.mean_a, f"mean {b}": t.mean_b,
                         f"diff ({b} - {a})": t.diff, "ci_low": t.ci_low, "ci_high": t.ci_high,
                         "significant": "" if t.significant is None else ("yes" if t.significant else "no"),
                         "p_wilcoxon": t.p_wilcoxon, "cohen_dz": t.cohen_dz, "rank_biserial": t.rank_biserial,
                         "better for defender": better})
    if not rows:
        raise ValueError(f"defenses {a!r} and {b!r} share no dataset, scenario and attack with finished cells")
    return pd.DataFrame(rows)
