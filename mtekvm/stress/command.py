"""``mtekvm stress`` and ``mtekvm stress merge``: options to a campaign, workers, files, reports.

:func:`stress_command` checks the options (exit 2 before anything runs), runs
the campaign in this process (``--jobs 1``) or in worker processes, shows a
live progress line on a terminal, writes each distinct failure to the output
folder (``NAME.toml`` the shrunk scenario, ``NAME.schedule`` its schedule and
the replay command, ``NAME.trace.json`` the Chrome trace), prints the
interleaving of each, and writes the JSON report (schema ``mtekvm-stress/1``).
:func:`merge_command` combines reports of shards or machines.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys
import time
from typing import Any

import attrs
import trio

from mtekvm import report
from mtekvm.stress.campaign import (
    POLICIES,
    CampaignConfig,
    Stats,
    Worker,
    parse_budget,
    parse_shard,
)
from mtekvm.stress.gen import GenConfig, parse_ops, parse_weights
from mtekvm.stress.trace import write_trace

SCHEMA = "mtekvm-stress/1"
EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INFRA, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class StressUsage(Exception):
    """Options that do not apply or cannot work together (exit 2)."""


def config_from_args(args) -> CampaignConfig:
    """The campaign the options ask for.

    Raises:
        StressUsage: with the one-line reason.
    """
    try:
        budget = parse_budget(args.budget)
        shard = parse_shard(args.shard) if args.shard else (0, 1)
        ops = parse_ops(args.ops)
        weights = parse_weights(args.weights)
    except ValueError as exc:
        raise StressUsage(str(exc)) from None
    if args.policy not in POLICIES:
        raise StressUsage(f"--policy {args.policy!r}: choose from {', '.join(POLICIES)}")
    if args.depth is not None and args.policy != "pct":
        raise StressUsage("--depth applies only with --policy pct")
    depth = args.depth if args.depth is not None else 3
    if not 1 <= depth <= 16:
        raise StressUsage(f"--depth must be 1..16 (got {depth})")
    if args.jobs < 1:
        raise StressUsage(f"--jobs must be at least 1 (got {args.jobs})")
    if args.runs_per_scenario < 1:
        raise StressUsage(f"--runs-per-scenario must be at least 1 (got {args.runs_per_scenario})")
    if args.max_failures is not None and args.max_failures < 1:
        raise StressUsage(f"--max-failures must be at least 1 (got {args.max_failures})")
    if args.seed < 0:
        raise StressUsage(f"--seed must be at least 0 (got {args.seed})")
    if all(weights.get(f, 0) == 0 for f in ops):
        raise StressUsage("--weights gives every chosen op family weight 0")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise StressUsage(f"--out {out}: not a folder")
    try:  # made up front, so that an unusable folder is found before a long campaign
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise StressUsage(f"--out {out}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise StressUsage(f"--out {out}: cannot write there")
    for opt, path in (("--json", args.json), ("--trace", args.trace)):
        if path is not None:
            _check_writable(opt, path)
    gen = GenConfig(ops=ops, weights=weights, hugetlb=not args.no_hugetlb)
    if args.no_kernel_fixes:
        gen = attrs.evolve(gen, kernel_fixes=())
    return CampaignConfig(gen=gen, bugs=tuple(args.bug),
                          policy=args.policy, depth=depth, budget=budget, runs_per_scenario=args.runs_per_scenario,
                          first_seed=args.seed, shard=shard, jobs=args.jobs, shrink=not args.no_shrink,
                          max_failures=args.max_failures, out=out)


def _check_writable(opt: str, path: str) -> None:
    report.check_writable(opt, path, StressUsage)


class _Live:
    """The progress line on stderr (a terminal only): runs/s, seeds done, failures, time left."""

    def __init__(self, cfg: CampaignConfig, out=None):
        self.cfg, self.out = cfg, out if out is not None else sys.stderr
        self.live = self.out.isatty()
        self.started = time.monotonic()
        self._last = 0.0
        self.shown = False

    def update(self, runs: int, scenarios: int, failures: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.live or (not force and now - self._last < 0.5):
            return
        self._last = now
        el = now - self.started
        b = self.cfg.budget
        left = (f"{max(0.0, b.seconds - el):.0f}s left" if b.seconds is not None
                else f"{max(0, (b.runs or 0) - runs)} runs left")
        line = (f"stress: {runs} runs ({runs / max(el, 1e-9):.1f} runs/s), {scenarios} seeds, "
                f"{failures} failure{'s' * (failures != 1)}, {left}")
        print("\r" + line + "\x1b[K", end="", file=self.out, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.shown:
            print(file=self.out, flush=True)


def _worker_main(cfg: CampaignConfig, worker: int, q, stop) -> None:  # pragma: no cover - in a child process
    """A worker process: its campaign, progress and result through ``q``."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through ``stop``
    w = Worker(cfg, worker, progress=lambda st, nf: q.put(("progress", worker, st.runs, st.scenarios, nf)),
               should_stop=stop.is_set)
    try:
        stats, failures = trio.run(w.run)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        q.put(("error", worker, f"worker {worker}: {type(exc).__name__}: {exc}", attrs.asdict(w.stats), w.failures))
        return
    q.put(("done", worker, attrs.asdict(stats), failures))


