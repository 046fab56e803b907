"""The scheduler and the parallel local executor: no barrier between plan depths, bounded work in flight, retries
recorded per attempt, failures confined to their cells, worker processes giving the sequential results, Ctrl-C and
resume, `bench status`."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from bench.cli import main
from bench.scheduler import Finished, run_dag
from bench.stages import StageResult
from tests.conftest import MICRO, REPO, write_suite


class FakeExecutor:
    """``slots`` workers on a virtual clock: each stage takes ``cost[key]`` time units; ``fails[key]`` attempts fail."""

    def __init__(self, stages, slots: int, cost: dict[str, float], fails: dict[str, int]) -> None:
        self.stages, self.slots, self.cost, self.fails = stages, slots, cost, dict(fails)
        self.now, self.running, self.queued = 0.0, {}, []
        self.log: list[tuple[str, float, float]] = []  # (key, start, end)
        self.max_in_flight = 0

    def has_room(self, kind: str) -> bool:
        return len(self.running) < self.slots

    def submit(self, key: str) -> None:
        self.running[key] = self.now
        self.queued.append(key)
        self.max_in_flight = max(self.max_in_flight, len(self.running))

    def flush(self):
        out, self.queued = [(k, "fake", f"job-{k}") for k in self.queued], []
        return out

    def wait(self):
        key = min(self.running, key=lambda k: (self.running[k] + self.cost.get(k, 1.0), k))
        start = self.running.pop(key)
        self.now = start + self.cost.get(key, 1.0)
        self.log.append((key, start, self.now))
        ok = self.fails.get(key, 0) == 0
        if not ok:
            self.fails[key] -= 1
        return [Finished(key, StageResult(key, ok, error="" if ok else "boom"), "fake", f"job-{key}")]


class Recorder:
    def __init__(self) -> None:
        self.attempts: list[tuple[str, int, bool, bool]] = []
        self.finished: list[str] = []
        self.failures: dict[str, str] = {}

    def started(self, key, attempt, where, job_id):
        assert job_id == f"job-{key}"

    def attempt(self, fin, attempt, final):
        self.attempts.append((fin.key, attempt, fin.result.ok, final))

    def done(self, key):
        self.finished.append(key)

    def failed(self, key, reason):
        self.failures[key] = reason


def _chain_plan(subjects: int) -> dict:
    """Per subject: protect -> compose -> attack -> generate -> measure (the plan's shape, without the models)."""
    stages = {}
    for s in range(subjects):
        prev: tuple = ()
        for kind in ("protect", "compose", "attack", "generate", "measure"):
            key = f"{kind}{s}"
            stages[key] = SimpleNamespace(kind=kind, label=f"{kind} s{s}", deps=prev)
            prev = (key,)
    return stages


def test_scheduler_has_no_barrier_bounds_work_and_retries():
    stages = _chain_plan(3)
    cost = {"protect0": 20.0}  # one slow protect stage; everything else takes 1
    ex = FakeExecutor(stages, slots=2, cost=cost, fails={"attack1": 1, "protect2": 9})
    ev = Recorder()
    failed = run_dag(list(stages), stages, ex, retries=2, events=ev)
    when = {k: (s, e) for k, s, e in ex.log}
    assert ex.max_in_flight == 2
    # subject 1's attack (and its whole chain) ends before subject 0's slow protect does: no barrier between depths
    assert when["measure1"][1] < when["protect0"][1]
    # a stage failing once is retried and recorded as two attempts; one that keeps failing fails its chain only
    assert [a for a in ev.attempts if a[0] == "attack1"] == [("attack1", 1, False, False), ("attack1", 2, True, True)]
    assert [a[1] for a in ev.attempts if a[0] == "protect2"] == [1, 2, 3]
    assert set(failed) == {"protect2", "compose2", "attack2", "generate2", "measure2"}
    assert all("protect s2" in r and "after 3 attempts" in r for r in failed.values())
    assert set(ev.finished) == {k for k in stages if not k.endswith("2")}


def test_scheduler_with_one_slot_keeps_the_plan_order():
    stages = _chain_plan(2)
    ex = FakeExecutor(stages, slots=1, cost={}, fails={})
    run_dag(list(stages), stages, ex, retries=0, events=Recorder())
    assert [k for k, _, _ in ex.log] == list(stages)


class KindSlotsExecutor(FakeExecutor):
    """Separate pools per stage kind (the local executor's GPU and CPU workers); counts ``has_room`` calls."""

    def __init__(self, stages, slots: dict[str, int]) -> None:
        super().__init__(stages, slots=0, cost={}, fails={})
        self.kind_slots, self.room_calls = slots, 0

    def has_room(self, kind: str) -> bool:
        self.room_calls += 1
        return sum(self.stages[k].kind == kind for k in self.running) < self.kind_slots[kind]


def test_scheduler_fills_each_pool_in_plan_order_without_rescanning_the_queue():
    n = 3000  # a large grid: thousands of measure stages wait behind one busy attack worker
    stages = {f"attack{i}": SimpleNamespace(kind="attack", label=f"attack {i}", deps=()) for i in range(3)}
    stages.update({f"measure{i}": SimpleNamespace(kind="measure", label=f"measure {i}", deps=()) for i in range(n)})
    ex = KindSlotsExecutor(stages, {"attack": 1, "measure": 2})
    run_dag(list(stages), stages, ex, retries=0, events=Recorder())
    started = [k for k, _, _ in sorted(ex.log, key=lambda r: (r[1], list(stages).index(r[0])))]
    assert [k for k in started if k.startswith("attack")] == ["attack0", "attack1", "attack2"]
    assert [k for k in started if k.startswith("measure")] == [f"measure{i}" for i in range(n)]
    assert {k for k, start, _ in ex.log if start == 0.0} == {"attack0", "measure0", "measure1"}  # both pools full
    # a refused kind is not asked again in the same pass: O(stages) calls (the old rescan made ~n^2 / 2 = 4.5 M)
    assert ex.room_calls < 4 * len(stages)


def _artifacts(out: Path) -> dict[str, str]:
    """sha256 of every artifact file except records (timings) and the copied base models."""
    cache = out / "cache"
    return {p.relative_to(cache).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*")) if p.is_file() and p.name != "done.json"
            and p.relative_to(cache).parts[0] != "model"}


def _pids(out: Path) -> set[int]:
    db = sqlite3.connect(out / "ledger.sqlite")
    hosts = [r[0] for r in db.execute("SELECT host FROM stage_runs UNION SELECT host FROM stages")]
    db.close()
    return {int(m) for h in hosts if h for m in re.findall(r"pid (\d+)", h)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").is_file() or ") Z " not in Path(f"/proc/{pid}/stat").read_text()


def test_two_workers_equal_sequential_and_ctrl_c_resumes(out_dir, tmp_path):
    import shutil

    suite = write_suite(tmp_path, MICRO.replace("max_train_steps: 4", "max_train_steps: 2")
                        .replace("metrics: [linf, psnr, brisque]", "metrics: [linf, psnr]"))
    seq = tmp_path / "seq"
    shutil.copytree(out_dir / "cache" / "model", seq / "cache" / "model")
    assert main(["run", "--suite", str(suite), "--out", str(seq), "--jobs", "1"]) == 0
    assert json.loads((seq / "summary.json").read_text())["executor"].startswith("local: 1 stage at a time")

    cmd = [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite), "--out", str(out_dir), "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we ignore it
    deadline = time.time() + 180
    while time.time() < deadline and not list((out_dir / "cache").glob("compose/*/done.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    workers = _pids(out_dir) - {proc.pid}
    assert workers and not any(_alive(p) for p in workers), "Ctrl-C left worker processes behind"

    assert main(["status", "--out", str(out_dir)]) == 0
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), "--jobs", "2"]) == 0
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["executor"] == "local: 2 cpu worker(s)" and s["stages_cached"] > 1 and s["stages_run"] > 0
    from bench.leaderboard import COST_COLS  # measured wall time and memory: not part of the result

    a = pd.read_csv(seq / "leaderboards" / "micro.csv").drop(columns=COST_COLS, errors="ignore")
    b = pd.read_csv(out_dir / "leaderboards" / "micro.csv").drop(columns=COST_COLS, errors="ignore")
    pd.testing.assert_frame_equal(a, b)
    assert _artifacts(seq) == _artifacts(out_dir)


