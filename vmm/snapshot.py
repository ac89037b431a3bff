"""VM snapshots: the ``snapshot`` and ``restore`` VMM ops (docs/scenarios.md, "Migration, snapshots and faults").

``snapshot`` pauses the vCPUs, streams guest RAM (data through the VMM's own mapping, tags with
KVM_ARM_MTE_COPY_TAGS FROM_GUEST) and the vCPUs' state into a file in the format of
:mod:`shared.snapfile` (documented in ``docs/snapshot-format.md``), resumes, and renames the
finished file over ``path`` (it is written to a temporary file in the same folder first, so a
failed snapshot never leaves half a file; there is no fsync: the model keeps no promise across a
host crash). Pages ``mincore`` reports non-resident are not read (they read zero data and zero
tags), and pages whose data and tags are all zero are left out of the file. One task reads runs
from the hypervisor while a worker thread checksums and writes the one before.

``restore`` maps the file, parses and validates all of it (:func:`shared.snapfile.parse`, in a
worker thread), pauses, checks the snapshot fits this VM, asks ``mincore`` about every RAM slot,
installs the vCPUs' state (the guest checks it whole, so a state it refuses changes nothing), then
zeroes every resident page the file has no record for (private anonymous memory is discarded
with MADV_DONTNEED; other backings get zero data with ``store`` and zero tags with COPY_TAGS
TO_GUEST), writes the saved pages (data, then tags TO_GUEST; a read-only slot is registered
writable for the copy and read-only again after), and resumes. If a memory write fails midway the
vCPUs get their previous state back (memory cannot be taken back). The file is mapped, not copied: what was
validated is what is written as long as nobody rewrites the file in place meanwhile (a snapshot
to the same path renames a new file over it, which leaves the mapped one intact; truncating it
in place under a running restore is not guarded against). ``mincore`` is trusted for every
backing: the hypervisor counts an object's page cache and swap as resident, so a page it reports
non-resident reads zero data and zero tags whoever maps it.

Errors, in the contract's order; none changes anything of the VM:
    ENOENT: no such file (``path``), or its folder does not exist (snapshot).
    EINVAL: not a snapshot file, a damaged one, another version (restore); a relative path, or
        neither name nor path.
    EINVAL: another layout (RAM memslots' IPA, size, backing kind), vCPU count or MTE setting.
    EBUSY: a memslot of the VM logs dirty pages (COPY_TAGS TO_GUEST would be refused).
    Others from the file system (EACCES, ENOSPC, EISDIR ...) with their Linux errno, and ENODEV
    when there is no VM.

The orchestrator turns a snapshot ``name`` into an absolute ``path`` (names are kept per
scenario); a VMM given a name alone refuses it with EINVAL.
"""

from __future__ import annotations

import errno as pyerrno
import mmap
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from shared import snapfile
from shared.errno import EBUSY, EINVAL, EIO, ENOENT, ERRNO_BY_NAME
from shared.mte import PAGE_SIZE
from shared.wire import RemoteError
from vmm import guestram
from vmm.errors import VmmError

if TYPE_CHECKING:
    from vmm.guestram import RamSlot
    from vmm.machine import Vmm

#: Pages read or written per hypervisor round trip (data with load/store, tags with one COPY_TAGS).
RUN_PAGES = guestram.CHUNK_PAGES
#: Runs read ahead of the one being written (each up to RUN_PAGES pages and their tags).
PIPELINE_DEPTH = 1
#: The file's write buffer (record headers are small; page runs bypass it).
WRITE_BUFFER = 1 << 20


def _os_error(exc: OSError, what: str) -> VmmError:
    """An OSError as a VmmError with the Linux errno of the same name."""
    name = pyerrno.errorcode.get(exc.errno or 0, "EIO")
    return VmmError(ERRNO_BY_NAME.get(name, EIO), f"{what}: {exc.strerror or exc}")


def _path(args: dict, op: str) -> str:
    path = args.get("path")
    if path is None:
        if args.get("name") is not None:
            raise VmmError(EINVAL, f"{op}: the VMM needs a path (the orchestrator keeps named snapshots as files)")
        raise VmmError(EINVAL, f"{op}: give name or path")
    if not os.path.isabs(path):
        raise VmmError(EINVAL, f"{op}: path {path!r} is not absolute")
    return path


