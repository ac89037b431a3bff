"""The shared ABI: msgpack framing and the Client over in-memory streams, argument validation,
errno names, and the MTE constants and tagged-pointer helpers."""

from __future__ import annotations

from functools import partial

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import wire
from shared.abi import MAX_IO, OPS, AbiError, validate_args
from shared.errno import E2BIG, EINVAL, ENOSYS, ERRNO_BY_NAME, KernelError, errno_name, errno_number
from shared.mte import (
    MTE_GRANULES_PER_PAGE,
    MTE_PAGE_TAG_STORAGE,
    TBI_ADDR_MASK,
    granule_align_down,
    pack_tags,
    page_align_up,
    pointer_tag,
    tagged_pointer,
    unpack_tags,
    untagged_addr,
)


def framed_pair(max_frame: int = wire.MAX_FRAME):
    a, b = trio.testing.memory_stream_pair()
    return wire.FramedStream(a, max_frame), wire.FramedStream(b, max_frame)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=50) | st.binary(max_size=3000),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=6),
    max_leaves=20,
)


class TestFramedStream:
    """Messages back to back on a byte stream, split by a streaming unpacker."""

    async def test_messages_round_trip_in_order(self):
        """Several messages sent back to back arrive whole and in order."""
        left, right = framed_pair()
        msgs = [{"t": "req", "id": i, "op": "getpid", "args": {}} for i in range(5)] + [[1, 2], "x", None]
        for m in msgs:
            await left.send(m)
        assert [await right.receive() for _ in msgs] == msgs

    async def test_a_frame_split_into_single_bytes_is_reassembled(self):
        """A frame delivered one byte at a time decodes once complete."""
        a, b = trio.testing.memory_stream_pair()
        right = wire.FramedStream(b)
        blob = msgpack.packb({"t": "res", "id": 3, "value": b"\x00" * 300}, use_bin_type=True)
        async with trio.open_nursery() as n:
            async def trickle():
                for i in range(len(blob)):
                    await a.send_all(blob[i:i + 1])
                    await trio.sleep(0)
            n.start_soon(trickle)
            assert await right.receive() == {"t": "res", "id": 3, "value": b"\x00" * 300}

    async def test_garbage_bytes_raise_wire_error(self):
        """Bytes that start no msgpack value (0xc1) raise WireError, not ConnectionClosed."""
        a, b = trio.testing.memory_stream_pair()
        right = wire.FramedStream(b)
        await a.send_all(b"\xc1\x00\x00")
        with pytest.raises(wire.WireError) as info:
            await right.receive()
        assert not isinstance(info.value, wire.ConnectionClosed)

    async def test_oversize_frame_is_rejected(self):
        """A frame larger than max_frame raises WireError; one under it is delivered."""
        left, right = framed_pair(max_frame=1024)
        await left.send({"data": b"x" * 512})
        assert (await right.receive())["data"] == b"x" * 512
        await left.send({"data": b"x" * 4096})
        with pytest.raises(wire.WireError):
            await right.receive()

    async def test_oversize_bin_header_is_rejected_before_its_body(self):
        """A bin32 header declaring more than max_frame is refused without waiting for the body."""
        a, b = trio.testing.memory_stream_pair()
        right = wire.FramedStream(b, max_frame=1024)
        await a.send_all(b"\xc6" + (1 << 30).to_bytes(4, "big"))
        with trio.fail_after(2), pytest.raises(wire.WireError):
            await right.receive()

    async def test_end_of_stream_is_connection_closed(self):
        """The peer closing gives ConnectionClosed (a WireError) on receive."""
        left, right = framed_pair()
        await left.aclose()
        with pytest.raises(wire.ConnectionClosed):
            await right.receive()
        assert issubclass(wire.ConnectionClosed, wire.WireError)

    async def test_send_after_close_is_connection_closed(self):
        """Sending on a closed stream raises ConnectionClosed."""
        left, right = framed_pair()
        await left.aclose()
        with pytest.raises(wire.ConnectionClosed):
            await left.send({"x": 1})

    async def test_concurrent_senders_do_not_interleave(self):
        """Many tasks sending at once: every message arrives intact (sends are serialised)."""
        left, right = framed_pair()
        got = []
        async with trio.open_nursery() as n:
            async def sender(i):
                await left.send({"i": i, "pad": bytes([i]) * 5000})
            for i in range(40):
                n.start_soon(sender, i)
            for _ in range(40):
                got.append(await right.receive())
        assert sorted(m["i"] for m in got) == list(range(40))
        assert all(m["pad"] == bytes([m["i"]]) * 5000 for m in got)

    async def test_sets_and_tuples_encode_as_lists(self):
        """Sets and tuples go out as msgpack arrays; other unknown types are refused."""
        left, right = framed_pair()
        await left.send({"s": {3}, "t": (1, 2)})
        assert await right.receive() == {"s": [3], "t": [1, 2]}
        with pytest.raises(TypeError):
            await left.send({"o": object()})

    @settings(max_examples=60, deadline=None)
    @given(msgs=st.lists(msgpack_values, min_size=1, max_size=4), cuts=st.lists(st.integers(1, 700), min_size=1))
    def test_any_values_in_any_chunks_round_trip(self, msgs, cuts):
        """Any msgpack values, delivered in arbitrary chunks, decode to what was sent."""

        async def main():
            a, b = trio.testing.memory_stream_pair()
            right = wire.FramedStream(b)
            blob = b"".join(msgpack.packb(m, use_bin_type=True) for m in msgs)
            pos, i = 0, 0
            while pos < len(blob):
                step = cuts[i % len(cuts)]
                await a.send_all(blob[pos:pos + step])
                pos, i = pos + step, i + 1
            return [await right.receive() for _ in msgs]

        assert trio.run(main) == msgs


