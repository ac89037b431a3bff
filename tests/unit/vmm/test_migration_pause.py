"""Part 1 of migration (vmm.machine pause/resume and guest state, vmm.guestram) against the in-process hypervisor."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing
from support import vmm_with_client

from hypervisor.kernel import Kernel
from mtekvm.links import InProcessHost
from shared.errno import EINVAL, ENOSYS, ESTALE
from shared.mte import PAGE_SIZE
from shared.wire import Client, RemoteError
from vmm import guestram
from vmm.machine import Vmm

MiB = 1 << 20
RAM = 0x4000_0000


class Rig:
    """One in-process VMM (built directly, so tests reach its methods) and its control client."""

    def __init__(self, vmm: Vmm, client: Client):
        self.vmm = vmm
        self.client = client

    async def call(self, op: str, /, **args):
        return (await self.client.call(op, args)).value

    async def vmm_op(self, op: str, /, **args):
        return (await self.client.call("vmm-op", {"op": op, "args": args})).value

    async def guest(self, op: str, /, vcpu: int = 0, **args):
        return (await self.client.call("guest-op", {"vcpu": vcpu, "op": op, "args": args})).value

    async def setup(self, memory=None, *, mte: bool = True, vcpus: int = 1) -> dict:
        memory = memory if memory is not None else [{"ipa": RAM, "size": MiB, "backing": "memfd"}]
        return await self.call("vm-setup", name="vm0", mte=mte, vcpus=vcpus, memory=memory)


async def make_rig(nursery: trio.Nursery, host: InProcessHost, name: str = "vm0") -> Rig:
    """A VMM for VM ``name`` on ``host`` with a control client."""
    return Rig(*await vmm_with_client(nursery, host, name))


@pytest.fixture
async def host(nursery):
    h = InProcessHost(nursery, Kernel())
    await h.start()
    return h


@pytest.fixture
async def rig(nursery, host):
    r = await make_rig(nursery, host)
    yield r
    await r.vmm.shutdown()


async def has_mincore(rig: Rig) -> bool:
    """Whether the hypervisor implements the mincore op yet (another engineer adds it)."""
    try:
        await rig.vmm_op("mincore", addr=rig.vmm.slots[0].addr, size=PAGE_SIZE)
    except RemoteError as exc:
        if exc.errno == ENOSYS:
            return False
        raise
    return True


class TestPause:
    async def test_a_guest_op_issued_while_paused_waits_for_resume(self, rig, nursery):
        """A guest-op sent during a pause does not run until resume(), then runs normally."""
        await rig.setup()
        await rig.vmm.pause()
        done = []

        async def store():
            await rig.guest("store", addr=RAM, data=b"abc")
            done.append(True)

        nursery.start_soon(store)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [] and rig.vmm.paused
        await rig.vmm.resume()
        with trio.fail_after(5):
            while not done:
                await trio.sleep(0)
        assert await rig.guest("load", addr=RAM, size=3) == b"abc"

    async def test_pause_waits_for_the_ops_in_flight(self, rig, nursery):
        """pause() returns only once a guest op already running has completed."""
        await rig.setup()
        release = trio.Event()
        real = rig.vmm._guest_call

        async def slow(op, args, ctx):
            if op == "guest-op":
                await release.wait()
            return await real(op, args, ctx)

        rig.vmm._guest_call = slow
        nursery.start_soon(functools.partial(rig.guest, "load", addr=RAM, size=4))
        await trio.testing.wait_all_tasks_blocked()
        paused = []

        async def pause():
            await rig.vmm.pause()
            paused.append(True)

        nursery.start_soon(pause)
        await trio.testing.wait_all_tasks_blocked()
        assert paused == []
        release.set()
        with trio.fail_after(5):
            while not paused:
                await trio.sleep(0)
        await rig.vmm.resume()

    async def test_ops_waiting_when_the_vm_moves_away_fail_estale(self, rig, nursery):
        """A guest op and a vmm op that waited at a pause fail ESTALE naming the host once moved_to is set."""
        await rig.setup()
        await rig.vmm.pause()
        errors = []

        async def attempt(coro_fn, *a, **k):
            try:
                await coro_fn(*a, **k)
            except RemoteError as exc:
                errors.append((exc.errno, exc.message))

        nursery.start_soon(attempt, functools.partial(rig.guest, "load", addr=RAM, size=4))
        nursery.start_soon(attempt, functools.partial(rig.vmm_op, "dma-read", ipa=RAM, size=16))
        await trio.testing.wait_all_tasks_blocked()
        assert errors == []
        rig.vmm.moved_to = "dst"
        await rig.vmm.resume()
        with trio.fail_after(5):
            while len(errors) < 2:
                await trio.sleep(0)
        assert [e for e, _ in errors] == [ESTALE, ESTALE]
        assert all("the VM has migrated to host dst" in m for _, m in errors)

    async def test_migrate_sent_to_a_vmm_directly_is_einval(self, rig):
        """A vmm-op migrate reaching the VMM without the orchestrator is EINVAL saying to use it."""
        await rig.setup()
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("migrate", to="dst")
        assert info.value.errno == EINVAL and "orchestrator" in info.value.message


class TestGuestState:
    async def test_state_moves_registers_stage1_and_irg_sequence(self, nursery, host):
        """Every register, stage 1 and IRG's random state installed in another VM behave identically."""
        a = await make_rig(nursery, host, "a")
        b = await make_rig(nursery, host, "b")
        await a.setup(vcpus=2)
        await b.setup(vcpus=2)
        await a.guest("enable-mte", vcpu=1, tcf="asymm", include=0x00F0)
        await a.guest("tco", vcpu=1, on=True)
        await a.guest("map", va=0x10_0000, ipa=RAM, size=8 * PAGE_SIZE, attr="tagged")
        await a.guest("irg", vcpu=1)
        state = await a.vmm.guest_state(None)
        assert set(state["vcpus"]) == {"0", "1"}
        v1 = state["vcpus"]["1"]
        assert (v1["sctlr_ata"], v1["tcf"], v1["gcr_excl"], v1["pstate_tco"]) == (True, "asymm", 0xFF0F, True)
        assert state["stage1"] == [[0x10_0000, 8 * PAGE_SIZE, RAM, "tagged"]]
        await b.vmm.set_guest_state(state, None)
        assert await b.vmm.guest_state(None) == state
        seq_a = [await a.guest("irg", vcpu=1) for _ in range(8)]
        seq_b = [await b.guest("irg", vcpu=1) for _ in range(8)]
        assert seq_a == seq_b and all(4 <= t <= 7 for t in seq_a)
        await a.vmm.shutdown()
        await b.vmm.shutdown()

    async def test_a_malformed_state_is_einval_and_changes_nothing(self, rig):
        """vcpu-state-set with a bad register value is EINVAL and the vCPU keeps its registers."""
        await rig.setup()
        before = await rig.vmm.guest_state(None)
        bad = {"vcpus": {"0": {**before["vcpus"]["0"], "tcf": "bogus"}}, "stage1": []}
        with pytest.raises(RemoteError) as info:
            await rig.vmm.set_guest_state(bad, None)
        assert info.value.errno == EINVAL
        assert await rig.vmm.guest_state(None) == before


