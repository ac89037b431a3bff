"""MTE architectural constants and tagged-pointer helpers.

Values from arch/arm64/include/asm/mte-def.h, asm/mte.h, uapi/linux/prctl.h and
the MTE user-space documentation (Documentation/arch/arm64/memory-tagging-extension.rst).
"""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
HPAGE_SHIFT = 21
HPAGE_SIZE = 1 << HPAGE_SHIFT  # hugetlb pages are 2 MiB (PMD) in the model
PAGES_PER_HPAGE = HPAGE_SIZE // PAGE_SIZE

MTE_GRANULE_SIZE = 16
MTE_GRANULE_MASK = ~(MTE_GRANULE_SIZE - 1)
MTE_TAG_SHIFT = 56
MTE_TAG_SIZE = 4
MTE_TAG_MASK = 0xF << MTE_TAG_SHIFT
MTE_GRANULES_PER_PAGE = PAGE_SIZE // MTE_GRANULE_SIZE  # 256
MTE_PAGE_TAG_STORAGE = MTE_GRANULES_PER_PAGE * MTE_TAG_SIZE // 8  # 128, packed

#: Top Byte Ignore: bits 63:56 of a user pointer are not part of the address.
TBI_ADDR_MASK = (1 << 56) - 1
#: User virtual addresses are 48 bits (TASK_SIZE with 4K pages, VA_BITS=48).
TASK_SIZE = 1 << 48

PROT_READ, PROT_WRITE, PROT_EXEC, PROT_MTE = 0x1, 0x2, 0x4, 0x20

PR_TAGGED_ADDR_ENABLE = 1 << 0
PR_MTE_TCF_SHIFT = 1
PR_MTE_TCF_NONE = 0
PR_MTE_TCF_SYNC = 1 << 1
PR_MTE_TCF_ASYNC = 2 << 1
PR_MTE_TCF_MASK = 3 << 1
PR_MTE_TAG_SHIFT = 3
PR_MTE_TAG_MASK = 0xFFFF << PR_MTE_TAG_SHIFT

#: Scenario TCF names and the prctl bits each one requests.
TCF_PRCTL_BITS = {
    "none": PR_MTE_TCF_NONE,
    "sync": PR_MTE_TCF_SYNC,
    "async": PR_MTE_TCF_ASYNC,
    "asymm": PR_MTE_TCF_SYNC | PR_MTE_TCF_ASYNC,
}
TCF_MODES = tuple(TCF_PRCTL_BITS)


def pointer_tag(ptr: int) -> int:
    """Return the logical tag of a pointer (bits 59:56)."""
    return (ptr >> MTE_TAG_SHIFT) & 0xF


def untagged_addr(ptr: int) -> int:
    """Return the address with the top byte cleared (what TBI ignores)."""
    return ptr & TBI_ADDR_MASK


def tagged_pointer(addr: int, tag: int) -> int:
    """Return ``addr`` with logical tag ``tag`` in bits 59:56.

    Raises:
        ValueError: ``tag`` is not 0..15.
    """
    if not 0 <= tag <= 0xF:
        raise ValueError(f"tag {tag} is not a 4-bit value")
    return untagged_addr(addr) | (tag << MTE_TAG_SHIFT)


def granule_align_down(addr: int) -> int:
    """Round ``addr`` down to its 16-byte granule."""
    return addr & MTE_GRANULE_MASK


def page_align_up(size: int) -> int:
    """Round ``size`` up to a whole number of 4 KiB pages."""
    return (size + PAGE_SIZE - 1) & PAGE_MASK


def pack_tags(tags: bytes) -> bytes:
    """Pack one-tag-per-byte into two tags per byte (swap/hibernation format).

    Granule 2i goes in the low nibble of byte i, as mte_save_page_tags stores it.
    """
    return bytes((tags[i] & 0xF) | ((tags[i + 1] & 0xF) << 4) for i in range(0, len(tags), 2))


def unpack_tags(packed: bytes) -> bytes:
    """Inverse of :func:`pack_tags`."""
    out = bytearray(len(packed) * 2)
    out[0::2] = bytes(b & 0xF for b in packed)
    out[1::2] = bytes(b >> 4 for b in packed)
    return bytes(out)
