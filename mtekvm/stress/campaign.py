"""A stress campaign: generated scenarios under a controlled policy until a budget runs out.

One worker (:func:`run_worker`) walks its slice of the seed space: seed ``s``
gives a scenario (:mod:`mtekvm.stress.gen`), run ``runs_per_scenario`` times
under one policy object (``random``; ``pct``, whose first execution draws its
change points below the step bound learned from the earlier scenarios and
later executions below the bound learned on this one, as shuttle's PCT does;
or ``coverage``, one object over the whole campaign so that its covered pairs
of scheduling points accumulate). Every oracle is checked (the runner checks
the invariants after every step and at the end). A failing run is
deduplicated on its oracle and kernel path (the scheduling-point labels of the
violating context, :func:`mtekvm.stress.trace.kernel_path`); a new one is
shrunk twice:

1. the scenario (:func:`shrink_scenario`): delta debugging over the steps:
   chunks of top-level steps, then single steps, then single operations of a
   parallel block; a candidate is kept when a few random schedules of it still
   fail with the same first failure (the same invariant);
2. the schedule: :func:`mtekvm.hunt.hunt` replays the failing schedule and
   drops preemptions while the failure stays, then confirms it strictly.

The shrunk failure is replayed once more under :class:`RecordingReplay` for
its trace. The seed slice is deterministic: shard ``I/N`` takes the seeds
``s`` with ``s % N == I``; worker ``w`` of ``J`` the seeds of its shard with
``(s // N) % J == w``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import attrs

from hypervisor.sched.policies import PCT_STEPS, Coverage, Pct, Random, Replay, SchedulingPolicy
from mtekvm.hunt import failure_kinds, hunt
from mtekvm.runner import InfraError, RunError, RunOptions, ScenarioResult, run_scenario
from mtekvm.scenario import ScenarioError, SchedulerSpec
from mtekvm.stress.gen import GenConfig, Generated, generate, load, to_toml
from mtekvm.stress.trace import (
    Point,
    Recording,
    RecordingReplay,
    chrome_trace,
    kernel_path,
    text_interleaving,
)

POLICIES = ("random", "pct", "coverage")


@attrs.frozen
class Budget:
    """A time budget (``60s``, ``2m``) or a run budget (``5000runs``)."""

    seconds: float | None = None
    runs: int | None = None

    def describe(self) -> str:
        return f"{self.seconds:g}s" if self.seconds is not None else f"{self.runs}runs"


def parse_budget(text: str) -> Budget:
    """``--budget``: ``60s``, ``90``, ``2m``, ``1h`` or ``5000runs``.

    Raises:
        ValueError: anything else, or a budget of zero.
    """
    t = text.strip().lower()
    try:
        if t.endswith("runs"):
            n = int(t[:-4])
            if n < 1:
                raise ValueError
            return Budget(runs=n)
        scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
        v = float(t[:-1]) if scale else float(t)
        v *= scale or 1
        if not v > 0 or not math.isfinite(v):
            raise ValueError
        return Budget(seconds=v)
    except ValueError:
        raise ValueError(f"--budget {text!r}: give a time (60s, 2m) or a number of runs (5000runs)") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` (0 <= I < N).

    Raises:
        ValueError: not of that form.
    """
    i, slash, n = text.partition("/")
    if not slash or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise ValueError(f"--shard {text!r}: give I/N with 0 <= I < N (e.g. 0/4)")
    return int(i), int(n)


@attrs.frozen
class CampaignConfig:
    """Everything one campaign (and each of its workers) needs; picklable for worker processes."""

    gen: GenConfig = attrs.field(factory=GenConfig)
    bugs: tuple[str, ...] = ()
    policy: str = "random"
    depth: int = 3
    budget: Budget = Budget(runs=100)
    runs_per_scenario: int = 2
    first_seed: int = 0
    shard: tuple[int, int] = (0, 1)
    jobs: int = 1
    shrink: bool = True
    shrink_tries: int = 10  # schedules tried per scenario-shrinking candidate (6 left races half-shrunk)
    shrink_runs: int = 400  # at most this many runs shrinking one scenario
    max_failures: int | None = None  # stop after this many distinct failures (None: the whole budget)
    out: str = "."  # where failure files will be written (the replay command names them there)
    deadline: float | None = None  # time.time() when a time budget ends for every worker (set by the parent)


