"""The ``mtekvm`` command.

``mtekvm run FILE...`` runs scenarios (docs/scenarios.md) and prints a table per scenario: step,
actor, op, expected, got. Every file is validated before any runs; the valid ones run even when
others are not. ``--json``, ``--junit`` and ``--tap`` give the results in forms other programs
read. ``--seeds N`` with the random or pct scheduler runs each scenario under N seeds and stops at
the first failure, printing its schedule and the command that replays it; ``--scheduler dfs`` runs
every interleaving and ``--scheduler bounded:N`` every one with at most N preemptions, until one
fails or the space is exhausted (``--seeds N``: at most N runs). A failure's schedule is then
shrunk to fewer preemptions (:mod:`mtekvm.hunt`) and its replay printed too. ``mtekvm bugs`` lists
the bug zoo; ``mtekvm --version`` prints the version. ``mtekvm stress`` runs generated concurrency
campaigns and ``mtekvm stress merge`` combines their reports (:mod:`mtekvm.stress.command`).

Every failure is one line on stderr, never a traceback (``MTEKVM_DEBUG=1`` re-raises, for
developers). Exit status, one meaning each (see :mod:`mtekvm.report`):

- 0: every scenario ran and held (its expectations, and exactly its ``expect-violations``);
- 1: a scenario ran and an expectation or an invariant failed;
- 2: bad input or usage: a file that is not a valid scenario, options that do not apply or
  cannot work together, a replayed schedule that does not fit, a report path that cannot be
  written, a secret file that cannot be read;
- 3: the infrastructure failed: a hypervisor or VMM could not be started or reached, was busy,
  or died mid-run (or mtekvm itself failed);
- 130: interrupted (Ctrl-C); the scenarios that finished are summarised and reported.

When several apply, the higher in this order wins: 130, 3, 2, 1.
"""

from __future__ import annotations

import signal
import sys


def _interrupted_while_starting(signum, frame):  # pragma: no cover - timing
    """Ctrl-C while Python is still importing: one line and 130, not an import traceback."""
    sys.stderr.write("mtekvm: interrupted\n")
    sys.stderr.flush()
    import os
    os._exit(130)


