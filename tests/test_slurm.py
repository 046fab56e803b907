"""The slurm executor against a real Slurm cluster (`.ci/slurm`; CI starts one through `.ci/with-slurm`): the same
leaderboard as the sequential run, no barrier between subjects, a cancelled job retried, and a driver killed with
kill -9 whose jobs the next `bench run` adopts (nothing runs twice). Skipped, saying why, where no cluster is up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from bench.cli import main
from tests.conftest import REPO, write_suite
from tests.test_exec import _artifacts


TWO_SUBJECTS = """
name: micro
datasets: [{name: synthetic, num_subjects: 2}]
defenses: [{name: test-slow, subject: synth-00}]
scenarios: [clean]
attacks: [{name: dreambooth, max_train_steps: 2, num_class_images: 2}]
metrics: [brisque]
seeds: [0]
"""
ONE_SUBJECT = TWO_SUBJECTS.replace("num_subjects: 2", "num_subjects: 1")
# one CPU per job (the node has this machine's cores); small CPU stages share a job
CLUSTER_PROFILE = "default: {gpus: 0, cpus: 1, mem_gb: 2, time_min: 10}\ncompose: {group: 8}\nmeasure: {group: 8}\n"


def _cluster_problem() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    if not os.environ.get("SLURM_CONF"):
        return ("no Slurm cluster: SLURM_CONF is unset (CI runs the tests through .ci/with-slurm; by hand, as root: "
                "eval \"$(.ci/slurm start --install)\")")
    missing = [t for t in ("sbatch", "squeue", "scancel", "sacct") if not shutil.which(t)]
    if missing:
        return f"no Slurm cluster: {', '.join(missing)} not on PATH"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install -e '.[cluster]')"
    info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0 or not any(s.startswith(("idle", "mixed", "allocated")) for s in info.stdout.split()):
        return f"the Slurm cluster of {os.environ['SLURM_CONF']} has no usable node: {info.stdout or info.stderr}"
    acct = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=60)
    if acct.returncode != 0:
        return f"Slurm accounting is off (sacct: {acct.stderr.strip()}): submitit could not see a cancelled job"
    return None


PROBLEM = _cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")]


@pytest.fixture(scope="module")
def reference(warm_models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """The one- and two-subject suites and their sequential runs (in this process, --jobs 1): {name: (suite, out)}."""
    refs = {}
    for name, body in (("one", ONE_SUBJECT), ("two", TWO_SUBJECTS)):
        d = tmp_path_factory.mktemp(f"slurm-{name}")
        suite = write_suite(d, body)
        shutil.copytree(warm_models, d / "seq" / "cache" / "model")
        assert main(["run", "--suite", str(suite), "--out", str(d / "seq"), "--jobs", "1"]) == 0
        refs[name] = suite, d / "seq"
    return refs


def _slurm_args(tmp_path: Path) -> list[str]:
    profile = tmp_path / "cluster.yaml"
    profile.write_text(CLUSTER_PROFILE)
    return ["--executor", "slurm", "--executor-opt", f"profile={profile}", "--executor-opt", "poll_s=0.5",
            "--jobs", "16"]


def _last_job_id() -> int:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-a", "-o", "JobID", "-S", "now-1days"], capture_output=True,
                         text=True, check=True).stdout.split()
    return max((int(j) for j in out if j.isdigit()), default=0)


def _sacct(after: int, expected: set[str]) -> dict[str, dict]:
    """Jobs with ids above ``after`` once every ``expected`` id is known to accounting (slurmdbd records a job a moment
    after it ends) and none is still ending: {id: {State, Start, End, TotalCPU}} (times to the second, ISO: they sort;
    TotalCPU in seconds, over the job's steps)."""
    for _ in range(300):
        out = subprocess.run(["sacct", "-n", "-P", "-a", "-o", "JobID,State,Start,End,TotalCPU", "-S", "now-1days"],
                             capture_output=True, text=True, check=True).stdout
        jobs: dict[str, dict] = {}
        for line in out.splitlines():
            job_id, state, start, end, cpu = line.split("|")
            if job_id.isdigit() and int(job_id) > after:
                jobs[job_id] = {"State": state.split()[0], "Start": start, "End": end, "TotalCPU": _seconds(cpu)}
        if expected <= set(jobs) and not any(j["State"] in ("PENDING", "RUNNING", "COMPLETING") for j in jobs.values()):
            return jobs
        time.sleep(0.2)  # a job writes its result file before Slurm records its end
    return jobs


def _seconds(cpu: str) -> float:
    """sacct's [D-][HH:]MM:SS[.mmm] in seconds."""
    days, _, rest = cpu.rpartition("-")
    return int(days or 0) * 86400 + sum(float(p) * 60 ** i for i, p in enumerate(reversed(rest.split(":"))))


def _ledger(out: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _running(out: Path, kind: str, subject: str) -> str | None:
    """The job id of ``subject``'s ``kind`` stage if the driver recorded it and Slurm runs it, else None."""
    if not (out / "ledger.sqlite").is_file():
        return None
    try:
        rows = _ledger(out, "SELECT label, job_id FROM stages WHERE kind = ? AND state = 'running' AND job_id != ''",
                       (kind,))
    except sqlite3.Error:  # the driver is creating it
        return None
    ids = [j for label, j in rows if label.endswith(subject)]
    return ids[0] if ids and _job_state(ids[0]) == "RUNNING" else None


def _when(ready: Callable[[], object], then: Callable[[], None], timeout: float = 240) -> threading.Thread:
    """A thread calling ``then`` once ``ready()`` is truthy (polled every 0.2 s), or after ``timeout`` s."""
    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready():
            time.sleep(0.2)
        then()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _board(out: Path) -> pd.DataFrame:
    from bench.leaderboard import COST_COLS  # measured wall time and memory: not part of the result

    return pd.read_csv(out / "leaderboards" / "micro.csv").drop(columns=COST_COLS, errors="ignore")


def _runs(out: Path) -> list[tuple]:
    return _ledger(out, "SELECT key, kind, label, attempt, ok, job_id, error FROM stage_runs ORDER BY at")


def _cost(jobs: dict[str, dict]) -> str:
    return f"{len(jobs)} jobs, {sum(j['TotalCPU'] for j in jobs.values()):.1f} s CPU"


def test_cluster_equals_sequential_retries_a_cancelled_job_and_has_no_barrier(reference, out_dir, tmp_path,
                                                                             monkeypatch, capsys):
    """One run for three properties (each cluster job costs seconds of imports): synth-00's protect job is cancelled
    mid-stage and retried; its second attempt waits until synth-01's attack runs (with a barrier between plan depths
    it would wait 5 minutes, and end after); the leaderboard and artifacts are the sequential run's."""
    suite, seq = reference["two"]
    release = tmp_path / "release"
    monkeypatch.setenv("TEST_SLOW_RELEASE", str(release))  # synth-00's protect job waits for it
    first = _last_job_id()
    cancelled: list[str] = []

    def cancel() -> None:
        job = _running(out_dir, "protect", "synth-00")
        if job:
            subprocess.run(["scancel", job], check=True)
            while _job_state(job):
                time.sleep(0.2)
            cancelled.append(job)

    waiters = [_when(lambda: _running(out_dir, "protect", "synth-00"), cancel),
               _when(lambda: cancelled and _running(out_dir, "attack", "synth-01"),
                     lambda: (time.sleep(1.5), release.touch()))]
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), *_slurm_args(tmp_path)]) == 0
    for w in waiters:
        w.join()
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["executor"].startswith("slurm (slurm)") and s["cells_ok"] == 2 and s["attempts_retried"] == 1
    runs = _runs(out_dir)
    jobs = _sacct(first, {r[5] for r in runs})
    assert set(jobs) == {r[5] for r in runs}
    assert [j for j, v in jobs.items() if v["State"] != "COMPLETED"] == cancelled and len(cancelled) == 1
    assert jobs[cancelled[0]]["State"] == "CANCELLED"
    protect0 = [r for r in runs if r[1] == "protect" and r[2].endswith("synth-00")]
    assert [(r[3], r[4], r[5]) for r in protect0][0] == (1, 0, cancelled[0]) and f"job {cancelled[0]}" in protect0[0][6]
    assert [(r[3], r[4]) for r in protect0[1:]] == [(2, 1)]
    others = [r for r in runs if r not in protect0]
    assert all(r[3] == 1 and r[4] == 1 for r in others) and len(others) == s["stages_total"] - 2  # not model, protect0
    attack1 = next(r for r in runs if r[1] == "attack" and r[2].endswith("synth-01"))
    assert jobs[attack1[5]]["Start"] < jobs[protect0[1][5]]["End"], (jobs[attack1[5]], jobs[protect0[1][5]])
    pd.testing.assert_frame_equal(_board(seq), _board(out_dir))
    assert _artifacts(seq) == _artifacts(out_dir)
    with capsys.disabled():
        print(f"\ncluster run with a cancelled job: {_cost(jobs)}")


