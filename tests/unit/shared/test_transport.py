"""Unit tests for shared.transport: addresses, and connect + hello over a real Unix socket.

The server here is a few lines over :class:`shared.wire.FramedStream`: it
answers ``hello`` (refusing a wrong secret with EPERM, as the hypervisor does)
and ``echo``, and closes the connection on ``bye``, so each test controls
exactly how the peer behaves.
"""

from __future__ import annotations

import pytest
import trio

from shared import wire
from shared.errno import EPERM
from shared.transport import (
    AddressError,
    Connector,
    PeerLost,
    Unreachable,
    open_listener,
    parse_address,
    unreachable,
)

SECRET = "s3cret"


class TinyServer:
    """Answers hello/echo; ``bye`` closes the connection; records every hello and every connection's end."""

    def __init__(self):
        self.hellos: list[dict] = []
        self.closed = 0  # connections that reached end-of-file or were closed by us

    async def serve(self, stream: trio.abc.Stream) -> None:
        framed = wire.FramedStream(stream)
        try:
            while True:
                try:
                    msg = await framed.receive()
                except wire.WireError:
                    return
                rid, op, args, _ctx = wire.parse_request(msg)
                if op == "hello":
                    self.hellos.append(args)
                    if args.get("secret") != SECRET:
                        await framed.send(wire.response_err(rid, EPERM, "wrong secret"))
                        continue
                    await framed.send(wire.response_ok(rid, {"pid": 7}))
                elif op == "echo":
                    await framed.send(wire.response_ok(rid, args))
                elif op == "bye":
                    return
        finally:
            self.closed += 1
            await stream.aclose()


@pytest.fixture
async def server(nursery, tmp_path):
    """A TinyServer listening on a fresh Unix socket; yields (server, address, listener's cancel scope)."""
    address = f"unix:{tmp_path / 'tiny.sock'}"
    listener = await open_listener(address)
    tiny = TinyServer()
    scope = trio.CancelScope()

    async def run():
        with scope:
            await trio.serve_listeners(tiny.serve, [listener])

    nursery.start_soon(run)
    yield tiny, address, scope


def test_parse_address_forms():
    """unix:PATH and tcp:HOST:PORT (IPv6 in brackets) parse; anything else is an AddressError."""
    assert parse_address("unix:/tmp/x.sock") == ("unix", "/tmp/x.sock")
    assert parse_address("tcp:127.0.0.1:4000") == ("tcp", ("127.0.0.1", 4000))
    assert parse_address("tcp:[::1]:5") == ("tcp", ("::1", 5))
    for bad in ("unix:", "tcp:host", "tcp:host:99999", "udp:1.2.3.4:5", "/tmp/x.sock"):
        with pytest.raises(AddressError):
            parse_address(bad)


async def test_connect_says_hello_and_returns_the_reply(server, nursery):
    """connect sends hello with the role, the secret and the extra fields, and returns a working client and the
    reply."""
    tiny, address, _ = server
    client, reply = await Connector(nursery, address, SECRET).connect("process", name="p0", session="s")
    assert reply == {"pid": 7}
    assert tiny.hellos == [{"role": "process", "secret": SECRET, "name": "p0", "session": "s"}]
    assert (await client.call("echo", {"x": 1})).value == {"x": 1}
    await client.aclose()


async def test_refused_hello_raises_and_closes_the_connection(server, nursery):
    """A refused hello raises the server's RemoteError (EPERM) and the connection is closed, not left open."""
    tiny, address, _ = server
    with pytest.raises(wire.RemoteError) as info:
        await Connector(nursery, address, "wrong").connect("process", name="p0")
    assert info.value.errno == EPERM
    with trio.fail_after(10):
        while tiny.closed < 1:
            await trio.sleep(0.01)


async def test_server_closing_raises_peer_lost_with_the_reason(server, nursery):
    """A connection the server closes makes the next call raise PeerLost saying so, and sets ``lost``."""
    _, address, _ = server
    link = Connector(nursery, address, SECRET)
    client, _ = await link.connect("process", name="p0")
    with pytest.raises(wire.ConnectionClosed):
        await client.call("bye")
    with pytest.raises(PeerLost) as info:
        await client.call("echo")
    assert f"the hypervisor at {address} closed the connection" in str(info.value)
    assert link.lost.is_set()


async def test_server_gone_says_it_is_gone(server, nursery):
    """When nobody listens at the address any more, the lost connection's reason says the server is gone."""
    tiny, address, scope = server
    link = Connector(nursery, address, SECRET)
    client, _ = await link.connect("process", name="p0")
    scope.cancel()  # the listener stops (the socket file stays, nobody accepts)
    await trio.sleep(0.05)
    with pytest.raises(wire.ConnectionClosed):
        await client.call("bye")
    with pytest.raises(PeerLost) as info:
        await client.call("echo")
    assert f"the hypervisor at {address} is gone" in str(info.value)


async def test_our_own_close_is_a_plain_connection_closed(server, nursery):
    """A connection we closed ourselves raises plain ConnectionClosed (not PeerLost) and does not set ``lost``."""
    _, address, _ = server
    link = Connector(nursery, address, SECRET)
    client, _ = await link.connect("process", name="p0")
    await client.aclose()
    with pytest.raises(wire.ConnectionClosed) as info:
        await client.call("echo")
    assert not isinstance(info.value, PeerLost)
    await trio.sleep(0.05)
    assert not link.lost.is_set()


async def test_nobody_listening_is_unreachable_naming_the_address(tmp_path, nursery):
    """connect to a path nobody listens on raises Unreachable naming the address; unreachable() gives a reason."""
    address = f"unix:{tmp_path / 'nobody.sock'}"
    with pytest.raises(Unreachable) as info:
        await Connector(nursery, address).connect("process")
    assert f"cannot reach the hypervisor at {address}" in str(info.value)
    assert await unreachable(address)  # a reason (ENOENT's text), not None
