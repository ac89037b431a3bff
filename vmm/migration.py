"""Live migration, the VMM side: the transports, the source and the destination.

The orchestrator (mtekvm's runner) starts a fresh VMM for the VM on the
destination host and sends it ``migrate-incoming``: the destination listens for
ONE migration connection (:class:`Destination`). Then it sends the source VMM
``migrate-out`` with the address (:class:`Source`). The stream between them is
:mod:`shared.migstream` (docs/migration.md). In the order of docs/scenarios.md,
"Migration, snapshots and faults":

* the source sends the layout; the destination builds the VM (memslots,
  backings, MTE cap, vCPUs) and answers ok or an errno (then nothing changed);
* pre-copy: dirty logging on every RAM slot, pass 1 sends every resident page
  with its tags, passes 2..max_passes the pages the dirty log reports (got,
  then cleared, then read), until a pass finds none;
* stop-and-copy: pause the vCPUs, final dirty-log sync, the remaining pages,
  the vCPU state, the witness (the source host's TAGS-AS-WRITTEN record, from
  the oracle op ``ghost-export``: equipment of this model, not VMM state; a
  real VMM has no such record);
* the destination writes data and tags (COPY_TAGS TO_GUEST before anything
  logs dirty pages there), re-registers read-only slots read-only, imports the
  witness, installs the vCPU state, resumes, starts dirty logging where the
  source logged, and acks; the source then destroys its VM and frees guest RAM,
  and later guest/vmm ops get ESTALE.

Errors before the destination resumed roll the source back: dirty logging as it
was (a slot that logged before keeps its pages: :attr:`vmm.machine.Vmm.dirty_extra`),
the vCPUs resumed; the destination discards the VM and exits.

Fault injection (``fail`` at ``fail_at``) and the VMM-side bug zoo
(:data:`shared.bugs.VMM_BUGS`) are applied here; see docs/migration.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

import trio
import trio.testing

from shared import migstream
from shared.bugs import BUGS, VMM_BUGS
from shared.errno import (
    EBUSY,
    ECONNREFUSED,
    ECONNRESET,
    EEXIST,
    EINVAL,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    EPROTO,
    ErrnoError,
)
from shared.migstream import PAGE_SIZE, TAGS_PER_PAGE, RecordStream, StreamError
from shared.transport import listener_address, open_connection, open_listener
from shared.wire import ConnectionClosed, RemoteError
from vmm import dma, guestram
from vmm.errors import VmmError
from vmm.snapshot import first_error

if TYPE_CHECKING:
    from vmm.machine import Vmm

log = logging.getLogger("mtekvm.vmm.migration")

Handler = Callable[[trio.abc.Stream], Awaitable[None]]
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_PAGE_TAGS = bytes(TAGS_PER_PAGE)
#: KVM_CLEAR_DIRTY_LOG works on 64-page words (first and num multiples of 64).
DIRTY_WORD = 64
#: Chunks read (source) or records received (destination) ahead of the one being sent or written,
#: when the transport is :attr:`ProcessTransport.pipelined`.
READ_AHEAD = 1
_NONZERO = re.compile(rb"[^\x00]")


# ---- transports ---------------------------------------------------------------------------

class InProcessTransport:
    """Migration connections inside one trio run: ``mem:N`` addresses over memory stream pairs.

    Args:
        nursery: where an accepted connection's handler runs (the listener's).
        secret: this host's secret (a hello must prove it), or None.
    """

    _registry: ClassVar[dict[str, tuple[Handler, trio.Nursery]]] = {}
    _numbers = itertools.count(1)
    #: the stages of a migration run one after the other (controlled runs keep their schedules)
    pipelined = False

    def __init__(self, nursery: trio.Nursery, secret: str | None = None):
        self.nursery = nursery
        self.secret = secret

    async def listen(self, handler: Handler, kind: str = "unix") -> str:
        """Register a one-shot listener; returns its ``mem:N`` address."""
        address = f"mem:{next(self._numbers)}"
        self._registry[address] = (handler, self.nursery)
        return address

    async def dial(self, address: str, secret: str | None) -> trio.abc.Stream:
        """Connect to a listener (once); OSError ECONNREFUSED when nobody listens there."""
        entry = self._registry.pop(address, None)
        if entry is None:
            raise OSError(ECONNREFUSED, f"nobody listens at {address}")
        handler, nursery = entry
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(handler, theirs)
        return ours


class ProcessTransport:
    """Migration connections between VMM processes: a Unix socket in a private folder, or TCP on loopback.

    Args:
        nursery: where the accepting task and the handler run.
        secret: this host's secret (a hello must prove it), or None.
        folder: the VMM's private folder for the socket (its launcher removes it even if the VMM is
            SIGKILLed); None: a temporary folder of our own, removed by :meth:`close`.
    """

    #: the stages of a migration overlap (:data:`READ_AHEAD`): the source reads the next chunk from its
    #: hypervisor while it sends one, the destination receives the next record while it writes one
    pipelined = True

    def __init__(self, nursery: trio.Nursery, secret: str | None = None, folder: str | None = None):
        self.nursery = nursery
        self.secret = secret
        self.folder = folder
        self._own_folder = False
        self._numbers = itertools.count(1)

    async def listen(self, handler: Handler, kind: str = "unix") -> str:
        """Listen for one connection; returns its address (``unix:PATH`` or ``tcp:127.0.0.1:PORT``)."""
        if kind == "tcp":
            listener = await open_listener("tcp:127.0.0.1:0")
            address, path = listener_address(listener, "tcp:127.0.0.1:0"), None
        else:
            if self.folder is None:
                self.folder, self._own_folder = tempfile.mkdtemp(prefix="mtekvm-migrate-"), True
            path = os.path.join(self.folder, f"migrate-{next(self._numbers)}.sock")
            address = f"unix:{path}"
            listener = await open_listener(address)
        self.nursery.start_soon(self._accept_one, listener, handler, path)
        return address

    async def _accept_one(self, listener: trio.SocketListener, handler: Handler, path: str | None) -> None:
        try:
            stream = await listener.accept()
            _big_buffers(stream)
        except OSError as exc:  # nothing a peer does may take the VMM down
            log.info("migration listener failed: %s", exc)
            return
        finally:
            await listener.aclose()
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        await handler(stream)

    async def dial(self, address: str, secret: str | None) -> trio.abc.Stream:
        """Connect to a destination's address (OSError when nobody listens)."""
        stream = await open_connection(address)
        _big_buffers(stream)
        return stream

    def close(self) -> None:
        """Remove the temporary folder we made (at exit); a folder we were given is its owner's."""
        if self.folder is not None and self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


