"""Run scenarios: the orchestration a management layer does above a VMM.

:func:`run_scenario` sets up the scenario's hosts (a private hypervisor
process each, a running one with ``--host``, or an in-process one for the
controlled schedulers), connects one client per host process, runs the steps
in order (``parallel`` sub-steps concurrently, each as its own kernel context
named ``ACTOR/STEP[.SUB]``), compares each outcome with its expectation, and
runs the oracles (after every step of a controlled run, and at the end of
every run). A failing controlled run carries its schedule and the command
that replays it.

This is the Python API the CLI uses; tests and users can call it directly::

    scenario = load_scenario("scenarios/x.toml")
    result = await run_scenario(scenario, RunOptions())
"""

from __future__ import annotations

import shlex
from typing import Any

import attrs
import trio

from hypervisor.kernel import Kernel
from hypervisor.sched import make_scheduler
from shared.wire import Client, RemoteError
from vmm.hostlink import InProcessHost, InProcessVmm, ProcessHost, ProcessVmm
from vmm.scenario import Expect, Parallel, Scenario, SchedulerSpec, Step

#: Ops a VMM runs on its own address space, exactly as a host process does.
HOST_PROCESS_OPS = ("mmap", "mprotect", "munmap", "madvise", "prctl", "prctl-get", "tco", "store", "load",
                    "stg", "ldg", "irg", "fork", "ptrace-peek-tags", "ptrace-poke-tags")


class RunError(Exception):
    """The scenario cannot be run as asked (unsupported feature or option clash)."""


@attrs.frozen
class RunOptions:
    """How to run: where the host is, extra bugs, a scheduler that overrides the file's."""

    host: str | None = None
    secret: str | None = None
    bugs: tuple[str, ...] = ()
    scheduler: SchedulerSpec | None = None


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
    message: str = ""

    def to_json(self) -> dict:
        """The ``--json`` form of SCENARIOS.md."""
        return {"index": self.index, "actor": self.actor, "op": self.op, "expect": self.expect,
                "outcome": self.outcome, "value": self.value, "passed": self.passed}


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

    def to_json(self) -> dict:
        """The ``--json`` form of SCENARIOS.md (plus scheduler facts)."""
        return {"name": self.name, "passed": self.passed, "steps": [s.to_json() for s in self.steps],
                "violations": list(self.violations), "scheduler": self.scheduler, "schedule": self.schedule,
                "replay_command": self.replay_command}


def describe_expect(e: Expect | None) -> Any:
    """The expectation as written (for tables and JSON)."""
    if e is None:
        return None
    if e.has_value:
        return {"outcome": e.outcome, "value": e.value}
    return e.outcome


def _value_matches(op: str, want: Any, got: Any) -> bool:
    if isinstance(got, list) and isinstance(want, int) and not isinstance(want, bool):
        return all(g == want for g in got)  # "a single integer means this tag for every granule"
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return list(want) == list(got)
    if isinstance(want, str) and isinstance(got, str):
        return want.lower() == got.lower()
    return want == got


def judge(e: Expect | None, outcome: str, value: Any, op: str) -> bool:
    """Does (outcome, value) meet expectation ``e``?"""
    if e is None:
        return True
    if e.outcome != outcome:
        return False
    return not e.has_value or _value_matches(op, e.value, value)


