"""The guest kernel (guest/): stage 1, vCPU registers, and the agent against the real hypervisor.

Stage 1 and the registers are pure and tested directly. The agent is tested
end to end in one trio run: a :class:`~hypervisor.server.Hypervisor` served
over in-memory streams, a VMM-side process connection building the VM with
KVM ioctls, the agent on a ``vcpu`` connection, the VMM calling the agent over
:data:`shared.control.GUEST_CHANNEL`, and a small exit-channel server standing
in for the VMM's vCPU thread (it records exits and answers MMIO reads).
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from guest.__main__ import run_guest
from guest.agent import DFSC_TAG_CHECK, GuestAgent, GuestError
from guest.cpu import (
    MAIR_ATTR_NORMAL,
    MAIR_ATTR_NORMAL_TAGGED,
    MT_NORMAL_TAGGED,
    TFSR_TF0,
    TFSR_TF1,
    VcpuRegs,
    boot_mair,
)
from guest.stage1 import Stage1, Stage1Error
from hypervisor.kernel import Kernel
from hypervisor.server import Hypervisor
from shared import wire
from shared.abi import MAX_IO
from shared.control import EXIT_CHANNEL
from shared.errno import E2BIG, EEXIST, EFAULT, EINVAL, ENODEV, ENOSYS, EOPNOTSUPP
from shared.mte import tagged_pointer
from shared.rpc import serve_requests
from shared.transport import open_listener

PAGE = 4096
RAM_IPA = 0x4000_0000
RAM_SIZE = 16 * PAGE
MMIO_IPA = 0x1000_0000  # no memslot here: accesses exit to the VMM
MMIO_BYTES = bytes(range(0xA0, 0xB0))
BIT55 = 1 << 55


# ---- stage 1 ---------------------------------------------------------------------


class TestStage1:
    """The guest's stage-1 translation: identity map, mappings, TBI, segments, errors."""

    def test_unmapped_addresses_are_identity_mapped_normal(self):
        """A VA nobody mapped translates to the IPA of the same value, attribute normal."""
        s = Stage1()
        assert s.translate(RAM_IPA + 8, 16) == [[RAM_IPA + 8, 16, "normal"]]

    def test_mapped_range_translates_with_its_attribute(self):
        """A mapped VA goes to the mapped IPA at the same offset, with the mapping's attribute."""
        s = Stage1()
        s.map(0x10000, RAM_IPA, 2 * PAGE, "tagged")
        assert s.translate(0x10000 + PAGE + 32, 8) == [[RAM_IPA + PAGE + 32, 8, "tagged"]]
        assert s.lookup(0x10000 + 2 * PAGE) == (0x10000 + 2 * PAGE, "normal")  # just past the end

    def test_top_byte_is_ignored(self):
        """TBI: a pointer with a tag (and other top-byte bits) translates as its untagged address."""
        s = Stage1()
        s.map(0x10000, RAM_IPA, PAGE, "tagged")
        assert s.translate(tagged_pointer(0x10010, 7) | (0xF0 << 56), 4) == [[RAM_IPA + 16, 4, "tagged"]]

    def test_mapping_a_tagged_va_maps_the_untagged_range(self):
        """map() ignores the top byte of va too."""
        s = Stage1()
        s.map(tagged_pointer(0x10000, 3), RAM_IPA, PAGE, "device")
        assert s.lookup(0x10000) == (RAM_IPA, "device")

    def test_access_is_split_at_page_boundaries(self):
        """An access crossing pages gives one segment per page, each within its page, in order."""
        s = Stage1()
        s.map(0x10000, RAM_IPA + 5 * PAGE, PAGE, "tagged")
        s.map(0x11000, RAM_IPA, PAGE, "normal")
        assert s.translate(0x10000 + PAGE - 8, 24) == [[RAM_IPA + 6 * PAGE - 8, 8, "tagged"],
                                                        [RAM_IPA, 16, "normal"]]

    def test_largest_access_has_4097_segments(self):
        """MAX_IO bytes from an unaligned VA touch 4097 pages; the segments add up to the size."""
        segs = Stage1().translate(RAM_IPA + 1, MAX_IO)
        assert len(segs) == 4097
        assert sum(n for _, n, _ in segs) == MAX_IO
        assert all((ipa % PAGE) + n <= PAGE for ipa, n, _ in segs)

    def test_access_over_max_io_is_e2big(self):
        """One byte more than MAX_IO does not fit one vcpu-access request."""
        with pytest.raises(Stage1Error) as exc:
            Stage1().translate(0, MAX_IO + 1)
        assert exc.value.errno == E2BIG

    def test_zero_size_translates_to_nothing(self):
        """A zero-byte access has no segments."""
        assert Stage1().translate(RAM_IPA, 0) == []

    def test_later_map_replaces_the_overlap_only(self):
        """Mapping the middle page of a mapped range again leaves the pages around it as they were."""
        s = Stage1()
        s.map(0x10000, RAM_IPA, 3 * PAGE, "tagged")
        s.map(0x11000, 0x9000_0000, PAGE, "device")
        assert [s.lookup(0x10000 + i * PAGE) for i in range(3)] == [
            (RAM_IPA, "tagged"), (0x9000_0000, "device"), (RAM_IPA + 2 * PAGE, "tagged")]
        assert len(s.extents) == 3

    def test_huge_map_is_cheap(self):
        """Mapping 1 TiB holds one extent, not a quarter of a billion pages."""
        s = Stage1()
        s.map(0, 0, 1 << 40, "tagged")
        assert len(s.extents) == 1 and s.lookup((1 << 40) - 1) == ((1 << 40) - 1, "tagged")

    @pytest.mark.parametrize("va,ipa,size,attr", [
        (0x10001, RAM_IPA, PAGE, "tagged"),  # va not page aligned
        (0x10000, RAM_IPA + 16, PAGE, "tagged"),  # ipa not page aligned
        (0x10000, RAM_IPA, 0, "tagged"),  # empty
        (0x10000, RAM_IPA, PAGE + 1, "tagged"),  # not a page multiple
        (0x10000, RAM_IPA, PAGE, "weird"),  # unknown attribute
        ((1 << 56) - PAGE, RAM_IPA, 2 * PAGE, "normal"),  # runs off the VA space
    ])
    def test_bad_map_is_einval(self, va, ipa, size, attr):
        """Misaligned addresses, a non-page-multiple or empty size, or a bad attribute: EINVAL."""
        s = Stage1()
        with pytest.raises(Stage1Error) as exc:
            s.map(va, ipa, size, attr)
        assert exc.value.errno == EINVAL
        assert s.extents == ()


