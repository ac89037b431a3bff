"""The destination's and source's per-page paths of a live migration (ghost-import of runs, bulk zap,
fresh-page stores): the same state as the general paths, the oracles as exact."""

from __future__ import annotations

import msgpack
from support import RWM, Vm, invariants

from hypervisor import ghost as ghost_mod
from hypervisor.kernel import Kernel

PAGE = 4096
IPA = 0x4000_0000


async def _stored_vm(k: Kernel, pages: int = 8, name: str = "vmm:vm0") -> Vm:
    """An MTE VM whose ``pages`` pages each hold data (page i: byte i + 1) and tag 5."""
    vm = await Vm.create(k, name=name)
    await vm.ram(0, IPA, 2 * pages * PAGE, prot=RWM)
    for i in range(pages):
        await vm.store(IPA + i * PAGE, bytes([i + 1]) * PAGE)
        await vm.stg(IPA + i * PAGE, PAGE, tag=5)
    return vm


class TestGhostImportOfRuns:
    async def test_dropped_entries_let_go_of_their_pages(self, monkeypatch):
        """ghost-import of runs over pages the destination stored gives each page a new entry holding the
        source's digest, and the dropped entries no longer point at the pages (a later write takes no
        digest for them); a page changed behind the ghost afterwards is still reported."""
        monkeypatch.setattr(ghost_mod, "KEYED_MAX", 2)
        src, dst = Kernel(), Kernel()
        svm, dvm = await _stored_vm(src), await _stored_vm(dst)
        old = dict(dst.oracle.ghost.vm_entries(dvm.kvm))
        assert all(e._src is not None for e in old.values())  # the stores' entries point at their pages
        out = msgpack.unpackb(msgpack.packb((await svm("ghost-export"))["entries"], use_bin_type=True), raw=False)
        await dvm("ghost-import", entries=out)
        new = dst.oracle.ghost.vm_entries(dvm.kvm)
        assert {g: (e.tags, e.data) for g, e in new.items()} == \
            {g: (e.tags, e.data) for g, e in src.oracle.ghost.vm_entries(svm.kvm).items()}
        assert all(new[g] is not old[g] and old[g]._src is None for g in old)
        assert invariants(dst) == []
        dvm.page(IPA + 3 * PAGE).write(0, b"lost")  # behind the ghost's back
        assert "TAGS-AS-WRITTEN" in invariants(dst)


