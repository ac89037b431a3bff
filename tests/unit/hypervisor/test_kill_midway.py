"""A SIGKILL never cuts a syscall in half: the killed process's ioctls in flight finish before do_exit()."""

from __future__ import annotations

import trio
import trio.testing
from support import invariants

from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.kernel import Kernel
from hypervisor.sched.core import FreeScheduler
from hypervisor.server import Hypervisor
from shared import wire

PAGE = 4096
IPA = 0x4000_0000
GATE = "kvm_vm_ioctl_mte_copy_tags:copy"  # between try_page_mte_tagging() and set_page_mte_tagged()


class GatedScheduler(FreeScheduler):
    """The free scheduler with a scripted stop: the first context to reach GATE parks there until opened.

    Its kind is not "free", so that COPY_TAGS takes its page-by-page path (the one with GATE) and each
    request runs in a task of its own, as under a controlled scheduler.
    """

    kind = "gated"

    def __init__(self):
        super().__init__()
        self.reached = trio.Event()
        self.gate = trio.Event()

    async def point(self, label: str) -> None:
        if label == GATE and not self.reached.is_set():
            self.reached.set()
            await self.gate.wait()
        await super().point(label)


class Client:
    """One framed connection to the hypervisor, one request at a time or sent ahead."""

    def __init__(self, stream):
        self.f = wire.FramedStream(stream)
        self.id = 0

    async def send(self, op: str, **args) -> int:
        self.id += 1
        await self.f.send(wire.request(self.id, op, args))
        return self.id

    async def call(self, op: str, **args):
        await self.send(op, **args)
        reply = await self.f.receive()
        assert reply["ok"], reply
        return reply["value"]


async def _vmm_and_admin(hv: Hypervisor, nursery: trio.Nursery) -> tuple[Client, Client, int, int]:
    """A VMM process with an MTE VM of one page of guest RAM, and a host (admin) connection."""
    a, b = trio.testing.memory_stream_pair()
    c, d = trio.testing.memory_stream_pair()
    nursery.start_soon(hv.serve, b)
    nursery.start_soon(hv.serve, d)
    vmm, admin = Client(a), Client(c)
    pid = (await vmm.call("hello", role="process", name="vmm:dst"))["pid"]
    vm = await vmm.call("kvm-create-vm", ipa_bits=40)
    await vmm.call("kvm-enable-cap", vm=vm, cap="arm-mte")
    hva = await vmm.call("mmap", addr=None, size=PAGE, prot=["read", "write"], share="private",
                         backing="anon", object=None)
    await vmm.call("kvm-set-memory-region", vm=vm, slot=0, ipa=IPA, size=PAGE, addr=hva, flags=[])
    await admin.call("hello", role="host")
    return vmm, admin, pid, vm


class TestKillMidway:
    async def test_kill_lets_copy_tags_in_flight_reach_set_page_mte_tagged(self):
        """A kill while COPY_TAGS TO_GUEST is parked after try_page_mte_tagging() leaves no PG_mte_lock page
        without PG_mte_tagged: the ioctl finishes (and replies) before the exit destroys the VM."""
        sched = GatedScheduler()
        k = Kernel(sched=sched)
        hv = Hypervisor(k)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                vmm, admin, pid, vm = await _vmm_and_admin(hv, nursery)
                await vmm.send("kvm-copy-tags", vm=vm, guest_ipa=IPA, length=PAGE, flags=0, reserved=[0, 0],
                               tags=bytes([5]) * (PAGE // 16))
                await sched.reached.wait()
                kvm = k.kvm.vms[vm]
                page = k.tasks[pid].mm.pt[next(iter(k.tasks[pid].mm.pt))].page
                assert page.folio.flags & PG_mte_lock and not page.folio.flags & PG_mte_tagged
                await admin.send("kill", pid=pid)
                await trio.testing.wait_all_tasks_blocked()
                assert k.tasks[pid].sigkill and not kvm.destroyed  # the exit waits for the ioctl
                sched.gate.set()
                assert (await admin.f.receive())["ok"]
                assert kvm.destroyed and pid not in k.tasks
                assert page.folio.flags & PG_mte_tagged or not page.folio.flags & PG_mte_lock
                assert invariants(k) == []
                await admin.f.stream.aclose()
                await hv.wait_idle()
                nursery.cancel_scope.cancel()

    async def test_requests_after_the_kill_get_esrch(self):
        """Once a kill is pending (its exit waiting for an ioctl in flight), a new request of the process
        gets ESRCH rather than entering the kernel."""
        sched = GatedScheduler()
        k = Kernel(sched=sched)
        hv = Hypervisor(k)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                vmm, admin, pid, vm = await _vmm_and_admin(hv, nursery)
                await vmm.send("kvm-copy-tags", vm=vm, guest_ipa=IPA, length=PAGE, flags=0, reserved=[0, 0],
                               tags=bytes([5]) * (PAGE // 16))
                await sched.reached.wait()
                page = k.tasks[pid].mm.pt[next(iter(k.tasks[pid].mm.pt))].page
                await admin.send("kill", pid=pid)
                await trio.testing.wait_all_tasks_blocked()
                late = await vmm.send("mincore", addr=0x1000, size=PAGE)
                await trio.testing.wait_all_tasks_blocked()
                replies = {}
                sched.gate.set()
                try:
                    while True:
                        r = await vmm.f.receive()
                        replies[r["id"]] = r
                except wire.ConnectionClosed:
                    pass
                assert replies[late]["err"] == "ESRCH"
                # the ioctl ran to its end (its reply may be lost with the killed process's socket, as in Linux)
                assert page.folio.flags & PG_mte_tagged or not page.folio.flags & PG_mte_lock
                assert invariants(k) == []
                assert (await admin.f.receive())["ok"]
                await admin.f.stream.aclose()
                await hv.wait_idle()
                nursery.cancel_scope.cancel()
