"""The guest kernel's stage-1 page tables: guest virtual address -> IPA and memory attribute.

The guest owns stage 1 entirely (KVM never sees it); all vCPUs of a guest
share one address space, as the kernel's page tables are shared by every CPU.
The model is page granular (4 KiB):

* Until the guest maps a range, a VA maps to the IPA of the same value with
  attribute ``"normal"``: guest RAM is identity mapped and untagged, as
  docs/scenarios.md says.
* :meth:`Stage1.map` installs ``[va, va+size) -> [ipa, ipa+size)`` with one
  attribute (``"tagged"``, ``"normal"`` or ``"device"``); a later map of an
  overlapping range replaces the overlap, as rewriting the PTEs would.
* TBI is on (TCR_EL1.TBI0/1): bits 63:56 of a pointer are not part of the
  address, so a tagged pointer translates as its untagged address.

Mappings are kept as sorted, non-overlapping extents rather than one entry
per page, so a guest may map its whole IPA space without the model holding a
dict of millions of pages; lookups are by bisection.

Errors (:class:`Stage1Error`): EINVAL for a misaligned or empty map, E2BIG
for a translation over :data:`shared.abi.MAX_IO` bytes.
"""

from __future__ import annotations

import bisect

import attrs

from shared.abi import MAX_IO
from shared.errno import E2BIG, EINVAL, ErrnoError
from shared.mte import PAGE_SIZE, untagged_addr

ATTRS = ("tagged", "normal", "device")
#: Untagged virtual addresses: 56 bits (the top byte is ignored).
VA_LIMIT = 1 << 56
IPA_LIMIT = 1 << 64


class Stage1Error(ErrnoError):
    """A stage-1 request the guest kernel refuses (``errno``, ``message``: what is wrong)."""


@attrs.frozen
class Extent:
    """``[va, va+size) -> [ipa, ipa+size)`` with one attribute; all page aligned."""

    va: int
    size: int
    ipa: int
    attr: str

    @property
    def end(self) -> int:
        """The first VA after the extent."""
        return self.va + self.size

    def clip(self, start: int, end: int) -> Extent | None:
        """The part of the extent inside ``[start, end)`` (None if empty)."""
        lo, hi = max(self.va, start), min(self.end, end)
        if lo >= hi:
            return None
        return Extent(lo, hi - lo, self.ipa + (lo - self.va), self.attr)


class Stage1:
    """One guest address space: the extents mapped so far over an identity map."""

    def __init__(self) -> None:
        self._extents: list[Extent] = []  # sorted by va, non-overlapping
        self._starts: list[int] = []  # the va of each extent, for bisect

    @property
    def extents(self) -> tuple[Extent, ...]:
        """The explicit mappings, in VA order (the identity map fills the gaps)."""
        return tuple(self._extents)

    def map(self, va: int, ipa: int, size: int, attr: str) -> None:
        """Map ``[va, va+size)`` to ``[ipa, ipa+size)`` with attribute ``attr``.

        Args:
            va: the virtual address (a tagged pointer's tag bits are ignored).
            ipa: the intermediate physical address.
            size: bytes, a positive multiple of 4 KiB.
            attr: ``"tagged"``, ``"normal"`` or ``"device"``.

        Raises:
            Stage1Error: EINVAL if an address is not page aligned, the size is
                not a positive page multiple, a range leaves the address space,
                or the attribute is unknown.
        """
        va = untagged_addr(va)
        if attr not in ATTRS:
            raise Stage1Error(EINVAL, f"map: attr {attr!r} is not one of {', '.join(ATTRS)}")
        if va % PAGE_SIZE or ipa % PAGE_SIZE:
            raise Stage1Error(EINVAL, f"map: va {va:#x} and ipa {ipa:#x} must be 4 KiB aligned")
        if size <= 0 or size % PAGE_SIZE:
            raise Stage1Error(EINVAL, f"map: size {size} is not a positive multiple of 4 KiB")
        if va + size > VA_LIMIT or ipa + size > IPA_LIMIT:
            raise Stage1Error(EINVAL, f"map: [{va:#x}, +{size:#x}) -> {ipa:#x} leaves the address space")
        new = Extent(va, size, ipa, attr)
        kept: list[Extent] = []
        for e in self._extents:
            if e.end <= new.va or e.va >= new.end:
                kept.append(e)
                continue
            for part in (e.clip(e.va, new.va), e.clip(new.end, e.end)):
                if part is not None:
                    kept.append(part)
        kept.append(new)
        kept.sort(key=lambda e: e.va)
        self._extents = kept
        self._starts = [e.va for e in kept]

    def lookup(self, va: int) -> tuple[int, str]:
        """Translate one address.

        Args:
            va: a virtual address (tag bits ignored).

        Returns:
            ``(ipa, attr)``: through a mapping, or the identity map (``"normal"``).
        """
        va = untagged_addr(va)
        i = bisect.bisect_right(self._starts, va) - 1
        if i >= 0:
            e = self._extents[i]
            if va < e.end:
                return e.ipa + (va - e.va), e.attr
        return va, "normal"

    def translate(self, va: int, size: int) -> list[list]:
        """Translate an access into the ``segs`` of a ``vcpu-access`` request.

        Args:
            va: the access's first byte (tag bits ignored).
            size: bytes accessed, 0..:data:`shared.abi.MAX_IO`.

        Returns:
            ``[[ipa, length, attr], ...]`` in access order, one segment per 4 KiB
            page the access touches (at most 4097); empty for size 0.

        Raises:
            Stage1Error: E2BIG for more than MAX_IO bytes; EINVAL for an access
                that runs off the end of the address space or a negative size.
        """
        va = untagged_addr(va)
        if size < 0:
            raise Stage1Error(EINVAL, f"access size {size} is negative")
        if size > MAX_IO:
            raise Stage1Error(E2BIG, f"an access of {size} bytes is more than the {MAX_IO} one may cover")
        if va + size > VA_LIMIT:
            raise Stage1Error(EINVAL, f"access [{va:#x}, +{size:#x}) runs off the address space")
        segs: list[list] = []
        end = va + size
        while va < end:
            n = min(PAGE_SIZE - va % PAGE_SIZE, end - va)
            ipa, attr = self.lookup(va)
            segs.append([ipa, n, attr])
            va += n
        return segs

    def export(self) -> list[list]:
        """The explicit mappings as ``[[va, size, ipa, attr], ...]`` (msgpack-safe; see :meth:`replace`)."""
        return [[e.va, e.size, e.ipa, e.attr] for e in self._extents]

    @classmethod
    def from_export(cls, extents: object) -> Stage1:
        """A new address space holding ``extents`` as :meth:`export` gave them.

        Raises:
            Stage1Error: EINVAL if ``extents`` is not such a list, or an extent is one :meth:`map` refuses.
        """
        if not isinstance(extents, (list, tuple)):
            raise Stage1Error(EINVAL, "stage1 must be a list of [va, size, ipa, attr]")
        s = cls()
        for e in extents:
            if (not isinstance(e, (list, tuple)) or len(e) != 4
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e[:3])
                    or not isinstance(e[3], str)):
                raise Stage1Error(EINVAL, "each stage1 extent must be [va, size, ipa, attr]")
            s.map(e[0], e[2], e[1], e[3])
        return s
