"""Executors (DESIGN.md "Execution"): the workers the scheduler (bench/scheduler.py) hands ready stages to.

``local``: the cores and GPUs of this machine (``--jobs 1``: one stage at a time in the driver process); ``slurm``:
jobs on a Slurm cluster through submitit, resources per stage kind from a cluster profile. Workers only write
artifacts; results come back to the driver, which alone writes the ledger.
"""
from __future__ import annotations

import dataclasses
import importlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.plugins import EXECUTORS, Executor
from bench.registry import ConfigError, Requirements
from bench.scheduler import Finished
from bench.stages import StageResult

CPU_ONLY_KINDS = frozenset({"compose"})  # stage kinds that never load a model: CPU workers on a CUDA run


def _no_progress(done: int, total: int) -> None:
    pass


def shipped(call: Callable[[str], Any]) -> Callable[[str], Any]:
    """``call`` made picklable for another process (progress bars stay in the driver)."""
    env = getattr(call, "env", None)
    if env is None:
        return call
    return dataclasses.replace(call, env=dataclasses.replace(env, progress=_no_progress))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def plugin_modules() -> list[str]:
    """Modules whose import registers the plug-ins this process knows (a spawned worker imports them too)."""
    from bench.plugins import REGISTRIES

    mods = {cls.__module__ for reg in REGISTRIES.values() for _, cls in reg.items()}
    return sorted(m for m in mods if m != "__main__")


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the driver dies (kill -9 included), so no orphan writes on."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(conn, env: dict[str, str], modules: list[str], parent: int) -> None:
    """A local worker: pinned by ``env`` (threads, GPU) before torch starts; runs stage keys sent by the driver."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _die_with_parent()
    if os.getppid() != parent:
        return
    os.environ.update(env)
    call = conn.recv()  # first, so that the driver never waits for this worker's imports
    from bench.cli import configure_threads, quiet_libraries
    from bench.registry import load_builtins

    quiet_libraries()
    configure_threads()
    load_builtins()
    for m in modules:
        importlib.import_module(m)
    while True:
        try:
            key = conn.recv()
        except EOFError:
            return
        if key is None:
            return
        conn.send(call(key))


class _Worker:
    def __init__(self, ctx, pool: str, slot: int, env: dict[str, str], call, modules: list[str]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, env, modules, os.getpid()),
                                name=f"bench-{pool}-{slot}")
        self.proc.start()
        child.close()
        self.conn.send(call)
        gpu = env.get("CUDA_VISIBLE_DEVICES")
        self.where = f"local {pool} worker {slot} (pid {self.proc.pid}" + (f", GPU {gpu}" if gpu else "") + \
                     f", {env['BENCH_CPU_THREADS']} thread(s))"
        self.key: str | None = None


class _Pool:
    """``size`` worker slots, started on first use and restarted after a crash."""

    def __init__(self, name: str, envs: list[dict[str, str]]) -> None:
        self.name, self.envs = name, envs
        self.workers: list[_Worker | None] = [None] * len(envs)

    def busy(self) -> int:
        return sum(w is not None and w.key is not None for w in self.workers)

    def idle_slot(self) -> int:
        for i, w in enumerate(self.workers):
            if w is not None and w.key is None:
                return i
        return self.workers.index(None)


@dataclass(frozen=True)
class LocalParams:
    pass


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """This machine. ``--jobs 1``: one stage at a time in the driver. Otherwise worker processes, each pinned to its
    share: on a CPU run one per core (``--jobs N``: N, cores/N torch threads each); on a CUDA run one per visible GPU
    (``CUDA_VISIBLE_DEVICES``; ``--jobs N``: N spread over the GPUs) for model stages, plus CPU workers for
    ``compose`` (``purify`` loads models: GPU workers). A worker that dies fails its attempt (retried) and is restarted."""

    Params = LocalParams

    def start(self, call: Callable[[str], Any], jobs: int = 0) -> None:
        self.call = call
        self.done: list[Finished] = []
        self.queue: list[str] = []
        self.pools: dict[str, _Pool] = {}
        self.started: list[tuple[str, str, str]] = []
        device = call.env.device
        n_cores = cores()
        gpu = device.startswith("cuda")
        if jobs == 1 or (not gpu and jobs == 0 and n_cores == 1):
            self.in_process = True
            return
        self.in_process = False
        self.ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited CUDA state or torch thread pools
        self.shipped = shipped(call)
        self.modules = plugin_modules()
        cpu_n = jobs if (jobs and not gpu) else n_cores
        cpu_env = {"BENCH_CPU_THREADS": str(max(1, n_cores // cpu_n)), "CUDA_VISIBLE_DEVICES": ""}
        self.pools["cpu"] = _Pool("cpu", [cpu_env] * cpu_n)
        if gpu:
            ids = visible_gpus() if device == "cuda" else []  # cuda:N names one device: workers share it
            n = jobs or max(1, len(ids))
            threads = str(max(1, n_cores // n))
            self.pools["gpu"] = _Pool("gpu", [{"BENCH_CPU_THREADS": threads,
                                               **({"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} if ids else {})}
                                              for i in range(n)])

    def describe(self) -> str:
        if self.in_process:
            return "local: 1 stage at a time in the driver"
        return "local: " + ", ".join(f"{len(p.envs)} {p.name} worker(s)" for p in self.pools.values())

    def _pool(self, kind: str) -> _Pool:
        return self.pools["gpu" if "gpu" in self.pools and kind not in CPU_ONLY_KINDS else "cpu"]

    def has_room(self, kind: str) -> bool:
        if self.in_process:
            return not self.queue
        pool = self._pool(kind)
        return pool.busy() < len(pool.workers)

    def submit(self, key: str) -> None:
        if self.in_process:
            self.queue.append(key)
            self.started.append((key, f"driver (pid {os.getpid()})", ""))
            return
        pool = self._pool(self.call.env.stages[key].kind)
        slot = pool.idle_slot()
        if pool.workers[slot] is not None and not pool.workers[slot].proc.is_alive():  # died while idle
            pool.workers[slot] = None
        if pool.workers[slot] is None:
            pool.workers[slot] = _Worker(self.ctx, pool.name, slot, pool.envs[slot], self.shipped, self.modules)
        w = pool.workers[slot]
        w.key = key
        w.conn.send(key)
        self.started.append((key, w.where, ""))

    def flush(self) -> list[tuple[str, str, str]]:
        out, self.started = self.started, []
        return out

    def wait(self) -> list[Finished]:
        if self.in_process:
            key = self.queue.pop()
            return [Finished(key, self.call(key), f"driver (pid {os.getpid()})")]
        busy = {w: (p, i) for p in self.pools.values() for i, w in enumerate(p.workers) if w and w.key}
        ready = set(mpc.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
        out = []
        for w, (pool, slot) in busy.items():
            if w.conn in ready:
                try:
                    out.append(Finished(w.key, w.conn.recv(), w.where))
                    w.key = None
                    continue
                except (EOFError, OSError):
                    pass
            if w.conn in ready or w.proc.sentinel in ready:  # died mid-stage (killed, out of memory, segfault)
                w.proc.join(5)
                code = w.proc.exitcode
                why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                out.append(Finished(w.key, StageResult(w.key, False, error=f"worker process died ({why})"), w.where))
                pool.workers[slot] = None
        return out

    def stop(self, interrupted: bool = False) -> None:
        workers = [w for p in self.pools.values() for w in p.workers if w is not None]
        for w in workers:
            if w.key is None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            else:  # interrupted mid-stage: its temp folder is removed by the next run
                w.proc.terminate()
        for w in workers:
            w.proc.join(10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        self.pools = {}


@dataclass(frozen=True)
class SlurmClass:
    """Resources of one class of stages (a cluster profile entry): one Slurm job runs ``group`` stages."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 64
    time_min: int = 720
    group: int = 1  # stages per job (small CPU stages: compose, measure)


