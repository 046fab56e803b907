"""How much work the stage cache saves on the `robustness` suite (tiny profile).

Prints: cells, unique stage executions vs a naive per-cell run, and (with --run) the wall time of a first
run, of a cached rerun, and their ratio.

    python benchmarks/stage_sharing.py [--suite robustness] [--run] [--out <tmp>/bench-sharing]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.cli import configure_threads, main, quiet_libraries
from bench.runner import RunOptions, prepare


def plan_numbers(suite: str, profile: str) -> None:
    plan = prepare(RunOptions(suite=suite, profile=profile)).plan
    unique = Counter(s.kind for s in plan.stages.values())
    naive = Counter(plan.stages[k].kind for c in plan.cells for k in c.stages)
    print(f"suite {suite}, profile {profile}: {len(plan.cells)} cells")
    print(f"{'stage kind':<14}{'unique':>8}{'naive':>8}")
    for kind in ["model", "protect", "compose", "purify", "class_images", "attack", "generate", "measure"]:
        print(f"{kind:<14}{unique[kind]:>8}{naive[kind]:>8}")
    total_u, total_n = sum(unique.values()), sum(naive.values())
    print(f"{'total':<14}{total_u:>8}{total_n:>8}   naive/unique = {total_n / total_u:.2f}x")


def timed_runs(suite: str, profile: str, out: Path) -> None:
    t0 = time.perf_counter()
    code = main(["run", "--suite", suite, "--profile", profile, "--out", str(out)])
    first = time.perf_counter() - t0
    s1 = json.loads((out / "summary.json").read_text())
    t0 = time.perf_counter()
    main(["run", "--suite", suite, "--profile", profile, "--out", str(out)])
    second = time.perf_counter() - t0
    s2 = json.loads((out / "summary.json").read_text())
    print(f"first run: {first:.1f} s (exit {code}, stages run {s1['stages_run']}, cached {s1['stages_cached']})")
    print(f"cached rerun: {second:.2f} s (stages run {s2['stages_run']}, cached {s2['stages_cached']})")
    print(f"rerun / first = {second / first:.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="robustness")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench-sharing"))
    a = ap.parse_args()
    quiet_libraries()
    configure_threads()
    plan_numbers(a.suite, a.profile)
    if a.run:
        timed_runs(a.suite, a.profile, Path(a.out))
