"""The driver of ``bench run``: plan, execute missing stages through an executor, write the ledger, the
leaderboard and ``summary.json``. Only this process writes the ledger."""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import importlib.metadata
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.ledger import Ledger
from bench.planner import Cell, Plan, build_plan
from bench.scheduler import Finished, run_dag
from bench.plugins import EXECUTORS
from bench.profiles import Profile, get_profile, resolve_device
from bench.registry import ConfigError, load_builtins
from bench.stages import StageEnv, StageResult, run_stage
from bench.store import ArtifactStore, atomic_write_json
from bench.suites import Suite, load_suite


@dataclass
class RunOptions:
    suite: str
    profile: str = "tiny"
    out: Path = Path("runs")
    data: dict[str, Path] = field(default_factory=dict)
    executor: str = "local"
    executor_params: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    allow_unsafe_weights: bool = False
    keep_weights: bool = False  # keep fine-tuned weights after their images were generated
    device: str | None = None
    progress: bool | None = None  # None: only on a terminal
    jobs: int = 0  # workers / jobs in flight (--jobs); 0: the executor's default (local: every core or GPU)
    retries: int = 2  # further attempts of a failed stage (bad input is never retried)


@dataclass
class Prepared:
    suite: Suite
    profile: Profile
    plan: Plan
    subject_errors: dict[str, str]  # subject key -> why it could not be listed
    subjects: dict[str, list] = field(default_factory=dict)  # dataset label -> its subjects
    cannot_run: list[str] = field(default_factory=list)  # well formed, but missing weights/models/modules here
    warnings: list[str] = field(default_factory=list)  # runs, but some columns cannot measure anything at this scale


def prepare(opts: RunOptions, runnable: bool = True) -> Prepared:
    """Everything that can fail before any work: suite, profile, datasets, plan (ConfigError -> exit 2).
    ``runnable``: also refuse a suite that is well formed but cannot run here (every missing plug-in module, metric
    weight and model checkpoint said at once, with the fetch commands); else they are listed in ``cannot_run``."""
    load_builtins()
    profile = get_profile(opts.profile)
    suite = load_suite(opts.suite, profile.name, opts.data, runnable=False)
    if suite.models:  # a suite may fix models per profile (APDM fine-tunes SD1.5 in every row)
        roles = {role: profile.models.get(ref, ref) for role, ref in suite.models.items()}
        profile = dataclasses.replace(profile, models={**profile.models, **roles})
    subjects: dict[str, list] = {}
    for d in suite.datasets:
        root = Path(d.extra["root"]).expanduser() if d.extra.get("root") else None
        if root is not None and not root.is_dir():
            raise ConfigError(f"--data {d.name}={root}: " + ("a file, not a folder" if root.exists() else "no such folder"))
        try:
            subjects[d.label] = d.create().subjects(root)
        except ValueError as e:  # DataError: wrong layout, empty root
            raise ConfigError(f"dataset {d.name} at {root}: {e}") from None
        if not subjects[d.label]:
            raise ConfigError(f"dataset {d.name} at {root}: no subjects found")
    plan = build_plan(suite, profile, subjects)
    if not plan.cells:
        raise ConfigError(f"{suite.path}: the grid is empty (no cell to run: check datasets, defenses, scenarios, "
                          f"attacks and seeds)")
    EXECUTORS.create(opts.executor, opts.executor_params, where=f"--executor {opts.executor}")  # validate early
    cannot_run = suite.cannot_run() + missing_models(plan)
    if runnable and cannot_run:
        raise ConfigError("cannot run here:\n  " + "\n  ".join(cannot_run))
    return Prepared(suite, profile, plan, {}, subjects, cannot_run, scale_warnings(suite, profile, subjects))


def missing_models(plan: Plan) -> list[str]:
    """Each checkpoint the plan loads that is not here (a local folder or the Hugging Face cache), with the download
    command: found before anything runs, said once (not the same failure in every cell)."""
    from bench import models

    missing = []
    for st in plan.stages.values():
        if st.kind == "model" and "pretrain" not in st.params:  # built-in families are built, not resolved
            try:
                models.resolve_model(st.params["ref"])
            except models.ModelUnavailable as e:
                missing.append(str(e))
    return sorted(set(missing))


