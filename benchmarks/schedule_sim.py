"""Wall time of a finished run's stages under N workers, simulated with the harness's own scheduler
(``bench.scheduler.run_dag``) on a virtual clock over each stage's measured ``wall_s`` (from its ``done.json``).
Worker start-up (importing torch, ~6 CPU-s per process) and contention between workers are not modelled.

    .venv/bin/python benchmarks/schedule_sim.py runs/smoke 1 2 4 8

Measure the stage times with ``--jobs 1`` (stages alone on the machine); the cached base models of the run are left
out (they were not computed by it) unless ``--with-models``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scheduler import Finished, run_dag  # noqa: E402
from bench.stages import StageResult  # noqa: E402


class VirtualWorkers:
    """``n`` workers; a stage occupies one for its recorded wall time."""

    def __init__(self, n: int, cost: dict[str, float]) -> None:
        self.n, self.cost, self.now = n, cost, 0.0
        self.running: dict[str, float] = {}
        self.started: list[str] = []

    def has_room(self, kind: str) -> bool:
        return len(self.running) < self.n

    def submit(self, key: str) -> None:
        self.running[key] = self.now
        self.started.append(key)

    def flush(self):
        out, self.started = [(k, "virtual", "") for k in self.started], []
        return out

    def wait(self):
        key = min(self.running, key=lambda k: self.running[k] + self.cost[k])
        self.now = self.running.pop(key) + self.cost[key]
        return [Finished(key, StageResult(key, True), "virtual")]


class _Quiet:
    def started(self, *a): pass
    def attempt(self, *a, **k): pass
    def done(self, *a): pass
    def failed(self, *a): pass


def load_stages(out: Path, with_models: bool) -> tuple[dict, dict[str, float]]:
    """Stages (kind, label, deps) and wall seconds of every finished artifact under ``out``/cache, in plan order."""
    stages, cost = {}, {}
    for done in sorted((out / "cache").glob("*/*/done.json")):
        rec = json.loads(done.read_text())
        if rec["kind"] == "model" and not with_models:
            continue
        stages[rec["key"]] = SimpleNamespace(kind=rec["kind"], label=rec["label"], deps=tuple(rec["deps"]))
        cost[rec["key"]] = float(rec["wall_s"])
    for st in stages.values():
        st.deps = tuple(d for d in st.deps if d in stages)
    order, seen = [], set()

    def visit(k: str) -> None:  # topological order (deps first)
        if k in seen:
            return
        seen.add(k)
        for d in stages[k].deps:
            visit(d)
        order.append(k)
    for k in sorted(stages, key=lambda k: stages[k].label):
        visit(k)
    return {k: stages[k] for k in order}, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("workers", type=int, nargs="+")
    ap.add_argument("--with-models", action="store_true")
    a = ap.parse_args()
    stages, cost = load_stages(a.out, a.with_models)
    total = sum(cost.values())
    print(f"{len(stages)} stages, {total:.1f} s of stage time")
    for n in a.workers:
        ex = VirtualWorkers(n, cost)
        cpu = time.process_time()
        run_dag(list(stages), stages, ex, retries=0, events=_Quiet())
        cpu = time.process_time() - cpu  # the driver's scheduling work (plus this simulation's worker model)
        print(f"{n} worker(s): {ex.now:.1f} s ({ex.now / total:.2f}x of one worker); scheduler CPU {cpu:.2f} s")


if __name__ == "__main__":
    main()
