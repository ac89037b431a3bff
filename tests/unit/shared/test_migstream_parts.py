"""Big binaries on the wire without copies: shared.wire.pack_parts, FramedStream and RecordStream over sockets."""

from __future__ import annotations

import os

import msgpack
import pytest
import trio

from shared import migstream, rpc, wire

MiB = 1 << 20
DATA = os.urandom(MiB)

MESSAGES = [
    wire.request(5, "store", {"addr": 1 << 30, "tag": 0, "data": DATA}, "ctx"),
    wire.response_ok(5, DATA),
    wire.response_ok(6, {"length": 7, "tags": bytearray(DATA[:70_000])}),
    {"t": "pages", "pass": 1, "slot": 0, "first": 3, "data": memoryview(DATA), "tags": DATA[:65_536]},
    {"t": "x", "v": [DATA], "s": {1, 2}, "u": (3, 4)},  # in a list: packed by msgpack as usual
    {"deep": {"deeper": {"data": DATA}}},  # deeper than a map in a map: packed as usual
    {"small": DATA[:65_535], "n": None},
    {str(i): i for i in range(40)} | {"big": DATA},  # a map of more than 15 items
    [DATA],
]


@pytest.mark.parametrize("msg", MESSAGES, ids=range(len(MESSAGES)))
def test_parts_are_exactly_what_msgpack_packs(msg):
    """pack_parts gives the bytes Packer.pack gives, and the big binaries of the top two maps are the caller's
    own objects (not copied)."""
    packer = msgpack.Packer(default=wire._default, use_bin_type=True)
    parts = wire.pack_parts(packer, msg)
    assert b"".join(parts) == msgpack.packb(msg, use_bin_type=True, default=wire._default)
    big = [v for m in (msg, *(x for x in msg.values() if isinstance(x, dict))) if isinstance(m, dict)
           for v in m.values() if isinstance(v, (bytes, bytearray, memoryview)) and len(v) >= wire.BIG_BIN] \
        if isinstance(msg, dict) else []
    assert [p for p in parts if any(p is b for b in big)] == big


def test_own_copies_mutable_binaries_now():
    """With own=True a bytearray or memoryview is copied when packed, so changing it later changes nothing sent."""
    packer = msgpack.Packer(use_bin_type=True)
    buf = bytearray(DATA)
    for own in (False, True):
        parts = wire.pack_parts(packer, {"value": buf, "view": memoryview(buf)}, own=own)
        before = msgpack.packb({"value": buf, "view": memoryview(buf)}, use_bin_type=True)
        buf[0] ^= 0xFF
        assert (b"".join(parts) == before) == own
        buf[0] ^= 0xFF


async def test_framed_stream_sends_big_messages_in_parts_over_a_socket():
    """A FramedStream sends a message with a 1 MiB binary in parts and the far side decodes it whole."""
    a, b = trio.socket.socketpair()
    left, right = wire.FramedStream(trio.SocketStream(a)), wire.FramedStream(trio.SocketStream(b))
    got = []
    async with trio.open_nursery() as nursery:
        async def receive():
            for _ in range(3):
                got.append(await right.receive())

        nursery.start_soon(receive)
        for msg in (MESSAGES[0], {"t": "small"}, MESSAGES[1]):
            await left.send(msg)
    assert got == [MESSAGES[0], {"t": "small"}, MESSAGES[1]]
    await left.aclose()
    await right.aclose()


async def test_request_loop_replies_with_big_values_intact():
    """RequestLoop's replies with a big bytes, bytearray and map value, pipelined, arrive intact and in order."""
    a, b = trio.socket.socketpair()
    values = {"bytes": DATA, "bytearray": bytearray(DATA[::-1]), "map": {"length": 3, "tags": DATA[:100_000]},
              "small": 7}

    async def dispatch(op, args, ctx):
        await trio.sleep(0)
        return values[op]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rpc.RequestLoop(wire.FramedStream(trio.SocketStream(b)), dispatch).run)
        client = wire.Client(trio.SocketStream(a))
        nursery.start_soon(client.run)
        got: dict = {}

        async def call(op):
            got[op] = (await client.call(op)).value

        async with trio.open_nursery() as calls:
            for op in values:
                calls.start_soon(call, op)
        assert got == {k: bytes(v) if isinstance(v, bytearray) else v for k, v in values.items()}
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_record_stream_over_a_socket_reads_big_records_into_one_buffer():
    """Over a socket, big and small records interleaved arrive equal; a record decoded earlier is not changed by
    the next one read into the same buffer."""
    a, b = trio.socket.socketpair()
    src, dst = migstream.RecordStream(trio.SocketStream(a)), migstream.RecordStream(trio.SocketStream(b))
    records = [{"t": "pages", "pass": 1, "slot": 0, "first": 0, "data": DATA[:i * 4096], "tags": DATA[:i * 256]}
               for i in (256, 1, 64, 256)]
    records.insert(1, {"t": "pass-end", "pass": 1, "pages": 3})
    got = []
    async with trio.open_nursery() as nursery:
        async def receive():
            await dst.receive_header()
            for _ in records:
                got.append(await dst.receive("pages", "pass-end"))

        nursery.start_soon(receive)
        await src.send_header()
        for r in records:
            await src.send(r)
    assert got == records
    await src.aclose()
    with pytest.raises(migstream.StreamError) as info:
        await dst.receive("pages")
    assert info.value.errno == migstream.ECONNRESET
    await dst.aclose()