def scale_warnings(suite: Suite, profile: Profile, subjects: dict[str, list]) -> list[str]:
    """Metric columns that will be empty or constant at this scale, said before the run (``Metric.cannot_measure``),
    once per metric and dataset."""
    from bench.models import builtin_family

    harness_models = all(builtin_family(ref) for ref in profile.models.values())
    out = []
    for label, subs in subjects.items():
        reasons: dict[str, list[str]] = {}
        for m in suite.metrics:
            metric = m.create()
            why = metric.cannot_measure(profile.resolution, harness_models) if any(map(metric.applies_to, subs)) else None
            if why:
                reasons.setdefault(why, []).append(m.label)
        out += [f"{', '.join(labels)} on {label} at the {profile.name} profile: {why}" for why, labels in reasons.items()]
    return out


def describe_plan(p: Prepared) -> str:
    from collections import Counter

    kinds = Counter(s.kind for s in p.plan.stages.values())
    lines = [f"suite {p.suite.name} ({p.suite.path}), profile {p.profile.name}",
             f"cells: {len(p.plan.cells)}",
             f"unique stage executions: {len(p.plan.stages)} ({', '.join(f'{k} {v}' for k, v in kinds.items())})",
             f"naive per-cell stage executions: {p.plan.naive_stage_count()}"]
    if p.plan.stages:
        lines.append(f"sharing factor: {p.plan.naive_stage_count() / len(p.plan.stages):.1f}x")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return rev.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "pkg-" + _version("antipersonalization-bench")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    names = ["torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "brisque", "dlib-bin"]
    return {"python": sys.version.split()[0], **{n: _version(n) for n in names}}


@dataclass
class StageCall:
    """Picklable ``key -> StageResult`` for executors that ship work to other processes."""

    env: StageEnv

    def __call__(self, key: str) -> StageResult:
        return run_stage(self.env.stages[key], self.env)


class _OutLock:
    """One driver per output folder."""

    def __init__(self, out: Path) -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.f = open(out / ".lock", "w")
        except OSError as e:  # a file, a path under a file, a read-only folder, a full disk
            raise ConfigError(f"--out {out}: cannot write results there ({e.strerror or e}); pick another folder") from None
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out} is in use by another `bench run`; wait for it or pick another --out") from None

    def release(self) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def execute(p: Prepared, opts: RunOptions) -> dict[str, Any]:
    out = Path(opts.out)
    lock = _OutLock(out)
    try:
        return _execute(p, opts, out)
    finally:
        lock.release()