# ---- vCPU registers ----------------------------------------------------------------


class TestVcpuRegs:
    """SCTLR/GCR/TCO/TFSR/MAIR state of one vCPU."""

    @pytest.mark.parametrize("tcf,tco,want", [
        ("sync", False, "sync"), ("async", False, "async"), ("asymm", False, "asymm"),
        ("none", False, "none"), ("sync", True, "none"), ("async", True, "none"),
    ])
    def test_effective_check(self, tcf, tco, want):
        """The check mode is TCF, or none when PSTATE.TCO is set."""
        r = VcpuRegs(index=0, mte=2)
        r.enable_mte(tcf)
        r.tco = tco
        assert r.effective_check() == want

    def test_async_fault_sets_tf0_below_bit_55_and_tf1_above(self):
        """TFSR_EL1.TF0 records faults at TTBR0 addresses (bit 55 clear), TF1 the others."""
        r = VcpuRegs(index=0, mte=2)
        r.record_async_fault(0x1000)
        assert r.tfsr == TFSR_TF0
        r.record_async_fault(BIT55 | 0x1000)
        assert r.tfsr == TFSR_TF0 | TFSR_TF1

    def test_enable_mte_sets_ata_tcf_and_gcr_exclude(self):
        """enable-mte's include mask becomes GCR_EL1.Exclude = ~include (16 bits)."""
        r = VcpuRegs(index=0, mte=2)
        r.enable_mte("async", 0x00F0)
        assert (r.sctlr_ata, r.tcf, r.gcr_excl) == (True, "async", 0xFF0F)

    def test_irg_returns_only_included_tags(self):
        """IRG picks among the tags GCR_EL1 does not exclude."""
        r = VcpuRegs(index=3, mte=2)
        r.enable_mte("sync", (1 << 5) | (1 << 9))
        assert {r.irg() for _ in range(64)} == {5, 9}

    def test_irg_is_zero_when_all_excluded_or_ata_off(self):
        """An empty include mask, or SCTLR_EL1.ATA=0, makes IRG return 0."""
        r = VcpuRegs(index=0, mte=2)
        assert r.irg() == 0  # ATA still 0
        r.enable_mte("sync", 0)
        assert r.irg() == 0

    def test_irg_is_reproducible_per_vcpu_index(self):
        """Two vCPUs with the same index draw the same IRG sequence."""
        a, b = VcpuRegs(index=1, mte=2), VcpuRegs(index=1, mte=2)
        for r in (a, b):
            r.enable_mte("sync")
        assert [a.irg() for _ in range(16)] == [b.irg() for _ in range(16)]

    def test_mair_tagged_slot_depends_on_mte(self):
        """MAIR_EL1's MT_NORMAL_TAGGED slot is 0xF0 with MTE and plain Normal (0xFF) without."""
        assert (boot_mair(True) >> (8 * MT_NORMAL_TAGGED)) & 0xFF == MAIR_ATTR_NORMAL_TAGGED
        assert (boot_mair(False) >> (8 * MT_NORMAL_TAGGED)) & 0xFF == MAIR_ATTR_NORMAL

    def test_tagged_degrades_to_normal_without_mte(self):
        """A stage-1 "tagged" page is Normal-Tagged only on a vCPU with MTE."""
        assert VcpuRegs(index=0, mte=2).memory_type("tagged") == "tagged"
        assert VcpuRegs(index=0, mte=0).memory_type("tagged") == "normal"
        assert VcpuRegs(index=0, mte=0).memory_type("device") == "device"
        assert VcpuRegs(index=0, mte=2).memory_type("normal") == "normal"


