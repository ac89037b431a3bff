"""Serving requests: the far side of :class:`shared.wire.Client`, for the VMM and the guest.

The hypervisor has its own server (roles, secrets, kernel contexts); the
VMM's control channel and the guest's channels need only this: read request
envelopes, validate each against an op table, run the handler concurrently,
reply. A handler returns a value, or a :class:`shared.wire.Reply` to carry a
modelled ``fault`` beside the value; it raises anything with ``errno`` and
``message`` attributes (:class:`shared.wire.RemoteError`,
:class:`shared.abi.AbiError`, the packages' root errors) to reply with an
errno. Any other exception is a bug in the handler: it is logged and replied
as EIO, and the server goes on.

Nothing a peer sends stops the process: malformed bytes close that connection
(:class:`shared.wire.WireError`), a message that is not a request gets EPROTO
and its connection is closed, a bad id or ``ctx`` gets EINVAL
(:func:`shared.wire.parse_request`), bad arguments get the table's errno, and a
reply that cannot be encoded becomes EIO. :func:`serve_requests` never raises
for a peer's misbehaviour.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Awaitable, Callable

import trio

from shared import wire
from shared.abi import OpDef, validate_args
from shared.errno import EAGAIN, EINVAL, EIO

log = logging.getLogger("mtekvm.rpc")

Handler = Callable[[str, dict, "str | None"], Awaitable[Any]]


async def serve_requests(stream: trio.abc.Stream, table: dict[str, OpDef], handler: Handler, *,
                         max_outstanding: int = 256, name: str = "rpc") -> None:
    """Serve one stream until the peer closes it or sends a malformed frame.

    Args:
        stream: the connected stream (closed on return).
        table: the ops this server accepts (see :mod:`shared.control`).
        handler: ``await handler(op, args, ctx)`` with validated args.
        max_outstanding: requests running at once; more get EAGAIN.
        name: for log messages.
    """
    framed = wire.FramedStream(stream)
    outstanding = 0

    async def reply(msg: dict) -> None:
        try:
            data = framed.pack(msg)
        except Exception as exc:  # noqa: BLE001 - a handler's value msgpack refuses (a bug): EIO, not a crash
            log.error("%s: reply %s cannot be encoded: %s", name, msg.get("id"), exc)
            data = framed.pack(wire.response_err(msg.get("id"), EIO, f"reply cannot be encoded: "
                                                                     f"{type(exc).__name__}: {exc}"))
        try:
            await framed.send_packed(data)
        except wire.ConnectionClosed:
            pass

    async def handle(rid: int, op: Any, args: Any, ctx: str | None) -> None:
        nonlocal outstanding
        try:
            a = validate_args(op, args, table)
            result = await handler(op, a, ctx)
            if isinstance(result, wire.Reply):
                msg = wire.response_ok(rid, result.value, result.fault)
            else:
                msg = wire.response_ok(rid, result)
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
            errno = getattr(exc, "errno", None)
            if isinstance(errno, int) and errno > 0:
                msg = wire.response_err(rid, errno, getattr(exc, "message", str(exc)))
            else:
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                log.exception("%s: internal error in %s", name, wire.brief(op))
                msg = wire.response_err(rid, EIO, f"internal error in {wire.brief(op)}: {detail}")
        finally:
            outstanding -= 1
        await reply(msg)

    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    msg = await framed.receive()
                except wire.WireError as exc:
                    if not isinstance(exc, wire.ConnectionClosed):
                        log.info("%s: closing: %s", name, exc)
                        if exc.rid is not None:  # it decoded far enough to be answered
                            await reply(wire.response_err(exc.rid, EINVAL, str(exc)))
                    break
                try:
                    rid, op, args, ctx = wire.parse_request(msg)
                except wire.EnvelopeError as exc:
                    await reply(wire.response_err(exc.rid, exc.errno, exc.message))
                    if exc.fatal:
                        log.info("%s: closing: %s", name, exc.message)
                        break
                    continue
                if outstanding >= max_outstanding:
                    await reply(wire.response_err(rid, EAGAIN, f"more than {max_outstanding} requests in flight"))
                    continue
                outstanding += 1
                nursery.start_soon(handle, rid, op, args, ctx)
            nursery.cancel_scope.cancel()
    except Exception:  # noqa: BLE001 - a bug serving one connection must not stop the process
        log.exception("%s: connection failed; closing it", name)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:  # noqa: BLE001 - closing a broken stream
                pass
