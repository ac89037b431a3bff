"""The hunt engine: many executions of one scenario under one policy, then a shrunk failure.

:func:`run_scenario` is one execution; a hunt is the loop around it (shuttle's
runner, Hypothesis's engine):

1. **search**: ``random`` and ``pct`` run one execution per seed (``seed``,
   ``seed + 1``, ... for ``runs`` seeds; seed N chooses exactly as
   ``--scheduler random --seed N`` does, so a reported seed reruns alone);
   ``dfs`` and ``bounded:N`` run one policy object through
   ``policy.new_execution()`` until it has covered every interleaving (every one
   with at most N preemptions) or ``runs`` executions are done; ``replay`` and
   ``free`` run once. The search stops at the first failing execution, or runs
   them all with ``collect=True``.
2. **shrink** (controlled runs): the first failure's schedule is cut to fewer
   preemptions. Chunks go first (half the schedule, then quarters, ...), then
   each pass tries dropping one preemption (then two adjacent ones: a switch
   away and the switch back); each candidate replays leniently (an entry
   whose target is not runnable is skipped), at most :data:`SHRINK_BUDGET`
   executions in all; if the run
   still fails with the same first invariant (or step, or missing expected
   violation), the run's own recorded schedule replaces the schedule. Repeats
   until no single drop keeps the failure. Deterministic: the same failure
   always shrinks to the same schedule.
3. **confirm**: the shrunk schedule is replayed strictly (``HuntResult.shrunk``,
   whose replay command is the hunt's).

A scenario with several hosts runs every host's kernel under one scheduler per
execution (the runner shares it), so every policy, and shrinking, works on it as
on one host.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from hypervisor.sched import Bounded, Dfs, Replay, SchedulingPolicy, parse_schedule
from mtekvm.runner import RunError, RunOptions, ScenarioResult, run_scenario
from mtekvm.scenario import Scenario, SchedulerSpec, load_scenario

SEEDED = ("random", "pct")
EXHAUSTIVE = ("dfs", "bounded")


@attrs.frozen
class Failure:
    """One failing execution of the search."""

    execution: int  # 1-based, in search order
    seed: int | None  # random / pct: the seed that reruns it
    result: ScenarioResult


@attrs.frozen
class HuntResult:
    """What a hunt found.

    Attributes:
        scenario: the scenario's name.
        policy: the search, e.g. ``random(seeds 0..199)``, ``dfs``, ``bounded(2)``.
        runs: executions the search ran (shrinking and confirming not counted).
        exhausted: an exhaustive policy covered its whole space (no budget cut it short).
        failures: the failing executions, in order (one unless ``collect``).
        found_schedule: the first failure's schedule as found.
        schedule: that schedule shrunk (equal to ``found_schedule`` if nothing could be dropped).
        shrink_runs: executions shrinking took.
        result: the first failing execution's result (as found: its seed, its own replay
            command), or the last execution's when none failed.
        shrunk: the strict replay of ``schedule`` when something failed under a controlled
            scheduler (it fails the same way: that is checked); else None.
    """

    scenario: str
    policy: str
    runs: int
    exhausted: bool
    failures: tuple[Failure, ...]
    found_schedule: str
    schedule: str
    shrink_runs: int
    result: ScenarioResult | None
    shrunk: ScenarioResult | None = None

    @property
    def passed(self) -> bool:
        """No execution failed."""
        return not self.failures

    @property
    def first(self) -> Failure | None:
        """The first failing execution."""
        return self.failures[0] if self.failures else None

    @property
    def replay_command(self) -> str | None:
        """The command that replays the failure, shrunk when it could be."""
        if self.passed:
            return None
        r = self.shrunk or self.result
        return r.replay_command if r is not None else None

    @property
    def preemptions(self) -> tuple[int, int]:
        """Preemptions in the failing schedule as found, and after shrinking."""
        return len(_entries(self.found_schedule)), len(_entries(self.schedule))


def scheduler_spec(text: str, *, seed: int | None = None, depth: int = 3, schedule: str | None = None) -> SchedulerSpec:
    """A :class:`SchedulerSpec` from a command-line name: ``free``, ``random``, ``pct``, ``replay``,
    ``dfs`` or ``bounded:N`` (N preemptions).

    Raises:
        ValueError: an unknown name or a bad bound.
    """
    if text.startswith("bounded:"):
        n = text.split(":", 1)[1]
        if not n.isdigit():
            raise ValueError(f"bounded:N needs a preemption bound N >= 0 (got {n!r})")
        return SchedulerSpec("bounded", None, None, int(n))
    if text in ("dfs", "free"):
        return SchedulerSpec(text)
    if text in SEEDED:
        return SchedulerSpec(text, seed if seed is not None else 0, None, depth)
    if text == "replay":
        if schedule is None:
            raise ValueError("replay needs a schedule")
        return SchedulerSpec("replay", None, schedule)
    raise ValueError(f"unknown scheduler {text!r} (free, random, pct, replay, dfs, bounded:N)")


def failure_kinds(r: ScenarioResult) -> list[str]:
    """What a failed run got wrong, in order: unexpected invariants, failing steps, expected
    violations that did not happen. Shrinking keeps a schedule only if the first of these stays."""
    out: list[str] = []
    seen = set()
    for v in r.violations:
        inv = v.get("invariant", "?")
        seen.add(inv)
        if inv not in r.expect_violations and inv not in out:
            out.append(inv)
    out += [f"step {s.index}" for s in r.steps if not s.passed]
    out += [f"missing {inv}" for inv in r.expect_violations if inv not in seen]
    return out


def _policy(spec: SchedulerSpec) -> SchedulingPolicy:
    return Dfs() if spec.kind == "dfs" else Bounded(spec.depth)


def _describe(spec: SchedulerSpec, runs: int | None) -> str:
    if spec.kind in SEEDED:
        first = spec.seed or 0
        n = runs or 1
        what = f"seeds {first}..{first + n - 1}" if n > 1 else f"seed={first}"
        return f"{spec.kind}({what}{', depth=' + str(spec.depth) if spec.kind == 'pct' else ''})"
    if spec.kind == "bounded":
        return f"bounded({spec.depth})"
    return spec.kind


async def hunt(scenario: Scenario | str, scheduler: SchedulerSpec | str | None = None, *, runs: int | None = None,
               options: RunOptions | None = None, collect: bool = False, shrink: bool = True,
               progress: Callable[[int, ScenarioResult], None] | None = None) -> HuntResult:
    """Search ``scenario`` for a failing execution under ``scheduler``, then shrink its schedule.

    Args:
        scenario: a loaded scenario or a path.
        scheduler: a :class:`SchedulerSpec`, a name for :func:`scheduler_spec`, or None for
            ``options.scheduler`` or else the scenario's own.
        runs: random / pct: how many seeds (default 1); dfs / bounded: at most this many
            executions (default: until the space is exhausted); ignored for replay and free.
        options: host, extra bugs (its ``scheduler`` is used when ``scheduler`` is None); default none.
        collect: run the whole budget and keep every failure, instead of stopping at the first.
        shrink: shrink the first failure's schedule (controlled schedulers only).
        progress: called after each search execution with its number and result.

    Raises:
        RunError: what :func:`run_scenario` raises (a replay that does not fit is a ``ReplayError``),
            or a scenario an exhaustive policy cannot walk (not deterministic).
        InfraError: as :func:`run_scenario`.
    """
    scn = load_scenario(scenario) if isinstance(scenario, str) else scenario
    options = options or RunOptions()
    if isinstance(scheduler, str):
        scheduler = scheduler_spec(scheduler)
    spec = scheduler or options.scheduler or scn.scheduler
    if runs is not None and runs < 1:
        raise ValueError(f"runs must be at least 1 (got {runs})")

    async def execute(s: SchedulerSpec) -> ScenarioResult:
        return await run_scenario(scn, attrs.evolve(options, scheduler=s))

    failures: list[Failure] = []
    last: ScenarioResult | None = None
    done = 0
    exhausted = False

    async def one(s: SchedulerSpec, seed: int | None) -> bool:
        """Run one search execution; True to go on."""
        nonlocal done, last
        last = await execute(s)
        done += 1
        for v in last.violations:  # an exhaustive walk on a program that does not repeat itself is meaningless
            if v.get("invariant") == "SCHEDULER" and "not deterministic" in str(v.get("message", "")):
                raise RunError(f"{spec.kind} cannot walk this scenario: {v['message']}")
        if progress is not None:
            progress(done, last)
        if not last.passed:
            failures.append(Failure(done, seed, last))
            return collect
        return True

    if spec.kind in SEEDED:
        first = spec.seed or 0
        for seed in range(first, first + (runs or 1)):
            if not await one(SchedulerSpec(spec.kind, seed, None, spec.depth), seed):
                break
    elif spec.kind in EXHAUSTIVE:
        policy = _policy(spec)
        while runs is None or done < runs:
            if not policy.new_execution():
                exhausted = True
                break
            if not await one(SchedulerSpec(spec.kind, None, None, spec.depth, policy=policy), None):
                break
        else:
            exhausted = not policy.new_execution()
    else:
        await one(spec, None)

    found = failures[0].result.schedule if failures else ""
    schedule, shrink_runs, shrunk = found, 0, None
    if failures and spec.kind != "free" and shrink and found:
        schedule, shrink_runs = await _shrink(execute, failures[0].result, spec.depth)
        shrunk = await execute(SchedulerSpec("replay", None, schedule, spec.depth))
        if shrunk.passed:  # cannot happen if the model is deterministic; say so rather than hide it
            raise RunError(f"the failing schedule {schedule!r} ran clean on replay: the scenario is not "
                           f"deterministic under the controlled scheduler")
    result = failures[0].result if failures else last
    return HuntResult(scn.name, _describe(spec, runs), done, exhausted, tuple(failures), found, schedule,
                      shrink_runs, result, shrunk)


#: Executions a shrink may take (a random walk over a long run, such as a live migration, records
#: hundreds of preemptions); the schedule found so far is kept when the budget runs out.
SHRINK_BUDGET = 400


async def _shrink(execute, failed: ScenarioResult, depth: int, budget: int = SHRINK_BUDGET) -> tuple[str, int]:
    """Drop preemptions from ``failed``'s schedule while the run keeps failing the same way.

    First whole chunks (half the schedule, then quarters, ... as delta debugging does: a long
    random schedule mostly holds preemptions the failure does not need), then single
    preemptions and adjacent pairs until no drop keeps the failure, within ``budget`` executions.

    Returns the shrunk schedule and the executions it took.
    """
    target = failure_kinds(failed)[:1]
    current = _entries(failed.schedule)
    runs = 0

    async def still_fails(candidate: list[str]) -> bool:
        nonlocal current, runs
        text = ",".join(candidate)
        r = await execute(SchedulerSpec("replay", None, text, depth, policy=Replay(text, strict=False)))
        runs += 1
        if not r.passed and (not target or target[0] in failure_kinds(r)):
            current = _entries(r.schedule)  # what that run really did (skipped entries gone)
            return True
        return False

    chunk = len(current) // 2
    while chunk > 2 and runs < budget:
        i = 0
        while i < len(current) and runs < budget:
            if not await still_fails(current[:i] + current[i + chunk:]):
                i += chunk
        chunk //= 2
    changed = True
    while changed and runs < budget:
        changed = False
        for width in (1, 2):  # one preemption; then a switch away and back together
            i = 0
            while i + width <= len(current) and runs < budget:
                if await still_fails(current[:i] + current[i + width:]):
                    changed = True
                else:
                    i += 1
    return ",".join(current), runs


def _entries(schedule: str) -> list[str]:
    """A schedule's entries, in the order the run took them."""
    parse_schedule(schedule)  # validates
    return [p.strip() for p in schedule.split(",") if p.strip()]


__all__ = ["Failure", "HuntResult", "failure_kinds", "hunt", "scheduler_spec"]