class TestEnvelopes:
    """The request/response/event envelope builders."""

    def test_request(self):
        """A request carries t, id, op, args, and ctx only when given."""
        assert wire.request(7, "mmap", {"size": 1}) == {"t": "req", "id": 7, "op": "mmap", "args": {"size": 1}}
        assert wire.request(7, "mmap", {}, "A/3")["ctx"] == "A/3"

    def test_responses_and_events(self):
        """Success and error responses and events have the documented shapes."""
        assert wire.response_ok(1, 5, {"kind": "x"}) == {"t": "res", "id": 1, "ok": True, "value": 5,
                                                          "fault": {"kind": "x"}}
        err = wire.response_err(2, 22, "bad")
        assert err == {"t": "res", "id": 2, "ok": False, "errno": 22, "err": "EINVAL", "msg": "bad"}
        assert wire.event("violation", {"a": 1}) == {"t": "evt", "kind": "violation", "data": {"a": 1}}

    def test_remote_error(self):
        """RemoteError names its errno."""
        e = wire.RemoteError(12, "out of memory")
        assert (e.errno, e.name, e.message) == (12, "ENOMEM", "out of memory")
        assert str(e) == "ENOMEM: out of memory"


async def fake_server(stream, *, batch: int, reverse: bool = True, events: int = 0):
    """Reads ``batch`` requests, then answers them (in reverse order by default), value = args n * 10."""
    framed = wire.FramedStream(stream)
    reqs = [await framed.receive() for _ in range(batch)]
    for i in range(events):
        await framed.send(wire.event("tick", i))
    for req in (reversed(reqs) if reverse else reqs):
        n = req["args"].get("n")
        if n is None:
            await framed.send(wire.response_err(req["id"], 22, f"{req['op']}: no n"))
        else:
            await framed.send(wire.response_ok(req["id"], n * 10, {"ctx": req.get("ctx")}))
    return reqs


