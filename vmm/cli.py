"""The ``mtekvm`` command.

``mtekvm run FILE...`` runs scenarios (see shared/SCENARIOS.md) and prints a
table per scenario: step, actor, op, expected, got. Exit status: 0 when every
expectation held and no invariant broke, 1 otherwise, 2 for a file that is not
a valid scenario or options that cannot work together.

``--seeds N`` with ``--scheduler random`` (or ``pct``) runs each scenario under
N seeds (from ``--seed``) and stops at the first failure, printing its
schedule and the command that replays it.

``mtekvm bugs`` lists the bug zoo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

from hypervisor.errors import KernelError
from shared.bugs import BUGS
from shared.wire import RemoteError
from vmm.hostlink import HostStartError
from vmm.runner import RunError, RunOptions, ScenarioResult, run_scenario
from vmm.scenario import ScenarioError, SchedulerSpec, load_scenario


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, int) and not isinstance(v, bool) and v > 0xFFFF:
        return hex(v)
    if isinstance(v, list) and len(v) > 8:
        return "[" + ", ".join(map(str, v[:8])) + f", ... ({len(v)})]"
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


#: Violations printed per invariant in the table (the JSON has all of them).
VIOLATIONS_SHOWN = 5


def print_result(r: ScenarioResult, out=sys.stdout) -> None:
    """The human table for one scenario."""
    print(f"\n== {r.name}  ({r.path}, scheduler {r.scheduler})", file=out)
    rows = [("step", "actor", "op", "expected", "got", "")]
    for s in r.steps:
        got = s.outcome if s.value is None else f"{s.outcome} {_fmt(s.value)}"
        rows.append((s.index, s.actor, s.op, _fmt(s.expect) if s.expect is not None else "-", got,
                     "ok" if s.passed else "FAIL"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    for row in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    for s in r.steps:
        if not s.passed and s.message:
            print(f"  step {s.index}: {s.message}", file=out)
    shown: dict[str, int] = {}
    for v in r.violations:
        n = shown[v["invariant"]] = shown.get(v["invariant"], 0) + 1
        if n <= VIOLATIONS_SHOWN:
            print(f"  VIOLATION {v['invariant']}: {v['message']}" + (f" [{v['actor']}]" if v.get("actor") else ""),
                  file=out)
    for inv, n in shown.items():
        if n > VIOLATIONS_SHOWN:
            print(f"  ... and {n - VIOLATIONS_SHOWN} more {inv} (all of them in --json)", file=out)
    if r.replay_command:
        print(f"  schedule: {r.schedule or '(default order)'}", file=out)
        print(f"  replay:   {r.replay_command}", file=out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtekvm", description="An executable model of arm64 MTE under KVM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run scenario files")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--json", metavar="PATH", help="also write results as JSON")
    r.add_argument("--host", metavar="ADDR", help="use a running hypervisor (unix:PATH or tcp:HOST:PORT)")
    r.add_argument("--secret-file", metavar="F", help="the running hypervisor's secret")
    r.add_argument("--bug", action="append", default=[], choices=sorted(BUGS), metavar="NAME",
                   help=f"switch on a bug-zoo race ({', '.join(sorted(BUGS))})")
    r.add_argument("--scheduler", choices=("free", "random", "pct", "replay"),
                   help="override the scenario's scheduler")
    r.add_argument("--seed", type=int, help="seed for --scheduler random or pct")
    r.add_argument("--depth", type=int, default=3, help="bug depth for --scheduler pct (default 3)")
    r.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="with random or pct: try N seeds, stop at the first failure")
    r.add_argument("--schedule", help="schedule for --scheduler replay")
    sub.add_parser("bugs", help="list the bug zoo: historical races that --bug switches back on")
    return p


def list_bugs(out=sys.stdout) -> None:
    """The bug zoo as a table: name, where it lives (host kernel or KVM), the fix, what it reintroduces."""
    for b in BUGS.values():
        where = "host mm" if b.issue <= 2 else "KVM"
        print(f"{b.name:28} {where:8} fixed by {b.fixed_by}", file=out)
        print(f"{'':28} {b.reintroduces}", file=out)


class Progress:
    """Progress of a long hunt on stderr: a live line on a terminal, a line every 10% otherwise."""

    def __init__(self, what: str, total: int, out=sys.stderr):
        self.what, self.total, self.out = what, total, out
        self.live = out.isatty()
        self.started = time.monotonic()
        self._step = max(1, total // 10)

    def update(self, done: int) -> None:
        """Report ``done`` of ``total`` runs finished."""
        if not self.live and done % self._step and done != self.total:
            return
        rate = done / max(time.monotonic() - self.started, 1e-9)
        line = f"{self.what}: {done}/{self.total} seeds clean, {rate:.0f} runs/s"
        print(("\r" + line) if self.live else line, end="" if self.live else "\n", file=self.out, flush=True)

    def close(self) -> None:
        """End the live line."""
        if self.live:
            print(file=self.out)


async def _run_file(path, args, secret) -> list[ScenarioResult]:
    scn = load_scenario(path)
    spec = None
    if args.scheduler:
        spec = SchedulerSpec(args.scheduler, args.seed if args.scheduler in ("random", "pct") else None,
                             args.schedule if args.scheduler == "replay" else None, args.depth)
        if args.scheduler == "replay" and args.schedule is None:
            raise RunError("--scheduler replay needs --schedule")
    base = spec or scn.scheduler
    results = []
    seeds = [None]
    if base.kind in ("random", "pct") and args.seeds > 1:
        first = base.seed or 0
        seeds = list(range(first, first + args.seeds))
    progress = Progress(scn.name, len(seeds)) if len(seeds) > 1 else None
    try:
        for done, seed in enumerate(seeds, 1):
            s = base if seed is None else SchedulerSpec(base.kind, seed, None, base.depth)
            opts = RunOptions(host=args.host, secret=secret, bugs=tuple(args.bug), scheduler=s)
            res = await run_scenario(scn, opts)
            if progress and res.passed:
                progress.update(done)
            if len(seeds) > 1 and res.passed and seed != seeds[-1]:
                continue
            results.append(res)
            break
    finally:
        if progress:
            progress.close()
    if progress:
        r = results[0]
        print(f"{scn.name}: " + (f"no failure in {len(seeds)} seeds" if r.passed else
                                 f"failure at seed {seed} ({done} of {len(seeds)} seeds run)"),
              file=sys.stderr)
    return results


def main(argv=None) -> int:
    """Entry point of the ``mtekvm`` console command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cmd == "bugs":
        list_bugs()
        return 0
    secret = None
    if args.secret_file:
        with open(args.secret_file) as f:
            secret = f.read().strip()
    all_results: list[ScenarioResult] = []
    status = 0
    for path in args.files:
        try:
            res = trio.run(_run_file, path, args, secret)
        except ScenarioError as exc:
            print(f"mtekvm: {exc}", file=sys.stderr)
            return 2
        except (RunError, HostStartError, ValueError) as exc:
            print(f"mtekvm: {path}: {exc}", file=sys.stderr)
            return 2
        except (RemoteError, KernelError) as exc:
            print(f"mtekvm: {path}: the host refused set-up: {exc}", file=sys.stderr)
            return 2
        for r in res:
            print_result(r)
            all_results.append(r)
            if not r.passed:
                status = 1
    passed = sum(r.passed for r in all_results)
    steps = sum(len(r.steps) for r in all_results)
    print(f"\n{passed} passed, {len(all_results) - passed} failed ({len(all_results)} scenarios, {steps} steps)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenarios": [r.to_json() for r in all_results]}, f, indent=2, default=_json_default)
    return status


def _json_default(o):
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    sys.exit(main())
