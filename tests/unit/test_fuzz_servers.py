"""Every in-process server survives any bytes and any msgpack object: Hypothesis fuzz.

Each server (the hypervisor before and after ``hello``, the VMM's control
channel, the guest's channel and the VMM's exit channel) is fed arbitrary byte
strings and arbitrary msgpack objects (maps with array keys, ext types, deep
nesting, wrong-shaped envelopes and arguments) on a fresh connection. The
connection must end with well-formed responses only (never an internal error),
the server task must return instead of raising, nothing may be logged at
ERROR (the safety nets in the servers are not what saves them), and afterwards
the same server must serve a well-formed request on a new connection.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest.agent import GuestAgent
from hypervisor.kernel import Kernel
from hypervisor.server import Hypervisor
from mtekvm.links import InProcessHost, InProcessVmm
from shared import wire
from shared.abi import OPS, validate_args
from shared.control import EXIT_CHANNEL, GUEST_CHANNEL, GUEST_OPS, KVM_OPS, VMM_CONTROL
from shared.errno import EINVAL, EIO, ENOSYS, EPERM, EPROTO
from shared.rpc import serve_requests

SECRET = "fuzz-secret"
RAM = 0x4000_0000
MiB = 1 << 20
SLOW = os.environ.get("MTEKVM_SLOW") == "1"
EXAMPLES = 1000 if SLOW else 60  # per test; the e2e fuzz (tests/e2e/test_fuzz_processes.py) runs thousands
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# ---- strategies --------------------------------------------------------------------------

_ints = st.integers(-(2 ** 63), 2 ** 64 - 1)
_scalars = (st.none() | st.booleans() | _ints | st.floats(allow_nan=True) | st.text(max_size=16)
            | st.binary(max_size=32) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
            | st.builds(msgpack.Timestamp, st.integers(0, 2 ** 32 - 1), st.integers(0, 999_999_999)))
# Tuples pack as msgpack arrays: ``{(): 0}`` is the issue's ``81 90 00``, a map whose key is an array.
_keys = (st.text(max_size=6) | st.binary(max_size=4) | _ints | st.booleans() | st.none() | st.floats()
         | st.tuples() | st.tuples(st.integers(0, 3)) | st.frozensets(st.integers(0, 3), max_size=2))
_objects = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(_keys, kids, max_size=4), max_leaves=16)


def _deep(depth: int, inner=None):
    for _ in range(depth):
        inner = [inner]
    return inner


class Deep:
    """Stands for ``depth`` nested one-item arrays around nil (kept small in Hypothesis's reports)."""

    PLACEHOLDER = "\x00deep\x00"

    def __init__(self, depth: int):
        self.depth = depth

    def __repr__(self):
        return f"Deep({self.depth})"


def nesting(obj) -> int:
    """How deep ``obj`` nests lists and maps once packed (a Deep counts its arrays)."""
    if isinstance(obj, Deep):
        return obj.depth
    if isinstance(obj, (list, tuple, frozenset)):
        return 1 + max(map(nesting, obj), default=0)
    if isinstance(obj, dict):
        return 1 + max(map(nesting, obj.values()), default=0)
    return 0


def pack(obj) -> bytes:
    """msgpack bytes of any strategy object (frozensets as arrays; a Deep written by hand, past the packer's limit)."""
    deep = []

    def default(o):
        if isinstance(o, Deep):
            deep.append(o)
            return Deep.PLACEHOLDER
        return list(o)

    data = msgpack.packb(obj, use_bin_type=True, default=default)
    for d in deep:
        data = data.replace(msgpack.packb(Deep.PLACEHOLDER), b"\x91" * d.depth + b"\xc0", 1)
    return data


_nasty = st.sampled_from([
    b"\x81\x90\x00",  # a map whose key is an array (the issue)
    b"\x81\x80\x00",  # a map whose key is a map
    b"\x81\x91\x90\x00",
    b"\xdd\x03\xff\xff\xff",  # an array declaring 64M items
    b"\xdf\xff\xff\xff\xff",  # a map declaring 4G pairs
    b"\xc6\xff\xff\xff\xff",  # a bin declaring 4 GiB
    b"\xdb\x7f\xff\xff\xff",  # a str declaring 2 GiB
    b"\xc1", b"\xc7\x03\xff\x00\x00\x00",  # never-used byte; a timestamp of a bad length
    b"\xd6\xff\xff\xff\xff\xff", b"\xa2\xff\xfe",  # timestamp 32; a str that is not UTF-8
    b"\x84\xa1t\xa3req\xa2id\x05\xa2op\xa6getpid\xa4args\x80",  # a good request in the middle
])
_fragments = (st.binary(max_size=40) | _objects.map(pack) | _nasty
              | st.integers(1, 3000).map(lambda d: pack(Deep(d)))
              | st.integers(1, 3000).map(lambda d: b"\x81\xa1k" * d + b"\xc0"))
_bytes = st.lists(_fragments, min_size=1, max_size=6).map(b"".join)


def _requests(table: dict, plausible: list, exclude: tuple = ()):
    """Request-shaped maps for ``table``: its ops (and others) with its argument names and random values."""
    names = sorted(n for n in table if n not in exclude)

    @st.composite
    def build(draw):
        op = draw(st.sampled_from(names) | st.text(max_size=10).filter(lambda s: s not in exclude) | _objects)
        fields = [f.name for f in table[op].fields] if isinstance(op, str) and op in table else []
        keys = (st.sampled_from(fields) | st.text(max_size=6)) if fields else st.text(max_size=6)
        values = st.sampled_from(plausible) | _arg_values
        args = draw(st.dictionaries(keys, values, max_size=5))
        if "args" in fields and draw(st.booleans()):  # vmm-op / guest-op carry an inner op and args
            inner = KVM_OPS if op == "vmm-op" else GUEST_OPS
            iop = draw(st.sampled_from(sorted(inner)))
            args["op"] = iop
            args["args"] = draw(st.dictionaries(st.sampled_from([f.name for f in inner[iop].fields] or ["x"]),
                                                values, max_size=4))
        if "ops" in fields and draw(st.booleans()):  # batch / vcpu-batch carry a list of [op, args]
            args["ops"] = draw(st.lists(st.tuples(st.sampled_from(sorted(OPS)) | st.text(max_size=4),
                                                  st.dictionaries(st.text(max_size=5), values, max_size=3)),
                                        max_size=4).map(lambda ops: [list(o) for o in ops]))
        msg = {"t": "req", "id": draw(_ints), "op": op, "args": args}
        if draw(st.integers(0, 5)) == 0:  # damage the envelope
            msg[draw(st.sampled_from(["t", "id", "op", "args", "ctx"]))] = draw(_objects)
        elif draw(st.integers(0, 5)) == 0:
            msg["ctx"] = draw(st.text(max_size=300) | _objects)
        if draw(st.integers(0, 9)) == 0:  # bury the args deep
            msg["args"] = {"x": Deep(draw(st.integers(10, 1500)))}
        return msg

    return build()


_PLAUSIBLE = [0, 1, 15, 16, 4096, RAM, RAM + 16, RAM | (3 << 56), 2 ** 48, 2 ** 64 - 1, -1, "read", "é", SECRET,
              ["read", "write", "mte"], "sync", "none", "memfd", "anon", "tagged", "normal", "device",
              "from-guest", "to-guest", "get", "clear", "load", "store", b"\x01" * 16, [1, 2, 3], [RAM, 16, "tagged"],
              [[RAM, 16, "tagged"]], True, False, None, {}, [{"ipa": RAM, "size": MiB, "backing": "memfd"}]]


# argument values: plausible ones, anything, and lists of maps shaped like vm-setup's memslots (mixed key types)
_arg_values = (st.sampled_from(_PLAUSIBLE) | _objects
               | st.lists(st.dictionaries(st.sampled_from(["ipa", "size", "backing", "object", "prot_mte", "zz"])
                                          | st.binary(max_size=3), st.sampled_from(_PLAUSIBLE) | _objects, max_size=4),
                          max_size=3))


def _messages(table: dict, exclude: tuple = ()):
    return st.lists(_requests(table, _PLAUSIBLE, exclude) | _objects, min_size=1, max_size=4)


# ---- driving one connection ----------------------------------------------------------------

def _check_response(msg) -> None:
    """A response the server sent: a well-formed envelope; an error carries a real errno and is no internal error."""
    assert isinstance(msg, dict) and msg.get("t") == "res", msg
    assert isinstance(msg.get("ok"), bool), msg
    if not msg["ok"]:
        assert isinstance(msg["errno"], int) and msg["errno"] > 0, msg
        assert not (msg["errno"] == EIO and "internal" in msg["msg"]), msg
        assert isinstance(msg["msg"], str) and len(msg["msg"]) < 4096, msg


async def _until_closed(f: wire.FramedStream, timeout: float = 20) -> list:
    """Every response until the server closes the connection (fails if it neither answers nor closes)."""
    got = []
    with trio.fail_after(timeout):
        while True:
            try:
                got.append(await f.receive())
            except wire.WireError:  # ConnectionClosed included
                return got


@asynccontextmanager
async def connection(serve):
    """A FramedStream to a fresh ``serve(stream)`` task; on exit the server task must have returned."""
    ours, theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(serve, theirs)
        f = wire.FramedStream(ours)
        try:
            yield f
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(20):
                await ours.aclose()
    # the nursery has joined the server task: it returned (a raise would have failed the test here)


async def feed_bytes(serve, data: bytes, prefix=()) -> list:
    """Send ``prefix`` requests (answered), then raw ``data`` and EOF; return the responses to ``data``."""
    async with connection(serve) as f:
        for msg in prefix:
            await f.send(msg)
            reply = await f.receive()
            assert reply["ok"], reply
        try:
            await f.stream.send_all(data)
            await f.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed already
        got = await _until_closed(f)
    for msg in got:
        _check_response(msg)
    return got


async def feed_messages(serve, msgs: list, prefix=()) -> None:
    """Send each message in turn: a request gets exactly one response with its id; anything else gets an EPROTO
    response and a close; a message nested past MAX_DEPTH gets EINVAL (when it has an id) and a close."""
    async with connection(serve) as f:
        for msg in prefix:
            await f.send(msg)
            assert (await f.receive())["ok"]
        for msg in msgs:
            try:
                await f.stream.send_all(pack(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pytest.fail(f"the server closed the connection before {wire.brief(msg)}")
            is_request = isinstance(msg, dict) and msg.get("t") == "req"
            with trio.fail_after(20):
                try:
                    reply = await f.receive()
                except wire.WireError:  # closed without a reply: only for what does not decode within bounds
                    assert not is_request or nesting(msg) > wire.MAX_DEPTH or _unhashable_keys(msg), msg
                    return
            _check_response(reply)
            rid = msg.get("id") if isinstance(msg, dict) else None
            has_id = isinstance(rid, int) and not isinstance(rid, bool)
            if nesting(msg) > wire.MAX_DEPTH:  # refused for its nesting: EINVAL with its id, then closed
                assert has_id and reply["id"] == rid and reply["errno"] == EINVAL, (msg, reply)
                assert await _until_closed(f) == []
                return
            if not is_request:  # EPROTO (with its id when it has one), then closed
                assert reply["errno"] == EPROTO and reply["id"] == (rid if has_id else None), (msg, reply)
                assert await _until_closed(f) == []
                return
            if has_id:
                assert reply["id"] == rid, (msg, reply)
            else:
                assert reply["id"] is None and reply["errno"] == EINVAL, (msg, reply)


def _unhashable_keys(obj) -> bool:
    """Whether a map anywhere in ``obj`` has a key msgpack cannot decode as a Python dict key (array, map)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if any(not isinstance(k, (str, bytes)) for k in o):
                return True
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return False


@pytest.fixture
def no_errors(caplog):
    """Fails the test if anything logs at ERROR (a server's last-resort handler caught something)."""
    caplog.set_level(logging.WARNING)
    yield caplog
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# ---- the hypervisor -------------------------------------------------------------------------

@pytest.fixture
def hv():
    """One hypervisor (with a secret) for all the examples of a test, as a long-running host would be."""
    return Hypervisor(Kernel(), secret=SECRET)


def _hello(role="process"):
    return wire.request(0, "hello", {"role": role, "secret": SECRET})


async def hv_healthy(hv: Hypervisor) -> None:
    """A fresh process connection is introduced and served; the kernel recorded no internal error."""
    async with connection(hv.serve) as f:
        await f.send(_hello())
        pid = (await f.receive())["value"]["pid"]
        await f.send(wire.request(1, "getpid", {}))
        assert (await f.receive())["value"] == pid
    assert not [w for w in hv.kernel.warnings if "internal" in w], hv.kernel.warnings
    assert hv.connections == 0


class TestDecoder:
    async def test_array_key_is_a_wire_error(self):
        """The issue's three bytes (a map whose key is an array) raise WireError from the decoder, not TypeError."""
        ours, theirs = trio.testing.memory_stream_pair()
        f = wire.FramedStream(theirs)
        await ours.send_all(b"\x81\x90\x00")
        with pytest.raises(wire.WireError) as info:
            await f.receive()
        assert not isinstance(info.value, wire.ConnectionClosed)

    async def test_too_deep_message_names_its_id(self):
        """A message nesting deeper than MAX_DEPTH is refused with its id; one at MAX_DEPTH is delivered."""
        ours, theirs = trio.testing.memory_stream_pair()
        f = wire.FramedStream(theirs)
        ok = {"t": "req", "id": 1, "op": "x", "args": {"a": Deep(wire.MAX_DEPTH - 2)}}
        bad = {"t": "req", "id": 2, "op": "x", "args": {"a": Deep(wire.MAX_DEPTH - 1)}}
        await ours.send_all(pack(ok) + pack(bad))
        assert (await f.receive())["id"] == 1
        with pytest.raises(wire.WireError) as info:
            await f.receive()
        assert info.value.rid == 2

    @FUZZ
    @given(data=_bytes)
    async def test_decoder_raises_only_wire_error(self, data):
        """Any bytes, delivered in any split, give decoded messages or WireError, never another exception."""
        ours, theirs = trio.testing.memory_stream_pair()
        f = wire.FramedStream(theirs)
        await ours.send_all(data)
        await ours.send_eof()
        with trio.fail_after(10):
            while True:
                try:
                    msg = await f.receive()
                except wire.WireError:
                    break
                assert not wire._too_deep(msg)

    @FUZZ
    @given(value=_objects)
    def test_brief_is_bounded(self, value):
        """brief() of any decoded value (even 1000 levels deep) is a short string, never a RecursionError."""
        assert len(wire.brief(_deep(1000, value))) <= 80
        assert len(wire.brief(value)) <= 80

    def test_memslot_with_mixed_key_types_is_einval(self):
        """A vm-setup memslot with unknown str and bytes keys is EINVAL (sorting them was a TypeError)."""
        from shared.abi import AbiError

        with pytest.raises(AbiError) as info:
            validate_args("vm-setup", {"name": "x", "memory": [{"zz": 1, b"yy": 2}]}, VMM_CONTROL)
        assert info.value.errno == EINVAL and "unknown key" in info.value.message

    @FUZZ
    @given(data=st.data())
    def test_validators_raise_only_abi_errors(self, data):
        """validate_args over every table, given any op and any args, returns a map or raises AbiError only."""
        from shared.abi import AbiError

        for table in (OPS, VMM_CONTROL, GUEST_CHANNEL, EXIT_CHANNEL, KVM_OPS, GUEST_OPS):
            op = data.draw(st.sampled_from(sorted(table)) | _objects)
            fields = [f.name for f in table[op].fields] if isinstance(op, str) and op in table else []
            fields = fields or ["x"]
            args = data.draw(st.dictionaries(st.sampled_from(fields) | st.text(max_size=4), _arg_values, max_size=5)
                             | _objects)
            try:
                out = validate_args(op, args, table)
            except AbiError as exc:
                assert exc.errno > 0 and len(exc.message) < 4096
            else:
                assert isinstance(out, dict)


class TestHypervisorFuzz:
    @FUZZ
    @given(data=_bytes)
    async def test_bytes_before_hello(self, hv, no_errors, data):
        """Arbitrary bytes as a connection's first bytes get only well-formed errors, and the host serves on."""
        await feed_bytes(hv.serve, data)
        await hv_healthy(hv)

    @FUZZ
    @given(data=_bytes, role=st.sampled_from(["process", "host", "vcpu"]))
    async def test_bytes_after_hello(self, hv, no_errors, data, role):
        """Arbitrary bytes after a good hello get only well-formed errors, and the host serves on."""
        await feed_bytes(hv.serve, data, prefix=[_hello(role)])
        await hv_healthy(hv)

    @FUZZ
    @given(msgs=_messages(OPS))
    async def test_messages_before_hello(self, hv, no_errors, msgs):
        """Arbitrary msgpack objects before hello: a request is answered (EPERM unless it is hello), anything else
        gets EPROTO and a close."""
        await feed_messages(hv.serve, msgs)
        await hv_healthy(hv)

    @FUZZ
    @given(msgs=_messages(OPS), role=st.sampled_from(["process", "host", "vcpu"]))
    async def test_messages_after_hello(self, hv, no_errors, msgs, role):
        """Arbitrary msgpack objects and wrong-shaped requests after hello are each answered or close the
        connection, and the host serves on."""
        await feed_messages(hv.serve, msgs, prefix=[_hello(role)])
        await hv_healthy(hv)

    async def test_before_hello_args_are_not_examined(self, hv):
        """Before hello a known op with garbage args is EPERM (not EINVAL): nothing but hello is validated."""
        async with connection(hv.serve) as f:
            await f.send(wire.request(1, "mmap", {"size": "big", "zz": [1]}))
            assert (await f.receive())["errno"] == EPERM
            await f.send(wire.request(2, [[[]]], {}))
            assert (await f.receive())["errno"] == EPERM
            await f.send(wire.request(3, "hello", {"role": "process", "secret": "wrong"}))
            assert (await f.receive())["errno"] == EPERM
            await f.send(wire.request(3, "hello", {"role": "host", "secret": "fuzz-sécret"}))  # not ASCII
            assert (await f.receive())["errno"] == EPERM
            await f.send(wire.request(4, "hello", {"role": "process", "secret": SECRET, "bogus": 1}))
            assert (await f.receive())["errno"] == EINVAL
            await f.send(_hello())
            assert (await f.receive())["ok"]

    async def test_large_frames_wait_for_hello(self, hv):
        """Before hello a 100 KiB request closes the connection unanswered; after hello the same one is answered."""
        from hypervisor.server import MAX_FRAME_BEFORE_HELLO

        big = wire.request(1, "store", {"addr": RAM, "data": bytes(MAX_FRAME_BEFORE_HELLO + 36 * 1024)})
        async with connection(hv.serve) as f:
            await f.send(big)
            assert await _until_closed(f) == []
        async with connection(hv.serve) as f:
            await f.send(_hello())
            assert (await f.receive())["ok"]
            await f.send(big)
            reply = await f.receive()
            assert reply["id"] == 1 and reply["errno"] > 0  # EFAULT: nothing is mapped there
        await hv_healthy(hv)

    async def test_not_a_request_gets_eproto_then_close(self, hv):
        """A map that is not a request gets EPROTO carrying its id, then the connection is closed."""
        async with connection(hv.serve) as f:
            await f.send(_hello())
            await f.receive()
            await f.send({"t": "res", "id": 7})
            reply = await f.receive()
            assert reply["errno"] == EPROTO and reply["id"] == 7
            assert await _until_closed(f) == []
        await hv_healthy(hv)

    async def test_unknown_op_after_hello_is_enosys(self, hv):
        """After hello an op name that is a nested list gets ENOSYS with a bounded message."""
        async with connection(hv.serve) as f:
            await f.send(_hello())
            await f.receive()
            await f.send(wire.request(5, _deep(60, "x"), {}))
            reply = await f.receive()
            assert reply["errno"] == ENOSYS and len(reply["msg"]) < 200


# ---- the VMM's control channel, its exit channel, and the guest's channel --------------------

# pytest-trio runs each Hypothesis example in its own trio run but sets async fixtures up only once,
# so the rigs below are context managers entered by each example.

@asynccontextmanager
async def vmm_rig():
    """An in-process hypervisor, a VMM with a set-up VM (1 vCPU, MTE, 1 MiB memfd RAM) and its guest."""
    async with trio.open_nursery() as nursery:
        host = InProcessHost(nursery, Kernel())
        await host.start()
        link = InProcessVmm(nursery, host, "vm0", "fuzz")
        await link.start()
        client = await link.connect()
        await client.call("vm-setup", {"name": "vm0", "mte": True, "vcpus": 1,
                                       "memory": [{"ipa": RAM, "size": MiB, "backing": "memfd"}]})
        yield link
        await client.aclose()
        await link.stop()
        nursery.cancel_scope.cancel()


async def vmm_healthy(link: InProcessVmm) -> None:
    """A fresh control connection gets a status with the guest running."""
    async with connection(link.vmm.serve) as f:
        await f.send(wire.request(1, "status", {}))
        reply = await f.receive()
        assert reply["ok"] and reply["value"]["guest"]["state"] == "running", reply


class TestVmmControlFuzz:
    @FUZZ
    @given(data=_bytes)
    async def test_bytes(self, no_errors, data):
        """Arbitrary bytes on a VMM control connection get only well-formed errors; the VMM serves on."""
        async with vmm_rig() as link:
            await feed_bytes(link.vmm.serve, data)
            await vmm_healthy(link)

    @FUZZ
    @given(msgs=_messages(VMM_CONTROL, exclude=("shutdown", "kill-guest")))
    async def test_messages(self, no_errors, msgs):
        """Arbitrary msgpack objects and wrong-shaped control requests are each answered or close the
        connection; the VMM and its guest serve on."""
        async with vmm_rig() as link:
            await feed_messages(link.vmm.serve, msgs)
            await vmm_healthy(link)

    @FUZZ
    @given(msgs=_messages(EXIT_CHANNEL))
    async def test_exit_channel_messages(self, no_errors, msgs):
        """Arbitrary msgpack objects on a VMM exit channel are each answered or close it; the VMM serves on."""
        async with vmm_rig() as link:
            await feed_messages(link.vmm.serve_exits, msgs)
            await vmm_healthy(link)


@asynccontextmanager
async def guest_rig():
    """A guest agent with one real vCPU of an MTE VM (1 MiB of memfd RAM at RAM), and a trivial exit server."""
    async with trio.open_nursery() as nursery:
        host = InProcessHost(nursery, Kernel())
        await host.start()
        proc, _ = await host.connect("process", name="vmm:fuzz")
        vm = (await proc.call("kvm-create-vm", {})).value
        await proc.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
        addr = (await proc.call("mmap", {"size": MiB, "backing": "memfd", "prot": ["read", "write", "mte"],
                                         "share": "shared"})).value
        await proc.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": RAM, "size": MiB, "addr": addr})
        token = (await proc.call("kvm-create-vcpu", {"vm": vm})).value["token"]
        hv, _ = await host.connect("vcpu", name="guest:fuzz")
        exits_ours, exits_theirs = trio.testing.memory_stream_pair()

        async def on_exit(op, args, ctx):
            return bytes(min(args["size"], 64)) if op == "exit-mmio" and not args["write"] else None

        nursery.start_soon(serve_requests, exits_theirs, EXIT_CHANNEL, on_exit)
        exits = wire.Client(exits_ours)
        await nursery.start(exits.run)
        agent = GuestAgent(hv, exits)
        await agent.add_vcpu(0, token)
        yield agent
        nursery.cancel_scope.cancel()


async def guest_healthy(agent: GuestAgent) -> None:
    """A fresh guest channel runs a guest op (read-tfsr) on vCPU 0."""
    async with connection(agent.serve) as f:
        await f.send(wire.request(1, "guest-op", {"vcpu": 0, "op": "read-tfsr", "args": {}}))
        reply = await f.receive()
        assert reply["ok"] and isinstance(reply["value"], int), reply


class TestGuestChannelFuzz:
    @FUZZ
    @given(data=_bytes)
    async def test_bytes(self, no_errors, data):
        """Arbitrary bytes on a guest channel get only well-formed errors; the guest serves a new channel."""
        async with guest_rig() as agent:
            await feed_bytes(agent.serve, data)
            await guest_healthy(agent)

    @FUZZ
    @given(msgs=_messages(GUEST_CHANNEL))
    async def test_messages(self, no_errors, msgs):
        """Arbitrary msgpack objects and wrong-shaped guest ops are each answered or close the channel; the
        guest serves a new channel."""
        async with guest_rig() as agent:
            await feed_messages(agent.serve, msgs)
            await guest_healthy(agent)
