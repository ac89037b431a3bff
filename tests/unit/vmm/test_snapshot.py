"""VM snapshots (vmm.snapshot: the snapshot and restore VMM ops) against the in-process hypervisor and guest."""

from __future__ import annotations

import os
import random
import struct

import pytest
import trio
import trio.testing
from support import vmm_with_client

from hypervisor.kernel import Kernel
from mtekvm.links import InProcessHost
from shared import snapfile
from shared.errno import EBUSY, EINVAL, ENOENT
from shared.mte import PAGE_SIZE
from shared.wire import Client, RemoteError
from vmm import guestram
from vmm import snapshot as vsnap
from vmm.machine import Vmm

MiB = 1 << 20
RAM = 0x4000_0000
RAM2 = 0x8000_0000
T = snapfile.TAGS_PER_PAGE
MEMORY = [{"ipa": RAM, "size": MiB, "backing": "memfd"}, {"ipa": RAM2, "size": MiB, "backing": "anon"}]


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
        memory = memory if memory is not None else MEMORY
        return await self.call("vm-setup", name=self.vmm.name, mte=mte, vcpus=vcpus, memory=memory)

    async def fails(self, errno: int, op: str, /, **args) -> RemoteError:
        with pytest.raises(RemoteError) as info:
            await self.vmm_op(op, **args)
        assert info.value.errno == errno, f"{op}: wanted errno {errno}, got {info.value}"
        return info.value

    async def memory(self, mte: bool = True) -> list[tuple[bytes, bytes | None]]:
        """Every RAM slot's data and tags, read through the VMM (what a guest could observe)."""
        out = []
        for slot in guestram.ram_slots(self.vmm):
            data = (await self.vmm._call("load", {"addr": slot.addr, "size": slot.size}, None)).value
            tags = await guestram.read_tags(self.vmm, slot.ipa, slot.size, None) if mte else None
            out.append((bytes(data), tags))
        return out

    async def everything(self, mte: bool = True):
        """Memory, tags and vCPU state: what must not change when a restore is refused."""
        return await self.memory(mte), await self.vmm.guest_state(None)


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


async def tagged_vm(rig: Rig, vcpus: int = 1) -> None:
    """An MTE VM whose guest has MTE on (sync) and both slots mapped tagged at their IPAs."""
    await rig.setup(vcpus=vcpus)
    await rig.guest("enable-mte", tcf="sync")
    await rig.guest("map", va=RAM, ipa=RAM, size=MiB, attr="tagged")
    await rig.guest("map", va=RAM2, ipa=RAM2, size=MiB, attr="tagged")


async def fill(rig: Rig) -> None:
    """Data and tags: a tagged page, an untagged data page, an all-zero page with tags, in both slots."""
    await rig.guest("store", addr=RAM, data=b"first page" * 100)
    await rig.guest("stg", addr=RAM + PAGE_SIZE, tag=3, size=PAGE_SIZE)
    await rig.guest("store", addr=RAM + PAGE_SIZE, tag=3, data=b"\x7f" * PAGE_SIZE)
    await rig.guest("stg", addr=RAM + 5 * PAGE_SIZE + 64, tag=9, size=32)          # zero data, tags 9
    await rig.guest("store", addr=RAM2 + 200 * PAGE_SIZE, data=b"anon" * 1024)
    await rig.guest("stg", addr=RAM2 + 201 * PAGE_SIZE, tag=15, size=PAGE_SIZE)    # zero data, tags 15


async def scribble(rig: Rig) -> None:
    """Change data and tags everywhere fill() wrote and in pages it left untouched (they must read zero again)."""
    for base in (RAM, RAM2):
        for p in (0, 1, 2, 5, 7, 200, 201, 255):
            await rig.guest("stg", addr=base + p * PAGE_SIZE, tag=6, size=PAGE_SIZE)
            await rig.guest("store", addr=base + p * PAGE_SIZE, tag=6, data=bytes([0xEE]) * PAGE_SIZE)