async def vm_has_mte(vmm: Vmm, ctx: str | None) -> bool:
    """Whether the VM has KVM_CAP_ARM_MTE: an empty COPY_TAGS is EINVAL exactly when it does not."""
    try:
        await vmm._call("kvm-copy-tags", {"vm": vmm._need_vm(), "guest_ipa": 0, "length": 0, "flags": 1,
                                          "reserved": [0, 0], "tags": b""}, ctx)
    except RemoteError as exc:
        if exc.errno == EINVAL:
            return False
        raise
    return True


def layout_of(slots: list[RamSlot]) -> tuple[snapfile.SlotLayout, ...]:
    """The RAM memslots as a snapshot header records them."""
    return tuple(snapfile.SlotLayout(s.slot, s.ipa, s.size, s.backing, tuple(s.flags), s.node, s.region)
                 for s in slots)


# ---- snapshot -----------------------------------------------------------------------------------

async def snapshot(vmm: Vmm, args: dict, ctx: str | None) -> dict:
    """The ``snapshot`` VMM op: save memory, tags and vCPU state to ``path``; returns {pages, tagged-pages}.

    Raises:
        VmmError: ENOENT (no such folder), EINVAL (a relative path), ENODEV (no VM), a file
            system error; RemoteError from the hypervisor or the guest.
    """
    path = _path(args, "snapshot")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise VmmError(ENOENT, f"snapshot: no folder {folder!r}")
    if os.path.isdir(path):
        raise VmmError(ERRNO_BY_NAME["EISDIR"], f"snapshot: {path!r} is a folder")
    vmm._need_vm()
    mte = await vm_has_mte(vmm, ctx)
    await vmm.pause(ctx)
    try:
        with _temp_file(folder, os.path.basename(path)) as (tmp, f):
            writer = None
            try:
                slots = guestram.ram_slots(vmm)  # under the pause: no memslot changes meanwhile
                state = await vmm.guest_state(ctx) if vmm.vcpus else {"vcpus": {}, "stage1": []}
                header = snapfile.Header(layout_of(slots), len(vmm.vcpus), mte, state)
                writer = snapfile.SnapshotWriter(f.write, header)
                await _save(vmm, writer, slots, mte, ctx)
                await trio.to_thread.run_sync(_finish, writer, f)
            except OSError as exc:
                raise _os_error(exc, f"snapshot: writing {tmp!r}") from None
            f.close()
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _os_error(exc, f"snapshot: renaming to {path!r}") from None
    finally:
        with trio.CancelScope(shield=True):
            await vmm.resume()
    return {"pages": writer.pages, "tagged-pages": writer.tagged_pages}


@contextmanager
def _temp_file(folder: str, base: str) -> Iterator[tuple[str, BinaryIO]]:
    """A new file in ``folder`` (removed unless renamed away before the block ends)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base[:200]}.", suffix=".tmp")  # within NAME_MAX
    except OSError as exc:
        raise _os_error(exc, f"snapshot: creating a file in {folder!r}") from None
    f = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode open(2) would give, not mkstemp's 0600
    except OSError:
        pass
    try:
        yield tmp, f
    finally:
        try:
            f.close()
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _finish(writer: snapfile.SnapshotWriter, f: BinaryIO) -> None:
    writer.finish()
    f.flush()


async def _save(vmm: Vmm, writer: snapfile.SnapshotWriter, slots: list[RamSlot], mte: bool,
                ctx: str | None) -> None:
    """Stream every slot's resident pages (data and, for an MTE VM, tags) into ``writer``.

    Two stages: one task reads runs from the hypervisor while a worker thread checksums and writes
    the run before (hashing and file writes release the GIL, and the hypervisor is another process),
    with at most :data:`PIPELINE_DEPTH` runs waiting between them.
    """
    send, recv = trio.open_memory_channel[tuple[int, guestram.PageRun]](PIPELINE_DEPTH)

    async def read_all() -> None:
        async with send:
            for slot in slots:
                vec = await guestram.mincore(vmm, slot, 0, slot.pages, ctx)
                for start, n in guestram.resident_runs(vec):
                    for lo in range(start, start + n, RUN_PAGES):
                        k = min(RUN_PAGES, start + n - lo)
                        for run in await guestram.read_pages(vmm, slot, lo, k, ctx, tags=mte, resident_only=False):
                            await send.send((slot.slot, run))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            async with recv:
                async for slot_id, run in recv:
                    await trio.to_thread.run_sync(writer.add_run, slot_id, run.first, run.data, run.tags)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a failed pipeline: the first one that is not a cancellation (nor a group)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0] if leaves else group)


# ---- restore ------------------------------------------------------------------------------------

async def restore(vmm: Vmm, args: dict, ctx: str | None) -> dict:
    """The ``restore`` VMM op: load a snapshot into this VM; returns {pages, tagged-pages} restored.

    Raises:
        VmmError: ENOENT, EINVAL, EINVAL, EBUSY in that order (see the module docstring), with
            nothing of the VM changed; RemoteError if the hypervisor or guest fails midway.
    """
    path = _path(args, "restore")
    try:
        # O_NONBLOCK: a FIFO or a device must not hang the VMM (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmmError(ENOENT, f"restore: no snapshot {path!r}") from None
    except OSError as exc:
        raise _os_error(exc, f"restore: opening {path!r}") from None
    try:
        with _map(fd, path) as buf:
            try:
                # the checksum of a whole file takes a while: off the event loop (hashlib releases the GIL)
                snap = await trio.to_thread.run_sync(snapfile.parse, buf)
            except snapfile.SnapfileError as exc:
                raise VmmError(EINVAL, f"restore: {path}: {exc.message}") from None
            try:
                return await _restore(vmm, snap, ctx)
            finally:
                del snap  # the records are views of the mapping: release them before it closes
    finally:
        os.close(fd)


@contextmanager
def _map(fd: int, path: str) -> Iterator[Any]:
    """The regular file ``fd`` mapped read-only (an empty file is an empty buffer).

    Raises:
        VmmError: EINVAL when it is not a regular file (a folder, a FIFO, a device).
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VmmError(EINVAL, f"restore: {path!r} is not a snapshot file (not a regular file)")
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
    except OSError as exc:
        raise _os_error(exc, f"restore: reading {path!r}") from None
    try:
        yield m if m is not None else b""
    finally:
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view still exported: the mapping goes with the last reference
                pass