def seeds(cfg: CampaignConfig, worker: int):
    """The seeds of ``worker`` in its shard, in order (an endless, deterministic slice)."""
    i, n = cfg.shard
    s = cfg.first_seed + i
    k = 0
    while True:
        if k % cfg.jobs == worker:
            yield s
        s += n
        k += 1


def failure_name(invariant: str, seed: int) -> str:
    """The file stem of a failure in the output folder."""
    safe = "".join(c if c.isalnum() else "-" for c in invariant.lower()).strip("-")
    return f"stress-{safe}-seed{seed}"


@attrs.define
class Stats:
    """What a worker has done so far (sent with progress)."""

    runs: int = 0
    scenarios: int = 0
    failing_runs: int = 0
    errors: int = 0
    shrink_runs: int = 0
    points: int = 0  # scheduling decisions taken in search runs
    pct_bound: int = PCT_STEPS
    coverage_pairs: int = 0
    error_lines: list[str] = attrs.field(factory=list)


class Worker:
    """One worker's campaign (trio); :meth:`run` returns the stats and the failures it found."""

    def __init__(self, cfg: CampaignConfig, worker: int = 0,
                 progress: Callable[[Stats, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.cfg = cfg
        self.worker = worker
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.stats = Stats()
        self.failures: list[dict] = []
        self.keys: set[tuple] = set()
        self.found_keys: set[tuple] = set()
        self.coverage = Coverage(cfg.first_seed * 7919 + worker) if cfg.policy == "coverage" else None
        self.started = time.monotonic()
        j = cfg.jobs
        b = cfg.budget
        self.max_runs = None if b.runs is None else b.runs // j + (1 if worker < b.runs % j else 0)

    def _policy(self, seed: int) -> SchedulingPolicy:
        if self.cfg.policy == "pct":
            return Pct(seed, self.cfg.depth, self.stats.pct_bound)
        if self.cfg.policy == "coverage":
            assert self.coverage is not None
            return self.coverage
        return Random(seed)

    def _out_of_budget(self) -> bool:
        b = self.cfg.budget
        if b.seconds is not None and time.monotonic() - self.started >= b.seconds:
            return True
        if self.cfg.deadline is not None and time.time() >= self.cfg.deadline:
            return True
        if self.max_runs is not None and self.stats.runs >= self.max_runs:
            return True
        if self.cfg.max_failures is not None and len(self.failures) >= self.cfg.max_failures:
            return True
        return self.should_stop()

    async def run(self) -> tuple[Stats, list[dict]]:
        for seed in seeds(self.cfg, self.worker):
            if self._out_of_budget():
                break
            await self._scenario(seed)
            self.stats.scenarios += 1
            if self.progress:
                self.progress(self.stats, len(self.failures))
        return self.stats, self.failures

    async def _scenario(self, seed: int) -> None:
        g = generate(seed, self.cfg.gen)
        try:
            scn = load(g, f"<stress seed {seed}>")
        except ScenarioError as exc:  # a generator bug: say so, go on
            self._error(f"seed {seed}: the generated scenario is invalid: {exc}")
            return
        policy = self._policy(seed)
        seen_here = 0
        for _ in range(self.cfg.runs_per_scenario):
            if self._out_of_budget():
                return
            if not policy.new_execution():
                return
            rec = Recording(policy)
            try:
                r = await run_scenario(scn, RunOptions(bugs=self.cfg.bugs,
                                                       scheduler=SchedulerSpec("random", seed, None, self.cfg.depth,
                                                                               policy=rec)))
            except (RunError, InfraError) as exc:
                self._error(f"seed {seed}: {type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - an internal error is reported, and the campaign goes on
                self._error(f"seed {seed}: internal error: {type(exc).__name__}: {exc}")
                return
            self.stats.runs += 1
            self.stats.points += len(rec.points)
            if isinstance(policy, Pct):
                seen_here = max(seen_here, policy.seen)
            if self.coverage is not None:
                self.stats.coverage_pairs = len(self.coverage.covered)
            if self.progress and self.stats.runs % 10 == 0:
                self.progress(self.stats, len(self.failures))
            if not r.passed:
                self.stats.failing_runs += 1
                await self._failure(g, seed, r, rec.points)
                return  # this scenario's bug is known now: on to the next seed
        if seen_here:
            self.stats.pct_bound = max(seen_here, 1)

    def _error(self, line: str) -> None:
        self.stats.errors += 1
        if len(self.stats.error_lines) < 20:
            self.stats.error_lines.append(line)

    async def _failure(self, g: Generated, seed: int, r: ScenarioResult, points: list[Point]) -> None:
        kind = (failure_kinds(r) or ["?"])[0]
        key = failure_key(r, points)
        if key in self.found_keys or key in self.keys:
            return
        self.found_keys.add(key)
        found_at = time.monotonic() - self.started
        runs_to_find = self.stats.runs
        record: dict[str, Any] = {
            "seed": seed, "worker": self.worker, "shard": list(self.cfg.shard), "found_after_s": round(found_at, 3),
            "runs_to_find": runs_to_find, "policy": self.cfg.policy, "bugs": list(self.cfg.bugs),
            "first_failure": kind, "key_found": list(key[:1]) + [list(key[1])],
            "steps_found": g.step_count(), "actors_found": len(g.actors()),
            "preemptions_found": _count(r.schedule), "violations_found": list(r.violations)[:10],
        }
        t0 = time.monotonic()
        shrunk_g, shrunk_r, runs = (g, r, 0)
        if self.cfg.shrink:
            shrunk_g, shrunk_r, runs = await shrink_scenario(g, r, kind, self.cfg)
        name = failure_name(kind.split()[0] if kind.startswith(("step", "missing")) else kind, seed)
        path = os.path.join(self.cfg.out, name + ".toml")
        scn = load(shrunk_g, path)
        schedule, replay, pre_after, hunt_runs = shrunk_r.schedule, shrunk_r.replay_command, None, 0
        if self.cfg.shrink:
            try:
                h = await hunt(scn, SchedulerSpec("replay", None, shrunk_r.schedule), runs=1,
                               options=RunOptions(bugs=self.cfg.bugs))
            except (RunError, InfraError) as exc:
                self._error(f"seed {seed}: shrinking the schedule failed: {exc}")
            else:
                if not h.passed and h.shrunk is not None:
                    schedule, replay = h.schedule, h.replay_command
                    hunt_runs = h.shrink_runs + 2
        rec = RecordingReplay(schedule)
        try:
            final = await run_scenario(scn, RunOptions(bugs=self.cfg.bugs,
                                                       scheduler=SchedulerSpec("replay", None, schedule,
                                                                               policy=rec)))
        except (RunError, InfraError) as exc:
            self._error(f"seed {seed}: the shrunk failure did not replay: {exc}")
            return
        if final.passed:
            self._error(f"seed {seed}: the shrunk failure ran clean on replay (not deterministic?)")
            return
        pre_after = _count(final.schedule)
        replay = final.replay_command or replay
        fkey = failure_key(final, rec.points)
        self.stats.shrink_runs += runs + hunt_runs + 1
        if fkey in self.keys:
            return
        self.keys.add(fkey)
        self.found_keys.add(fkey)
        without = None
        if self.cfg.bugs:  # is it the switched-on bugs' doing? the same schedule, leniently, on the fixed model
            try:
                clean = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec(
                    "replay", None, schedule, policy=Replay(schedule, strict=False))))
                without = not clean.passed and fkey[0] in failure_kinds(clean)[:1]
            except (RunError, InfraError):
                without = None
        steps = {f"{s.actor}/{s.index}": s.op for s in final.steps}
        record.update({
            "key": {"invariant": fkey[0], "path": list(fkey[1])},
            "fails_without_bugs": without,
            "name": name, "steps_shrunk": shrunk_g.step_count(), "actors_shrunk": len(shrunk_g.actors()),
            "preemptions_scenario_shrunk": _count(shrunk_r.schedule), "preemptions_shrunk": pre_after,
            "shrink_runs": runs + hunt_runs + 1, "shrink_s": round(time.monotonic() - t0, 3),
            "schedule": final.schedule, "replay": replay, "failures": list(final.failures),
            "violations": list(final.violations)[:20], "scenario_toml": to_toml(shrunk_g),
            "trace": chrome_trace(rec.points, steps=steps, violations=list(final.violations),
                                  title=f"{name}: {fkey[0]}"),
            "interleaving": text_interleaving(rec.points, steps=steps, violations=list(final.violations)[:5]),
        })
        self.failures.append(record)
        if self.progress:
            self.progress(self.stats, len(self.failures))


def failure_key(r: ScenarioResult, points: list[Point]) -> tuple[str, tuple[str, ...]]:
    """A failure's identity: its first failure (the invariant, or a scheduler failure) and the
    kernel path of the context that broke it."""
    kind = (failure_kinds(r) or ["?"])[0]
    actor = next((str(v.get("actor") or "") for v in r.violations if v.get("invariant") == kind), "")
    return kind, kernel_path(points, actor) if actor else ()


def _count(schedule: str) -> int:
    return len([p for p in schedule.split(",") if p.strip()])


async def _still_fails(cand: Generated, kind: str, cfg: CampaignConfig, first_seed: int,
                       budget: list[int]) -> ScenarioResult | None:
    """Does ``cand`` still fail with ``kind`` under one of a few random schedules? (None: no, or invalid)"""
    try:
        scn = load(cand, "<shrinking>")
    except ScenarioError:
        return None
    for t in range(cfg.shrink_tries):
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        try:
            r = await run_scenario(scn, RunOptions(bugs=cfg.bugs, scheduler=SchedulerSpec("random", first_seed + t)))
        except (RunError, InfraError):
            return None
        if not r.passed and kind in failure_kinds(r)[:1]:
            return r
    return None


async def shrink_scenario(g: Generated, r: ScenarioResult, kind: str,
                          cfg: CampaignConfig) -> tuple[Generated, ScenarioResult, int]:
    """Delta debugging over ``g``'s steps while some schedule still fails with ``kind``.

    Returns the smallest scenario found, a failing result of it, and the runs it took.
    """
    budget = [cfg.shrink_runs]
    cur, cur_r = g, r

    async def attempt(steps: list[dict]) -> bool:
        nonlocal cur, cur_r
        cand = cur.with_steps(steps)
        got = await _still_fails(cand, kind, cfg, g.seed, budget)
        if got is None:
            return False
        cur, cur_r = cand, got
        return True

    n = 2
    while len(cur.steps) >= 2 and budget[0] > 0:  # ddmin over top-level steps: drop chunks, then finer
        chunk = max(1, len(cur.steps) // n)
        removed = False
        i = len(cur.steps) - chunk
        while i >= 0 and budget[0] > 0:
            steps = cur.steps[:i] + cur.steps[i + chunk:]
            if steps and await attempt(steps):
                removed = True
                i = min(i, len(cur.steps)) - chunk
            else:
                i -= chunk
        if chunk == 1 and not removed:
            break
        if not removed:
            n *= 2
    for i in range(len(cur.steps) - 1, -1, -1):  # single operations of parallel blocks
        if i >= len(cur.steps) or "parallel" not in cur.steps[i]:
            continue
        j = len(cur.steps[i]["parallel"]) - 1
        while j >= 0 and budget[0] > 0 and i < len(cur.steps) and "parallel" in cur.steps[i]:
            subs = cur.steps[i]["parallel"]
            rest = subs[:j] + subs[j + 1:]
            new = {"parallel": rest} if len(rest) > 1 else dict(rest[0])
            await attempt(cur.steps[:i] + [new] + cur.steps[i + 1:])
            j -= 1
    return cur, cur_r, cfg.shrink_runs - budget[0]
