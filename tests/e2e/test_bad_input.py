"""End-to-end: whatever a client sends, the hypervisor process answers with an errno or closes
that connection, and goes on serving everyone else."""

from __future__ import annotations

import random

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import wire
from shared.abi import MAX_IO, OPS
from shared.errno import E2BIG, EAGAIN, EFAULT, EINVAL, EIO, ENOMEM, ENOSYS, EPERM
from shared.mte import PAGE_SIZE

REPLY_TIMEOUT = 10
FIXED = 0x1000_0000  # where each bad-input connection maps a small tagged region


async def hello(f: wire.FramedStream, secret: str, role: str = "process") -> dict:
    await f.send(wire.request(0, "hello", {"role": role, "secret": secret}))
    msg = await f.receive()
    assert msg["ok"], msg
    return msg["value"]


async def replies_or_close(f: wire.FramedStream, want: int = 1, timeout: float = REPLY_TIMEOUT):
    """Read up to ``want`` responses; returns ``(responses, closed)``. Fails if neither comes in time."""
    got = []
    closed = False
    with trio.move_on_after(timeout) as scope:
        try:
            while len(got) < want:
                got.append(await f.receive())
        except wire.WireError:  # ConnectionClosed included
            closed = True
    assert not scope.cancelled_caught, f"no reply and no close within {timeout}s (got {got})"
    return got, closed


async def send_bytes_expect_close(hv, payload: bytes, *, introduce: bool = True, eof: bool = False) -> list:
    """Send raw bytes; the connection must be closed by the hypervisor (an errno reply first is allowed)."""
    async with hv.framed() as f:
        if introduce:
            await hello(f, hv.secret)
        await f.stream.send_all(payload)
        if eof:
            await f.stream.send_eof()
        got, closed = await replies_or_close(f, want=10_000)
        assert closed
        for msg in got:
            assert msg.get("t") == "res" and msg.get("ok") is False and isinstance(msg.get("errno"), int), msg
        return got


class _Conn:
    """An introduced process connection for the errno tests."""

    def __init__(self, client: wire.Client):
        self.c = client

    async def errno(self, op, args=None) -> wire.RemoteError:
        with pytest.raises(wire.RemoteError) as info:
            await self.c.call(op, args if args is not None else {})
        return info.value


@pytest.fixture
async def conn(hypervisor):
    """A process connection with a tagged 64 KiB mapping at FIXED; checks the hypervisor is healthy afterwards."""
    async with hypervisor.client() as c:
        await c.call("mmap", {"addr": FIXED, "size": 16 * PAGE_SIZE, "prot": ["read", "write", "mte"]})
        yield _Conn(c)
    await hypervisor.assert_healthy()


class TestUnknownOps:
    async def test_unknown_op_is_enosys(self, conn):
        """An op name the ABI does not define gets ENOSYS naming the op."""
        err = await conn.errno("frobnicate")
        assert err.errno == ENOSYS and "frobnicate" in err.message

    async def test_non_string_op_is_enosys(self, conn):
        """An op that is not a string (an int, a list, nil) gets ENOSYS."""
        for op in (5, [1, 2], None, b"getpid"):
            r = await conn.c.call_raw(op, {})
            assert r["ok"] is False and r["errno"] == ENOSYS, (op, r)

    async def test_unknown_op_before_hello(self, hypervisor):
        """An unknown op before hello is refused (ENOSYS or EPERM), and hello still works after it."""
        async with hypervisor.client(role=None) as c:
            r = await c.call_raw("frobnicate", {})
            assert r["ok"] is False and r["errno"] in (ENOSYS, EPERM)
            await c.call("hello", {"role": "process", "secret": hypervisor.secret})
        await hypervisor.assert_healthy()


