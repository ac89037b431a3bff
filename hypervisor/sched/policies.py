"""Scheduling policies: who runs next, as objects (shuttle's ``Scheduler`` trait).

A policy answers two questions (:class:`SchedulingPolicy`):

* :meth:`~SchedulingPolicy.new_execution`: get ready for the next execution of
  the same program; ``False`` when there is none (an exhaustive search is done,
  a replay has run). The first execution needs no call: a new policy is ready
  for it, and a first ``new_execution()`` before any decision is a no-op that
  returns ``True``. So one run is ``ControlledScheduler(policy)``, and many runs
  are ``while policy.new_execution(): ...`` (:mod:`mtekvm.hunt`).
* :meth:`~SchedulingPolicy.choose`: given a :class:`Decision` (the runnable
  contexts, sorted by name, the one that ran last, the default), return one of
  the runnable contexts.

Implementations: :class:`Random` (a uniform random walk), :class:`Pct`
(probabilistic concurrency testing), :class:`Coverage` (a random walk that
prefers pairs of scheduling points not seen yet), :class:`Replay` (a recorded schedule,
strict or lenient), :class:`Dfs` (every interleaving, depth first),
:class:`Bounded` (every interleaving with at most N preemptions, CHESS's
bound) and :class:`Scripted` (a function, for hand-written interleavings in
tests). Whatever the policy, the controlled scheduler records the run as a
schedule (:mod:`hypervisor.sched.schedule`), so every run replays.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from hypervisor.sched.schedule import Preemption, parse_schedule
from shared.errno import ScheduleDivergence

PCT_STEPS = 40  # PCT's first-execution bound on contended decisions (change points are drawn below it)


class Decision(NamedTuple):
    """One scheduling decision, as a policy sees it (a named tuple: one is made per decision).

    Attributes:
        runnable: the contexts that may run, sorted by name; each has ``name``, ``label`` (the
            point it is parked at) and ``alive``.
        last: the name of the context released last (``"start"`` before any).
        default: the default rule's choice: ``last`` if it is still runnable, else ``runnable[0]``.
        key: ``(last, n)``: this is ``last``'s n-th decision (a schedule entry's name).
        index: the decision's number in this execution, from 1.
    """

    runnable: tuple[Any, ...]
    last: str
    default: Any
    key: tuple[str, int]
    index: int  # type: ignore[assignment]  # (shadows tuple.index: a decision is never searched)

    @property
    def current(self) -> Any | None:
        """The context that ran last, if it may go on (choosing another is a preemption)."""
        return self.default if self.default.name == self.last else None


class SchedulingPolicy(Protocol):
    """What :class:`~hypervisor.sched.controlled.ControlledScheduler` asks of a policy."""

    def new_execution(self) -> bool:
        """Prepare the next execution; ``False`` when there is none left."""
        ...

    def choose(self, d: Decision) -> Any:
        """One of ``d.runnable``: the context to release."""
        ...

    def describe(self) -> str:
        """The policy as a report shows it, e.g. ``random(seed=3)``."""
        ...


class _Policy:
    """Counts executions, so that the first ``new_execution()`` is free (see the module doc)."""

    def __init__(self) -> None:
        self.executions = 0  # executions started (the first starts at its first decision)

    def new_execution(self) -> bool:
        if self.executions == 0:
            self.executions = 1
            return True
        if not self._next_execution():
            return False
        self.executions += 1
        return True

    def choose(self, d: Decision) -> Any:
        if self.executions == 0:
            self.executions = 1
        return self._choose(d)

    def _next_execution(self) -> bool:
        raise NotImplementedError

    def _choose(self, d: Decision) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class Random(_Policy):
    """A uniform random walk over the runnable contexts, from ``random.Random(seed)``.

    Later executions go on drawing from the same generator.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self._rng = random.Random(seed)
        self._bits = self._rng.getrandbits

    def _next_execution(self) -> bool:
        return True

    def choose(self, d: Decision) -> Any:
        self.executions = self.executions or 1
        return self._choose(d)

    def _choose(self, d: Decision) -> Any:
        # random.Random.choice(d.runnable), written out (one call a decision, not three): the same draws
        runnable = d.runnable
        n = len(runnable)
        k = n.bit_length()
        r = self._bits(k)
        while r >= n:
            r = self._bits(k)
        return runnable[r]

    def describe(self) -> str:
        return f"random(seed={self.seed})"