#: Socket buffers asked for a migration connection (SO_SNDBUF, SO_RCVBUF; the kernel caps them at
#: net.core.wmem_max / rmem_max): a 16 MiB record through a Unix socket's default 208 KiB takes about 80
#: sends and as many wake-ups of each side; 4 MiB, a few (measured: a third less CPU for the transfer).
SOCKET_BUFFER = 4 << 20


def _big_buffers(stream: trio.SocketStream) -> None:
    """Ask for :data:`SOCKET_BUFFER` on a migration connection (best effort)."""
    for opt in (trio.socket.SO_SNDBUF, trio.socket.SO_RCVBUF):
        try:
            stream.socket.setsockopt(trio.socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


# ---- helpers ------------------------------------------------------------------------------

def check_vmm_bugs(names) -> frozenset[str]:
    """The VMM-side bugs among ``names`` (EINVAL for a name that is no bug at all)."""
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        raise VmmError(EINVAL, f"unknown bug {unknown[0]!r}")
    return frozenset(n for n in names if n in VMM_BUGS)


def tagged_pages(tags: bytes | None) -> int:
    """Pages of a run whose tags are not all zero (C-speed when there are none)."""
    if not tags or not _NONZERO.search(tags):
        return 0
    return sum(1 for lo in range(0, len(tags), TAGS_PER_PAGE) if tags[lo:lo + TAGS_PER_PAGE] != ZERO_PAGE_TAGS)


def _windows(pages: list[int], npages: int) -> list[tuple[int, int]]:
    """The 64-page words holding ``pages``, merged into ``(first, num)`` ranges KVM_CLEAR_DIRTY_LOG takes."""
    words = sorted({p // DIRTY_WORD for p in pages})
    out: list[list[int]] = []
    for w in words:
        if out and out[-1][1] == w:
            out[-1][1] = w + 1
        else:
            out.append([w, w + 1])
    return [(a * DIRTY_WORD, min(b * DIRTY_WORD, npages) - a * DIRTY_WORD) for a, b in out]


_NEVER = object()


async def _pipeline(produce: Callable[[trio.MemorySendChannel], Awaitable[None]],
                    consume: Callable[[Any], Awaitable[Any]], *, until: Any = _NEVER) -> None:
    """Run ``produce(send)`` in a task of its own, :data:`READ_AHEAD` items ahead of ``consume(item)`` here.

    An item that is an exception is raised here, in its turn; ``consume`` returning ``until`` ends the
    pipeline. The first error (not a cancellation) is raised as itself, not in an exception group.
    """
    send, recv = trio.open_memory_channel[Any](READ_AHEAD)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, send)
            async with recv:
                async for item in recv:
                    if isinstance(item, Exception):
                        raise item
                    if await consume(item) is until:
                        break
            nursery.cancel_scope.cancel()  # a producer still reading ahead has nothing more to do
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def _errno_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ErrnoError):
        return exc.errno, exc.message
    if isinstance(exc, ConnectionClosed):
        return ECONNRESET, f"lost a connection: {exc}"
    return EPROTO, f"{type(exc).__name__}: {exc}"


#: The record types that may follow the destination's answer.
_AFTER_ANSWER = ("pages", "zero", "pass-end", "stop", "vcpus", "witness", "end")


class _Died(Exception):
    """This VMM was told to die (fault injection) and is still here: treat as a lost connection."""


# ---- the source -----------------------------------------------------------------------------

class _Side:
    """What both ends of a migration start from.

    Args:
        vmm: this end's VMM.
        a: the validated ``migrate-out`` / ``migrate-incoming`` arguments.
        ctx: the request's kernel context name (every hypervisor call runs as it).
    """

    def __init__(self, vmm: Vmm, a: dict, ctx: str | None):
        self.vmm = vmm
        self.a = a
        self.ctx = ctx
        self.bugs = check_vmm_bugs(a["bugs"])
        self.fail, self.fail_at = a["fail"], a["fail_at"]


class Source(_Side):
    """One ``migrate-out``: the source VMM's side of a migration (``vmm`` has a VM)."""

    def __init__(self, vmm: Vmm, a: dict, ctx: str | None):
        super().__init__(vmm, a, ctx)
        self.stats = {"passes": 0, "pages": 0, "tagged-pages": 0, "stop-pages": 0}
        self.slots: list[guestram.RamSlot] = []
        self.logged_before: set[int] = set()
        self.enabled: list[int] = []  # slots this migration switched logging on for
        self.consumed: dict[int, set[int]] = {}  # bits cleared from slots that logged before
        self.paused = False
        self.rs: RecordStream | None = None
        self.pass_no = 0
        self._pass_sent = 0
        self.cut = False
        #: migration-tags-before-final-sync: the tags each page last went with in pre-copy (slot -> page -> tags)
        self.sent_tags: dict[int, dict[int, bytes]] | None = (
            {} if "migration-tags-before-final-sync" in self.bugs and vmm.mte else None)

    # -- the run ----------------------------------------------------------------------------
    async def run(self) -> dict:
        """Migrate; returns the stats (``passes``, ``pages``, ``tagged-pages``, ``stop-pages``).

        Raises:
            VmmError: the errno of the failure (the VM runs on here, as before).
        """
        vmm = self.vmm
        vmm._need_vm()
        if vmm.migration is None:
            raise VmmError(EOPNOTSUPP, "migrate-out: this VMM has no migration transport")
        if vmm.migrating:
            raise VmmError(EBUSY, "migrate-out: a migration is already running")
        vmm.migrating = True
        try:
            try:
                stream = await vmm.migration.dial(self.a["address"], self.a["secret"])
            except OSError as exc:
                raise VmmError(ECONNREFUSED, f"migrate-out: cannot reach {self.a['address']}: {exc}") from None
            except ValueError as exc:  # shared.transport.AddressError
                raise VmmError(EINVAL, f"migrate-out: {exc}") from None
            self.rs = RecordStream(stream)
            try:
                await self._migrate()
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    peer = await self._peer_error(exc)
                    await self._roll_back(exc)
                if peer is not None:
                    raise VmmError(peer[0], f"the destination failed: {peer[1]}") from None
                if isinstance(exc, StreamError):
                    raise VmmError(exc.errno, exc.message) from None
                if isinstance(exc, _Died):
                    raise VmmError(ECONNRESET, f"the source VMM was killed ({exc})") from None
                raise
            await self._finish()
            return dict(self.stats)
        finally:
            vmm.migrating = False
            vmm.mig_dirty = None

    async def _migrate(self) -> None:
        vmm, rs = self.vmm, self.rs
        assert rs is not None
        await rs.send_header()
        await rs.receive_header()
        challenge = await rs.receive("challenge")
        await self._check_error(challenge)
        secret = self.a["secret"]
        await rs.send({"t": "hello", "version": migstream.VERSION, "name": vmm.name,
                       "auth": migstream.auth_tag(secret, challenge["nonce"]) if secret is not None else None})
        self.slots = guestram.ram_slots(vmm)
        self.logged_before = {s.slot for s in self.slots if "log-dirty-pages" in s.flags}
        await rs.send({"t": "layout", "mte": vmm.mte, "ipa_bits": vmm.ipa_bits, "vcpus": len(vmm.vcpus),
                       "slots": [s.layout() for s in self.slots]})
        answer = await rs.receive("answer")
        await self._check_error(answer)
        if answer["errno"]:
            raise VmmError(answer["errno"], f"the destination refused the VM: {answer['message']}")
        # pre-copy
        vmm.mig_dirty = {}
        await self._enable_logging()
        max_passes = self.a["max_passes"]
        for n in range(1, max_passes + 1):
            self.pass_no = n
            self._pass_sent = 0
            if n == 1:
                await self._send_resident(n)
            else:
                await self._send_dirty(await self._collect_dirty(), n)
            await rs.send({"t": "pass-end", "pass": n, "pages": self._pass_sent})
            await vmm.migration_hook(f"pass-end:{n}")
            if not self._pass_sent:
                break
            self.stats["passes"] += 1
        await vmm.migration_hook("precopy-done")
        # stop-and-copy
        early: dict[int, dict[int, bytes]] | None = None
        if self.sent_tags is not None and max_passes:
            early = self.sent_tags  # the zoo: the tags the last passes read, before the final sync
        await vmm.migration_hook("pause")
        await vmm.pause(self.ctx)
        self.paused = True
        self.pass_no = 0
        await rs.send({"t": "stop"})
        await vmm.migration_hook("switchover-paused")
        await self._fault("switchover")
        if max_passes == 0:
            await self._send_resident(0)
        else:
            await self._send_dirty(await self._collect_dirty(), 0, early)
        state = await vmm.guest_state(self.ctx)
        await rs.send({"t": "vcpus", "state": state})
        await rs.send({"t": "witness", "entries": await self._witness()})
        await rs.send({"t": "end"})
        done = await rs.receive("resumed")
        await self._check_error(done)

    async def _peer_error(self, exc: BaseException) -> tuple[int, str] | None:
        """The destination's own error record, when the connection broke because it failed and closed."""
        if not (isinstance(exc, StreamError) and exc.errno == ECONNRESET) or self.rs is None or self.cut:
            return None
        try:
            with trio.move_on_after(1):
                while True:
                    rec = await self.rs.receive(*migstream.RECORD_TYPES)
                    if rec["t"] == "error":
                        return rec["errno"], rec["message"]
        except StreamError:
            pass
        return None

    async def _check_error(self, rec: dict) -> None:
        if rec["t"] == "error":
            raise VmmError(rec["errno"], f"the destination failed: {rec['message']}")

    # -- pages ------------------------------------------------------------------------------
    async def _send_resident(self, pass_no: int) -> None:
        """Every resident page of every RAM slot (pass 1, or the whole stop-and-copy with max_passes 0)."""
        for s in self.slots:
            vec = await guestram.mincore(self.vmm, s, 0, s.pages, self.ctx)
            await self._send_runs(s, guestram.resident_runs(vec), pass_no)

    async def _send_dirty(self, dirty: dict[int, list[int]], pass_no: int,
                          early: dict[int, dict[int, bytes]] | None = None) -> None:
        by_id = {s.slot: s for s in self.slots}
        for slot_id, pages in dirty.items():
            await self._send_runs(by_id[slot_id], guestram.page_runs(pages), pass_no,
                                  None if early is None else early.get(slot_id, {}))

    async def _send_runs(self, s: guestram.RamSlot, runs: list[tuple[int, int]], pass_no: int,
                         early: dict[int, bytes] | None = None) -> None:
        chunks = [(lo, min(guestram.CHUNK_PAGES, start + n - lo))
                  for start, n in runs for lo in range(start, start + n, guestram.CHUNK_PAGES)]
        if early is None and len(chunks) > 1 and getattr(self.vmm.migration, "pipelined", False):
            await self._send_pipelined(s, chunks, pass_no)
            return
        for lo, k in chunks:
            await self._send_chunk(s, await self._read_chunk(s, lo, k, early), pass_no, early)

    async def _read_chunk(self, s: guestram.RamSlot, lo: int, k: int,
                          early: dict[int, bytes] | None) -> guestram.PageRun:
        (run,) = await guestram.read_pages(self.vmm, s, lo, k, self.ctx, tags=self.vmm.mte and early is None,
                                           resident_only=False)
        return run

    async def _send_chunk(self, s: guestram.RamSlot, run: guestram.PageRun, pass_no: int,
                          early: dict[int, bytes] | None) -> None:
        if early is not None:
            run.tags = b"".join(early.get(run.first + i, ZERO_PAGE_TAGS) for i in range(run.pages))
        elif self.sent_tags is not None and pass_no and run.tags is not None:
            t = run.tags
            self.sent_tags.setdefault(s.slot, {}).update(
                {run.first + i: t[i * TAGS_PER_PAGE:(i + 1) * TAGS_PER_PAGE] for i in range(run.pages)})
        await self._send_run(run, pass_no)

    async def _send_pipelined(self, s: guestram.RamSlot, chunks: list[tuple[int, int]], pass_no: int) -> None:
        """:meth:`_send_runs` with the reads ahead: one task reads chunk N+1 from the hypervisor while this
        one sends chunk N. Each chunk is read, then sent, in the same order as one after the other; a read's
        error is raised here, in its turn, after the chunks before it went out."""
        async def read_all(send: trio.MemorySendChannel) -> None:
            async with send:
                for lo, k in chunks:
                    try:
                        item: Any = await self._read_chunk(s, lo, k, None)
                    except Exception as exc:  # noqa: BLE001 - raised by the sender, in order
                        item = exc
                    try:
                        await send.send(item)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the sender stopped (its error is the one that counts)
                    if isinstance(item, Exception):
                        return

        await _pipeline(read_all, lambda run: self._send_chunk(s, run, pass_no, None))

    async def _send_run(self, run: guestram.PageRun, pass_no: int) -> None:
        rs = self.rs
        assert rs is not None
        if "migration-zero-page-drops-tags" in self.bugs:
            pieces = self._zero_split(run)
        else:
            pieces = [run]
        for piece in pieces:
            if isinstance(piece, tuple):  # (first, count) of zero pages: markers without tags
                await rs.send({"t": "zero", "pass": pass_no, "slot": run.slot, "first": piece[0],
                               "count": piece[1]})
                self._count(piece[1], 0)
            else:
                await rs.send({"t": "pages", "pass": pass_no, "slot": piece.slot, "first": piece.first,
                               "data": piece.data, "tags": piece.tags})
                self._count(piece.pages, tagged_pages(piece.tags))
        if pass_no and self._pass_sent:
            await self._fault(f"precopy:{pass_no}")

    @staticmethod
    def _zero_split(run: guestram.PageRun) -> list:
        """The zoo's zero-page shortcut: runs of all-zero pages become ``(first, count)`` markers."""
        out: list = []
        i, n = 0, run.pages
        while i < n:
            j = i
            zero = run.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == ZERO_PAGE
            while j < n and (run.data[j * PAGE_SIZE:(j + 1) * PAGE_SIZE] == ZERO_PAGE) == zero:
                j += 1
            if zero:
                out.append((run.first + i, j - i))
            else:
                out.append(guestram.PageRun(run.slot, run.first + i, run.data[i * PAGE_SIZE:j * PAGE_SIZE],
                                            None if run.tags is None else
                                            run.tags[i * TAGS_PER_PAGE:j * TAGS_PER_PAGE]))
            i = j
        return out

    def _count(self, pages: int, tagged: int) -> None:
        self.stats["pages"] += pages
        self.stats["tagged-pages"] += tagged
        if self.paused:
            self.stats["stop-pages"] += pages
        self._pass_sent += pages

    # -- dirty logging ----------------------------------------------------------------------
    def _loggable(self, s: guestram.RamSlot) -> bool:
        return "readonly" not in s.flags  # the guest cannot dirty a read-only slot

    async def _set_logging(self, s: guestram.RamSlot, on: bool) -> None:
        vmm = self.vmm
        slot = vmm.slots[s.slot]
        flags = tuple(f for f in slot.flags if f != "log-dirty-pages") + (("log-dirty-pages",) if on else ())
        await vmm._call("kvm-set-memory-region", {"vm": vmm._need_vm(), "slot": s.slot, "ipa": slot.ipa,
                                                  "size": slot.size, "addr": slot.addr, "flags": list(flags)},
                        self.ctx)
        slot.flags = flags

    async def _enable_logging(self) -> None:
        for s in self.slots:
            if self._loggable(s) and s.slot not in self.logged_before:
                await self._set_logging(s, True)
                self.enabled.append(s.slot)

    async def _get_dirty(self, s: guestram.RamSlot) -> list[int]:
        return list((await self.vmm._call("kvm-get-dirty-log", {"vm": self.vmm._need_vm(), "slot": s.slot},
                                          self.ctx)).value)

    async def _collect_dirty(self) -> dict[int, list[int]]:
        """Get and clear every slot's dirty log (plus the VMM's own DMA writes): the pages to resend.

        KVM_CLEAR_DIRTY_LOG clears whole 64-page words here, so every resident page of a cleared
        word is resent too (a page dirtied between GET and CLEAR is not lost).
        """
        vmm = self.vmm
        out: dict[int, list[int]] = {}
        own, vmm.mig_dirty = vmm.mig_dirty or {}, {}
        for s in self.slots:
            pages: set[int] = set(own.get(s.slot, ()))
            if self._loggable(s):
                got = await self._get_dirty(s)
                pages.update(got)
                if got and vmm.manual_protect:
                    for first, num in _windows(got, s.pages):
                        await vmm._call("kvm-clear-dirty-log", {"vm": vmm._need_vm(), "slot": s.slot,
                                                                "first": first, "num": num}, self.ctx)
                        vec = await guestram.mincore(vmm, s, first, num, self.ctx)
                        for lo, k in guestram.resident_runs(vec, first):
                            pages.update(range(lo, lo + k))
                if s.slot in self.logged_before:
                    self.consumed.setdefault(s.slot, set()).update(pages)
            if pages:
                out[s.slot] = sorted(pages)
        return out

    async def _witness(self) -> Any:
        """The source host's TAGS-AS-WRITTEN record of the VM (oracle equipment; nil where the host has none)."""
        try:
            value = (await self.vmm._call("ghost-export", {"vm": self.vmm._need_vm()}, self.ctx)).value
        except RemoteError as exc:
            if exc.errno == ENOSYS:
                return None
            raise
        return value.get("entries") if isinstance(value, dict) else None

    # -- faults, the end ----------------------------------------------------------------------
    async def _fault(self, point: str) -> None:
        if self.fail_at != point or self.fail not in ("cut", "kill-source"):
            return
        log.info("vmm:%s: fault injection: %s at %s", self.vmm.name, self.fail, point)
        if self.fail == "cut":
            assert self.rs is not None
            self.cut = True
            await self.rs.aclose()
            raise StreamError(ECONNRESET, f"the migration connection was cut at {point}")
        await self.vmm.kill_self()
        raise _Died(f"killed at {point}")

    async def _roll_back(self, exc: BaseException) -> None:
        """The migration failed before the destination resumed: the VM goes on here, as it was."""
        vmm = self.vmm
        if self.rs is not None:
            if not isinstance(exc, (StreamError, _Died)) and isinstance(exc, Exception):
                errno, message = _errno_of(exc)
                try:
                    with trio.move_on_after(1):
                        await self.rs.send({"t": "error", "errno": errno, "message": message[:512]})
                except StreamError:
                    pass
            await self.rs.aclose()
        if vmm.vm is not None and vmm.hv is not None:
            for slot_id in self.enabled:
                s = next(s for s in self.slots if s.slot == slot_id)
                try:
                    await self._set_logging(s, False)
                except (RemoteError, VmmError) as err:
                    log.info("vmm:%s: turning dirty logging back off on slot %d: %s", vmm.name, slot_id, err)
        for slot_id, pages in self.consumed.items():
            if pages:
                vmm.dirty_extra.setdefault(slot_id, set()).update(pages)
        vmm.mig_dirty = None
        if self.paused:
            self.paused = False
            await vmm.resume()

    async def _finish(self) -> None:
        """The VM runs on the destination: destroy it here, free guest RAM, send waiting ops away (ESTALE)."""
        vmm = self.vmm
        assert self.rs is not None
        if self.fail_at == "after-resume" and self.fail == "cut":
            log.info("vmm:%s: fault injection: cut at after-resume (the migration is over)", vmm.name)
        await self.rs.aclose()
        vmm.moved_to = self.a["to"] or self.a["address"]
        with trio.CancelScope(shield=True):
            await vmm._teardown(self.ctx)
            await vmm.stop_guest_after_migration()
        self.paused = False
        await vmm.resume()
        if self.fail_at == "after-resume" and self.fail == "kill-source":
            trio.lowlevel.spawn_system_task(_die_after_reply, vmm)


async def _die_after_reply(vmm: Vmm) -> None:
    """kill-source at after-resume: die once the migrate-out reply has gone out."""
    await trio.sleep(0.05)  # the reply is written as soon as migrate-out returns; this is a margin
    try:
        await vmm.kill_self()
    except Exception:  # noqa: BLE001 - a system task must not raise (it would end the whole trio run)
        log.exception("vmm:%s: kill-source after resume failed", vmm.name)


# ---- the destination ------------------------------------------------------------------------

class Destination(_Side):
    """One ``migrate-incoming``: the destination VMM's side (``vmm`` is fresh: no VM yet)."""

    def __init__(self, vmm: Vmm, a: dict, ctx: str | None):
        super().__init__(vmm, a, ctx)
        self.layout: dict | None = None
        self.slots: dict[int, guestram.RamSlot] = {}
        self.late_tags: list[tuple[int, bytes]] = []  # (ipa, tags) the zoo writes after resuming
        self.resumed = False
        self._faulted_passes: set[int] = set()
        self._state: dict | None = None  # the vcpus record's state
        self._witness: Any = None  # the witness record's entries

    async def start(self) -> dict:
        """Listen for the source (returns at once with the address); the VM stays paused until it resumes here."""
        vmm = self.vmm
        if vmm.migration is None:
            raise VmmError(EOPNOTSUPP, "migrate-incoming: this VMM has no migration transport")
        if vmm.vm is not None or vmm.migrating:
            raise VmmError(EEXIST, "migrate-incoming: this VMM already runs a VM")
        vmm.migrating = True
        await vmm.pause(self.ctx)
        try:
            address = await vmm.migration.listen(self.serve, self.a["transport"])
        except BaseException:
            vmm.migrating = False
            await vmm.resume()
            raise
        return {"address": address}

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Handle the one migration connection; never raises for what the peer sends."""
        rs = RecordStream(stream)
        try:
            await self._receive(rs)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                if not self.resumed and isinstance(exc, Exception) and not self.vmm.closing:
                    await self._discard(rs, exc)
                else:  # cancelled (the VMM is going away) or already running here
                    await rs.aclose()
            if not isinstance(exc, Exception):
                raise
            errno, message = _errno_of(exc)
            log.info("vmm:%s: incoming migration ended: %s: %s", self.vmm.name, errno, message)
        finally:
            self.vmm.migrating = False

    async def _receive(self, rs: RecordStream) -> None:
        vmm = self.vmm
        nonce = os.urandom(migstream.NONCE_SIZE)
        await rs.send_header()
        await rs.send({"t": "challenge", "nonce": nonce})
        await rs.receive_header()
        hello = await rs.receive("hello")
        self._raise_error(hello)
        if hello["version"] != migstream.VERSION:
            raise StreamError(EPROTO, f"hello: version {hello['version']}, this VMM speaks {migstream.VERSION}")
        if not migstream.auth_ok(getattr(vmm.migration, "secret", None), nonce, hello["auth"]):
            raise VmmError(EPERM, "the source does not know this host's secret")
        layout = await rs.receive("layout")
        self._raise_error(layout)
        self.layout = layout
        try:
            await self._build(layout)
        except (VmmError, RemoteError, ConnectionClosed) as exc:
            errno, message = _errno_of(exc)
            await rs.send({"t": "answer", "errno": errno, "message": message[:512]})
            raise
        await rs.send({"t": "answer", "errno": 0, "message": ""})
        self._state, self._witness = None, None
        if getattr(vmm.migration, "pipelined", False):
            await self._receive_pipelined(rs, layout)
        else:
            while not await self._apply(await rs.receive(*_AFTER_ANSWER, layout=layout)):
                pass
        if self._state is None:
            raise StreamError(EPROTO, "malformed migration stream: end before the vCPU state")
        await self._resume(rs, self._state, self._witness)

    async def _apply(self, rec: dict) -> bool:
        """Act on one record after the answer; True at ``end``."""
        t = rec["t"]
        self._raise_error(rec)
        if t == "pages":
            await self._write(rec)
            if rec["pass"] and rec["pass"] not in self._faulted_passes:
                self._faulted_passes.add(rec["pass"])
                await self._fault(f"precopy:{rec['pass']}")
        elif t == "zero":
            s = self.slots[rec["slot"]]
            await guestram.write_data(self.vmm, s, rec["first"], bytes(rec["count"] * PAGE_SIZE), self.ctx)
        elif t == "stop":
            await self._fault("switchover")
        elif t == "vcpus":
            self._state = rec["state"]
        elif t == "witness":
            self._witness = rec["entries"]
        return t == "end"

    async def _receive_pipelined(self, rs: RecordStream, layout: dict) -> None:
        """The records after the answer, one received ahead of the one being written: one task receives and
        decodes record N+1 while this one writes record N into guest RAM. Records are applied in order, and
        a receive error is raised in its turn, after every record before it was applied."""
        async def receive_all(send: trio.MemorySendChannel) -> None:
            async with send:
                while True:
                    try:
                        item: Any = await rs.receive(*_AFTER_ANSWER, layout=layout)
                    except StreamError as exc:
                        item = exc
                    try:
                        await send.send(item)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the writer stopped (its error is the one that counts)
                    if isinstance(item, Exception) or item["t"] in ("end", "error"):
                        return

        await _pipeline(receive_all, self._apply, until=True)

    def _raise_error(self, rec: dict) -> None:
        if rec["t"] == "error":
            raise VmmError(rec["errno"], f"the source failed: {rec['message']}")

    async def _build(self, layout: dict) -> None:
        """Create the VM as the layout says (memslots writable and not logging, for the copy)."""
        vmm, ctx = self.vmm, self.ctx
        vm = (await vmm._call("kvm-create-vm", {"ipa_bits": layout["ipa_bits"]}, ctx)).value
        vmm.vm, vmm.ipa_bits = vm, layout["ipa_bits"]
        if layout["mte"]:
            await vmm._call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte", "flags": 0}, ctx)
            vmm.mte = True
        await vmm._call("kvm-enable-cap", {"vm": vm, "cap": "manual-dirty-log-protect2", "flags": 0, "args": [1]},
                        ctx)
        vmm.manual_protect = True
        for s in layout["slots"]:
            mmap = {"size": s["size"], "prot": ["read", "write"] + (["mte"] if s["prot_mte"] else []),
                    "share": s["share"], "backing": s["backing"], "object": s["object"],
                    "hugepage_size": s["hugepage_size"], **{k: s[k] for k in ("node", "region") if k in s}}
            try:
                hva = (await vmm._call("mmap", mmap, ctx)).value
            except RemoteError as exc:
                if "node" in s or "region" in s:  # no node or region of that name and kind here
                    raise VmmError(EINVAL, f"slot {s['slot']} needs {s.get('node') or s.get('region')!r} on the "
                                           f"destination: {exc}") from None
                raise
            guestram.note_host_op(vmm, "mmap", mmap, hva)
            vmm.ram.append((hva, s["size"]))
            await vmm._call("kvm-set-memory-region", {"vm": vm, "slot": s["slot"], "ipa": s["ipa"],
                                                      "size": s["size"], "addr": hva, "flags": []}, ctx)
            vmm.slots[s["slot"]] = dma.Memslot(s["slot"], s["ipa"], s["size"], hva)
        self.slots = {s.slot: s for s in guestram.ram_slots(vmm)}
        for _ in range(layout["vcpus"]):
            vcpu = (await vmm._call("kvm-create-vcpu", {"vm": vm, "aarch32": False}, ctx)).value
            await vmm._give_vcpu(vcpu, ctx)

    async def _write(self, rec: dict) -> None:
        s = self.slots[rec["slot"]]
        await guestram.write_data(self.vmm, s, rec["first"], rec["data"], self.ctx)
        tags = rec["tags"]
        if tags is None:
            return
        ipa = s.ipa + rec["first"] * PAGE_SIZE
        if "migration-resume-before-tags" in self.bugs:
            self.late_tags.append((ipa, tags))
        else:
            await guestram.write_tags(self.vmm, ipa, tags, self.ctx)

    async def _resume(self, rs: RecordStream, state: dict, witness: Any) -> None:
        vmm, ctx = self.vmm, self.ctx
        assert self.layout is not None
        late = "migration-resume-before-tags" in self.bugs
        if not late:
            await self._slots_as_on_source(logging=False)
        if witness is not None:
            try:
                await vmm._call("ghost-import", {"vm": vmm._need_vm(), "entries": witness}, ctx)
            except RemoteError as exc:
                if exc.errno != ENOSYS:
                    raise
        await vmm.set_guest_state(state, ctx)
        self.resumed = True
        await vmm.resume()
        if not late:
            await self._slots_as_on_source(logging=True)
        await rs.send({"t": "resumed"})
        await vmm.migration_hook("resumed")
        if late:
            for ipa, tags in self.late_tags:
                await guestram.write_tags(vmm, ipa, tags, ctx)
            self.late_tags.clear()
            await self._slots_as_on_source(logging=False)
            await self._slots_as_on_source(logging=True)
        if self.fail_at == "after-resume" and self.fail == "kill-destination":
            log.info("vmm:%s: fault injection: kill-destination at after-resume hits only the finished "
                     "migration connection", vmm.name)
        await rs.aclose()

    async def _slots_as_on_source(self, *, logging: bool) -> None:
        """Read-only slots registered read-only again (logging False), or dirty logging where the source logged."""
        vmm, ctx = self.vmm, self.ctx
        assert self.layout is not None
        vm = vmm._need_vm()
        for s in self.layout["slots"]:
            slot = vmm.slots[s["slot"]]
            if not logging and "readonly" in s["flags"]:
                await vmm._call("kvm-set-memory-region", {"vm": vm, "slot": slot.slot, "ipa": slot.ipa, "size": 0,
                                                          "addr": slot.addr, "flags": []}, ctx)
                await vmm._call("kvm-set-memory-region", {"vm": vm, "slot": slot.slot, "ipa": slot.ipa,
                                                          "size": slot.size, "addr": slot.addr,
                                                          "flags": ["readonly"]}, ctx)
                slot.flags = ("readonly",)
            if logging and "log-dirty-pages" in s["flags"] and "log-dirty-pages" not in slot.flags:
                flags = tuple(slot.flags) + ("log-dirty-pages",)
                await vmm._call("kvm-set-memory-region", {"vm": vm, "slot": slot.slot, "ipa": slot.ipa,
                                                          "size": slot.size, "addr": slot.addr,
                                                          "flags": list(flags)}, ctx)
                slot.flags = flags

    async def _fault(self, point: str) -> None:
        if self.fail_at == point and self.fail == "kill-destination":
            log.info("vmm:%s: fault injection: kill-destination at %s", self.vmm.name, point)
            await self.vmm.kill_self()
            raise _Died(f"killed at {point}")

    async def _discard(self, rs: RecordStream, exc: BaseException) -> None:
        """The migration failed before this VM resumed: tell the source, drop the VM, exit."""
        vmm = self.vmm
        if isinstance(exc, Exception) and not isinstance(exc, _Died) and _errno_of(exc)[0] != ECONNRESET:
            errno, message = _errno_of(exc)
            try:
                with trio.move_on_after(1):
                    await rs.send({"t": "error", "errno": errno, "message": message[:512]})
            except StreamError:
                pass
        await rs.aclose()
        if isinstance(exc, _Died):
            return
        await vmm._teardown(self.ctx)
        await vmm.resume()
        await vmm.shutdown(self.ctx)