class TestBadArguments:
    @pytest.mark.parametrize("op, args, name", [
        ("mmap", {"size": "big"}, "size"),
        ("mmap", {"size": 4096, "prot": "rw"}, "prot"),
        ("mmap", {"size": 4096, "prot": ["read", "fly"]}, "prot"),
        ("mmap", {"size": -4096}, "size"),
        ("mmap", {"size": 1.5}, "size"),
        ("mmap", {"size": True}, "size"),
        ("mmap", {"size": 4096, "backing": "tape"}, "backing"),
        ("store", {"addr": FIXED, "data": 123}, "data"),
        ("store", {"addr": FIXED, "data": "text, not bytes"}, "data"),
        ("store", {"addr": FIXED, "tag": 16, "data": b"x"}, "tag"),
        ("load", {"addr": FIXED, "size": -1}, "size"),
        ("load", {"addr": "0x1000", "size": 4}, "addr"),
        ("prctl", {"tcf": "sometimes"}, "tcf"),
        ("tco", {"on": 1}, "on"),
        ("ptrace-poke-tags", {"target": 1, "addr": FIXED, "tags": [1, 256]}, "tags"),
        ("batch", {"ops": [["load"]]}, "ops"),
        ("batch", {"ops": "load"}, "ops"),
        ("fork", {"child": 7}, "child"),
    ])
    async def test_wrong_types_are_einval(self, conn, op, args, name):
        """An argument of the wrong type or out of range gets EINVAL naming the argument."""
        err = await conn.errno(op, args)
        assert err.errno == EINVAL, err
        assert name in err.message

    @pytest.mark.parametrize("op, args, name", [
        ("load", {"addr": FIXED}, "size"),
        ("load", {"size": 4}, "addr"),
        ("store", {"addr": FIXED}, "data"),
        ("mmap", {}, "size"),
        ("munmap", {"addr": FIXED}, "size"),
        ("mprotect", {"addr": FIXED, "size": 4096}, "prot"),
        ("batch", {}, "ops"),
    ])
    async def test_missing_arguments_are_einval(self, conn, op, args, name):
        """A missing required argument gets EINVAL naming it."""
        err = await conn.errno(op, args)
        assert err.errno == EINVAL and "missing" in err.message and name in err.message, err

    @pytest.mark.parametrize("op, args", [
        ("getpid", {"foo": 1}),
        ("load", {"addr": FIXED, "size": 4, "sizee": 4}),
        ("irg", {"": None}),
    ])
    async def test_unknown_arguments_are_einval(self, conn, op, args):
        """An argument the op does not define gets EINVAL naming it."""
        err = await conn.errno(op, args)
        assert err.errno == EINVAL and "unknown argument" in err.message, err

    @pytest.mark.parametrize("args", [[1, 2], "args", 7, None, b"\x00"])
    async def test_args_not_a_map_is_einval(self, hypervisor, args):
        """A request whose args is not a map gets an EINVAL reply carrying the request's id."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.send({"t": "req", "id": 41, "op": "getpid", "args": args})
            (msg,), closed = await replies_or_close(f)
            assert msg["id"] == 41 and msg["ok"] is False and msg["errno"] == EINVAL, msg
        await hypervisor.assert_healthy()

    async def test_batch_items_are_validated(self, conn):
        """Bad items inside a batch fail one by one with their errno while the good ones run."""
        r = (await conn.c.call("batch", {"ops": [
            ["getpid", {}], ["nope", {}], ["load", {"addr": FIXED}], ["stats", {}],
            ["store", {"addr": FIXED, "data": b"ok"}], ["load", {"addr": FIXED, "size": 2}],
        ]})).value
        assert [x[0] for x in r] == [True, False, False, False, True, True]
        assert r[1][1] == ENOSYS and r[2][1] == EINVAL and r[3][1] == ENOSYS
        assert r[5][1] == b"ok"

    async def test_nested_batch_is_refused_or_runs_correctly(self, conn):
        """A batch inside a batch either fails as one item with an errno or runs its inner ops correctly."""
        pid = (await conn.c.call("getpid")).value
        r = (await conn.c.call("batch", {"ops": [["batch", {"ops": [["getpid", {}], ["nope", {}]]}]]})).value
        assert len(r) == 1
        if r[0][0]:
            inner = r[0][1]
            assert inner[0] == [True, pid, None] and inner[1][0] is False and inner[1][1] == ENOSYS, r
        else:
            assert isinstance(r[0][1], int) and r[0][1] > 0, r


class TestHugeSizes:
    async def test_store_over_16_mib_is_e2big(self, conn):
        """A store carrying more than 16 MiB of data gets E2BIG."""
        err = await conn.errno("store", {"addr": FIXED, "data": bytes(MAX_IO + 1)})
        assert err.errno == E2BIG, err

    async def test_mmap_2_to_the_63_is_enomem(self, conn):
        """mmap of 2**63 bytes (and of 2**64-1) gets ENOMEM."""
        assert (await conn.errno("mmap", {"size": 2 ** 63})).errno == ENOMEM
        assert (await conn.errno("mmap", {"size": 2 ** 64 - 1})).errno == ENOMEM

    async def test_mmap_fixed_past_task_size_is_enomem(self, conn):
        """A MAP_FIXED mapping reaching past the 48-bit TASK_SIZE gets ENOMEM."""
        err = await conn.errno("mmap", {"addr": (1 << 48) - PAGE_SIZE, "size": 2 * PAGE_SIZE})
        assert err.errno == ENOMEM

    @pytest.mark.parametrize("op, extra", [("load", {}), ("stg", {}), ("ldg", {})])
    async def test_access_of_2_to_the_40_is_e2big(self, conn, op, extra):
        """A load, STG or LDG covering 2**40 bytes gets E2BIG (split the access)."""
        err = await conn.errno(op, {"addr": FIXED, "size": 2 ** 40, **extra})
        assert err.errno == E2BIG, err

    async def test_peek_of_huge_count_is_e2big(self, conn):
        """PTRACE_PEEKMTETAGS with a count over the payload bound gets E2BIG."""
        pid = (await conn.c.call("getpid")).value
        err = await conn.errno("ptrace-peek-tags", {"target": pid, "addr": FIXED, "count": 2 ** 40})
        assert err.errno == E2BIG

    async def test_largest_allowed_load_of_an_unbacked_mapping(self, conn):
        """A 16 MiB load (the bound) of a large untouched mapping succeeds and returns zeros."""
        addr = (await conn.c.call("mmap", {"size": 1 << 30})).value
        with trio.fail_after(30):
            data = (await conn.c.call("load", {"addr": addr, "size": MAX_IO})).value
        assert len(data) == MAX_IO and data.count(0) == MAX_IO


    async def test_batch_whose_replies_exceed_the_frame_bound(self, hypervisor):
        """A batch of eight 16 MiB loads (128 MiB of replies, over the 64 MiB frame bound) gets an errno, not a giant
        frame."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.send(wire.request(1, "mmap", {"size": 1 << 30}))
            addr = (await f.receive())["value"]
            await f.send(wire.request(2, "batch", {"ops": [["load", {"addr": addr, "size": MAX_IO}]] * 8}))
            with trio.fail_after(60):
                try:
                    msg = await f.receive()
                except wire.WireError as exc:
                    pytest.fail(f"the reply broke the frame bound: {exc}")
            if msg.get("ok"):
                total = sum(len(r[1]) for r in msg["value"] if r[0] and isinstance(r[1], bytes))
                pytest.fail(f"the batch was answered with {total / (1 << 20):.0f} MiB in one frame "
                            f"(bound {wire.MAX_FRAME >> 20} MiB)")
            assert msg["id"] == 2 and msg["errno"] == E2BIG, msg
        await hypervisor.assert_healthy()