class TestClient:
    """Client: concurrent calls on one connection, matched by request id."""

    async def test_concurrent_requests_matched_out_of_order(self):
        """Eight concurrent calls answered in reverse order each get their own reply."""
        a, b = trio.testing.memory_stream_pair()
        client = wire.Client(a)
        results = {}
        async with trio.open_nursery() as n:
            await n.start(client.run)
            n.start_soon(partial(fake_server, b, batch=8))

            async def call(i):
                results[i] = await client.call("op", {"n": i}, ctx=f"c{i}")

            async with trio.open_nursery() as calls:
                for i in range(8):
                    calls.start_soon(call, i)
            n.cancel_scope.cancel()
        assert {i: r.value for i, r in results.items()} == {i: i * 10 for i in range(8)}
        assert all(r.fault == {"ctx": f"c{i}"} for i, r in results.items())

    async def test_error_reply_raises_remote_error(self):
        """An error response raises RemoteError with the errno and message."""
        a, b = trio.testing.memory_stream_pair()
        client = wire.Client(a)
        async with trio.open_nursery() as n:
            await n.start(client.run)
            n.start_soon(partial(fake_server, b, batch=1))
            with pytest.raises(wire.RemoteError) as info:
                await client.call("thing", {})
            n.cancel_scope.cancel()
        assert info.value.errno == 22 and info.value.name == "EINVAL" and "no n" in info.value.message

    async def test_events_are_delivered(self):
        """Event envelopes go to on_event while calls are outstanding."""
        a, b = trio.testing.memory_stream_pair()
        seen = []
        client = wire.Client(a, on_event=lambda kind, data: seen.append((kind, data)))
        async with trio.open_nursery() as n:
            await n.start(client.run)
            n.start_soon(partial(fake_server, b, batch=1, events=3))
            assert (await client.call("op", {"n": 1})).value == 10
            n.cancel_scope.cancel()
        assert seen == [("tick", 0), ("tick", 1), ("tick", 2)]

    async def test_connection_closing_fails_waiting_calls(self):
        """When the peer closes, every waiting call and every later call raise ConnectionClosed."""
        a, b = trio.testing.memory_stream_pair()
        client = wire.Client(a)
        failures = []
        async with trio.open_nursery() as n:
            await n.start(client.run)

            async def call(i):
                try:
                    await client.call("op", {"n": i})
                except wire.ConnectionClosed:
                    failures.append(i)

            for i in range(3):
                n.start_soon(call, i)
            server = wire.FramedStream(b)
            for _ in range(3):
                await server.receive()
            await b.aclose()
        assert sorted(failures) == [0, 1, 2]
        with pytest.raises(wire.ConnectionClosed):
            await client.call("op", {"n": 1})

    async def test_garbage_from_the_server_ends_the_client(self):
        """Bytes that are not msgpack from the server stop the receive loop; waiting calls fail."""
        a, b = trio.testing.memory_stream_pair()
        client = wire.Client(a)
        async with trio.open_nursery() as n:
            await n.start(client.run)

            async def garbage():
                await wire.FramedStream(b).receive()
                await b.send_all(b"\xc1")

            n.start_soon(garbage)
            with pytest.raises(wire.ConnectionClosed):
                await client.call("op", {"n": 1})

    async def test_reply_to_an_unknown_id_is_ignored(self):
        """A response whose id nobody waits for is dropped; the real reply still arrives."""
        a, b = trio.testing.memory_stream_pair()
        client = wire.Client(a)
        async with trio.open_nursery() as n:
            await n.start(client.run)

            async def server():
                framed = wire.FramedStream(b)
                req = await framed.receive()
                await framed.send(wire.response_ok(9999, "stray"))
                await framed.send(wire.response_ok(req["id"], "mine"))

            n.start_soon(server)
            assert (await client.call("op")).value == "mine"
            n.cancel_scope.cancel()


