"""End-to-end: ``python -m vmm`` and ``python -m guest`` processes against a real ``python -m hypervisor``.

Each test starts its own hypervisor (``fresh_hypervisor``, for clean
statistics) and drives one or more VMM processes through
:class:`mtekvm.links.ProcessVmm`, the way the scenario runner does. Guests are
real processes the VMM spawns; tests find them as the VMM process's children
to kill them from outside, as an OOM killer or an operator would.
"""

from __future__ import annotations

import os
import signal
import stat
from contextlib import asynccontextmanager

import pytest
import trio

from mtekvm.links import HostStartError, ProcessVmm
from shared.errno import ESRCH
from shared.mte import PAGE_SIZE
from shared.wire import RemoteError

MiB = 1 << 20
RAM = 0x4000_0000
WAIT = 20  # seconds a process may take to start, die or be cleaned up after


def children(pid: int) -> list[int]:
    """The pids of a process's live children (/proc/PID/task/*/children: trio forks from a worker thread)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return [p for p in out if not gone(p)]


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


async def until(pred, what: str):
    """Poll ``pred()`` (sync or async) until it is true; fail the test after WAIT seconds."""
    with trio.move_on_after(WAIT):
        while True:
            value = pred()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(0.02)
    pytest.fail(f"timed out waiting until {what}")


@asynccontextmanager
async def running_vmm(nursery, hv, name: str = "vm0", session: str = "e2e"):
    """A started ProcessVmm on ``hv`` and a control client; stopped afterwards."""
    link = ProcessVmm(nursery, hv.address, hv.secret, name, session)
    await link.start()
    client = await link.connect()
    try:
        yield link, client
    finally:
        with trio.CancelScope(shield=True):
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - the VMM may be dead already
                pass
            await link.stop()


async def setup_tagged_guest(client) -> dict:
    """vm-setup an MTE VM with 1 MiB of memfd RAM; turn MTE on in the guest and map 64 KiB tagged."""
    info = (await client.call("vm-setup", {"name": "vm0", "mte": True, "vcpus": 1,
                                           "memory": [{"ipa": RAM, "size": MiB, "backing": "memfd"}]})).value
    await guest(client, "enable-mte", tcf="sync")
    await guest(client, "map", va=RAM, ipa=RAM, size=64 * 1024, attr="tagged")
    return info


async def guest(client, op: str, /, vcpu: int = 0, **args):
    return await client.call("guest-op", {"vcpu": vcpu, "op": op, "args": args})


async def guest_pid(link: ProcessVmm) -> int:
    """The OS pid of the VMM's guest process."""
    kids = await until(lambda: children(link.process.pid), "the VMM has a guest process")
    assert len(kids) == 1, kids
    return kids[0]