class TestUnaligned:
    async def test_munmap_unaligned_is_einval(self, conn):
        """munmap at an address that is not page aligned gets EINVAL."""
        assert (await conn.errno("munmap", {"addr": FIXED + 1, "size": PAGE_SIZE})).errno == EINVAL

    async def test_mprotect_unaligned_is_einval(self, conn):
        """mprotect at an address that is not page aligned gets EINVAL."""
        err = await conn.errno("mprotect", {"addr": FIXED + 8, "size": PAGE_SIZE, "prot": ["read"]})
        assert err.errno == EINVAL

    async def test_mmap_fixed_unaligned_is_einval(self, conn):
        """mmap with an unaligned fixed address or offset gets EINVAL."""
        assert (await conn.errno("mmap", {"addr": FIXED + 1, "size": PAGE_SIZE})).errno == EINVAL
        assert (await conn.errno("mmap", {"size": PAGE_SIZE, "backing": "memfd", "offset": 5})).errno == EINVAL

    async def test_stg_unaligned_is_efault_sigbus(self, conn):
        """STG at an address that is not 16-byte aligned gets EFAULT with a SIGBUS message."""
        err = await conn.errno("stg", {"addr": FIXED + 8, "tag": 1, "size": 16})
        assert err.errno == EFAULT and "SIGBUS" in err.message

    async def test_stg_partial_granule_is_einval(self, conn):
        """STG whose size is not a granule multiple gets EINVAL."""
        assert (await conn.errno("stg", {"addr": FIXED, "tag": 1, "size": 24})).errno == EINVAL

    async def test_access_outside_any_mapping_is_efault(self, conn):
        """A load from an address with no mapping gets EFAULT with a SIGSEGV message."""
        err = await conn.errno("load", {"addr": 0x10, "size": 4})
        assert err.errno == EFAULT and "SIGSEGV" in err.message


