"""The results ledger: one SQLite file per output folder, written only by the driver process.

A row per cell (its keys, status, failure reason, metric values by protocol id, provenance), a row per stage
execution attempt (``stage_runs``: attempt number, where it ran, job id, error) and each stage's latest state
(``stages``: queued, running, done, failed; what `bench status` shows). Workers never open it (HARNESSES.md 4.2: shared SQLite writers lock each other out).
"""
from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
  suite TEXT, profile TEXT, cell_id TEXT, dataset TEXT, subject TEXT, defense TEXT, scenario TEXT,
  attack TEXT, seed INTEGER, status TEXT, reason TEXT, metrics TEXT, provenance TEXT, updated REAL,
  PRIMARY KEY (suite, profile, cell_id)
);
CREATE TABLE IF NOT EXISTS stage_runs (
  key TEXT, kind TEXT, label TEXT, ok INTEGER, error TEXT, wall_s REAL, peak_rss_mb REAL, at REAL
);
CREATE TABLE IF NOT EXISTS stages (
  key TEXT PRIMARY KEY, kind TEXT, label TEXT, state TEXT, attempts INTEGER, host TEXT, job_id TEXT, reason TEXT,
  updated REAL
);
"""


class Ledger:
    """A damaged file (not a database, failing SQLite's quick_check) is set aside as ``<name>.damaged-<time>`` (kept,
    not deleted) and a new ledger started; ``set_aside`` says where the old one went. `bench run` refills the cells
    of every suite it runs from the cache (nothing finished is recomputed)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.set_aside: Path | None = None
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            self.set_aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(self.set_aside)
            print(f"warning: {path} is damaged ({e}); set aside as {self.set_aside.name}, starting a new ledger "
                  f"(`bench run` refills it from the cache without recomputing)", file=sys.stderr)
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        try:
            status = db.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {status}")
            db.executescript(SCHEMA)
            have = {r[1] for r in db.execute("PRAGMA table_info(stage_runs)")}
            for col, typ in (("attempt", "INTEGER"), ("host", "TEXT"), ("job_id", "TEXT")):  # ledgers before retries
                if col not in have:
                    db.execute(f"ALTER TABLE stage_runs ADD COLUMN {col} {typ}")
            db.execute("SELECT count(*) FROM cells").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def put_cell(self, suite: str, profile: str, cell_id: str, keys: dict, status: str, reason: str,
                 metrics: dict[str, float], provenance: dict[str, Any]) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (suite, profile, cell_id, keys["dataset"], keys["subject"], keys["defense"], keys["scenario"],
                 keys["attack"], keys["seed"], status, reason, json.dumps(metrics, sort_keys=True),
                 json.dumps(provenance, sort_keys=True, default=str), time.time()))

    def put_stage_run(self, key: str, kind: str, label: str, ok: bool, error: str, record: dict | None,
                      attempt: int = 1, host: str = "", job_id: str = "") -> None:
        record = record or {}
        with self.db:
            self.db.execute("INSERT INTO stage_runs (key, kind, label, ok, error, wall_s, peak_rss_mb, at, attempt, "
                            "host, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (key, kind, label, int(ok), error, record.get("wall_s"), record.get("peak_rss_mb"),
                             time.time(), attempt, host, job_id))

    def set_states(self, rows: list[tuple[str, str, str, str]]) -> None:
        """(key, kind, label, state) for many stages at once (a run's start: queued or done)."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT INTO stages (key, kind, label, state, attempts, host, job_id, reason, updated) "
                "VALUES (?,?,?,?,0,'','','',?) ON CONFLICT(key) DO UPDATE SET state=excluded.state, "
                "reason='', updated=excluded.updated", [(*r, now) for r in rows])

    def set_state(self, key: str, state: str, attempts: int | None = None, host: str | None = None,
                  job_id: str | None = None, reason: str | None = None) -> None:
        sets, args = ["state = ?", "updated = ?"], [state, time.time()]
        for col, v in (("attempts", attempts), ("host", host), ("job_id", job_id), ("reason", reason)):
            if v is not None:
                sets.append(f"{col} = ?")
                args.append(v)
        with self.db:
            self.db.execute(f"UPDATE stages SET {', '.join(sets)} WHERE key = ?", (*args, key))

    def stage_states(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM stages ORDER BY updated")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def cells(self, suite: str | None = None, profile: str | None = None) -> list[dict]:
        q, args = "SELECT * FROM cells", []
        conds = []
        if suite:
            conds.append("suite = ?"); args.append(suite)
        if profile:
            conds.append("profile = ?"); args.append(profile)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        cur = self.db.execute(q + " ORDER BY dataset, subject, defense, scenario, attack, seed", args)
        cols = [c[0] for c in cur.description]
        rows = []
        for r in cur.fetchall():
            row = dict(zip(cols, r))
            row["metrics"] = json.loads(row["metrics"] or "{}")
            row["provenance"] = json.loads(row["provenance"] or "{}")
            rows.append(row)
        return rows

    def close(self) -> None:
        self.db.close()
