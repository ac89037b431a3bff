"""The scheduler's failures; :class:`KernelError` now lives in :mod:`shared.errno` (re-exported here)."""

from __future__ import annotations

from shared.errno import KernelError

__all__ = ["Deadlock", "KernelError", "ScheduleDivergence"]


class ScheduleDivergence(Exception):
    """A replayed schedule does not apply to this run (its target actor was not runnable)."""


class Deadlock(Exception):
    """Every live context is blocked on a model lock: nobody can make progress."""
