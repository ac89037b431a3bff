"""Figure 8: controlled runs per second, today's path against the old one, and with worker processes.

The run: ``scenarios/race-cow-vs-mprotect.toml`` (8 steps, one of them two parallel sub-steps, a fork
and its child's exit) under the random scheduler, one seed after another, with the
``flag-before-init`` bug (a seed now and then fails, as in a hunt). Each run boots its in-process
host, runs the steps with the oracles after every step, and tears down.

* **new**: the runner's default (``RunOptions.direct``: direct calls into the hypervisor's dispatch;
  ``RunOptions.inline_decisions``: a parking context takes the scheduler's decision when no other
  task can run, and once the count of runnable tasks is known there is no driver task at all:
  ``ControlledScheduler.start_driver``). **old**: both off: msgpack over in-memory streams served by the hypervisor's
  reader and handler tasks, and a driver task for every decision (the path before issue 10, part 5).
  The two give the same schedules, outcomes and violations (tests/unit/mtekvm/test_direct.py).
* Both are measured in alternating slices (old, new, old, new, ...) in this process; each figure is
  the median of its slices, so drift in the machine's load hits both alike.
* Points per second: the controlled scheduler's scheduling points (``ControlledScheduler.points``)
  passed per second of runs; decisions likewise.
* The KVM row: the same for ``scenarios/race-kvm-sanitise-vs-vmm.toml`` with ``no-tag-lock`` (a VM whose
  VMM and guest run in-process: with ``direct`` their control, guest and exit channels are direct too).
* The collector is tuned as every ``mtekvm`` command tunes it (``collect_garbage_less_often``), for
  both paths alike.
* The floor: the same steps straight into the kernel model (``_floor_run``: the same kernel calls,
  scheduler and state checks, no runner, ABI channel, connections or teardown), against today's
  path: what a framework costing nothing would give.
* Worker processes: the new path in ``workers`` spawned processes at once, each running its own
  seeds (seed ``w``, ``w + N``, ...) for the same time, against the new path in one process.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pathlib
import statistics
import time
from typing import Any

import trio

from hypervisor.kernel import Kernel
from hypervisor.sched import ControlledScheduler
from hypervisor.server import _in_kernel
from hypervisor.syscalls import PROCESS_OPS
from mtekvm.runner import RunOptions, collect_garbage_less_often, run_scenario
from mtekvm.scenario import SchedulerSpec, load_scenario
from shared.abi import validate_args

SCENARIO = pathlib.Path(__file__).resolve().parents[1] / "scenarios" / "race-cow-vs-mprotect.toml"
BUGS = ("flag-before-init",)
#: the KVM row: a VM (its VMM and guest in-process) whose guest faults race the VMM's accesses
KVM_SCENARIO = SCENARIO.parent / "race-kvm-sanitise-vs-vmm.toml"
KVM_BUGS = ("no-tag-lock",)


class _Counted:
    """Counts the scheduling points and decisions of every controlled scheduler made while it is active."""

    def __init__(self) -> None:
        self.schedulers: list[ControlledScheduler] = []
        self._init = ControlledScheduler.__init__

    def __enter__(self) -> _Counted:
        made, seen = self._init, self.schedulers

        def init(sched, *args, **kwargs):
            made(sched, *args, **kwargs)
            seen.append(sched)

        ControlledScheduler.__init__ = init  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc) -> None:
        ControlledScheduler.__init__ = self._init  # type: ignore[method-assign]

    def take(self) -> tuple[int, int]:
        """(points, decisions) of the schedulers made since the last take."""
        points = sum(s.points for s in self.schedulers)
        decisions = sum(s.decisions for s in self.schedulers)
        self.schedulers.clear()
        return points, decisions


async def _slice(new: bool, seeds, seconds: float, counted: _Counted, path: pathlib.Path = SCENARIO,
                 bugs: tuple[str, ...] = BUGS) -> tuple[float, float, float]:
    """Runs, points and decisions per second of runs taken one after another for ``seconds``."""
    scn = load_scenario(path)
    opts = RunOptions(bugs=bugs, direct=new, inline_decisions=new)
    runs = 0
    counted.take()
    t0 = time.perf_counter()
    while True:
        await run_scenario(scn, RunOptions(bugs=opts.bugs, direct=opts.direct, inline_decisions=opts.inline_decisions,
                                           scheduler=SchedulerSpec("random", next(seeds))))
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            points, decisions = counted.take()
            return runs / elapsed, points / elapsed, decisions / elapsed


async def _floor_run(seed: int) -> None:
    """The 8-step race's steps straight into the kernel model under the same scheduler and oracles:
    no runner, no ABI channel, no connections, no teardown (the floor under any framework)."""
    sched = ControlledScheduler(seed=seed)
    k = Kernel(sched=sched, bugs=BUGS)
    addr, page, mte = 0x1000_0000, 4096, ["read", "write", "mte"]
    async with trio.open_nursery() as nursery:
        sched.start_driver(nursery)  # as today's path starts it (no driver task once the count is known)
        tasks = {"parent": k.create_task("parent")}

        async def do(actor: str, ctx: str, op: str, **args) -> Any:
            a, t = validate_args(op, args), tasks[actor]
            async with sched.context(ctx):
                return await _in_kernel(k, t, PROCESS_OPS[op](k, t, a))

        await do("parent", "parent/1", "mmap", addr=addr, size=page, prot=["read", "write"])
        k.oracle.check_state()
        await do("parent", "parent/2", "store", addr=addr, data=b"\xaa" * 64)
        k.oracle.check_state()
        child = await do("parent", "parent/3", "fork", child="child")
        tasks["child"] = k.tasks[child["pid"]]
        k.oracle.check_state()
        async with trio.open_nursery() as inner:  # the first sub-step in this task, as the runner runs it
            inner.start_soon(functools.partial(do, "child", "child/4.2", "store", addr=addr, data=b"\xbb" * 16))
            await do("parent", "parent/4.1", "mprotect", addr=addr, size=page, prot=mte)
        k.oracle.check_state()
        await do("child", "child/5", "mprotect", addr=addr, size=page, prot=mte)
        k.oracle.check_state()
        await do("child", "child/6", "ldg", addr=addr, size=page)
        k.oracle.check_state()
        await do("parent", "parent/7", "ldg", addr=addr, size=page)
        k.oracle.check_state()
        nursery.cancel_scope.cancel()


async def _floor_slice(seeds, seconds: float) -> float:
    """Runs per second of :func:`_floor_run` one after another for ``seconds``."""
    runs = 0
    t0 = time.perf_counter()
    while True:
        await _floor_run(next(seeds))
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return runs / elapsed


def _seeds(start: int = 0, step: int = 1):
    seed = start
    while True:
        yield seed
        seed += step


def _worker(index: int, workers: int, seconds: float, ready, out) -> None:
    """A worker process: the new path over its own seeds for ``seconds`` (after all are ready); puts its runs/s."""

    collect_garbage_less_often()  # as every mtekvm command does

    async def go() -> float:
        with _Counted() as counted:
            await _slice(True, _seeds(index, workers), 0.2, counted)  # warm up
            await trio.to_thread.run_sync(ready.wait)  # every worker starts timing together
            runs, _, _ = await _slice(True, _seeds(index + 1000 * workers, workers), seconds, counted)
        return runs

    out.put(trio.run(go))


def _in_workers(workers: int, seconds: float) -> float:
    """Runs per second of ``workers`` processes running at the same time (the sum of theirs).

    They are spawned (a fresh interpreter each: forking this trio process is unsafe) and start
    timing together once every one has warmed up.
    """
    ctx: Any = multiprocessing.get_context("spawn")
    ready, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, workers, seconds, ready, out)) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        return sum(out.get(timeout=seconds + 120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


async def bench_runs(seconds: float, workers: int = 2, rounds: int = 5) -> list[dict]:
    """Figure 8's rows (group, figure, unit, value, baseline, baseline_value) for the driver's ``Row``."""
    collect_garbage_less_often()  # as every mtekvm command does (both paths alike)
    old: list[tuple[float, float, float]] = []
    new: list[tuple[float, float, float]] = []
    floor: list[float] = []
    seeds = _seeds()
    per = max(seconds / (2 * rounds), 0.2)
    with _Counted() as counted:
        await _slice(False, seeds, 0.2, counted)  # warm up both
        await _slice(True, seeds, 0.2, counted)
        await _floor_slice(seeds, 0.2)
        for _ in range(rounds):
            old.append(await _slice(False, seeds, per, counted))
            new.append(await _slice(True, seeds, per, counted))
            floor.append(await _floor_slice(seeds, per))
    med_old = [statistics.median(s[i] for s in old) for i in range(3)]
    med_new = [statistics.median(s[i] for s in new) for i in range(3)]
    name = "controlled 8-step race (race-cow-vs-mprotect, random)"
    base = "memory streams + driver decisions"
    rows = [
        {"group": "runs", "figure": name, "unit": "runs/s", "value": med_new[0], "baseline": base,
         "baseline_value": med_old[0]},
        {"group": "runs", "figure": "its scheduling points", "unit": "points/s", "value": med_new[1],
         "baseline": base, "baseline_value": med_old[1]},
        {"group": "runs", "figure": "its scheduler decisions", "unit": "decisions/s", "value": med_new[2],
         "baseline": base, "baseline_value": med_old[2]},
        {"group": "runs", "figure": "the floor: its steps straight into the kernel model (no runner, ABI, teardown)",
         "unit": "runs/s", "value": statistics.median(floor), "baseline": "today's path", "baseline_value": med_new[0]},
    ]
    kvm_old: list[float] = []
    kvm_new: list[float] = []
    with _Counted() as counted:
        await _slice(False, seeds, 0.2, counted, KVM_SCENARIO, KVM_BUGS)
        await _slice(True, seeds, 0.2, counted, KVM_SCENARIO, KVM_BUGS)
        for _ in range(rounds):
            kvm_old.append((await _slice(False, seeds, per, counted, KVM_SCENARIO, KVM_BUGS))[0])
            kvm_new.append((await _slice(True, seeds, per, counted, KVM_SCENARIO, KVM_BUGS))[0])
    rows.append({"group": "runs", "figure": "controlled KVM race, VMM and guest in-process (race-kvm-sanitise-vs-vmm)",
                 "unit": "runs/s", "value": statistics.median(kvm_new), "baseline": base,
                 "baseline_value": statistics.median(kvm_old)})
    if workers > 1 and (os.cpu_count() or 1) > 1:
        # the 1-process figure again right before, so both see the same machine load
        with _Counted() as counted:
            one = (await _slice(True, seeds, seconds / 2, counted))[0]
        many = await trio.to_thread.run_sync(_in_workers, workers, seconds / 2)
        rows.append({"group": "runs", "figure": f"the same in {workers} worker processes", "unit": "runs/s",
                     "value": many, "baseline": "one process", "baseline_value": one})
        rows.append({"group": "runs", "figure": f"{workers} worker processes against the old path", "unit": "runs/s",
                     "value": many, "baseline": base, "baseline_value": med_old[0]})
    return rows