class Pct(_Policy):
    """Probabilistic concurrency testing (Burckhardt et al. 2010).

    Random distinct priorities, the highest-priority runnable context runs, and
    at ``depth - 1`` random decisions the running context drops to a low
    priority; finds a depth-d bug with probability at least 1/(n k^(d-1)) where
    k bounds the contended decisions (those with a choice). A context seen for
    the first time gets a random priority above every dropped one.

    The first execution draws its change points below ``steps`` (default 40);
    like shuttle, later executions of the same object use the largest number of
    contended decisions seen so far (the learned bound), with fresh priorities.
    """

    def __init__(self, seed: int, depth: int = 3, steps: int = PCT_STEPS):
        super().__init__()
        if depth < 1:
            raise ValueError("pct depth must be at least 1")
        self.seed = seed
        self.depth = depth
        self.steps = steps  # the bound the current execution draws its change points from
        self.seen = 0  # the most contended decisions of any execution so far
        self._rng = random.Random(seed)
        self._start()

    def _start(self) -> None:
        self._priority: dict[str, float] = {}
        self._contended = 0
        points = self._rng.sample(range(1, self.steps + 1), min(self.depth - 1, self.steps))
        self.change_points = {p: i for i, p in enumerate(sorted(points))}

    def _next_execution(self) -> bool:
        self.seen = max(self.seen, self._contended)
        self.steps = max(self.seen, 1)
        self._start()
        return True

    def _choose(self, d: Decision) -> Any:
        for a in d.runnable:  # a context seen for the first time gets a random priority above depth
            if a.name not in self._priority:
                self._priority[a.name] = self.depth + self._rng.random()
        if len(d.runnable) < 2:
            return d.runnable[0]
        self._contended += 1  # PCT's k counts the decisions where there is a choice
        self.seen = max(self.seen, self._contended)
        low = self.change_points.get(self._contended)
        if low is not None and d.last in self._priority:
            self._priority[d.last] = low  # the running context drops below every new one
        return max(d.runnable, key=lambda a: self._priority[a.name])

    def describe(self) -> str:
        return f"pct(seed={self.seed}, depth={self.depth})"


class Coverage(_Policy):
    """A random walk that prefers new pairs of scheduling points (coverage-guided choice).

    A *pair* is (the point the context that ran last stopped at, the point a
    candidate is parked at): the two kernel paths that meet when that candidate
    runs next. At a decision with a choice, the candidates whose pair was never
    taken, in this execution or any earlier one of the same object, are
    preferred (uniformly among them); with probability ``explore``, or when
    every pair is known, any runnable context (uniformly). ``covered`` keeps
    the pairs, so one object over a campaign steers each run towards
    interleavings the earlier runs did not reach. Like the ideas in
    AFL-style greybox fuzzing of schedules (e.g. Wolff et al., "Greybox fuzzing
    for concurrency testing", ASPLOS 2024), with pairs of points as the
    feedback.
    """

    def __init__(self, seed: int, explore: float = 0.1):
        super().__init__()
        self.seed = seed
        self.explore = explore
        self.covered: set[tuple[str, str]] = set()
        self._rng = random.Random(seed)
        self._at = "start"  # the label the last released context was parked at

    def _next_execution(self) -> bool:
        self._at = "start"
        return True

    def _choose(self, d: Decision) -> Any:
        if len(d.runnable) == 1:
            choice = d.runnable[0]
        else:
            fresh = [a for a in d.runnable if (self._at, a.label) not in self.covered]
            pool = fresh if fresh and self._rng.random() >= self.explore else d.runnable
            choice = self._rng.choice(pool)
        self.covered.add((self._at, choice.label))
        self._at = choice.label
        return choice

    def describe(self) -> str:
        return f"coverage(seed={self.seed})"


class Replay(_Policy):
    """Follow a recorded schedule; the default rule everywhere else. One execution.

    Strict (the default): an entry whose target is not runnable is a
    :class:`~shared.errno.ScheduleDivergence`, and the runner reports
    entries never reached. Lenient (``strict=False``, for shrinking): such an
    entry is skipped, and the run's own recorded schedule says what happened.
    """

    def __init__(self, schedule: str, strict: bool = True):
        super().__init__()
        self.text = schedule
        self.entries = parse_schedule(schedule)
        self.strict = strict
        self.skipped: list[Preemption] = []

    def _next_execution(self) -> bool:
        return False

    def _choose(self, d: Decision) -> Any:
        target = self.entries.get(d.key)
        if target is None:
            return d.default
        for a in d.runnable:
            if a.name == target:
                return a
        if not self.strict:
            self.skipped.append((d.key[0], d.key[1], target))
            return d.default
        raise ScheduleDivergence(
            f"schedule entry {d.key[0]}@{d.key[1]}>{target}: {target!r} is not runnable at decision "
            f"{d.index} (runnable: {', '.join(a.name for a in d.runnable)})"
        )

    def unused(self, preemptions: Sequence[Preemption]) -> list[str]:
        """The entries a run with these recorded ``preemptions`` never reached."""
        used = {(a, n) for a, n, _t in preemptions}
        return [f"{a}@{n}>{t}" for (a, n), t in self.entries.items() if (a, n) not in used]

    def describe(self) -> str:
        return "replay" if self.strict else "replay(lenient)"


