"""MMU notifiers: a secondary MMU hears about every host PTE that goes away or changes frame."""

from __future__ import annotations

from hypervisor.fork import do_exit
from hypervisor.kernel import Kernel
from hypervisor.mm.mmu_notifier import mmu_notifier_register, mmu_notifier_unregister
from hypervisor.syscalls import PROCESS_OPS, host_migrate_pages, host_swap_out
from shared.abi import validate_args

PAGE = 4096
RW = ["read", "write"]


class Recorder:
    """A stand-in secondary MMU that records (start, end, event)."""

    def __init__(self):
        self.seen = []

    def __call__(self, r):
        self.seen.append((r.start, r.end, r.event))

    def covers(self, addr: int, event: str) -> bool:
        """Some invalidation of ``event`` covered ``addr``."""
        return any(s <= addr < e and ev == event for s, e, ev in self.seen)


async def setup(pages: int = 2, prot=RW, **mmap):
    k = Kernel()
    t = k.create_task("vmm")

    async def call(op, task=t, **args):
        return await PROCESS_OPS[op](k, task, validate_args(op, args))

    addr = await call("mmap", size=pages * PAGE, prot=prot, **mmap)
    for i in range(pages):
        await call("store", addr=addr + i * PAGE, data=b"x")
    rec = Recorder()
    mmu_notifier_register(t.mm, rec)
    return k, t, call, addr, rec


class TestInvalidations:
    async def test_munmap(self):
        """munmap invalidates the unmapped range (MMU_NOTIFY_UNMAP)."""
        k, t, call, addr, rec = await setup()
        await call("munmap", addr=addr, size=PAGE)
        assert rec.covers(addr, "unmap") and not rec.covers(addr + PAGE, "unmap")

    async def test_madvise_dontneed(self):
        """MADV_DONTNEED invalidates its range (MMU_NOTIFY_CLEAR)."""
        k, t, call, addr, rec = await setup()
        await call("madvise", addr=addr + PAGE, size=PAGE, advice="dontneed")
        assert rec.covers(addr + PAGE, "clear") and not rec.covers(addr, "clear")

    async def test_swap_out(self):
        """Reclaim invalidates each page it unmaps from this mm."""
        k, t, call, addr, rec = await setup()
        assert await host_swap_out(k, t.pid, addr, PAGE) == 1
        assert rec.covers(addr, "swap") and not rec.covers(addr + PAGE, "swap")

    async def test_migration(self):
        """Migration invalidates each page before its PTE becomes a migration entry."""
        k, t, call, addr, rec = await setup()
        assert await host_migrate_pages(k, t.pid, addr, 2 * PAGE) == 2
        assert rec.covers(addr, "migrate") and rec.covers(addr + PAGE, "migrate")

    async def test_cow_replaces_the_frame(self):
        """A copy-on-write fault that maps a new frame invalidates the old one's page."""
        k, t, call, addr, rec = await setup()
        await call("fork", child="c")
        await call("store", addr=addr, data=b"y")  # the parent's write copies
        assert rec.covers(addr, "clear")

    async def test_mprotect(self):
        """mprotect invalidates the VMAs it changes (MMU_NOTIFY_PROTECTION_VMA)."""
        k, t, call, addr, rec = await setup()
        await call("mprotect", addr=addr, size=PAGE, prot=["read"])
        assert rec.covers(addr, "protection_vma") and not rec.covers(addr + PAGE, "protection_vma")

    async def test_exit(self):
        """Exit releases the whole address space."""
        k, t, call, addr, rec = await setup()
        await do_exit(k, t)
        assert rec.covers(addr, "release") and rec.covers(addr + PAGE, "release")

    async def test_reads_and_stores_to_present_pages_are_silent(self):
        """Accesses that change no PTE invalidate nothing."""
        k, t, call, addr, rec = await setup()
        await call("store", addr=addr, data=b"z")
        await call("load", addr=addr + PAGE, size=4)
        assert rec.seen == []

    async def test_unregister(self):
        """After unregistering, a subscriber hears nothing more."""
        k, t, call, addr, rec = await setup()
        mmu_notifier_unregister(t.mm, rec)
        await call("munmap", addr=addr, size=2 * PAGE)
        assert rec.seen == []