class TestGarbageOnTheSocket:
    async def test_invalid_msgpack_byte_closes(self, hypervisor):
        """Bytes that are not msgpack (0xc1 is never valid) close that connection only."""
        async with hypervisor.client() as bystander:
            await send_bytes_expect_close(hypervisor, b"\xc1" + random.Random(1).randbytes(200))
            assert (await bystander.call("getpid")).value == bystander.hello["pid"]
        await hypervisor.assert_healthy()

    @pytest.mark.parametrize("seed", range(8))
    async def test_random_bytes(self, hypervisor, seed):
        """Random bytes (then end of stream) get errno replies or a close, and the hypervisor survives."""
        rnd = random.Random(seed)
        await send_bytes_expect_close(hypervisor, rnd.randbytes(rnd.randrange(1, 4096)), eof=True)
        await hypervisor.assert_healthy()

    @pytest.mark.parametrize("value", [[1, 2, 3], 42, "req", None, b"\x00" * 10, 1.5])
    async def test_msgpack_non_map_closes(self, hypervisor, value):
        """A well-formed msgpack value that is not a map closes the connection."""
        await send_bytes_expect_close(hypervisor, msgpack.packb(value))
        await hypervisor.assert_healthy()

    @pytest.mark.parametrize("value", [
        {"id": 1, "op": "getpid", "args": {}},
        {"t": "res", "id": 1, "ok": True},
        {"t": "evt", "kind": "x", "data": None},
        {"t": 7, "id": 1, "op": "getpid"},
        {1: 2},
        {},
    ])
    async def test_map_that_is_not_a_request_closes(self, hypervisor, value):
        """A map without t = "req" (missing, another envelope, odd keys) closes the connection."""
        await send_bytes_expect_close(hypervisor, msgpack.packb(value))
        await hypervisor.assert_healthy()

    @pytest.mark.parametrize("header", [
        b"\xdd" + (2 ** 32 - 1).to_bytes(4, "big"),  # array 32 of 4G items
        b"\xdf" + (2 ** 32 - 1).to_bytes(4, "big"),  # map 32 of 4G pairs
    ], ids=["array32-4G", "map32-4G"])
    async def test_oversized_container_header_closes(self, hypervisor, header):
        """A frame header claiming a gigantic array or map closes the connection at once."""
        await send_bytes_expect_close(hypervisor, header + b"\x00" * 64)
        await hypervisor.assert_healthy()

    @pytest.mark.parametrize("header", [
        b"\xc6" + (1 << 30).to_bytes(4, "big"),  # bin 32 of 1 GiB
        b"\xdb" + (1 << 30).to_bytes(4, "big"),  # str 32 of 1 GiB
        b"\xc9" + (1 << 30).to_bytes(4, "big") + b"\x05",  # ext 32 of 1 GiB
    ], ids=["bin32-1GiB", "str32-1GiB", "ext32-1GiB"])
    async def test_oversized_bin_header_closes_without_waiting_for_the_body(self, hypervisor, header):
        """A header claiming a 1 GiB bin/str/ext (over the 64 MiB frame bound) closes the connection at once."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.stream.send_all(header + b"\x00" * 64)
            got, closed = await replies_or_close(f, want=1, timeout=2)
            assert closed and not got
        await hypervisor.assert_healthy()

    async def test_oversized_bin_is_cut_off_at_the_frame_bound(self, hypervisor):
        """A peer that streams the body of a 1 GiB bin is disconnected before the hypervisor buffers much past 64
        MiB."""
        chunk = bytes(1 << 20)
        sent = 0
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            with trio.fail_after(60):
                try:
                    await f.stream.send_all(b"\xc6" + (1 << 30).to_bytes(4, "big"))
                    while sent < wire.MAX_FRAME + (16 << 20):
                        await f.stream.send_all(chunk)
                        sent += len(chunk)
                    got, closed = await replies_or_close(f, want=1, timeout=5)
                    assert closed and not got
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the hypervisor closed its end while we were still sending
        assert sent <= wire.MAX_FRAME + (16 << 20)
        await hypervisor.assert_healthy()

    async def test_frame_of_many_bins_over_the_bound_closes(self, hypervisor):
        """A 96 MiB request made of six 16 MiB bins (each under the bound, the frame over 64 MiB) closes the
        connection."""
        chunk = bytes(16 << 20)
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            try:
                with trio.fail_after(60):
                    await f.send(wire.request(7, "getpid", {"x": [chunk] * 6}))
            except wire.ConnectionClosed:
                pass  # closed while we were still sending: what we want
            got, closed = await replies_or_close(f, want=1, timeout=10)
            assert closed or got[0]["errno"] == E2BIG, f"a {6 * 16} MiB frame was accepted and answered: {got}"
        await hypervisor.assert_healthy()

    async def test_oversized_bin_inside_a_request_closes(self, hypervisor):
        """A request whose data argument claims a 1 GiB bin closes the connection at once."""
        payload = (b"\x84" + msgpack.packb("t") + msgpack.packb("req") + msgpack.packb("id") + msgpack.packb(5)
                   + msgpack.packb("op") + msgpack.packb("store") + msgpack.packb("args")
                   + b"\x82" + msgpack.packb("addr") + msgpack.packb(FIXED) + msgpack.packb("data")
                   + b"\xc6" + (1 << 30).to_bytes(4, "big") + b"\x00" * 1024)
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.stream.send_all(payload)
            got, closed = await replies_or_close(f, want=1, timeout=2)
            assert closed or got[0]["errno"] == E2BIG, got
        await hypervisor.assert_healthy()

    async def test_deep_nesting_closes_or_errors(self, hypervisor):
        """A request nesting arrays 100000 deep gets an errno reply or a close, and the hypervisor survives."""
        depth = 100_000
        payload = (b"\x84" + msgpack.packb("t") + msgpack.packb("req") + msgpack.packb("id") + msgpack.packb(9)
                   + msgpack.packb("op") + msgpack.packb("getpid") + msgpack.packb("args")
                   + b"\x81" + msgpack.packb("x") + b"\x91" * depth + b"\xc0")
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.stream.send_all(payload)
            got, closed = await replies_or_close(f)
            assert closed or (got[0]["id"] == 9 and got[0]["errno"] == EINVAL), got
        await hypervisor.assert_healthy()

    async def test_garbage_before_hello_closes(self, hypervisor):
        """Garbage as the very first bytes of a connection closes it."""
        await send_bytes_expect_close(hypervisor, b"\xc1\xc1\xc1", introduce=False)
        await hypervisor.assert_healthy()

    async def test_ext_types_are_einval(self, conn):
        """msgpack extension values (custom ext, timestamps) as arguments get EINVAL."""
        for v in (msgpack.ExtType(5, b"abc"), msgpack.Timestamp(1, 0)):
            r = await conn.c.call_raw("load", {"addr": v, "size": 1})
            assert r["ok"] is False and r["errno"] == EINVAL, r


class TestRequestIds:
    @pytest.mark.parametrize("rid", ["7", 1.0, None, [1], True, {"a": 1}])
    async def test_non_integer_id_gets_einval(self, hypervisor, rid):
        """A request id that is not an integer gets an EINVAL reply with a nil id, and the connection goes on."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.send({"t": "req", "id": rid, "op": "getpid", "args": {}})
            (msg,), closed = await replies_or_close(f)
            assert msg["ok"] is False and msg["errno"] == EINVAL and msg["id"] is None, msg
            await f.send(wire.request(3, "getpid", {}))
            (msg,), _ = await replies_or_close(f)
            assert msg["id"] == 3 and msg["ok"]
        await hypervisor.assert_healthy()

    async def test_missing_id_gets_einval(self, hypervisor):
        """A request with no id gets an EINVAL reply."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.send({"t": "req", "op": "getpid", "args": {}})
            (msg,), _ = await replies_or_close(f)
            assert msg["errno"] == EINVAL
        await hypervisor.assert_healthy()

    @pytest.mark.parametrize("rid", [0, -1, 2 ** 64 - 1, -(2 ** 63)])
    async def test_extreme_integer_ids_are_echoed(self, hypervisor, rid):
        """Any msgpack integer id (0, negative, 2**64-1) is echoed back on the response."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret)
            await f.send(wire.request(rid, "getpid", {}))
            (msg,), _ = await replies_or_close(f)
            assert msg["id"] == rid and msg["ok"]


