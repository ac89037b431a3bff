"""The transport every process uses: addresses, listeners, connect + hello.

Addresses are ``unix:PATH`` and ``tcp:HOST:PORT``. The hypervisor and the VMM
listen (:func:`open_listener`); the VMM, the guest and the harness connect
(:func:`open_connection`) and introduce themselves with ``hello``
(:class:`Connector`).

trio has ``open_unix_socket`` but no Unix listener, so the socket is built
with ``trio.socket`` and wrapped in ``trio.SocketListener``. Unix sockets are
created mode 0600. TCP binds loopback unless told otherwise; the caller must
then require a secret (see hypervisor/__main__.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable

import trio

from shared.wire import Client, ConnectionClosed


class AddressError(ValueError):
    """An address that is not ``unix:PATH`` or ``tcp:HOST:PORT``."""


def parse_address(text: str) -> tuple[str, str | tuple[str, int]]:
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
    _kind, where = parse_address(text)
    if isinstance(where, str):  # unix:PATH
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
    _kind, where = parse_address(text)
    if isinstance(where, str):  # unix:PATH
        return await trio.open_unix_socket(where)
    return await trio.open_tcp_stream(*where)


def listener_address(listener: trio.SocketListener, text: str) -> str:
    """The address clients should use (the real port when 0 was asked)."""
    kind, where = parse_address(text)
    if kind == "tcp":
        host, port = listener.socket.getsockname()[:2]
        return f"tcp:{host}:{port}"
    return text


async def unreachable(address: str, timeout: float = 2.0) -> str | None:
    """Why a fresh connection to ``address`` fails (one word or line), or ``None`` when it succeeds."""
    try:
        with trio.fail_after(timeout):
            stream = await open_connection(address)
    except (OSError, trio.TooSlowError) as exc:
        return getattr(exc, "strerror", None) or type(exc).__name__
    await stream.aclose()
    return None


class Unreachable(ConnectionError):
    """Nobody answers at the address (a one-line message naming the server and the address)."""


class PeerLost(ConnectionClosed):
    """The server behind a connection went away (died, or closed it); the message is one line saying how."""


class ExplainedClient(Client):
    """A :class:`~shared.wire.Client` whose broken connection raises ``lost_error`` with the reason.

    Args:
        stream: the connected stream.
        explain: ``await explain()`` -> the one-line reason, asked once the connection is gone
            (``None`` or ``""``: no explanation, the plain ``ConnectionClosed`` is raised).
        lost_error: the exception class raised with the reason (a :class:`PeerLost`).
    """

    def __init__(self, stream: trio.abc.Stream, explain: Callable[[], Awaitable[str | None]],
                 lost_error: type[PeerLost] = PeerLost):
        super().__init__(stream)
        self._explain = explain
        self._lost_error = lost_error
        self._why: str | None = None  # the explanation, once asked
        self.closing = False

    async def call_raw(self, op: str, args: dict | None = None, ctx: str | None = None) -> dict:
        """As :meth:`shared.wire.Client.call_raw`; raises ``lost_error`` when the peer has gone.

        A connection we closed ourselves, or one that cannot be explained (an
        in-process server), raises the plain ``ConnectionClosed``.
        """
        try:
            return await super().call_raw(op, args, ctx)
        except PeerLost:
            raise
        except ConnectionClosed:
            if self.closing:
                raise
            if self._why is None:
                self._why = await self._explain() or ""
            if not self._why:
                raise
        raise self._lost_error(f"{self._why} (during {op})")

    async def aclose(self) -> None:
        """Close the connection (a later call raises plain ``ConnectionClosed``)."""
        self.closing = True
        await super().aclose()


class Connector:
    """Opens connections to one server and introduces each with ``hello``.

    :meth:`connect` is what :class:`vmm.machine.Vmm` and the guest launchers
    take as their ``connect``. Subclasses change where the bytes go
    (:meth:`open_stream`) and how a loss is explained (:meth:`why_lost`).

    Args:
        nursery: where the clients' receive loops run.
        address: ``unix:PATH`` / ``tcp:HOST:PORT`` (``None`` for a subclass with its own streams).
        secret: presented in every hello, or ``None``.
    """

    #: How the server is named in :meth:`why_lost`'s line.
    peer = "the hypervisor"
    #: Raised (with :meth:`why_lost`'s line) by calls on a connection whose server went away.
    lost_error: type[PeerLost] = PeerLost

    def __init__(self, nursery: trio.Nursery, address: str | None = None, secret: str | None = None):
        self.nursery = nursery
        self.address = address
        self.secret = secret
        self._lost: trio.Event | None = None

    async def open_stream(self) -> trio.abc.Stream:
        """A new byte stream to the server.

        Raises:
            AddressError: malformed address.
            Unreachable: nobody listening there.
        """
        assert self.address is not None, "Connector without an address: open_stream must be overridden"
        try:
            return await open_connection(self.address)
        except OSError as exc:
            raise Unreachable(f"cannot reach {self.peer} at {self.address}: {exc}") from None

    async def connect(self, role: str, **hello) -> tuple[Client, dict]:
        """Open a connection and introduce it; returns the client (its receive loop running) and hello's reply.

        Raises:
            shared.wire.RemoteError: hello was refused (the connection is closed).
            Unreachable, AddressError: the server cannot be reached (as :meth:`open_stream`).
        """
        stream = await self.open_stream()
        client = ExplainedClient(stream, self.why_lost, self.lost_error)
        await self.nursery.start(self._run_client, client)
        try:
            reply = await client.call("hello", {"role": role, "secret": self.secret, **hello})
        except BaseException:  # refused, lost or cancelled: the connection is of no use
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        return client, reply.value

    async def _run_client(self, client: ExplainedClient, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await client.run(task_status=task_status)
        if not client.closing:
            self.lost.set()

    @property
    def lost(self) -> trio.Event:
        """Set once a connection closed without our closing it (the server went away)."""
        if self._lost is None:
            self._lost = trio.Event()
        return self._lost

    async def why_lost(self) -> str | None:
        """One line saying why a connection broke, or ``None`` (then the connection error is shown)."""
        if self.address is None:
            return None
        why = await unreachable(self.address)
        if why is not None:
            return f"{self.peer} at {self.address} is gone: {why}"
        return f"{self.peer} at {self.address} closed the connection"