class TestWholePageViews:
    def test_a_whole_page_of_bytes_is_viewed_and_copied_when_asked_for(self):
        """A whole-page write from a bytes buffer keeps a read-only view (same digest as a copy); ``data``
        then gives the frame's own bytearray with the same content and digest."""
        from hypervisor.page import Page, data_hash

        buf = bytes(range(256)) * 32  # two pages
        page = Page(pfn=1, tags=bytearray(256))
        page.write(0, memoryview(buf)[PAGE:])
        assert type(page.data_view()) is memoryview and page.data_view().obj is buf
        h = page.data_hash()
        assert h == data_hash(bytearray(buf[PAGE:]))
        assert type(page.data) is bytearray and page.data == buf[PAGE:] and page.data_hash() == h
        assert type(page.data_view()) is bytearray

    def test_a_partial_write_copies_the_view_first(self):
        """A partial write into a viewed page changes the frame's own copy, never the caller's buffer, and a
        ghost entry pointing at the page gets the digest of the old content."""
        from hypervisor.ghost import Entry
        from hypervisor.page import Page, data_hash

        buf = bytes([7]) * PAGE
        page = Page(pfn=1, tags=bytearray(256))
        page.write(0, memoryview(buf))
        e = Entry()
        e.written_from(page)
        page.write(10, b"xyz")
        assert buf == bytes([7]) * PAGE
        assert page.read(8, 6) == b"\7\7xyz\7" and type(page.data_view()) is bytearray
        assert e.data == data_hash(buf) != page.data_hash()

    def test_zeros_and_mutable_buffers_are_not_viewed(self):
        """A whole page of zeros stores no data; one whose first and last bytes are zero but not the rest is
        viewed; a page written from a bytearray is copied (a later change of the buffer is not seen)."""
        from hypervisor.page import Page

        zeros, middle = bytes(PAGE), bytearray(PAGE)
        middle[100] = 1
        a, b, c = (Page(pfn=i, tags=bytearray(256)) for i in range(3))
        a.write(0, memoryview(zeros))
        b.write(0, memoryview(bytes(middle)))
        mutable = bytearray(b"q" * PAGE)
        c.write(0, memoryview(mutable))
        mutable[0] = 0
        assert a.data_view() is None and type(b.data_view()) is memoryview and b.read(100, 1) == b"\1"
        assert type(c.data_view()) is bytearray and c.read(0, 1) == b"q"

    async def test_a_store_keeps_views_and_the_oracles_still_see_a_lost_byte(self):
        """A 16-page store keeps views of the request's buffer: loads read it back, stats count the frames
        with data without copying them, and a frame changed behind the ghost is still reported."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, IPA, 16 * PAGE, prot=RWM)
        data = bytes(range(1, 256)) * (16 * PAGE // 255) + bytes(16 * PAGE % 255)
        await vm.vmm("store", addr=hva, tag=0, data=data)
        assert all(type(vm.vmm.page(hva + i * PAGE).data_view()) is memoryview for i in range(16))
        assert (await vm.vmm("load", addr=hva, tag=0, size=16 * PAGE)).value == data
        assert k.stats()["frames_with_data"] == 16
        assert type(vm.vmm.page(hva).data_view()) is memoryview
        assert invariants(k) == []
        vm.vmm.page(hva + 2 * PAGE).write(5, b"lost")
        assert "TAGS-AS-WRITTEN" in invariants(k)


class TestBulkZap:
    async def test_munmap_frees_in_walk_order_and_keeps_shared_frames(self):
        """munmap frees the frames whose last reference its PTEs held, in the order of their addresses (the
        free list as freeing each on the spot leaves it), keeps a frame a forked child still maps, and leaves
        the allocator's counts and the oracles clean."""
        from support import Proc

        k = Kernel()
        p = Proc.new(k, "p")
        addr = await p("mmap", addr=None, size=8 * PAGE, prot=["read", "write"], share="private", backing="anon",
                       object=None)
        for i in range(8):
            await p("store", addr=addr + i * PAGE, tag=0, data=bytes([i + 1]) * PAGE)
        frames = [p.page(addr + i * PAGE) for i in range(8)]
        child = await p.fork("c")
        await child("munmap", addr=addr + 2 * PAGE, size=6 * PAGE)  # the child keeps pages 0 and 1
        allocated = k.alloc.allocated
        await p("munmap", addr=addr, size=8 * PAGE)
        free = k.alloc.nodes[0].free
        assert free[-6:] == frames[2:] and all(f.free and f.data_view() is None for f in frames[2:])
        assert not frames[0].free and frames[0].mapcount == 1 and child.page(addr).data == bytes([1]) * PAGE
        assert k.alloc.allocated == allocated - 6
        assert invariants(k) == []


def _runs_one_by_one(entries: dict) -> list:
    """The compact form cut entry by entry (the definition _pack_runs implements with list operations)."""
    runs: list = []
    for gfn in sorted(entries):
        e = entries[gfn]
        t = e.tags
        kind = 0 if t is None else 1 if t.count(t[:1]) == len(t) else 2
        key = (kind, e.data is not None)
        if runs and runs[-1][0] == key and runs[-1][1] + runs[-1][2] == gfn:
            runs[-1][2] += 1
            runs[-1][3].append(e)
        else:
            runs.append([key, gfn, 1, [e]])
    out = []
    for (kind, has), first, n, es in runs:
        tags = None if kind == 0 else bytes(e.tags[0] for e in es) if kind == 1 else b"".join(e.tags for e in es)
        hashes = b"".join(e.data.to_bytes(8, "little") for e in es) if has else None
        out.append([first, n, tags, hashes])
    return out


def test_pack_runs_cuts_the_runs_the_definition_does():
    """_pack_runs gives, for a record mixing holes, tag kinds (none, uniform, mixed) and data or none, exactly
    the runs cutting it entry by entry gives."""
    import random

    from hypervisor.arm64.tags import shared_tags
    from hypervisor.ghost import Entry, _pack_runs

    rng = random.Random(7)
    kinds = [None, shared_tags(bytes([3]) * 256), bytes([4]) * 256, bytes(range(256))]
    entries = {}
    gfn = 0x40000
    for _ in range(3000):
        gfn += 1 if rng.random() < 0.9 else rng.randint(2, 5)
        entries[gfn] = Entry(rng.choice(kinds), rng.choice([None, rng.getrandbits(64)]) if rng.random() < 0.2
                             else rng.getrandbits(64))
    assert _pack_runs(entries) == _runs_one_by_one(entries)
