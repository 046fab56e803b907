"""Reading a finished run folder (``--out DIR``): its ledger cells, the stage records and images behind each cell,
and what each metric column means. Used by `bench compare` and `bench report`; nothing here writes to DIR's cache
or ledger."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.registry import ConfigError


@dataclass(frozen=True)
class MetricInfo:
    protocol: str
    name: str  # registry name
    higher_is_better: bool  # for the defender
    description: str
    paper: str
    target: str  # protected, generated, model


@dataclass
class RunResults:
    out: Path
    cells: list[dict]
    records: dict[str, dict] = field(default_factory=dict)  # stage key -> its done.json record

    @classmethod
    def open(cls, out: Path, suite: str | None = None, profile: str | None = None) -> "RunResults":
        from bench.ledger import Ledger

        db = Path(out) / "ledger.sqlite"
        if not db.is_file():
            raise ConfigError(f"no results in {out} (no ledger.sqlite); run `bench run --out {out}` first")
        ledger = Ledger(db)
        cells = ledger.cells(suite, profile)
        ledger.close()
        records = {}
        for done in sorted((Path(out) / "cache").glob("*/*/done.json")):
            try:
                rec = json.loads(done.read_text())
                records[rec["key"]] = rec
            except (OSError, ValueError, KeyError):  # damaged: `bench verify` reports it; the report leaves it out
                continue
        return cls(Path(out), cells, records)

    def path(self, key: str) -> Path:
        from bench.store import ArtifactStore

        return ArtifactStore(self.out / "cache").path(self.records[key]["kind"], key)

    def suites(self) -> list[str]:
        return sorted({c["suite"] for c in self.cells})

    def stages_of(self, cell: dict, kind: str) -> list[str]:
        return [k for k in cell["provenance"].get("stages", []) if self.records.get(k, {}).get("kind") == kind]

    def protect_of(self, cell: dict) -> str | None:
        """The cell's own protect stage (a watermark cell also holds the undefended run's)."""
        own = (cell["provenance"].get("protect_cost") or {}).get("key")
        if own in self.records:
            return own
        found = [k for k in self.stages_of(cell, "protect")
                 if self.records[k]["params"]["defense"]["name"] == cell["defense"].split("(")[0]]
        return (found or self.stages_of(cell, "protect") or [None])[0]

    def generate_of(self, cell: dict) -> str | None:
        """The cell's own generate stage: the one whose attack trained on a set composed from its own protect stage."""
        protect = self.protect_of(cell)
        for g in self.stages_of(cell, "generate"):
            for a in self.records[g]["deps"]:
                rec = self.records.get(a, {})
                if rec.get("kind") != "attack":
                    continue
                sets = rec["deps"] + [d for p in rec["deps"] if self.records.get(p, {}).get("kind") == "purify"
                                      for d in self.records[p]["deps"]]
                composes = [d for d in sets if self.records.get(d, {}).get("kind") == "compose"]
                if any(protect in self.records[c]["deps"] for c in composes):
                    return g
        return None

    def metric_info(self) -> dict[str, MetricInfo]:
        """Protocol id -> what it measures, from the measure stages' records and the metric registry."""
        return metric_info_of(rec["params"] for rec in self.records.values() if rec.get("kind") == "measure")


def metric_info_of(measure_params) -> dict[str, MetricInfo]:
    """Protocol id -> MetricInfo for measure stages' parameters (metrics whose plug-in is gone are left out)."""
    from bench.plugins import METRICS
    from bench.registry import load_builtins

    load_builtins()
    out: dict[str, MetricInfo] = {}
    for params in measure_params:
        if params["protocol"] in out:
            continue
        name = params["metric"]["name"]
        try:
            cls = METRICS.get(name)
        except ConfigError:  # a plug-in no longer installed
            continue
        out[params["protocol"]] = MetricInfo(params["protocol"], name, cls.higher_is_better, cls.description,
                                             getattr(cls, "paper", ""), cls.target)
    return out


def directions(info: dict[str, MetricInfo]) -> dict[str, tuple[bool, str]]:
    """Protocol id -> (higher is better for the defender, target): what the leaderboard's worst-case rows need."""
    return {pid: (i.higher_is_better, i.target) for pid, i in info.items()}
