"""Device DMA through the VMM's own mapping of guest RAM, and the emulated DMA device.

A device model in a real VMM (QEMU's, crosvm's) writes guest memory through
the VMM's mapping of guest RAM: the memslots say which VMM address backs
which guest-physical address (IPA). That mapping is normally not PROT_MTE and
the VMM runs with tag checks off, so device DMA neither checks nor changes
allocation tags. This module holds:

* :class:`Memslot` and :func:`translate`: IPA -> VMM address, range by range;
* :func:`write_guest` / :func:`read_guest`: the accesses, as ``store``/``load``
  with pointer tag 0 on the VMM's own address space (split into pieces of at
  most :data:`shared.abi.MAX_IO`);
* :class:`DmaDevice`: an MMIO window at :data:`MMIO_BASE` (4 KiB) with 8-byte
  little-endian registers::

      0x00 DST     IPA to fill
      0x08 LEN     bytes to fill
      0x10 FILL    fill byte (low byte used)
      0x18 CMD     write 1: fill LEN bytes of FILL at DST (reads as 0)
      0x20 STATUS  number of completed commands (read only)

  Other offsets in the window read as zero and ignore writes.

Errors are :class:`vmm.errors.VmmError`: EFAULT for an IPA outside every
memslot or outside the device window, EINVAL for a malformed MMIO access.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import attrs

from shared.abi import MAX_IO
from shared.errno import EFAULT, EINVAL
from shared.wire import Client
from vmm.errors import VmmError

MMIO_BASE = 0x0900_0000
MMIO_SIZE = 0x1000
REG_DST = 0x00
REG_LEN = 0x08
REG_FILL = 0x10
REG_CMD = 0x18
REG_STATUS = 0x20
CMD_FILL = 1


@attrs.define
class Memslot:
    """One memslot as the VMM registered it.

    Attributes:
        slot: the slot number.
        ipa: first guest-physical address.
        size: bytes.
        addr: the VMM address (hva) backing ``ipa``.
        flags: ``log-dirty-pages`` / ``readonly``.
    """

    slot: int
    ipa: int
    size: int
    addr: int
    flags: tuple[str, ...] = ()

    def contains(self, ipa: int) -> bool:
        """Whether ``ipa`` falls in this slot."""
        return self.ipa <= ipa < self.ipa + self.size


def translate(slots: Iterable[Memslot], ipa: int, size: int) -> list[tuple[int, int]]:
    """Translate a guest-physical range to VMM-address pieces.

    Args:
        slots: the memslots.
        ipa: first guest-physical address.
        size: bytes (0 gives no pieces).

    Returns:
        ``[(hva, length), ...]`` in IPA order; a range that spans slots gives
        one piece per slot.

    Raises:
        VmmError: EFAULT if any byte of the range is in no memslot.
    """
    ordered = sorted(slots, key=lambda s: s.ipa)
    pieces: list[tuple[int, int]] = []
    pos, end = ipa, ipa + size
    while pos < end:
        slot = next((s for s in ordered if s.contains(pos)), None)
        if slot is None:
            raise VmmError(EFAULT, f"IPA {pos:#x} is in no memslot")
        n = min(end, slot.ipa + slot.size) - pos
        pieces.append((slot.addr + (pos - slot.ipa), n))
        pos += n
    return pieces


def _split(pieces: list[tuple[int, int]]):
    """Cut pieces to at most MAX_IO bytes each; yields (hva, length, offset in the range)."""
    off = 0
    for hva, n in pieces:
        done = 0
        while done < n:
            step = min(MAX_IO, n - done)
            yield hva + done, step, off + done
            done += step
        off += n


async def write_guest(hv: Client, slots: Iterable[Memslot], ipa: int, data: bytes | None, *,
                      fill: int = 0, size: int = 0, ctx: str | None = None) -> dict | None:
    """Device DMA write: store ``data`` (or ``size`` bytes of ``fill``) at ``ipa`` via the VMM mapping.

    Args:
        hv: the VMM's hypervisor connection.
        slots: the memslots.
        ipa: where the write starts.
        data: the bytes; ``None`` to write ``size`` copies of ``fill``.
        fill: the fill byte (low 8 bits).
        size: the fill length.
        ctx: the kernel context the stores run in.

    Returns:
        ``None``, or the modelled fault of the first piece that faulted (only
        possible if the VMM itself turned tag checks on over a PROT_MTE
        mapping); the write stops there.

    Raises:
        VmmError: EFAULT when part of the range is in no memslot (nothing is written).
        RemoteError: the hypervisor refused a store.
    """
    length = len(data) if data is not None else size
    pieces = translate(slots, ipa, length)
    for hva, n, off in _split(pieces):
        chunk = data[off:off + n] if data is not None else bytes([fill & 0xFF]) * n
        reply = await hv.call("store", {"addr": hva, "tag": 0, "data": chunk}, ctx=ctx)
        if reply.fault:
            return reply.fault
    return None


async def read_guest(hv: Client, slots: Iterable[Memslot], ipa: int, size: int, *,
                     ctx: str | None = None) -> tuple[bytes, dict | None]:
    """Device DMA read of ``size`` bytes at ``ipa`` via the VMM mapping.

    Returns:
        The bytes read and ``None``, or the bytes read before a modelled fault and that fault.

    Raises:
        VmmError: EFAULT when part of the range is in no memslot.
        RemoteError: the hypervisor refused a load.
    """
    out = bytearray()
    for hva, n, _ in _split(translate(slots, ipa, size)):
        reply = await hv.call("load", {"addr": hva, "tag": 0, "size": n}, ctx=ctx)
        if reply.fault:
            return bytes(out), reply.fault
        out += reply.value
    return bytes(out), None


FillFn = Callable[[int, int, int, "str | None"], Awaitable["dict | None"]]


class DmaDevice:
    """The DMA device behind the MMIO window (see the module docstring for its registers).

    Args:
        fill_memory: ``await fill_memory(ipa, length, byte, ctx)`` writes guest
            memory through the VMM's mapping; returns a modelled fault or ``None``.
        base: the window's IPA.
        size: the window's size.
    """

    def __init__(self, fill_memory: FillFn, *, base: int = MMIO_BASE, size: int = MMIO_SIZE):
        self.fill_memory = fill_memory
        self.base = base
        self.size = size
        self.regs = bytearray(REG_STATUS)  # DST, LEN, FILL, CMD; STATUS is computed
        self.completed = 0
        self.last_fault: dict | None = None

    def reg(self, offset: int) -> int:
        """The value of the register at ``offset`` as a read would return it."""
        return int.from_bytes(self._view()[offset:offset + 8], "little")

    def _view(self) -> bytes:
        regs = bytearray(self.regs)
        regs[REG_CMD:REG_CMD + 8] = bytes(8)
        return bytes(regs) + self.completed.to_bytes(8, "little")

    def _check(self, ipa: int, size: int) -> int:
        if not (self.base <= ipa and ipa + size <= self.base + self.size):
            raise VmmError(EFAULT, f"no device at IPA {ipa:#x} ({size} bytes)")
        if size == 0:
            raise VmmError(EINVAL, f"MMIO access of 0 bytes at IPA {ipa:#x}")
        return ipa - self.base

    async def access(self, ipa: int, size: int, write: bool, data: bytes = b"",
                     ctx: str | None = None) -> bytes | None:
        """Emulate one MMIO access (a KVM_EXIT_MMIO).

        Args:
            ipa: the faulting IPA.
            size: access size in bytes.
            write: a store (else a load).
            data: the stored bytes (``size`` of them).
            ctx: the kernel context for the DMA a command starts.

        Returns:
            For a read, ``size`` bytes; for a write, ``None``.

        Raises:
            VmmError: EFAULT outside the window, or when a fill command's
                destination is not guest RAM; EINVAL for a size/data mismatch.
            RemoteError: the hypervisor refused the DMA.
        """
        off = self._check(ipa, size)
        if not write:
            view = self._view()
            return bytes(view[o] if o < len(view) else 0 for o in range(off, off + size))
        if len(data) != size:
            raise VmmError(EINVAL, f"MMIO write of {size} bytes carries {len(data)}")
        touched_cmd = False
        for i, b in enumerate(data):
            o = off + i
            if o < REG_STATUS:
                self.regs[o] = b
                touched_cmd |= REG_CMD <= o < REG_CMD + 8
        if touched_cmd:
            cmd = int.from_bytes(self.regs[REG_CMD:REG_CMD + 8], "little")
            self.regs[REG_CMD:REG_CMD + 8] = bytes(8)
            if cmd == CMD_FILL:
                await self._fill(ctx)
        return None

    async def _fill(self, ctx: str | None) -> None:
        dst = int.from_bytes(self.regs[REG_DST:REG_DST + 8], "little")
        length = int.from_bytes(self.regs[REG_LEN:REG_LEN + 8], "little")
        byte = self.regs[REG_FILL]
        self.last_fault = await self.fill_memory(dst, length, byte, ctx)
        self.completed += 1
