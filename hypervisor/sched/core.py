"""What model code calls: the current actor, scheduling points, and the free scheduler.

A *context* is one trio task running one kernel path for one CPU (a syscall
from a connection, a host reclaim pass, a fault). Shared kernel state changes
only between scheduling points: ``await sched.point("mte_sync_tags:clear")``
marks a place where another CPU could observe the path half way. Blocking on a
model lock is :meth:`Scheduler.wait_until`, which parks the context until a
predicate on model state holds; nobody busy-loops.

Actor names come from the request's ``ctx`` (the runner uses ``ACTOR/STEP``);
the current actor is held in a context variable so model code needs no
argument for it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

current_actor: contextvars.ContextVar[str] = contextvars.ContextVar("current_actor", default="?")


class _Named:
    """:meth:`Scheduler.context`: the body runs with ``current_actor`` set to the name."""

    __slots__ = ("actor", "token")

    def __init__(self, actor: str):
        self.actor = actor

    async def __aenter__(self) -> None:
        self.token = current_actor.set(self.actor)

    async def __aexit__(self, *exc) -> None:
        current_actor.reset(self.token)


class Scheduler:
    """Interface every scheduler provides to model code."""

    kind = "abstract"

    def context(self, actor: str) -> AbstractAsyncContextManager[None]:
        """Run the body as kernel context ``actor``."""
        return _Named(actor)

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
    """Points are trio checkpoints, one per time slice; trio decides the order. Used across processes.

    A point yields to trio only when :attr:`SLICE` seconds have passed since
    the last point that did (a tick-driven preemption, as a CPU's timer gives):
    a full trio scheduler pass costs 4-10 us, several times the kernel work
    between two points of a fault path, and no order is promised here anyway.
    Blocking (:meth:`wait_until`) always parks. A controlled scheduler decides
    at every point.
    """

    kind = "free"
    #: seconds a context may run between two yields to trio
    SLICE = 0.001

    def __init__(self):
        self._lot = trio.lowlevel.ParkingLot()
        self.points = 0
        self.yields = 0  # points that yielded to trio
        self._last = 0.0

    async def point(self, label: str) -> None:
        self.points += 1
        now = time.perf_counter()
        if now - self._last >= self.SLICE:
            self._last = now
            self.yields += 1
            await trio.lowlevel.checkpoint()

    async def wait_until(self, pred, label):
        while not pred():
            await self._lot.park()

    def wake(self) -> None:
        if len(self._lot):  # nobody parked (the common case): nothing to do
            self._lot.unpark_all()