STAGE_KINDS = ("model", "protect", "compose", "purify", "class_images", "attack", "generate", "sample", "measure")


def load_cluster_profile(path: Path, base: SlurmClass) -> dict[str, SlurmClass]:
    """A user's cluster profile: YAML mapping ``default`` and stage kinds to resources (``SlurmClass`` fields), e.g.

        default: {partition: gpu, account: lab, gpus: 1, cpus: 8, mem_gb: 64, time_min: 720}
        compose: {partition: cpu, gpus: 0, cpus: 1, mem_gb: 4, time_min: 30, group: 64}
        measure: {partition: cpu, gpus: 0, cpus: 4, mem_gb: 16, time_min: 60, group: 16}

    A kind's entry starts from ``default`` (itself from ``base``, the executor's flat parameters); unlisted kinds
    take ``default``."""
    import yaml

    where = f"cluster profile {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping of 'default' and stage kinds to resources")
    fields = {f.name: f.type for f in dataclasses.fields(SlurmClass)}

    def entry(name: str, start: SlurmClass) -> SlurmClass:
        raw = doc.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: {name}: expected a mapping of {sorted(fields)}")
        bad = sorted(set(raw) - set(fields))
        if bad:
            raise ConfigError(f"{where}: {name}: unknown key(s) {bad}; expected {sorted(fields)}")
        for k, v in raw.items():
            if fields[k] == "str" and not isinstance(v, str):
                raise ConfigError(f"{where}: {name}.{k}: expected a string, got {v!r}")
            least = 0 if k == "gpus" else 1
            if fields[k] == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                raise ConfigError(f"{where}: {name}.{k}: expected a whole number >= {least}, got {v!r}")
        return dataclasses.replace(start, **raw)

    unknown = sorted(set(doc) - {"default", *STAGE_KINDS})
    if unknown:
        raise ConfigError(f"{where}: unknown stage kind(s) {unknown}; expected 'default' or {list(STAGE_KINDS)}")
    default = entry("default", base)
    return {kind: entry(kind, default) if kind in doc else default for kind in STAGE_KINDS}