class TestFlood:
    async def test_flood_beyond_the_outstanding_bound(self, hypervisor):
        """2000 requests sent at once are each answered once, either served or refused with EAGAIN."""
        n = 2000
        async with hypervisor.framed() as f:
            pid = (await hello(f, hypervisor.secret))["pid"]
            await f.send(wire.request(1, "mmap", {"addr": FIXED, "size": PAGE_SIZE}))
            await f.receive()
            reqs = [wire.request(i, "load" if i % 2 else "getpid", {"addr": FIXED, "size": 16} if i % 2 else {})
                    for i in range(10, 10 + n)]
            await f.stream.send_all(b"".join(msgpack.packb(r) for r in reqs))
            got, closed = await replies_or_close(f, want=n, timeout=60)
            assert not closed
            ids = [m["id"] for m in got]
            assert sorted(ids) == list(range(10, 10 + n))
            for m in got:
                if m["ok"]:
                    assert m["value"] == (bytes(16) if m["id"] % 2 else pid)
                else:
                    assert m["errno"] == EAGAIN, m
            await f.send(wire.request(5, "getpid", {}))
            (m,), _ = await replies_or_close(f)
            assert m["ok"] and m["value"] == pid
        await hypervisor.assert_healthy()

    async def test_many_connections_at_once(self, hypervisor):
        """Sixty simultaneous connections each get their own process and are all served."""
        pids = []

        async def one():
            async with hypervisor.client() as c:
                pids.append((await c.call("getpid")).value)

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for _ in range(60):
                    n.start_soon(one)
        assert len(set(pids)) == 60
        await hypervisor.assert_healthy()


