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
            await framed.send(msg)
        except wire.ConnectionClosed:
            pass

    async def handle(rid: int, op: Any, args: Any, ctx: Any) -> None:
        nonlocal outstanding
        try:
            a = validate_args(op, args, table)
            result = await handler(op, a, ctx if isinstance(ctx, str) else None)
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
                log.exception("%s: internal error in %s", name, op)
                msg = wire.response_err(rid, EIO, f"internal error in {op}: {detail}")
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
                    break
                if not isinstance(msg, dict) or msg.get("t") != "req":
                    log.info("%s: closing: not a request envelope", name)
                    break
                rid = msg.get("id")
                if not isinstance(rid, int) or isinstance(rid, bool):
                    await reply(wire.response_err(None, EINVAL, "request id must be an integer"))
                    continue
                if outstanding >= max_outstanding:
                    await reply(wire.response_err(rid, EAGAIN, f"more than {max_outstanding} requests in flight"))
                    continue
                outstanding += 1
                nursery.start_soon(handle, rid, msg.get("op"), msg.get("args", {}), msg.get("ctx"))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:  # noqa: BLE001 - closing a broken stream
                pass