def _run_group(call: Callable[[str], Any], keys: list[str], modules: list[str]) -> list[StageResult]:
    """One Slurm job: its stages in turn. Torch gets the job's CPUs (``SLURM_CPUS_PER_TASK`` threads unless
    ``BENCH_CPU_THREADS`` says otherwise) through the environment it reads when it loads, so that a job of stages
    that load no model (compose, most measures) never imports torch or diffusers (seconds of CPU per job)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # not submitit's debug jobs, which run in the driver
        threads = os.environ.get("BENCH_CPU_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK") or "1"
        os.environ.update(BENCH_CPU_THREADS=threads, OMP_NUM_THREADS=threads, TRANSFORMERS_VERBOSITY="error",
                          DIFFUSERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    from bench.registry import load_builtins

    load_builtins()
    for m in modules:
        importlib.import_module(m)
    return [call(k) for k in keys]


# sacct states of a job that has not ended (an adopted one is waited for), and of one Slurm ended before the job
# could write its result file
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"})
KILLED_STATES = frozenset({"CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} from Slurm's accounting (``sacct``), the first word of its state (``CANCELLED by 0``)."""
    import subprocess

    if not job_ids:
        return {}
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        why = "" if out.returncode == 0 else (out.stderr.strip() or f"exit code {out.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why:
        raise ConfigError(f"cannot ask Slurm about the jobs an earlier `bench run` left running ({' '.join(cmd)}: "
                          f"{why}); without accounting they cannot be followed: wait for them or scancel them, "
                          f"then run again")
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = (state.split() or ["UNKNOWN"])[0]
    return states


@dataclass(frozen=True)
class SlurmParams:
    folder: str = ""  # submitit's job files and logs; "" = slurm-logs/ in the run's --out folder
    profile: str = ""  # cluster profile YAML: resources per stage kind (see load_cluster_profile)
    partition: str = ""
    account: str = ""
    qos: str = ""
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 720
    cluster: str = ""  # "" = auto (slurm if available); "local"/"debug" for testing without Slurm
    poll_s: float = 5.0  # seconds between job state checks


@EXECUTORS.register("slurm")
class SlurmExecutor(Executor):
    """Slurm jobs through submitit, each submitted as soon as its stages' inputs exist: one job per stage, or
    ``group`` small stages of a kind per job; resources per stage kind from a cluster profile YAML (``profile=``),
    else the flat parameters for every stage. ``--jobs N`` bounds the stages in flight (default 1024). Cluster
    settings are the user's files and parameters, never code (HARNESSES.md 5.4). A later driver on the same --out
    adopts the jobs of one that died (``adopt``)."""

    Params = SlurmParams
    requires = Requirements(modules=("submitit",), extra="cluster")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        p = self.params
        base = SlurmClass(p.partition, p.account, p.qos, p.gpus_per_node, p.cpus_per_task, p.mem_gb, p.timeout_min)
        self.classes = load_cluster_profile(Path(p.profile), base) if p.profile else dict.fromkeys(STAGE_KINDS, base)

    def start(self, call: Callable[[str], Any], jobs: int = 0) -> None:
        import submitit

        self.call = shipped(call)
        self.modules = plugin_modules()
        self.limit = jobs or 1024
        self.folder = Path(self.params.folder or Path(call.env.store.root).parent / "slurm-logs").resolve()
        self.ex = submitit.AutoExecutor(folder=self.folder, cluster=self.params.cluster or None)
        self.jobs: dict[str, tuple[Any, list[str]]] = {}  # job id -> (job, the stage keys it reports)
        self.buffer: dict[str, list[str]] = {}  # stage kind -> keys submitted since the last flush
        self.in_flight = 0

    def describe(self) -> str:
        return f"slurm ({self.ex.cluster}): up to {self.limit} stages in flight"

    def has_room(self, kind: str) -> bool:
        return self.in_flight < self.limit

    def submit(self, key: str) -> None:
        self.buffer.setdefault(self.call.env.stages[key].kind, []).append(key)
        self.in_flight += 1

    def flush(self) -> list[tuple[str, str, str]]:
        started = []
        for kind, keys in self.buffer.items():
            c = self.classes[kind]
            extra = {f"slurm_{k}": v for k, v in (("partition", c.partition), ("account", c.account),
                                                   ("qos", c.qos)) if v}
            try:
                self.ex.update_parameters(timeout_min=c.time_min, gpus_per_node=c.gpus, cpus_per_task=c.cpus,
                                          mem_gb=c.mem_gb, **extra)
            except ValueError as e:
                raise ConfigError(f"--executor slurm ({kind} stages): {e}") from None
            for i in range(0, len(keys), c.group):
                group = keys[i:i + c.group]
                job = self.ex.submit(_run_group, self.call, group, self.modules)
                self.jobs[str(job.job_id)] = (job, group)
                started += [(k, f"slurm ({self.ex.cluster})", str(job.job_id)) for k in group]
        self.buffer = {}
        return started

    def adopt(self, jobs: dict[str, str]) -> dict[str, str]:
        """Follow the jobs an earlier driver of this --out left behind ({stage key: job id}): one still pending or
        running is waited for like one submitted here, one that completed is collected from its result file; the
        others (failed, cancelled, timed out, unknown to sacct) are returned {key: why} as lost attempts."""
        if self.ex.cluster != "slurm":
            return {k: f"job {j}: only jobs of a real Slurm cluster are followed across drivers (this run: "
                       f"{self.ex.cluster})" for k, j in jobs.items()}
        from submitit.slurm.slurm import SlurmJob

        by_job: dict[str, list[str]] = {}
        for key, job_id in jobs.items():
            by_job.setdefault(job_id, []).append(key)
        states = sacct_states(list(by_job))
        lost = {}
        for job_id, keys in by_job.items():
            state = states.get(job_id, "UNKNOWN")
            if state in ACTIVE_STATES or state == "COMPLETED":
                self.jobs[job_id] = (SlurmJob(folder=self.folder, job_id=job_id), keys)
                self.in_flight += len(keys)
            else:
                why = "unknown to sacct" if state == "UNKNOWN" else f"ended {state}"
                lost.update({k: f"job {job_id} {why} while no driver followed it" for k in keys})
        return lost

    def wait(self) -> list[Finished]:
        while True:
            if self.ex.cluster == "debug":  # submitit's debug jobs run in this process when collected
                done = [next(iter(self.jobs))]
            else:
                done = [j for j, (job, _) in self.jobs.items() if job.done()]
            if done:
                return [f for j in done for f in self._collect(j)]
            time.sleep(self.params.poll_s)

    def _collect(self, job_id: str) -> list[Finished]:
        job, keys = self.jobs.pop(job_id)
        self.in_flight -= len(keys)
        where = f"slurm ({self.ex.cluster})"
        state = job.state.split()[0] if self.ex.cluster == "slurm" else ""
        try:
            if state in KILLED_STATES and not job.paths.result_pickle.exists():  # not submitit's 15 s wait for it
                raise RuntimeError(f"Slurm ended it: {state}, no result written")
            results = {r.key: r for r in job.result()}
        except Exception as e:  # the job failed outside the stages: killed, timed out, node failure
            results = {k: StageResult(k, False, error=f"job {job_id}: {type(e).__name__}: {e}") for k in keys}
        return [Finished(k, results.get(k) or StageResult(k, False, error=f"job {job_id} returned no result for it"),
                         where, job_id) for k in keys]

    def stop(self, interrupted: bool = False) -> None:
        """Ctrl-C cancels the run's jobs (after a kill -9 or an SSH drop they run on, and the next `bench run` on
        the same --out adopts them)."""
        if interrupted:
            for job, _ in self.jobs.values():
                try:
                    job.cancel(check=False)
                except Exception as e:  # scancel missing or refusing: say so, the jobs then finish on their own
                    print(f"could not cancel job {job.job_id}: {e}", file=sys.stderr)
        self.jobs = {}