class _Run:
    def __init__(self, scn: Scenario, opts: RunOptions, nursery: trio.Nursery):
        self.scn = scn
        self.opts = opts
        self.nursery = nursery
        self.sched_spec = opts.scheduler or scn.scheduler
        self.controlled = self.sched_spec.kind != "free"
        self.bugs = tuple(dict.fromkeys(scn.bugs + opts.bugs))
        self.hosts: dict[str, Any] = {}
        self.host_clients: dict[str, Client] = {}
        self.procs: dict[str, Client] = {}
        self.pids: dict[str, int] = {}
        self.proc_host: dict[str, str] = {n: p.host for n, p in scn.processes.items()}
        self.proc_host.update({f"vmm:{n}": v.host for n, v in scn.vms.items()})
        self.vmm_links: dict[str, Any] = {}
        self.vmms: dict[str, Client] = {}  # VM name -> the VMM's control channel
        self.session = f"scenario:{id(self)}"

    async def setup(self) -> None:
        if self.opts.host is not None and (self.controlled or len(self.scn.hosts) > 1):
            raise RunError("--host runs one host under the free scheduler; controlled schedulers and several "
                           "hosts need the embedded hypervisor")
        for name, spec in self.scn.hosts.items():
            if self.controlled:
                sched = make_scheduler(self.sched_spec.kind, self.sched_spec.seed, self.sched_spec.schedule,
                                       self.sched_spec.depth)
                kernel = Kernel(mte=spec.mte, ram=spec.ram, swap=spec.swap, bugs=self.bugs, sched=sched)
                link = InProcessHost(self.nursery, kernel)
            elif self.opts.host is not None:
                link = ProcessHost(self.nursery, address=self.opts.host, secret=self.opts.secret)
            else:
                link = ProcessHost(self.nursery, mte=spec.mte, ram=spec.ram, swap=spec.swap, bugs=self.bugs)
            await link.start()
            self.hosts[name] = link
            client, _ = await link.connect("host")
            self.host_clients[name] = client
            if self.opts.host is not None:
                await client.call("boot", {"mte": spec.mte, "ram": spec.ram, "swap": spec.swap,
                                           "bugs": list(self.bugs)})
        for name, spec in self.scn.processes.items():
            client, hello = await self.hosts[spec.host].connect("process", name=name, session=self.session)
            self.procs[name] = client
            self.pids[name] = hello["pid"]
        for name, vm in self.scn.vms.items():
            await self._start_vmm(name, vm)

    async def _start_vmm(self, name: str, vm) -> None:
        """Start the VM's VMM process (in-process under a controlled scheduler) and build the VM."""
        host = self.hosts[vm.host]
        if isinstance(host, InProcessHost):
            link = InProcessVmm(self.nursery, host, name=name, session=self.session)
        else:
            link = ProcessVmm(self.nursery, host.address, host.secret, name=name, session=self.session)
        self.vmm_links[name] = link
        await link.start()
        client = await link.connect()
        self.vmms[name] = client
        ctx = f"vmm:{name}/setup"
        if vm.setup == "manual":
            await client.call("vm-create", {"name": name, "ipa_bits": vm.ipa_bits}, ctx=ctx)
        else:
            memory = [{"ipa": m.ipa, "size": m.size, "backing": m.backing, "object": m.object,
                       "prot_mte": m.prot_mte} for m in vm.memory]
            try:
                await client.call("vm-setup", {"name": name, "ipa_bits": vm.ipa_bits, "mte": vm.mte,
                                               "vcpus": vm.vcpus, "memory": memory}, ctx=ctx)
            except RemoteError as exc:
                raise RunError(f"VM {name!r} could not be built: {exc} (use setup = \"manual\" to expect "
                               "the failure in a step)") from None
        self.pids[f"vmm:{name}"] = (await client.call("status")).value["pid"]
    def _request(self, step: Step) -> tuple[str, dict]:
        a = dict(step.args)
        op = step.op
        if step.actor_kind == "guest":
            return "guest-op", {"vcpu": step.vcpu or 0, "op": op, "args": _plain(a)}
        if step.actor_kind == "vmm" and op not in HOST_PROCESS_OPS:
            return "vmm-op", {"op": op, "args": _plain(a)}
        if op == "mmap":
            a["prot"] = list(a["prot"])
        elif op == "mprotect":
            a["prot"] = list(a["prot"])
        elif op in ("ptrace-peek-tags", "ptrace-poke-tags"):
            a["target"] = self.pids[a["target"]]
            if op == "ptrace-poke-tags":
                a["tags"] = list(a["tags"])
        elif op == "fork":
            a = {"child": a["child"]}
        elif step.actor_kind == "host":
            b = {"pid": self.pids.get(a["process"]), "addr": a["addr"]}
            if op != "page-flags":
                b["size"] = a["size"]
            a = b
        if step.actor_kind == "vmm":
            return "vmm-op", {"op": op, "args": a}
        return op, a

    async def _resolve_vm(self, step: Step, args: dict) -> dict:
        """A host op on ``vm`` + ``ipa``: the VMM's pid and the address it maps the IPA at."""
        hva = (await self.vmms[step.args["vm"]].call("ipa-to-hva", {"ipa": step.args["addr"]})).value
        return dict(args, pid=hva["pid"], addr=hva["hva"])

    async def run_step(self, step: Step, results: list) -> None:
        index = str(step.number) if step.path_in_parallel is None else f"{step.number}.{step.path_in_parallel}"
        ctx = f"{step.actor}/{index}"
        if step.actor_kind == "host":
            client = self.host_clients[step.actor_target]
        elif step.actor_kind in ("vmm", "guest"):
            client = self.vmms[step.actor_target]
        else:
            client = self.procs[step.actor_target]
        message = ""
        try:
            op, args = self._request(step)
            if step.actor_kind == "host" and step.args.get("vm") is not None:
                args = await self._resolve_vm(step, args)
            reply = await client.call(op, args, ctx=ctx)
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
            op = step.op
            if op in ("load", "dma-read") and isinstance(value, (bytes, bytearray)):
                value = bytes(value).hex()
            elif op == "fork":
                await self._attach_child(step, value)
                value = None
            elif op == "ptrace-peek-tags" and isinstance(value, (bytes, bytearray)):
                value = list(value)
        op = step.op
        passed = judge(step.expect, outcome, value, op)
        results.append(StepResult(index, step.actor, op, describe_expect(step.expect), outcome, value, passed, message))

    async def _attach_child(self, step: Step, value: dict) -> None:
        child = step.args["child"]
        host = self.proc_host[step.actor if step.actor_kind == "vmm" else step.actor_target]
        client, hello = await self.hosts[host].connect("process", attach=value["token"])
        self.procs[child] = client
        self.pids[child] = hello["pid"]
        self.proc_host[child] = host

    async def check(self) -> list[dict]:
        out = []
        for client in self.host_clients.values():
            out += (await client.call("check-invariants")).value
        return out

    def failures(self) -> list[dict]:
        out = []
        for link in self.hosts.values():
            if isinstance(link, InProcessHost):
                for f in link.hv.failures:
                    out.append({"invariant": "SCHEDULER", "message": f, "actor": "", "pfn": None})
        return out

    def schedule(self) -> str:
        for link in self.hosts.values():
            if isinstance(link, InProcessHost):
                return link.sched.schedule
        return ""

    async def teardown(self) -> None:
        for name, c in self.vmms.items():
            with trio.move_on_after(30), trio.CancelScope(shield=True):
                try:
                    await c.call("shutdown")
                except Exception:  # noqa: BLE001 - a VMM that died is torn down anyway
                    pass
        for link in self.vmm_links.values():
            with trio.move_on_after(30), trio.CancelScope(shield=True):
                await link.stop()
        for c in list(self.procs.values()) + list(self.host_clients.values()):
            with trio.CancelScope(shield=True):
                await c.aclose()
        for link in self.hosts.values():
            if isinstance(link, InProcessHost):
                with trio.move_on_after(60), trio.CancelScope(shield=True):
                    await link.hv.wait_idle()  # exits run as contexts: the driver must still be there
            if isinstance(link, ProcessHost):
                with trio.CancelScope(shield=True):
                    await link.stop()


