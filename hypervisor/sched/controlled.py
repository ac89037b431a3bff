"""The controlled scheduler: exactly one context runs at a time, and a policy picks it.

A driver task (:meth:`ControlledScheduler.run_driver`) waits until every task
is blocked, then takes one decision (:meth:`ControlledScheduler.step`): the
policy (:mod:`hypervisor.sched.policies`) chooses among the runnable parked
contexts and that one is released. Whatever the policy, the run is recorded as
a schedule of preemptions (:mod:`hypervisor.sched.schedule`) and replays with
:class:`~hypervisor.sched.policies.Replay`; a replay entry whose target is not
runnable is a :class:`ScheduleDivergence`.

A decision is taken when every trio task is blocked. The driver finds that out
by :func:`trio.testing.wait_all_tasks_blocked`, which costs two trio scheduler
passes per decision (the parking context blocks, the driver wakes, the chosen
context wakes). The same moment is also visible to the context that parks: a
trio instrument (:class:`_Runnable`) counts the tasks scheduled and not yet
run, and when that count is zero as a context parks, no other task can run
before the driver would decide, so the parking context takes that decision
itself (:meth:`ControlledScheduler._park`): the same decision on the same
state, without the passes (none at all when the policy lets it go on). Once
that count is known to be exact in a trio run, a scheduler started by
:meth:`ControlledScheduler.start_driver` has no driver task at all: a decision
no parking context can take (one parks while another task can run) is taken by
the instrument as the last runnable task blocks, the moment the driver's
``wait_all_tasks_blocked()`` would have returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import NamedTuple

import attrs
import trio
import trio.testing

from hypervisor.sched.core import FreeScheduler, Scheduler, current_actor
from hypervisor.sched.policies import (
    PCT_STEPS,
    Bounded,
    Decision,
    Dfs,
    Pct,
    Random,
    Replay,
    SchedulingPolicy,
)
from hypervisor.sched.schedule import Preemption, format_schedule
from shared.errno import Deadlock, ScheduleDivergence


@attrs.define(eq=False)
class _Actor:
    name: str
    decisions: int = 0  # decisions taken while this actor was the running one
    task: trio.lowlevel.Task | None = None  # the trio task waiting to be released (only when it has to wait)
    go: bool = False  # released since it last parked
    pred: Callable[[], bool] | None = None  # a wait_until predicate
    label: str = ""
    alive: bool = True


def _by_name(a: _Actor) -> str:
    return a.name


#: ``Decision(*fields)`` and ``TraceEntry(*fields)`` without the named tuples' Python-level ``__new__``
#: (one of each is made per decision)
_decision = functools.partial(tuple.__new__, Decision)


class _Runnable(trio.abc.Instrument):
    """Counts trio tasks scheduled but not yet stepped (the run queue plus the rest of the current batch)."""

    def __init__(self) -> None:
        self.n = 0
        #: set by :class:`_Calibrate` at the first wait for I/O after the count was installed; from then on
        #: ``n`` is exact (every task scheduled is stepped once), and every scheduler of this trio run trusts it
        self.calibrated = False
        #: schedulers owed a decision no parking context could take (see ControlledScheduler.start_driver)
        self.waiting: list[ControlledScheduler] = []

    def task_scheduled(self, task) -> None:
        self.n += 1

    def before_task_step(self, task) -> None:
        self.n -= 1

    def after_task_step(self, task) -> None:
        if not self.n and self.waiting:  # the last runnable task has just blocked: what the driver waits for
            waiting, self.waiting = self.waiting, []
            for sched in waiting:
                sched._decide_at_idle()


class _Calibrate(trio.abc.Instrument):
    """Sets a new :class:`_Runnable`'s count once, then removes itself: as trio is about to wait for I/O,
    every task of the last batch has been stepped, so the tasks scheduled and not yet stepped are
    exactly the run queue (tasks installed mid-batch were counted wrong until then)."""

    def __init__(self, counter: _Runnable) -> None:
        self.counter = counter

    def before_io_wait(self, timeout) -> None:
        self.counter.n = trio.lowlevel.current_statistics().tasks_runnable
        self.counter.calibrated = True
        trio.lowlevel.remove_instrument(self)


_RUNNABLE: trio.lowlevel.RunVar[_Runnable] = trio.lowlevel.RunVar("mtekvm_runnable_tasks")


def _runnable_counter() -> _Runnable:
    """This trio run's :class:`_Runnable`, installed at its first use and kept: one run of many
    controlled executions (a hunt, a stress campaign) adds the instrument once, not per execution."""
    try:
        return _RUNNABLE.get()
    except LookupError:
        counter = _Runnable()
        trio.lowlevel.add_instrument(counter)
        trio.lowlevel.add_instrument(_Calibrate(counter))
        _RUNNABLE.set(counter)
        return counter


class TraceEntry(NamedTuple):
    """One release decision: who ran, at which of their points, and why (a named tuple: one per decision)."""

    actor: str
    n: int
    label: str


_trace_entry = functools.partial(tuple.__new__, TraceEntry)


class ControlledScheduler(Scheduler):
    """One context at a time, chosen by a policy.

    Args:
        policy: a :class:`~hypervisor.sched.policies.SchedulingPolicy`; or, without one,
        seed: :class:`Random` (or :class:`Pct` with ``pct_depth``) from this seed;
        schedule: :class:`Replay` of this schedule string (strict);
        max_decisions: safety bound; a run that takes more is reported as livelock.

    Start :meth:`run_driver` in a nursery before any context starts (``start_soon`` is
    enough: a context parked before the driver first runs waits for it). Failures found by
    the driver (deadlock, divergence) are recorded in :attr:`failure` and the blocked
    contexts are cancelled with the error.
    One scheduler is one execution; a policy may serve many (see :mod:`mtekvm.hunt`).
    """

    kind = "controlled"

    def __init__(self, policy: SchedulingPolicy | None = None, *, seed: int | None = None,
                 schedule: str | None = None, max_decisions: int = 200_000, pct_depth: int | None = None,
                 pct_steps: int = PCT_STEPS):
        if policy is None:
            if (seed is None) == (schedule is None):
                raise ValueError("give exactly one of seed (random/pct) or schedule (replay), or a policy")
            if seed is None:
                assert schedule is not None
                policy = Replay(schedule)
            elif pct_depth:
                policy = Pct(seed, pct_depth, pct_steps)
            else:
                policy = Random(seed)
        elif seed is not None or schedule is not None:
            raise ValueError("give a policy or a seed/schedule, not both")
        self.policy: SchedulingPolicy = policy
        #: a strict or lenient replay's entries: a choice that is the default is recorded too when one names it
        self._replayed: dict[tuple[str, int], str] | None = policy.entries if isinstance(policy, Replay) else None
        self.seed: int | None = getattr(policy, "seed", None)
        self._actors: dict[str, _Actor] = {}
        self._parked: dict[str, _Actor] = {}
        self._running: _Actor | None = None
        # decisions before any context has run are keyed on this pseudo-actor
        self._last: _Actor = _Actor("start", alive=False)
        self._arrived = trio.Event()
        self.preemptions: list[Preemption] = []
        self.trace: list[TraceEntry] = []
        self.failure: Exception | None = None
        self.max_decisions = max_decisions
        self.decisions = 0
        self.points = 0
        self._name_decisions: dict[str, int] = {}  # decisions taken while each name was the last to run
        #: a parking context decides when no other task can run (see the module doc); False: the driver always
        self.inline_decisions = True
        self.inline = 0  # decisions a parking context took itself (for tests and statistics)
        self._runnable_tasks: _Runnable | None = None  # installed while the driver runs (see start_driver)
        self._idle_decisions: _Runnable | None = None  # no driver: this count takes what it would (start_driver)

    @property
    def schedule(self) -> str:
        return format_schedule(self.preemptions)

    @property
    def replay(self) -> dict[tuple[str, int], str] | None:
        """The entries of a strict replay (None for any other policy): what the run must reach."""
        p = self.policy
        return p.entries if isinstance(p, Replay) and p.strict else None

    @property
    def parked(self) -> list[_Actor]:
        """The contexts parked at a point or a model lock now, by name (each has ``name``, ``label``)."""
        return sorted(self._parked.values(), key=lambda a: a.name)

    def context(self, actor: str) -> AbstractAsyncContextManager[None]:
        """Run the body as kernel context ``actor``: it parks at ``enter`` first (a decision)."""
        return _Context(self, actor)

    def _enter(self, actor: str) -> _Actor:
        if actor in self._actors and self._actors[actor].alive:
            raise ValueError(f"actor {actor!r} is already running")
        a = _Actor(actor)
        self._actors[actor] = a
        return a

    def _exit(self, a: _Actor) -> None:
        a.alive = False
        if self._running is a:
            self._running = None
        self._parked.pop(a.name, None)
        self._kick()

    def _kick(self) -> None:
        counter = self._idle_decisions
        if counter is not None:  # no driver: the counter takes the decision once no task can run
            if self._parked and self not in counter.waiting:
                counter.waiting.append(self)
            return
        self._arrived.set()

    def start_driver(self, nursery: trio.Nursery) -> None:
        """Start :meth:`run_driver` in ``nursery``, or do without one: with inline decisions and this trio
        run's count of runnable tasks already exact (an earlier driver set it), a parking context decides
        for itself whenever no other task can run, and a decision it cannot take (one parks while another
        task can run: a parallel step) is taken by the count itself, as the last runnable task blocks
        (:meth:`_Runnable.after_task_step`): the moment the driver's ``wait_all_tasks_blocked()`` waits
        for, with no task, no idle wait and no trio pass of its own."""
        counter = _runnable_counter() if self.inline_decisions else None
        if counter is not None and counter.calibrated:
            self._runnable_tasks = self._idle_decisions = counter
        else:
            nursery.start_soon(self.run_driver)

    def _running_outside_model(self) -> bool:
        """The running context is neither parked nor ended: every task blocked, it waits on something
        outside the model (I/O), and no decision is due."""
        a = self._running
        return a is not None and a.alive and a.name not in self._parked

    def _decide_at_idle(self) -> None:
        """What the driver does when ``wait_all_tasks_blocked()`` returns (see :meth:`start_driver`)."""
        if self._running_outside_model():
            return  # its next park or exit asks again
        if self._parked:
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a policy's bug: end the parked contexts with it
                self._fail(exc)  # (an instrument must not raise: trio would remove it, and the count with it)

    async def _park(self, a: _Actor, label: str, pred) -> None:
        if not self._parked_and_released(a, label, pred):
            await self._wait_released(a)

    def _parked_and_released(self, a: _Actor, label: str, pred) -> bool:
        """Park ``a`` at ``label``; True when that decision was taken here and released it at once (the
        common case: no await, no coroutine), else :meth:`_wait_released` must follow."""
        a.go = False
        a.task = None
        a.pred = pred
        a.label = label
        self._parked[a.name] = a
        if self._running is a:
            self._running = None
        counter = self._runnable_tasks
        if counter is not None and counter.n == 0 and self._running is None:
            # every other task is blocked: the driver would take this very decision next; take it here
            self.inline += 1
            self.step()
            if a.go:  # released (this context, or every one by a failure): no trio pass, no event
                if self.failure is not None:
                    raise self.failure
                return True
        else:
            self._kick()
        return False

    async def _wait_released(self, a: _Actor) -> None:
        a.task = trio.lowlevel.current_task()  # nothing released it since it parked: no await in between

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            a.task = None  # cancelled while parked: a release now has no one to wake
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # (a trio.Event's wait, without the Event)
        if self.failure is not None:
            raise self.failure

    async def point(self, label: str) -> None:
        self.points += 1
        a = self._actors.get(current_actor.get())
        if a is None:  # not inside a controlled context (set-up code): no interleaving
            return
        if not self._parked_and_released(a, label, None):
            await self._wait_released(a)

    async def wait_until(self, pred, label):
        a = self._actors.get(current_actor.get())
        if a is None:
            if not pred():
                raise Deadlock(f"{label}: would block outside any context")
            return
        while not pred():
            await self._park(a, label, pred)

    def _runnable(self) -> list[_Actor]:
        parked = self._parked
        if len(parked) == 1:  # the common case: one context parked, nothing to sort
            for a in parked.values():
                return [a] if a.pred is None or a.pred() else []
        return sorted(
            (a for a in parked.values() if a.pred is None or a.pred()),
            key=_by_name,
        )

    def _choose(self, runnable: list[_Actor]) -> _Actor:
        last = self._last
        name = last.name
        default = last if (last.alive and last in runnable) else runnable[0]
        last.decisions += 1
        # keyed on the name's count, not the context's: a name may be reused (a VMM makes many calls under
        # one step's name), even while a dead context of that name is still the last one, and (name, n)
        # must be reached once per run for a schedule to replay
        n = self._name_decisions[name] = self._name_decisions.get(name, 0) + 1
        key = (name, n)
        choice = self.policy.choose(_decision((tuple(runnable), name, default, key, self.decisions)))
        if choice not in runnable:
            raise ValueError(f"{self.policy.describe()} chose {getattr(choice, 'name', choice)!r}, "
                             "which is not runnable")
        if choice is not default or (self._replayed is not None and self._replayed.get(key) == choice.name):
            self.preemptions.append((name, n, choice.name))
        return choice

    def step(self) -> TraceEntry | None:
        """Take one decision: the policy picks a runnable parked context, which is released.

        Call it when no context is running (every one is parked or blocked on a model lock);
        :meth:`run_driver` is a loop that waits for that and calls this. Returns what was
        released, or None when the run failed here instead (deadlock, livelock, or the policy's
        :class:`ScheduleDivergence`; see :attr:`failure`) or nothing is parked.
        """
        if not self._parked:
            return None
        runnable = self._runnable()
        if not runnable:
            self._fail(Deadlock(
                "every context is blocked: "
                + ", ".join(f"{a.name} at {a.label}" for a in sorted(self._parked.values(), key=lambda a: a.name))
            ))
            return None
        self.decisions += 1
        if self.decisions > self.max_decisions:
            self._fail(Deadlock(f"no end after {self.max_decisions} decisions (livelock?)"))
            return None
        try:
            a = self._choose(runnable)
        except ScheduleDivergence as exc:
            self._fail(exc)
            return None
        entry = _trace_entry((a.name, a.decisions, a.label))
        self.trace.append(entry)
        del self._parked[a.name]
        self._running = a
        self._last = a
        self._release(a)
        return entry

    @staticmethod
    def _release(a: _Actor) -> None:
        a.go = True
        if a.task is not None:
            trio.lowlevel.reschedule(a.task)
            a.task = None

    async def run_driver(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Release one parked context at a time, forever (cancel to stop): a loop over :meth:`step`."""
        counter = _runnable_counter() if self.inline_decisions else None
        try:
            await self._drive(counter, task_status)
        finally:
            self._runnable_tasks = None

    async def _drive(self, counter: _Runnable | None, task_status) -> None:
        task_status.started()
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if counter is not None and counter.calibrated:  # (exact from the first wait for I/O on)
                self._runnable_tasks = counter
            if self._running_outside_model():  # wait for it
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            if not self._parked:
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            self.step()

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
        for a in list(self._parked.values()):
            del self._parked[a.name]
            self._release(a)


