"""One scheduler for every executor (DESIGN.md "Execution"): stages go to workers as soon as their inputs exist (no
barrier between plan depths), at most as many in flight as the executor has room for, failed attempts are retried,
and a stage that keeps failing fails only what depends on it.

Executors (bench/executors.py) supply workers through ``Executor.start / has_room / submit / flush / wait / stop``; the
scheduler runs in the driver and reports every transition through ``Events`` (the driver writes them to the ledger).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

from bench.stages import StageResult


@dataclass
class Finished:
    """One attempt's end, as a worker reported it: its result, where it ran, the executor's job id."""

    key: str
    result: StageResult
    where: str
    job_id: str = ""


class Events(Protocol):
    def started(self, key: str, attempt: int, where: str, job_id: str) -> None: ...
    def attempt(self, fin: Finished, attempt: int, final: bool) -> None: ...
    def done(self, key: str) -> None: ...
    def failed(self, key: str, reason: str) -> None: ...


def submit_ready(ready: dict[str, list[tuple[int, str]]], executor, attempts: dict[str, int],
                 in_flight: set[str]) -> None:
    """Submit ready stages in plan order while the executor has room for their kind. Ready stages are kept in one heap
    per kind: a kind refused once is skipped for the rest of the pass (room only shrinks as stages are submitted),
    so a pass costs O(kinds + submitted x log n), not O(ready) (thousands of measure stages wait behind full workers
    in a large grid)."""
    open_kinds = {kind for kind, heap in ready.items() if heap}
    while open_kinds:
        kind = min(open_kinds, key=lambda k: ready[k][0][0])
        if not executor.has_room(kind):
            open_kinds.discard(kind)
            continue
        _, key = heapq.heappop(ready[kind])
        if not ready[kind]:
            open_kinds.discard(kind)
        attempts[key] = attempts.get(key, 0) + 1
        executor.submit(key)
        in_flight.add(key)


def run_dag(todo: list[str], stages, executor, retries: int, events: Events,
            adopted: dict[str, int] | None = None, earlier: dict[str, int] | None = None) -> dict[str, str]:
    """Run the stages ``todo`` (topological plan order) through ``executor``; return {failed key: reason}.

    Ready stages are handed out in plan order (cell by cell, so one worker reproduces the sequential order and
    fine-tuned weights are pruned early); a failed attempt is retried up to ``retries`` times unless its error is bad
    input (``StageResult.retryable``); a stage that still fails fails its dependants with its reason.
    ``adopted``: stages already running under the executor (from an earlier driver) -> attempts made so far;
    ``earlier``: other stages -> attempts earlier drivers made (their next attempt is numbered after them)."""
    order = {k: i for i, k in enumerate(todo)}
    in_todo = set(todo)
    waiting = {k: {d for d in stages[k].deps if d in in_todo} for k in todo}
    dependants: dict[str, list[str]] = {k: [] for k in todo}
    for k in todo:
        for d in waiting[k]:
            dependants[d].append(k)
    attempts: dict[str, int] = {**(earlier or {}), **(adopted or {})}
    in_flight: set[str] = set(adopted or {})
    ready: dict[str, list[tuple[int, str]]] = {}  # kind -> heap of (plan position, key)

    def make_ready(key: str) -> None:
        heapq.heappush(ready.setdefault(stages[key].kind, []), (order[key], key))

    for k in todo:
        if not waiting[k] and k not in in_flight:
            make_ready(k)
    failed: dict[str, str] = {}

    def fail(key: str, reason: str) -> None:
        stack = [key]
        while stack:
            k = stack.pop()
            if k in failed:
                continue
            failed[k] = reason  # dependants inherit the first upstream reason
            events.failed(k, reason)
            stack.extend(dependants[k])

    while any(ready.values()) or in_flight:
        submit_ready(ready, executor, attempts, in_flight)
        for key, where, job_id in executor.flush():
            events.started(key, attempts[key], where, job_id)
        if not in_flight:
            raise RuntimeError("the executor has no room for any ready stage")  # a bug, never a hang
        for fin in executor.wait():
            key, res = fin.key, fin.result
            in_flight.discard(key)
            retry = not res.ok and res.retryable and attempts[key] <= retries
            events.attempt(fin, attempts[key], final=not retry)
            if res.ok:
                events.done(key)
                for c in dependants[key]:
                    waiting[c].discard(key)
                    if not waiting[c] and c not in failed:
                        make_ready(c)
            elif retry:
                make_ready(key)
            else:
                st = stages[key]
                fail(key, f"{st.kind} stage failed ({st.label}): {res.error}"
                          + (f" [after {attempts[key]} attempts]" if attempts[key] > 1 else ""))
    return failed