# ---- the agent against the real hypervisor --------------------------------------------


class RecordingClient(wire.Client):
    """A real wire client that also records each call's op and ctx (and its args)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.calls: list[tuple[str, str | None]] = []
        self.args: list[dict] = []

    async def call(self, op, args=None, ctx=None):
        self.calls.append((op, ctx))
        self.args.append(args)
        return await super().call(op, args, ctx)


@attrs.define
class ExitServer:
    """The VMM's side of EXIT_CHANNEL: records every exit; MMIO reads return MMIO_BYTES."""

    exits: list = attrs.Factory(list)
    fail_mmio: bool = False

    async def handle(self, op, args, ctx):
        self.exits.append((op, args, ctx))
        if op == "exit-mmio" and self.fail_mmio:
            raise wire.RemoteError(EINVAL, "no device at that address")
        if op == "exit-mmio" and not args["write"]:
            return MMIO_BYTES[:args["size"]]
        return None


@attrs.define
class Env:
    """One VM with its guest agent, reachable as the VMM reaches it."""

    kernel: Kernel
    vmm: wire.Client  # the VMM's process connection (its own address space, KVM ioctls)
    vm: int
    ram: int  # the VMM's address of guest RAM
    hv: RecordingClient  # the guest's vcpu connection
    channel: wire.Client  # the VMM's end of GUEST_CHANNEL
    exits: ExitServer
    agent: GuestAgent
    token: str  # the vCPU token kvm-create-vcpu handed out

    async def op(self, op, ctx=None, vcpu=0, **args) -> wire.Reply:
        """Run a guest op through the guest channel, as the VMM does."""
        return await self.channel.call("guest-op", {"vcpu": vcpu, "op": op, "args": args}, ctx=ctx)

    async def errno(self, op, vcpu=0, **args) -> int:
        """Run a guest op that must fail; return its errno."""
        with pytest.raises(wire.RemoteError) as exc:
            await self.op(op, vcpu=vcpu, **args)
        return exc.value.errno