class TestValidateArgs:
    """shared.abi.validate_args: every request is checked at the wire boundary."""

    @pytest.mark.parametrize("op", ["nosuchop", "", 5, None])
    def test_unknown_op_is_enosys(self, op):
        """An op that is not in the table (or not a string) is ENOSYS."""
        with pytest.raises(AbiError) as info:
            validate_args(op, {})
        assert info.value.errno == ENOSYS

    @pytest.mark.parametrize("op,args", [
        ("mmap", {"size": "4096"}),
        ("mmap", {"size": -1}),
        ("mmap", {"size": 1 << 64}),
        ("mmap", {"size": True}),
        ("mmap", {"size": 4096, "prot": ["read", "rwx"]}),
        ("mmap", {"size": 4096, "prot": "read"}),
        ("mmap", {"size": 4096, "share": "both"}),
        ("mmap", {"size": 4096, "backing": "tape"}),
        ("mmap", {"size": 4096, "object": 5}),
        ("store", {"addr": 0, "tag": 16, "data": b"x"}),
        ("store", {"addr": 0, "data": "text"}),
        ("tco", {"on": 1}),
        ("prctl", {"tcf": "fast"}),
        ("ptrace-poke-tags", {"target": 1, "addr": 0, "tags": [1, 256]}),
        ("ptrace-poke-tags", {"target": 1, "addr": 0, "tags": [True]}),
        ("batch", {"ops": [["getpid"]]}),
    ])
    def test_wrong_types_are_einval(self, op, args):
        """A value of the wrong type or out of range is EINVAL, naming the argument."""
        with pytest.raises(AbiError) as info:
            validate_args(op, args)
        assert info.value.errno == EINVAL
        assert op in info.value.message

    @pytest.mark.parametrize("op,args,missing", [
        ("munmap", {"addr": 0}, "size"),
        ("mmap", {}, "size"),
        ("store", {"addr": 0}, "data"),
        ("ptrace-peek-tags", {"addr": 0, "count": 1}, "target"),
        ("swap-out", {"pid": 1, "addr": 0}, "size"),
        ("hello", {}, "role"),
    ])
    def test_missing_argument_is_einval(self, op, args, missing):
        """A missing required argument is EINVAL, naming it."""
        with pytest.raises(AbiError) as info:
            validate_args(op, args)
        assert info.value.errno == EINVAL and repr(missing) in info.value.message

    def test_unknown_argument_and_non_map_args_are_einval(self):
        """An argument the op does not define, or args that are not a map, are EINVAL."""
        for args in ({"size": 4096, "colour": "red"}, [4096], "size=4096"):
            with pytest.raises(AbiError) as info:
                validate_args("mmap", args)
            assert info.value.errno == EINVAL

    @pytest.mark.parametrize("op,args", [
        ("store", {"addr": 0, "data": bytes(MAX_IO + 1)}),
        ("load", {"addr": 0, "size": MAX_IO + 1}),
        ("ldg", {"addr": 0, "size": 1 << 40}),
        ("ptrace-peek-tags", {"target": 1, "addr": 0, "count": MAX_IO + 1}),
        ("ptrace-poke-tags", {"target": 1, "addr": 0, "tags": bytes(MAX_IO + 1)}),
    ])
    def test_oversize_payload_is_e2big(self, op, args):
        """A payload or access size over MAX_IO is E2BIG."""
        with pytest.raises(AbiError) as info:
            validate_args(op, args)
        assert info.value.errno == E2BIG

    def test_largest_payload_is_accepted(self):
        """Exactly MAX_IO bytes is allowed."""
        assert len(validate_args("store", {"addr": 0, "data": bytes(MAX_IO)})["data"]) == MAX_IO

    def test_defaults_are_filled_and_values_normalised(self):
        """Omitted optional arguments take their defaults; prot becomes a tuple, tag lists bytes."""
        a = validate_args("mmap", {"size": 4096})
        assert a == {"addr": None, "size": 4096, "prot": ("read", "write"), "share": "private",
                     "backing": "anon", "object": None, "offset": 0, "hugepage_size": 2 << 20,
                     "node": None, "region": None, "attr": None}
        assert validate_args("mmap", {"size": 1, "prot": ["mte"], "object": None})["prot"] == ("mte",)
        assert validate_args("ptrace-poke-tags", {"target": 1, "addr": 0, "tags": [1, 15]})["tags"] == b"\x01\x0f"
        assert validate_args("store", {"addr": 0, "data": bytearray(b"ab")})["data"] == b"ab"

    def test_every_op_has_a_role_and_unique_fields(self):
        """Every op of the table has a known role and no duplicated argument names."""
        for name, d in OPS.items():
            assert d.name == name and d.role in ("any", "process", "host", "vcpu")
            names = [f.name for f in d.fields]
            assert len(names) == len(set(names)), name


