"""Kernel contexts, scheduling points, and the schedulers that order them.

* :mod:`~hypervisor.sched.core`: what model code calls (``current_actor``,
  ``Scheduler.point`` / ``wait_until`` / ``wake``) and the :class:`FreeScheduler`
  (a point is a trio checkpoint; the default for real multi-process runs).
* :mod:`~hypervisor.sched.controlled`: the :class:`ControlledScheduler`: exactly
  one context runs at a time; :meth:`~ControlledScheduler.step` takes one
  decision, :meth:`~ControlledScheduler.run_driver` loops over it.
* :mod:`~hypervisor.sched.policies`: who runs next, as objects: :class:`Random`,
  :class:`Pct`, :class:`Replay`, :class:`Dfs`, :class:`Bounded`, :class:`Scripted`.
* :mod:`~hypervisor.sched.schedule`: the schedule text ``actor@n>other,...``.

Many executions of one program under one policy (exhaustive search, seed
hunts, shrinking a failing schedule) are :mod:`mtekvm.hunt`'s job.
"""

from hypervisor.sched.controlled import ControlledScheduler, TraceEntry, make_scheduler
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
    Scripted,
    next_prefix,
    parse_policy,
)
from hypervisor.sched.schedule import Preemption, format_schedule, parse_schedule

__all__ = [
    "PCT_STEPS", "Bounded", "ControlledScheduler", "Decision", "Dfs", "FreeScheduler", "Pct", "Preemption",
    "Random", "Replay", "Scheduler", "SchedulingPolicy", "Scripted", "TraceEntry", "current_actor",
    "format_schedule", "make_scheduler", "next_prefix", "parse_policy", "parse_schedule",
]
