"""Listening sockets for the hypervisor process: ``unix:PATH`` and ``tcp:HOST:PORT``.

trio has ``open_unix_socket`` but no Unix listener, so the socket is built
with ``trio.socket`` and wrapped in ``trio.SocketListener``. Unix sockets are
created mode 0600. TCP binds loopback unless told otherwise; the caller must
then require a secret (see hypervisor/__main__.py).
"""

from __future__ import annotations

import os
import stat

import trio


class AddressError(ValueError):
    """An address that is not ``unix:PATH`` or ``tcp:HOST:PORT``."""


def parse_address(text: str) -> tuple[str, object]:
    """Split ``unix:PATH`` / ``tcp:HOST:PORT``.

    Raises:
        AddressError: any other form.
    """
    if text.startswith("unix:") and len(text) > 5:
        return "unix", text[5:]
    if text.startswith("tcp:"):
        host, _, port = text[4:].rpartition(":")
        if host and port.isdigit() and 0 <= int(port) < 65536:
            return "tcp", (host.strip("[]"), int(port))
    raise AddressError(f"{text!r} is not unix:PATH or tcp:HOST:PORT")


async def open_listener(text: str) -> trio.SocketListener:
    """Bind and listen on ``text``; returns a trio listener.

    Raises:
        AddressError: malformed address.
        OSError: the kernel refused the bind (EADDRINUSE, EACCES, ...).
    """
    kind, where = parse_address(text)
    if kind == "unix":
        path = where
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            try:
                await probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket from a previous run
            else:
                raise OSError(98, f"{path}: another server is listening there (EADDRINUSE)")
            finally:
                probe.close()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    else:
        host, port = where
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
    sock.listen(128)
    return trio.SocketListener(sock)


async def open_connection(text: str) -> trio.SocketStream:
    """Connect to a hypervisor at ``text``.

    Raises:
        AddressError: malformed address.
        OSError: nobody listening (ECONNREFUSED, ENOENT).
    """
    kind, where = parse_address(text)
    if kind == "unix":
        return await trio.open_unix_socket(where)
    return await trio.open_tcp_stream(*where)


def listener_address(listener: trio.SocketListener, text: str) -> str:
    """The address clients should use (the real port when 0 was asked)."""
    kind, where = parse_address(text)
    if kind == "tcp":
        host, port = listener.socket.getsockname()[:2]
        return f"tcp:{host}:{port}"
    return text
