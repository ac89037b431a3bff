"""Unit tests for the runner's side of migration, snapshots and SIGKILL: parsing, routing, ESRCH, ESTALE.

The runner's orchestration (:class:`mtekvm.runner._Run`) is driven against scripted VMMs and hosts
(no hypervisor): each fake records what it was asked, so a test checks what the runner sent
where, and what a step's outcome is. Runs with real in-process hosts check that every host of a
controlled run shares one scheduler and that a two-host schedule replays exactly.
"""

from __future__ import annotations

import os
import tomllib

import pytest
import trio

from mtekvm.runner import RunOptions, _Run, run_scenario
from mtekvm.scenario import Parallel, ScenarioError, SchedulerSpec, parse_scenario
from shared.wire import ConnectionClosed, RemoteError, Reply

RAM = 0x4000_0000
WORLD = """
name = "m"
[hosts.src]
[hosts.dst]
[processes.p]
host = "src"
[vms.vm0]
host = "src"
memory = [ { ipa = 0x4000_0000, size = "1MiB" } ]
"""


def scenario(body: str, path: str = "/scen/m.toml"):
    """WORLD followed by ``body`` (some [[steps]]), parsed."""
    return parse_scenario(tomllib.loads(WORLD + body), path)


def error(body: str) -> ScenarioError:
    """The ScenarioError raised by WORLD + ``body``."""
    with pytest.raises(ScenarioError) as info:
        scenario(body)
    return info.value


# ---- scripted VMMs and hosts ------------------------------------------------------------

class FakeClient:
    """A control or host connection answering with ``handler(op, args, ctx)``; records every call."""

    def __init__(self, name: str, handler):
        self.name = name
        self.handler = handler
        self.calls: list[tuple[str, dict, str | None]] = []

    async def call(self, op: str, args: dict | None = None, ctx: str | None = None) -> Reply:
        self.calls.append((op, args or {}, ctx))
        value = await self.handler(op, args or {}, ctx)
        return value if isinstance(value, Reply) else Reply(value)

    async def aclose(self) -> None:
        pass


class FakeVmm:
    """A VMM link and its VMM: ``script`` maps an op (``guest-op``, ``migrate-out``...) to an async
    function of (args, ctx) returning a value or raising; ``status`` gives its pid."""

    def __init__(self, name: str, pid: int, script: dict | None = None):
        self.name, self.pid = name, pid
        self.script = script or {}
        self.client = FakeClient(name, self._handle)
        self.events: list[str] = []

    async def _handle(self, op: str, args: dict, ctx: str | None):
        if op == "status":
            return {"pid": self.pid}
        if op == "ipa-to-hva":
            return {"pid": self.pid, "hva": args["ipa"]}
        if op in self.script:
            return await self.script[op](args, ctx)
        return {"served-by": self.name}

    async def start(self) -> None:
        self.events.append("start")

    async def connect(self) -> FakeClient:
        return self.client

    async def stop(self) -> None:
        self.events.append("stop")

    async def kill(self) -> None:
        self.events.append("kill")

    async def check_alive(self) -> None:
        pass


