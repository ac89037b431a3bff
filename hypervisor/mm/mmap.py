"""Address spaces and their syscalls: mmap, munmap, mprotect, madvise.

Models mm/mmap.c (``do_mmap``/``mmap_region``), mm/mprotect.c
(``do_mprotect_pkey``/``change_protection``), mm/madvise.c and the arm64 PROT_MTE
rules of arch/arm64/include/asm/mman.h:

* PROT_MTE sets VM_MTE only on a CPU with MTE (mmap silently drops it otherwise;
  mprotect fails with EINVAL through ``arch_validate_prot``);
* VM_MTE without VM_MTE_ALLOWED is EINVAL (``arch_validate_flags``);
* VM_MTE is sticky: mprotect without PROT_MTE keeps it;
* mprotect(PROT_MTE) on present pages re-installs their PTEs tagged, so
  ``mte_sync_tags`` zeroes untagged pages and keeps tagged ones.

Errors (Linux errno):
    EINVAL: zero length, unaligned address or offset, PROT_MTE where tags are not
        allowed, a hugetlb size not in 64 KiB/2 MiB/32 MiB/1 GiB or a length or
        address not aligned to it, MAP_PRIVATE of
        anon-shared.
    ENOMEM: no room in the address space, or mprotect/madvise over a hole.

Device memory and NUMA binding (the physical-memory contract, part C), checked in this order:
    ENOENT: an unknown ``node`` or ``region``;
    ENODEV: a ``private`` region (the CPU cannot address it);
    EINVAL: a private mapping of ``pfnmap``, ``dax`` or ``p2pmem``; a region of the wrong type
        (or none) for the backing; ``region`` with ``attr``; ``node`` with a backing other than
        anon, anon-shared, shmem, memfd; a range beyond the region; ``offset`` != 0 for
        ``p2pmem``; PROT_MTE (these VMAs never have VM_MTE_ALLOWED).

The VMA of each backing (as the drivers set it up):
    pfnmap (and the core's ``device``, a pfnmap with attr ``device`` and no
    VM_ALLOW_ANY_UNCACHED): VM_PFNMAP|VM_IO|VM_DONTEXPAND|VM_DONTDUMP, VM_ALLOW_ANY_UNCACHED if
    the region sets it, every page mapped up front (remap_pfn_range, vfio-pci);
    dax: a shared file mapping of ZONE_DEVICE pages, faulted in on demand; device-dax
    (``generic``) sets VM_HUGEPAGE (drivers/dax/device.c);
    p2pmem: VM_MIXEDMAP, every page inserted up front (p2pmem_alloc_mmap: vm_insert_page).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from hypervisor.mm.memory import put_page, set_pte_at, zap_pte_range
from hypervisor.mm.memremap import Region, memremap
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm_types import (
    MM,
    OBJECT_KIND,
    VM_ALLOW_ANY_UNCACHED,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_EXEC,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_MTE,
    VM_MTE_ALLOWED,
    VM_MTE_KVM,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    MemObject,
    Pte,
    Vma,
    arch_calc_vm_flag_bits,
    arch_validate_flags,
    flag_names,
    vma_memtype,
)
from hypervisor.page import Page
from shared.abi import HUGEPAGE_SIZES
from shared.errno import KernelError
from shared.mte import HPAGE_SIZE, PAGE_SHIFT, PAGE_SIZE, TASK_SIZE, page_align_up

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

_anon_names = itertools.count(1)


def _prot_flags(prot) -> int:
    f = 0
    if "read" in prot:
        f |= VM_READ
    if "write" in prot:
        f |= VM_WRITE
    if "exec" in prot:
        f |= VM_EXEC
    return f


def get_object(k: Kernel, backing: str, name: str | None, session: str = "") -> MemObject:
    """The object behind a non-anonymous mapping.

    Named objects are shared by every process of one session (the processes of
    one scenario, as if they shared a file descriptor or a tmpfs mount); other
    sessions cannot reach them.
    """
    kind = OBJECT_KIND[backing]
    if name is None:
        return MemObject(kind, f"{backing}:{next(_anon_names)}")
    key = (session, name)
    obj = k.objects.get(key)
    if obj is None:
        obj = MemObject(kind, name, named=True)
        k.objects[key] = obj
    elif obj.kind != kind:
        raise KernelError("EINVAL", f"object {name!r} is a {obj.kind} object, not {backing}")
    return obj


#: Backings of device memory, and the region types each maps.
DEVICE_BACKINGS = {"pfnmap": ("pfnmap",), "dax": ("fs-dax", "generic"), "p2pmem": ("pci-p2pdma",)}
#: Backings whose pages an ``mmap`` ``node`` may bind (MPOL_BIND).
NODE_BACKINGS = ("anon", "anon-shared", "shmem", "memfd")


def _check_physmem_args(k: Kernel, backing: str, share: str, prot, offset: int, size: int, node: str | None,
                        region: str | None, attr: str | None) -> Region | None:
    """The contract's mapping errors of ``node``, ``region`` and ``attr``, in its order; the named region.

    Raises:
        KernelError: ENOENT, ENODEV, EINVAL (see the module docstring).
    """
    if node is not None and node != "node0" and node not in {n.name for n in k.physcfg.nodes}:
        raise KernelError("ENOENT", f"mmap: no node {node!r} on this host")
    reg = memremap(k).lookup(region) if region is not None else None  # ENOENT
    if reg is not None and reg.type == "private":
        raise KernelError("ENODEV", f"mmap: region {region!r} is MEMORY_DEVICE_PRIVATE, which the CPU cannot address")
    want = DEVICE_BACKINGS.get(backing)
    if want is not None and share == "private":
        raise KernelError("EINVAL", f"mmap: a {backing} mapping must be shared")
    if reg is not None and (want is None or reg.type not in want):
        raise KernelError("EINVAL", f"mmap: a {backing} mapping cannot map {reg.type} region {region!r}")
    if want is not None and reg is None and not (backing == "pfnmap" and attr is not None):
        raise KernelError("EINVAL", f"mmap: a {backing} mapping needs a region of type {' or '.join(want)}"
                                    + (", or attr" if backing == "pfnmap" else ""))
    if region is not None and attr is not None:
        raise KernelError("EINVAL", "mmap: attr describes an unnamed region; a named region has its own")
    if attr is not None and backing != "pfnmap":
        raise KernelError("EINVAL", f"mmap: attr is for a pfnmap mapping without region, not {backing}")
    if node is not None and backing not in NODE_BACKINGS:
        raise KernelError("EINVAL", f"mmap: node binds {', '.join(NODE_BACKINGS)} memory, not {backing}")
    if reg is not None and offset + size > reg.size:
        raise KernelError("EINVAL", f"mmap: [{offset:#x}, +{size:#x}) runs beyond region {region!r} "
                                    f"({reg.size:#x} bytes)")
    if backing == "p2pmem" and offset:
        raise KernelError("EINVAL", "mmap: p2pmem maps from offset 0 only (p2pmem_alloc_mmap)")
    if want is not None and "mte" in prot and k.mte:
        raise KernelError("EINVAL", f"mmap: PROT_MTE on a {backing} mapping, which lacks VM_MTE_ALLOWED")
    return reg


def _device_object(k: Kernel, backing: str, obj_name: str | None, session: str, reg: Region | None,
                   size: int, offset: int, attr: str | None) -> MemObject:
    """The object behind a device mapping: its region's (one per region), or a new unnamed region's."""
    m = memremap(k)
    if backing == "device":  # the core's device: a pfnmap with attr "device", no VM_ALLOW_ANY_UNCACHED
        obj = get_object(k, backing, obj_name, session)
        if obj.region is None:
            obj.region = m.unnamed_pfnmap(max(offset + size, 1 << 30), "device", False)
            obj.region.obj = obj
        return obj
    if reg is None:  # pfnmap with attr: an unnamed region of the mapping's size, with the region defaults
        assert attr is not None  # _check_physmem_args
        reg = m.unnamed_pfnmap(offset + size, attr, True)
    if reg.obj is None:
        reg.obj = MemObject(OBJECT_KIND[backing], reg.name or f"{backing}:{next(_anon_names)}", named=True,
                            region=reg)
    return reg.obj


async def do_mmap(k: Kernel, mm: MM, addr: int | None, size: int, prot, share: str, backing: str,
                  obj_name: str | None, offset: int, *, hugepage_size: int = HPAGE_SIZE, node: str | None = None,
                  region: str | None = None, attr: str | None = None) -> int:
    """do_mmap() + mmap_region(): create a mapping and return its address.

    ``hugepage_size`` (hugetlb only) is the MAP_HUGE_* size: 64 KiB, 2 MiB,
    32 MiB or 1 GiB; a named hugetlb object keeps the size it was created with.
    ``node`` binds the pages to a node (``vma.node``, honoured at fault time), ``region`` names
    the device memory of a ``pfnmap``, ``dax`` or ``p2pmem`` mapping, ``attr`` makes an unnamed
    pfnmap region.

    Raises:
        KernelError: EINVAL (zero length, unaligned addr/offset, PROT_MTE without
            VM_MTE_ALLOWED, bad hugetlb size or address/offset alignment (the
            length is rounded up to the huge page size, as ksys_mmap_pgoff does), a named hugetlb object
            of another size, private anon-shared), ENOMEM (no room); ENOENT, ENODEV and EINVAL
            for ``node``, ``region`` and ``attr`` (see the module docstring).
    """
    if size == 0:
        raise KernelError("EINVAL", "mmap: length is 0")
    if offset & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"mmap: offset {offset:#x} is not page aligned")
    if addr is not None and addr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"mmap: MAP_FIXED address {addr:#x} is not page aligned")
    if backing == "anon-shared" and share == "private":
        raise KernelError("EINVAL", "mmap: anon-shared is MAP_SHARED|MAP_ANONYMOUS; it cannot be private")
    if backing == "anon" and share == "shared":
        backing = "anon-shared"
    align = PAGE_SIZE
    if backing == "hugetlb":
        if hugepage_size not in HUGEPAGE_SIZES:
            raise KernelError("EINVAL", f"mmap: no hugetlb pool of {hugepage_size:#x} bytes (arm64 with 4 KiB pages: "
                                        "64 KiB, 2 MiB, 32 MiB, 1 GiB)")
        hs = hugepage_size
        if (addr is not None and addr % hs) or offset % hs:
            raise KernelError("EINVAL", f"mmap: a hugetlb address and offset must be multiples of the "
                                        f"{hs >> 10} KiB huge page size")
        size = -(-size // hs) * hs  # ksys_mmap_pgoff(): len = ALIGN(len, huge_page_size(hs))
        align = hs
    size = page_align_up(size)
    if size > TASK_SIZE or (addr is not None and addr + size > TASK_SIZE):
        raise KernelError("ENOMEM", f"mmap: {size:#x} bytes at {addr or 0:#x} exceeds TASK_SIZE")
    reg = _check_physmem_args(k, backing, share, prot, offset, size, node, region, attr)
    obj: MemObject | None
    if backing in DEVICE_BACKINGS or backing == "device":
        obj = _device_object(k, backing, obj_name, mm.session, reg, size, offset, attr)
    else:
        obj = None if backing == "anon" else get_object(k, backing, obj_name, mm.session)
    if backing == "hugetlb":
        assert obj is not None  # get_object gives every non-anon backing one
        if obj.named and (obj.pages or obj.mappings) and obj.hpage_pages != hugepage_size >> PAGE_SHIFT:
            raise KernelError("EINVAL", f"mmap: hugetlb object {obj_name!r} has {obj.hpage_pages * PAGE_SIZE >> 10} "
                                        "KiB pages")
        obj.hpage_pages = hugepage_size >> PAGE_SHIFT
    flags = _prot_flags(prot)
    if "mte" in prot and k.mte:  # arch_calc_vm_prot_bits(): dropped without MTE
        flags |= VM_MTE
    if share == "shared" or backing in ("anon-shared", "device"):
        flags |= VM_SHARED
    if backing == "hugetlb":
        flags |= VM_HUGETLB
    if backing in ("device", "pfnmap"):  # remap_pfn_range() and vfio_pci_core_mmap()
        flags |= VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP
        if obj is not None and isinstance(obj.region, Region) and obj.region.allow_any_uncached:
            flags |= VM_ALLOW_ANY_UNCACHED
    if backing == "p2pmem":
        flags |= VM_MIXEDMAP  # vm_insert_page()
    if backing == "dax" and reg is not None and reg.type == "generic":
        flags |= VM_HUGEPAGE  # device-dax: dax_mmap()
    flags |= arch_calc_vm_flag_bits(k.mte, backing, obj)
    if not arch_validate_flags(flags):
        raise KernelError("EINVAL", f"mmap: PROT_MTE on a {backing} mapping, which lacks VM_MTE_ALLOWED")
    async with mm.mmap_lock.write():
        if addr is None:
            addr = mm.get_unmapped_area(size, align)
        else:
            await _unmap_locked(k, mm, addr, size)  # MAP_FIXED replaces what was there
        vma = Vma(addr, addr + size, flags, backing, obj, offset >> PAGE_SHIFT, node=node)
        if obj is not None:
            obj.mappings += 1
        mm.vmas.append(vma)
        mm.vmas.sort(key=lambda v: v.start)
        if obj is not None and obj.region is not None:
            _populate_device_pages(obj, vma)
        if backing in ("device", "pfnmap", "p2pmem"):
            await _remap_pfn_range(k, mm, vma)
    return addr


def _populate_device_pages(obj: MemObject, vma: Vma) -> None:
    """The region's frames behind the VMA become the object's pages (a dax fault finds them there)."""
    region = obj.region
    assert isinstance(region, Region)  # set by _device_object
    for index in range(vma.pgoff, vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT)):
        if index not in obj.pages:
            page = region.frame(index)
            page.mapping, page.index = obj, index
            obj.pages[index] = page


async def _remap_pfn_range(k: Kernel, mm: MM, vma: Vma) -> None:
    """remap_pfn_range() (and p2pmem's vm_insert_page() loop): the region is mapped up front, never tagged.

    Deliberate difference for p2pmem: its PTEs are special (no refcount, no tag sync) like a
    PFNMAP's, where vm_insert_page() takes a reference on the ZONE_DEVICE page.
    """
    obj = vma.obj
    assert obj is not None  # a device VMA maps its device object
    for i, vpn in enumerate(range(vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT)):
        page = obj.pages[vma.pgoff + i]
        mm.pt[vpn] = Pte(page=page, write=bool(vma.flags & VM_WRITE), tagged=False, special=True)


def hugetlb_vm_op_split(mm: MM, addr: int) -> None:
    """hugetlb_vm_op_split() (mm/hugetlb.c): a hugetlb VMA splits only at a huge page boundary.

    Raises:
        KernelError: EINVAL when ``addr`` falls inside a hugetlb VMA off its huge page size.
    """
    for v in mm.vmas_in(addr, addr + 1):
        if v.flags & VM_HUGETLB and v.obj is not None and v.start < addr < v.end:
            hsz = v.obj.hpage_pages << PAGE_SHIFT
            if addr % hsz:
                raise KernelError("EINVAL", f"{addr:#x} is inside a {hsz >> 10} KiB huge page of a hugetlb "
                                            "mapping: it can only be split at a huge page boundary")


async def _unmap_locked(k: Kernel, mm: MM, addr: int, size: int) -> None:
    end = addr + size
    hugetlb_vm_op_split(mm, addr)
    hugetlb_vm_op_split(mm, end)
    mm._split(addr)
    mm._split(end)
    for v in mm.vmas_in(addr, end):
        mm.vmas.remove(v)
        remove_vma(k, v)
        v.freed = True  # vm_area_free()
    zap_pte_range(k, mm, addr, end)
    await k.sched.point("munmap")


def remove_vma(k: Kernel, v: Vma) -> None:
    """remove_vma() (mm/mmap.c): drop the VMA's reference on its object (fput()).

    The last reference to an unnamed object truncates its page cache, as the
    last iput() of an unlinked shmem inode does.
    """
    obj = v.obj
    if obj is None:
        return
    obj.mappings -= 1
    if obj.mappings == 0 and not obj.named and not obj.is_device_memory:
        # the last reference to an unnamed object: truncate its page cache
        for cur in list(obj.pages.values()):
            if isinstance(cur, Page):
                cur.mapping = None
                if cur.is_hugetlb:
                    for sub in cur.subpages:
                        sub.mapping = None
                    k.alloc.free_page(cur)
                else:
                    put_page(k, cur)
            else:
                k.swap.swap_free(k, cur)
        obj.pages.clear()
        k.oracle.ghost.drop_object(obj)


async def do_munmap(k: Kernel, mm: MM, addr: int, size: int) -> None:
    """do_munmap().

    Raises:
        KernelError: EINVAL for an unaligned address, a zero length, or a
            range that would split a hugetlb VMA off a huge page boundary.
    """
    if addr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"munmap: address {addr:#x} is not page aligned")
    if size == 0:
        raise KernelError("EINVAL", "munmap: length is 0")
    if addr > TASK_SIZE or size > TASK_SIZE - addr:  # do_vmi_munmap()
        raise KernelError("EINVAL", f"munmap: [{addr:#x}, +{size:#x}) runs past TASK_SIZE")
    size = page_align_up(size)
    async with mm.mmap_lock.write():
        await _unmap_locked(k, mm, addr, size)


async def do_mprotect_pkey(k: Kernel, mm: MM, addr: int, size: int, prot) -> None:
    """do_mprotect_pkey() + change_protection().

    Raises:
        KernelError: EINVAL (unaligned, PROT_MTE without MTE or without
            VM_MTE_ALLOWED; a split of a hugetlb VMA off a huge page boundary;
            VMAs earlier in the range may already be changed),
            ENOMEM (a hole in the range).
    """
    if addr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"mprotect: address {addr:#x} is not page aligned")
    if "mte" in prot and not k.mte:  # arch_validate_prot()
        raise KernelError("EINVAL", "mprotect: PROT_MTE on a CPU without MTE")
    size = page_align_up(size)
    if size == 0:
        return
    end = addr + size
    async with mm.mmap_lock.write():
        if not mm.covered(addr, end):
            raise KernelError("ENOMEM", f"mprotect: [{addr:#x}, {end:#x}) is not fully mapped")
        hugetlb_vm_op_split(mm, addr)
        hugetlb_vm_op_split(mm, end)
        mm._split(addr)
        mm._split(end)
        for v in mm.vmas_in(addr, end):
            newflags = (v.flags & ~(VM_READ | VM_WRITE | VM_EXEC)) | _prot_flags(prot)
            if "mte" in prot:
                newflags |= VM_MTE  # VM_MTE is never cleared by mprotect
            if not arch_validate_flags(newflags):
                raise KernelError(
                    "EINVAL", f"mprotect: PROT_MTE on {v.backing} memory at {v.start:#x} lacks VM_MTE_ALLOWED "
                              f"({flag_names(v.flags)})")
            v.flags = newflags
            await change_protection(k, mm, v)


async def change_protection(k: Kernel, mm: MM, vma: Vma) -> None:
    """change_protection(): rewrite present PTEs with the VMA's new attributes.

    Each page's new PTE goes through set_pte_at, so a page newly mapped tagged
    is synced (zeroed if untagged, kept if tagged). Write permission is never
    granted here to a CoW page; the next write fault decides.
    """
    mmu_notifier_invalidate_range(mm, vma.start, vma.end, "protection_vma")
    for vpn in mm.vpns_in(vma.start, vma.end):
        pte = mm.pt.get(vpn)
        if pte is None or not pte.present:
            continue
        await k.sched.point("change_protection")
        pte = mm.pt.get(vpn)
        if pte is None or not pte.present or pte.page is None:
            continue
        tagged = bool(vma.flags & VM_MTE) and pte.page.zone != "pfnmap"  # no struct page: never tagged
        write = pte.write and bool(vma.flags & VM_WRITE)
        if vma.flags & VM_SHARED and vma.flags & VM_WRITE and not vma.is_anon and not pte.special:
            write = True
        if tagged != pte.tagged or (tagged and not pte.special):
            page = pte.page
            new = Pte(page=page, write=write, tagged=tagged, special=pte.special)
            if pte.special:
                mm.pt[vpn] = new
            else:
                await set_pte_at(k, mm, vpn, new, expect=pte)  # a PTE changed meanwhile is left alone
        else:
            pte.write = write


async def do_madvise(k: Kernel, mm: MM, addr: int, size: int, advice: str) -> None:
    """do_madvise(): MADV_DONTNEED, MADV_FREE, MADV_MERGEABLE.

    MADV_FREE is modelled as an immediate discard (the kernel may free the
    pages at any time; the model chooses "now"). Afterwards the range reads as
    zeros with zero tags, as the MTE documentation allows.

    Raises:
        KernelError: EINVAL (unaligned), ENOMEM (a hole in the range).
    """
    if addr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"madvise: address {addr:#x} is not page aligned")
    size = page_align_up(size)
    end = addr + size
    async with mm.mmap_lock.read() if advice != "mergeable" else mm.mmap_lock.write():
        if not mm.covered(addr, end):
            raise KernelError("ENOMEM", f"madvise: [{addr:#x}, {end:#x}) is not fully mapped")
        if advice == "mergeable":
            mm._split(addr)
            mm._split(end)
            for v in mm.vmas_in(addr, end):
                if v.is_anon:
                    v.flags |= VM_MERGEABLE
            return
        ranges = []
        for v in mm.vmas_in(addr, end):
            if advice == "dontneed" and v.flags & VM_PFNMAP:
                raise KernelError("EINVAL", "madvise: MADV_DONTNEED on a PFNMAP mapping")
            if advice == "free" and not v.is_anon:
                raise KernelError("EINVAL", "madvise: MADV_FREE works on private anonymous memory only")
            lo, hi = max(addr, v.start), min(end, v.end)
            if v.flags & VM_HUGETLB and v.obj is not None:  # madvise_dontneed_free_valid_vma(): whole huge pages
                hsz = v.obj.hpage_pages << PAGE_SHIFT
                if lo % hsz:
                    raise KernelError("EINVAL", f"madvise: {lo:#x} is not aligned to the huge page size {hsz:#x}")
                hi = lo + (hi - lo) // hsz * hsz  # rounded down, "to avoid unexpected data loss"
            if hi > lo:
                ranges.append((lo, hi))
        for lo, hi in ranges:
            zap_pte_range(k, mm, lo, hi, "clear")
        await k.sched.point("madvise")


async def vma_flags_report(k: Kernel, mm: MM, addr: int) -> dict:
    """The ``vma-flags`` host op: the VM_* flags of the VMA at ``addr`` as booleans, and its vm_page_prot memtype.

    Reads ``vma->vm_flags`` under ``mmap_read_lock``, as /proc/PID/smaps' VmFlags line does.

    Raises:
        KernelError: EFAULT where there is no VMA.
    """
    async with mm.mmap_lock.read():
        vma = mm.find_vma(addr)
        if vma is None:
            raise KernelError("EFAULT", f"vma-flags: no VMA at {addr:#x}")
        f = vma.flags
        return {"read": bool(f & VM_READ), "write": bool(f & VM_WRITE), "exec": bool(f & VM_EXEC),
                "shared": bool(f & VM_SHARED), "mte": bool(f & VM_MTE), "mte-allowed": bool(f & VM_MTE_ALLOWED),
                "mte-kvm": bool(f & VM_MTE_KVM), "pfnmap": bool(f & VM_PFNMAP), "mixedmap": bool(f & VM_MIXEDMAP),
                "io": bool(f & VM_IO), "allow-any-uncached": bool(f & VM_ALLOW_ANY_UNCACHED),
                "memtype": vma_memtype(vma)}
