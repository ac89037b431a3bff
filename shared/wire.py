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
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import msgpack
import trio

from shared.errno import errno_name

#: Largest single frame accepted (a 1 GiB COPY_TAGS dump travels in chunks).
MAX_FRAME = 64 * 1024 * 1024
#: Read size for the receive loop (measured sweet spot, concurrency-and-transport.md).
RECEIVE_SIZE = 256 * 1024


class WireError(Exception):
    """The peer sent bytes that are not a valid frame; the connection is unusable."""


class ConnectionClosed(WireError):
    """The peer closed the connection (or it was reset)."""


class RemoteError(Exception):
    """A request failed on the far side with a Linux errno.

    Attributes:
        errno: the Linux errno number.
        name: its symbolic name (``"EINVAL"``).
        message: what the far side said about it.
    """

    def __init__(self, errno: int, message: str = ""):
        self.errno = errno
        self.name = errno_name(errno)
        self.message = message
        super().__init__(f"{self.name}: {message}" if message else self.name)


@attrs.frozen
class Reply:
    """A successful response: the op's value plus any modelled fault event."""

    value: Any = None
    fault: dict | None = None


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


# msgpack first byte -> (header size, what follows). "body:K" = a big-endian length of K bytes at
# offset 1 (ext: plus one type byte); "fixed:N" = N bytes of payload; "array:K"/"map:K" likewise.
def _header_kind(b: int):
    if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
        return 1, "fixed", 0
    if 0x80 <= b <= 0x8F:
        return 1, "map", b & 0x0F
    if 0x90 <= b <= 0x9F:
        return 1, "array", b & 0x0F
    if 0xA0 <= b <= 0xBF:
        return 1, "fixed", b & 0x1F
    table = {
        0xC4: (2, "body", 1), 0xC5: (3, "body", 2), 0xC6: (5, "body", 4),
        0xC7: (3, "ext", 1), 0xC8: (4, "ext", 2), 0xC9: (6, "ext", 4),
        0xCA: (1, "fixed", 4), 0xCB: (1, "fixed", 8),
        0xCC: (1, "fixed", 1), 0xCD: (1, "fixed", 2), 0xCE: (1, "fixed", 4), 0xCF: (1, "fixed", 8),
        0xD0: (1, "fixed", 1), 0xD1: (1, "fixed", 2), 0xD2: (1, "fixed", 4), 0xD3: (1, "fixed", 8),
        0xD4: (1, "fixed", 2), 0xD5: (1, "fixed", 3), 0xD6: (1, "fixed", 5), 0xD7: (1, "fixed", 9),
        0xD8: (1, "fixed", 17),
        0xD9: (2, "body", 1), 0xDA: (3, "body", 2), 0xDB: (5, "body", 4),
        0xDC: (3, "array", 2), 0xDD: (5, "array", 4), 0xDE: (3, "map", 2), 0xDF: (5, "map", 4),
    }
    if b not in table:
        raise WireError(f"malformed frame: byte {b:#04x} starts no msgpack value")
    return table[b]


class _FrameGuard:
    """Walks msgpack headers as bytes arrive and refuses a frame that declares more than ``limit``.

    The streaming Unpacker only notices an oversized bin/str/ext when its
    buffer fills, so a peer could make the receiver wait for a 1 GiB body.
    This walker reads headers only (bodies are skipped by length, so it costs
    a few steps per message) and keeps its state across chunks.
    """

    MAX_DEPTH = 1024

    def __init__(self, limit: int):
        self.limit = limit
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

    def feed(self, data: bytes) -> None:
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


def _default(obj):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


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
            strict_map_key=False,
            max_buffer_size=max_frame,
            max_bin_len=max_frame,
            max_str_len=max_frame,
            max_array_len=max_frame,
            max_map_len=1 << 16,
        )
        self._packer = msgpack.Packer(default=_default, use_bin_type=True)
        self._guard = _FrameGuard(max_frame)

    async def send(self, msg: Any) -> None:
        """Send one message.

        Raises:
            ConnectionClosed: the peer has gone.
        """
        data = self._packer.pack(msg)
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(str(exc)) from None

    async def receive(self) -> Any:
        """Receive the next message.

        Raises:
            ConnectionClosed: end of stream.
            WireError: the bytes are not msgpack, or a frame is too large.
        """
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                pass
            except (msgpack.UnpackException, ValueError) as exc:
                raise WireError(f"malformed frame: {exc}") from None
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(str(exc)) from None
            if not data:
                raise ConnectionClosed("end of stream")
            self._guard.feed(data)
            try:
                self._unpacker.feed(data)
            except msgpack.BufferFull:
                raise WireError(f"frame larger than {MAX_FRAME} bytes") from None

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
                if kind == "res":
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
        slot = [trio.Event(), None]
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
        msg = await self.call_raw(op, args, ctx)
        if not msg.get("ok"):
            raise RemoteError(msg.get("errno", 0), msg.get("msg", ""))
        return Reply(msg.get("value"), msg.get("fault"))

    async def aclose(self) -> None:
        """Close the connection."""
        await self.framed.aclose()