class _Context:
    """:meth:`ControlledScheduler.context` (a class: an ``asynccontextmanager`` costs a generator and
    its wrappers per kernel context)."""

    __slots__ = ("sched", "actor", "a", "token")

    def __init__(self, sched: ControlledScheduler, actor: str):
        self.sched = sched
        self.actor = actor

    async def __aenter__(self) -> None:
        self.a = a = self.sched._enter(self.actor)
        self.token = current_actor.set(self.actor)
        try:
            if not self.sched._parked_and_released(a, "enter", None):
                await self.sched._wait_released(a)
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc) -> None:
        self._leave()

    def _leave(self) -> None:
        current_actor.reset(self.token)
        self.sched._exit(self.a)


def make_scheduler(kind: str, seed: int | None = None, schedule: str | None = None, depth: int = 3,
                   policy: SchedulingPolicy | None = None) -> Scheduler:
    """Build a scheduler from its scenario/CLI description (``policy``, when given, is used as is:
    a hunt passes the one policy object that spans its executions).

    Raises:
        ValueError: unknown kind, or missing seed/schedule.
    """
    if kind == "free":
        return FreeScheduler()
    if policy is not None:
        return ControlledScheduler(policy)
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
    if kind == "dfs":
        return ControlledScheduler(Dfs())
    if kind == "bounded":
        return ControlledScheduler(Bounded(depth))
    raise ValueError(f"unknown scheduler {kind!r} (free, random, pct, replay, dfs, bounded)")