def _is_the_command() -> bool:
    """Running as ``mtekvm``, ``python -m mtekvm`` or ``python -m mtekvm.cli`` (not imported by a program)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (__name__ == "__main__" or sys.argv[0].rsplit("/", 1)[-1] == "mtekvm"
            or getattr(spec, "name", None) == "mtekvm.__main__")


if signal.getsignal(signal.SIGINT) is signal.default_int_handler and _is_the_command():
    signal.signal(signal.SIGINT, _interrupted_while_starting)  # main() puts the default back

import argparse  # noqa: E402 - after the start-up SIGINT handler
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import trio  # noqa: E402

from hypervisor.sched import parse_schedule  # noqa: E402
from mtekvm import report  # noqa: E402
from mtekvm.hunt import EXHAUSTIVE, HuntResult, hunt, scheduler_spec  # noqa: E402
from mtekvm.links import HostStartError  # noqa: E402
from mtekvm.report import Problem  # noqa: E402
from mtekvm.runner import (  # noqa: E402
    InfraError,
    RunError,
    RunOptions,
    ScenarioResult,
    VmSetupError,
    classify_error,
    collect_garbage_less_often,
)
from mtekvm.scenario import Scenario, ScenarioError, SchedulerSpec, load_scenario  # noqa: E402
from shared.bugs import BUGS  # noqa: E402
from shared.errno import KernelError  # noqa: E402
from shared.wire import RemoteError  # noqa: E402


def version() -> str:
    """mtekvm's version: the source tree's pyproject.toml when running from one (an editable
    install's metadata keeps the version it was installed with), else the installed metadata."""
    import tomllib
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, "rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "mtekvm" and project.get("version"):
            return str(project["version"])
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        return dist_version("mtekvm")
    except PackageNotFoundError:
        return "unknown"


class UsageError(Exception):
    """Options that do not apply or cannot work together (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2)."""

    def error(self, message: str):
        print(f"mtekvm: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(report.EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtekvm", description="An executable model of arm64 MTE under KVM.")
    p.add_argument("--version", action="version", version=f"mtekvm {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run scenario files",
                       description="Run scenario files. Exit status: 0 all held, 1 an expectation or "
                                   "invariant failed, 2 bad input or usage, 3 the infrastructure failed, "
                                   "130 interrupted.")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--json", metavar="PATH", help="also write the results as JSON (docs/scenarios.md)")
    r.add_argument("--junit", metavar="PATH", help="also write the results as JUnit XML")
    r.add_argument("--tap", action="store_true", help="print TAP version 13 instead of tables")
    r.add_argument("--host", metavar="ADDR", help="use a running hypervisor (unix:PATH or tcp:HOST:PORT)")
    r.add_argument("--secret-file", metavar="F", help="the running hypervisor's secret (with --host)")
    r.add_argument("--listen", choices=("unix", "tcp"), default="unix",
                   help="where the private hypervisors listen: a Unix socket (default), or TCP on 127.0.0.1 with "
                        "a secret (VMMs then migrate over TCP too)")
    r.add_argument("--bug", action="append", default=[], choices=sorted(BUGS), metavar="NAME",
                   help=f"switch on a bug-zoo race ({', '.join(sorted(BUGS))})")
    r.add_argument("--scheduler", type=_scheduler_kind, metavar="KIND",
                   help="override the scenarios' scheduler: free, random, pct, replay, dfs (every "
                        "interleaving) or bounded:N (every interleaving with at most N preemptions)")
    r.add_argument("--seed", type=int, help="seed for --scheduler random or pct")
    r.add_argument("--depth", type=int, help="bug depth for --scheduler pct (default 3)")
    r.add_argument("--seeds", type=int, metavar="N",
                   help="with the random or pct scheduler: try N seeds, stop at the first failure; with "
                        "dfs or bounded:N: at most N runs (default: until every interleaving ran)")
    r.add_argument("--schedule", help="the schedule for --scheduler replay")
    r.add_argument("-v", "--verbose", action="store_true", help="show the model's log messages (one line each)")
    sub.add_parser("bugs", help="list the bug zoo: historical races that --bug switches back on")
    _stress_parser(sub)
    return p


def _stress_parser(sub) -> None:
    """``mtekvm stress`` (generated concurrency campaigns) and ``mtekvm stress merge``."""
    s = sub.add_parser("stress", help="generated concurrency campaigns: scenarios from seeds, under a controlled "
                                      "policy, until a budget runs out",
                       description="Generate scenarios from seeds and run each under a controlled scheduling "
                                   "policy until the budget runs out; every failure is shrunk (scenario, then "
                                   "schedule) and written to --out. Exit status: 0 the budget ran out clean, "
                                   "1 a failure was found, 2 bad usage, 3 the infrastructure failed, "
                                   "130 interrupted. See docs/concurrency.md.")
    s.add_argument("--bug", action="append", default=[], choices=sorted(BUGS), metavar="NAME",
                   help=f"switch on a bug-zoo race (repeatable; {', '.join(sorted(BUGS))})")
    s.add_argument("--budget", default="60s", help="a time (60s, 2m) or a number of runs (5000runs); default 60s")
    s.add_argument("--policy", default="random", help="random (default), pct or coverage")
    s.add_argument("--depth", type=int, help="bug depth for --policy pct (default 3)")
    from mtekvm.stress.gen import FAMILIES

    s.add_argument("--ops", help="op families to draw from, comma-separated (default all; -NAME drops one): "
                                 + ", ".join(FAMILIES))
    s.add_argument("--weights", help="family=N,... relative weights over the defaults (0 drops a family)")
    s.add_argument("--no-hugetlb", action="store_true", help="never back memory with hugetlb")
    s.add_argument("--no-kernel-fixes", action="store_true",
                   help="boot generated hosts without the proposed fix for finding 3 (docs/findings.md), so "
                        "campaigns report that hugetlb behaviour too")
    s.add_argument("--runs-per-scenario", type=int, default=2, metavar="K",
                   help="schedules tried per generated scenario (default 2)")
    s.add_argument("--seed", type=int, default=0, help="the first seed of the seed space (default 0)")
    s.add_argument("--shard", metavar="I/N", help="take the seeds s with s %% N == I (a deterministic slice)")
    s.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (default 1)")
    s.add_argument("--max-failures", type=int, metavar="N", help="stop after N distinct failures")
    s.add_argument("--no-shrink", action="store_true", help="report failures as found (no shrinking)")
    s.add_argument("--out", default=".", metavar="DIR",
                   help="where each failure's scenario, schedule and trace go (default: the current folder)")
    s.add_argument("--json", metavar="PATH", help="write the campaign report as JSON (schema mtekvm-stress/1)")
    s.add_argument("--trace", metavar="FILE", help="write the first failure's execution as Chrome trace JSON")
    s.add_argument("-v", "--verbose", action="store_true", help="show the model's log messages (one line each)")
    ss = s.add_subparsers(dest="stress_cmd", parser_class=_Parser)
    m = ss.add_parser("merge", help="combine stress JSON reports (shards, machines) into one")
    m.add_argument("reports", nargs="+", metavar="REPORT")
    m.add_argument("--json", dest="merge_json", metavar="OUT", help="write the merged report here")


def _scheduler_kind(text: str) -> str:
    """``--scheduler``'s value: a known kind (``bounded:N`` with N >= 0)."""
    if text in ("free", "random", "pct", "replay", "dfs"):
        return text
    if text.startswith("bounded:") and text[len("bounded:"):].isdigit():
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from free, random, pct, replay, dfs, "
                                     f"bounded:N)")