def _plain(args: dict) -> dict:
    """Scenario args as msgpack carries them (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def _scheduler_text(spec: SchedulerSpec) -> str:
    if spec.kind == "random":
        return f"random(seed={spec.seed if spec.seed is not None else 0})"
    if spec.kind == "pct":
        return f"pct(seed={spec.seed if spec.seed is not None else 0}, depth={spec.depth})"
    if spec.kind == "replay":
        return "replay"
    return "free"


def replay_command(scn: Scenario, schedule: str, bugs: tuple[str, ...]) -> str:
    """The exact command that replays a controlled run."""
    cmd = ["mtekvm", "run", scn.path, "--scheduler", "replay", "--schedule", schedule]
    for b in bugs:
        if b not in scn.bugs:
            cmd += ["--bug", b]
    return " ".join(shlex.quote(c) for c in cmd)


async def run_scenario(scn: Scenario, opts: RunOptions = RunOptions()) -> ScenarioResult:
    """Run one scenario and judge it.

    Raises:
        RunError: the scenario needs something this build or these options cannot give.
        vmm.hostlink.HostStartError: the hypervisor could not be started or reached.
    """
    results: list[StepResult] = []
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        run = _Run(scn, opts, nursery)
        violations: list[dict] = []
        schedule = ""
        try:
            await run.setup()
            violations: list[dict] = []
            for st in scn.steps:
                if isinstance(st, Parallel):
                    batch: list[StepResult] = []
                    async with trio.open_nursery() as inner:
                        for sub in st.steps:
                            inner.start_soon(run.run_step, sub, batch)
                    results += sorted(batch, key=lambda r: [int(x) for x in r.index.split(".")])
                else:
                    await run.run_step(st, results)
                if run.controlled:
                    await run.check()  # state invariants after every step; the oracle keeps what it finds
            violations = await run.check() + run.failures()
            schedule = run.schedule()
        except Exception as exc:  # re-raised below, outside the nursery's exception group
            error = exc
        finally:
            await run.teardown()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    passed = all(r.passed for r in results) and not violations
    spec = run.sched_spec
    cmd = replay_command(scn, schedule, run.bugs) if run.controlled and not passed else None
    return ScenarioResult(scn.name, scn.path, passed, tuple(results), tuple(violations), _scheduler_text(spec),
                          schedule, cmd)
