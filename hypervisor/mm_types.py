"""VMAs, their flags, the objects behind shared mappings, and the mm (include/linux/mm_types.h).

A :class:`Vma` is a ``vm_area_struct``: a page-aligned range with ``vm_flags``
and, for anything but private anonymous memory, a :class:`MemObject` (the
shmem/memfd inode, regular file, hugetlbfs file or device region). Shared
objects hold their own page cache (``index -> Page`` or a swap entry), so every
mapping of the same object, in any process, maps the same frames.

VM_MTE_ALLOWED follows ``arch_calc_vm_flag_bits()`` (arch/arm64/include/asm/mman.h,
v6.13+): anonymous and MAP_HUGETLB mappings, shmem/memfd files and hugetlbfs
files get it; regular files and device (PFNMAP) regions do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.locks import ModelRwSem
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_PFNMAP = 0x400
VM_IO = 0x4000
VM_HUGETLB = 0x400000
VM_MERGEABLE = 0x80000000
VM_DONTEXPAND = 0x40000
VM_DONTDUMP = 0x4000000
VM_MIXEDMAP = 0x10000000
VM_HUGEPAGE = 0x20000000
VM_MTE = 1 << 36  # VM_HIGH_ARCH_4
VM_MTE_ALLOWED = 1 << 37  # VM_HIGH_ARCH_5
VM_ALLOW_ANY_UNCACHED = 1 << 39  # VM_HIGH_ARCH_... in include/linux/mm.h (v6.8+)
VM_MTE_KVM = 1 << 38  # RFC v3 dynamic tag storage: KVM maps the VMA's pages tagged at stage 2

FLAG_NAMES = {
    VM_READ: "VM_READ", VM_WRITE: "VM_WRITE", VM_EXEC: "VM_EXEC", VM_SHARED: "VM_SHARED",
    VM_PFNMAP: "VM_PFNMAP", VM_IO: "VM_IO", VM_HUGETLB: "VM_HUGETLB", VM_MERGEABLE: "VM_MERGEABLE",
    VM_MTE: "VM_MTE", VM_MTE_ALLOWED: "VM_MTE_ALLOWED", VM_DONTEXPAND: "VM_DONTEXPAND", VM_DONTDUMP: "VM_DONTDUMP",
    VM_MIXEDMAP: "VM_MIXEDMAP", VM_HUGEPAGE: "VM_HUGEPAGE", VM_ALLOW_ANY_UNCACHED: "VM_ALLOW_ANY_UNCACHED",
    VM_MTE_KVM: "VM_MTE_KVM",
}

#: Object kinds by scenario backing name.
OBJECT_KIND = {
    "anon-shared": "shmem",  # MAP_SHARED|MAP_ANONYMOUS is a shmem file internally
    "memfd": "shmem",
    "shmem": "shmem",
    "file": "file",
    "hugetlb": "hugetlbfs",
    "device": "device",  # a PFNMAP region (remap_pfn_range), as "pfnmap"
    "pfnmap": "device",
    "dax": "dax",  # a DAX file or device-dax: ZONE_DEVICE struct pages
    "p2pmem": "p2pmem",  # a pci-p2pdma allocation: ZONE_DEVICE struct pages, vm_insert_page()
}

#: The memory types of a vm_page_prot (its AttrIndx), as ``vma-flags`` reports them.
MEMTYPES = ("normal-tagged", "normal", "normal-nc", "device")
#: A region's ``attr`` (the pgprot its driver sets) as a memory type.
ATTR_MEMTYPE = {"device": "device", "write-combine": "normal-nc", "cacheable": "normal"}


def flag_names(flags: int) -> str:
    """``VM_READ|VM_MTE...`` for messages and traces."""
    return "|".join(n for bit, n in FLAG_NAMES.items() if flags & bit) or "0"


@attrs.define(eq=False)
class MemObject:
    """An inode whose pages can be mapped by several processes.

    ``pages`` maps a page index (a huge-page index for hugetlbfs) to the
    resident frame, or to an ``int`` swap entry while the page is swapped out.
    """

    kind: str  # "shmem", "file", "hugetlbfs", "device" (PFNMAP), "dax", "p2pmem"
    name: str
    pages: dict = attrs.Factory(dict)
    mappings: int = 0
    named: bool = False  # named objects live as long as the host (a tmpfs file)
    hpage_pages: int = 512  # hugetlbfs: frames per huge page (the mount's hstate: 16, 512, 8192 or 262144)
    region: object = None  # device memory: the hypervisor.mm.memremap.Region behind it

    @property
    def is_device_memory(self) -> bool:
        """The object maps a device region (PFNMAP or ZONE_DEVICE), never RAM of the page allocator."""
        return self.region is not None or self.kind == "device"

    @property
    def is_shmem(self) -> bool:
        """shmem_file(file)."""
        return self.kind == "shmem"


@attrs.define(eq=False)
class Vma:
    """vm_area_struct."""

    start: int
    end: int
    flags: int
    backing: str
    obj: MemObject | None = None
    pgoff: int = 0  # offset of ``start`` in the object, in pages
    freed: bool = False  # vm_area_free() ran: any later read is a use-after-free
    node: str | None = None  # mbind(MPOL_BIND) to this node (the mmap's ``node``); None: the default order

    def __repr__(self) -> str:
        return f"<vma {self.start:#x}-{self.end:#x} {flag_names(self.flags)} {self.backing}>"

    @property
    def is_anon(self) -> bool:
        """vma_is_anonymous() for private anonymous memory (its pages live in PTEs)."""
        return self.obj is None

    def contains(self, addr: int) -> bool:
        """start <= addr < end."""
        return self.start <= addr < self.end

    def index_of(self, addr: int) -> int:
        """linear_page_index(): the object page index of ``addr``."""
        return self.pgoff + ((addr - self.start) >> 12)


def arch_calc_vm_flag_bits(mte: bool, backing: str, obj: MemObject | None) -> int:
    """arch_calc_vm_flag_bits() (asm/mman.h): which mappings are tag-capable."""
    if not mte:
        return 0
    if backing in ("anon", "anon-shared", "hugetlb"):  # MAP_ANONYMOUS | MAP_HUGETLB
        return VM_MTE_ALLOWED
    if obj is not None and obj.kind in ("shmem", "hugetlbfs"):  # shmem_file || is_file_hugepages
        return VM_MTE_ALLOWED
    return 0


def vma_memtype(vma: Vma) -> str:
    """The memory type of ``vma->vm_page_prot``: a device region's driver pgprot, else Normal(-Tagged).

    ``pgprot_noncached`` is Device-nGnRE, ``pgprot_writecombine`` Normal-NC; every other
    mapping is Normal, Normal-Tagged with VM_MTE (arch/arm64 vm_get_page_prot()).
    """
    obj = vma.obj
    if obj is not None and obj.kind in ("device", "p2pmem"):  # the driver's pgprot: the region's attr
        attr = getattr(obj.region, "attr", "device")
        return ATTR_MEMTYPE.get(attr, "device")
    return "normal-tagged" if vma.flags & VM_MTE else "normal"


def kvm_vma_is_cacheable(vma: Vma) -> bool:
    """kvm_vma_is_cacheable() (arch/arm64/kvm/mmu.c): vm_page_prot is neither Normal-NC nor Device."""
    return vma_memtype(vma) in ("normal", "normal-tagged")


def arch_validate_flags(flags: int) -> bool:
    """arch_validate_flags() (asm/mman.h): no VM_MTE without VM_MTE_ALLOWED."""
    return not (flags & VM_MTE and not flags & VM_MTE_ALLOWED)


@attrs.define(eq=False)
class Pte:
    """A user page-table entry.

    Exactly one of ``page`` (present), ``swap`` (a swap entry) is set. A
    ``migrating`` entry is a migration entry: faults wait until it is replaced.
    ``tagged`` is the Normal-Tagged AttrIndx (the VMA had VM_MTE).
    """

    page: Page | None = None
    swap: int | None = None
    write: bool = False
    tagged: bool = False
    special: bool = False  # the zero page: no refcount, no tag sync
    migrating: bool = False
    fault_on_access: bool = False  # PAGE_FAULT_ON_ACCESS (PROT_NONE | PTE_TAG_STORAGE_NONE): tagged, no storage yet

    @property
    def present(self) -> bool:
        """pte_present()."""
        return self.page is not None and not self.migrating


MMAP_BASE = 0x7F00_0000_0000  # top-down allocation below this


class MM:
    """mm_struct: VMAs, page table and mmap_lock of one process."""

    def __init__(self, k: Kernel, owner: str, session: str = ""):
        self.owner = owner
        self.session = session  # named objects are looked up in the session's namespace
        self.vmas: list[Vma] = []  # sorted by start, non-overlapping
        self.pt: dict[int, Pte] = {}  # vpn -> PTE
        self.mmap_lock = ModelRwSem(k.sched, f"mmap_lock[{owner}]")
        self.notifiers: list = []  # MMU notifier subscribers (KVM's stage 2), mmu_notifier.py

    def __repr__(self) -> str:
        return f"<mm {self.owner}>"

    def vpns_in(self, start: int, end: int) -> list[int]:
        """The vpns with a PTE in [start, end), sorted (cheap for huge, sparse ranges)."""
        lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        if hi - lo <= len(self.pt):
            return [v for v in range(lo, hi) if v in self.pt]
        return sorted(v for v in self.pt if lo <= v < hi)

    def find_vma(self, addr: int) -> Vma | None:
        """vma_lookup(): the VMA containing ``addr``."""
        for v in self.vmas:
            if v.start <= addr < v.end:
                return v
            if v.start > addr:
                return None
        return None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs intersecting [start, end)."""
        return [v for v in self.vmas if v.start < end and v.end > start]

    def covered(self, start: int, end: int) -> bool:
        """[start, end) is mapped with no hole."""
        pos = start
        for v in self.vmas_in(start, end):
            if v.start > pos:
                return False
            pos = v.end
        return pos >= end

    def _split(self, addr: int) -> None:
        """__split_vma() at ``addr`` if a VMA straddles it."""
        for i, v in enumerate(self.vmas):
            if v.start < addr < v.end:
                tail = attrs.evolve(v, start=addr, pgoff=v.pgoff + ((addr - v.start) >> PAGE_SHIFT))
                if v.obj is not None:
                    v.obj.mappings += 1
                v.end = addr
                self.vmas.insert(i + 1, tail)
                return

    def get_unmapped_area(self, size: int, align: int = PAGE_SIZE) -> int:
        """Top-down search for a free range below MMAP_BASE."""
        top = MMAP_BASE
        for v in sorted(self.vmas, key=lambda v: -v.start):
            if v.start >= top:
                top = min(top, v.start)
                continue
            cand = (top - size) & ~(align - 1)
            if cand >= v.end:
                return cand
            top = v.start
        cand = (top - size) & ~(align - 1)
        if cand < PAGE_SIZE * 16:
            raise KernelError("ENOMEM", f"no room for {size:#x} bytes in the address space")
        return cand