def _value(reply: wire.Reply, key: str):
    v = reply.value
    return v[key] if isinstance(v, dict) else v


async def _client(nursery, stream, cls=wire.Client):
    c = cls(stream)
    await nursery.start(c.run)
    return c


@asynccontextmanager
async def guest_env(*, mte: bool = True, add_vcpu: bool = True):
    """A VM (16 pages of memfd RAM at RAM_IPA, one vCPU) and its guest agent, all in this trio run."""
    async with trio.open_nursery() as nursery:
        kernel = Kernel()
        hv = Hypervisor(kernel)

        async def connect(role, cls=wire.Client, **hello):
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(hv.serve, b)
            c = await _client(nursery, a, cls)
            await c.call("hello", {"role": role, **hello})
            return c

        vmm = await connect("process", name="vmm")
        vm = _value(await vmm.call("kvm-create-vm", {}), "vm")
        if mte:
            await vmm.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
        ram = (await vmm.call("mmap", {"size": RAM_SIZE, "share": "shared", "backing": "memfd"})).value
        await vmm.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": RAM_IPA, "size": RAM_SIZE,
                                                 "addr": ram})
        vcpu = (await vmm.call("kvm-create-vcpu", {"vm": vm})).value
        guest_hv = await connect("vcpu", RecordingClient, name="guest")

        exits = ExitServer()
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_requests, b, EXIT_CHANNEL, exits.handle)
        agent = GuestAgent(guest_hv, await _client(nursery, a))

        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(agent.serve, b)
        channel = await _client(nursery, a)
        if add_vcpu:
            await channel.call("vcpu-add", {"index": vcpu["index"], "token": vcpu["token"]})
        env = Env(kernel, vmm, vm, ram, guest_hv, channel, exits, agent, vcpu["token"])
        yield env
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tagged(tcf: str = "sync", **kw):
    """A guest with MTE on (``tcf``) and 4 tagged pages at VA 0x10000 -> RAM_IPA."""
    async with guest_env(**kw) as env:
        await env.op("enable-mte", tcf=tcf)
        await env.op("map", va=0x10000, ipa=RAM_IPA, size=4 * PAGE, attr="tagged")
        yield env


VA = 0x10000


class TestAgentLocal:
    """Agent requests the guest kernel answers without the hypervisor."""

    async def test_run_op_on_an_unknown_vcpu_raises_enodev(self):
        """GuestAgent.run_op names a missing vCPU with a GuestError carrying ENODEV."""
        agent = GuestAgent(hv=None, exits=None)
        with pytest.raises(GuestError) as exc:
            await agent.run_op(2, "read-tfsr", {})
        assert exc.value.errno == ENODEV and "vCPU 2" in exc.value.message

    async def test_register_ops_need_no_hypervisor(self):
        """tco, read-tfsr, clear-tfsr and map change only guest state."""
        agent = GuestAgent(hv=None, exits=None)
        agent.vcpus[0] = VcpuRegs(index=0, mte=2)
        agent.vcpus[0].tfsr = TFSR_TF1
        assert await agent.run_op(0, "read-tfsr", {}) == TFSR_TF1
        await agent.run_op(0, "clear-tfsr", {})
        await agent.run_op(0, "tco", {"on": True})
        await agent.run_op(0, "map", {"va": VA, "ipa": RAM_IPA, "size": PAGE, "attr": "tagged"})
        assert (agent.vcpus[0].tfsr, agent.vcpus[0].tco) == (0, True)
        assert agent.stage1.lookup(VA) == (RAM_IPA, "tagged")


