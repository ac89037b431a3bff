"""msgpack framing over any trio stream, and the message envelopes.

Every message is one msgpack map written back to back on a byte stream (Unix
socket, TCP socket or ``trio.testing.memory_stream_pair``); a streaming
:class:`msgpack.Unpacker` splits them, so there is no length prefix. Bounds:
a frame may not exceed :data:`MAX_FRAME` bytes, and a peer that sends one (or
bytes that are not msgpack) gets its connection closed by the receiver.

Envelopes (the ``t`` key says which)::

    request   {"t": "req", "id": 7, "op": "mmap", "args": {...}, "ctx": "A/3"}
    response  {"t": "res", "id": 7, "ok": True, "value": ..., "fault": None}
              {"t": "res", "id": 7, "ok": False, "errno": 22, "err": "EINVAL", "msg": "..."}
    event     {"t": "evt", "kind": "violation", "data": {...}}

Ids let one connection carry concurrent requests; responses may arrive in any
order. ``ctx`` names the kernel context (the scheduler's actor) a request runs
as; ``fault`` carries a modelled architectural event (a tag check fault) as
data, never as an error.

Errors: nothing a peer sends may take a process down; only the offending
connection suffers. The decoder admits only ``str``/``bytes`` map keys
(``strict_map_key``: an array or map as a key is malformed, not a
``TypeError``), at most :data:`MAX_DEPTH` levels of nesting (so decoded
messages can be re-packed, ``repr``'d and walked without ``RecursionError``),
and frames up to :data:`MAX_FRAME` bytes (or the lower bound a server sets
with :meth:`FramedStream.limit_frames`, e.g. before ``hello``). Whatever it
refuses raises :class:`WireError` and the receiver closes that connection
without a reply (the framing is lost, no id can be read), except a message
refused only for its nesting: servers answer it EINVAL with its id (the
error's ``rid``) before closing. A message that decodes but is not a
request envelope (:func:`parse_request`) gets an error response (EPROTO, with
its ``id`` when one can be read) and the connection is closed; a request
envelope with a bad ``id`` (EINVAL, ``id`` nil), ``ctx`` (EINVAL), op (ENOSYS)
or ``args`` (EINVAL, E2BIG) gets an error response and the connection goes on.
"""

from __future__ import annotations

import collections
import itertools
import reprlib
import struct
from typing import Any

import attrs
import msgpack
import trio

from shared.errno import EINVAL, EPROTO, ErrnoError, errno_name

#: Largest single frame accepted (a 1 GiB COPY_TAGS dump travels in chunks).
MAX_FRAME = 64 * 1024 * 1024
#: Deepest nesting of arrays and maps in one message (the ABI's own messages nest under 10 deep;
#: msgpack's C decoder stops at 1024, Python's repr at about 1000, msgpack's packer at 512).
MAX_DEPTH = 64
#: Longest ``ctx`` (a kernel context name) a request may carry.
MAX_CTX = 256
#: Read size for the receive loop (measured sweet spot, concurrency-and-transport.md).
RECEIVE_SIZE = 256 * 1024


class WireError(Exception):
    """The peer sent bytes that are not a valid frame; the connection is unusable.

    Attributes:
        rid: the id of the refused message when it decoded far enough to have one
            (it nests too deep), else None; a server may reply to it before closing.
    """

    rid: int | None = None

    def __init__(self, message: str = "", rid: int | None = None):
        super().__init__(message)
        self.rid = rid


class ConnectionClosed(WireError):
    """The peer closed the connection (or it was reset)."""


class RemoteError(ErrnoError):
    """A request failed on the far side with a Linux errno (``errno``, ``name``, ``message``: what the far side
    said)."""


@attrs.frozen
class Reply:
    """A successful response: the op's value plus any modelled fault event."""

    value: Any = None
    fault: dict | None = None