def _check_state(header: snapfile.Header) -> None:
    state = header.vcpu_state
    if not (isinstance(state, dict) and isinstance(state.get("vcpus"), dict)
            and len(state["vcpus"]) == header.vcpus and isinstance(state.get("stage1", []), list)):
        raise VmmError(EINVAL, "restore: damaged snapshot: the vCPU state is not one map per vCPU and stage 1")


async def _restore(vmm: Vmm, snap: snapfile.Snapshot, ctx: str | None) -> dict:
    vmm._need_vm()
    _check_state(snap.header)
    mte = await vm_has_mte(vmm, ctx)
    await vmm.pause(ctx)  # before looking at the memslots: no vmm-op changes them from here on
    try:
        slots = guestram.ram_slots(vmm)
        try:
            snapfile.check_compatible(snap.header, layout_of(slots), len(vmm.vcpus), mte)
        except snapfile.SnapfileError as exc:
            raise VmmError(EINVAL, f"restore: {exc.message}") from None
        logging = [s.slot for s in vmm.slots.values() if "log-dirty-pages" in s.flags]
        if logging:
            raise VmmError(EBUSY, f"restore: memslot(s) {logging} log dirty pages (KVM_ARM_MTE_COPY_TAGS "
                                  "TO_GUEST would be refused)")
        await _load(vmm, snap, slots, ctx)
    finally:
        with trio.CancelScope(shield=True):
            await vmm.resume()
    return {"pages": snap.pages, "tagged-pages": snap.tagged_pages}


async def _load(vmm: Vmm, snap: snapfile.Snapshot, slots: list[RamSlot], ctx: str | None) -> None:
    """Write a checked snapshot into the paused VM: vCPU state, zeros where it has no page, its pages."""
    mte = snap.header.mte
    mine = {s.slot: s for s in slots}
    target = {theirs: mine[s.slot] for theirs, s in snapfile.slot_map(snap.header, layout_of(slots)).items()}
    by_slot: dict[int, list[snapfile.Record]] = {}
    for r in snap.records:
        by_slot.setdefault(target[r.slot].slot, []).append(r)
    # every question first (a mincore refused changes nothing), then the writes
    zero = {s.slot: _left_out(await guestram.mincore(vmm, s, 0, s.pages, ctx), by_slot.get(s.slot, []))
            for s in slots}
    # the vCPU state before memory: the guest checks it whole and refuses it before anything changes
    before = await vmm.guest_state(ctx) if vmm.vcpus else None
    if before is not None:
        await vmm.set_guest_state(snap.header.vcpu_state, ctx)
    # COPY_TAGS TO_GUEST refuses read-only slots (EFAULT): register them writable for the copy
    readonly = [s.slot for s in slots if "readonly" in vmm.slots[s.slot].flags] if mte else []
    try:
        for n in readonly:
            await _set_readonly(vmm, n, False, ctx)
        for slot in slots:
            await _zero(vmm, slot, zero[slot.slot], mte, ctx)
        for r in snap.records:
            await _write_record(vmm, target[r.slot], r, mte, ctx)
    except BaseException:
        if before is not None:
            with trio.CancelScope(shield=True):
                await vmm.set_guest_state(before, ctx)
        raise
    finally:
        with trio.CancelScope(shield=True):
            for n in readonly:
                if "readonly" not in vmm.slots[n].flags:
                    await _set_readonly(vmm, n, True, ctx)