class TestChannel:
    """The GUEST_CHANNEL requests: vcpu-add and guest-op dispatch and their errors."""

    async def test_vcpu_add_attaches_and_reports_mte(self):
        """vcpu-add presents the token to the hypervisor and records ID_AA64PFR1_EL1.MTE."""
        async with guest_env() as env:
            regs = env.agent.vcpus[0]
            assert regs.mte != 0 and regs.has_mte
            assert ("vcpu-attach", None) in env.hv.calls

    async def test_vcpu_without_the_cap_has_no_mte(self):
        """A VM whose VMM did not enable KVM_CAP_ARM_MTE gives a vCPU with MTE 0."""
        async with guest_env(mte=False) as env:
            assert env.agent.vcpus[0].mte == 0

    async def test_vcpu_added_twice_is_eexist(self):
        """A second vcpu-add for the same index is refused before reaching the hypervisor."""
        async with guest_env() as env:
            with pytest.raises(wire.RemoteError) as exc:
                await env.channel.call("vcpu-add", {"index": 0, "token": env.token})
            assert exc.value.errno == EEXIST

    async def test_bad_token_fails_with_the_hypervisors_errno(self):
        """vcpu-add with a token the hypervisor never handed out fails, and adds no vCPU."""
        async with guest_env(add_vcpu=False) as env:
            with pytest.raises(wire.RemoteError):
                await env.channel.call("vcpu-add", {"index": 0, "token": "not-a-token"})
            assert env.agent.vcpus == {}

    async def test_unknown_vcpu_is_enodev(self):
        """A guest op on a vCPU the guest was never given fails with ENODEV."""
        async with guest_env() as env:
            assert await env.errno("read-tfsr", vcpu=5) == ENODEV

    async def test_unknown_op_is_enosys(self):
        """A guest op that SCENARIOS.md does not define fails with ENOSYS."""
        async with guest_env() as env:
            assert await env.errno("mmap", size=PAGE) == ENOSYS

    async def test_bad_argument_is_einval(self):
        """A guest op with a wrong argument fails with EINVAL, as the ABI's checks say."""
        async with guest_env() as env:
            assert await env.errno("store", addr=VA, data=b"x", bogus=1) == EINVAL
            assert await env.errno("enable-mte", tcf="sometimes") == EINVAL
            assert await env.errno("enable-mte", tcf="sync", include=0x10000) == EINVAL

    async def test_bad_map_is_einval(self):
        """A misaligned stage-1 map fails with EINVAL."""
        async with guest_env() as env:
            assert await env.errno("map", va=VA + 1, ipa=RAM_IPA, size=PAGE, attr="tagged") == EINVAL


class TestEnableMte:
    """enable-mte: refused without the cap; sets SCTLR/GCR with it."""

    async def test_without_the_cap_is_eopnotsupp(self):
        """The VMM did not enable KVM_CAP_ARM_MTE: the guest sees no MTE and enable-mte fails."""
        async with guest_env(mte=False) as env:
            assert await env.errno("enable-mte", tcf="sync") == EOPNOTSUPP

    async def test_sets_registers(self):
        """enable-mte writes SCTLR_EL1.ATA, TCF and GCR_EL1.Exclude."""
        async with guest_env() as env:
            await env.op("enable-mte", tcf="asymm", include=0x0006)
            r = env.agent.vcpus[0]
            assert (r.sctlr_ata, r.tcf, r.gcr_excl) == (True, "asymm", 0xFFF9)
            assert {(await env.op("irg")).value for _ in range(32)} <= {1, 2}


