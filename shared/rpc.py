"""Serving requests: the one request loop, the far side of :class:`shared.wire.Client`.

:class:`RequestLoop` serves every kind of connection: the hypervisor's
(:mod:`hypervisor.server` plugs in its role checks, kernel contexts and
failure accounting), the VMM's control channel and the guest's channels
(through :func:`serve_requests`, which adds validation against an op table).
It reads request envelopes, runs each through a ``dispatch`` coroutine,
and replies; a handler returns a value, or a :class:`shared.wire.Reply` to
carry a modelled ``fault`` beside the value, and raises an
:class:`shared.errno.ErrnoError` (anything with integer ``errno`` and
``message`` attributes) to reply with an errno. Any other exception is a bug
in the handler: the loop's ``on_internal_error`` hook (default: log it)
names the reply (EIO by default), and the loop goes on.

Nothing a peer sends stops the process: malformed bytes close that connection
(:class:`shared.wire.WireError`), a message that is not a request gets EPROTO
and its connection is closed, a bad id or ``ctx`` gets EINVAL
(:func:`shared.wire.parse_request`), and a reply that cannot be encoded
becomes EIO. :meth:`RequestLoop.run` never raises for a peer's misbehaviour.

How requests run (``docs/performance.md``; the measured costs were a task
and a shielded cancel scope per request and a writer-task wake per reply):

* **Inline** (``inline()`` true, e.g. the hypervisor under the free
  scheduler): the reading task runs the request itself. A request that
  completes without yielding to trio costs no task, no cancel scope and no
  wake. A request that yields hands reading over to a new task at its first
  yield and finishes in the task that was reading, so pipelined requests on
  one connection still overlap (a slow request never blocks a fast one
  behind it).
* **A task per request** (``inline()`` false, e.g. controlled runs, whose
  scheduling decisions must not change): as before.
* **Replies** are coalesced: a reply is queued, and whoever finds nobody
  sending writes all that is queued in one ``send_all`` (the reading task
  defers while more requests are already decoded, so a burst is answered
  in one write). No writer task.
* **Shielding** (``shield=True``, the hypervisor's: a kernel path runs to its
  end even if its client dies, so there are no half-done faults and no leaks):
  one shielded cancel scope per connection. The connection closing does not
  cancel requests in flight; a cancellation from outside stops reading
  (the stream is closed), lets the requests in flight finish, and then
  propagates.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import traceback
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import msgpack
import trio

from shared import wire
from shared.abi import OpDef, validate_args
from shared.errno import EAGAIN, EINVAL, EIO, ErrnoError

log = logging.getLogger("mtekvm.rpc")

#: ``await dispatch(op, args, ctx)`` -> a value or a :class:`shared.wire.Reply`; raises an ErrnoError to fail.
Dispatch = Callable[[Any, Any, "str | None"], Awaitable[Any]]
Handler = Callable[[str, dict, "str | None"], Awaitable[Any]]

_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


#: value types a msgpack round trip returns unchanged (so do ints within 64 bits and ASCII str: see ``_decoded``)
_SAME_AFTER_MSGPACK = frozenset({type(None), bool, bytes})
_INT64, _UINT64 = -(1 << 63), 1 << 64


_NOT_STABLE = object()


def _decoded(v: Any, depth: int = 0) -> Any:
    """What a msgpack round trip gives back for ``v``, made without it when that is easy: msgpack-stable
    scalars (``_SAME_AFTER_MSGPACK``; ints within 64 bits; ASCII str) as they are, and maps (ASCII str
    keys) and lists of them, two levels deep, as new maps and lists. ``_NOT_STABLE``: anything else
    (a tuple, a float, a bytearray, deeper nesting...): the caller takes the round trip."""
    t = type(v)
    if t is int:
        return v if _INT64 <= v < _UINT64 else _NOT_STABLE
    if t in _SAME_AFTER_MSGPACK or (t is str and v.isascii()):
        return v
    if depth < 2:
        if t is list:
            if not v:
                return []
            types = list(map(type, v))
            if types.count(int) == len(v):  # a page's tags, pfns...: in C
                try:
                    bytes(v)  # all within 0..255 (tags): one pass, cheaper than min() and max()
                except ValueError:
                    if min(v) < _INT64 or max(v) >= _UINT64:
                        return _NOT_STABLE
                return list(v)
            if types.count(str) == len(v) and all(map(str.isascii, v)):  # names (prot, flags): in C
                return list(v)
            out = []
            for x in v:
                y = _decoded(x, depth + 1)
                if y is _NOT_STABLE:
                    return _NOT_STABLE
                out.append(y)
            return out
        if t is dict:
            m = {}
            for k, x in v.items():
                if type(k) is not str or not k.isascii():
                    return _NOT_STABLE
                tx = type(x)  # the scalars inline (most values are): a call each only for the rest
                if tx is int:
                    if not _INT64 <= x < _UINT64:
                        return _NOT_STABLE
                elif tx is str:
                    if not x.isascii():
                        return _NOT_STABLE
                elif tx not in _SAME_AFTER_MSGPACK:
                    x = _decoded(x, depth + 1)
                    if x is _NOT_STABLE:
                        return _NOT_STABLE
                m[k] = x
            return m
    return _NOT_STABLE


def _as_decoded(args: Any, ctx: Any) -> dict | None:
    """A request's ``args`` as the server would decode them (:func:`_decoded` of a map), when its ``ctx``
    is well-formed too; None: the caller takes the round trip (and the envelope's parse)."""
    if ctx is not None and not (type(ctx) is str and len(ctx) <= wire.MAX_CTX and ctx.isascii()):
        return None
    if type(args) is not dict:
        return None
    out = _decoded(args)
    return None if out is _NOT_STABLE else out


def _never() -> bool:
    return False


@types.coroutine
def _finish(coro, trap):
    """Go on running ``coro`` in the current task from the trap it yielded; return its result.

    Every trap the coroutine yields (and whatever trio sends or throws back) is
    passed through unchanged: trio sees this task waiting, as it would if the
    coroutine had been awaited here from the start.
    """
    while True:
        try:
            sent = yield trap
        except BaseException as exc:  # noqa: BLE001 - thrown in by trio: the coroutine's to handle
            try:
                trap = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


async def respond(dispatch: Dispatch, on_internal_error: Callable[[Any, Exception], tuple[int, str]],
                  rid: int, op: Any, args: Any, ctx: str | None) -> dict:
    """Run one request through ``dispatch``; return its response envelope (never raises but for
    cancellation): a value or a :class:`shared.wire.Reply`, an errno, or ``on_internal_error``'s
    reply for any other exception. :class:`RequestLoop` and :class:`DirectChannel` both answer so."""
    try:
        result = await dispatch(op, args, ctx)
    except trio.Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
        return _error_envelope(rid, op, exc, on_internal_error)
    return _ok_envelope(rid, result)


def _ok_envelope(rid: int, result: Any) -> dict:
    if type(result) is wire.Reply:
        return wire.response_ok(rid, result.value, result.fault)
    return wire.response_ok(rid, result)


def _error_envelope(rid: int, op: Any, exc: Exception,
                    on_internal_error: Callable[[Any, Exception], tuple[int, str]]) -> dict:
    """The reply to a request whose dispatch raised ``exc``: its errno, or ``on_internal_error``'s."""
    errno = exc.errno if isinstance(exc, ErrnoError) else getattr(exc, "errno", None)
    if isinstance(exc, ErrnoError) or (isinstance(errno, int) and errno > 0):
        assert isinstance(errno, int)  # ErrnoError.errno is always the number
        return wire.response_err(rid, errno, getattr(exc, "message", str(exc)))
    number, text = on_internal_error(op, exc)
    return wire.response_err(rid, number, text)


def _coalesce(parts: list):
    """The parts to write, in order: runs of small ones joined (one ``send_all``), big ones as they are."""
    if len(parts) == 1:
        yield parts[0]
        return
    batch: list = []
    for p in parts:
        if len(p) >= wire.BIG_BIN:
            if batch:
                yield b"".join(batch)
                batch = []
            yield p
        else:
            batch.append(p)
    if batch:
        yield b"".join(batch) if len(batch) > 1 else batch[0]


class RequestLoop:
    """Serve request envelopes on one connection until the peer closes it.

    Args:
        framed: the connection (its stream is not closed here: the caller closes it).
        dispatch: ``await dispatch(op, args, ctx)`` (``op`` and ``args`` as sent, unvalidated).
        max_outstanding: requests running at once; more get EAGAIN.
        name: for log messages.
        inline: called per request; true: run it in the reading task (see the module doc).
        shield: requests run to their end whatever happens to the connection (see the module doc).
        on_internal_error: ``(op, exc) -> (errno, message)`` for an exception that carries no errno
            (default: log it, EIO "internal error in OP: ...").
        on_unencodable: called with the detail when a reply cannot be encoded (it is replied EIO).
    """

    def __init__(self, framed: wire.FramedStream, dispatch: Dispatch, *, max_outstanding: int = 256,
                 name: str = "rpc", inline: Callable[[], bool] = _never, shield: bool = False,
                 on_internal_error: Callable[[Any, Exception], tuple[int, str]] | None = None,
                 on_unencodable: Callable[[str], None] | None = None):
        self.framed = framed
        self.dispatch = dispatch
        self.max_outstanding = max_outstanding
        self.name = name
        self.inline = inline
        self.shield = shield
        self.on_internal_error = on_internal_error or self._log_internal_error
        self.on_unencodable = on_unencodable
        self.outstanding = 0
        #: requests served in the reading task without a task of their own (for tests and statistics)
        self.served_inline = 0
        self._pending: list = []  # the parts of packed replies not yet written
        self._sending = False  # some task is inside send_all and will write what queues meanwhile
        self._gone = False  # a send failed: the peer has gone
        self._done = False  # reading has ended
        self._nursery: trio.Nursery | None = None
        self._base_context: contextvars.Context | None = None

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the peer closes the connection or breaks the protocol; then wait for requests in flight."""
        if not self.shield:
            await self._serve()
            return
        async with trio.open_nursery() as guard:
            guard.start_soon(self._stop_reading_when_cancelled)
            with trio.CancelScope(shield=True):
                await self._serve()
            guard.cancel_scope.cancel()

    async def _stop_reading_when_cancelled(self) -> None:
        # the one unshielded task of a shielded connection: a cancellation from outside closes the
        # stream, so reading stops; the requests in flight finish; then the cancellation propagates
        try:
            await trio.sleep_forever()
        finally:
            if not self._done:
                with trio.CancelScope(shield=True):
                    try:
                        await self.framed.stream.aclose()
                    except Exception:  # noqa: BLE001 - closing a broken stream
                        pass

    async def _serve(self) -> None:
        self._base_context = contextvars.copy_context()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._read()

    async def _read(self) -> None:
        """The reading task's loop; returns when reading ends or when reading was handed to a new task."""
        framed = self.framed
        while True:
            if self._pending and not framed.buffered:
                await self._flush()
            try:
                msg = await framed.receive()
            except wire.WireError as exc:
                if not isinstance(exc, wire.ConnectionClosed):
                    log.info("%s: closing: %s", self.name, exc)
                    if exc.rid is not None:  # it decoded far enough to be answered
                        await self._send(self._pack(wire.response_err(exc.rid, EINVAL, str(exc))))
                break
            try:
                rid, op, args, ctx = wire.parse_request(msg)
            except wire.EnvelopeError as exc:
                self._pending += self._pack(wire.response_err(exc.rid, exc.errno, exc.message))
                if exc.fatal:
                    log.info("%s: closing: %s", self.name, exc.message)
                    break
                continue
            if self.outstanding >= self.max_outstanding:
                self._pending += self._pack(wire.response_err(
                    rid, EAGAIN, f"more than {self.max_outstanding} requests in flight"))
                continue
            self.outstanding += 1
            if not self.inline():
                assert self._nursery is not None
                self._nursery.start_soon(self._handle, rid, op, args, ctx)
                continue
            coro = self._respond(rid, op, args, ctx)
            try:
                trap = coro.send(None)
            except StopIteration as stop:  # done without yielding: no task, no wake
                self.outstanding -= 1
                self.served_inline += 1
                self._pending += stop.value
                continue
            except BaseException:
                self.outstanding -= 1
                raise
            # It yields: a new task reads on, this one finishes the request (from the same trap).
            self._spawn_reader()
            try:
                data = await _finish(coro, trap)
            finally:
                self.outstanding -= 1
            await self._send(data)
            return
        self._done = True
        await self._flush()
        if not self.shield:
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()  # requests in flight die with their connection

    def _spawn_reader(self) -> None:
        assert self._nursery is not None and self._base_context is not None
        # in the connection's own context, not the request's (its kernel context name, etc.)
        self._base_context.run(self._nursery.start_soon, self._read)

    async def _handle(self, rid: int, op: Any, args: Any, ctx: str | None) -> None:
        try:
            data = await self._respond(rid, op, args, ctx)
        finally:
            self.outstanding -= 1
        await self._send(data)

    async def _respond(self, rid: int, op: Any, args: Any, ctx: str | None) -> list:
        """Run one request; return its packed reply's parts (never raises but for cancellation)."""
        return self._pack(await respond(self.dispatch, self.on_internal_error, rid, op, args, ctx))

    def _log_internal_error(self, op: Any, exc: Exception) -> tuple[int, str]:
        log.error("%s: internal error in %s", self.name, wire.brief(op), exc_info=exc)
        return EIO, f"internal error in {wire.brief(op)}: {_error_text(exc)}"

    # -- replies --------------------------------------------------------------------------------

    def _pack(self, msg: dict) -> list:
        """A reply's parts (:meth:`shared.wire.FramedStream.pack_parts`: a big binary is not copied)."""
        try:
            return self.framed.pack_parts(msg, own=True)
        except Exception as exc:  # noqa: BLE001 - a value msgpack refuses (type, depth, size): EIO, not a crash
            detail = f"{type(exc).__name__}: {exc}"
            log.error("%s: reply %s cannot be encoded: %s", self.name, msg.get("id"), detail)
            if self.on_unencodable is not None:
                self.on_unencodable(detail)
            return self.framed.pack_parts(wire.response_err(msg.get("id"), EIO, f"reply cannot be encoded: {detail}"))

    async def _send(self, parts: list) -> None:
        self._pending += parts
        await self._flush()

    async def _flush(self) -> None:
        """Write everything queued, unless another task is writing (it writes what queued meanwhile)."""
        if self._sending:
            return
        if self._gone:
            self._pending.clear()
            return
        self._sending = True
        try:
            while self._pending:
                parts, self._pending = self._pending, []
                if not self.framed.parts_ok:  # a memory stream: one write, as the replies' checkpoints always were
                    await self.framed.stream.send_all(b"".join(parts) if len(parts) > 1 else parts[0])
                    continue
                for data in _coalesce(parts):
                    await self.framed.stream.send_all(data)
        except _CLOSED:
            self._gone = True  # the peer has gone; reading notices on its next receive
            self._pending.clear()
        finally:
            self._sending = False


class DirectChannel(wire.Client):
    """A client whose requests are served by a ``dispatch`` in the caller's task: no stream, no tasks.

    The far side of a :class:`shared.wire.Client` without the bytes in between, for a server
    in this process (the in-process hypervisor of controlled runs). Each request is what
    :class:`RequestLoop` does with one, in the same order and with the same code: the
    envelope is checked (:func:`shared.wire.parse_request`), :data:`max_outstanding`
    applies (EAGAIN), :func:`respond` runs it through ``dispatch`` (errno replies,
    ``on_internal_error``) and the reply is encoded (``on_unencodable``: EIO). Request and
    reply go through msgpack (``packb`` and ``unpackb``, microseconds in C), so the server
    and the caller get the same values as over the wire and share no objects; when msgpack
    would give them back unchanged (:func:`_decoded`: msgpack-stable scalars, and maps and lists
    of them two levels deep) they are handed over without the round trip, in new maps and lists.
    ``shield``: the request runs to its end even if the caller is cancelled, as a
    shielded :class:`RequestLoop` finishes requests whose client died.

    The connection closes from either side: :meth:`aclose` (the client), or :meth:`close`
    (the server, e.g. its process was killed); a call after that, or one in flight when the
    server closed it, raises :class:`shared.wire.ConnectionClosed`. The server learns of the end
    by :meth:`wait_closed` (in a task of its own) or :meth:`when_done` (a callback, no task):
    both once the connection is closed and no request is in flight.
    """

    def __init__(self, dispatch: Dispatch, *, max_outstanding: int = 256, name: str = "rpc",
                 shield: bool = False, on_internal_error: Callable[[Any, Exception], tuple[int, str]] | None = None,
                 on_unencodable: Callable[[str], None] | None = None):
        self.dispatch = dispatch
        self.max_outstanding = max_outstanding
        self.name = name
        self.shield = shield
        self.on_internal_error = on_internal_error or self._log_internal_error
        self.on_unencodable = on_unencodable
        self.outstanding = 0
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}
        self._on_event = None
        self._closed: Exception | None = None
        self._closed_event = trio.Event()
        self._drained: trio.Event | None = None  # set when the last request in flight finishes
        self._on_done: Callable[[], None] | None = None  # see when_done
        self._packer = msgpack.Packer(default=wire._default, use_bin_type=True)

    def _log_internal_error(self, op: Any, exc: Exception) -> tuple[int, str]:
        log.error("%s: internal error in %s", self.name, wire.brief(op), exc_info=exc)
        return EIO, f"internal error in {wire.brief(op)}: {_error_text(exc)}"

    @staticmethod
    def _unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to receive: returns once started (for code that runs a client's loop)."""
        task_status.started()

    async def call_raw(self, op: str, args: dict | None = None, ctx: str | None = None) -> dict:
        """Run one request now, in this task; return its response envelope."""
        err, result, rid = await self._serve(op, args, ctx)
        return self._reply(_ok_envelope(rid, result) if err is None else err)

    async def call(self, op: str, args: dict | None = None, ctx: str | None = None) -> wire.Reply:
        """As :meth:`shared.wire.Client.call`: :meth:`call_raw`, its envelope made only when the value
        needs encoding (a fault, an error, or a value msgpack would change)."""
        err, result, rid = await self._serve(op, args, ctx)
        if err is None:
            value, fault = (result.value, result.fault) if type(result) is wire.Reply else (result, None)
            if fault is None:
                same = _decoded(value)
                if same is not _NOT_STABLE:  # what msgpack would give back: no envelope, no round trip
                    return wire.Reply(same)
            err = wire.response_ok(rid, value, fault)
        return wire.reply_of(self._reply(err))

    async def _serve(self, op: Any, args: Any, ctx: Any) -> tuple[dict | None, Any, int]:
        """What :class:`RequestLoop` does with one request, up to its reply: ``(None, the dispatch's
        result, request id)``, or ``(an error envelope, None, request id)`` (:func:`respond`'s errors)."""
        if self._closed is not None:
            raise wire.ConnectionClosed(str(self._closed))
        rid = next(self._ids)
        same = _as_decoded(args or {}, ctx) if type(op) is str else None
        if same is not None:  # what msgpack would give back, made without the round trip
            args = same
        else:
            msg = self._unpack(self._packer.pack(wire.request(rid, op, args or {}, ctx)))  # as the server decodes it
            try:
                rid, op, args, ctx = wire.parse_request(msg)
            except wire.EnvelopeError as exc:
                if exc.fatal:
                    self.close("the server closed the connection: " + exc.message)
                return wire.response_err(exc.rid, exc.errno, exc.message), None, rid
        if self.outstanding >= self.max_outstanding:
            return wire.response_err(rid, EAGAIN, f"more than {self.max_outstanding} requests in flight"), None, rid
        self.outstanding += 1
        err: dict | None = None
        try:
            try:  # respond()'s work, written out: one coroutine less a request
                coro = cast("Coroutine[Any, Any, Any]", self.dispatch(op, args, ctx))  # (every dispatch is async)
                try:
                    trap = coro.send(None)
                except StopIteration as stop:  # done without yielding to trio: nothing to shield, no cancel scope
                    result = stop.value
                else:
                    if self.shield:
                        # the shield is entered before trio sees the first trap, so it covers every checkpoint
                        # (a dispatch that opens a cancel scope before its first trap needs shield=False)
                        with trio.CancelScope(shield=True):
                            result = await _finish(coro, trap)
                    else:
                        result = await _finish(coro, trap)
            except trio.Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
                result, err = None, _error_envelope(rid, op, exc, self.on_internal_error)
        finally:
            self.outstanding -= 1
            if not self.outstanding:
                if self._drained is not None:
                    self._drained.set()
                if self._closed is not None:
                    self._done()
        if self._closed is not None:  # closed while it ran: its reply is lost with the connection
            raise wire.ConnectionClosed(str(self._closed))
        return err, result, rid

    def _reply(self, msg: dict) -> dict:
        if msg.get("fault") is None and msg.get("ok"):
            value = _decoded(msg.get("value"))
            if value is not _NOT_STABLE:  # what msgpack would give back, in a new envelope: no round trip
                return dict(msg, value=value)
        try:
            data = self._packer.pack(msg)
        except Exception as exc:  # noqa: BLE001 - a value msgpack refuses: EIO, as RequestLoop._pack
            detail = f"{type(exc).__name__}: {exc}"
            log.error("%s: reply %s cannot be encoded: %s", self.name, msg.get("id"), detail)
            if self.on_unencodable is not None:
                self.on_unencodable(detail)
            data = self._packer.pack(wire.response_err(msg.get("id"), EIO, f"reply cannot be encoded: {detail}"))
        return self._unpack(data)

    def close(self, why: str = "end of stream") -> None:
        """Close the connection (either side); calls from now on raise ConnectionClosed."""
        if self._closed is None:
            self._closed = wire.ConnectionClosed(why)
            self._closed_event.set()
            if not self.outstanding:
                self._done()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, in the task that closes the connection or finishes its last
        request in flight, when it is closed and none is in flight (:meth:`wait_closed` without a
        task waiting for the whole life of the connection)."""
        self._on_done = callback
        if self._closed is not None and not self.outstanding:
            self._done()

    def _done(self) -> None:
        callback, self._on_done = self._on_done, None
        if callback is not None:
            callback()

    async def aclose(self) -> None:
        """Close the connection (the client's side)."""
        self.close("the connection is closed")
        await trio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and no request is in flight (the server's side)."""
        await self._closed_event.wait()
        while self.outstanding:
            self._drained = trio.Event()
            await self._drained.wait()


async def serve_requests(stream: trio.abc.Stream, table: dict[str, OpDef], handler: Handler, *,
                         max_outstanding: int = 256, name: str = "rpc") -> None:
    """Serve one stream with :class:`RequestLoop` until the peer closes it or sends a malformed frame.

    Each request's arguments are validated against ``table`` (ENOSYS, EINVAL,
    E2BIG) before ``handler`` sees them; each runs in a task of its own, and
    requests in flight are cancelled when the connection closes.

    Args:
        stream: the connected stream (closed on return).
        table: the ops this server accepts (see :mod:`shared.control`).
        handler: ``await handler(op, args, ctx)`` with validated args.
        max_outstanding: requests running at once; more get EAGAIN.
        name: for log messages.
    """

    async def dispatch(op: Any, args: Any, ctx: str | None) -> Any:
        return await handler(op, validate_args(op, args, table), ctx)

    try:
        await RequestLoop(wire.FramedStream(stream), dispatch, max_outstanding=max_outstanding, name=name).run()
    except Exception:  # noqa: BLE001 - a bug serving one connection must not stop the process
        log.exception("%s: connection failed; closing it", name)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:  # noqa: BLE001 - closing a broken stream
                pass