def region_offsets(blob: bytes) -> dict[str, list[int]]:
    """Offsets in each region of a snapshot file (magic, version, header length, header, records, trailer)."""
    _, _, hlen = snapfile.PREAMBLE.unpack_from(blob, 0)
    body = snapfile.PREAMBLE.size + hlen
    n = len(blob)
    regions = {"magic": (0, 8), "version": (8, 12), "header-length": (12, 16), "header": (16, body),
               "record-header": (body, body + snapfile.RECORD.size),
               "records": (body + snapfile.RECORD.size, n - snapfile.TRAILER_SIZE),
               "trailer": (n - snapfile.TRAILER_SIZE, n - snapfile.DIGEST_SIZE),
               "digest": (n - snapfile.DIGEST_SIZE, n)}
    rng = random.Random(1)
    # every offset of the small regions, the ends, middle and six random offsets of the large ones
    return {name: sorted(set(range(lo, hi)) if hi - lo <= 64 else
                         {lo, hi - 1, (lo + hi) // 2, *(rng.randrange(lo, hi) for _ in range(6))})
            for name, (lo, hi) in regions.items()}


class TestRoundTrip:
    async def test_data_and_tags_come_back_including_tags_on_an_all_zero_page(self, rig, tmp_path):
        """After snapshot, scribbling and restore, every byte and tag reads as at the snapshot, zero-data tags too."""
        await tagged_vm(rig)
        await fill(rig)
        before = await rig.memory()
        path = str(tmp_path / "vm0.snap")
        got = await rig.vmm_op("snapshot", path=path)
        assert got == {"pages": 5, "tagged-pages": 3}
        await scribble(rig)
        assert await rig.memory() != before
        assert await rig.vmm_op("restore", path=path) == got
        assert await rig.memory() == before
        assert await rig.guest("ldg", addr=RAM + 5 * PAGE_SIZE + 64, size=32) == [9, 9]
        assert await rig.guest("load", addr=RAM + PAGE_SIZE, tag=3, size=4) == b"\x7f" * 4
        assert await rig.guest("ldg", addr=RAM2 + 201 * PAGE_SIZE, size=16) == [15]
        assert not rig.vmm.paused

    @pytest.mark.parametrize("seed", range(4))
    async def test_random_memory_round_trips(self, rig, tmp_path, seed):
        """Random pages of random (often zero) data and tags, then random scribbles: restore gives the memory back."""
        rng = random.Random(seed)
        await tagged_vm(rig)

        async def scatter(k: int) -> None:
            for _ in range(k):
                base = rng.choice((RAM, RAM2)) + rng.randrange(256) * PAGE_SIZE
                off = rng.randrange(0, PAGE_SIZE, 16)
                n = min(rng.choice((16, 256, PAGE_SIZE)), PAGE_SIZE - off)
                tag = rng.choice((0, 0, rng.randrange(1, 16)))
                await rig.guest("stg", addr=base + off, tag=tag, size=n)
                data = rng.choice((bytes(n), rng.randbytes(n)))
                await rig.guest("store", addr=base + off, tag=tag, data=data)

        await scatter(40)
        before = await rig.memory()
        path = str(tmp_path / f"r{seed}")
        got = await rig.vmm_op("snapshot", path=path)
        pages = [(d[i:i + PAGE_SIZE], t[i // 16:(i + PAGE_SIZE) // 16]) for d, t in before
                 for i in range(0, len(d), PAGE_SIZE)]
        assert got == {"pages": sum(1 for d, t in pages if any(d) or any(t)),
                       "tagged-pages": sum(1 for _, t in pages if any(t))}
        await scatter(40)
        await rig.vmm_op("restore", path=path)
        assert await rig.memory() == before

    async def test_left_out_pages_read_zero_data_and_zero_tags_after_restore(self, rig, tmp_path):
        """Pages the snapshot left out (never touched, or all zero) read zero data and zero tags after restore."""
        await tagged_vm(rig)
        await rig.guest("store", addr=RAM + 3 * PAGE_SIZE, data=b"x")
        await rig.guest("store", addr=RAM + 3 * PAGE_SIZE, data=b"\x00")  # resident, all zero again
        path = str(tmp_path / "s")
        assert await rig.vmm_op("snapshot", path=path) == {"pages": 0, "tagged-pages": 0}
        await scribble(rig)
        await rig.guest("store", addr=RAM + 3 * PAGE_SIZE, data=b"y" * 16)
        await rig.vmm_op("restore", path=path)
        for data, tags in await rig.memory():
            assert data == bytes(MiB) and tags == bytes(MiB // 16)
        assert await rig.guest("ldg", addr=RAM2 + 7 * PAGE_SIZE, size=64) == [0, 0, 0, 0]

    async def test_left_out_private_anon_pages_are_discarded(self, rig, tmp_path):
        """Restore gives left-out private anonymous pages back to the host; shared (memfd) pages are zeroed in place."""
        await tagged_vm(rig)
        await rig.guest("store", addr=RAM2 + 9 * PAGE_SIZE, data=b"kept")
        path = str(tmp_path / "s")
        await rig.vmm_op("snapshot", path=path)
        await scribble(rig)
        await rig.vmm_op("restore", path=path)
        memfd, anon = guestram.ram_slots(rig.vmm)
        resident = await guestram.mincore(rig.vmm, anon, 0, anon.pages, None)
        assert [i for i, r in enumerate(resident) if r] == [9]
        assert sum(await guestram.mincore(rig.vmm, memfd, 0, memfd.pages, None)) == 8  # scribbled, now zero
        (data, tags), (data2, tags2) = await rig.memory()
        assert data == bytes(MiB) and tags == bytes(MiB // 16) and not any(tags2)
        assert data2 == bytes(9 * PAGE_SIZE) + b"kept" + bytes(MiB - 9 * PAGE_SIZE - 4)

    async def test_vcpu_state_round_trip(self, rig, tmp_path):
        """SCTLR_EL1 ATA/TCF, GCR_EL1, TFSR_EL1, PSTATE.TCO and stage 1 of every vCPU are restored as saved."""
        await rig.setup(vcpus=2)
        await rig.guest("enable-mte", vcpu=1, tcf="asymm", include=0x00F0)
        await rig.guest("tco", vcpu=1, on=True)
        await rig.guest("map", va=0x10_0000, ipa=RAM, size=8 * PAGE_SIZE, attr="tagged")
        saved = await rig.vmm.guest_state(None)
        path = str(tmp_path / "regs")
        await rig.vmm_op("snapshot", path=path)
        await rig.guest("enable-mte", vcpu=1, tcf="sync")
        await rig.guest("enable-mte", vcpu=0, tcf="async")
        await rig.guest("tco", vcpu=1, on=False)
        await rig.guest("map", va=0x20_0000, ipa=RAM2, size=PAGE_SIZE, attr="normal")
        assert await rig.vmm.guest_state(None) != saved
        await rig.vmm_op("restore", path=path)
        assert await rig.vmm.guest_state(None) == saved

    async def test_restore_into_another_vm_with_the_same_layout(self, rig, nursery, host, tmp_path):
        """A snapshot loads into a second VM of the same memslots, vCPU count and MTE setting, data and tags."""
        await tagged_vm(rig)
        await fill(rig)
        path = str(tmp_path / "move")
        await rig.vmm_op("snapshot", path=path)
        other = await make_rig(nursery, host, "vm1")
        await tagged_vm(other)
        await scribble(other)
        await other.vmm_op("restore", path=path)
        assert await other.memory() == await rig.memory()
        assert await other.vmm.guest_state(None) == await rig.vmm.guest_state(None)
        await other.vmm.shutdown()

    @pytest.mark.parametrize("backing", ["anon", "anon-shared", "memfd", "shmem", "hugetlb"])
    async def test_every_ram_backing_round_trips(self, rig, tmp_path, backing):
        """Data and tags of a slot of each RAM backing kind come back, and its untouched pages read zero."""
        await rig.setup(memory=[{"ipa": RAM, "size": 2 * MiB, "backing": backing}])
        await rig.guest("enable-mte", tcf="sync")
        await rig.guest("map", va=RAM, ipa=RAM, size=2 * MiB, attr="tagged")
        await rig.guest("stg", addr=RAM + 3 * PAGE_SIZE, tag=4, size=PAGE_SIZE)
        await rig.guest("store", addr=RAM + 3 * PAGE_SIZE, tag=4, data=b"hello")
        await rig.guest("stg", addr=RAM + 400 * PAGE_SIZE, tag=2, size=16)
        before = await rig.memory()
        path = str(tmp_path / backing)
        assert await rig.vmm_op("snapshot", path=path) == {"pages": 2, "tagged-pages": 2}
        for p in (3, 10, 400, 511):
            await rig.guest("stg", addr=RAM + p * PAGE_SIZE, tag=8, size=PAGE_SIZE)
            await rig.guest("store", addr=RAM + p * PAGE_SIZE, tag=8, data=b"\xaa" * PAGE_SIZE)
        await rig.vmm_op("restore", path=path)
        assert await rig.memory() == before

    async def test_a_read_only_slot_is_restored_and_stays_read_only(self, rig, tmp_path):
        """Tags of a read-only memslot are restored (registered writable for the copy), and it is read-only after."""
        await tagged_vm(rig)
        await fill(rig)
        before = await rig.memory()
        path = str(tmp_path / "ro")
        await rig.vmm_op("snapshot", path=path)
        await scribble(rig)
        hva = rig.vmm.slots[1].addr
        await rig.vmm_op("set-memory-region", slot=1, ipa=RAM2, size=0, addr=hva)
        await rig.vmm_op("set-memory-region", slot=1, ipa=RAM2, size=MiB, addr=hva, flags=["readonly"])
        await rig.vmm_op("restore", path=path)
        assert await rig.memory() == before
        assert rig.vmm.slots[1].flags == ("readonly",)
        with pytest.raises(RemoteError):  # KVM refuses to change READONLY in place: it really is registered so
            await rig.vmm_op("set-memory-region", slot=1, ipa=RAM2, size=MiB, addr=hva)

    async def test_a_vm_without_vcpus_round_trips_its_memory(self, rig, tmp_path):
        """A manually built VM with memory but no vCPU (no guest yet) snapshots and restores its memory."""
        await rig.call("vm-create", name="vm0")
        await rig.vmm_op("enable-cap", cap="arm-mte")
        hva = await rig.vmm_op("mmap", size=MiB, prot=["read", "write"], share="shared", backing="memfd")
        await rig.vmm_op("set-memory-region", slot=0, ipa=RAM, size=MiB, addr=hva)
        await rig.vmm_op("dma-write", ipa=RAM + PAGE_SIZE, data=b"device wrote this")
        await rig.vmm_op("copy-tags", ipa=RAM + 2 * PAGE_SIZE, length=PAGE_SIZE, direction="to-guest", tags=7)
        before = await rig.memory()
        path = str(tmp_path / "novcpu")
        assert await rig.vmm_op("snapshot", path=path) == {"pages": 2, "tagged-pages": 1}
        await rig.vmm_op("dma-write", ipa=RAM + PAGE_SIZE, data=b"overwritten")
        await rig.vmm_op("copy-tags", ipa=RAM, length=3 * PAGE_SIZE, direction="to-guest", tags=1)
        await rig.vmm_op("restore", path=path)
        assert await rig.memory() == before

    async def test_a_vm_without_mte_round_trips_its_data(self, rig, tmp_path):
        """A VM without MTE snapshots and restores its data; tagged-pages is 0."""
        await rig.setup(mte=False)
        await rig.guest("map", va=RAM, ipa=RAM, size=MiB, attr="normal")
        await rig.guest("store", addr=RAM + 9 * PAGE_SIZE, data=b"plain")
        before = await rig.memory(mte=False)
        path = str(tmp_path / "plain")
        assert await rig.vmm_op("snapshot", path=path) == {"pages": 1, "tagged-pages": 0}
        await rig.guest("store", addr=RAM + 9 * PAGE_SIZE, data=b"other")
        await rig.guest("store", addr=RAM + 10 * PAGE_SIZE, data=b"more")
        await rig.vmm_op("restore", path=path)
        assert await rig.memory(mte=False) == before

    async def test_the_file_is_in_the_documented_format(self, rig, tmp_path):
        """The file starts with the magic and version and parses to the VM's layout, vCPUs and MTE setting."""
        await tagged_vm(rig, vcpus=2)
        await fill(rig)
        path = tmp_path / "fmt"
        await rig.vmm_op("snapshot", path=str(path))
        blob = path.read_bytes()
        assert blob[:8] == snapfile.MAGIC and struct.unpack_from("<I", blob, 8) == (snapfile.VERSION,)
        snap = snapfile.parse(blob)
        assert [(s.ipa, s.size, s.backing) for s in snap.header.layout] == [(RAM, MiB, "memfd"), (RAM2, MiB, "anon")]
        assert (snap.header.vcpus, snap.header.mte, snap.pages, snap.tagged_pages) == (2, True, 5, 3)

    async def test_an_existing_file_is_replaced_and_no_temporary_file_remains(self, rig, tmp_path):
        """snapshot over an existing file replaces it whole (mode as open(2) gives) and leaves nothing else behind."""
        await tagged_vm(rig)
        path = tmp_path / "again"
        path.write_bytes(b"old contents")
        await fill(rig)
        await rig.vmm_op("snapshot", path=str(path))
        assert snapfile.parse(path.read_bytes()).pages == 5
        assert os.listdir(tmp_path) == ["again"]
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    async def test_guest_steps_wait_while_the_snapshot_reads_memory(self, rig, nursery, tmp_path, monkeypatch):
        """A guest store issued during a snapshot runs only after it, so the file holds the memory from before."""
        await tagged_vm(rig)
        await fill(rig)
        reading, release = trio.Event(), trio.Event()
        real = guestram.read_pages

        async def slow(*a, **k):
            reading.set()
            await release.wait()
            return await real(*a, **k)

        monkeypatch.setattr(guestram, "read_pages", slow)
        path = str(tmp_path / "paused")
        done: list[str] = []

        async def snap():
            await rig.vmm_op("snapshot", path=path)
            done.append("snapshot")

        async def store():
            await rig.guest("store", addr=RAM, data=b"late")
            done.append("store")

        nursery.start_soon(snap)
        await reading.wait()
        nursery.start_soon(store)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [] and rig.vmm.paused
        release.set()
        with trio.fail_after(10):
            while len(done) < 2:
                await trio.sleep(0.01)
        assert await rig.guest("load", addr=RAM, size=4) == b"late"
        await rig.vmm_op("restore", path=path)
        assert await rig.guest("load", addr=RAM, size=5) == b"first"

    async def test_a_failed_snapshot_keeps_the_old_file_and_resumes(self, rig, tmp_path, monkeypatch):
        """A snapshot failing midway leaves the existing file as it was, no temporary file, and the VM running."""
        await tagged_vm(rig)
        await fill(rig)
        path = tmp_path / "keep"
        path.write_bytes(b"old contents")

        async def broken(*a, **k):
            raise vsnap.VmmError(EINVAL, "injected")

        monkeypatch.setattr(guestram, "read_pages", broken)
        await rig.fails(EINVAL, "snapshot", path=str(path))
        assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["keep"]
        assert not rig.vmm.paused
        await rig.guest("store", addr=RAM, data=b"still runs")


class TestErrors:
    async def test_paths(self, rig, tmp_path):
        """A relative path or a name alone is EINVAL; a missing folder (snapshot) or file (restore) is ENOENT."""
        await tagged_vm(rig)
        await rig.fails(EINVAL, "snapshot", path="relative/file")
        await rig.fails(EINVAL, "snapshot", name="snap1")
        await rig.fails(EINVAL, "restore")
        await rig.fails(ENOENT, "snapshot", path=str(tmp_path / "no" / "such"))
        await rig.fails(ENOENT, "restore", path=str(tmp_path / "missing"))
        await rig.fails(EINVAL, "restore", path=str(tmp_path))

    async def test_a_fifo_or_device_is_einval_without_blocking(self, rig, tmp_path):
        """restore of a FIFO (which would block a reader) or a character device is EINVAL, at once."""
        await tagged_vm(rig)
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with trio.fail_after(10):
            await rig.fails(EINVAL, "restore", path=str(fifo))
            await rig.fails(EINVAL, "restore", path="/dev/null")

    async def test_errors_come_in_the_contract_order_and_change_nothing(self, rig, nursery, host, tmp_path):
        """ENOENT, then EINVAL (damaged), EINVAL (layout), EBUSY: each leaves data, tags and registers unchanged."""
        await tagged_vm(rig)
        await fill(rig)
        good = str(tmp_path / "good")
        await rig.vmm_op("snapshot", path=good)
        other = await make_rig(nursery, host, "vm1")
        await other.setup(memory=[{"ipa": RAM, "size": MiB, "backing": "memfd"}])
        foreign = str(tmp_path / "foreign")
        await other.vmm_op("snapshot", path=foreign)
        await other.vmm.shutdown()
        damaged = tmp_path / "damaged"
        blob = bytearray((tmp_path / "good").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        damaged.write_bytes(blob)
        await scribble(rig)
        await rig.vmm_op("dirty-log", slot=1, action="enable")
        before = await rig.everything()
        await rig.fails(ENOENT, "restore", path=str(tmp_path / "missing"))
        err = await rig.fails(EINVAL, "restore", path=str(damaged))
        assert "damaged" in err.message
        err = await rig.fails(EINVAL, "restore", path=foreign)
        assert "layout" in err.message
        err = await rig.fails(EBUSY, "restore", path=good)
        assert await rig.everything() == before
        await rig.vmm_op("dirty-log", slot=1, action="disable")
        await rig.vmm_op("restore", path=good)
        assert await rig.everything() != before

    @pytest.mark.parametrize("other,why", [
        ({"memory": [{"ipa": RAM, "size": MiB, "backing": "memfd"}, {"ipa": RAM2, "size": 2 * MiB,
                                                                       "backing": "anon"}]}, "layout"),
        ({"memory": [{"ipa": RAM, "size": MiB, "backing": "shmem"}, {"ipa": RAM2, "size": MiB,
                                                                       "backing": "anon"}]}, "layout"),
        ({"vcpus": 2}, "vCPU"),
        ({"mte": False}, "MTE"),
    ])
    async def test_another_layout_vcpu_count_or_mte_setting_is_einval(self, rig, nursery, host, tmp_path,
                                                                      other, why):
        """A snapshot of a VM with other slots (size, backing), vCPU count or MTE setting is EINVAL, nothing changed."""
        await tagged_vm(rig)
        await fill(rig)
        theirs = await make_rig(nursery, host, "vm1")
        await theirs.setup(**({"memory": MEMORY} | other))
        path = str(tmp_path / "theirs")
        await theirs.vmm_op("snapshot", path=path)
        await theirs.vmm.shutdown()
        before = await rig.everything()
        err = await rig.fails(EINVAL, "restore", path=path)
        assert why in err.message
        assert await rig.everything() == before

    async def test_truncated_and_corrupted_files_are_einval_and_change_nothing(self, rig, tmp_path):
        """A file cut, extended or with a byte changed in any region (magic ... trailer) is EINVAL, VM unchanged."""
        await tagged_vm(rig)
        await fill(rig)
        good = tmp_path / "good"
        await rig.vmm_op("snapshot", path=str(good))
        blob = good.read_bytes()
        await scribble(rig)
        before = await rig.everything()
        bad = tmp_path / "bad"
        cases = [blob + b"\x00", blob + blob[-64:]]
        for name, offsets in region_offsets(blob).items():
            for off in offsets:
                cases.append(blob[:off])
                flipped = bytearray(blob)
                flipped[off] ^= 0x41
                cases.append(bytes(flipped))
                assert off < len(blob), name
        for case in cases:
            bad.write_bytes(case)
            await rig.fails(EINVAL, "restore", path=str(bad))
        assert await rig.everything() == before

    async def test_a_vcpu_state_the_guest_refuses_changes_nothing(self, rig, tmp_path):
        """A well-formed file whose vCPU state the guest refuses is EINVAL and leaves memory and registers alone."""
        await tagged_vm(rig)
        await fill(rig)
        good = tmp_path / "good"
        await rig.vmm_op("snapshot", path=str(good))
        snap = snapfile.parse(good.read_bytes())
        state = snap.header.vcpu_state
        state["vcpus"]["0"]["tcf"] = "bogus"
        header = snapfile.Header(snap.header.layout, snap.header.vcpus, snap.header.mte, state)
        runs = [(r.slot, r.first, bytes(r.data), bytes(r.tags) if r.tags is not None else None)
                for r in snap.records]
        bad = tmp_path / "bad"
        bad.write_bytes(snapfile.encode(header, runs))
        await scribble(rig)
        before = await rig.everything()
        await rig.fails(EINVAL, "restore", path=str(bad))
        assert await rig.everything() == before

    async def test_a_failure_while_writing_memory_puts_the_registers_back(self, rig, tmp_path, monkeypatch):
        """If a memory write fails midway, restore fails, the vCPUs keep their registers and the VM runs on."""
        await tagged_vm(rig)
        await fill(rig)
        path = str(tmp_path / "snap")
        await rig.vmm_op("snapshot", path=path)
        await rig.guest("enable-mte", tcf="async")
        regs = await rig.vmm.guest_state(None)

        async def broken(*a, **k):
            raise vsnap.VmmError(EINVAL, "injected")

        monkeypatch.setattr(guestram, "write_tags", broken)
        await rig.fails(EINVAL, "restore", path=path)
        assert await rig.vmm.guest_state(None) == regs
        assert not rig.vmm.paused