class TestAccesses:
    """Loads, stores, STG and LDG go through stage 1 to the hypervisor and back."""

    async def test_identity_mapped_store_then_load(self):
        """Unmapped guest RAM is identity mapped: a store at the IPA's VA lands in the VMM's mapping."""
        async with guest_env() as env:
            await env.op("store", addr=RAM_IPA + 100, data=b"hello")
            assert (await env.op("load", addr=RAM_IPA + 100, size=5)).value == b"hello"
            assert (await env.vmm.call("load", {"addr": env.ram + 100, "size": 5})).value == b"hello"

    async def test_access_across_pages_follows_stage1(self):
        """A store across two VA pages mapped to non-adjacent IPAs writes both IPA pages."""
        async with guest_env() as env:
            await env.op("map", va=VA, ipa=RAM_IPA + 5 * PAGE, size=PAGE, attr="normal")
            await env.op("map", va=VA + PAGE, ipa=RAM_IPA + 2 * PAGE, size=PAGE, attr="normal")
            await env.op("store", addr=VA + PAGE - 2, data=b"abcd")
            assert (await env.op("load", addr=RAM_IPA + 6 * PAGE - 2, size=2)).value == b"ab"
            assert (await env.op("load", addr=RAM_IPA + 2 * PAGE, size=2)).value == b"cd"

    async def test_stg_then_ldg(self):
        """STG sets the allocation tags of a tagged page; LDG reads one per granule."""
        async with tagged() as env:
            await env.op("stg", addr=VA, tag=5, size=64)
            assert (await env.op("ldg", addr=VA, size=64)).value == [5, 5, 5, 5]

    async def test_ldg_covers_every_touched_granule(self):
        """LDG of 2 bytes straddling a granule boundary returns both granules' tags."""
        async with tagged() as env:
            await env.op("stg", addr=VA, tag=3, size=16)
            await env.op("stg", addr=VA + 16, tag=4, size=16)
            assert (await env.op("ldg", addr=VA + 15, size=2)).value == [3, 4]

    async def test_pointer_tag_comes_from_the_address_when_tag_is_0(self):
        """STG through a pointer with tag bits 59:56 set uses those bits as the tag."""
        async with tagged() as env:
            await env.op("stg", addr=tagged_pointer(VA, 9), size=16)
            assert (await env.op("ldg", addr=VA, size=16)).value == [9]

    async def test_zero_size_accesses_make_no_call(self):
        """load of 0 bytes is b"", ldg of 0 bytes is [], and neither reaches the hypervisor."""
        async with tagged() as env:
            before = len(env.hv.calls)
            assert (await env.op("load", addr=VA, size=0)).value == b""
            assert (await env.op("ldg", addr=VA, size=0)).value == []
            assert len(env.hv.calls) == before

    async def test_unaligned_stg_is_an_alignment_fault(self):
        """STG at an address that is not 16-byte aligned fails with EFAULT."""
        async with tagged() as env:
            assert await env.errno("stg", addr=VA + 8, tag=1, size=16) == EFAULT

    async def test_stg_size_not_a_granule_multiple_is_einval(self):
        """STG over a size that is not a multiple of 16 fails with EINVAL."""
        async with tagged() as env:
            assert await env.errno("stg", addr=VA, tag=1, size=24) == EINVAL

    async def test_tagged_degrades_to_normal_without_mte(self):
        """Without MTE a "tagged" mapping is Normal: STG is ignored, LDG reads 0, nothing faults."""
        async with guest_env(mte=False) as env:
            await env.op("map", va=VA, ipa=RAM_IPA, size=PAGE, attr="tagged")
            await env.op("stg", addr=VA, tag=5, size=32)
            assert (await env.op("ldg", addr=VA, size=32)).value == [0, 0]
            r = await env.op("store", addr=VA, tag=7, data=b"xy")
            assert r.fault is None
            assert env.hv.args[-1]["segs"] == [[RAM_IPA, 2, "normal"]]  # MAIR's tagged slot is Normal