class FakeHost:
    """A host: its VMM links come from ``vmms`` in order; its connection records ``kill``/``meminfo``."""

    def __init__(self, name: str, transport: str = "unix", secret: str | None = None):
        self.name, self.transport, self.secret = name, transport, secret
        self.vmms: list[FakeVmm] = []
        self.killed: list[int] = []
        self.client = FakeClient(f"host:{name}", self._handle)

    async def _handle(self, op: str, args: dict, ctx: str | None):
        if op == "kill":
            self.killed.append(args["pid"])
            return None
        return {"op": op, "args": args}

    def discard(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def vmm_link(self, name: str, session: str | None) -> FakeVmm:
        return self.vmms.pop(0)


class Rig:
    """A _Run of a scenario with fake hosts ``src`` and ``dst`` and a fake VMM for vm0 on ``src``."""

    def __init__(self, scn, nursery: trio.Nursery, src_vmm: FakeVmm):
        self.run = _Run(scn, RunOptions(), nursery)
        self.src, self.dst = FakeHost("src"), FakeHost("dst", "tcp", "sekrit")
        self.run.hosts = {"src": self.src, "dst": self.dst}  # type: ignore[dict-item]
        self.run.host_clients = {"src": self.src.client, "dst": self.dst.client}  # type: ignore[dict-item]
        self.run.procs = {"p": FakeClient("p", self._proc)}  # type: ignore[dict-item]
        self.run.pids = {"p": 100, "vmm:vm0": src_vmm.pid}
        self.run.vmms = {"vm0": src_vmm.client}  # type: ignore[dict-item]
        self.run.vmm_links = {"vm0": src_vmm}  # type: ignore[dict-item]
        self.results: list = []

    @staticmethod
    async def _proc(op, args, ctx):
        return {"process": op}

    async def step(self, st) -> None:
        if isinstance(st, Parallel):
            async with trio.open_nursery() as n:
                for sub in st.steps:
                    n.start_soon(self.run.run_step, sub, self.results)
        else:
            await self.run.run_step(st, self.results)

    async def all(self) -> list:
        for st in self.run.scn.steps:
            await self.step(st)
        return self.results

    def outcome(self, index: str):
        r = next(r for r in self.results if r.index == index)
        return r.outcome, r.value


async def ok_incoming(args, ctx):
    return {"address": "mem:7"}


async def ok_out(args, ctx):
    return {"passes": 2, "pages": 3, "tagged-pages": 1, "stop-pages": 0}


MIGRATE = '[[steps]]\nactor = "vmm:vm0"\nop = "migrate"\nto = "dst"\n'
LDG = '[[steps]]\nactor = "guest:vm0"\nop = "ldg"\naddr = 0x4000_0000\nsize = 16\n'


# ---- parsing ----------------------------------------------------------------------------

class TestParse:
    def test_migrate_args(self):
        """migrate normalises to {to, max_passes, fail, fail_at} with max-passes defaulting to 8."""
        s = scenario(MIGRATE + '[[steps]]\nactor = "vmm:vm0"\nop = "migrate"\nto = "src"\nmax-passes = 0\n'
                     'fail = "cut"\nfail-at = "precopy:2"\n')
        assert s.steps[0].args == {"to": "dst", "max_passes": 8, "fail": None, "fail_at": None}
        assert s.steps[1].args == {"to": "src", "max_passes": 0, "fail": "cut", "fail_at": "precopy:2"}

    def test_migrate_to_an_undeclared_host_is_invalid(self):
        """A migrate to a host the file does not declare is an invalid file naming the step and key 'to'."""
        e = error('[[steps]]\nactor = "vmm:vm0"\nop = "migrate"\nto = "elsewhere"\n')
        assert (e.step, e.key) == (1, "to") and "elsewhere" in e.message

    @pytest.mark.parametrize("extra, key", [('fail = "cut"\n', "fail-at"), ('fail-at = "switchover"\n', "fail"),
                                            ('fail = "boom"\nfail-at = "switchover"\n', "fail"),
                                            ('fail = "cut"\nfail-at = "precopy:0"\n', "fail-at"),
                                            ('fail = "cut"\nfail-at = "later"\n', "fail-at")])
    def test_fail_and_fail_at_go_together(self, extra, key):
        """fail and fail-at are both given or neither, each with a known value."""
        assert error(MIGRATE + extra).key == key

    @pytest.mark.parametrize("op", ["snapshot", "restore"])
    def test_snapshot_needs_name_or_path(self, op):
        """snapshot/restore take exactly one of name and path; a path may hold slashes, a name may not."""
        base = f'[[steps]]\nactor = "vmm:vm0"\nop = "{op}"\n'
        assert scenario(base + 'name = "s1"\n').steps[0].args == {"name": "s1", "path": None}
        assert scenario(base + 'path = "../a/b.snap"\n').steps[0].args == {"name": None, "path": "../a/b.snap"}
        assert error(base).key == "name"
        assert error(base + 'name = "a"\npath = "b"\n').key == "name"
        assert error(base + 'name = "a/b"\n').key == "name"

    def test_kill_and_meminfo(self):
        """kill takes a process or vmm:VM (and an optional host); meminfo takes nothing."""
        s = scenario('[[steps]]\nactor = "host:src"\nop = "kill"\nprocess = "p"\n'
                     '[[steps]]\nactor = "host:dst"\nop = "kill"\nprocess = "vmm:vm0"\n'
                     '[[steps]]\nactor = "host:src"\nop = "kill"\nprocess = "vmm:vm0"\nhost = "dst"\n'
                     '[[steps]]\nactor = "host:dst"\nop = "meminfo"\n')
        assert [st.args for st in s.steps] == [{"process": "p", "host": "src"}, {"process": "vmm:vm0", "host": "dst"},
                                               {"process": "vmm:vm0", "host": "dst"}, {}]
        assert error('[[steps]]\nactor = "host:dst"\nop = "kill"\nprocess = "p"\n').key == "process"
        assert error('[[steps]]\nactor = "host:dst"\nop = "kill"\nprocess = "q"\n').key == "process"
        assert error('[[steps]]\nactor = "host:dst"\nop = "meminfo"\nvm = "vm0"\n').key == "vm"

    def test_host_op_on_a_vm_of_another_host_parses(self):
        """A host op on a VM (or its VMM) declared on another host parses: the VM may have moved (ESRCH if not)."""
        s = scenario('[[steps]]\nactor = "host:dst"\nop = "page-flags"\nvm = "vm0"\nipa = 0x4000_0000\n'
                     '[[steps]]\nactor = "host:dst"\nop = "page-flags"\nprocess = "vmm:vm0"\naddr = 0\n')
        assert s.steps[0].args["vm"] == "vm0" and s.steps[1].args["process"] == "vmm:vm0"


# ---- routing ----------------------------------------------------------------------------

async def test_migrate_to_its_own_host_is_einval(nursery):
    """A migrate to the host the VM runs on is EINVAL and starts no VMM."""
    rig = Rig(scenario('[[steps]]\nactor = "vmm:vm0"\nop = "migrate"\nto = "src"\n'), nursery, FakeVmm("a", 1))
    await rig.all()
    assert rig.outcome("1") == ("EINVAL", None)
    assert rig.run.vmms["vm0"].calls == []


async def test_a_migrated_vm_is_served_by_its_new_vmm(nursery):
    """After an ok migrate the VM's steps go to the destination VMM and the source VMM is stopped and reaped."""
    src = FakeVmm("a", 11, {"migrate-out": ok_out})
    dst = FakeVmm("b", 22, {"migrate-incoming": ok_incoming})
    rig = Rig(scenario(MIGRATE + LDG + '[[steps]]\nactor = "host:dst"\nop = "page-flags"\nvm = "vm0"\n'
                       'ipa = 0x4000_0000\n[[steps]]\nactor = "host:src"\nop = "page-flags"\nvm = "vm0"\n'
                       'ipa = 0x4000_0000\n[[steps]]\nactor = "host:src"\nop = "page-flags"\nprocess = "vmm:vm0"\n'
                       'addr = 0\n[[steps]]\nactor = "host:dst"\nop = "page-flags"\nprocess = "vmm:vm0"\n'
                       'addr = 0\n'), nursery, src)
    rig.dst.vmms.append(dst)
    rig.run.bugs = ("migration-zero-page-drops-tags",)
    await rig.all()
    assert rig.outcome("1") == ("ok", {"passes": 2, "pages": 3, "tagged-pages": 1, "stop-pages": 0})
    op, args, ctx = dst.client.calls[1]
    assert (op, ctx) == ("migrate-incoming", "vmm:vm0/1:dst")
    assert args == {"bugs": ["migration-zero-page-drops-tags"], "fail": None, "fail_at": None, "transport": "tcp"}
    op, args, ctx = src.client.calls[0]
    assert (op, ctx) == ("migrate-out", "vmm:vm0/1")
    assert args == {"address": "mem:7", "secret": "sekrit", "to": "dst", "max_passes": 8, "fail": None,
                    "fail_at": None, "bugs": ["migration-zero-page-drops-tags"]}
    assert src.events == ["stop"] and rig.src.killed == [11] and rig.dst.killed == []
    assert rig.outcome("2") == ("ok", {"served-by": "b"})
    assert rig.outcome("3")[0] == "ok" and rig.outcome("4")[0] == "ESRCH"
    assert rig.outcome("5")[0] == "ESRCH" and rig.outcome("6") == ("ok", {"op": "page-flags", "args": {
        "pid": 22, "addr": 0}})
    assert (rig.run.vm_host["vm0"], rig.run.pids["vmm:vm0"], rig.run.proc_host["vmm:vm0"]) == ("dst", 22, "dst")


async def test_a_failed_migration_leaves_nothing_on_the_destination(nursery):
    """An errno from the source ends the migration: the destination VMM is killed and reaped, the VM stays."""
    async def reset(args, ctx):
        raise RemoteError("ECONNRESET", "cut at precopy:1")

    src = FakeVmm("a", 11, {"migrate-out": reset})
    dst = FakeVmm("b", 22, {"migrate-incoming": ok_incoming})
    rig = Rig(scenario(MIGRATE + LDG), nursery, src)
    rig.dst.vmms.append(dst)
    await rig.all()
    assert rig.outcome("1")[0] == "ECONNRESET"
    assert dst.events == ["start", "kill", "stop"] and rig.dst.killed == [22] and rig.src.killed == []
    assert rig.outcome("2") == ("ok", {"served-by": "a"}) and rig.run.vm_host["vm0"] == "src"


async def test_a_destination_that_refuses_is_the_outcome(nursery):
    """An errno from migrate-incoming (a destination without MTE) is the outcome; the source is not asked."""
    async def refuse(args, ctx):
        raise RemoteError("EINVAL", "the destination refuses KVM_CAP_ARM_MTE")

    src = FakeVmm("a", 11)
    dst = FakeVmm("b", 22, {"migrate-incoming": refuse})
    rig = Rig(scenario(MIGRATE), nursery, src)
    rig.dst.vmms.append(dst)
    await rig.all()
    assert rig.outcome("1")[0] == "EINVAL" and src.client.calls == [] and rig.dst.killed == [22]


async def test_kill_source_leaves_the_vm_nowhere(nursery):
    """kill-source: the source's connection drops, the outcome is ECONNRESET and later VM steps get ESRCH unsent."""
    async def die(args, ctx):
        raise ConnectionClosed("the VMM of vm0 died: killed by SIGKILL")

    src = FakeVmm("a", 11, {"migrate-out": die})
    dst = FakeVmm("b", 22, {"migrate-incoming": ok_incoming})
    rig = Rig(scenario('[[steps]]\nactor = "vmm:vm0"\nop = "migrate"\nto = "dst"\nfail = "kill-source"\n'
                       'fail-at = "switchover"\n' + LDG + '[[steps]]\nactor = "vmm:vm0"\nop = "dma-read"\n'
                       'ipa = 0x4000_0000\nsize = 4\n[[steps]]\nactor = "host:src"\nop = "swap-out"\nvm = "vm0"\n'
                       'ipa = 0x4000_0000\nsize = 4096\n'), nursery, src)
    rig.dst.vmms.append(dst)
    await rig.all()
    assert [rig.outcome(i)[0] for i in "1234"] == ["ECONNRESET", "ESRCH", "ESRCH", "ESRCH"]
    assert len(src.client.calls) == 1 and rig.src.killed == [11] and rig.dst.killed == [22]
    assert "kill" in src.events and "kill" in dst.events


async def test_an_unasked_death_is_an_infrastructure_failure(nursery):
    """A VMM whose connection drops when no step kills or moves it raises (the run exits 3)."""
    async def die(args, ctx):
        raise ConnectionClosed("the VMM of vm0 died: killed by SIGSEGV")

    rig = Rig(scenario(LDG), nursery, FakeVmm("a", 11, {"guest-op": die}))
    with pytest.raises(ConnectionClosed):
        await rig.all()


async def test_a_step_answered_estale_follows_the_vm(nursery):
    """A guest step the source answers ESTALE (the VM moved) is re-sent to the destination once migrate ends."""
    switched = trio.Event()

    async def out(args, ctx):
        switched.set()
        await trio.sleep(0.05)  # the runner updates its routing only once the source answers
        return {"passes": 1, "pages": 1, "tagged-pages": 0, "stop-pages": 0}

    async def stale(args, ctx):
        await switched.wait()
        raise RemoteError("ESTALE", "the VM has migrated to host dst")

    src = FakeVmm("a", 11, {"migrate-out": out, "guest-op": stale})
    dst = FakeVmm("b", 22, {"migrate-incoming": ok_incoming})
    rig = Rig(scenario('[[steps]]\nparallel = [ { actor = "vmm:vm0", op = "migrate", to = "dst" },\n'
                       '  { actor = "guest:vm0", op = "stg", addr = 0x4000_2000, tag = 9, size = 4096 } ]\n'),
              nursery, src)
    rig.dst.vmms.append(dst)
    await rig.all()
    assert rig.outcome("1.1")[0] == "ok" and rig.outcome("1.2") == ("ok", {"served-by": "b"})
    assert [c[0] for c in dst.client.calls] == ["status", "migrate-incoming", "guest-op"]
    assert dst.client.calls[-1][2] == "guest:vm0/1.2"


async def test_a_step_waiting_at_a_killed_switchover_gets_esrch(nursery):
    """A guest step held by a source that kill-source kills ends with ESRCH, not a connection error."""
    held = trio.Event()

    async def die(args, ctx):
        await held.wait()
        raise ConnectionClosed("killed")

    async def hold(args, ctx):
        held.set()
        await trio.sleep(0.05)
        raise ConnectionClosed("killed")

    src = FakeVmm("a", 11, {"migrate-out": die, "guest-op": hold})
    dst = FakeVmm("b", 22, {"migrate-incoming": ok_incoming})
    rig = Rig(scenario('[[steps]]\nparallel = [ { actor = "vmm:vm0", op = "migrate", to = "dst", '
                       'fail = "kill-source", fail-at = "switchover" },\n'
                       '  { actor = "guest:vm0", op = "ldg", addr = 0x4000_2000, size = 16 } ]\n'), nursery, src)
    rig.dst.vmms.append(dst)
    await rig.all()
    assert rig.outcome("1.1")[0] == "ECONNRESET" and rig.outcome("1.2")[0] == "ESRCH"


async def test_kill_after_resume_of_the_source_still_moves_the_vm(nursery):
    """kill-source at after-resume: migrate is ok and the VM runs on the destination."""
    async def die(args, ctx):
        raise ConnectionClosed("killed")

    src = FakeVmm("a", 11, {"migrate-out": die})
    dst = FakeVmm("b", 22, {"migrate-incoming": ok_incoming})
    rig = Rig(scenario('[[steps]]\nactor = "vmm:vm0"\nop = "migrate"\nto = "dst"\nfail = "kill-source"\n'
                       'fail-at = "after-resume"\n' + LDG), nursery, src)
    rig.dst.vmms.append(dst)
    await rig.all()
    assert rig.outcome("1")[0] == "ok" and rig.outcome("2") == ("ok", {"served-by": "b"})


async def test_host_kill_of_a_vmm_and_of_a_process(nursery):
    """kill of vmm:VM kills the VMM and reaps it on its host; later VM and process steps get ESRCH."""
    src = FakeVmm("a", 11)
    rig = Rig(scenario('[[steps]]\nactor = "host:dst"\nop = "kill"\nprocess = "vmm:vm0"\n'
                       '[[steps]]\nactor = "host:src"\nop = "kill"\nprocess = "vmm:vm0"\n' + LDG +
                       '[[steps]]\nactor = "host:src"\nop = "kill"\nprocess = "vmm:vm0"\n'
                       '[[steps]]\nactor = "host:src"\nop = "kill"\nprocess = "p"\n'
                       '[[steps]]\nactor = "p"\nop = "irg"\n'
                       '[[steps]]\nactor = "host:src"\nop = "kill"\nprocess = "p"\n'), nursery, src)
    await rig.all()
    assert [rig.outcome(str(i))[0] for i in range(1, 8)] == ["ESRCH", "ok", "ESRCH", "ESRCH", "ok", "ESRCH", "ESRCH"]
    assert src.events == ["kill", "stop"] and rig.src.killed == [11, 100]
    assert src.client.calls == []


async def test_snapshot_names_and_paths(nursery):
    """A snapshot name is a file in the run's private folder (removed at teardown); a path is relative to the
    scenario's folder."""
    async def snap(args, ctx):
        return args

    src = FakeVmm("a", 11, {"vmm-op": snap})
    rig = Rig(scenario('[[steps]]\nactor = "vmm:vm0"\nop = "snapshot"\nname = "s1"\n'
                       '[[steps]]\nactor = "vmm:vm0"\nop = "restore"\npath = "sub/x.snap"\n'
                       '[[steps]]\nactor = "vmm:vm0"\nop = "restore"\npath = "/abs/y.snap"\n'
                       '[[steps]]\nactor = "vmm:vm0"\nop = "restore"\nname = "s1"\n', path="/scen/dir/m.toml"),
              nursery, src)
    await rig.all()
    named = rig.outcome("1")[1]["args"]["path"]
    assert os.path.isabs(named) and os.path.dirname(named) == rig.run.snapshots and os.path.isdir(named[:-8])
    assert rig.outcome("2")[1] == {"op": "restore", "args": {"path": "/scen/dir/sub/x.snap"}}
    assert rig.outcome("3")[1]["args"]["path"] == "/abs/y.snap"
    assert rig.outcome("4")[1]["args"]["path"] == named
    folder = rig.run.snapshots
    await rig.run.teardown()
    assert folder is not None and not os.path.exists(folder)


# ---- several hosts under one scheduler ----------------------------------------------------

TWO_HOSTS = """
name = "two hosts, one scheduler"
[scheduler]
kind = "random"
seed = 5
[hosts.a]
[hosts.b]
[vms.va]
host = "a"
memory = [ { ipa = 0x4000_0000, size = "1MiB", backing = "memfd" } ]
[vms.vb]
host = "b"
memory = [ { ipa = 0x4000_0000, size = "1MiB", backing = "memfd" } ]

[[steps]]
parallel = [ { actor = "guest:va", op = "enable-mte", tcf = "sync" },
             { actor = "guest:vb", op = "enable-mte", tcf = "sync" } ]
[[steps]]
parallel = [
  { actor = "guest:va", op = "map", va = 0x4000_0000, ipa = 0x4000_0000, size = "64KiB", attr = "tagged" },
  { actor = "guest:vb", op = "map", va = 0x4000_0000, ipa = 0x4000_0000, size = "64KiB", attr = "tagged" },
]
[[steps]]
parallel = [
  { actor = "guest:va", op = "stg", addr = 0x4000_0000, tag = 3, size = 8192 },
  { actor = "guest:vb", op = "stg", addr = 0x4000_0000, tag = 4, size = 8192 },
  { actor = "host:a", op = "swap-out", vm = "va", ipa = 0x4000_0000, size = 8192 },
  { actor = "host:b", op = "migrate-pages", vm = "vb", ipa = 0x4000_0000, size = 8192 },
]
[[steps]]
parallel = [
  { actor = "guest:va", op = "ldg", addr = 0x4000_0000, size = 32, expect = { outcome = "ok", value = 3 } },
  { actor = "guest:vb", op = "ldg", addr = 0x4000_0000, size = 32, expect = { outcome = "ok", value = 4 } },
  { actor = "host:a", op = "meminfo" },
]
"""


async def test_two_hosts_share_one_scheduler_and_replay_exactly():
    """Every host of a controlled run is driven by one scheduler: its schedule names both hosts' contexts and a
    replay of it gives the same outcomes and the same schedule."""
    scn = parse_scenario(tomllib.loads(TWO_HOSTS), "two.toml")
    first = await run_scenario(scn)
    assert first.passed, first.failures
    runs = [first]
    for seed in range(6, 12):  # some seed preempts across hosts
        if "host:b" in runs[-1].schedule and "host:a" in runs[-1].schedule:
            break
        runs.append(await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("random", seed))))
    found = runs[-1]
    assert found.passed and found.schedule
    again = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("replay", None, found.schedule)))
    assert again.passed and again.schedule == found.schedule
    assert [(r.index, r.outcome, r.value) for r in again.steps] == [(r.index, r.outcome, r.value) for r in found.steps]


async def test_hosts_of_one_run_hand_out_distinct_pids():
    """In-process hosts of one run give out pids from distinct ranges (kernel contexts named after pids never meet)."""
    scn = parse_scenario(tomllib.loads(TWO_HOSTS), "two.toml")
    async with trio.open_nursery() as nursery:
        run = _Run(scn, RunOptions(), nursery)
        try:
            await run.setup()
            assert run.pids["vmm:va"] != run.pids["vmm:vb"]
            scheds = {id(link.scheduler) for link in run.hosts.values()}
            assert len(scheds) == 1
        finally:
            await run.teardown()
            nursery.cancel_scope.cancel()


async def test_exhaustive_hunts_walk_several_hosts():
    """A bounded hunt runs on a scenario with two hosts (one scheduler per execution) instead of refusing it."""
    from mtekvm.hunt import hunt

    scn = parse_scenario(tomllib.loads(TWO_HOSTS), "two.toml")
    res = await hunt(scn, "bounded:1", runs=3)
    assert res.passed and res.runs == 3
