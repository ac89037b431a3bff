"""Run scenarios: the orchestration a management layer does above a VMM.

:func:`run_scenario` sets up the scenario's hosts (a private hypervisor
process each, a running one with ``--host``, or an in-process one for the
controlled schedulers), connects one client per host process, runs the steps
in order (``parallel`` sub-steps concurrently, each as its own kernel context
named ``ACTOR/STEP[.SUB]``), compares each outcome with its expectation, and
runs the oracles (after every step of a controlled run, and at the end of
every run). A failing controlled run carries its schedule and the command
that replays it.

A scenario passes when every step's expectation held, every invariant its
``expect-violations`` lists broke at least once and no other invariant broke.
An ``expect`` table is compared on the keys it lists (nested tables the same
way); an integer where a tag list is returned means that tag for every granule.

Errors are of three kinds, which the CLI maps to exit statuses: a scenario
that ran and failed is a :class:`ScenarioResult` with ``passed = False`` (1);
:class:`RunError` means the run cannot be done as asked (2), including a
replayed schedule that does not fit the run (:class:`ReplayError`);
:class:`InfraError` means the machinery under the scenario failed: a host or
VMM that cannot be started or reached, is busy, or died mid-run (3).

This is the Python API the CLI uses; tests and users can call it directly::

    scenario = load_scenario("scenarios/x.toml")
    result = await run_scenario(scenario, RunOptions())
"""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import tempfile
import time
from typing import Any

import attrs
import trio

from hypervisor.sched import ControlledScheduler, make_scheduler
from mtekvm.links import (
    HostLink,
    HostStartError,
    InProcessHost,
    ProcessHost,
    VmmLink,
    _close_quietly,
    in_process_migration,
)
from mtekvm.scenario import FAULT_REPLAY_LIMIT, Expect, Parallel, Scenario, SchedulerSpec, Step
from shared.control import ACTOR_CHANNEL, ACTOR_OPS
from shared.errno import ScheduleDivergence
from shared.invariants import canonical
from shared.rpc import DirectChannel
from shared.wire import Client, RemoteError, Reply, WireError


def collect_garbage_less_often() -> None:
    """Tune the cyclic garbage collector for many runs in one process (``mtekvm`` commands, benchmarks).

    What exists now (modules, the parsed scenario) is moved out of the collector's sight
    (:func:`gc.freeze`), and the youngest generation is collected every 10,000 allocations,
    not 700: a controlled run allocates thousands of short-lived objects (envelopes, contexts,
    events), and with the defaults the collector took 6-9% of a run's time; so, about 3%.
    Little of a run's garbage is cyclic, so memory does not grow for it.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class RunError(Exception):
    """The scenario cannot be run as asked (unsupported feature or option clash)."""


class VmSetupError(RunError):
    """A ``[vms]`` VM whose setup failed (a refused capability, a mapping or memslot error): the
    run fails before its first step, naming the VM and the errno (exit 1, not a usage error)."""


class ReplayError(RunError):
    """A replayed schedule does not fit this run: an entry's target was not runnable, or an entry
    was never reached (replay is strict). Usually the schedule was recorded with other bugs."""


class InfraError(Exception):
    """The machinery under a scenario failed: a hypervisor or VMM could not be started or
    reached, was busy, or died mid-run. The message is one line."""


#: A step follows its VM through at most this many VMMs (ESTALE from one that migrated it away).
MAX_FOLLOW = 16
#: Pids of the i-th in-process host of a run start at 100 + i * PID_RANGE (distinct contexts across hosts).
PID_RANGE = 100_000

#: Exceptions that mean a host or VMM connection broke (wire.ConnectionClosed is a WireError).
_INFRA = (HostStartError, WireError, trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (trio nurseries wrap them in groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def classify_error(exc: BaseException) -> BaseException:
    """The one exception that explains a failed run: the first RunError or InfraError inside
    ``exc``, a connection failure turned into :class:`InfraError`, else the first leaf."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, (RunError, InfraError, KeyboardInterrupt)):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, _INFRA):
            what = str(leaf) or type(leaf).__name__
            return InfraError(what if isinstance(leaf, HostStartError)
                              else f"lost the connection to a host or VMM ({what})")
    return leaves[0]


@attrs.frozen
class RunOptions:
    """How to run: where the host is, extra bugs, a scheduler that overrides the file's."""

    host: str | None = None
    secret: str | None = None
    bugs: tuple[str, ...] = ()
    scheduler: SchedulerSpec | None = None
    listen: str = "unix"  # private hypervisors: on a Unix socket, or "tcp" (127.0.0.1, a free port, a secret)
    #: controlled runs reach their in-process hosts by direct calls (the server's dispatch in the caller's
    #: task, no stream and no task per request); False: msgpack over in-memory streams (the old path,
    #: kept as the benchmark's baseline; the same schedules, outcomes and violations)
    direct: bool = True
    #: a controlled scheduler's parking context takes the decision itself when no other task can run
    #: (ControlledScheduler.inline_decisions; the same decisions); False: its driver task takes every one
    inline_decisions: bool = True