class TestHugeRanges:
    """Ops over huge address ranges must not stall the hypervisor's single event loop."""

    BOUND = 2  # seconds; a page-table walk of a mostly empty range takes milliseconds
    SPAN = 1 << 46  # 64 TiB: valid under the 48-bit TASK_SIZE, lazily backed

    async def _run(self, hv, setup, op, args, role="process"):
        """Run ``op`` after ``setup`` on one connection while a bystander asks getpid on another."""
        async with hv.client() as proc, hv.client("host") as host, hv.client() as bystander:
            ctx = {"pid": proc.hello["pid"]}

            def subst(a):  # "addr"/"pid" stand for the mapping's address and the process's pid
                return {k: (ctx[v] if isinstance(v, str) and v in ctx else v) for k, v in a.items()}

            for sop, sargs in setup:
                value = (await proc.call(sop, subst(sargs))).value
                if sop == "mmap":
                    ctx["addr"] = value
            args = subst(args)
            caller = proc if role == "process" else host
            reply = {}

            async def slow():
                reply["msg"] = await caller.call_raw(op, args)

            async with trio.open_nursery() as n:
                n.start_soon(slow)
                await trio.sleep(0.05)
                with trio.move_on_after(self.BOUND) as scope:
                    assert (await bystander.call("getpid")).value == bystander.hello["pid"]
                assert not scope.cancelled_caught, f"{op} {args}: another client was not served for {self.BOUND}s"
                with trio.move_on_after(self.BOUND) as scope:
                    while "msg" not in reply:
                        await trio.sleep(0.01)
                assert not scope.cancelled_caught, f"{op} {args}: no reply within {self.BOUND}s"
            return reply["msg"]

    async def test_munmap_whole_u64_range(self, fresh_hypervisor):
        """munmap(0, 2**64-1) is answered promptly (Linux: EINVAL, length beyond TASK_SIZE)."""
        r = await self._run(fresh_hypervisor, [], "munmap", {"addr": 0, "size": 2 ** 64 - 1})
        assert r["ok"] is False and r["errno"] == EINVAL, r

    async def test_munmap_of_the_whole_user_address_space(self, fresh_hypervisor):
        """munmap(0, 2**48) of a mostly empty address space is answered promptly."""
        r = await self._run(fresh_hypervisor, [], "munmap", {"addr": 0, "size": 1 << 48})
        assert r["ok"] is True or r["errno"] == EINVAL, r

    async def test_mmap_fixed_huge(self, fresh_hypervisor):
        """A MAP_FIXED mmap of 64 TiB is answered promptly (nothing was mapped there)."""
        r = await self._run(fresh_hypervisor, [], "mmap", {"addr": FIXED, "size": self.SPAN})
        assert r["ok"] is True and r["value"] == FIXED, r

    @pytest.mark.parametrize("op, args", [
        ("munmap", {"addr": "addr", "size": SPAN}),
        ("mprotect", {"addr": "addr", "size": SPAN, "prot": ["read", "write", "mte"]}),
        ("madvise", {"addr": "addr", "size": SPAN, "advice": "dontneed"}),
    ])
    async def test_op_over_a_huge_mapping(self, fresh_hypervisor, op, args):
        """munmap/mprotect/madvise over a 64 TiB mapping with one page present are answered promptly."""
        setup = [("mmap", {"size": self.SPAN}), ("store", {"addr": "addr", "data": b"present"})]
        r = await self._run(fresh_hypervisor, setup, op, args)
        assert r["ok"] is True, r

    @pytest.mark.parametrize("op", ["swap-out", "ksm-merge", "migrate-pages"])
    async def test_host_op_over_a_huge_mapping(self, fresh_hypervisor, op):
        """A host op (reclaim, KSM, page migration) over a 64 TiB mapping with one page present is answered promptly."""
        setup = [("mmap", {"size": self.SPAN}), ("store", {"addr": "addr", "data": b"present"})]
        r = await self._run(fresh_hypervisor, setup, op, {"pid": "pid", "addr": "addr", "size": self.SPAN},
                            role="host")
        assert r["ok"] is True, r


