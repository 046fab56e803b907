"""Wall time of a suite with N local worker processes against the sequential executor (issue 14: ``--jobs 2`` on a
2-core machine, target at most 0.6x), whether both give the same leaderboard, and what the harness's scheduler
would give with more workers over the stage times the sequential run measured.

    .venv/bin/python benchmarks/parallel_speedup.py [--suite robustness] [--profile tiny] [--jobs 2]
                                                    [--simulate 1 2 4 8] [--out DIR]

Each run starts from an empty ``--out`` (its models are built too, as a newcomer's first run), one after the
other, so run it on an otherwise idle machine. Sequential is ``--jobs 1`` (stages one at a time in the driver);
``--jobs N`` is the parallel local executor. The simulation (benchmarks/schedule_sim.py) replays the sequential
run's stage wall times through ``bench.scheduler.run_dag`` with N virtual workers, model stages included; worker
start-up and contention between workers are not modelled, so it is the schedule's bound, not a prediction of the
machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def run_suite(suite: str, profile: str, out: Path, jobs: int) -> float:
    """``bench run`` in a subprocess; its wall time in seconds."""
    cmd = [sys.executable, "-m", "bench.cli", "run", "--suite", suite, "--profile", profile, "--out", str(out),
           "--jobs", str(jobs)]  # this checkout's code (run it from a worktree to keep editing meanwhile)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return wall


def leaderboards(out: Path) -> dict[str, str]:
    """Every leaderboard CSV of a run without the measured cost columns."""
    import pandas as pd

    from bench.leaderboard import COST_COLS

    tables = {}
    for path in sorted((out / "leaderboards").glob("*.csv")):
        df = pd.read_csv(path)
        tables[path.name] = df.drop(columns=[c for c in COST_COLS if c in df]).to_csv(index=False)
    return tables


def simulate(out: Path, workers: list[int]) -> list[tuple[int, float, float]]:
    """(workers, simulated wall s, ratio to one worker) over ``out``'s measured stage times."""
    from schedule_sim import VirtualWorkers, _Quiet, load_stages

    from bench.scheduler import run_dag

    stages, cost = load_stages(out, with_models=True)
    rows = []
    for n in workers:
        ex = VirtualWorkers(n, cost)
        run_dag(list(stages), stages, ex, retries=0, events=_Quiet())
        rows.append((n, ex.now, ex.now / max(sum(cost.values()), 1e-9)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="robustness", help="built-in suite name or a suite YAML (e.g. a sub-grid)")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--jobs", type=int, default=2, help="workers of the parallel run")
    ap.add_argument("--simulate", type=int, nargs="+", default=[1, 2, 4, 8], help="virtual workers to replay")
    ap.add_argument("--out", type=Path, help="keep both runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or Path(tmp)
        seq, par = root / "jobs-1", root / f"jobs-{a.jobs}"
        print(f"suite {a.suite}, profile {a.profile}, {os.cpu_count()} CPUs", flush=True)
        t1 = run_suite(a.suite, a.profile, seq, 1)
        print(f"  --jobs 1: {t1:.0f} s", flush=True)
        tn = run_suite(a.suite, a.profile, par, a.jobs)
        print(f"  --jobs {a.jobs}: {tn:.0f} s", flush=True)
        same = leaderboards(seq) == leaderboards(par)
        print(f"\n--jobs {a.jobs} / --jobs 1 wall time: {tn / t1:.2f}x ({tn:.0f} s vs {t1:.0f} s); leaderboards equal "
              f"(cost columns aside): {'yes' if same else 'NO'}")
        rows = simulate(seq, a.simulate)
        print(f"\nscheduler replay over the sequential run's stage times ({rows[0][1]:.0f} s of stage time; the rest "
              f"of the sequential wall time, {t1 - rows[0][1]:.0f} s, is the driver's planning, start-up and writing):")
        for n, wall, ratio in rows:
            print(f"  {n} worker(s): {wall:7.0f} s  {ratio:.2f}x of one worker")


if __name__ == "__main__":
    main()