@attrs.frozen
class StepResult:
    """What one step did against what was expected."""

    index: str
    actor: str
    op: str
    expect: Any
    outcome: str
    value: Any
    passed: bool
    message: str = ""  # why it failed (a readable diff for long lists), or the fault's details
    note: str = ""  # what the hardware did that the outcome does not show (e.g. a tag store ignored)
    duration: float = 0.0  # seconds

    def to_json(self) -> dict:
        """The ``--json`` form of a step (docs/scenarios.md, "JSON report")."""
        return {"index": self.index, "actor": self.actor, "op": self.op, "expect": self.expect,
                "outcome": self.outcome, "value": self.value, "passed": self.passed,
                "message": self.message, "note": self.note, "duration": round(self.duration, 6)}


@attrs.frozen
class ScenarioResult:
    """The outcome of one scenario run."""

    name: str
    path: str
    passed: bool
    steps: tuple[StepResult, ...]
    violations: tuple[dict, ...]
    scheduler: str
    schedule: str = ""
    replay_command: str | None = None
    expect_violations: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()  # one line per reason the scenario failed
    duration: float = 0.0  # seconds, set-up and teardown included

    def to_json(self) -> dict:
        """The ``--json`` form of a scenario (docs/scenarios.md, "JSON report")."""
        return {"name": self.name, "path": self.path, "passed": self.passed,
                "duration": round(self.duration, 6), "failures": list(self.failures),
                "steps": [s.to_json() for s in self.steps], "violations": list(self.violations),
                "expect_violations": list(self.expect_violations), "scheduler": self.scheduler,
                "schedule": self.schedule, "replay_command": self.replay_command}


def describe_expect(e: Expect | None) -> Any:
    """The expectation as written (for tables and JSON)."""
    if e is None:
        return None
    if e.has_value:
        return {"outcome": e.outcome, "value": e.value}
    return e.outcome


#: Ops whose value is a list of tags (one per granule), and the result keys that hold one.
TAG_LIST_OPS = tuple(sorted({n for t in ACTOR_OPS.values() for n, d in t.items() if d.returns == "tags"}))
TAG_LIST_KEYS = ("tags",)
#: Lists longer than this get a diff in the failure message instead of both lists in full.
LONG_LIST = 8


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def value_mismatch(want: Any, got: Any, tags: bool = False, where: str = "value") -> str | None:
    """Why ``got`` does not meet ``want``, or None when it does.

    Tables are compared on the keys ``want`` lists (nested tables the same way); lists whole;
    an integer against a tag list (``tags``) stands for that tag in every granule; strings
    case-insensitively (hex data).
    """
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{where}: expected a table, got {_short(got)}"
        for k, w in want.items():
            if k not in got:
                return f"{where}.{k}: missing from the result (keys: {', '.join(map(str, got)) or 'none'})"
            why = value_mismatch(w, got[k], k in TAG_LIST_KEYS, f"{where}.{k}")
            if why:
                return why
        return None
    if tags and _is_int(want) and isinstance(got, (list, tuple)):
        want = [want] * len(got)  # "a single integer means this tag for every granule"
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return None if list(want) == list(got) else f"{where}: {list_diff(list(want), list(got))}"
    if isinstance(want, str) and isinstance(got, str):
        return None if want.lower() == got.lower() else f"{where}: expected {_short(want)}, got {_short(got)}"
    if want == got and isinstance(want, bool) == isinstance(got, bool):
        return None
    return f"{where}: expected {_short(want)}, got {_short(got)}"


def _short(v: Any, limit: int = 60) -> str:
    s = hex(v) if _is_int(v) and v > 0xFFFF else repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def list_diff(want: list, got: list, shown: int = 4) -> str:
    """A readable difference of two lists: short ones in full, long ones as runs of differing
    indexes (``[4..63]: expected 5, got 0``) and the lengths when they differ."""
    if max(len(want), len(got)) <= LONG_LIST:
        return f"expected {want}, got {got}"
    parts = []
    if len(want) != len(got):
        parts.append(f"expected {len(want)} items, got {len(got)}")
    runs: list[list] = []  # [first, last, want, got]
    for i in range(min(len(want), len(got))):
        if want[i] != got[i]:
            if runs and runs[-1][1] == i - 1 and runs[-1][2:] == [want[i], got[i]]:
                runs[-1][1] = i
            else:
                runs.append([i, i, want[i], got[i]])
    ndiff = sum(r[1] - r[0] + 1 for r in runs)
    if runs:
        parts.append(f"{ndiff} of {min(len(want), len(got))} items differ")
    for first, last, w, g in runs[:shown]:
        at = f"[{first}]" if first == last else f"[{first}..{last}]"
        parts.append(f"{at}: expected {w!r}, got {g!r}")
    if len(runs) > shown:
        parts.append(f"... {len(runs) - shown} more runs")
    return "; ".join(parts)