# ---- Hypothesis: random request maps --------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=True)
            | st.text(max_size=20) | st.binary(max_size=64))
_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
_plausible = st.sampled_from([0, 1, 15, 16, 17, 4096, FIXED, FIXED + 16, FIXED + 8, FIXED + 4096, FIXED | (3 << 56),
                              2 ** 40, 2 ** 48, 2 ** 63, 2 ** 64 - 1, -1, MAX_IO, MAX_IO + 1, "read",
                              ["read", "write", "mte"], ["mte"], "sync", "none", "dontneed", "memfd", "shared",
                              "anon", "hugetlb", "device", "file", b"\x01" * 16, [1, 2, 3], True, False, None])
_op_names = st.sampled_from(sorted(OPS)) | st.text(max_size=12)


@st.composite
def _request(draw):
    op = draw(_op_names)
    fields = [f.name for f in OPS[op].fields] if op in OPS else []
    keys = st.sampled_from(fields) | st.text(max_size=8) if fields else st.text(max_size=8)
    args = draw(st.dictionaries(keys, _plausible | _values, max_size=5))
    if op == "batch" and draw(st.booleans()):
        inner = draw(st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.dictionaries(
            st.sampled_from(["addr", "size", "tag", "data", "ops"]), _plausible, max_size=4)), max_size=6))
        args = {"ops": [[o, a] for o, a in inner]}
    msg = {"t": "req", "id": draw(st.integers(0, 2 ** 31)), "op": op, "args": args}
    if draw(st.integers(0, 9)) == 0:  # sometimes damage the envelope
        msg[draw(st.sampled_from(["t", "id", "op", "args", "ctx"]))] = draw(_values)
    return msg