async def _set_readonly(vmm: Vmm, n: int, readonly: bool, ctx: str | None) -> None:
    """Register memslot ``n`` again with or without KVM_MEM_READONLY (KVM wants a delete first)."""
    slot, vm = vmm.slots[n], vmm._need_vm()
    flags = tuple(f for f in slot.flags if f != "readonly") + (("readonly",) if readonly else ())
    await vmm._call("kvm-set-memory-region", {"vm": vm, "slot": n, "ipa": slot.ipa, "size": 0, "addr": slot.addr,
                                              "flags": []}, ctx)
    await vmm._call("kvm-set-memory-region", {"vm": vm, "slot": n, "ipa": slot.ipa, "size": slot.size,
                                              "addr": slot.addr, "flags": list(flags)}, ctx)
    slot.flags = flags


def _left_out(vec: bytes, records: list[snapfile.Record]) -> list[tuple[int, int]]:
    """Runs of pages resident in ``vec`` (mincore) that no record covers."""
    need = bytearray(vec)
    for r in records:
        need[r.first:r.first + r.count] = bytes(r.count)
    return guestram.resident_runs(bytes(need))


async def _zero(vmm: Vmm, slot: RamSlot, runs: list[tuple[int, int]], mte: bool, ctx: str | None) -> None:
    """Zero data and (MTE VM) tags of the page runs ``runs`` of ``slot``.

    Private anonymous memory is discarded (MADV_DONTNEED, as QEMU's ``ram_block_discard_range``):
    the next touch gets a fresh page, zero data and zero tags, and the memory goes back to the host.
    Shared memory keeps its page cache under MADV_DONTNEED and a hugetlb range may not split a huge
    page, so those are written: zeros with ``store``, zero tags with COPY_TAGS TO_GUEST.
    """
    m = guestram.mapping_at(vmm, slot.addr)
    if m is not None and m.backing == "anon" and m.share == "private" and m.addr + m.size >= slot.addr + slot.size:
        for start, n in runs:
            await vmm._call("madvise", {"addr": slot.addr + start * PAGE_SIZE, "size": n * PAGE_SIZE,
                                        "advice": "dontneed"}, ctx)
        return
    for start, n in runs:
        for lo in range(start, start + n, RUN_PAGES):
            k = min(RUN_PAGES, start + n - lo)
            await guestram.write_data(vmm, slot, lo, bytes(k * PAGE_SIZE), ctx)
            if mte:
                await guestram.write_tags(vmm, slot.ipa + lo * PAGE_SIZE, bytes(k * snapfile.TAGS_PER_PAGE), ctx)


async def _write_record(vmm: Vmm, slot: RamSlot, r: snapfile.Record, mte: bool, ctx: str | None) -> None:
    """Write one record's pages: data with store, then tags (zeros when the record has none) TO_GUEST."""
    for lo in range(0, r.count, RUN_PAGES):
        k = min(RUN_PAGES, r.count - lo)
        # views of the mapped file: msgpack sends them without a copy
        data: Any = r.data[lo * PAGE_SIZE:(lo + k) * PAGE_SIZE]
        await guestram.write_data(vmm, slot, r.first + lo, data, ctx)
        if mte:
            tags: Any = (r.tags[lo * snapfile.TAGS_PER_PAGE:(lo + k) * snapfile.TAGS_PER_PAGE]
                         if r.tags is not None else bytes(k * snapfile.TAGS_PER_PAGE))
            await guestram.write_tags(vmm, slot.ipa + (r.first + lo) * PAGE_SIZE, tags, ctx)
