"""The MTE tag check of one access, shared by host-process and guest accesses.

Hardware compares the pointer tag with the allocation tag of every granule an
access touches, atomically with the access (Arm ARM ``CheckTag``; the kernel's
side is the TCF handling in arch/arm64/kernel/mte.c). No single Linux function
does this: it stands for the CPU. Both :mod:`hypervisor.access.user` and
:mod:`hypervisor.access.vcpu` call :func:`mte_check_access`, and each turns the
:class:`TagMismatch` into its own fault record (a host address for a process, an
offset into the access for a guest).

Rules:
    * ``tcf`` ``none`` (or PSTATE.TCO, which the caller folds into ``none``)
      checks nothing.
    * Every granule a span touches is compared with the pointer tag; the first
      mismatching granule of the first mismatching span is reported, at the
      first byte the access touches in it.
    * sync, and asymm reads: the access is suppressed (``tag-check-fault``);
      async, and asymm writes: the access is performed and the fault recorded
      (``async-tag-check-fault``).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from shared.mte import MTE_GRANULE_SIZE
from shared.wire import Reply

TAG_CHECK_FAULT = "tag-check-fault"
ASYNC_TAG_CHECK_FAULT = "async-tag-check-fault"


#: The value of an access plus the architectural event it raised, if any: the one value-plus-fault
#: type, :class:`shared.wire.Reply`, which the request loop sends as ``value`` and ``fault``.
AccessResult = Reply


@attrs.frozen
class TagMismatch:
    """Where a tag check failed.

    Attributes:
        index: which span (in the order given) holds the mismatching granule.
        first: byte offset in that span's page of the first byte the access
            touches in the mismatching granule.
        memory_tag: the allocation tag found there.
        kind: ``tag-check-fault`` (suppressed) or ``async-tag-check-fault`` (performed).
    """

    index: int
    first: int
    memory_tag: int
    kind: str


def tag_check_fault_kind(tcf: str, write: bool) -> str:
    """The event a mismatch raises under SCTLR_ELx.TCF: synchronous, or recorded in TFSR (asymm: reads sync)."""
    sync = tcf == "sync" or (tcf == "asymm" and not write)
    return TAG_CHECK_FAULT if sync else ASYNC_TAG_CHECK_FAULT


def mte_check_access(spans: Iterable[tuple[bytes | bytearray | None, int, int]], tag: int, tcf: str,
                     write: bool) -> TagMismatch | None:
    """The tag check of one access (the CPU's ``CheckTag``, per granule; see the module docstring).

    Args:
        spans: ``(tags, off, n)`` per page the access touches, in access order:
            the page's allocation tags (one per granule; ``None`` for memory
            that is not checked: untagged, device, tags unreachable), the
            byte offset in the page and the length.
        tag: the pointer (logical) tag.
        tcf: the effective check mode: ``none``, ``sync``, ``async`` or ``asymm``.
        write: the access is a store.
    """
    if tcf == "none":
        return None
    tags: bytes | bytearray | None  # mypy joins the unpacked tuple's bytes and bytearray to object
    for i, (tags, off, n) in enumerate(spans):
        if tags is None:
            continue
        g0 = off // MTE_GRANULE_SIZE
        g1 = (off + n - 1) // MTE_GRANULE_SIZE + 1
        span = bytes(tags[g0:g1])
        if span != bytes([tag]) * (g1 - g0):
            bad = next(j for j, t in enumerate(span) if t != tag)
            return TagMismatch(i, max((g0 + bad) * MTE_GRANULE_SIZE, off), span[bad],
                               tag_check_fault_kind(tcf, write))
    return None
