"""Unit tests for the VMM (vmm.machine, vmm.dma, vmm.guestlink) against the real in-process hypervisor.

Every test drives an :class:`mtekvm.links.InProcessVmm` through its control
channel, as the scenario runner does; the VMM talks to a real
:class:`hypervisor.server.Hypervisor` (through :class:`mtekvm.links.InProcessHost`)
and runs a real :class:`guest.agent.GuestAgent` in-process.
"""

from __future__ import annotations

import pytest
import trio

from hypervisor.kernel import Kernel
from mtekvm.links import InProcessHost, InProcessVmm
from shared.abi import MAX_IO
from shared.errno import EBUSY, EEXIST, EFAULT, EINVAL, ENODEV, ENOSYS, ESRCH
from shared.mte import PAGE_SIZE
from shared.wire import Client, RemoteError
from vmm.dma import MMIO_BASE, REG_CMD, REG_DST, REG_FILL, REG_LEN, REG_STATUS, DmaDevice, Memslot, translate
from vmm.machine import Vmm, VmmError

MiB = 1 << 20
RAM = 0x4000_0000
CHUNK = 2 * PAGE_SIZE  # a small COPY_TAGS chunk so splitting shows on small guests


class Rig:
    """One in-process hypervisor, one VMM for VM ``vm0``, and its control client."""

    def __init__(self, host: InProcessHost, link: InProcessVmm, client: Client):
        self.host = host
        self.link = link
        self.client = client

    @property
    def vmm(self) -> Vmm:
        return self.link.vmm

    async def call(self, op: str, /, **args):
        return (await self.client.call(op, args)).value

    async def vmm_op(self, op: str, /, **args):
        return (await self.client.call("vmm-op", {"op": op, "args": args})).value

    async def guest(self, op: str, /, vcpu: int = 0, **args):
        return (await self.client.call("guest-op", {"vcpu": vcpu, "op": op, "args": args})).value

    async def setup(self, memory=None, *, mte: bool = True, vcpus: int = 1) -> dict:
        memory = memory if memory is not None else [{"ipa": RAM, "size": MiB, "backing": "memfd"}]
        return await self.call("vm-setup", name="vm0", mte=mte, vcpus=vcpus, memory=memory)

    async def stats(self) -> dict:
        host, _ = await self.host.connect("host")
        try:
            return (await host.call("stats")).value
        finally:
            await host.aclose()

    async def fails(self, errno: int, op: str, /, **args) -> RemoteError:
        with pytest.raises(RemoteError) as info:
            await self.client.call(op, args)
        assert info.value.errno == errno, f"{op}: wanted errno {errno}, got {info.value}"
        return info.value


@pytest.fixture
async def rig(nursery):
    host = InProcessHost(nursery, Kernel())
    await host.start()
    link = InProcessVmm(nursery, host, "vm0", "unit", copy_chunk=CHUNK)
    await link.start()
    client = await link.connect()
    yield Rig(host, link, client)
    await link.stop()


async def tagged_guest(rig: Rig, size: int = 64 * 1024) -> None:
    """Set up an MTE VM whose guest has MTE on (sync) and ``size`` bytes at RAM mapped tagged."""
    await rig.setup()
    await rig.guest("enable-mte", tcf="sync")
    await rig.guest("map", va=RAM, ipa=RAM, size=size, attr="tagged")