def run_campaign(cfg: CampaignConfig, live: _Live | None = None) -> tuple[dict, list[dict], bool]:
    """Run the campaign (``cfg.jobs`` workers); returns summed stats, the distinct failures and
    whether it was interrupted."""
    if cfg.jobs == 1:
        w = Worker(cfg, 0, progress=(lambda st, nf: live.update(st.runs, st.scenarios, nf)) if live else None)
        interrupted = False
        try:
            trio.run(w.run)
        except KeyboardInterrupt:
            interrupted = True
        return attrs.asdict(w.stats), dedupe(w.failures), interrupted
    if cfg.budget.seconds is not None:  # the budget counts from now, not from each worker's start
        cfg = attrs.evolve(cfg, deadline=time.time() + cfg.budget.seconds)
    # fork where there is one: the workers start with mtekvm imported (the parent runs no trio loop and no
    # threads before this); spawn elsewhere
    methods = multiprocessing.get_all_start_methods()
    ctx: Any = multiprocessing.get_context(next(m for m in ("fork", "spawn") if m in methods))
    q = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=_worker_main, args=(cfg, i, q, stop), daemon=True) for i in range(cfg.jobs)]
    for p in procs:
        p.start()
    progress: dict[int, tuple[int, int, int]] = {}
    results: dict[int, tuple[dict, list[dict]]] = {}
    errors: list[str] = []
    interrupted = False
    while len(results) < len(procs):
        try:
            msg = q.get(timeout=0.5)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                try:
                    msg = q.get(timeout=2)
                except queue.Empty:
                    errors.append("a worker process died without a result")
                    break
            else:
                continue
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            continue
        if msg[0] == "progress":
            progress[msg[1]] = msg[2:]
            if live:
                runs, scenarios, found = (sum(v[i] for v in progress.values()) for i in range(3))
                live.update(runs, scenarios, found)
        elif msg[0] == "done":
            results[msg[1]] = (msg[2], msg[3])
        else:
            errors.append(msg[2])
            results[msg[1]] = (msg[3], msg[4])
    for p in procs:
        p.join(timeout=5)
    stats = sum_stats([r[0] for r in results.values()])
    stats["error_lines"] = stats.get("error_lines", []) + errors
    stats["errors"] = stats.get("errors", 0) + len(errors)
    return stats, dedupe([f for r in results.values() for f in r[1]]), interrupted


