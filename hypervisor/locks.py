"""Model locks: kernel sleeping locks whose waiters park with the scheduler.

Each lock is plain state plus :meth:`Scheduler.wait_until`, so under the
controlled scheduler a blocked context is simply not runnable, and under the
free scheduler it parks on a trio ParkingLot. Acquiring is a scheduling point
(another CPU may take the lock first).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from hypervisor.sched import Scheduler, current_actor


class ModelMutex:
    """A ``struct mutex`` (e.g. ``kvm->slots_lock``)."""

    def __init__(self, sched: Scheduler, name: str):
        self.sched = sched
        self.name = name
        self.owner: str | None = None

    async def lock(self) -> None:
        """mutex_lock(): sleep until free, then own it."""
        await self.sched.point(f"{self.name}:lock")
        await self.sched.wait_until(lambda: self.owner is None, f"{self.name}:wait")
        self.owner = current_actor.get()

    def unlock(self) -> None:
        """mutex_unlock()."""
        self.owner = None
        self.sched.wake()

    @asynccontextmanager
    async def held(self):
        """``async with mutex.held():`` locks around the body."""
        await self.lock()
        try:
            yield
        finally:
            self.unlock()


class ModelRwSem:
    """A read/write semaphore (``mmap_lock``). Writers exclude everyone."""

    def __init__(self, sched: Scheduler, name: str):
        self.sched = sched
        self.name = name
        self.readers = 0
        self.writer: str | None = None

    async def read_lock(self) -> None:
        """mmap_read_lock()."""
        await self.sched.point(f"{self.name}:read_lock")
        await self.sched.wait_until(lambda: self.writer is None, f"{self.name}:read_wait")
        self.readers += 1

    def read_unlock(self) -> None:
        """mmap_read_unlock()."""
        self.readers -= 1
        self.sched.wake()

    async def write_lock(self) -> None:
        """mmap_write_lock()."""
        await self.sched.point(f"{self.name}:write_lock")
        await self.sched.wait_until(lambda: self.writer is None and self.readers == 0, f"{self.name}:write_wait")
        self.writer = current_actor.get()

    def write_unlock(self) -> None:
        """mmap_write_unlock()."""
        self.writer = None
        self.sched.wake()

    @asynccontextmanager
    async def read(self):
        """``async with sem.read():``."""
        await self.read_lock()
        try:
            yield
        finally:
            self.read_unlock()

    @asynccontextmanager
    async def write(self):
        """``async with sem.write():``."""
        await self.write_lock()
        try:
            yield
        finally:
            self.write_unlock()