def check_expect(e: Expect | None, outcome: str, value: Any, op: str) -> str | None:
    """Why (outcome, value) does not meet expectation ``e``, or None when it does."""
    if e is None:
        return None
    if e.outcome != outcome:
        return f"expected outcome {e.outcome}, got {outcome}"
    if not e.has_value:
        return None
    return value_mismatch(e.value, value, op in TAG_LIST_OPS)


def judge(e: Expect | None, outcome: str, value: Any, op: str) -> bool:
    """Does (outcome, value) meet expectation ``e``?"""
    return check_expect(e, outcome, value, op) is None


def judge_violations(violations: list[dict], expected: tuple[str, ...]) -> list[str]:
    """Why the violations found do not match ``expect-violations`` (empty: they do).

    Names are compared through :func:`shared.invariants.canonical`, so old and new spellings
    both count; every expected invariant must break at least once and no other may break.
    """
    found = {canonical(v["invariant"]) for v in violations}
    want = {canonical(n) for n in expected}
    out = [f"invariant {n} was expected to break but did not" for n in sorted(want - found)]
    unexpected = sorted(found - want)
    if unexpected:
        out.append(f"invariant{'s' * (len(unexpected) > 1)} that expect-violations does not list "
                   f"broke: {', '.join(unexpected)}")
    return out