def list_bugs(out=sys.stdout) -> None:
    """The bug zoo as a table: name, where it lives (host mm, KVM, the VMM, tag storage), the fix."""
    places = {2: "host mm", 3: "KVM", 9: "VMM", 11: "tag storage"}
    for b in BUGS.values():
        print(f"{b.name:34} {places.get(b.issue, '?'):11} fixed by {b.fixed_by}", file=out)
        print(f"{'':34} {b.reintroduces}", file=out)


class Progress:
    """Progress of a long hunt on stderr: a live line on a terminal, a line every 10% otherwise."""

    def __init__(self, what: str, total: int | None, out=sys.stderr, unit: str = "seeds"):
        self.what, self.total, self.out, self.unit = what, total, out, unit
        self.live = out.isatty()
        self.started = time.monotonic()
        self._step = max(1, total // 10) if total else 100

    def update(self, done: int) -> None:
        """Report ``done`` of ``total`` runs finished (an open-ended search: a line per 100 off a terminal)."""
        if not self.live and done % self._step and done != self.total:
            return
        rate = done / max(time.monotonic() - self.started, 1e-9)
        of = f"/{self.total}" if self.total else ""
        line = f"{self.what}: {done}{of} {self.unit} clean, {rate:.0f} runs/s"
        print(("\r" + line) if self.live else line, end="" if self.live else "\n", file=self.out, flush=True)

    def close(self) -> None:
        """End the live line."""
        if self.live:
            print(file=self.out)


class _OneLine(logging.Formatter):
    """Log records as one line: an exception is its type and message, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"mtekvm: {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f": {type(exc).__name__}: {exc}"
        return line.replace("\n", " ")


def _setup_logging(verbose: bool) -> None:
    """The in-process model logs through ``mtekvm.*``: silent unless --verbose, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("mtekvm")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.CRITICAL + 1)


def check_options(args) -> None:
    """Refuse options that do not apply to what was asked, before anything runs.

    Raises:
        UsageError: with the one-line reason.
    """
    kind = args.scheduler
    if args.schedule is not None and kind != "replay":
        raise UsageError("--schedule applies only with --scheduler replay")
    if kind == "replay":
        if args.schedule is None:
            raise UsageError("--scheduler replay needs --schedule (the 'schedule:' line of a failed run)")
        try:
            parse_schedule(args.schedule)
        except ValueError as exc:
            raise UsageError(f"--schedule: {exc}") from None
    if args.seed is not None and kind not in ("random", "pct"):
        raise UsageError("--seed applies only with --scheduler random or pct")
    exhaustive = kind is not None and (kind == "dfs" or kind.startswith("bounded:"))
    if args.depth is not None:
        if kind != "pct":
            raise UsageError("--depth applies only with --scheduler pct")
        if not 1 <= args.depth <= 16:
            raise UsageError(f"--depth must be 1..16 (got {args.depth})")
    if args.seeds is not None:
        if args.seeds < 1:
            raise UsageError(f"--seeds must be at least 1 (got {args.seeds})")
        if kind in ("free", "replay"):
            raise UsageError(f"--seeds applies only to the random, pct, dfs and bounded:N schedulers, not {kind}")
    if getattr(args, "listen", "unix") != "unix" and args.host is not None:
        raise UsageError(f"--listen {args.listen} applies to private hypervisors; --host uses a running one")
    if args.secret_file is not None and args.host is None:
        raise UsageError("--secret-file applies only with --host (a private hypervisor makes its own secret)")
    if args.host is not None and (kind in ("random", "pct", "replay") or exhaustive):
        raise UsageError("--host runs the free scheduler only: controlled schedulers need the embedded "
                         "hypervisor (drop --host)")
    for opt, path in (("--json", args.json), ("--junit", args.junit)):
        if path is not None:
            _check_writable(opt, path)