def sum_stats(parts: list[dict]) -> dict:
    """Workers' (or reports') counters added up."""
    out: dict[str, Any] = attrs.asdict(Stats())
    out["error_lines"] = []
    for p in parts:
        for k, v in p.items():
            if k == "error_lines":
                out[k] = (out[k] + list(v))[:50]
            elif k in ("pct_bound", "coverage_pairs"):
                out[k] = max(out.get(k, 0), v)
            elif isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def dedupe(failures: list[dict]) -> list[dict]:
    """One failure per (invariant, kernel path), the earliest found."""
    best: dict[tuple, dict] = {}
    for f in failures:
        k = (f["key"]["invariant"], tuple(f["key"]["path"]))
        if k not in best or f["found_after_s"] < best[k]["found_after_s"]:
            best[k] = f
    return sorted(best.values(), key=lambda f: f["found_after_s"])


def write_failure(cfg: CampaignConfig, f: dict) -> dict:
    """Write one failure's files into the output folder; returns their paths."""
    os.makedirs(cfg.out, exist_ok=True)
    base = os.path.join(cfg.out, f["name"])
    files = {"scenario": base + ".toml", "schedule": base + ".schedule", "trace": base + ".trace.json"}
    with open(files["scenario"], "w") as fh:
        fh.write(f["scenario_toml"])
    with open(files["schedule"], "w") as fh:
        fh.write(f"# {f['key']['invariant']} at {' / '.join(f['key']['path'])}\n")
        fh.write(f"schedule: {f['schedule']}\nreplay:   {f['replay']}\n\n")
        fh.write("\n".join(f["interleaving"]) + "\n")
    write_trace(files["trace"], f["trace"])
    return files


def failure_lines(f: dict) -> list[str]:
    """A failure as the terminal shows it."""
    return [
        f"FAILURE {f['key']['invariant']} (kernel path: {', '.join(f['key']['path']) or '?'})",
        f"  seed {f['seed']}, found after {f['found_after_s']:.1f}s and {f['runs_to_find']} runs "
        f"(worker {f['worker']}); steps {f['steps_found']} -> {f['steps_shrunk']}, actors {f['actors_found']} -> "
        f"{f['actors_shrunk']}, preemptions {f['preemptions_found']} -> {f['preemptions_shrunk']}",
        f"  replay: {f['replay']}",
        *([f"  also fails without {', '.join(f['bugs'])} (the same schedule on the fixed model)"]
          if f.get("fails_without_bugs") else []),
        "  interleaving:",
        *f["interleaving"][-40:],
    ]


def report_doc(cfg: CampaignConfig, stats: dict, failures: list[dict], *, argv: list[str], status: int,
               duration: float, interrupted: bool, version: str) -> dict:
    """The ``--json`` document (schema ``mtekvm-stress/1``, docs/concurrency.md)."""
    g = cfg.gen
    return {
        "schema": SCHEMA, "mtekvm": version, "argv": argv, "exit_status": status,
        "config": {"bugs": list(cfg.bugs), "policy": cfg.policy, "depth": cfg.depth,
                   "budget": cfg.budget.describe(), "ops": list(g.ops),
                   "weights": {k: g.weights.get(k, 0) for k in g.ops}, "hugetlb": g.hugetlb,
                   "runs_per_scenario": cfg.runs_per_scenario, "first_seed": cfg.first_seed,
                   "shards": [f"{cfg.shard[0]}/{cfg.shard[1]}"], "jobs": cfg.jobs},
        "summary": {"runs": stats.get("runs", 0), "scenarios": stats.get("scenarios", 0),
                    "failing_runs": stats.get("failing_runs", 0), "failures": len(failures),
                    "errors": stats.get("errors", 0), "shrink_runs": stats.get("shrink_runs", 0),
                    "points": stats.get("points", 0), "duration": round(duration, 3),
                    "runs_per_s": round(stats.get("runs", 0) / max(duration, 1e-9), 2),
                    "pct_bound": stats.get("pct_bound"), "coverage_pairs": stats.get("coverage_pairs"),
                    "interrupted": interrupted, "reports": 1},
        "failures": [{k: v for k, v in f.items() if k not in ("trace",)} for f in failures],
        "errors": stats.get("error_lines", []),
    }


