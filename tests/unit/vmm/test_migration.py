"""Live migration between two in-process hosts (vmm.migration, shared.migstream).

Each host is its own :class:`hypervisor.server.Hypervisor` kernel; each VMM talks to its own
over memory streams; the two VMMs talk over an :class:`vmm.migration.InProcessTransport`.
A VMM's ``die`` tears it down abruptly (its hypervisor connection closes: the kernel runs
do_exit for it, as for a SIGKILLed process).
"""

from __future__ import annotations

import msgpack
import pytest
import trio
import trio.testing

from guest.agent import GuestAgent
from hypervisor.kernel import Kernel
from mtekvm.links import InProcessHost
from shared import migstream
from shared.errno import ECONNREFUSED, ECONNRESET, EINVAL, ENOMEM, ENOSYS, EPERM, EPROTO, ESTALE
from shared.mte import PAGE_SIZE
from shared.wire import Client, ConnectionClosed, RemoteError
from vmm import guestram, migration
from vmm.guestlink import InProcessGuests
from vmm.machine import Vmm
from vmm.migration import InProcessTransport

MiB = 1 << 20
RAM = 0x4000_0000
RAM2 = 0x8000_0000
RAM3 = 0xC000_0000



async def migrate_dirtying_during_precopy(src, dst, plan) -> list:
    """Fill ``plan`` on a tagged VM, migrate it while pages are written after pass 1 and at the pause (two
    passes and a stop-and-copy that resend them); returns the late writes."""
    await tagged_vm(src)
    await fill(src, plan)
    late = [(RAM + 9 * PAGE_SIZE, b"pass two", 4), (RAM + 2 * MiB, b"at the pause", 6), (RAM, b"AGAIN PAGE", 3)]

    async def hook(point):
        if point == "pass-end:1":
            await fill(src, late[:1] + late[2:])
        if point == "pause":
            await fill(src, late[1:2])

    src.vmm.migration_hook = hook
    res = await migrate(src, dst)
    assert res["passes"] == 2 and res["stop-pages"] >= 1
    return late