class TestTagChecks:
    """Sync faults are data aborts; async faults set TFSR_EL1; TCO and untagged memory skip checks."""

    async def test_sync_fault_is_a_data_abort_and_suppresses_the_store(self):
        """A mismatching store under sync faults with DFSC 0x11 at its address and writes nothing."""
        async with tagged("sync") as env:
            await env.op("stg", addr=VA, tag=5, size=64)
            await env.op("store", addr=VA, tag=5, data=b"old!")
            r = await env.op("store", addr=VA, tag=6, data=b"new!")
            assert r.value is None
            assert r.fault == {"kind": "tag-check-fault", "addr": VA, "pointer_tag": 6, "memory_tag": 5,
                               "esr_dfsc": DFSC_TAG_CHECK}
            assert (await env.op("load", addr=VA, tag=5, size=4)).value == b"old!"

    async def test_sync_fault_address_is_the_first_mismatching_granule(self):
        """A load over granules tagged 5|7 through tag 5 faults at the second granule, tag bits cleared."""
        async with tagged("sync") as env:
            await env.op("stg", addr=VA, tag=5, size=16)
            await env.op("stg", addr=VA + 16, tag=7, size=16)
            r = await env.op("load", addr=tagged_pointer(VA + 4, 5), size=24)
            assert r.fault["kind"] == "tag-check-fault"
            assert r.fault["addr"] == VA + 16 and r.fault["memory_tag"] == 7

    async def test_async_fault_is_performed_and_sets_tf0(self):
        """A mismatching store under async is performed and sets TFSR_EL1.TF0; clear-tfsr clears it."""
        async with tagged("async") as env:
            await env.op("stg", addr=VA, tag=5, size=16)
            r = await env.op("store", addr=VA, tag=6, data=b"data")
            assert r.fault["kind"] == "async-tag-check-fault" and r.fault["addr"] == VA
            assert (await env.op("load", addr=VA, tag=5, size=4)).value == b"data"
            assert (await env.op("read-tfsr")).value == TFSR_TF0
            await env.op("clear-tfsr")
            assert (await env.op("read-tfsr")).value == 0

    async def test_async_fault_above_bit_55_sets_tf1(self):
        """An asynchronous fault at a TTBR1 address (bit 55 set) sets TF1, not TF0."""
        async with tagged("async") as env:
            high = BIT55 | 0x20000
            await env.op("map", va=high, ipa=RAM_IPA + 8 * PAGE, size=PAGE, attr="tagged")
            await env.op("stg", addr=high, tag=2, size=16)
            r = await env.op("load", addr=high, tag=3, size=8)
            assert r.fault["kind"] == "async-tag-check-fault" and r.fault["addr"] == high
            assert r.value == bytes(8)
            assert (await env.op("read-tfsr")).value == TFSR_TF1

    async def test_tco_turns_checks_off(self):
        """With PSTATE.TCO set a mismatching store is not checked; cleared, it is again."""
        async with tagged("sync") as env:
            await env.op("stg", addr=VA, tag=5, size=16)
            await env.op("tco", on=True)
            assert (await env.op("store", addr=VA, tag=6, data=b"x")).fault is None
            await env.op("tco", on=False)
            assert (await env.op("store", addr=VA, tag=6, data=b"x")).fault["kind"] == "tag-check-fault"

    async def test_normal_mapping_is_not_checked(self):
        """The identity map is Normal, untagged: a store with any tag retires without a fault."""
        async with tagged("sync") as env:
            r = await env.op("store", addr=RAM_IPA + 8 * PAGE, tag=9, data=b"ok")
            assert r.fault is None