def reply_of(msg: dict) -> Reply:
    """A response envelope's :class:`Reply`.

    Raises:
        RemoteError: the envelope carries an errno.
    """
    if not msg.get("ok"):
        raise RemoteError(msg.get("errno", 0), msg.get("msg", ""))
    return Reply(msg.get("value"), msg.get("fault"))


def request(rid: int, op: str, args: dict, ctx: str | None = None) -> dict:
    """Build a request envelope."""
    msg = {"t": "req", "id": rid, "op": op, "args": args}
    if ctx is not None:
        msg["ctx"] = ctx
    return msg


def response_ok(rid: int, value: Any = None, fault: dict | None = None) -> dict:
    """Build a success response envelope."""
    return {"t": "res", "id": rid, "ok": True, "value": value, "fault": fault}


def response_err(rid: int | None, errno: int, message: str) -> dict:
    """Build an error response envelope carrying a Linux errno."""
    return {"t": "res", "id": rid, "ok": False, "errno": errno, "err": errno_name(errno), "msg": message}


def event(kind: str, data: Any) -> dict:
    """Build an event envelope (unsolicited news from the far side)."""
    return {"t": "evt", "kind": kind, "data": data}


class EnvelopeError(ErrnoError):
    """A decoded message that is not a usable request envelope.

    Attributes:
        errno: the Linux errno to reply with (EPROTO: not a request at all; EINVAL: a bad field).
        message: what is wrong.
        rid: the id to reply to (None when the message has no integer id).
        fatal: the connection must be closed after the reply (the peer does not speak the protocol).
    """

    def __init__(self, errno: int, message: str, rid: int | None = None, fatal: bool = False):
        super().__init__(errno, message)
        self.rid = rid
        self.fatal = fatal


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_request(msg: Any) -> tuple[int, Any, Any, str | None]:
    """Check a decoded message is a request envelope; return ``(id, op, args, ctx)``.

    ``op`` and ``args`` are returned as sent (missing ``args`` is an empty map):
    the op table's :func:`shared.abi.validate_args` judges them (ENOSYS, EINVAL).

    Raises:
        EnvelopeError: EPROTO (fatal) for anything but a map whose ``t`` is
            ``"req"``; EINVAL for an ``id`` that is not an integer (``rid`` None)
            or a ``ctx`` that is not a string of at most :data:`MAX_CTX` characters.
    """
    if not isinstance(msg, dict):
        raise EnvelopeError(EPROTO, f"not a request envelope: {brief(msg)}", None, fatal=True)
    rid = msg.get("id")
    rid = rid if _is_int(rid) else None
    if msg.get("t") != "req":
        raise EnvelopeError(EPROTO, f"not a request envelope: t is {brief(msg.get('t'))}", rid, fatal=True)
    if rid is None:
        raise EnvelopeError(EINVAL, "request id must be an integer")
    ctx = msg.get("ctx")
    if ctx is not None and not (isinstance(ctx, str) and len(ctx) <= MAX_CTX):
        raise EnvelopeError(EINVAL, f"ctx must be a string of at most {MAX_CTX} characters", rid)
    return rid, msg.get("op"), msg.get("args", {}), ctx