class TestVmmProcess:
    async def test_setup_and_tagged_guest_accesses(self, nursery, fresh_hypervisor):
        """A VMM process builds an MTE VM whose guest process stores and loads tags, and faults on a mismatch."""
        async with running_vmm(nursery, fresh_hypervisor) as (link, client):
            assert stat.S_IMODE(os.stat(link.address[5:]).st_mode) == 0o600
            info = await setup_tagged_guest(client)
            assert info["vcpus"] == [0]
            await guest(client, "stg", addr=RAM + PAGE_SIZE, tag=5, size=64)
            assert (await guest(client, "ldg", addr=RAM + PAGE_SIZE, size=64)).value == [5, 5, 5, 5]
            await guest(client, "store", addr=RAM + PAGE_SIZE, tag=5, data=b"tagged")
            assert (await guest(client, "load", addr=RAM + PAGE_SIZE, tag=5, size=6)).value == b"tagged"
            bad = await guest(client, "store", addr=RAM + PAGE_SIZE + 16, tag=6, data=b"x")
            assert bad.fault is not None and bad.fault["kind"] == "tag-check-fault"
            dump = (await client.call("vmm-op", {"op": "copy-tags", "args": {
                "ipa": RAM + PAGE_SIZE, "length": PAGE_SIZE, "direction": "from-guest"}})).value
            assert dump["tags"][:5] == [5, 5, 5, 5, 0]
            st = (await client.call("status")).value
            assert st["guest"]["state"] == "running" and st["vm"] == info["vm"]
            assert len(children(link.process.pid)) == 1
            assert (await fresh_hypervisor.stats())["vms"] == 1

    async def test_sigkilled_guest_is_reported_and_the_vm_torn_down(self, nursery, fresh_hypervisor):
        """SIGKILL to the guest process: the VMM reports it, destroys the VM, and the hypervisor serves a new VMM."""
        hv = fresh_hypervisor
        async with running_vmm(nursery, hv) as (link, client):
            await setup_tagged_guest(client)
            pid = await guest_pid(link)
            os.kill(pid, signal.SIGKILL)

            async def exited():
                return (await client.call("status")).value["guest"]["state"] == "exited"

            await until(exited, "the VMM noticed its guest died")
            st = (await client.call("status")).value
            assert st["guest"]["detail"] == "killed by SIGKILL" and st["vm"] is None
            assert st["exits"][-1] == {"kind": "guest-exit", "detail": "killed by SIGKILL"}
            with pytest.raises(RemoteError) as info:
                await guest(client, "irg")
            assert info.value.errno == ESRCH and "SIGKILL" in info.value.message
            stats = await hv.wait_stats(lambda s: s["vms"] == 0)
            assert stats["vms"] == 0 and stats["tasks"] == 1  # the VMM process itself lives on
            assert (await client.call("vmm-op", {"op": "mmap", "args": {"size": 4096}})).value > 0
        async with running_vmm(nursery, hv, "vm1") as (_, client2):
            await setup_tagged_guest(client2)
            await guest(client2, "stg", addr=RAM, tag=2, size=16)
            assert (await guest(client2, "ldg", addr=RAM, size=16)).value == [2]
        await hv.assert_healthy()

    async def test_kill_guest_request_sigkills_the_guest_process(self, nursery, fresh_hypervisor):
        """kill-guest SIGKILLs the guest process and answers once the VM is torn down."""
        async with running_vmm(nursery, fresh_hypervisor) as (link, client):
            await setup_tagged_guest(client)
            pid = await guest_pid(link)
            assert (await client.call("kill-guest")).value == {"detail": "killed by SIGKILL"}
            assert gone(pid)
            assert (await fresh_hypervisor.stats())["vms"] == 0

    async def test_sigkilled_vmm_is_cleaned_up_by_the_hypervisor(self, nursery, fresh_hypervisor):
        """SIGKILL to the VMM: the hypervisor destroys its VM and process, its guest exits, others are served."""
        hv = fresh_hypervisor
        async with running_vmm(nursery, hv) as (link, client):
            await setup_tagged_guest(client)
            pid = await guest_pid(link)
            assert (await hv.stats())["vms"] == 1
            link.process.kill()
            await link.process.wait()
            assert link.process.returncode == -signal.SIGKILL
            stats = await hv.wait_stats(lambda s: s["vms"] == 0 and s["tasks"] == 0)
            assert stats["vms"] == 0 and stats["tasks"] == 0
            await until(lambda: gone(pid), "the orphaned guest exited")
            await hv.assert_healthy()
        async with running_vmm(nursery, hv, "vm1") as (_, client2):
            await setup_tagged_guest(client2)
            assert (await guest(client2, "ldg", addr=RAM, size=32)).value == [0, 0]

    async def test_shutdown_exits_cleanly(self, nursery, fresh_hypervisor):
        """shutdown (what ProcessVmm.stop sends) destroys the VM, ends the guest, exits 0, removes the socket."""
        hv = fresh_hypervisor
        link = ProcessVmm(nursery, hv.address, hv.secret, "vm0", "e2e")
        await link.start()
        process, path = link.process, link.address[5:]
        client = await link.connect()
        await setup_tagged_guest(client)
        pid = await guest_pid(link)
        await client.aclose()
        await link.stop()
        assert process.returncode == 0, link.log()
        assert not os.path.exists(path)
        await until(lambda: gone(pid), "the guest exited")
        stats = await hv.wait_stats(lambda s: s["vms"] == 0 and s["tasks"] == 0)
        assert stats["vms"] == 0 and stats["tasks"] == 0

    async def test_sigterm_tears_the_vm_down(self, nursery, fresh_hypervisor):
        """SIGTERM makes the VMM destroy its VM and stop its guest before exiting 0."""
        hv = fresh_hypervisor
        async with running_vmm(nursery, hv) as (link, client):
            await setup_tagged_guest(client)
            pid = await guest_pid(link)
            link.process.terminate()
            with trio.fail_after(WAIT):
                await link.process.wait()
            assert link.process.returncode == 0, link.log()
            await until(lambda: gone(pid), "the guest exited")
            stats = await hv.wait_stats(lambda s: s["vms"] == 0 and s["tasks"] == 0)
            assert stats["vms"] == 0

    async def test_wrong_secret_fails_to_start(self, nursery, fresh_hypervisor):
        """A VMM that presents the wrong secret exits and says why; the hypervisor is unaffected."""
        link = ProcessVmm(nursery, fresh_hypervisor.address, "not-the-secret", "vm0", "e2e")
        with pytest.raises(HostStartError) as info:
            await link.start()
        assert "secret" in str(info.value)
        await fresh_hypervisor.assert_healthy()