def test_killed_driver_jobs_are_adopted_and_nothing_runs_twice(reference, out_dir, tmp_path, monkeypatch, capsys):
    suite, seq = reference["one"]
    release = tmp_path / "release"
    monkeypatch.setenv("TEST_SLOW_RELEASE", str(release))
    first = _last_job_id()
    cmd = [sys.executable, "-c", "import sys, tests.plugins_for_tests; from bench.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "run", "--suite", str(suite), "--out", str(out_dir), *_slurm_args(tmp_path)]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (_running(out_dir, "class_images", "")
                                          and _running(out_dir, "protect", "synth-00")):
        assert driver.poll() is None, "the driver ended before it was killed"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)  # as kill -9 or a dropped SSH session: its jobs run on
    driver.wait()
    left = _ledger(out_dir, "SELECT kind FROM stages WHERE state = 'running' AND job_id != ''")
    assert sorted(k for k, in left) == ["class_images", "protect"]
    # the protect job ends while no driver follows it; the class-image job still runs when the next driver starts
    release.touch()
    assert main(["run", "--suite", str(suite), "--out", str(out_dir), *_slurm_args(tmp_path)]) == 0
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["jobs_adopted"] == 2 and s["cells_ok"] == 1
    runs = _runs(out_dir)
    jobs = _sacct(first, {r[5] for r in runs})
    # every stage ran once, in one job: the ledger's jobs are all the jobs sacct knows, each stage has one attempt
    assert set(jobs) == {r[5] for r in runs} and all(j["State"] == "COMPLETED" for j in jobs.values()), jobs
    assert len(runs) == len({r[0] for r in runs}) == s["stages_total"] - 1 and all(r[3] == 1 and r[4] for r in runs)
    pd.testing.assert_frame_equal(_board(seq), _board(out_dir))
    with capsys.disabled():
        print(f"\nkill -9 + rerun: {_cost(jobs)} for {len(runs)} stages, {s['jobs_adopted']} adopted")