class _Run:
    def __init__(self, scn: Scenario, opts: RunOptions, nursery: trio.Nursery):
        self.scn = scn
        self.opts = opts
        self.nursery = nursery
        self.sched_spec = opts.scheduler or scn.scheduler
        self.controlled = self.sched_spec.kind != "free"
        self.bugs = tuple(dict.fromkeys(scn.bugs + opts.bugs))
        self.hosts: dict[str, HostLink] = {}
        self.host_clients: dict[str, Client] = {}
        self.procs: dict[str, Client] = {}
        self.pids: dict[str, int] = {}
        self.proc_host: dict[str, str] = {n: p.host for n, p in scn.processes.items()}
        self.proc_host.update({f"vmm:{n}": v.host for n, v in scn.vms.items()})
        self.vmm_links: dict[str, VmmLink] = {}
        self.vmms: dict[str, Client] = {}  # VM name -> the VMM's control channel
        self.session = f"scenario:{id(self)}"
        self.ata: set[tuple[str, int]] = set()  # (VM, vCPU) whose guest enabled MTE (SCTLR_EL1.ATA = 1)
        self.vm_host: dict[str, str] = {n: v.host for n, v in scn.vms.items()}  # where each VM runs now
        self.gone: dict[str, str] = {}  # VMs that died (their VMM killed), and how
        self.changing: dict[str, trio.Event] = {}  # VMs whose VMM a step is replacing or killing; set when done
        self.may_die: dict[str, str] = {}  # VMs whose VMM a fault injection may kill after the step (and how)
        self.killed: set[str] = set()  # host processes a `kill` step killed
        self.snapshots: str | None = None  # the run's private folder of named snapshots
        self.scheduler: ControlledScheduler | None = None  # the one scheduler every in-process host shares
        self.violations: dict[str, list[dict]] = {}  # by host: what its checks returned so far (see check)

    async def setup(self) -> None:
        if self.opts.host is not None and (self.controlled or len(self.scn.hosts) > 1):
            raise RunError("--host runs one host under the free scheduler; controlled schedulers and several "
                           "hosts need the embedded hypervisor")
        migration = in_process_migration() if self.controlled else None
        for i, (name, spec) in enumerate(self.scn.hosts.items()):
            if self.controlled:
                sched = self.scheduler or make_scheduler(
                    self.sched_spec.kind, self.sched_spec.seed, self.sched_spec.schedule, self.sched_spec.depth,
                    policy=self.sched_spec.policy)
                try:
                    link: HostLink = InProcessHost.boot(
                        self.nursery, sched, drive=self.scheduler is None, migration=migration, direct=self.opts.direct,
                        vmm_direct=self.opts.direct and not kills_a_vmm(self.scn),
                        pid_base=100 + PID_RANGE * i if len(self.scn.hosts) > 1 else None,
                        mte=spec.mte, ram=spec.ram, swap=spec.swap, bugs=self.bugs, **boot_extras(spec))
                except TypeError as exc:  # a host setting this build's kernel does not take yet
                    raise RunError(f"host {name!r}: this build cannot boot it as asked ({exc})") from None
                if isinstance(sched, ControlledScheduler):
                    sched.inline_decisions = self.opts.inline_decisions
                    self.scheduler = sched
            elif self.opts.host is not None:
                link = ProcessHost(self.nursery, address=self.opts.host, secret=self.opts.secret)
            else:
                link = ProcessHost(self.nursery, mte=spec.mte, ram=spec.ram, swap=spec.swap, bugs=self.bugs,
                                   listen=self.opts.listen)
            await link.start()
            self.hosts[name] = link
            client, _ = await link.connect("host")
            self.host_clients[name] = client
            extras = boot_extras(spec)
            if self.opts.host is not None or (extras and not self.controlled):
                # a running host is rebooted with the scenario's settings; a private one only
                # when they go beyond what its command line carries
                try:
                    await client.call("boot", {"mte": spec.mte, "ram": spec.ram, "swap": spec.swap,
                                               "bugs": list(self.bugs), **extras})
                except RemoteError as exc:
                    if exc.name == "EBUSY":
                        raise InfraError(f"the host is busy: {exc.message or 'another client is attached'}") \
                            from None
                    raise
        for name, pspec in self.scn.processes.items():
            client, hello = await self.hosts[pspec.host].connect("process", name=name, session=self.session)
            self.procs[name] = client
            self.pids[name] = hello["pid"]
        for name, vm in self.scn.vms.items():
            await self._start_vmm(name, vm)

    async def _start_vmm(self, name: str, vm) -> None:
        """Start the VM's VMM process (in-process under a controlled scheduler) and build the VM."""
        link = self.hosts[vm.host].vmm_link(name, self.session)
        self.vmm_links[name] = link
        await link.start()
        client = await link.connect()
        self.vmms[name] = client
        ctx = f"vmm:{name}/setup"
        if vm.setup == "manual":
            await client.call("vm-create", {"name": name, "ipa_bits": vm.ipa_bits}, ctx=ctx)
        else:
            memory = [{"ipa": m.ipa, "size": m.size, "backing": m.backing, "object": m.object,
                       "prot_mte": m.prot_mte, **({"hugepage_size": m.hugepage_size} if m.hugepage_size else {}),
                       **{k: getattr(m, k) for k in ("node", "region", "attr") if getattr(m, k) is not None}}
                      for m in vm.memory]
            try:
                await client.call("vm-setup", {"name": name, "ipa_bits": vm.ipa_bits, "mte": vm.mte,
                                               "vcpus": vm.vcpus, "memory": memory}, ctx=ctx)
            except RemoteError as exc:
                await link.check_alive()  # a dead VMM or hypervisor is an infrastructure failure, not the VM's
                raise VmSetupError(f"VM {name!r} could not be built: {exc} (use setup = \"manual\" to expect "
                               "the failure in a step)") from None
        self.pids[f"vmm:{name}"] = (await client.call("status")).value["pid"]
    def _request(self, step: Step) -> tuple[str, dict]:
        """The step as its actor's channel carries it (``shared.control.ACTOR_CHANNEL``): the op
        itself to the hypervisor, or inside a VMM's ``vmm-op``/``guest-op``; ``pid`` fields are
        resolved from process names, and only the op's own fields are sent."""
        d = ACTOR_OPS[step.actor_kind][step.op]
        a = _plain(step.args)
        if step.actor_kind == "host" and "process" in a:  # {process, vm, addr, size}: a VM's pid comes later
            a = dict(a, pid=self.pids.get(a["process"]))
        for f in d.fields:
            if f.kind.name == "pid" and isinstance(a.get(f.name), str):
                a[f.name] = self.pids[a[f.name]]
        a = {f.name: a[f.name] for f in d.fields if f.name in a}
        channel = ACTOR_CHANNEL[step.actor_kind]
        if channel == "guest-op":
            return channel, {"vcpu": step.vcpu or 0, "op": step.op, "args": a}
        if channel == "vmm-op":
            return channel, {"op": step.op, "args": a}
        return step.op, a

    async def _resolve_vm(self, step: Step, args: dict) -> dict:
        """A host op on ``vm`` + ``ipa``: the VMM's pid and the address it maps the IPA at (ESRCH
        when the VM is gone or runs on another host than the acting one)."""
        vm = step.args["vm"]
        self._vm_here(vm, step.actor_target)
        hva = (await self._vm_call(vm, "ipa-to-hva", {"ipa": step.args["addr"]}, None)).value
        self._vm_here(vm, step.actor_target)  # it may have moved meanwhile
        return dict(args, pid=hva["pid"], addr=hva["hva"])

    def _vm_here(self, vm: str, host: str) -> None:
        """Raise ESRCH unless ``vm`` runs on ``host`` now."""
        if vm in self.gone:
            raise RemoteError("ESRCH", f"VM {vm} is gone ({self.gone[vm]})")
        if self.vm_host.get(vm) != host:
            raise RemoteError("ESRCH", f"VM {vm} runs on host {self.vm_host.get(vm)!r}, not {host!r}")

    async def _dispatch(self, step: Step, ctx: str) -> Reply:
        """Send the step to whoever serves it now and return the reply (RemoteError: its errno).

        A ``vmm:``/``guest:`` step goes to the VM's current VMM (see :meth:`_vm_call`); ``migrate``,
        ``snapshot``/``restore`` and the host's ``kill`` are orchestrated here.
        """
        kind = step.actor_kind
        if kind == "host" and step.op == "kill":
            return await self._kill(step, ctx)
        if kind == "vmm" and step.op == "migrate":
            return await self._migrate(step, ctx)
        op, args = self._request(step)
        if kind in ("vmm", "guest"):
            if step.op in ("snapshot", "restore"):
                args = {"op": step.op, "args": {"path": self._snapshot_path(step)}}
            return await self._vm_call(step.actor_target, op, args, ctx)
        if kind == "host":
            if step.op == "stage2-entry":  # the hypervisor reads the VM's own table: its name and IPA go as they are
                self._vm_here(step.args["vm"], step.actor_target)
            elif step.args.get("vm") is not None:
                args = await self._resolve_vm(step, args)
            elif step.args.get("process") in self.killed:
                raise RemoteError("ESRCH", f"process {step.args['process']} was killed")
            elif str(step.args.get("process")).startswith("vmm:"):
                self._vm_here(step.args["process"][4:], step.actor_target)
            return await self.host_clients[step.actor_target].call(op, args, ctx=ctx)
        if step.actor_target in self.killed:
            raise RemoteError("ESRCH", f"process {step.actor_target} was killed")
        return await self.procs[step.actor_target].call(op, args, ctx=ctx)

    async def _vm_call(self, vm: str, op: str, args: dict, ctx: str | None) -> Reply:
        """Call the VM's current VMM; follow the VM when it moves, ESRCH once it is gone.

        A VMM whose VM migrated away answers ESTALE, and a VMM killed during the call closes its
        connection: then, once the step replacing or killing it has finished, the call goes to
        the VM's new VMM, or fails with ESRCH if the VM is gone. A VMM that dies unasked is an
        infrastructure failure (the connection error is raised).
        """
        for _ in range(MAX_FOLLOW):
            if vm in self.gone:
                raise RemoteError("ESRCH", f"VM {vm} is gone ({self.gone[vm]})")
            client = self.vmms[vm]
            try:
                return await client.call(op, args, ctx=ctx)
            except RemoteError as exc:
                if exc.name != "ESTALE":
                    raise
                await self._settled(vm)
                if self.vmms[vm] is client and vm not in self.gone:
                    raise RemoteError("EIO", f"the VMM of {vm} answered ESTALE but the VM did not move: "
                                      f"{exc.message}") from None
            except _INFRA:
                await self._settled(vm)
                if vm not in self.gone and self.vmms[vm] is client:
                    if vm not in self.may_die:
                        raise
                    await self._vm_died(vm, self.may_die.pop(vm), f"{ctx or 'vmm:' + vm}:reap")
        raise RemoteError("EIO", f"VM {vm} kept moving: the step was sent {MAX_FOLLOW} times")

    async def _settled(self, vm: str) -> None:
        """Wait until no step is replacing or killing the VM's VMM."""
        while vm in self.changing:
            await self.changing[vm].wait()

    def _snapshot_path(self, step: Step) -> str:
        """The absolute file of a ``snapshot``/``restore``: ``path`` relative to the scenario's folder,
        or ``name`` in the run's private folder (removed at teardown)."""
        if step.args.get("path") is not None:
            return os.path.join(os.path.dirname(os.path.abspath(self.scn.path)), step.args["path"])
        if self.snapshots is None:
            self.snapshots = tempfile.mkdtemp(prefix="mtekvm-snapshots-")
        return os.path.join(self.snapshots, f"{step.args['name']}.snap")

    # ---- migration and SIGKILL ------------------------------------------------------------

    async def _migrate(self, step: Step, ctx: str) -> Reply:
        """``migrate``: start a VMM for the VM on host ``to``, let the two VMMs move it, then route
        the VM's steps to its new VMM (module docstring of :mod:`mtekvm.runner`, "Migration")."""
        vm, a = step.actor_target, step.args
        if vm in self.gone:
            raise RemoteError("ESRCH", f"VM {vm} is gone ({self.gone[vm]})")
        await self._settled(vm)
        if vm in self.gone:
            raise RemoteError("ESRCH", f"VM {vm} is gone ({self.gone[vm]})")
        src_host, to = self.vm_host[vm], a["to"]
        if to == src_host:
            raise RemoteError("EINVAL", f"VM {vm} already runs on host {to!r}")
        done = trio.Event()
        self.changing[vm] = done
        try:
            return await self._migrate_to(vm, src_host, to, a, ctx)
        finally:
            del self.changing[vm]
            done.set()

    async def _migrate_to(self, vm: str, src_host: str, to: str, a: dict, ctx: str) -> Reply:
        fault = {"fail": a["fail"], "fail_at": a["fail_at"]}
        dst_host = self.hosts[to]
        dst_link = dst_host.vmm_link(vm, self.session)
        self.vmm_links[f"{vm}>{to}#{ctx}"] = dst_link  # torn down with the others if anything below raises
        await dst_link.start()
        dst = await dst_link.connect()
        dst_pid = (await dst.call("status")).value["pid"]
        try:
            incoming = await dst.call("migrate-incoming", {"bugs": list(self.bugs), **fault,
                                                           "transport": dst_host.transport}, ctx=f"{ctx}:dst")
        except BaseException:
            await self._discard(dst_link, to, dst_pid, ctx)
            raise
        src, src_link, src_pid = self.vmms[vm], self.vmm_links[vm], self.pids[f"vmm:{vm}"]
        try:
            out = await src.call("migrate-out", {"address": incoming.value["address"], "secret": dst_host.secret,
                                                 "to": to, "max_passes": a["max_passes"], **fault,
                                                 "bugs": list(self.bugs)}, ctx=ctx)
        except RemoteError:
            await self._discard(dst_link, to, dst_pid, ctx)
            raise
        except _INFRA:
            if a["fail"] != "kill-source":
                await self._discard(dst_link, to, dst_pid, ctx)
                raise
            if a["fail_at"] != "after-resume":  # the VM died with its VMM before the destination resumed it
                await self._discard(dst_link, to, dst_pid, ctx)
                await self._vm_died(vm, "killed with its VMM during a migration (fail = kill-source)", ctx)
                raise RemoteError("ECONNRESET", "the source VMM was killed during the migration: the VM is "
                                  "gone") from None
            out = Reply({})  # the destination runs the VM; the source died before it could say how it went
            await src_link.kill()
        self.vmms[vm], self.vmm_links[vm], self.vm_host[vm] = dst, dst_link, to
        self.vmm_links.pop(f"{vm}>{to}#{ctx}", None)
        self.pids[f"vmm:{vm}"], self.proc_host[f"vmm:{vm}"] = dst_pid, to
        if a["fail"] == "kill-destination" and a["fail_at"] == "after-resume":
            self.may_die[vm] = "killed with its VMM after a migration (fail = kill-destination)"
        with trio.CancelScope(shield=True):  # the source exits: nothing of the VM stays on its host
            await _close_quietly(src)  # a VMM waits for its control connections to close before it exits
            await src_link.stop()
            await self._host_kill(src_host, src_pid, f"{ctx}:kill-src")
        return out

    async def _discard(self, link: VmmLink, host: str, pid: int, ctx: str) -> None:
        """Kill a VMM and make sure its host has finished its exit (the VM destroyed, memory freed)."""
        with trio.CancelScope(shield=True):
            await link.kill()
            await link.stop()
            await self._host_kill(host, pid, f"{ctx}:kill-{host}")

    async def _host_kill(self, host: str, pid: int, ctx: str) -> None:
        """Host op ``kill`` of ``pid``: returns once its exit is complete (ESRCH: it already has)."""
        try:
            await self.host_clients[host].call("kill", {"pid": pid}, ctx=ctx)
        except RemoteError as exc:
            if exc.name not in ("ESRCH", "ENOSYS"):  # ENOSYS: a host that cannot kill (its exit is under way)
                raise

    async def _vm_died(self, vm: str, why: str, ctx: str) -> None:
        """The VM's VMM is dead (or is killed now): the VM is gone, its host keeps nothing of it."""
        self.gone[vm] = why
        await self._discard(self.vmm_links[vm], self.vm_host[vm], self.pids[f"vmm:{vm}"], ctx)

    async def _kill(self, step: Step, ctx: str) -> Reply:
        """Host op ``kill``: SIGKILL a host process, or a VMM (its VM destroyed, its memory freed)."""
        process, host = step.args["process"], step.args["host"]
        if process.startswith("vmm:"):
            vm = process[4:]
            await self._settled(vm)
            self._vm_here(vm, host)
            done = trio.Event()
            self.changing[vm] = done
            try:
                await self._vm_died(vm, "killed by SIGKILL", ctx)
            finally:
                del self.changing[vm]
                done.set()
            return Reply(None)
        if process in self.killed or self.proc_host[process] != host:
            raise RemoteError("ESRCH", f"no process {process} on host {host!r}")
        reply = await self.host_clients[host].call("kill", {"pid": self.pids[process]}, ctx=ctx)
        self.killed.add(process)
        return reply

    async def run_step(self, step: Step, results: list) -> None:
        index = str(step.number) if step.path_in_parallel is None else f"{step.number}.{step.path_in_parallel}"
        ctx = f"{step.actor}/{index}"
        message = ""
        started = time.monotonic()
        try:
            reply = await self._dispatch(step, ctx)
        except RemoteError as exc:
            outcome, value, message = exc.name, None, exc.message
        else:
            value = reply.value
            outcome = "ok"
            if reply.fault is not None:
                outcome = reply.fault["kind"]
                if outcome == "tag-check-fault":
                    value = reply.fault["addr"]
                    message = (f"pointer tag {reply.fault.get('pointer_tag')} != memory tag "
                               f"{reply.fault.get('memory_tag')} at {reply.fault['addr']:#x}")
            returns = ACTOR_OPS[step.actor_kind][step.op].returns
            if returns == "bytes" and isinstance(value, (bytes, bytearray)):
                value = bytes(value).hex()
            elif returns == "process":
                await self._attach_child(step, value)
                value = None
            elif returns == "tags" and isinstance(value, (bytes, bytearray)):
                value = list(value)
        op = step.op
        why = check_expect(step.expect, outcome, value, op)
        results.append(StepResult(index, step.actor, op, describe_expect(step.expect), outcome, value, why is None,
                                  why or message, self._note(step, outcome), time.monotonic() - started))

    def _note(self, step: Step, outcome: str) -> str:
        """What the hardware did silently: tag stores on a vCPU whose SCTLR_EL1.ATA is 0 are ignored."""
        if step.actor_kind != "guest" or outcome != "ok":
            return ""
        key = (step.actor_target, step.vcpu or 0)
        if step.op == "enable-mte":
            self.ata.add(key)
        elif ACTOR_OPS["guest"][step.op].stores_tags and key not in self.ata and step.args.get("size"):
            return (f"ignored: SCTLR_EL1.ATA is 0 on vCPU {key[1]} (no enable-mte there), so the tag store "
                    "did nothing (RAZ/WI)")
        return ""

    async def _attach_child(self, step: Step, value: dict) -> None:
        child = step.args["child"]
        host = self.proc_host[step.actor if step.actor_kind == "vmm" else step.actor_target]
        client, hello = await self.hosts[host].connect("process", attach=value["token"])
        self.procs[child] = client
        self.pids[child] = hello["pid"]
        self.proc_host[child] = host

    async def check(self) -> list[dict]:
        """Run every host's oracles now; returns all the violations found so far, host by host. Each
        crosses the wire once: a check asks only for those found since the last one."""
        out = []
        for host, client in self.host_clients.items():
            kept = self.violations.setdefault(host, [])
            kept += (await client.call("check-invariants", {"since": len(kept)})).value
            out += kept
        return out

    def failures(self) -> list[dict]:
        out = []
        for link in self.hosts.values():
            for f in link.failures():
                out.append({"invariant": "SCHEDULER", "message": f, "actor": "", "pfn": None})
        return out

    def schedule(self) -> str:
        for link in self.hosts.values():
            if link.scheduler is not None:
                return link.schedule()
        return ""

    async def teardown(self) -> None:
        for host in self.hosts.values():  # judged (or failed): what the teardown does is never looked at
            host.discard()
        for vm, c in self.vmms.items():
            if vm in self.gone:
                continue
            with trio.move_on_after(30), trio.CancelScope(shield=True):
                try:
                    await c.call("shutdown")
                except Exception:  # noqa: BLE001 - a VMM that died is torn down anyway
                    pass
                await _close_quietly(c)  # the VMM exits once its control connections have closed
        for link in self.vmm_links.values():
            with trio.move_on_after(30), trio.CancelScope(shield=True):
                await link.stop()
        for c in list(self.procs.values()) + list(self.host_clients.values()):
            if isinstance(c, DirectChannel):  # closed at once (its server's end follows as it closes)
                c.close("the run is over")
                continue
            with trio.CancelScope(shield=True):
                await c.aclose()
        for host in self.hosts.values():
            if isinstance(host, InProcessHost) and host.idle:
                continue  # its connections have ended (a discarded host's, as they closed): nothing to wait for
            with trio.CancelScope(shield=True):
                await host.stop()
        if self.snapshots is not None:
            shutil.rmtree(self.snapshots, ignore_errors=True)
            self.snapshots = None


