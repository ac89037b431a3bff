"""Kernel contexts, scheduling points, and the schedulers that order them.

A *context* is one trio task running one kernel path for one CPU (a syscall
from a connection, a host reclaim pass, a fault). Shared kernel state changes
only between scheduling points: ``await sched.point("mte_sync_tags:clear")``
marks a place where another CPU could observe the path half way. Blocking on a
model lock is :meth:`Scheduler.wait_until`, which parks the context until a
predicate on model state holds; nobody busy-loops.

Schedulers:

* :class:`FreeScheduler`: a point is a trio checkpoint. The default for real
  multi-process runs.
* :class:`ControlledScheduler`: exactly one context runs at a time. A driver
  waits until every task is blocked, then releases one parked context. Its
  policy is ``random(seed)`` (a uniform random walk over runnable contexts),
  ``pct(seed, depth)`` (probabilistic concurrency testing, Burckhardt et al.
  2010: random distinct priorities, the highest-priority runnable context
  runs, and at ``depth - 1`` random decisions the running context drops to a
  low priority; finds a depth-d bug with probability at least 1/(n k^(d-1)))
  or ``replay(schedule)``. Either way the run is recorded as a *schedule*: a list
  of actor-local preemptions ``actor@n>other`` ("when ``actor`` reached its
  n-th decision, run ``other`` instead of the default"). The default rule is:
  keep running the current actor; when it blocks or ends, take the
  lowest-named runnable one. Replaying the schedule reproduces the run; a
  preemption whose target is not runnable is a :class:`ScheduleDivergence`.

Actor names come from the request's ``ctx`` (the runner uses ``ACTOR/STEP``);
the current actor is held in a context variable so model code needs no
argument for it.
"""

from __future__ import annotations

import contextvars
import random
import re
from contextlib import asynccontextmanager
from typing import Callable

import attrs
import trio
import trio.testing

from hypervisor.errors import Deadlock, ScheduleDivergence

current_actor: contextvars.ContextVar[str] = contextvars.ContextVar("current_actor", default="?")

_PREEMPTION = re.compile(r"^(?P<actor>[^@>,\s]+)@(?P<n>\d+)>(?P<target>[^@>,\s]+)$")