_messages = _request() | st.dictionaries(st.text(max_size=6), _values, max_size=5) | _values


class TestRandomRequests:
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(msgs=st.lists(_messages, min_size=1, max_size=4), role=st.sampled_from(["process", "host"]))
    async def test_random_request_maps_never_crash_the_server(self, hypervisor, msgs, role):
        """Random msgpack maps and values, sent as requests, get replies or a closed connection, never a crash."""
        async with hypervisor.framed() as f:
            await hello(f, hypervisor.secret, role)
            if role == "process":
                await f.send(wire.request(1, "mmap", {"addr": FIXED, "size": 16 * PAGE_SIZE,
                                                      "prot": ["read", "write", "mte"]}))
                assert (await f.receive())["ok"]
            for msg in msgs:
                try:
                    await f.send(msg)
                except wire.ConnectionClosed:
                    break
                request = isinstance(msg, dict) and msg.get("t") == "req"
                got, closed = await replies_or_close(f, want=1 if request else 2, timeout=REPLY_TIMEOUT)
                if not request:  # an EPROTO reply, then the close
                    assert closed and [m["err"] for m in got] == ["EPROTO"], f"{msg!r}: {got}, closed {closed}"
                    break
                assert not closed, f"{msg!r} closed the connection instead of getting a reply"
                reply = got[0]
                assert reply["t"] == "res"
                rid = msg.get("id")
                if isinstance(rid, int) and not isinstance(rid, bool):
                    assert reply["id"] == rid
                if not reply["ok"]:
                    assert isinstance(reply["errno"], int) and reply["errno"] > 0
                    assert not (reply["errno"] == EIO and "internal model error" in reply["msg"]), reply
        assert hypervisor.alive(), hypervisor.stderr()[-2000:]
        async with hypervisor.client() as c:
            assert (await c.call("getpid")).value == c.hello["pid"]
        warnings = (await hypervisor.stats())["warnings"]
        assert not [w for w in warnings if "internal error" in w], warnings