def test_worker_death_is_retried_and_a_failing_stage_fails_only_its_cells(out_dir, tmp_path, capsys):
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]",
                         f"defenses: [{{name: test-flaky, label: dies-once, marker: '{tmp_path / 'm'}', mode: exit}}, "
                         f"{{name: test-flaky, label: broken, mode: always}}]").replace(
                         "metrics: [linf, psnr, brisque]", "metrics: [linf]")
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), "--jobs", "2", "--retries", "1"]) == 1
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["cells_ok"] == 1 and s["cells_failed"] == 1 and s["attempts_retried"] == 2
    (cell, reason), = s["failures"].items()
    assert "broken" in cell and "fails on every attempt" in reason and "after 2 attempts" in reason
    db = sqlite3.connect(out_dir / "ledger.sqlite")
    runs = db.execute("SELECT label, attempt, ok, error, host FROM stage_runs WHERE kind = 'protect' "
                      "ORDER BY label, attempt").fetchall()
    dies = [r for r in runs if "dies-once" in r[0]]
    assert [(r[1], r[2]) for r in dies] == [(1, 0), (2, 1)]
    assert "worker process died (exit code 3)" in dies[0][3] and "local cpu worker" in dies[0][4]
    assert [(r[1], r[2]) for r in runs if "broken" in r[0]] == [(1, 0), (2, 0)]
    capsys.readouterr()
    assert main(["status", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "0 queued, 0 running, 7 done, 5 failed" in out and "FAILED protect" in out  # protect and its 4 dependants


def test_jobs_left_by_a_killed_driver_are_adopted_not_submitted_again(tmp_path):
    """What the next driver does with the attempts a killed one left `running` with a job id (the real-Slurm version
    is tests/test_slurm.py): finished -> its attempt recorded; still running -> waited for, never resubmitted;
    lost -> a failed attempt recorded and the stage run again as the next attempt."""
    from bench.ledger import Ledger
    from bench.runner import adopt_left_jobs
    from bench.store import ArtifactStore

    stages = _chain_plan(3)
    ledger, store = Ledger(tmp_path / "ledger.sqlite"), ArtifactStore(tmp_path / "cache")
    ledger.set_states([(k, s.kind, s.label, "queued") for k, s in stages.items()])
    for key, job in (("protect0", "11"), ("protect1", "12"), ("protect2", "13")):
        ledger.set_state(key, "running", attempts=2 if key == "protect2" else 1, host="slurm (slurm)", job_id=job)
    tmp = store.begin("protect", "protect0")  # protect0's job finished while no driver followed it
    store.commit("protect", "protect0", tmp, {"key": "protect0", "wall_s": 3.0})

    class Following:
        asked: dict = {}

        def adopt(self, jobs):
            Following.asked = dict(jobs)
            return {"protect2": "job 13 ended CANCELLED while no driver followed it"}

    todo = [k for k in stages if k != "protect0"]
    adopted, earlier, n = adopt_left_jobs(ledger, stages, store, todo, Following())
    assert Following.asked == {"protect1": "12", "protect2": "13"}
    assert adopted == {"protect1": 1} and earlier == {"protect2": 2} and n == 2
    rows = ledger.db.execute("SELECT key, attempt, ok, job_id, error, wall_s FROM stage_runs ORDER BY key").fetchall()
    assert rows == [("protect0", 1, 1, "11", "", 3.0),
                    ("protect2", 2, 0, "13", "job 13 ended CANCELLED while no driver followed it", None)]
    ledger.close()

    ex = FakeExecutor(stages, slots=4, cost={}, fails={})
    ex.running["protect1"] = 0.0  # its job runs on; the executor reports it when it ends
    ev = Recorder()
    ev.started = lambda key, attempt, where, job_id: ev.attempts.append((key, attempt, "started", None))
    assert run_dag(todo, stages, ex, retries=2, events=ev, adopted=adopted, earlier=earlier) == {}
    started = [(a[0], a[1]) for a in ev.attempts if a[2] == "started"]
    assert ("protect1", 2) not in started and not any(k == "protect1" for k, _ in started)
    assert ("protect2", 3) in started and set(ev.finished) == set(todo)