def _execute(p: Prepared, opts: RunOptions, out: Path) -> dict[str, Any]:
    started = time.time()
    store = ArtifactStore(out / "cache")
    store.clean_temps()
    ledger = Ledger(out / "ledger.sqlite")
    device = opts.device or resolve_device(p.profile)
    show = sys.stderr.isatty() if opts.progress is None else opts.progress
    stages = p.plan.stages
    executor = EXECUTORS.create(opts.executor, opts.executor_params, where=f"--executor {opts.executor}")

    repaired: dict[str, str] = {}
    cached, todo = verified_plan(stages, store, repaired)
    cached |= {k for k in stages if k not in todo}  # pruned stages nobody needs again count as done
    overall = tqdm(total=len(stages), initial=len(cached), desc="stages", unit="stage", disable=not show)
    inner = tqdm(total=0, desc="", leave=False, disable=not show)

    def progress(done: int, total: int) -> None:
        if inner.total != total:
            inner.reset(total=total)
        inner.n = done
        inner.refresh()

    env = StageEnv(store=store, stages=stages, profile=p.profile.name, device=device,
                   allow_unsafe_weights=opts.allow_unsafe_weights, progress=progress)
    executor.start(StageCall(env), opts.jobs)
    workers = executor.describe()
    events = _LedgerEvents(ledger, stages, store, consumers_of(stages), opts.keep_weights, overall)
    adopted, earlier, n_adopted = adopt_left_jobs(ledger, stages, store, todo, executor)
    ledger.set_states([(k, stages[k].kind, stages[k].label, "done") for k in cached]
                      + [(k, stages[k].kind, stages[k].label, "running" if k in adopted else "queued") for k in todo])
    events.running |= set(adopted)
    try:
        failed = run_dag(todo, stages, executor, opts.retries, events, adopted, earlier)
    except BaseException:  # Ctrl-C: stop the workers; finished stages stay, the next run resumes
        executor.stop(interrupted=True)
        for k in events.running:
            ledger.set_state(k, "queued", reason="interrupted")
        ledger.close()
        inner.close()
        overall.close()
        raise
    executor.stop()
    inner.close()
    overall.close()
    ran = events.ran

    cells_ok, failures = 0, {}
    for cell in p.plan.cells:
        status, reason, metrics, notes = _finalise_cell(cell, store, stages, failed)
        prov = _provenance(cell, store, stages, p.profile)
        if notes:
            prov["metric_notes"] = notes
        ledger.put_cell(p.suite.name, p.profile.name, cell.cell_id, cell.keys, status, reason, metrics, prov)
        if status == "ok":
            cells_ok += 1
        else:
            failures[_cell_name(cell)] = reason
    plan_ids = {c.cell_id for c in p.plan.cells}
    rows = [r for r in ledger.cells(p.suite.name, p.profile.name) if r["cell_id"] in plan_ids]
    from bench.leaderboard import write_leaderboard  # pandas: not for `bench validate`
    from bench.results import directions, metric_info_of

    info = metric_info_of(st.params for st in stages.values() if st.kind == "measure")
    csv_path, md_path = write_leaderboard(rows, out, p.suite.name, directions(info))
    ledger.close()
    summary = {
        "suite": p.suite.name, "profile": p.profile.name, "device": device, "code_rev": code_revision(),
        "cells_total": len(p.plan.cells), "cells_ok": cells_ok, "cells_failed": len(failures),
        "stages_total": len(stages), "stages_run": len(ran), "stages_cached": len(cached),
        "stages_failed": len([k for k in failed if k in todo]), "attempts_retried": events.retried,
        "jobs_adopted": n_adopted,
        "executor": workers,
        "damaged_artifacts_recomputed": repaired,
        "naive_stage_executions": p.plan.naive_stage_count(),
        "failures": failures, "leaderboard_csv": str(csv_path), "leaderboard_md": str(md_path),
        "wall_s": round(time.time() - started, 2), "warnings": p.warnings,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def adopt_left_jobs(ledger: Ledger, stages, store: ArtifactStore, todo: list[str],
                    executor) -> tuple[dict[str, int], dict[str, int], int]:
    """Attempts an earlier driver of this --out left running with a job id (it was killed, or its SSH session
    dropped), so that nothing is submitted twice: one whose stage is now done in the store (it verified) is recorded
    as the successful attempt it was; one whose inputs are done is handed to ``executor.adopt`` (still pending or
    running: waited for; finished: collected; failed or gone: recorded as a failed attempt, and run again). Returns
    (adopted {key: attempts}, earlier attempts {key: n} of the stages to run again, attempts adopted)."""
    run = set(todo)
    left = {s["key"]: s for s in ledger.stage_states()
            if s["state"] == "running" and s["job_id"] and s["key"] in stages}
    follow, earlier, finished = {}, {}, 0
    for k, s in left.items():
        st = stages[k]
        if k not in run and (store.path(st.kind, k) / "done.json").is_file():
            ledger.put_stage_run(k, st.kind, st.label, True, "", store.record(st.kind, k), s["attempts"], s["host"],
                                 s["job_id"])
            finished += 1
        elif k in run and not any(d in run for d in st.deps):
            follow[k] = s["job_id"]
        elif k in run:
            earlier[k] = s["attempts"]
    lost = executor.adopt(follow) if follow else {}
    for k, why in lost.items():
        st, s = stages[k], left[k]
        ledger.put_stage_run(k, st.kind, st.label, False, why, None, s["attempts"], s["host"], s["job_id"])
        print(f"attempt {s['attempts']} of {st.label}: {why}; running it again", file=sys.stderr)
        earlier[k] = s["attempts"]
    adopted = {k: left[k]["attempts"] for k in follow if k not in lost}
    if finished or adopted:
        print(f"adopted {finished + len(adopted)} attempt(s) of an earlier run: {finished} finished, "
              f"{len(adopted)} still running", file=sys.stderr)
    return adopted, earlier, finished + len(adopted)


def verified_plan(stages, store: ArtifactStore, repaired: dict[str, str]) -> tuple[set[str], list[str]]:
    """(finished stages whose artifacts verify, stages to run). Every finished stage of the plan is checked cheaply;
    the inputs of stages about to run are checked fully (weights, images) before anything reads them. A damaged
    artifact is discarded, said on stderr and in ``repaired`` (label -> reason), and recomputed with its dependants."""
    def check(key: str, full: bool) -> bool:
        st = stages[key]
        reason = store.verify(st.kind, key, full=full)
        if reason:
            repaired[st.label] = reason
            print(f"damaged artifact ({st.label}): {reason}; recomputing it", file=sys.stderr)
            store.discard(st.kind, key)
        return reason is None

    done = {k for k, s in stages.items() if store.is_done(s.kind, k) and check(k, full=False)}
    pruned = {k for k, s in stages.items() if store.is_pruned(s.kind, k)}
    checked: set[str] = set()
    while True:
        todo = needed_stages(stages, done, pruned)
        run = set(todo)
        inputs = {d for k in todo for d in stages[k].deps if d not in run and d in done and d not in checked}
        if not inputs:
            return done, todo
        checked |= inputs
        done -= {d for d in sorted(inputs) if not check(d, full=True)}


PRUNABLE = {"attack": "trained"}  # stage kind -> big artifact deleted once every consumer is done


def consumers_of(stages) -> dict[str, list[str]]:
    """Stage key -> keys of the stages that read its output."""
    consumers: dict[str, list[str]] = {k: [] for k in stages}
    for k, st in stages.items():
        for d in st.deps:
            consumers[d].append(k)
    return consumers


def needed_stages(stages, done: set[str], pruned: set[str]) -> list[str]:
    """Stages to run, in topological order: not done, and (unless only a pruned leftover) needed by a consumer
    that is itself to run. A pruned stage whose consumers are all done stays pruned."""
    consumers = consumers_of(stages)
    need: set[str] = set()
    for k in reversed(list(stages)):
        if k in done:
            continue
        if k in pruned and not any(c in need for c in consumers[k]):
            continue
        need.add(k)
    return [k for k in stages if k in need]


class _LedgerEvents:
    """The scheduler's transitions, written by the driver: stage states, one ``stage_runs`` row per attempt, progress,
    and pruning of fine-tuned weights once every consumer is done."""

    def __init__(self, ledger: Ledger, stages, store: ArtifactStore, consumers, keep_weights: bool, bar) -> None:
        self.ledger, self.stages, self.store, self.consumers = ledger, stages, store, consumers
        self.keep_weights, self.bar = keep_weights, bar
        self.running: set[str] = set()
        self.ran: set[str] = set()
        self.retried = 0

    def started(self, key: str, attempt: int, where: str, job_id: str) -> None:
        self.running.add(key)
        self.ledger.set_state(key, "running", attempts=attempt, host=where, job_id=job_id, reason="")

    def attempt(self, fin: Finished, attempt: int, final: bool) -> None:
        st, res = self.stages[fin.key], fin.result
        self.running.discard(fin.key)
        self.ledger.put_stage_run(fin.key, st.kind, st.label, res.ok, res.error, res.record, attempt, fin.where,
                                  fin.job_id)
        if not res.ok and not final:
            self.retried += 1
            print(f"attempt {attempt} of {st.label} failed ({res.error}); retrying", file=sys.stderr)
            self.ledger.set_state(fin.key, "queued", reason=res.error)

    def done(self, key: str) -> None:
        self.ran.add(key)
        self.ledger.set_state(key, "done")
        self.bar.update(1)
        if not self.keep_weights:
            _prune_consumed([key], self.stages, self.consumers, self.store)

    def failed(self, key: str, reason: str) -> None:
        self.ledger.set_state(key, "failed", reason=reason)
        self.bar.update(1)


def _prune_consumed(finished: list[str], stages, consumers: dict[str, list[str]], store: ArtifactStore) -> None:
    """Delete the big artifact of each input of ``finished`` stages whose consumers are now all done."""
    for k in {d for f in finished for d in stages[f].deps}:
        st = stages[k]
        if st.kind in PRUNABLE and store.is_done(st.kind, k):
            if all(store.is_done(stages[c].kind, c) for c in consumers[k]):
                store.prune(st.kind, k, PRUNABLE[st.kind])


def _cell_name(cell: Cell) -> str:
    k = cell.keys
    return f"{k['dataset']}/{k['subject']} | {k['defense']} | {k['scenario']} | {k['attack']} | seed {k['seed']}"


def _finalise_cell(cell: Cell, store: ArtifactStore, stages,
                   failed: dict[str, str]) -> tuple[str, str, dict, dict[str, str]]:
    """(status, failure reason, metric values, why a value is NaN or inf) of one cell."""
    for key in cell.stages:
        if key in failed:
            return "failed", failed[key], {}, {}
    metrics, notes = {}, {}
    for pid, key in cell.measures.items():
        value = json.loads((store.path("measure", key) / "value.json").read_text())
        metrics[pid] = value["value"]
        if "reason" in value:
            notes[pid] = value["reason"]
    return "ok", "", metrics, notes


def protect_cost(rec: dict) -> dict[str, Any]:
    """The protect stage's compute cost from its record: wall time, peak RSS (``peak_rss_scope`` "stage": during
    that stage; "process": since its process started) and peak CUDA memory (None on a CPU), with the number of
    published images they are for."""
    n = rec.get("extra", {}).get("n_images") or len([f for f in rec.get("files", {}) if f.startswith("images/")])
    return {"key": rec.get("key"), "wall_s": rec.get("wall_s"), "n_images": n or None,
            "peak_rss_mb": rec.get("peak_rss_mb"), "peak_rss_scope": rec.get("peak_rss_scope", "process"),
            "peak_gpu_mb": rec.get("peak_gpu_mb")}


def _provenance(cell: Cell, store: ArtifactStore, stages, profile: Profile) -> dict[str, Any]:
    wall, peak, weights, extra = 0.0, 0.0, {}, {}
    for key in cell.stages:
        st = stages[key]
        if not (store.path(st.kind, key) / "done.json").is_file():
            continue
        rec = store.record(st.kind, key)  # kept after pruning
        wall += rec.get("wall_s", 0.0)
        peak = max(peak, rec.get("peak_rss_mb") or 0.0)
        if st.kind == "model":
            ref = st.params["ref"]
            weights[ref] = rec["extra"].get("weights_sha256", {})
            pins = profile.expected_weight_sha256.get(ref)
            if pins:
                extra[f"weights_match_pin[{ref}]"] = all(weights[ref].get(c) == h for c, h in pins.items())
        if st.kind in ("protect", "compose", "purify"):
            extra.update({f"{st.kind}.{k}": v for k, v in rec.get("extra", {}).items()})
        if st.kind == "protect" and key == cell.protect:
            extra["protect_cost"] = protect_cost(rec)
    return {"config_hash": cell.config_hash, "config": cell.config, "code_rev": code_revision(),
            "versions": package_versions(), "seed": cell.keys["seed"], "wall_s": round(wall, 3),
            "peak_rss_mb": peak, "weights_sha256": weights, "stages": cell.stages, **extra}
