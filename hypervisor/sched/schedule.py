"""The schedule text format: ``actor@n>other,...``.

A schedule is the list of a controlled run's *preemptions*: ``actor@n>other``
means "when ``actor`` reached its n-th decision, run ``other`` instead of the
default". The default rule is: keep running the current actor; when it blocks
or ends, take the lowest-named runnable one (decisions before any context has
run belong to the pseudo-actor ``start``). Every policy's run is recorded in
this form, so any failure replays with ``--scheduler replay --schedule TEXT``.
"""

from __future__ import annotations

import re

Preemption = tuple[str, int, str]  # (actor, n, other)

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


def format_schedule(preemptions: list[Preemption]) -> str:
    """Inverse of :func:`parse_schedule` for a recorded list."""
    return ",".join(f"{a}@{n}>{t}" for a, n, t in preemptions)