def _check_writable(opt: str, path: str) -> None:
    report.check_writable(opt, path, UsageError)


def _read_secret(path: str) -> str:
    try:
        with open(path) as f:
            secret = f.read().strip()
    except OSError as exc:
        raise UsageError(f"--secret-file {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--secret-file {path}: not a text file") from None
    if not secret:
        raise UsageError(f"--secret-file {path}: is empty")
    return secret


def _spec(args) -> SchedulerSpec | None:
    if not args.scheduler:
        return None
    return scheduler_spec(args.scheduler, seed=args.seed, depth=args.depth if args.depth is not None else 3,
                          schedule=args.schedule)


async def _run_one(scn: Scenario, args, secret) -> ScenarioResult:
    """Run one scenario: once, or as a hunt (N seeds, or dfs / bounded:N) that stops at the first
    failure and shrinks its schedule (:func:`mtekvm.hunt.hunt`)."""
    base = _spec(args) or scn.scheduler
    runs: int | None = 1
    if base.kind in ("random", "pct"):
        runs = args.seeds or 1
    elif base.kind in EXHAUSTIVE:
        runs = args.seeds  # None: until every interleaving ran
    elif args.seeds is not None and args.seeds > 1:
        print(f"mtekvm: {scn.path}: note: --seeds applies to the random, pct, dfs and bounded:N schedulers; "
              f"this scenario's is {base.kind}, so it ran once", file=sys.stderr)
    many = runs is None or runs > 1
    unit = "seeds" if base.kind in ("random", "pct") else "runs"
    progress = Progress(scn.name, runs, unit=unit) if many else None
    opts = RunOptions(host=args.host, secret=secret, bugs=tuple(args.bug), scheduler=base, listen=args.listen)
    try:
        res = await hunt(scn, base, runs=runs, options=opts,
                         progress=(lambda done, r: progress.update(done) if r.passed else None) if progress else None)
    finally:
        if progress:
            progress.close()
    if many:
        print(f"{scn.name}: {_hunt_line(res, base.kind, runs)}", file=sys.stderr)
    if not res.passed and res.shrunk is not None and res.schedule != res.found_schedule:
        found, shrunk = res.preemptions
        print(f"{scn.name}: shrunk the schedule from {found} to {shrunk} preemptions "
              f"({res.shrink_runs} runs); replay: {res.replay_command}", file=sys.stderr)
    assert res.result is not None
    return res.result


def _hunt_line(res: HuntResult, kind: str, runs: int | None) -> str:
    """How a hunt ended, for stderr."""
    if kind in ("random", "pct"):
        if res.passed:
            return f"no failure in {runs} seeds"
        first = res.first
        assert first is not None
        return f"failure at seed {first.seed} ({first.execution} of {runs} seeds run)"
    space = "every interleaving" if kind == "dfs" else f"every interleaving with at most {res.policy[8:-1]} preemptions"
    if res.passed:
        return (f"no failure in {res.runs} runs ({space})" if res.exhausted else
                f"no failure in {res.runs} runs (the budget; {space} would take more)")
    first = res.first
    assert first is not None
    return f"failure at run {first.execution} of {res.policy}"


def _is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_interrupt(e) for e in exc.exceptions)
    return False


def _problem(scn: Scenario, exc: BaseException) -> Problem:
    """The one-line account of a scenario that did not run to a result."""
    exc = classify_error(exc)
    if isinstance(exc, (InfraError, HostStartError)):
        return Problem(scn.path, "infrastructure", f"{scn.path}: {exc}", scn.name)
    if isinstance(exc, VmSetupError):  # the scenario ran and failed at its set-up: exit 1
        return Problem(scn.path, "setup-failed", f"{scn.path}: {exc}", scn.name)
    if isinstance(exc, (RunError, ValueError)):
        return Problem(scn.path, "invalid", f"{scn.path}: {exc}", scn.name)
    if isinstance(exc, (RemoteError, KernelError)):
        return Problem(scn.path, "invalid", f"{scn.path}: the host refused set-up: {exc}", scn.name)
    return Problem(scn.path, "infrastructure",
                   f"{scn.path}: internal error: {type(exc).__name__}: {exc} (MTEKVM_DEBUG=1 shows where)",
                   scn.name)