class TestVmSetup:
    async def test_setup_builds_an_mte_vm_whose_guest_runs_tagged_accesses(self, rig):
        """vm-setup with mte creates the VM, maps RAM, registers the slot and starts a guest that can STG/LDG."""
        info = await rig.setup()
        assert info["vcpus"] == [0] and info["pid"] == rig.vmm.pid
        assert info["memory"] == [{"slot": 0, "ipa": RAM, "size": MiB, "hva": info["memory"][0]["hva"]}]
        await rig.guest("enable-mte", tcf="sync")
        await rig.guest("map", va=RAM, ipa=RAM, size=4096, attr="tagged")
        await rig.guest("stg", addr=RAM + 32, tag=7, size=32)
        assert await rig.guest("ldg", addr=RAM, size=64) == [0, 0, 7, 7]
        st = await rig.call("status")
        assert st["vm"] == info["vm"] and st["pid"] == info["pid"]
        assert st["guest"] == {"state": "running", "detail": ""}
        assert (await rig.stats())["vms"] == 1

    async def test_ipa_to_hva_uses_the_memslots(self, rig):
        """ipa-to-hva returns the VMM's pid and the address backing the IPA; an IPA in no slot is EFAULT."""
        info = await rig.setup()
        hva = info["memory"][0]["hva"]
        assert await rig.call("ipa-to-hva", ipa=RAM + 0x1234) == {"pid": info["pid"], "hva": hva + 0x1234}
        await rig.fails(EFAULT, "ipa-to-hva", ipa=RAM + MiB)

    async def test_mte_vm_with_a_file_memslot_is_refused_and_torn_down(self, rig):
        """An MTE VM cannot have a regular-file memslot: vm-setup fails with EINVAL and leaves no VM behind."""
        err = await rig.fails(EINVAL, "vm-setup", name="vm0", mte=True, vcpus=1,
                              memory=[{"ipa": RAM, "size": MiB, "backing": "file"}])
        assert err.errno == EINVAL
        assert (await rig.call("status"))["vm"] is None
        assert (await rig.stats())["vms"] == 0

    async def test_non_mte_vm_accepts_a_file_memslot_and_its_guest_cannot_enable_mte(self, rig):
        """Without the cap a file memslot is fine, and the guest sees no MTE (enable-mte is refused)."""
        await rig.setup([{"ipa": RAM, "size": MiB, "backing": "file"}], mte=False)
        with pytest.raises(RemoteError):
            await rig.guest("enable-mte", tcf="sync")

    async def test_manual_setup_with_vmm_ops(self, rig):
        """vm-create plus check-extension, enable-cap, mmap, set-memory-region and create-vcpu build a working VM."""
        vm = await rig.call("vm-create", name="vm0", ipa_bits=40)
        assert isinstance(vm, int)
        assert await rig.vmm_op("check-extension", cap="arm-mte") == 1
        await rig.vmm_op("enable-cap", cap="arm-mte")
        hva = await rig.vmm_op("mmap", size=MiB, prot=["read", "write"], share="shared", backing="memfd")
        await rig.vmm_op("set-memory-region", slot=0, ipa=RAM, size=MiB, addr=hva)
        assert await rig.vmm_op("create-vcpu") == 0
        assert await rig.vmm_op("create-vcpu") == 1
        await rig.guest("enable-mte", vcpu=1, tcf="sync")
        await rig.guest("map", vcpu=1, va=RAM, ipa=RAM, size=4096, attr="tagged")
        await rig.guest("stg", vcpu=1, addr=RAM, tag=3, size=16)
        assert await rig.guest("ldg", vcpu=1, addr=RAM, size=16) == [3]
        assert await rig.call("ipa-to-hva", ipa=RAM) == {"pid": rig.vmm.pid, "hva": hva}

    async def test_enable_cap_after_a_vcpu_is_einval(self, rig):
        """KVM_CAP_ARM_MTE after KVM_CREATE_VCPU is refused with the kernel's EINVAL."""
        await rig.call("vm-create", name="vm0")
        await rig.vmm_op("create-vcpu")
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("enable-cap", cap="arm-mte")
        assert info.value.errno == EINVAL

    async def test_guest_op_without_a_vcpu_is_enodev(self, rig):
        """A guest op before any vCPU exists (or on a vCPU that does not) fails with ENODEV."""
        await rig.fails(ENODEV, "guest-op", vcpu=0, op="irg")
        await rig.call("vm-create", name="vm0")
        await rig.fails(ENODEV, "guest-op", vcpu=0, op="irg")
        await rig.vmm_op("create-vcpu")
        await rig.fails(ENODEV, "guest-op", vcpu=1, op="irg")

    async def test_kvm_op_without_a_vm_is_enodev_and_a_second_vm_is_eexist(self, rig):
        """KVM ops need the VM first (ENODEV); a VMM runs one VM (EEXIST for a second)."""
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("create-vcpu")
        assert info.value.errno == ENODEV
        await rig.call("vm-create", name="vm0")
        await rig.fails(EEXIST, "vm-create", name="vm0")

    async def test_unknown_vmm_op_and_bad_arguments(self, rig):
        """An unknown VMM op is ENOSYS; a KVM op with an unknown argument is EINVAL."""
        await rig.fails(ENOSYS, "vmm-op", op="reboot", args={})
        await rig.call("vm-create", name="vm0")
        await rig.fails(EINVAL, "vmm-op", op="create-vcpu", args={"vm": 1})

    async def test_host_process_ops_act_on_the_vmm_address_space(self, rig):
        """Host-process ops through vmm-op run in the VMM's own process (its pid, its mappings)."""
        await rig.call("vm-create", name="vm0")
        addr = await rig.vmm_op("mmap", size=4096, prot=["read", "write", "mte"])
        await rig.vmm_op("stg", addr=addr, tag=9, size=16)
        assert list(await rig.vmm_op("ldg", addr=addr, size=16)) == [9]
        assert (await rig.vmm_op("prctl-get"))["tcf"] == "none"