class TestGuestRam:
    async def test_ram_slots_record_backings_of_setup_and_forwarded_mmaps(self, nursery, host):
        """ram_slots gives each slot the backing of the VMM mapping behind it, for vm-setup and manual VMs."""
        a = await make_rig(nursery, host, "a")
        await a.setup([{"ipa": RAM, "size": MiB, "backing": "memfd", "object": "shared0", "prot_mte": True},
                       {"ipa": RAM + 4 * MiB, "size": 4 * MiB, "backing": "hugetlb", "hugepage_size": 2 * MiB}])
        slots = guestram.ram_slots(a.vmm)
        assert [(s.slot, s.backing, s.object, s.prot_mte) for s in slots] == [
            (0, "memfd", "shared0", True), (1, "hugetlb", None, False)]
        assert slots[1].hugepage_size == 2 * MiB
        b = await make_rig(nursery, host, "b")
        await b.call("vm-create", name="b")
        hva = await b.vmm_op("mmap", size=2 * MiB, prot=["read", "write", "mte"], share="shared", backing="shmem")
        await b.vmm_op("set-memory-region", slot=3, ipa=RAM, size=MiB, addr=hva + MiB)
        (s,) = guestram.ram_slots(b.vmm)
        assert (s.slot, s.backing, s.prot_mte, s.offset, s.addr) == (3, "shmem", True, MiB, hva + MiB)
        await b.vmm_op("munmap", addr=hva, size=2 * MiB)
        assert b.vmm.mappings == []
        await a.vmm.shutdown()
        await b.vmm.shutdown()

    async def test_read_then_write_pages_copies_data_and_tags(self, nursery, host):
        """read_pages of one VM written with write_pages into another gives the same bytes and tags."""
        a = await make_rig(nursery, host, "a")
        b = await make_rig(nursery, host, "b")
        for r in (a, b):
            await r.setup()
            await r.guest("enable-mte", tcf="sync")
            await r.guest("map", va=RAM, ipa=RAM, size=MiB, attr="tagged")
        await a.guest("stg", addr=RAM + 3 * PAGE_SIZE, tag=5, size=PAGE_SIZE)
        await a.guest("store", addr=RAM + 3 * PAGE_SIZE + 16, tag=5, data=b"hello")
        await a.guest("stg", addr=RAM + 9 * PAGE_SIZE, tag=11, size=32)  # all-zero data, tagged
        (slot,) = guestram.ram_slots(a.vmm)
        resident = await has_mincore(a)
        runs = await guestram.read_pages(a.vmm, slot, 0, slot.pages, None, tags=True, resident_only=resident)
        if resident:
            assert sum(r.pages for r in runs) < slot.pages  # untouched pages are skipped
        (bslot,) = guestram.ram_slots(b.vmm)
        await guestram.write_pages(b.vmm, bslot, runs, None)
        assert await b.guest("load", addr=RAM + 3 * PAGE_SIZE + 16, tag=5, size=5) == b"hello"
        assert await b.guest("ldg", addr=RAM + 3 * PAGE_SIZE, size=32) == [5, 5]
        assert await b.guest("ldg", addr=RAM + 9 * PAGE_SIZE, size=48) == [11, 11, 0]
        await a.vmm.shutdown()
        await b.vmm.shutdown()

    def test_resident_runs_and_page_runs(self):
        """mincore vectors and dirty page lists become (first, count) runs."""
        assert guestram.resident_runs(b"\x00\x01\x01\x00\x01", 10) == [(11, 2), (14, 1)]
        assert guestram.page_runs([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]