class TestExits:
    """MMIO exits go to the VMM; KVM_RUN errors are reported to it and fail the op."""

    async def test_mmio_load_returns_the_vmms_bytes(self):
        """A load from an IPA with no memslot exits to the VMM, whose reply is the loaded data."""
        async with guest_env() as env:
            r = await env.op("load", addr=MMIO_IPA + 4, size=4)
            assert r.value == MMIO_BYTES[:4]
            op, args, _ = env.exits.exits[-1]
            assert op == "exit-mmio" and args["ipa"] == MMIO_IPA + 4 and args["write"] is False

    async def test_mmio_store_hands_the_data_to_the_vmm(self):
        """A store to an IPA with no memslot exits with the written bytes."""
        async with guest_env() as env:
            r = await env.op("store", addr=MMIO_IPA, data=b"\x01\x02")
            assert r.value is None
            op, args, _ = env.exits.exits[-1]
            assert (op, args["ipa"], args["write"], args["data"]) == ("exit-mmio", MMIO_IPA, True, b"\x01\x02")

    async def test_vmm_mmio_error_is_the_ops_error(self):
        """When the VMM fails to emulate an MMIO access, the guest op fails with its errno."""
        async with guest_env() as env:
            env.exits.fail_mmio = True
            assert await env.errno("load", addr=MMIO_IPA, size=4) == EINVAL

    async def test_kvm_run_error_is_reported_and_returned(self):
        """An access whose memslot lost its VMM mapping fails (EFAULT) and the VMM gets exit-error."""
        async with guest_env() as env:
            await env.vmm.call("munmap", {"addr": env.ram, "size": RAM_SIZE})
            with pytest.raises(wire.RemoteError) as exc:
                await env.op("store", addr=RAM_IPA, data=b"x", ctx="guest:vm0/9")
            assert exc.value.errno == EFAULT
            op, args, ctx = env.exits.exits[-1]
            assert op == "exit-error" and args["errno"] == EFAULT and ctx == "guest:vm0/9"

    async def test_ctx_is_passed_to_every_call_for_the_request(self):
        """The guest-op's ctx names the hypervisor access and the VMM exit made for it."""
        async with guest_env() as env:
            await env.op("store", addr=RAM_IPA, data=b"x", ctx="guest:vm0/3")
            await env.op("load", addr=MMIO_IPA, size=1, ctx="guest:vm0/4")
            assert env.hv.calls[-2:] == [("vcpu-access", "guest:vm0/3"), ("vcpu-access", "guest:vm0/4")]
            assert env.exits.exits[-1][2] == "guest:vm0/4"


class TestProcess:
    """``python -m guest``: connect, hello, serve the channel, exit."""

    async def test_run_guest_serves_the_channel_until_it_closes(self, tmp_path):
        """run_guest over real sockets attaches a vCPU, runs an op, and returns 0 when the VMM hangs up."""
        kernel = Kernel()
        hv = Hypervisor(kernel)
        addr = f"unix:{tmp_path}/hv.sock"
        listener = await open_listener(addr)
        chan_vmm, chan_guest = socket.socketpair()
        exit_vmm, exit_guest = socket.socketpair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, hv.serve, [listener])
            exits = ExitServer()
            nursery.start_soon(serve_requests, trio.SocketStream(trio.socket.from_stdlib_socket(exit_vmm)),
                               EXIT_CHANNEL, exits.handle)
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(hv.serve, b)
            vmm = await _client(nursery, a)
            await vmm.call("hello", {"role": "process"})
            vm = _value(await vmm.call("kvm-create-vm", {}), "vm")
            await vmm.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
            cpu = (await vmm.call("kvm-create-vcpu", {"vm": vm})).value
            status = []

            async def guest():
                status.append(await run_guest(addr, chan_guest.detach(), exit_guest.detach(), "g", None))

            nursery.start_soon(guest)
            chan = await _client(nursery, trio.SocketStream(trio.socket.from_stdlib_socket(chan_vmm)))
            await chan.call("vcpu-add", {"index": cpu["index"], "token": cpu["token"]})
            await chan.call("guest-op", {"vcpu": 0, "op": "enable-mte", "args": {"tcf": "sync"}})
            await chan.aclose()
            with trio.fail_after(10):
                while not status:
                    await trio.sleep(0.01)
            assert status == [0]
            nursery.cancel_scope.cancel()

    async def test_unreachable_hypervisor_exits_1_quietly(self, tmp_path):
        """With nobody listening the process exits 1, says why on stderr and nothing on stdout."""
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        env.pop("MTEKVM_SECRET", None)
        proc = await trio.run_process(
            [sys.executable, "-m", "guest", "--hypervisor", f"unix:{tmp_path}/none.sock",
             "--channel-fd", str(b.fileno()), "--exit-fd", str(d.fileno())],
            capture_stdout=True, capture_stderr=True, check=False, pass_fds=(b.fileno(), d.fileno()))
        for s in (a, b, c, d):
            s.close()
        assert proc.returncode == 1
        assert proc.stdout == b""
        assert b"cannot reach the hypervisor" in proc.stderr