def next_prefix(log: Sequence[tuple[int, int]]) -> list[int] | None:
    """Depth-first backtracking over ``(chosen index, options)`` pairs: the choice prefix of the
    next unexplored execution, or None when every branch has been taken."""
    i = len(log) - 1
    while i >= 0 and log[i][0] + 1 >= log[i][1]:
        i -= 1
    if i < 0:
        return None
    return [c for c, _ in log[:i]] + [log[i][0] + 1]


class _TreeWalk(_Policy):
    """Stateless model checking: each execution replays a prefix of choice indices, then takes
    the first option at every later decision; the next prefix backtracks depth first."""

    def __init__(self) -> None:
        super().__init__()
        self._prefix: list[int] = []
        self._log: list[tuple[int, int]] = []  # (index chosen, number of options) per decision
        self._reset()

    def _reset(self) -> None:
        """Per-execution state of a subclass."""

    def _options(self, d: Decision) -> list[Any]:
        raise NotImplementedError

    def _taken(self, d: Decision, choice: Any) -> None:
        """Note the choice (a subclass counts preemptions)."""

    def _next_execution(self) -> bool:
        prefix = next_prefix(self._log)
        if prefix is None:
            return False
        self._prefix, self._log = prefix, []
        self._reset()
        return True

    def _choose(self, d: Decision) -> Any:
        options = self._options(d)
        i = len(self._log)
        c = self._prefix[i] if i < len(self._prefix) else 0
        if c >= len(options):
            raise ScheduleDivergence(
                f"{self.describe()}: decision {d.index} has {len(options)} options where the previous "
                f"execution had more: the program is not deterministic under the same choices"
            )
        self._log.append((c, len(options)))
        self._taken(d, options[c])
        return options[c]


class Dfs(_TreeWalk):
    """Every interleaving, depth first: at each decision, each runnable context in name order."""

    def _options(self, d: Decision) -> list[Any]:
        return list(d.runnable)

    def describe(self) -> str:
        return "dfs"


class Bounded(_TreeWalk):
    """Every interleaving with at most ``preemptions`` preemptions (CHESS's bound), depth first.

    A *preemption* is switching away from the context that ran last while it is
    still runnable; choosing among contexts when it blocked or ended is free.
    Races of depth ``preemptions`` or less are all covered, and the walk stays
    polynomial where :class:`Dfs`'s tree would not fit. ``Bounded(0)`` gives the
    serial orders.
    """

    def __init__(self, preemptions: int = 2):
        if preemptions < 0:
            raise ValueError("the preemption bound must be at least 0")
        self.preemptions = preemptions
        super().__init__()

    def _reset(self) -> None:
        self.used = 0

    def _options(self, d: Decision) -> list[Any]:
        cur = d.current
        if cur is None:
            return list(d.runnable)
        others = [a for a in d.runnable if a is not cur] if self.used < self.preemptions else []
        return [cur] + others

    def _taken(self, d: Decision, choice: Any) -> None:
        if d.current is not None and choice is not d.current:
            self.used += 1

    def describe(self) -> str:
        return f"bounded({self.preemptions})"


class Scripted(_Policy):
    """Choose with ``fn(runnable)`` (a test's hand-written interleaving). One execution."""

    def __init__(self, fn: Callable[[Sequence[Any]], Any]):
        super().__init__()
        self.fn = fn

    def _next_execution(self) -> bool:
        return False

    def _choose(self, d: Decision) -> Any:
        return self.fn(list(d.runnable))

    def describe(self) -> str:
        return "scripted"


def parse_policy(text: str, *, seed: int = 0, depth: int = 3) -> SchedulingPolicy:
    """A policy from its command-line name: ``random``, ``pct``, ``coverage``, ``dfs``, ``bounded:N``.

    Raises:
        ValueError: an unknown name or a bad bound.
    """
    if text == "random":
        return Random(seed)
    if text == "pct":
        return Pct(seed, depth)
    if text == "coverage":
        return Coverage(seed)
    if text == "dfs":
        return Dfs()
    if text.startswith("bounded:"):
        n = text.split(":", 1)[1]
        if not n.isdigit():
            raise ValueError(f"bounded:N needs a preemption bound N >= 0 (got {n!r})")
        return Bounded(int(n))
    raise ValueError(f"unknown policy {text!r} (random, pct, coverage, dfs, bounded:N)")