def stress_command(args, argv: list[str], version: str) -> int:
    """``mtekvm stress``: the campaign; exit 1 if it found a failure, 0 when the budget ran out clean."""
    cfg = config_from_args(args)
    live = _Live(cfg)
    started = time.monotonic()
    try:
        stats, failures, interrupted = run_campaign(cfg, live)
    finally:
        live.close()
    duration = time.monotonic() - started
    for f in failures:
        try:
            f["files"] = write_failure(cfg, f)
        except OSError as exc:
            print(f"mtekvm: stress: cannot write {f['name']}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        print("\n".join(failure_lines(f)))
        print(f"  files: {f['files']['scenario']}, {f['files']['schedule']}, {f['files']['trace']}")
    if args.trace and failures:
        write_trace(args.trace, failures[0]["trace"])
    for line in stats.get("error_lines", [])[:5]:
        print(f"mtekvm: stress: {line}", file=sys.stderr)
    status = EXIT_INTERRUPTED if interrupted else EXIT_FOUND if failures else EXIT_OK
    if not failures and stats.get("runs", 0) == 0 and stats.get("errors", 0):
        status = EXIT_INFRA
    runs = stats.get("runs", 0)
    print(f"\nstress: {runs} runs, {stats.get('scenarios', 0)} seeds, {len(failures)} distinct "
          f"failure{'s' * (len(failures) != 1)} ({stats.get('failing_runs', 0)} failing runs), "
          f"{stats.get('errors', 0)} errors, {duration:.1f}s ({runs / max(duration, 1e-9):.1f} runs/s)"
          f"{', interrupted' if interrupted else ''}", flush=True)
    if args.json:
        doc = report_doc(cfg, stats, failures, argv=argv, status=status, duration=duration,
                         interrupted=interrupted, version=version)
        try:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)
        except OSError as exc:
            print(f"mtekvm: stress: cannot write the report: {exc.strerror or exc}", file=sys.stderr)
            return max(status, EXIT_USAGE) if status != EXIT_INTERRUPTED else status
    return status


def merge_reports(docs: list[dict]) -> dict:
    """Several ``mtekvm-stress/1`` reports (shards, machines) as one: counters added, duration the
    longest (they ran side by side), failures deduplicated by invariant and kernel path."""
    if not docs:
        raise ValueError("nothing to merge")
    first = docs[0]
    summary = sum_stats([{k: v for k, v in d["summary"].items() if k not in ("duration", "runs_per_s", "interrupted",
                                                                          "reports", "failures")} for d in docs])
    summary.pop("error_lines", None)
    duration = max(d["summary"].get("duration", 0) for d in docs)
    failures = dedupe([f for d in docs for f in d.get("failures", [])])
    summary.update(failures=len(failures), duration=duration,
                   runs_per_s=round(summary.get("runs", 0) / max(duration, 1e-9), 2),
                   interrupted=any(d["summary"].get("interrupted") for d in docs),
                   reports=sum(d["summary"].get("reports", 1) for d in docs))
    config = dict(first["config"])
    config["shards"] = sorted({s for d in docs for s in d["config"].get("shards", [])})
    return {"schema": SCHEMA, "mtekvm": first.get("mtekvm"), "argv": first.get("argv"),
            "exit_status": EXIT_FOUND if failures else EXIT_OK, "config": config, "summary": summary,
            "failures": failures, "errors": [e for d in docs for e in d.get("errors", [])][:50]}


def merge_command(args) -> int:
    """``mtekvm stress merge A.json B.json ... --json OUT``: exit 1 if the merged reports hold a failure."""
    if args.json:
        _check_writable("--json", args.json)
    docs = []
    for path in args.reports:
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except OSError as exc:
            raise StressUsage(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StressUsage(f"{path}: not a JSON report") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise StressUsage(f"{path}: not a {SCHEMA} report")
        docs.append(doc)
    merged = merge_reports(docs)
    s = merged["summary"]
    print(f"merged {len(docs)} reports: {s['runs']} runs, {s['scenarios']} seeds, {s['failures']} distinct failures")
    for f in merged["failures"]:
        print(f"  {f['key']['invariant']} (kernel path: {', '.join(f['key']['path'])}): {f['replay']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(merged, fh, indent=1)
    return merged["exit_status"]