async def migrate_to_a_host_too_small(nursery) -> None:
    """Migrate a VM with 2 MiB of touched pages to a 1 MiB host: ENOMEM, the source resumes with logging off and
    its data, the destination keeps nothing."""
    src = await start_node(nursery, await new_host(nursery))
    dst = await start_node(nursery, await new_host(nursery, ram=MiB, swap=0))
    await tagged_vm(src)
    for i in range(4 * MiB // PAGE_SIZE // 2):
        await src.guest("store", addr=RAM + 2 * i * PAGE_SIZE, data=b"x")
    with pytest.raises(RemoteError) as info:
        await migrate(src, dst)
    assert info.value.errno == ENOMEM
    assert src.vmm.slots[0].flags == () and not src.vmm.paused
    assert await src.guest("load", addr=RAM + 2 * PAGE_SIZE, size=1) == b"x"
    await assert_gone_from(dst)

class Node:
    """One host, one VMM on it (which may die), its control client."""

    def __init__(self, host: InProcessHost):
        self.host = host
        self.vmm: Vmm
        self.client: Client
        self.scope = trio.CancelScope()
        self.dead = False

    async def call(self, op: str, /, **args):
        return (await self.client.call(op, args)).value

    async def vmm_op(self, op: str, /, **args):
        return (await self.client.call("vmm-op", {"op": op, "args": args})).value

    async def guest(self, op: str, /, vcpu: int = 0, **args):
        return (await self.client.call("guest-op", {"vcpu": vcpu, "op": op, "args": args})).value

    async def host_call(self, op: str, /, **args):
        client, _ = await self.host.connect("host")
        try:
            return (await client.call(op, args)).value
        finally:
            await client.aclose()

    async def vms(self) -> int:
        """VMs the host runs now (stats)."""
        return (await self.host_call("stats"))["vms"]

    async def die(self) -> None:
        """SIGKILL, in-process: the hypervisor connections close (do_exit), the VMM's tasks stop."""
        self.dead = True
        self.vmm.closing = True
        if self.vmm.hv is not None:
            await self.vmm.hv.aclose()
        if self.vmm.guest is not None and self.vmm.guest.alive:
            await self.vmm.guest.kill()
        self.scope.cancel()
        await trio.sleep_forever()


async def start_node(nursery: trio.Nursery, host: InProcessHost, name: str = "vm0",
                     secret: str | None = None) -> Node:
    node = Node(host)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with node.scope:
            async with trio.open_nursery() as inner:
                node.vmm = Vmm(host.connect, InProcessGuests(inner, host.connect, GuestAgent), name=name,
                               session="mig", migration=InProcessTransport(inner, secret), die=node.die)
                await node.vmm.start()
                a, b = trio.testing.memory_stream_pair()
                inner.start_soon(node.vmm.serve, b)
                node.client = Client(a)
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(run)
    await nursery.start(node.client.run)
    return node


async def new_host(nursery, **kernel) -> InProcessHost:
    h = InProcessHost(nursery, Kernel(**kernel))
    await h.start()
    return h


@pytest.fixture
async def pair(nursery):
    src = await start_node(nursery, await new_host(nursery))
    dst = await start_node(nursery, await new_host(nursery))
    return src, dst


async def tagged_vm(node: Node, memory=None, vcpus: int = 1) -> None:
    memory = memory or [{"ipa": RAM, "size": 4 * MiB, "backing": "anon"}]
    await node.call("vm-setup", name="vm0", mte=True, vcpus=vcpus, memory=memory)
    await node.guest("enable-mte", tcf="sync")
    for m in memory:
        await node.guest("map", va=m["ipa"], ipa=m["ipa"], size=m["size"], attr="tagged")


async def migrate(src: Node, dst: Node, **kw) -> dict:
    """What the orchestrator does: migrate-incoming on the destination, then migrate-out on the source."""
    inc = {k: kw[k] for k in ("fail", "fail_at", "bugs") if k in kw}
    address = (await dst.call("migrate-incoming", **inc))["address"]
    return await src.call("migrate-out", address=address, to="dst", **kw)


async def fill(node: Node, plan) -> None:
    """Guest writes: (addr, data bytes or None, tag) - data stored through the tag, tag set by STG."""
    for addr, data, tag in plan:
        await node.guest("stg", addr=addr, tag=tag, size=PAGE_SIZE)
        if data:
            await node.guest("store", addr=addr | tag << 56, data=data)


async def check(node: Node, plan) -> None:
    for addr, data, tag in plan:
        assert await node.guest("ldg", addr=addr, size=PAGE_SIZE) == [tag] * (PAGE_SIZE // 16), hex(addr)
        got = await node.guest("load", addr=addr | tag << 56, size=PAGE_SIZE)
        assert got == (data or b"").ljust(PAGE_SIZE, b"\0"), hex(addr)


PLAN = [(RAM, b"first page", 3), (RAM + 5 * PAGE_SIZE, None, 7),  # all-zero data, tagged
        (RAM + MiB + 17 * PAGE_SIZE, bytes(range(256)) * 16, 12), (RAM + 3 * MiB, b"\xff" * 100, 0)]


async def assert_gone_from(node: Node) -> None:
    """The host keeps nothing of the VM (no VM; meminfo lists none when the host has the op)."""
    assert await node.vms() == 0
    try:
        info = await node.host_call("meminfo")
    except RemoteError as exc:
        assert exc.errno == ENOSYS
    else:
        assert info["vms"] == []


class TestMigration:
    async def test_every_byte_and_tag_survives_across_backings(self, pair):
        """Data and tags (of all-zero pages too) of anon, hugetlb and memfd slots arrive; the source frees all."""
        src, dst = pair
        memory = [{"ipa": RAM, "size": 4 * MiB, "backing": "anon"},
                  {"ipa": RAM2, "size": 4 * MiB, "backing": "hugetlb", "hugepage_size": 2 * MiB},
                  {"ipa": RAM3, "size": MiB, "backing": "memfd", "object": "shared0"}]
        await tagged_vm(src, memory)
        plan = PLAN + [(RAM2 + 2 * MiB + PAGE_SIZE, b"huge", 5), (RAM2, None, 9), (RAM3 + PAGE_SIZE, b"memfd", 1)]
        await fill(src, plan)
        res = await migrate(src, dst)
        assert res["passes"] >= 1 and res["pages"] >= len(plan)
        assert res["tagged-pages"] >= 6 and res["stop-pages"] <= res["pages"]
        await check(dst, plan)
        assert (await dst.guest("ldg", addr=RAM + 2 * MiB, size=16)) == [0]  # never touched: zero
        await assert_gone_from(src)
        with pytest.raises(RemoteError) as info:
            await src.guest("load", addr=RAM, size=1)
        assert info.value.errno == ESTALE and "migrated to host dst" in info.value.message
        assert (await dst.call("status"))["vm"] is not None

    async def test_vcpu_registers_and_stage1_survive(self, pair):
        """SCTLR/TCF, GCR, TCO, TFSR, stage 1 and IRG's state of every vCPU are the same after the move."""
        src, dst = pair
        await tagged_vm(src, vcpus=2)
        await src.guest("enable-mte", vcpu=1, tcf="async", include=0x0F00)
        await src.guest("map", vcpu=1, va=0x10_0000, ipa=RAM, size=PAGE_SIZE, attr="tagged")
        await src.guest("stg", vcpu=1, addr=0x10_0000, tag=2, size=16)
        await src.guest("store", vcpu=1, addr=0x10_0000 | 3 << 56, data=b"x")  # async fault: TFSR set
        await src.guest("tco", vcpu=1, on=True)
        before = await src.vmm.guest_state(None)
        assert before["vcpus"]["1"]["tfsr"] != 0
        await migrate(src, dst)
        assert await dst.vmm.guest_state(None) == before
        assert await dst.guest("read-tfsr", vcpu=1) == before["vcpus"]["1"]["tfsr"]
        assert await dst.guest("ldg", vcpu=1, addr=0x10_0000, size=16) == [2]

    async def test_max_passes_zero_is_stop_and_copy_only(self, pair):
        """With max_passes 0 no pre-copy pass runs and every page goes while the guest is paused."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, PLAN)
        res = await migrate(src, dst, max_passes=0)
        assert res["passes"] == 0 and res["stop-pages"] == res["pages"] >= len(PLAN)
        await check(dst, PLAN)

    async def test_pages_dirtied_during_precopy_are_resent(self, pair):
        """A page written after pass 1 is resent by pass 2 and one written before the pause by the stop-and-copy."""
        src, dst = pair
        late = await migrate_dirtying_during_precopy(src, dst, PLAN)
        await check(dst, PLAN[1:] + late)

    async def test_guest_op_issued_at_the_switchover_waits_then_fails_estale(self, pair, nursery):
        """A guest step issued while the source is paused waits, then gets ESTALE naming the new host."""
        src, dst = pair
        await tagged_vm(src)
        errors = []

        async def late_store():
            try:
                await src.guest("store", addr=RAM, data=b"late")
            except RemoteError as exc:
                errors.append(exc.errno)

        async def hook(point):
            if point == "switchover-paused":
                nursery.start_soon(late_store)
                await trio.testing.wait_all_tasks_blocked()
                assert errors == []

        src.vmm.migration_hook = hook
        await migrate(src, dst)
        with trio.fail_after(5):
            while not errors:
                await trio.sleep(0)
        assert errors == [ESTALE]

    async def test_destination_refusing_mte_is_einval_and_changes_nothing(self, nursery):
        """A destination host without MTE refuses the VM: EINVAL, the source runs on with its slots as before."""
        src = await start_node(nursery, await new_host(nursery))
        dst = await start_node(nursery, await new_host(nursery, mte=False))
        await tagged_vm(src)
        await fill(src, PLAN)
        with pytest.raises(RemoteError) as info:
            await migrate(src, dst)
        assert info.value.errno == EINVAL
        assert src.vmm.slots[0].flags == ()
        await check(src, PLAN)
        await assert_gone_from(dst)

    async def test_destination_out_of_memory_is_enomem_and_the_source_runs_on(self, nursery):
        """A destination host too small for the VM's pages fails ENOMEM; the source resumes with logging off."""
        await migrate_to_a_host_too_small(nursery)

    async def test_nobody_listening_is_econnrefused_and_changes_nothing(self, pair):
        """migrate-out to an address nobody listens at fails ECONNREFUSED before touching the VM."""
        src, _ = pair
        await tagged_vm(src)
        with pytest.raises(RemoteError) as info:
            await src.call("migrate-out", address="mem:999999")
        assert info.value.errno == ECONNREFUSED
        assert src.vmm.slots[0].flags == () and not src.vmm.paused and not src.vmm.migrating
        await src.guest("store", addr=RAM, data=b"still here")

    async def test_wrong_secret_is_eperm(self, nursery):
        """A destination with a secret refuses a source that does not know it (EPERM)."""
        src = await start_node(nursery, await new_host(nursery))
        dst = await start_node(nursery, await new_host(nursery), secret="s3cret")
        await tagged_vm(src)
        address = (await dst.call("migrate-incoming"))["address"]
        with pytest.raises(RemoteError) as info:
            await src.call("migrate-out", address=address, secret="guess")
        assert info.value.errno == EPERM
        dst2 = await start_node(nursery, dst.host, secret="s3cret")
        address = (await dst2.call("migrate-incoming"))["address"]
        await src.call("migrate-out", address=address, secret="s3cret")
        assert (await dst2.call("status"))["vm"] is not None

    async def test_a_slot_that_logged_keeps_its_pages_after_a_failed_migration(self, pair):
        """After a failed migration a slot that logged before still reports every page written since it began."""
        src, dst = pair
        await tagged_vm(src)
        await src.vmm_op("dirty-log", slot=0, action="enable")

        async def hook(point):
            if point == "pass-end:1":
                await src.guest("store", addr=RAM + 70 * PAGE_SIZE, data=b"d")

        src.vmm.migration_hook = hook
        await src.guest("store", addr=RAM + 3 * PAGE_SIZE, data=b"x")
        with pytest.raises(RemoteError) as info:
            await migrate(src, dst, fail="cut", fail_at="switchover")
        assert info.value.errno == ECONNRESET
        assert "log-dirty-pages" in src.vmm.slots[0].flags
        assert {3, 70} <= set(await src.vmm_op("dirty-log", slot=0, action="get"))
        await src.vmm_op("dirty-log", slot=0, action="clear")
        assert await src.vmm_op("dirty-log", slot=0, action="get") == []

    async def test_readonly_and_logging_slots_keep_their_flags(self, pair):
        """A read-only slot arrives read-only with its data; a slot that logged logs on with an empty bitmap."""
        src, dst = pair
        await src.call("vm-create", name="vm0")
        await src.vmm_op("enable-cap", cap="arm-mte")
        rw = await src.vmm_op("mmap", size=MiB, prot=["read", "write"], share="private", backing="anon")
        ro = await src.vmm_op("mmap", size=MiB, prot=["read", "write"], share="shared", backing="memfd")
        await src.vmm_op("set-memory-region", slot=0, ipa=RAM, size=MiB, addr=rw, flags=["log-dirty-pages"])
        await src.vmm_op("set-memory-region", slot=1, ipa=RAM2, size=MiB, addr=ro, flags=["readonly"])
        await src.vmm_op("create-vcpu")
        await src.vmm_op("dma-write", ipa=RAM2 + 5 * PAGE_SIZE, data=b"firmware")
        await src.guest("store", addr=RAM + PAGE_SIZE, data=b"ram")
        assert await src.vmm_op("dirty-log", slot=0, action="get") == [1]
        await migrate(src, dst)
        assert dst.vmm.slots[1].flags == ("readonly",) and "log-dirty-pages" in dst.vmm.slots[0].flags
        assert await dst.vmm_op("dirty-log", slot=0, action="get") == []
        assert await dst.vmm_op("dma-read", ipa=RAM2 + 5 * PAGE_SIZE, size=8) == b"firmware"
        assert await dst.guest("load", addr=RAM2 + 5 * PAGE_SIZE, size=8) == b"firmware"
        assert await dst.guest("load", addr=RAM + PAGE_SIZE, size=3) == b"ram"

    async def test_dma_writes_during_precopy_are_resent(self, pair):
        """A device DMA write during pre-copy (which KVM's log does not see) reaches the destination."""
        src, dst = pair
        await tagged_vm(src)

        async def hook(point):
            if point == "pass-end:1":
                await src.vmm_op("dma-write", ipa=RAM + 11 * PAGE_SIZE, data=b"dma!")

        src.vmm.migration_hook = hook
        await migrate(src, dst)
        assert await dst.guest("load", addr=RAM + 11 * PAGE_SIZE, size=4) == b"dma!"


FAULT_POINTS = ["precopy:1", "precopy:2", "switchover"]


class TestFaults:
    @pytest.mark.parametrize("fail", ["kill-destination", "cut"])
    @pytest.mark.parametrize("fail_at", FAULT_POINTS)
    async def test_destination_side_faults_leave_the_vm_on_the_source(self, pair, fail, fail_at):
        """kill-destination or cut before resume: ECONNRESET, the source resumed and intact, the destination empty."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, PLAN)

        async def hook(point):
            if point == "pass-end:1":
                await src.guest("store", addr=RAM + 40 * PAGE_SIZE, data=b"second pass")

        src.vmm.migration_hook = hook
        with pytest.raises(RemoteError) as info:
            await migrate(src, dst, fail=fail, fail_at=fail_at)
        assert info.value.errno == ECONNRESET
        assert not src.vmm.paused and src.vmm.slots[0].flags == ()
        await check(src, PLAN)
        if fail_at != "precopy:1":  # written after pass 1
            assert await src.guest("load", addr=RAM + 40 * PAGE_SIZE, size=11) == b"second pass"
        await assert_gone_from(dst)
        assert await src.vms() == 1

    @pytest.mark.parametrize("fail_at", FAULT_POINTS)
    async def test_kill_source_before_resume_loses_the_vm_everywhere(self, pair, fail_at):
        """kill-source before resume: the source VMM dies with its VM and the destination discards what it got."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, PLAN)

        async def hook(point):
            if point == "pass-end:1":
                await src.guest("store", addr=RAM + 40 * PAGE_SIZE, data=b"second pass")

        src.vmm.migration_hook = hook
        with pytest.raises(ConnectionClosed):
            await migrate(src, dst, fail="kill-source", fail_at=fail_at)
        with trio.fail_after(10):
            while await dst.vms() or await src.vms():
                await trio.sleep(0.01)
        await assert_gone_from(dst)
        await assert_gone_from(src)

    @pytest.mark.parametrize("fail", ["kill-destination", "cut", "kill-source"])
    async def test_faults_after_resume_leave_the_vm_on_the_destination(self, pair, fail):
        """Any fault at after-resume: the migration returns ok and the VM runs on the destination."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, PLAN)
        res = await migrate(src, dst, fail=fail, fail_at="after-resume")
        assert res["pages"] >= len(PLAN)
        await check(dst, PLAN)
        if fail == "kill-source":
            with trio.fail_after(10):
                while not src.dead:
                    await trio.sleep(0.01)
        await assert_gone_from(src)

    async def test_a_point_never_reached_injects_nothing(self, pair, nursery):
        """precopy:5 in a migration of two passes, and precopy:1 with max_passes 0, inject nothing."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, PLAN)
        res = await migrate(src, dst, fail="kill-destination", fail_at="precopy:5")
        assert res["passes"] <= 2
        await check(dst, PLAN)
        again = await start_node(nursery, src.host)
        res = await migrate(dst, again, fail="cut", fail_at="precopy:1", max_passes=0)
        assert res["passes"] == 0
        await check(again, PLAN)


class TestZoo:
    """Each VMM-side zoo bug changes the outcome of a directed interleaving; the fixed VMM does not."""

    @pytest.mark.parametrize("bugs", [[], ["migration-zero-page-drops-tags"]])
    async def test_zero_page_drops_tags(self, pair, bugs):
        """An all-zero page's tags arrive, unless the zero-page shortcut sends it as a marker without them."""
        src, dst = pair
        await tagged_vm(src)
        await src.guest("stg", addr=RAM + 5 * PAGE_SIZE, tag=7, size=PAGE_SIZE)
        res = await migrate(src, dst, bugs=bugs)
        tags = await dst.guest("ldg", addr=RAM + 5 * PAGE_SIZE, size=16)
        assert tags == ([0] if bugs else [7])
        assert res["tagged-pages"] == (0 if bugs else 1)

    @pytest.mark.parametrize("bugs", [[], ["migration-tags-before-final-sync"]])
    async def test_tags_before_final_sync(self, pair, bugs):
        """A tag stored between the early tag read and the final sync arrives, unless the tags were read early."""
        src, dst = pair
        await tagged_vm(src)
        page = RAM + 8 * PAGE_SIZE
        await fill(src, [(page, b"v1", 5)])

        async def hook(point):
            if point == "precopy-done":
                await src.guest("store", addr=page | 5 << 56, data=b"v2")  # dirty again, tag 5
            if point == "pause":
                await src.guest("stg", addr=page, tag=9, size=PAGE_SIZE)

        src.vmm.migration_hook = hook
        await migrate(src, dst, bugs=bugs, max_passes=1)
        tags = await dst.guest("ldg", addr=page, size=16)
        assert tags == ([5] if bugs else [9])

    @pytest.mark.parametrize("bugs", [[], ["migration-resume-before-tags"]])
    async def test_resume_before_tags(self, pair, nursery, bugs):
        """A guest load right at the destination's resume sees the tags, unless it resumed before writing them."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, [(RAM, b"x", 6)])
        seen = []

        async def hook(point):
            if point == "resumed":
                seen.append(await dst.guest("ldg", addr=RAM, size=16))

        dst.vmm.migration_hook = hook
        await migrate(src, dst, bugs=bugs)
        assert seen == ([[0]] if bugs else [[6]])
        assert await dst.guest("ldg", addr=RAM, size=16) == [6]  # written right after, either way


class TestMalformedStream:
    """Whatever the source sends, the destination VMM does not crash: it discards and shuts down."""

    @staticmethod
    def frames(*records, header: bytes | None = None) -> bytes:
        out = [header if header is not None else migstream._HEADER.pack(migstream.MAGIC, migstream.VERSION)]
        for r in records:
            body = r if isinstance(r, bytes) else msgpack.packb(r, use_bin_type=True)
            out.append(migstream._LENGTH.pack(len(body)) + body)
        return b"".join(out)

    @staticmethod
    def records(data: bytes) -> list:
        """The records in what a destination sent (after its header)."""
        out, at = [], migstream._HEADER.size
        while at < len(data):
            (n,) = migstream._LENGTH.unpack_from(data, at)
            out.append(msgpack.unpackb(data[at + 4:at + 4 + n]))
            at += 4 + n
        return out

    HELLO = {"t": "hello", "version": 1, "name": "vm0", "auth": None}
    LAYOUT = {"t": "layout", "mte": True, "ipa_bits": 40, "vcpus": 1,
              "slots": [{"slot": 0, "ipa": RAM, "size": MiB, "flags": [], "backing": "anon", "object": None,
                         "hugepage_size": 2 * MiB, "prot_mte": False, "share": "private"}]}

    @pytest.mark.parametrize("payload", [
        "http",
        "bad-version", "huge-length", "not-msgpack", "not-a-map", "unknown-type", "extra-key", "hello-twice",
        "page-outside", "tags-wrong-size", "end-without-vcpus", "deep-witness", "truncated",
    ])
    async def test_malformed_input_ends_the_migration_without_a_crash(self, nursery, payload):
        """Garbage, a wrong version, bad records or a truncated stream: EPROTO/ECONNRESET, nothing left, no crash."""
        dst = await start_node(nursery, await new_host(nursery))
        address = (await dst.call("migrate-incoming"))["address"]
        h, lay = self.HELLO, self.LAYOUT
        page = {"t": "pages", "pass": 1, "slot": 0, "first": 0, "data": bytes(PAGE_SIZE), "tags": bytes(256)}
        deep: object = {}
        for _ in range(100):
            deep = {"a": deep}
        data = {
            "http": b"GET / HTTP/1.0\r\n\r\n" + bytes(64),
            "bad-version": self.frames(header=migstream._HEADER.pack(migstream.MAGIC, 99)),
            "huge-length": self.frames() + migstream._LENGTH.pack(1 << 31),
            "not-msgpack": self.frames(b"\xc1\xc1\xc1"),
            "not-a-map": self.frames([1, 2, 3]),
            "unknown-type": self.frames({"t": "bogus"}),
            "extra-key": self.frames({**h, "x": 1}),
            "hello-twice": self.frames(h, h),
            "page-outside": self.frames(h, lay, {**page, "first": 256}),
            "tags-wrong-size": self.frames(h, lay, {**page, "tags": b"\1"}),
            "end-without-vcpus": self.frames(h, lay, page, {"t": "end"}),
            "deep-witness": self.frames(h, lay, page, {"t": "witness", "entries": deep}),
            "truncated": self.frames(h, lay)[:-5],
        }.get(payload, payload)
        stream = await dst.vmm.migration.dial(address, None)
        await stream.send_all(data)
        got = bytearray()
        if payload != "truncated":  # (a truncated stream: the source goes away mid-record)
            with trio.fail_after(10):
                while chunk := await stream.receive_some(1 << 16):  # the destination answers, then closes
                    got += chunk
            last = self.records(bytes(got))[-1]
            assert (last["t"], last["errno"]) == ("error", EPROTO), last
        await stream.aclose()
        with trio.fail_after(10):
            await dst.vmm.done.wait()
        await assert_gone_from(dst)


@pytest.fixture
def pipelined(monkeypatch):
    """Migrations overlap their stages (as between processes), in chunks of 8 pages (many chunks per run)."""
    monkeypatch.setattr(InProcessTransport, "pipelined", True)
    monkeypatch.setattr(guestram, "CHUNK_PAGES", 8)


#: Many pages over several runs and chunks: 40 consecutive pages (5 chunks), then the PLAN's.
MANY = [(RAM + (100 + i) * PAGE_SIZE, bytes([i + 1]) * (i + 1), i % 15 + 1) for i in range(40)] + PLAN


class TestPipelined:
    """The pipelined stages (ProcessTransport's) give the same migration as one stage after the other."""

    async def test_same_result_as_one_stage_after_the_other(self, nursery, monkeypatch):
        """Every byte and tag arrives with the same stats whether the stages overlap or not."""
        monkeypatch.setattr(guestram, "CHUNK_PAGES", 8)
        real, pipelines = migration._pipeline, []

        async def spy(produce, consume, **kw):
            pipelines.append(produce.__name__)
            await real(produce, consume, **kw)

        monkeypatch.setattr(migration, "_pipeline", spy)
        results = []
        for on in (False, True):
            monkeypatch.setattr(InProcessTransport, "pipelined", on)
            src = await start_node(nursery, await new_host(nursery))
            dst = await start_node(nursery, await new_host(nursery))
            await tagged_vm(src)
            await fill(src, MANY)
            results.append(await migrate(src, dst))
            await check(dst, MANY)
            await assert_gone_from(src)
            assert ("read_all" in pipelines and "receive_all" in pipelines) == on, pipelines
        assert results[0] == results[1] and results[1]["pages"] >= len(MANY)

    async def test_pages_dirtied_during_precopy_are_resent(self, pair, pipelined):
        """Pipelined: pages written after pass 1 and before the pause arrive."""
        src, dst = pair
        late = await migrate_dirtying_during_precopy(src, dst, MANY)
        await check(dst, MANY[:-len(PLAN)] + PLAN[1:] + late)

    @pytest.mark.parametrize("fail", ["kill-destination", "cut"])
    @pytest.mark.parametrize("fail_at", ["precopy:1", "switchover"])
    async def test_destination_side_faults_leave_the_vm_on_the_source(self, pair, pipelined, fail, fail_at):
        """Pipelined: kill-destination or cut before resume is ECONNRESET and the VM runs on at the source."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, MANY)
        with pytest.raises(RemoteError) as info:
            await migrate(src, dst, fail=fail, fail_at=fail_at)
        assert info.value.errno == ECONNRESET
        assert not src.vmm.paused and src.vmm.slots[0].flags == ()
        await check(src, MANY)
        await assert_gone_from(dst)

    async def test_kill_source_midway_loses_the_vm_everywhere(self, pair, pipelined):
        """Pipelined: kill-source at precopy:1 (reads ahead in flight) leaves the VM nowhere."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, MANY)
        with pytest.raises(ConnectionClosed):
            await migrate(src, dst, fail="kill-source", fail_at="precopy:1")
        with trio.fail_after(10):
            while await dst.vms() or await src.vms():
                await trio.sleep(0.01)
        await assert_gone_from(dst)

    async def test_destination_out_of_memory_midway_is_enomem(self, nursery, pipelined):
        """Pipelined: a destination that runs out of memory after some chunks fails ENOMEM; the source runs on."""
        await migrate_to_a_host_too_small(nursery)

    async def test_a_read_error_midway_is_raised_in_its_turn(self, pair, pipelined, monkeypatch):
        """Pipelined: a chunk the source cannot read fails the migration with that chunk's errno, after the
        chunks before it were sent; the VM runs on at the source."""
        src, dst = pair
        await tagged_vm(src)
        await fill(src, MANY)
        real = guestram.read_pages
        calls = []

        async def failing(vmm, slot, first, count, ctx, **kw):
            calls.append(first)
            if len(calls) == 3:
                raise RemoteError(EINVAL, "injected")
            return await real(vmm, slot, first, count, ctx, **kw)

        monkeypatch.setattr(guestram, "read_pages", failing)
        with pytest.raises(RemoteError) as info:
            await migrate(src, dst)
        assert info.value.errno == EINVAL and "injected" in info.value.message
        assert not src.vmm.paused and src.vmm.slots[0].flags == ()
        await check(src, MANY)
        await assert_gone_from(dst)