def kills_a_vmm(scn) -> bool:
    """The scenario kills a VMM (a host ``kill`` of ``vmm:VM``, or a ``migrate`` with ``fail``). Its VMMs
    then talk over in-memory streams even when ``RunOptions.direct`` is on: with direct VMM and guest
    channels, which requests a kill cancels, and when, depends on trio's task order, so such a run
    would not replay exactly (tests/unit/mtekvm/test_direct.py)."""
    for step in scn.steps:
        for sub in step.steps if isinstance(step, Parallel) else (step,):
            if sub.op == "kill" and str(sub.args.get("process", "")).startswith("vmm:"):
                return True
            if sub.op == "migrate" and sub.args.get("fail"):
                return True
    return False


def boot_extras(spec) -> dict:
    """The ``boot`` arguments beyond mte/ram/swap/bugs, each only when it differs from Linux's
    default (so a host that does not know the field yet still boots default scenarios)."""
    out: dict[str, Any] = {}
    if spec.tcf_preferred != "async":
        out["tcf_preferred"] = spec.tcf_preferred
    if spec.kernel_fixes:
        out["kernel_fixes"] = list(spec.kernel_fixes)
    if spec.fault_replay_limit != FAULT_REPLAY_LIMIT:
        out["fault_replay_limit"] = spec.fault_replay_limit
    if not spec.physmem.is_default:
        out["physmem"] = spec.physmem.to_wire()
    return out