class TestErrno:
    """Linux errno names and numbers."""

    def test_linux_numbers(self):
        """The table uses the Linux numbers (arm64/asm-generic), whatever host runs Python."""
        assert (errno_number("EPERM"), errno_number("EIO"), errno_number("EINVAL"), errno_number("ENOSYS"),
                errno_number("EOPNOTSUPP")) == (1, 5, 22, 38, 95)

    def test_round_trip_and_unknown(self):
        """Every name maps to a number and back; an unknown number has a readable placeholder."""
        for name, number in ERRNO_BY_NAME.items():
            assert errno_name(number) == name
        assert errno_name(4242) == "E?4242"

    def test_kernel_error_by_name_or_number(self):
        """KernelError takes a name or a number and carries both."""
        assert (KernelError("ESRCH").errno, KernelError(3).name) == (3, "ESRCH")


class TestMteHelpers:
    """Tagged pointers, alignment, and the packed (swap) tag format."""

    @given(addr=st.integers(0, (1 << 64) - 1), tag=st.integers(0, 15))
    def test_tagged_pointer_round_trip(self, addr, tag):
        """tagged_pointer puts the tag in bits 59:56; pointer_tag and untagged_addr take it apart again."""
        ptr = tagged_pointer(addr, tag)
        assert pointer_tag(ptr) == tag
        assert untagged_addr(ptr) == addr & TBI_ADDR_MASK == untagged_addr(addr)
        assert ptr >> 60 == 0  # bits 63:60 are not part of the tag
        assert tagged_pointer(ptr, pointer_tag(ptr)) == ptr

    @pytest.mark.parametrize("tag", [-1, 16, 255])
    def test_tagged_pointer_rejects_non_4_bit_tags(self, tag):
        """A tag outside 0..15 is refused."""
        with pytest.raises(ValueError):
            tagged_pointer(0x1000, tag)

    @given(addr=st.integers(0, 1 << 48))
    def test_alignment_helpers(self, addr):
        """granule_align_down and page_align_up round to 16 bytes and 4 KiB."""
        g = granule_align_down(addr)
        assert g % 16 == 0 and 0 <= addr - g < 16
        p = page_align_up(addr)
        assert p % 4096 == 0 and 0 <= p - addr < 4096

    @settings(max_examples=100)
    @given(tags=st.lists(st.integers(0, 15), min_size=MTE_GRANULES_PER_PAGE, max_size=MTE_GRANULES_PER_PAGE))
    def test_pack_unpack_round_trip(self, tags):
        """Packing a page's 256 tags gives 128 bytes, two per byte, and unpacking restores them."""
        packed = pack_tags(bytes(tags))
        assert len(packed) == MTE_PAGE_TAG_STORAGE == 128
        assert unpack_tags(packed) == bytes(tags)

    def test_pack_layout(self):
        """Granule 2i is the low nibble of byte i, granule 2i+1 the high nibble; only 4 bits are kept."""
        assert pack_tags(bytes([1, 2, 3, 4])) == bytes([0x21, 0x43])
        assert pack_tags(bytes([0xF1, 0x02])) == bytes([0x21])
        assert unpack_tags(bytes([0xA5])) == bytes([5, 10])
