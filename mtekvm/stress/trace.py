"""What interleaved: a recorded controlled run as Chrome trace event JSON and as text.

:class:`Recording` wraps any scheduling policy and keeps every decision
(who was runnable, who ran, at which Linux scheduling point); a strict replay
is recorded with :class:`RecordingReplay` (a :class:`Replay`, so the runner's
strict checks still apply). :func:`chrome_trace` turns the decisions into the
Trace Event Format that Perfetto and chrome://tracing open: one track
(thread) per actor, a slice per step's kernel context, an instant per
scheduling point with its label, a flow arrow where a context that was
blocked (on a model lock: it was parked but not runnable) becomes runnable
right after another context ran (the hand-off), and the violation as a global
instant. Time is the decision number (one decision = 10 µs of trace time):
the trace shows order, not duration.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from hypervisor.sched import Decision, Replay, SchedulingPolicy

TICK = 10  # trace microseconds per decision


@attrs.frozen
class Point:
    """One decision: the context released, the point it was parked at, and who else could run."""

    index: int
    context: str  # ACTOR/STEP
    label: str
    runnable: tuple[str, ...]


class Recording:
    """A policy that records every decision of ``inner`` (:class:`Point`), execution by execution."""

    def __init__(self, inner: SchedulingPolicy):
        self.inner = inner
        self.points: list[Point] = []
        self.seed = getattr(inner, "seed", None)

    def new_execution(self) -> bool:
        ok = self.inner.new_execution()
        if ok and self.points:
            self.points = []
        return ok

    def choose(self, d: Decision) -> Any:
        a = self.inner.choose(d)
        self.points.append(Point(len(self.points) + 1, a.name, a.label, tuple(x.name for x in d.runnable)))
        return a

    def describe(self) -> str:
        return self.inner.describe()


class RecordingReplay(Replay):
    """A strict :class:`Replay` that records its decisions as :class:`Recording` does."""

    def __init__(self, schedule: str):
        super().__init__(schedule, strict=True)
        self.points: list[Point] = []

    def _choose(self, d: Decision) -> Any:
        a = super()._choose(d)
        self.points.append(Point(len(self.points) + 1, a.name, a.label, tuple(x.name for x in d.runnable)))
        return a


def actor_of(context: str) -> str:
    """``guest:vm0/7.1`` -> ``guest:vm0``."""
    return context.rsplit("/", 1)[0]


#: Labels that say where a context waits, not which kernel path it is on.
_GENERIC = ("enter", "uaccess", "guest_access")


def kernel_path(points: list[Point], actor: str, width: int = 3) -> tuple[str, ...]:
    """The kernel functions the violating context (or actor) went through last: the function
    part of its last ``width`` distinct scheduling-point labels (``mte_sync_tags:clear`` ->
    ``mte_sync_tags``), lock waits and generic points left out, sorted. A failure is
    deduplicated on its invariant and this path."""
    mine = [p.label.split(":")[0] for p in points if p.context == actor or actor_of(p.context) == actor]
    out: list[str] = []
    for fn in reversed(mine):
        if fn in _GENERIC or "lock" in fn or fn in out:
            continue
        out.append(fn)
        if len(out) == width:
            break
    return tuple(sorted(out))


def _handoffs(points: list[Point]) -> list[tuple[int, int]]:
    """(decision of the releaser, decision of the woken context's next release) pairs: a context
    seen runnable before, absent from a decision's runnable set (blocked), then runnable again."""
    out = []
    seen: set[str] = set()
    blocked: set[str] = set()
    for i, p in enumerate(points):
        run = set(p.runnable)
        if i > 0:
            for c in blocked & run:
                nxt = next((j for j in range(i, len(points)) if points[j].context == c), None)
                if nxt is not None:
                    out.append((i - 1, nxt))
            blocked -= run
            blocked |= seen - run  # every context is parked at a decision: absent means blocked (or ended)
        seen |= run
    return out


def chrome_trace(points: list[Point], *, steps: dict[str, str] | None = None, violations: list[dict] | None = None,
                 title: str = "") -> dict:
    """The run as a Chrome trace event document (``{"traceEvents": [...]}``).

    ``steps`` maps a context (``ACTOR/STEP``) to the op it ran, for the slice names.
    """
    steps = steps or {}
    actors: dict[str, int] = {}
    events: list[dict] = [{"ph": "M", "pid": 1, "tid": 0, "name": "process_name",
                           "args": {"name": title or "mtekvm stress"}}]

    def tid(actor: str) -> int:
        if actor not in actors:
            actors[actor] = len(actors) + 1
            events.append({"ph": "M", "pid": 1, "tid": actors[actor], "name": "thread_name", "args": {"name": actor}})
            events.append({"ph": "M", "pid": 1, "tid": actors[actor], "name": "thread_sort_index",
                           "args": {"sort_index": actors[actor]}})
        return actors[actor]

    span: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        span.setdefault(p.context, [i, i])[1] = i
    for ctx, (first, last) in span.items():
        step = ctx.rsplit("/", 1)[-1]
        events.append({"ph": "X", "pid": 1, "tid": tid(actor_of(ctx)), "ts": first * TICK,
                       "dur": (last - first + 1) * TICK, "name": f"{step} {steps.get(ctx, '')}".strip(),
                       "cat": "step", "args": {"context": ctx}})
    for i, p in enumerate(points):
        events.append({"ph": "i", "s": "t", "pid": 1, "tid": tid(actor_of(p.context)), "ts": i * TICK + 1,
                       "name": p.label, "cat": "point",
                       "args": {"decision": p.index, "context": p.context, "runnable": list(p.runnable)}})
    for n, (a, b) in enumerate(_handoffs(points)):
        pa, pb = points[a], points[b]
        events.append({"ph": "s", "id": n + 1, "pid": 1, "tid": tid(actor_of(pa.context)), "ts": a * TICK + 2,
                       "name": "wake", "cat": "handoff", "bp": "e"})
        events.append({"ph": "f", "id": n + 1, "pid": 1, "tid": tid(actor_of(pb.context)), "ts": b * TICK + 1,
                       "name": "wake", "cat": "handoff", "bp": "e"})
    end = len(points) * TICK
    for v in violations or []:
        ctx = str(v.get("actor") or "")
        at = max((i for i, p in enumerate(points) if p.context == ctx), default=len(points) - 1)
        events.append({"ph": "i", "s": "g", "pid": 1, "tid": tid(actor_of(ctx)) if ctx else 0,
                       "ts": (at * TICK + 5) if ctx else end, "name": f"VIOLATION {v.get('invariant')}",
                       "cat": "violation", "args": {k: v[k] for k in v if isinstance(v[k], (str, int, type(None)))}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "mtekvm stress", "tick_us_per_decision": TICK}}


def text_interleaving(points: list[Point], *, steps: dict[str, str] | None = None,
                      violations: list[dict] | None = None, limit: int = 200) -> list[str]:
    """The run as text: one line per decision (number, context, its op, the Linux label), a
    ``*`` where the context switched, the violations last. Long runs keep the last ``limit``."""
    steps = steps or {}
    lines = []
    prev = None
    shown = points[-limit:]
    if len(points) > limit:
        lines.append(f"  ... {len(points) - limit} earlier decisions")
    for p in shown:
        mark = "*" if prev is not None and p.context != prev else " "
        lines.append(f"  {p.index:5} {mark} {p.context:22} {steps.get(p.context, ''):18} {p.label}")
        prev = p.context
    for v in violations or []:
        lines.append(f"  VIOLATION {v.get('invariant')} by {v.get('actor') or '?'}: {v.get('message', '')}")
    return lines


def write_trace(path: str, doc: dict) -> None:
    """Write a trace document as JSON."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"))