class _Brief(reprlib.Repr):
    """repr bounded in depth and length whatever a peer sent (no RecursionError, no 64 MiB strings)."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = 40

    def repr_bytes(self, x, level):
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_bytearray(self, x, level):
        return self.repr_bytes(bytes(x[:self.maxstring + 1]), level)

    def repr_str(self, x, level):
        return reprlib.Repr.repr_str(self, x[:self.maxstring + 1], level)

    def repr_instance(self, x, level):
        if isinstance(x, msgpack.ExtType):
            return f"ExtType({x.code}, {self.repr1(x.data, level - 1)})"
        return reprlib.Repr.repr_instance(self, x, level)


_BRIEF = _Brief()


def brief(value: Any, limit: int = 80) -> str:
    """A short ``repr`` of any decoded value, for error text (bounded in depth and length)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` nests lists and maps more than ``limit`` levels deep (a decoded message: no cycles)."""
    t = type(obj)
    return (t is list or t is dict) and not _nests_within(obj, limit)


def _nests_within(obj, budget: int) -> bool:
    # recursion is bounded by budget (MAX_DEPTH frames); a long flat list is judged at C speed
    items = obj if type(obj) is list else obj.values()
    if len(items) > 16 and _CONTAINERS.isdisjoint(map(type, items)):
        return True
    for v in items:
        t = type(v)
        if (t is list or t is dict) and (budget <= 1 or not _nests_within(v, budget - 1)):
            return False
    return True


_CONTAINERS = frozenset((list, dict))


# msgpack first byte -> (header size, kind, k): "fixed" = k bytes of payload follow the header;
# "body"/"ext" = a big-endian length of k bytes at offset 1 (ext's type byte is in the header
# size); "array"/"map" = k items (fix forms) or a k-byte count. None: no value starts so.
def _build_header_table() -> tuple:
    t: list = [None] * 256
    for b in range(256):
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            t[b] = (1, "fixed", 0)
        elif b <= 0x8F:
            t[b] = (1, "map", b & 0x0F)
        elif b <= 0x9F:
            t[b] = (1, "array", b & 0x0F)
        elif b <= 0xBF:
            t[b] = (1, "fixed", b & 0x1F)
    t[0xC4], t[0xC5], t[0xC6] = (2, "body", 1), (3, "body", 2), (5, "body", 4)
    t[0xC7], t[0xC8], t[0xC9] = (3, "ext", 1), (4, "ext", 2), (6, "ext", 4)
    t[0xCA], t[0xCB] = (1, "fixed", 4), (1, "fixed", 8)
    for b, n in zip(range(0xCC, 0xD4), (1, 2, 4, 8, 1, 2, 4, 8), strict=True):
        t[b] = (1, "fixed", n)
    for b, n in zip(range(0xD4, 0xD9), (2, 3, 5, 9, 17), strict=True):
        t[b] = (1, "fixed", n)
    t[0xD9], t[0xDA], t[0xDB] = (2, "body", 1), (3, "body", 2), (5, "body", 4)
    t[0xDC], t[0xDD], t[0xDE], t[0xDF] = (3, "array", 2), (5, "array", 4), (3, "map", 2), (5, "map", 4)
    return tuple(t)


_HEADERS = _build_header_table()


def _header_kind(b: int):
    kind = _HEADERS[b]
    if kind is None:
        raise WireError(f"malformed frame: byte {b:#04x} starts no msgpack value")
    return kind


class _FrameGuard:
    """Walks msgpack headers as bytes arrive and refuses a frame that declares more than ``limit``.

    The streaming Unpacker only notices an oversized bin/str/ext when its
    buffer fills, so a peer could make the receiver wait for a 1 GiB body.
    This walker reads headers only (bodies are skipped by length, so it costs
    a few steps per message) and keeps its state across chunks.
    """

    MAX_DEPTH = MAX_DEPTH

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next byte fed starts a frame."""
        self.frame = 0  # bytes of the current frame seen so far (headers + bodies)
        self.skip = 0  # body bytes still to skip
        self.partial = b""  # an incomplete header
        self.stack: list[int] = []  # items left in each open container

    def _item_done(self) -> None:
        while self.stack:
            self.stack[-1] -= 1
            if self.stack[-1] > 0:
                return
            self.stack.pop()
        self.frame = 0  # a whole top-level message is complete

    def feed(self, data: bytes | bytearray) -> None:
        """Account for ``data``.

        Raises:
            WireError: a header declares a frame over the limit, or is invalid.
        """
        i, n = 0, len(data)
        while i < n:
            if self.skip:
                step = min(self.skip, n - i)
                self.skip -= step
                i += step
                if not self.skip:
                    self._item_done()
                continue
            need_first = self.partial[:1] or data[i:i + 1]
            size, kind, k = _header_kind(need_first[0])
            have = self.partial + data[i:i + size - len(self.partial)]
            if len(have) < size:
                self.partial = have
                i = n
                break
            i += size - len(self.partial)
            self.partial = b""
            self.frame += size
            if kind in ("body", "ext"):
                body = int.from_bytes(have[1:1 + k], "big")  # ext's type byte is in its header size
            elif kind == "fixed":
                body = k
            else:
                count = int.from_bytes(have[1:1 + k], "big") if k and size > 1 else k
                count *= 2 if kind == "map" else 1
                if count > self.limit:
                    raise WireError(f"frame declares a container of {count} items, over the bound")
                if count == 0:
                    self._item_done()
                    continue
                if len(self.stack) >= self.MAX_DEPTH:
                    raise WireError(f"frame nests containers deeper than {self.MAX_DEPTH}")
                self.stack.append(count)
                continue
            if self.frame + body > self.limit:
                raise WireError(f"frame larger than {self.limit} bytes (a header declares {body} more)")
            self.frame += body
            if body:
                self.skip = body
            else:
                self._item_done()


#: A packer that has packed a message larger than this is replaced (its buffer is freed).
PACKER_KEEP = 1 << 20
#: A binary value at least this long travels as a part of its own (:func:`pack_parts`): not copied
#: into the packer's buffer. At least 65536, so that msgpack itself would give it a bin 32 header.
BIG_BIN = 1 << 16
_BIN32 = struct.Struct(">BI")
_BYTES_LIKE = (bytes, bytearray, memoryview)


def _default(obj):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _has_big(d: dict, depth: int) -> bool:
    for v in d.values():
        t = type(v)
        if t in _BYTES_LIKE:
            if len(v) >= BIG_BIN:
                return True
        elif t is dict and depth and _has_big(v, depth - 1):
            return True
    return False


def _nbytes(v: Any) -> int:
    return v.nbytes if type(v) is memoryview else len(v)


def pack_parts(packer: msgpack.Packer, msg: Any, *, own: bool = False) -> list:
    """The msgpack encoding of ``msg`` as a list of bytes-like parts, big binaries not copied.

    Exactly the bytes ``packer.pack(msg)`` gives (a map's items in order; a binary of
    :data:`BIG_BIN` bytes or more has msgpack's bin 32 header), but every such binary found in
    a map, or in a map inside a map (a request's ``args``, a reply's ``value``), is a part of
    its own, the caller's object itself: a 16 MiB page run costs no packer-buffer growth and no
    copy (the packer's copy was several times a memcpy: its buffer grows in steps, in fresh
    memory). A message without one is ``[packer.pack(msg)]``. ``packer`` must be autoreset.

    ``own``: the parts will be written later (a queued reply), so a mutable binary (``bytearray``,
    ``memoryview``) is copied now, as packing would have; ``bytes`` cannot change and is not.
    """
    if type(msg) is not dict or not _has_big(msg, 1):
        return [packer.pack(msg)]
    parts: list = []
    small = bytearray()
    _pack_map(packer, msg, 1, parts, small, own)
    if small:
        parts.append(bytes(small))
    return parts


def _pack_map(packer: msgpack.Packer, d: dict, depth: int, parts: list, small: bytearray, own: bool) -> None:
    n = len(d)
    if n <= 15:
        small.append(0x80 | n)
    elif n <= 0xFFFF:
        small += struct.pack(">BH", 0xDE, n)
    else:
        small += struct.pack(">BI", 0xDF, n)
    for k, v in d.items():
        small += packer.pack(k)
        t = type(v)
        if t in _BYTES_LIKE and _nbytes(v) >= BIG_BIN:
            if t is not bytes and (own or (t is memoryview and not (v.c_contiguous and v.itemsize == 1))):
                v = bytes(v)
            small += _BIN32.pack(0xC6, _nbytes(v))
            parts.append(bytes(small))
            small.clear()
            parts.append(v)
        elif t is dict and depth and _has_big(v, depth - 1):
            _pack_map(packer, v, depth - 1, parts, small, own)
        else:
            small += packer.pack(v)


def join_parts(parts: list) -> bytes:
    """The parts of :func:`pack_parts` as one bytes object (one copy)."""
    return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)


class FramedStream:
    """msgpack messages over a trio byte stream.

    Sends are serialised by a lock (``SocketStream.send_all`` refuses two
    concurrent senders); one task should own :meth:`receive`.

    Args:
        stream: any ``trio.abc.Stream``.
        max_frame: bound on one incoming frame; larger ones raise :class:`WireError`.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame: int = MAX_FRAME):
        self.stream = stream
        self._send_lock = trio.Lock()
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,  # keys are str or bytes: an array key must not become a TypeError
            max_buffer_size=max_frame,
            max_bin_len=max_frame,
            max_str_len=max_frame,
            max_array_len=max_frame,
            max_map_len=1 << 16,
        )
        self._packer = msgpack.Packer(default=_default, use_bin_type=True)
        #: a message's parts are written one by one (no joining copy) only to a socket: on other streams (the
        #: memory streams of in-process runs) one message stays one ``send_all``, one checkpoint, as before
        self.parts_ok = isinstance(stream, trio.SocketStream)
        self.max_frame = max_frame
        self._guard = _FrameGuard(max_frame)
        self._ready: collections.deque = collections.deque()  # decoded, not yet returned
        self._fed = 0  # bytes fed to the unpacker so far
        self._boundary = 0  # stream offset where the last complete message ended
        self._error: WireError | None = None  # raised once the messages before it are delivered

    def pack(self, msg: Any) -> bytes:
        """The bytes of one message (for callers that batch their own sends)."""
        return join_parts(self.pack_parts(msg))

    def pack_parts(self, msg: Any, *, own: bool = False) -> list:
        """One message as bytes-like parts (:func:`pack_parts`: its big binaries not copied)."""
        parts = pack_parts(self._packer, msg, own=own)
        if len(parts) == 1 and len(parts[0]) > PACKER_KEEP:
            # msgpack's Packer keeps its buffer as large as the largest message: a big one not made of
            # parts (many small items) must not keep it
            self._packer = msgpack.Packer(default=_default, use_bin_type=True)
        return parts

    @property
    def buffered(self) -> int:
        """Messages already decoded that :meth:`receive` will return without waiting."""
        return len(self._ready)

    def limit_frames(self, limit: int | None) -> None:
        """Refuse incoming frames over ``limit`` bytes from now on (None: back to ``max_frame``).

        A server lowers the bound for peers it does not know yet (before ``hello``),
        so that an unauthenticated peer cannot make it buffer a 64 MiB frame. Bytes
        already decoded are not re-judged.
        """
        self._guard.limit = self.max_frame if limit is None else min(limit, self.max_frame)

    async def send(self, msg: Any) -> None:
        """Send one message (its big binaries without a copy: :meth:`pack_parts`).

        Raises:
            ConnectionClosed: the peer has gone.
        """
        parts = self.pack_parts(msg)
        if self.parts_ok:
            await self.send_packed(*parts)
        else:
            await self.send_packed(join_parts(parts))

    async def send_packed(self, *data: bytes | bytearray | memoryview) -> None:
        """Send bytes from :meth:`pack` or the parts of :meth:`pack_parts` (one or more whole messages).

        Raises:
            ConnectionClosed: the peer has gone.
        """
        async with self._send_lock:
            try:
                for part in data:
                    await self.stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(str(exc)) from None

    async def receive(self) -> Any:
        """Receive the next message.

        Raises:
            ConnectionClosed: end of stream.
            WireError: the bytes are not msgpack, or a frame is too large.
        """
        while not self._ready:
            if self._error is not None:
                raise self._error
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(str(exc)) from None
            if not data:
                raise ConnectionClosed("end of stream")
            try:
                self._take(data)
            except WireError as exc:  # deliver what arrived intact first, then fail
                self._error = exc
        return self._ready.popleft()

    def _take(self, data: bytes | bytearray) -> None:
        """Decode every complete message in ``data``; bound the incomplete one that remains."""
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise WireError(f"frame larger than {self._guard.limit} bytes") from None
        self._fed += len(data)
        completed = False
        while True:
            try:
                msg = next(self._unpacker)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - whatever the decoder refuses is a bad frame, never a crash
                raise WireError(f"malformed frame: {type(exc).__name__}: {brief(str(exc))}") from None
            end = self._unpacker.tell()  # tell() is a frame boundary only right after a message
            if end - self._boundary > self._guard.limit:  # whole in one read, but over a lowered bound
                raise WireError(f"frame larger than {self._guard.limit} bytes")
            if end - self._boundary > MAX_DEPTH and _too_deep(msg):  # n bytes cannot nest deeper than n
                rid = msg.get("id") if isinstance(msg, dict) else None
                raise WireError(f"message nests lists and maps deeper than {MAX_DEPTH}",
                                rid if _is_int(rid) else None)
            self._ready.append(msg)
            completed = True
            self._boundary = end
        # The guard walks only the frame still incomplete (small messages never reach it).
        pending = self._fed - self._boundary
        if pending == 0:
            self._guard.reset()
        elif completed or self._guard.frame == 0 and not self._guard.stack and not self._guard.partial:
            self._guard.reset()
            self._guard.feed(data[len(data) - pending:])  # that frame began inside this chunk
        else:
            self._guard.feed(data)  # the frame the guard is already following goes on

    async def aclose(self) -> None:
        """Close the underlying stream."""
        await self.stream.aclose()


class Client:
    """The caller's side of a connection: concurrent requests matched by id.

    Run :meth:`run` in a nursery (it owns the receive loop), then ``await
    client.call(op, **args)`` from any number of tasks.

    Args:
        stream: the connected trio stream.
        on_event: called with each event envelope's ``(kind, data)``.
    """

    def __init__(self, stream: trio.abc.Stream, on_event=None):
        self.framed = FramedStream(stream)
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}
        self._on_event = on_event
        self._closed: Exception | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Receive responses until the connection closes."""
        task_status.started()
        try:
            while True:
                msg = await self.framed.receive()
                kind = msg.get("t") if isinstance(msg, dict) else None
                if kind == "res" and _is_int(msg.get("id")):
                    slot = self._waiting.pop(msg.get("id"), None)
                    if slot is not None:
                        slot[1] = msg
                        slot[0].set()
                elif kind == "evt" and self._on_event is not None:
                    self._on_event(msg.get("kind"), msg.get("data"))
        except WireError as exc:
            self._closed = exc
        finally:
            if self._closed is None:
                self._closed = ConnectionClosed("client stopped")
            for slot in self._waiting.values():
                slot[0].set()
            self._waiting.clear()

    async def call_raw(self, op: str, args: dict | None = None, ctx: str | None = None) -> dict:
        """Send a request and return the whole response envelope."""
        if self._closed is not None:
            raise ConnectionClosed(str(self._closed))
        rid = next(self._ids)
        slot: list[Any] = [trio.Event(), None]  # [set when answered, the response]
        self._waiting[rid] = slot
        await self.framed.send(request(rid, op, args or {}, ctx))
        await slot[0].wait()
        if slot[1] is None:
            raise ConnectionClosed(str(self._closed))
        return slot[1]

    async def call(self, op: str, args: dict | None = None, ctx: str | None = None) -> Reply:
        """Send a request; return its :class:`Reply`.

        Raises:
            RemoteError: the op failed with an errno.
            ConnectionClosed: the connection went away first.
        """
        return reply_of(await self.call_raw(op, args, ctx))

    async def aclose(self) -> None:
        """Close the connection."""
        await self.framed.aclose()