def _plain(args: dict) -> dict:
    """Scenario args as msgpack carries them (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def _scheduler_text(spec: SchedulerSpec) -> str:
    if spec.policy is not None:
        return spec.policy.describe()
    if spec.kind == "bounded":
        return f"bounded({spec.depth})"
    if spec.kind == "random":
        return f"random(seed={spec.seed if spec.seed is not None else 0})"
    if spec.kind == "pct":
        return f"pct(seed={spec.seed if spec.seed is not None else 0}, depth={spec.depth})"
    if spec.kind in ("replay", "dfs"):
        return spec.kind
    return "free"


def replay_command(scn: Scenario, schedule: str, bugs: tuple[str, ...]) -> str:
    """The exact command that replays a controlled run."""
    cmd = ["mtekvm", "run", scn.path, "--scheduler", "replay", "--schedule", schedule]
    for b in bugs:
        if b not in scn.bugs:
            cmd += ["--bug", b]
    return " ".join(shlex.quote(c) for c in cmd)


def _repeatable_task_order() -> None:
    """Make trio's order among tasks woken together repeatable from here on.

    The controlled scheduler decides which kernel context runs; code outside any context (a
    VMM's own logic between its hypervisor calls, two VMMs streaming a migration to each other)
    runs freely until every task is blocked. Trio shuffles the tasks woken in one batch with a
    module-level ``random.Random``; seeding it at the start of each controlled run makes that
    order, hence the run, a function of the schedule alone, so a recorded schedule replays to
    the same run.
    """
    from trio._core import _run as trio_run

    rng = getattr(trio_run, "_r", None)
    if rng is not None and hasattr(rng, "seed"):
        rng.seed(0)


def _replay_check(run: _Run) -> None:
    """Replay is strict: a divergence, or an entry the run never reached, is a ReplayError."""
    for sched in {id(link.scheduler): link.scheduler for link in run.hosts.values()}.values():
        if not isinstance(sched, ControlledScheduler) or sched.replay is None:
            continue
        hint = " (was it recorded with other --bug options, or from another version of the scenario?)"
        if isinstance(sched.failure, ScheduleDivergence):
            raise ReplayError(f"the schedule does not fit this run: {sched.failure}{hint}")
        used = {(a, n) for a, n, _t in sched.preemptions}
        unused = [f"{a}@{n}>{t}" for (a, n), t in sched.replay.items() if (a, n) not in used]
        if unused:
            raise ReplayError(f"schedule entr{'ies' if len(unused) > 1 else 'y'} {', '.join(unused[:3])}"
                              f"{' ...' if len(unused) > 3 else ''} never reached; replay is strict{hint}")


async def run_scenario(scn: Scenario, opts: RunOptions = RunOptions()) -> ScenarioResult:
    """Run one scenario and judge it.

    Raises:
        RunError: the scenario needs something this build or these options cannot give, or a
            replayed schedule does not fit (:class:`ReplayError`).
        InfraError: a host or VMM could not be started or reached, was busy, or died mid-run.
        KeyboardInterrupt: interrupted; hosts and VMMs have been torn down.
    """
    started = time.monotonic()
    results: list[StepResult] = []
    error: BaseException | None = None
    violations: list[dict] = []
    schedule = ""
    if (opts.scheduler or scn.scheduler).kind != "free":
        _repeatable_task_order()
    async with trio.open_nursery() as nursery:
        run = _Run(scn, opts, nursery)
        try:
            await run.setup()
            last = len(scn.steps) - 1
            for i, st in enumerate(scn.steps):
                if isinstance(st, Parallel):
                    batch: list[StepResult] = []
                    async with trio.open_nursery() as inner:
                        for sub in st.steps[1:]:
                            inner.start_soon(run.run_step, sub, batch)
                        await run.run_step(st.steps[0], batch)  # the first in this task: one task less
                    results += sorted(batch, key=lambda r: [int(x) for x in r.index.split(".")])
                else:
                    await run.run_step(st, results)
                if run.controlled and i < last:  # after the last step, the final check below is this one
                    await run.check()  # state invariants after every step; the oracle keeps what it finds
            violations = await run.check() + run.failures()
            schedule = run.schedule()
            _replay_check(run)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the nursery's exception group
            error = exc
            if isinstance(exc, trio.Cancelled):
                raise
        finally:
            await run.teardown()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise classify_error(error)
    failures = [f"step {r.index} ({r.actor} {r.op}): {r.message or 'expectation not met'}"
                for r in results if not r.passed]
    failures += judge_violations(violations, scn.expect_violations)
    passed = not failures
    spec = run.sched_spec
    cmd = replay_command(scn, schedule, run.bugs) if run.controlled and not passed else None
    return ScenarioResult(scn.name, scn.path, passed, tuple(results), tuple(violations), _scheduler_text(spec),
                          schedule, cmd, scn.expect_violations, tuple(failures), time.monotonic() - started)
