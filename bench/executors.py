"""Executors (DESIGN.md "Execution"): ``local`` runs stages one by one in this process; ``slurm`` submits each
wave of independent stages as a job array through submitit. Workers only write artifacts; results come back to
the driver, which alone writes the ledger."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.plugins import EXECUTORS, Executor
from bench.registry import Requirements


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """Sequential, on one device, in the driver process (the default)."""

    def run(self, tasks: list[str], run_one: Callable[[str], Any], on_result: Callable[[Any], None]) -> None:
        for key in tasks:
            on_result(run_one(key))


@dataclass(frozen=True)
class SlurmParams:
    folder: str = "slurm-logs"  # submitit logs, relative to the current directory
    partition: str = ""
    account: str = ""
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 720
    cluster: str = ""  # "" = auto (slurm if available); "local"/"debug" for testing without Slurm


@EXECUTORS.register("slurm")
class SlurmExecutor(Executor):
    """One Slurm job array per wave of independent stages (submitit). Cluster settings are parameters,
    never code (HARNESSES.md 5.4)."""

    Params = SlurmParams
    parallel = True
    requires = Requirements(modules=("submitit",), extra="cluster")

    def run(self, tasks: list[str], run_one: Callable[[str], Any], on_result: Callable[[Any], None]) -> None:
        import submitit

        p = self.params
        ex = submitit.AutoExecutor(folder=Path(p.folder), cluster=p.cluster or None)
        extra: dict[str, Any] = {}
        if p.partition:
            extra["slurm_partition"] = p.partition
        if p.account:
            extra["slurm_account"] = p.account
        ex.update_parameters(timeout_min=p.timeout_min, gpus_per_node=p.gpus_per_node, cpus_per_task=p.cpus_per_task,
                             mem_gb=p.mem_gb, **extra)
        jobs = ex.map_array(run_one, tasks)
        for job in jobs:
            on_result(job.result())