class TestCopyTags:
    async def spy(self, rig) -> list:
        """Record the VMM's hypervisor calls (op, args)."""
        calls = []
        real = rig.vmm.hv.call

        async def call(op, args=None, ctx=None):
            calls.append((op, dict(args or {})))
            return await real(op, args, ctx=ctx)

        rig.vmm.hv.call = call
        return calls

    async def test_from_guest_dump_is_split_into_chunks_and_joined(self, rig):
        """A FROM_GUEST dump larger than a chunk is issued chunk by chunk and the tags come back in order."""
        await tagged_guest(rig)
        for page in range(5):
            await rig.guest("stg", addr=RAM + page * PAGE_SIZE, tag=page + 1, size=16)
        calls = await self.spy(rig)
        res = await rig.vmm_op("copy-tags", ipa=RAM, length=5 * PAGE_SIZE, direction="from-guest")
        assert res["length"] == 5 * PAGE_SIZE
        tags = res["tags"]
        assert len(tags) == 5 * PAGE_SIZE // 16
        assert [tags[p * 256] for p in range(5)] == [1, 2, 3, 4, 5]
        assert tags[1] == 0
        sent = [(a["guest_ipa"], a["length"], a["flags"]) for op, a in calls if op == "kvm-copy-tags"]
        assert sent == [(RAM, CHUNK, 1), (RAM + CHUNK, CHUNK, 1), (RAM + 2 * CHUNK, PAGE_SIZE, 1)]

    async def test_to_guest_chunks_carry_their_slice_of_the_buffer(self, rig):
        """A TO_GUEST restore split in chunks writes each page's own tags (read back FROM_GUEST)."""
        await rig.setup()
        want = [(i // 256) % 16 for i in range(3 * 256)]
        res = await rig.vmm_op("copy-tags", ipa=RAM, length=3 * PAGE_SIZE, direction="to-guest", tags=want)
        assert res == {"length": 3 * PAGE_SIZE}
        back = await rig.vmm_op("copy-tags", ipa=RAM, length=3 * PAGE_SIZE, direction="from-guest")
        assert back["tags"] == want

    async def test_to_guest_single_tag_means_every_granule(self, rig):
        """A single integer for to-guest tags sets that tag on every granule of the range."""
        await rig.setup()
        await rig.vmm_op("copy-tags", ipa=RAM, length=PAGE_SIZE, direction="to-guest", tags=6)
        back = await rig.vmm_op("copy-tags", ipa=RAM, length=PAGE_SIZE, direction="from-guest")
        assert back["tags"] == [6] * 256

    async def test_error_on_a_later_chunk_keeps_the_partial_length(self, rig):
        """When a later chunk fails (past the memslot's end) the bytes already done are returned, not the errno."""
        await rig.setup([{"ipa": RAM, "size": 4 * PAGE_SIZE, "backing": "memfd"}])
        res = await rig.vmm_op("copy-tags", ipa=RAM, length=6 * PAGE_SIZE, direction="from-guest")
        assert res["length"] == 4 * PAGE_SIZE and len(res["tags"]) == 4 * 256

    async def test_short_chunk_stops_the_copy(self, rig):
        """A chunk that comes back short (the slot ends inside it) ends the copy at that point."""
        await rig.setup([{"ipa": RAM, "size": 3 * PAGE_SIZE, "backing": "memfd"}])
        calls = await self.spy(rig)
        res = await rig.vmm_op("copy-tags", ipa=RAM, length=8 * PAGE_SIZE, direction="from-guest")
        assert res["length"] == 3 * PAGE_SIZE
        assert len([c for c in calls if c[0] == "kvm-copy-tags"]) == 2

    async def test_short_to_guest_buffer_faults_after_the_pages_it_covers(self, rig):
        """A to-guest tag list shorter than length/16 acts as a buffer that ends there: partial length."""
        await rig.setup()
        res = await rig.vmm_op("copy-tags", ipa=RAM, length=4 * PAGE_SIZE, direction="to-guest",
                               tags=[1] * (3 * 256 + 10))
        assert res == {"length": 3 * PAGE_SIZE}

    async def test_first_chunk_error_is_the_answer(self, rig):
        """An IPA in no memslot fails the whole copy with EFAULT."""
        await rig.setup()
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("copy-tags", ipa=RAM + MiB, length=4 * PAGE_SIZE, direction="from-guest")
        assert info.value.errno == EFAULT

    @pytest.mark.parametrize("args", [
        {"ipa": RAM + 16, "length": PAGE_SIZE},
        {"ipa": RAM, "length": PAGE_SIZE + 16},
        {"ipa": RAM, "length": PAGE_SIZE, "flags": 2},
        {"ipa": RAM, "length": PAGE_SIZE, "reserved": [0, 1]},
    ])
    async def test_bad_requests_go_whole_to_the_kernel_and_get_einval(self, rig, args):
        """Unaligned, unknown-flag and reserved-field requests are sent unsplit and the kernel says EINVAL."""
        await rig.setup()
        calls = await self.spy(rig)
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("copy-tags", direction="from-guest", **args)
        assert info.value.errno == EINVAL
        assert len([c for c in calls if c[0] == "kvm-copy-tags"]) == 1

    async def test_huge_to_guest_length_is_einval_without_building_the_buffer(self, rig):
        """A to-guest length over INT_MAX with one tag goes to the kernel as is (EINVAL), never expanded whole."""
        await rig.setup()
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("copy-tags", ipa=RAM, length=1 << 44, direction="to-guest", tags=3)
        assert info.value.errno == EINVAL

    async def test_copy_tags_on_a_vm_without_mte_is_einval(self, rig):
        """COPY_TAGS on a VM without the MTE cap is the kernel's EINVAL."""
        await rig.setup(mte=False)
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("copy-tags", ipa=RAM, length=PAGE_SIZE, direction="from-guest")
        assert info.value.errno == EINVAL

    async def test_default_chunk_is_what_one_reply_can_carry(self):
        """By default a chunk covers MAX_IO tags, i.e. MAX_IO * 16 bytes of guest memory."""
        vmm = Vmm(None, None, name="x", session=None)
        assert vmm.copy_chunk == MAX_IO * 16
        with pytest.raises(ValueError):
            Vmm(None, None, name="x", session=None, copy_chunk=PAGE_SIZE + 1)


class TestDma:
    async def test_dma_write_and_read_go_through_the_vmm_mapping_without_tag_checks(self, rig):
        """Device DMA into tagged guest memory is not tag checked and leaves the tags alone."""
        await tagged_guest(rig)
        await rig.guest("stg", addr=RAM, tag=5, size=64)
        await rig.vmm_op("dma-write", ipa=RAM + 8, data=b"device!")
        assert await rig.vmm_op("dma-read", ipa=RAM + 8, size=7) == b"device!"
        assert await rig.guest("load", addr=RAM + 8, tag=5, size=7) == b"device!"
        assert await rig.guest("ldg", addr=RAM, size=64) == [5, 5, 5, 5]

    async def test_dma_write_accepts_hex_and_fill(self, rig):
        """dma-write takes data as hex digits, or fill with size."""
        await rig.setup()
        await rig.vmm_op("dma-write", ipa=RAM, data="00ff")
        await rig.vmm_op("dma-write", ipa=RAM + 2, fill=0xAB, size=3)
        assert await rig.vmm_op("dma-read", ipa=RAM, size=6) == b"\x00\xff\xab\xab\xab\x00"
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("dma-write", ipa=RAM, fill=1)
        assert info.value.errno == EINVAL

    async def test_dma_spans_memslots_and_refuses_holes(self, rig):
        """A DMA range may span two adjacent memslots; a byte outside every slot makes it EFAULT."""
        await rig.setup([{"ipa": RAM, "size": PAGE_SIZE, "backing": "memfd"},
                         {"ipa": RAM + PAGE_SIZE, "size": PAGE_SIZE, "backing": "anon"}])
        await rig.vmm_op("dma-write", ipa=RAM + PAGE_SIZE - 2, data=b"abcd")
        assert await rig.vmm_op("dma-read", ipa=RAM + PAGE_SIZE - 2, size=4) == b"abcd"
        for op, args in (("dma-read", {"size": 4}), ("dma-write", {"data": b"wxyz"})):
            with pytest.raises(RemoteError) as info:
                await rig.vmm_op(op, ipa=RAM + 2 * PAGE_SIZE - 2, **args)
            assert info.value.errno == EFAULT
        assert await rig.vmm_op("dma-read", ipa=RAM + 2 * PAGE_SIZE - 2, size=2) == b"\x00\x00"

    async def test_checked_vmm_mapping_reports_the_fault(self, rig):
        """If the VMM maps guest RAM PROT_MTE and turns checks on, a DMA store through it faults (its business)."""
        await rig.setup([{"ipa": RAM, "size": MiB, "backing": "memfd", "prot_mte": True}])
        await rig.guest("enable-mte", tcf="sync")
        await rig.guest("map", va=RAM, ipa=RAM, size=4096, attr="tagged")
        await rig.guest("stg", addr=RAM, tag=5, size=16)
        await rig.vmm_op("prctl", tcf="sync")
        res = await rig.client.call("vmm-op", {"op": "dma-write", "args": {"ipa": RAM, "data": b"x"}})
        assert res.fault is not None and res.fault["kind"] == "tag-check-fault"


class TestDirtyLog:
    async def test_enable_get_clear_disable(self, rig):
        """Dirty logging reports the page a guest store dirtied; clear empties it; disable turns it off."""
        await rig.setup([{"ipa": RAM, "size": 8 * PAGE_SIZE, "backing": "memfd"}])
        await rig.guest("store", addr=RAM + 3 * PAGE_SIZE, data=b"x")
        await rig.vmm_op("dirty-log", slot=0, action="enable")
        assert rig.vmm.slots[0].flags == ("log-dirty-pages",)
        await rig.guest("store", addr=RAM + 2 * PAGE_SIZE + 5, data=b"y")
        assert 2 in await rig.vmm_op("dirty-log", slot=0, action="get")
        await rig.vmm_op("dirty-log", slot=0, action="clear")
        assert await rig.vmm_op("dirty-log", slot=0, action="get") == []
        await rig.guest("store", addr=RAM + 6 * PAGE_SIZE, data=b"z")
        assert await rig.vmm_op("dirty-log", slot=0, action="get") == [6]
        await rig.vmm_op("dirty-log", slot=0, action="disable")
        assert rig.vmm.slots[0].flags == ()

    async def test_to_guest_copy_while_logging_is_ebusy(self, rig):
        """With dirty logging on, a TO_GUEST restore is refused with EBUSY (v6.13 rule)."""
        await rig.setup()
        await rig.vmm_op("dirty-log", slot=0, action="enable")
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("copy-tags", ipa=RAM, length=PAGE_SIZE, direction="to-guest", tags=1)
        assert info.value.errno == EBUSY
        await rig.vmm_op("dirty-log", slot=0, action="disable")
        assert await rig.vmm_op("copy-tags", ipa=RAM, length=PAGE_SIZE, direction="to-guest", tags=1) == \
            {"length": PAGE_SIZE}

    async def test_unknown_slot_is_einval(self, rig):
        """dirty-log enable on a slot that was never registered is EINVAL."""
        await rig.setup()
        with pytest.raises(RemoteError) as info:
            await rig.vmm_op("dirty-log", slot=5, action="enable")
        assert info.value.errno == EINVAL

    async def test_deleted_slot_is_forgotten(self, rig):
        """set-memory-region with size 0 deletes the slot: DMA there is EFAULT afterwards."""
        info = await rig.setup()
        await rig.vmm_op("set-memory-region", slot=0, ipa=RAM, size=0, addr=info["memory"][0]["hva"])
        assert rig.vmm.slots == {}
        with pytest.raises(RemoteError) as err:
            await rig.vmm_op("dma-read", ipa=RAM, size=1)
        assert err.value.errno == EFAULT


def le(v: int) -> bytes:
    return v.to_bytes(8, "little")


class TestMmioDevice:
    async def program(self, rig, dst: int, length: int, fill: int) -> None:
        await rig.guest("map", va=MMIO_BASE, ipa=MMIO_BASE, size=4096, attr="device")
        for reg, value in ((REG_DST, dst), (REG_LEN, length), (REG_FILL, fill), (REG_CMD, 1)):
            await rig.guest("store", addr=MMIO_BASE + reg, data=le(value))

    async def test_guest_programs_the_dma_device_which_fills_its_memory(self, rig):
        """Guest stores to the device's registers exit to the VMM, whose DMA fills guest RAM."""
        await rig.setup()
        await self.program(rig, RAM + 0x100, 32, 0x5A)
        assert await rig.guest("load", addr=RAM + 0xFF, size=34) == b"\x00" + b"\x5a" * 32 + b"\x00"
        assert await rig.guest("load", addr=MMIO_BASE + REG_STATUS, size=8) == le(1)
        assert await rig.guest("load", addr=MMIO_BASE + REG_DST, size=8) == le(RAM + 0x100)
        assert await rig.guest("load", addr=MMIO_BASE + 0x800, size=8) == bytes(8)
        exits = (await rig.call("status"))["exits"]
        assert [e["kind"] for e in exits] == ["mmio"] * 7
        assert exits[3] == {"kind": "mmio", "vcpu": 0, "ipa": MMIO_BASE + REG_CMD, "size": 8, "write": True,
                            "data": le(1).hex()}

    async def test_access_outside_the_window_is_efault(self, rig):
        """An access to an IPA that is neither RAM nor the device fails the guest op with EFAULT."""
        await rig.setup()
        await rig.guest("map", va=0x0A00_0000, ipa=0x0A00_0000, size=4096, attr="device")
        with pytest.raises(RemoteError) as info:
            await rig.guest("load", addr=0x0A00_0000, size=8)
        assert info.value.errno == EFAULT and "no device" in info.value.message
        assert (await rig.call("status"))["exits"][-1]["error"].startswith("EFAULT")

    async def test_fill_outside_guest_ram_fails_the_command(self, rig):
        """A CMD whose DST is not guest RAM fails the MMIO store with EFAULT and completes nothing."""
        await rig.setup()
        with pytest.raises(RemoteError) as info:
            await self.program(rig, RAM + MiB, 16, 1)
        assert info.value.errno == EFAULT
        assert await rig.guest("load", addr=MMIO_BASE + REG_STATUS, size=8) == le(0)


class TestDmaDeviceModel:
    async def test_registers_read_back_and_cmd_reads_zero(self):
        """DST/LEN/FILL read back what was written, CMD reads 0, byte writes update part of a register."""
        fills = []

        async def fill(ipa, length, byte, ctx):
            fills.append((ipa, length, byte, ctx))

        dev = DmaDevice(fill)
        await dev.access(MMIO_BASE + REG_LEN, 8, True, le(0x1234))
        await dev.access(MMIO_BASE + REG_LEN + 1, 1, True, b"\x99")
        assert dev.reg(REG_LEN) == 0x9934
        await dev.access(MMIO_BASE + REG_CMD, 4, True, b"\x02\x00\x00\x00", "c")
        assert fills == [] and dev.reg(REG_CMD) == 0
        await dev.access(MMIO_BASE + REG_CMD, 8, True, le(1), "c")
        assert fills == [(0, 0x9934, 0, "c")] and dev.reg(REG_STATUS) == 1
        assert await dev.access(MMIO_BASE + REG_STATUS, 4, False) == b"\x01\x00\x00\x00"
        with pytest.raises(VmmError) as info:
            await dev.access(MMIO_BASE + 0xFFC, 8, False)
        assert info.value.errno == EFAULT

    def test_translate_pieces_and_holes(self):
        """translate splits a range at slot boundaries and refuses bytes in no slot."""
        slots = [Memslot(1, 0x2000, 0x1000, 0x90000), Memslot(0, 0x1000, 0x1000, 0x50000)]
        assert translate(slots, 0x1ff0, 0x20) == [(0x50ff0, 0x10), (0x90000, 0x10)]
        assert translate(slots, 0x1000, 0) == []
        with pytest.raises(VmmError) as info:
            translate(slots, 0x2ff0, 0x20)
        assert info.value.errno == EFAULT and info.value.name == "EFAULT"


class TestSupervision:
    async def test_killed_guest_is_reported_and_its_vm_destroyed(self, rig):
        """kill-guest: status says killed by SIGKILL, guest ops get ESRCH, the VM and guest RAM are gone."""
        await tagged_guest(rig)
        old_vm = rig.vmm.vm
        assert (await rig.call("kill-guest")) == {"detail": "killed by SIGKILL"}
        st = await rig.call("status")
        assert st["guest"] == {"state": "exited", "detail": "killed by SIGKILL"}
        assert st["vm"] is None and st["exits"][-1] == {"kind": "guest-exit", "detail": "killed by SIGKILL"}
        err = await rig.fails(ESRCH, "guest-op", vcpu=0, op="irg")
        assert "killed by SIGKILL" in err.message
        stats = await rig.stats()
        assert stats["vms"] == 0 and stats["tasks"] == 1
        with pytest.raises(RemoteError):  # the old VM handle is dead in the hypervisor
            await rig.vmm.hv.call("kvm-create-vcpu", {"vm": old_vm})
        await rig.fails(ESRCH, "kill-guest")

    async def test_guest_ram_is_unmapped_after_the_guest_dies(self, rig):
        """After the guest's death the VMM's mapping of guest RAM is gone (a load there is EFAULT)."""
        info = await rig.setup()
        hva = info["memory"][0]["hva"]
        assert await rig.vmm_op("load", addr=hva, size=1) == b"\x00"
        await rig.call("kill-guest")
        with pytest.raises(RemoteError) as err:
            await rig.vmm_op("load", addr=hva, size=1)
        assert err.value.errno == EFAULT

    async def test_guest_whose_channel_closes_has_exited(self, rig):
        """A guest that exits on its own (its channel closes) is recorded with its status and the VM destroyed."""
        await rig.setup()
        await rig.vmm.guest.stop()
        with trio.fail_after(10):
            while (await rig.call("status"))["guest"]["state"] != "exited":
                await trio.sleep(0)
        st = await rig.call("status")
        assert st["guest"]["detail"] == "exited with status 0" and st["vm"] is None
        assert (await rig.stats())["vms"] == 0

    async def test_vmm_keeps_serving_after_the_guest_dies(self, rig):
        """The control channel still serves status and host-process ops once the guest is dead."""
        await rig.setup()
        await rig.call("kill-guest")
        addr = await rig.vmm_op("mmap", size=4096)
        await rig.vmm_op("store", addr=addr, data=b"ok")
        assert await rig.vmm_op("load", addr=addr, size=2) == b"ok"

    async def test_shutdown_destroys_the_vm_and_ends_the_vmm_process(self, rig):
        """shutdown tears the VM down, closes the VMM's hypervisor connection, then requests get ENODEV."""
        await rig.setup()
        await rig.call("shutdown")
        assert rig.vmm.done.is_set()
        with trio.fail_after(10):
            while (stats := await rig.stats())["tasks"] or stats["vms"]:
                await trio.sleep(0)
        await rig.fails(ENODEV, "vm-create", name="vm0")
        assert (await rig.call("status"))["guest"]["state"] == "exited"