def parse_schedule(text: str) -> dict[tuple[str, int], str]:
    """Parse ``"a@3>b,b@1>a"`` into ``{("a", 3): "b", ("b", 1): "a"}``.

    Raises:
        ValueError: an entry is not ``actor@n>other``.
    """
    out: dict[tuple[str, int], str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _PREEMPTION.match(part)
        if not m:
            raise ValueError(f"schedule entry {part!r} is not of the form actor@n>other")
        out[(m["actor"], int(m["n"]))] = m["target"]
    return out


def format_schedule(preemptions: list[tuple[str, int, str]]) -> str:
    """Inverse of :func:`parse_schedule` for a recorded list."""
    return ",".join(f"{a}@{n}>{t}" for a, n, t in preemptions)


class Scheduler:
    """Interface every scheduler provides to model code."""

    kind = "abstract"

    @asynccontextmanager
    async def context(self, actor: str):
        """Run the body as kernel context ``actor``."""
        token = current_actor.set(actor)
        try:
            yield
        finally:
            current_actor.reset(token)

    async def point(self, label: str) -> None:
        """A scheduling point: another context may run here."""
        raise NotImplementedError

    async def wait_until(self, pred: Callable[[], bool], label: str) -> None:
        """Park the current context until ``pred()`` is true (a model lock wait)."""
        raise NotImplementedError

    def wake(self) -> None:
        """Model state changed in a way a ``wait_until`` predicate may care about."""

    @property
    def schedule(self) -> str:
        """The run's schedule string (empty for uncontrolled runs)."""
        return ""


class FreeScheduler(Scheduler):
    """Points are trio checkpoints; trio decides the order. Used across processes."""

    kind = "free"

    def __init__(self):
        self._lot = trio.lowlevel.ParkingLot()
        self.points = 0

    async def point(self, label: str) -> None:
        self.points += 1
        await trio.lowlevel.checkpoint()

    async def wait_until(self, pred, label):
        while not pred():
            await self._lot.park()

    def wake(self) -> None:
        self._lot.unpark_all()


@attrs.define(eq=False)
class _Actor:
    name: str
    decisions: int = 0  # decisions taken while this actor was the running one
    event: trio.Event | None = None  # set to release it
    pred: Callable[[], bool] | None = None  # a wait_until predicate
    label: str = ""
    alive: bool = True


@attrs.frozen
class TraceEntry:
    """One release decision: who ran, at which of their points, and why."""

    actor: str
    n: int
    label: str


class ControlledScheduler(Scheduler):
    """One context at a time, chosen by a seeded random walk or a replayed schedule.

    Args:
        seed: random policy when not None.
        schedule: replay policy when not None (a string from a previous run).
        max_decisions: safety bound; a run that takes more is reported as livelock.

    Call :meth:`run_driver` in a nursery (``nursery.start``) before any context
    starts. Failures found by the driver (deadlock, divergence) are recorded in
    :attr:`failure` and the blocked contexts are cancelled with the error.
    """

    kind = "controlled"

    def __init__(self, *, seed: int | None = None, schedule: str | None = None, max_decisions: int = 200_000,
                 pct_depth: int | None = None, pct_steps: int = 40):
        if (seed is None) == (schedule is None):
            raise ValueError("give exactly one of seed (random/pct) or schedule (replay)")
        self.seed = seed
        self.replay = parse_schedule(schedule) if schedule is not None else None
        self.policy = "replay" if schedule is not None else ("pct" if pct_depth else "random")
        self._rng = random.Random(seed)
        # PCT: priorities above `depth` for new actors, change points among the first pct_steps decisions
        self.pct_depth = pct_depth or 0
        self._priority: dict[str, float] = {}
        self._change_points: dict[int, int] = {}
        self._contended = 0
        if self.policy == "pct":
            points = self._rng.sample(range(1, pct_steps + 1), min(self.pct_depth - 1, pct_steps))
            self._change_points = {p: i for i, p in enumerate(sorted(points))}
        self._actors: dict[str, _Actor] = {}
        self._parked: dict[str, _Actor] = {}
        self._running: _Actor | None = None
        # decisions before any context has run are keyed on this pseudo-actor
        self._last: _Actor = _Actor("start", alive=False)
        self._arrived = trio.Event()
        self.preemptions: list[tuple[str, int, str]] = []
        self.trace: list[TraceEntry] = []
        self.failure: Exception | None = None
        self.max_decisions = max_decisions
        self.decisions = 0
        self.points = 0

    @property
    def schedule(self) -> str:
        return format_schedule(self.preemptions)

    @asynccontextmanager
    async def context(self, actor: str):
        if actor in self._actors and self._actors[actor].alive:
            raise ValueError(f"actor {actor!r} is already running")
        a = _Actor(actor)
        self._actors[actor] = a
        token = current_actor.set(actor)
        try:
            await self._park(a, "enter", None)
            yield
        finally:
            current_actor.reset(token)
            a.alive = False
            if self._running is a:
                self._running = None
            self._parked.pop(actor, None)
            self._kick()

    def _kick(self) -> None:
        self._arrived.set()

    async def _park(self, a: _Actor, label: str, pred) -> None:
        a.event = trio.Event()
        a.pred = pred
        a.label = label
        self._parked[a.name] = a
        if self._running is a:
            self._running = None
        self._kick()
        await a.event.wait()
        if self.failure is not None:
            raise self.failure

    async def point(self, label: str) -> None:
        self.points += 1
        a = self._actors.get(current_actor.get())
        if a is None:  # not inside a controlled context (set-up code): no interleaving
            return
        await self._park(a, label, None)

    async def wait_until(self, pred, label):
        a = self._actors.get(current_actor.get())
        if a is None:
            if not pred():
                raise Deadlock(f"{label}: would block outside any context")
            return
        while not pred():
            await self._park(a, label, pred)

    def _runnable(self) -> list[_Actor]:
        return sorted(
            (a for a in self._parked.values() if a.pred is None or a.pred()),
            key=lambda a: a.name,
        )

    def _choose(self, runnable: list[_Actor]) -> _Actor:
        last = self._last
        default = last if (last.alive and last in runnable) else runnable[0]
        last.decisions += 1
        key = (last.name, last.decisions)
        if self.replay is not None:
            target = self.replay.get(key)
            if target is None:
                return default
            for a in runnable:
                if a.name == target:
                    self.preemptions.append((key[0], key[1], target))
                    return a
            raise ScheduleDivergence(
                f"schedule entry {key[0]}@{key[1]}>{target}: {target!r} is not runnable at decision "
                f"{self.decisions} (runnable: {', '.join(a.name for a in runnable)})"
            )
        if self.policy == "pct":
            choice = self._pct_choose(runnable)
        else:
            choice = self._rng.choice(runnable)
        if choice is not default:
            self.preemptions.append((key[0], key[1], choice.name))
        return choice

    def _pct_choose(self, runnable: list[_Actor]) -> _Actor:
        for a in runnable:  # a context seen for the first time gets a random priority above depth
            if a.name not in self._priority:
                self._priority[a.name] = self.pct_depth + self._rng.random()
        if len(runnable) < 2:
            return runnable[0]
        self._contended += 1  # PCT's k counts the decisions where there is a choice
        low = self._change_points.get(self._contended)
        if low is not None and self._last.name in self._priority:
            self._priority[self._last.name] = low  # the running context drops below every new one
        return max(runnable, key=lambda a: self._priority[a.name])

    async def run_driver(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Release one parked context at a time, forever (cancel to stop)."""
        task_status.started()
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self._running is not None and self._running.alive and self._running.name not in self._parked:
                # the running actor is blocked on something outside the model (I/O): wait for it
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            if not self._parked:
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            runnable = self._runnable()
            if not runnable:
                self._fail(Deadlock(
                    "every context is blocked: "
                    + ", ".join(f"{a.name} at {a.label}" for a in sorted(self._parked.values(), key=lambda a: a.name))
                ))
                continue
            self.decisions += 1
            if self.decisions > self.max_decisions:
                self._fail(Deadlock(f"no end after {self.max_decisions} decisions (livelock?)"))
                continue
            try:
                a = self._choose(runnable)
            except ScheduleDivergence as exc:
                self._fail(exc)
                continue
            self.trace.append(TraceEntry(a.name, a.decisions, a.label))
            del self._parked[a.name]
            self._running = a
            self._last = a
            a.event.set()

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
        for a in list(self._parked.values()):
            del self._parked[a.name]
            a.event.set()


def make_scheduler(kind: str, seed: int | None = None, schedule: str | None = None, depth: int = 3) -> Scheduler:
    """Build a scheduler from its scenario/CLI description.

    Raises:
        ValueError: unknown kind, or missing seed/schedule.
    """
    if kind == "free":
        return FreeScheduler()
    if kind == "random":
        return ControlledScheduler(seed=seed if seed is not None else 0)
    if kind == "pct":
        if depth < 1:
            raise ValueError("pct depth must be at least 1")
        return ControlledScheduler(seed=seed if seed is not None else 0, pct_depth=depth)
    if kind == "replay":
        if schedule is None:
            raise ValueError("replay needs a schedule")
        return ControlledScheduler(schedule=schedule)
    raise ValueError(f"unknown scheduler {kind!r} (free, random, pct, replay)")