class _Out:
    """Where results go: tables (default) or TAP on stdout; problems on stderr."""

    def __init__(self, tap: bool, total: int):
        self.tap, self.n = tap, 0
        if tap:
            print("TAP version 13")
            print(f"1..{total}", flush=True)

    def result(self, r: ScenarioResult) -> None:
        self.n += 1
        lines = report.tap_lines(self.n, r) if self.tap else [""] + report.result_lines(r)
        print("\n".join(lines), flush=True)

    def problem(self, p: Problem) -> None:
        print(f"mtekvm: {p.message}", file=sys.stderr, flush=True)
        if self.tap and p.kind != "interrupted":
            self.n += 1
            print("\n".join(report.tap_lines(self.n, problem=p)), flush=True)

    def summary(self, line: str, interrupted: bool) -> None:
        if self.tap:
            if interrupted:
                print("Bail out! interrupted")
            print(f"# {line}", flush=True)
        else:
            print(f"\n{line}", flush=True)


def run_command(args, argv: list[str]) -> int:
    """``mtekvm run``: validate options and every file, run the valid ones, report, return the status."""
    started = time.monotonic()
    check_options(args)
    secret = _read_secret(args.secret_file) if args.secret_file else None
    out = _Out(args.tap, len(args.files))
    results: list[ScenarioResult] = []
    problems: list[Problem] = []
    scenarios: list[Scenario] = []
    for path in args.files:
        try:
            scenarios.append(load_scenario(path))
        except ScenarioError as exc:
            problems.append(Problem(path, "invalid", str(exc)))
            out.problem(problems[-1])
    try:
        for scn in scenarios:
            try:
                results.append(trio.run(_run_one, scn, args, secret))
            except BaseException as exc:  # noqa: BLE001 - every failure becomes one line
                if _is_interrupt(exc):
                    problems.append(Problem(scn.path, "interrupted", f"{scn.path}: interrupted", scn.name))
                    out.problem(problems[-1])
                    break
                if os.environ.get("MTEKVM_DEBUG") or isinstance(exc, SystemExit):
                    raise
                problems.append(_problem(scn, exc))
                out.problem(problems[-1])
                continue
            out.result(results[-1])
    except KeyboardInterrupt:  # between scenarios, or while printing
        problems.append(Problem("", "interrupted", "interrupted"))
        out.problem(problems[-1])
    duration = time.monotonic() - started
    status = report.exit_status(results, problems)
    out.summary(report.summary_line(results, problems, duration), status == report.EXIT_INTERRUPTED)
    status = _write_reports(args, argv, results, problems, status, duration)
    return status


def _write_reports(args, argv, results, problems, status, duration) -> int:
    try:
        if args.json:
            doc = report.json_report(results, problems, version=version(), argv=argv, status=status,
                                     duration=duration)
            with open(args.json, "w") as f:
                report.dump_json(doc, f)
        if args.junit:
            report.junit_xml(results, problems, duration).write(args.junit, encoding="utf-8",
                                                                 xml_declaration=True)
    except OSError as exc:
        print(f"mtekvm: cannot write the report: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return max(status, report.EXIT_USAGE) if status != report.EXIT_INTERRUPTED else status
    return status


def _stress(args, argv: list[str]) -> int:
    """``mtekvm stress`` / ``mtekvm stress merge`` (:mod:`mtekvm.stress.command`)."""
    from mtekvm.stress import command
    try:
        if args.stress_cmd == "merge":
            args.json = args.merge_json
            return command.merge_command(args)
        _setup_logging(args.verbose)
        return command.stress_command(args, argv, version())
    except command.StressUsage as exc:
        raise UsageError(str(exc)) from None


def main(argv=None) -> int:
    """Entry point of the ``mtekvm`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = _parser().parse_args(argv)
        if args.cmd == "bugs":
            list_bugs()
            return report.EXIT_OK
        collect_garbage_less_often()
        if args.cmd == "stress":
            return _stress(args, argv)
        _setup_logging(args.verbose)
        return run_command(args, argv)
    except UsageError as exc:
        print(f"mtekvm: {exc}", file=sys.stderr)
        return report.EXIT_USAGE
    except KeyboardInterrupt:
        print("mtekvm: interrupted", file=sys.stderr)
        return report.EXIT_INTERRUPTED
    except BrokenPipeError:  # `mtekvm run ... | head`: the reader left
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return report.EXIT_INFRA


if __name__ == "__main__":
    sys.exit(main())
