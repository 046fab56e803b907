"""Leaderboards: ledger rows -> one row per dataset x defense x scenario x attack, a column per metric protocol id
(mean over subjects and seeds, plus ``<id> std`` and ``<id> n``), written as CSV and Markdown.

Each row carries ``config_hash`` (a hash over its cells' config hashes: the cells themselves are in the ledger)
and ``code_rev`` so that every number can be traced to the configuration and code that produced it.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.store import atomic_write_text, stable_hash

GROUP = ["dataset", "defense", "scenario", "attack"]


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


def leaderboard_frame(cells: list[dict]) -> pd.DataFrame:
    records = [_record(c, GROUP) for c in cells]
    if not records:
        return pd.DataFrame(columns=GROUP + ["n", "n_failed"])
    df = pd.DataFrame.from_records(records)
    metric_cols = [c for c in df.columns if c not in GROUP + ["status", "config_hash", "code_rev"]]
    rows = []
    for keys, g in df.groupby(GROUP, sort=True, dropna=False):
        ok = g[g.status == "ok"]
        row = dict(zip(GROUP, keys))
        row["n"] = len(ok)
        row["n_failed"] = int((g.status != "ok").sum())
        for m in sorted(metric_cols):
            vals = pd.to_numeric(ok[m], errors="coerce").replace([math.inf, -math.inf], math.nan).dropna() \
                if m in ok else pd.Series(dtype=float)
            infs = pd.to_numeric(ok[m], errors="coerce") if m in ok else pd.Series(dtype=float)
            if len(vals) == 0 and len(infs.dropna()) > 0:  # e.g. PSNR of identical images
                row[m] = float(infs.dropna().iloc[0])
            else:
                row[m] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m} std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{m} n"] = int(len(vals))
        row["config_hash"] = stable_hash(sorted(g.config_hash))[:16]
        row["code_rev"] = ";".join(sorted(set(g.code_rev)))
        rows.append(row)
    return pd.DataFrame(rows)


def write_leaderboard(cells: list[dict], out_dir: Path, suite: str) -> tuple[Path, Path]:
    df = leaderboard_frame(cells)
    csv_path = out_dir / "leaderboards" / f"{suite}.csv"
    md_path = out_dir / "leaderboards" / f"{suite}.md"
    atomic_write_text(csv_path, df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(md_path, render_markdown(df, suite))
    return csv_path, md_path


def render_markdown(df: pd.DataFrame, title: str) -> str:
    if df.empty:
        return f"# {title}\n\n(no results)\n"
    shown = [c for c in df.columns if not c.endswith(" n") and c not in ("config_hash", "code_rev")]
    body = df[shown].to_markdown(index=False, floatfmt=".4g")
    return f"# {title}\n\nMean over subjects and seeds (std in the `std` columns); higher/lower is better per metric: see `bench list metrics`.\n\n{body}\n"


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
