"""End-to-end fuzz: thousands of connections of random bytes and random msgpack into each real process.

The hypervisor (``python -m hypervisor`` on a Unix socket and on loopback TCP,
before and after ``hello``), a VMM (``python -m vmm``'s control socket, whose
guest-ops reach a real guest process) and a guest (``python -m guest``'s
channel) are fed seeded random input: raw bytes, mutated requests, the issue's
``81 90 00`` and other nasty headers, deep nesting, random msgpack objects and
random requests of each server's op table. Each fuzz stops after
:data:`CONNECTIONS` connections or :data:`SECONDS` seconds, whichever comes
first (``MTEKVM_SLOW=1``: ten times both). Every reply must be a well-formed
response (no internal error); afterwards the process must be alive, must
serve a new client and a bystander connected before the fuzz, and must have
logged no traceback.

A guest serves exactly one channel for its life (the VMM's), so its fuzz is
thousands of random requests on that channel (each answered, the guest alive
afterwards), plus a few guest processes fed garbage, each of which must close
the channel and exit 0 with no traceback.
"""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio

from mtekvm.links import ProcessVmm
from shared import wire
from shared.abi import OPS
from shared.control import EXIT_CHANNEL, GUEST_CHANNEL, GUEST_OPS, KVM_OPS, VMM_CONTROL
from shared.errno import EIO, EPROTO
from shared.rpc import serve_requests
from shared.transport import open_connection

SLOW = os.environ.get("MTEKVM_SLOW") == "1"
CONNECTIONS = 20_000 if SLOW else 2_000
SECONDS = 80.0 if SLOW else 8.0
WORKERS = 8  # connections in flight at once
SEED = int(os.environ.get("MTEKVM_FUZZ_SEED", "20261202"))
ROOT = Path(__file__).resolve().parents[2]
RAM = 0x4000_0000
FRESH_VA = 0x5123_0000  # a VA the fuzz does not choose
MiB = 1 << 20
STEP_TIMEOUT = 30  # seconds one connection may take before the process counts as hung


# ---- random input ------------------------------------------------------------------------------

NASTY = [
    b"\x81\x90\x00",  # the issue: a map whose key is an array
    b"\x81\x80\x00",  # a map whose key is a map
    b"\x81\x01\x02",  # an integer key
    b"\xdd\x03\xff\xff\xff",  # an array declaring 64M items
    b"\xdf\xff\xff\xff\xff",  # a map declaring 4G pairs
    b"\xc6\xff\xff\xff\xff",  # a bin declaring 4 GiB
    b"\xdb\x7f\xff\xff\xff",  # a str declaring 2 GiB
    b"\xc1",  # the never-used byte
    b"\xc7\x03\xff\x00\x00\x00",  # a timestamp of a bad length
    b"\xa2\xff\xfe",  # a str that is not UTF-8
    b"\xd4\x05\x00",  # an ext value
]
_INTS = [0, 1, -1, 15, 16, 4096, RAM, RAM + 16, 2 ** 31, 2 ** 48, 2 ** 63 - 1, -(2 ** 63), 2 ** 64 - 1]
_WORDS = ["read", "write", "mte", "sync", "none", "async", "memfd", "anon", "hugetlb", "tagged", "normal", "device",
          "from-guest", "to-guest", "get", "clear", "load", "store", "stg", "ldg", "process", "host", "vcpu", ""]


def rand_scalar(r: random.Random):
    k = r.randrange(10)
    if k == 0:
        return None
    if k == 1:
        return r.random() < 0.5
    if k == 2:
        return r.choice(_INTS)
    if k == 3:
        return r.randrange(-(2 ** 63), 2 ** 64)
    if k == 4:
        return r.choice([0.0, -1.5, math.inf, math.nan, 1e308])
    if k == 5:
        return r.choice(_WORDS)
    if k == 6:
        return "".join(chr(r.randrange(32, 0x2FF)) for _ in range(r.randrange(12)))
    if k == 7:
        return r.randbytes(r.randrange(40))
    if k == 8:
        return msgpack.ExtType(r.randrange(128), r.randbytes(r.randrange(9)))
    return msgpack.Timestamp(r.randrange(2 ** 32), r.randrange(10 ** 9))


def rand_key(r: random.Random):
    k = r.randrange(8)
    if k == 0:
        return tuple(r.randrange(4) for _ in range(r.randrange(3)))  # packs as an array key
    if k == 1:
        return r.randrange(-5, 2 ** 64)
    if k == 2:
        return r.randbytes(r.randrange(5))
    if k == 3:
        return None
    return r.choice(_WORDS + ["t", "id", "op", "args", "ctx", "x"])


def rand_obj(r: random.Random, depth: int = 0):
    k = r.randrange(10)
    if depth >= 4 or k < 6:
        return rand_scalar(r)
    if k < 8:
        return [rand_obj(r, depth + 1) for _ in range(r.randrange(5))]
    return {rand_key(r): rand_obj(r, depth + 1) for _ in range(r.randrange(5))}


def rand_value(r: random.Random):
    k = r.randrange(6)
    if k == 0:
        return rand_obj(r)
    if k == 1:
        return [r.choice(_WORDS[:4]) for _ in range(r.randrange(4))]
    if k == 2:
        return [[r.choice(_INTS), r.choice(_INTS), r.choice(_WORDS)] for _ in range(r.randrange(3))]
    if k == 3:
        return [{"ipa": r.choice(_INTS), "size": r.choice(_INTS), "backing": r.choice(_WORDS),
                 rand_key(r): rand_scalar(r)} for _ in range(r.randrange(3))]
    return r.choice(_INTS) if k == 4 else rand_scalar(r)


def rand_args(r: random.Random, table: dict, op) -> dict:
    fields = [f.name for f in table[op].fields] if isinstance(op, str) and op in table else []
    args = {}
    for _ in range(r.randrange(6)):
        name = r.choice(fields) if fields and r.random() < 0.8 else r.choice(_WORDS + ["x"])
        args[name] = rand_value(r)
    if "op" in fields and "args" in fields and r.random() < 0.6:  # vmm-op / guest-op: an inner op
        inner = KVM_OPS if op == "vmm-op" else GUEST_OPS
        args["op"] = r.choice(sorted(inner))
        args["args"] = rand_args(r, inner, args["op"])
        if op == "guest-op":
            args["vcpu"] = 0
    if "ops" in fields and r.random() < 0.5:  # batch / vcpu-batch
        args["ops"] = [[r.choice(sorted(OPS)), rand_args(r, OPS, "load")] for _ in range(r.randrange(4))]
    return args


def rand_request(r: random.Random, table: dict, exclude=(), rid=None) -> dict:
    ops = [o for o in sorted(table) if o not in exclude]
    op = r.choice(ops) if r.random() < 0.85 else rand_obj(r)
    if op in exclude:
        op = ops[0]
    msg = {"t": "req", "id": r.randrange(2 ** 32) if rid is None else rid, "op": op, "args": rand_args(r, table, op)}
    if r.random() < 0.1:  # damage the envelope
        msg[r.choice(["t", "id", "op", "args", "ctx"])] = rand_obj(r)
    elif r.random() < 0.1:
        msg["ctx"] = r.choice(["A/1", "x" * 300, 7, None])
    return msg


def str_keys_only(obj) -> bool:
    """Whether every map in ``obj`` has only str/bytes keys (else the wire refuses the whole message)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if not all(isinstance(k, (str, bytes)) for k in o):
                return False
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return True


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def mutate(r: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(r.randrange(1, 5)):
        k = r.randrange(4)
        i = r.randrange(len(b) + 1)
        if k == 0 and b:
            b[min(i, len(b) - 1)] = r.randrange(256)
        elif k == 1:
            b[i:i] = r.choice(NASTY) if r.random() < 0.5 else r.randbytes(r.randrange(1, 4))
        elif k == 2 and b:
            del b[i:i + r.randrange(1, 4)]
        else:
            b = b[:i]
    return bytes(b)


def rand_payload(r: random.Random, table: dict, exclude=()) -> bytes:
    """One connection's bytes: garbage, nasty headers, deep nesting, random objects, or (mostly good) requests."""
    k = r.randrange(8)
    if k == 0:
        return r.randbytes(r.randrange(1, 80))
    if k == 1:
        return pack(rand_obj(r))
    if k == 2:
        return mutate(r, pack(rand_request(r, table, exclude)))
    if k == 3:
        return b"".join(r.choice(NASTY) if r.random() < 0.6 else pack(rand_obj(r)) for _ in range(r.randrange(1, 5)))
    if k == 4:
        d = r.randrange(1, 5000)  # deep nesting, bare or as the args of a request
        head = (b"\x84" + b"".join(map(pack, ["t", "req", "id", 9, "op", "getpid", "args"])) + b"\x81\xa1x"
                if r.random() < 0.5 else b"")
        return head + (b"\x91" if r.random() < 0.5 else b"\x81\xa1k") * d + b"\xc0"
    return b"".join(pack(rand_request(r, table, exclude)) for _ in range(r.randrange(1, 6)))


# ---- driving connections -------------------------------------------------------------------

def check_reply(msg) -> None:
    """A reply from a fuzzed server: a well-formed response; an error has a real errno and is not an internal one."""
    assert isinstance(msg, dict) and msg.get("t") == "res" and isinstance(msg.get("ok"), bool), msg
    if not msg["ok"]:
        assert isinstance(msg["errno"], int) and msg["errno"] > 0, msg
        assert not (msg["errno"] == EIO and "internal" in msg.get("msg", "")), msg


async def read_until_closed(f: wire.FramedStream) -> list:
    got = []
    while True:
        try:
            got.append(await f.receive())
        except wire.WireError:  # ConnectionClosed included
            return got


async def fuzz_connections(connect, payload, *, prefix=None, why=lambda: "") -> int:
    """Run connections until CONNECTIONS are done or SECONDS have passed; returns how many ran.

    ``connect()`` opens a stream; ``payload(r)`` gives its bytes; ``prefix(r)`` (a request, e.g. hello, or None)
    is sent and must be answered ok first. ``why()`` explains a refused connection (the process's log). Each
    connection sends its bytes, then EOF, and reads every reply until closed.
    """
    done = 0
    master = random.Random(SEED)

    async def one(r: random.Random) -> None:
        try:
            stream = await connect()
        except OSError as exc:
            raise AssertionError(f"the server stopped accepting connections ({exc}):\n{why()[-3000:]}") from None
        f = wire.FramedStream(stream)
        try:
            first_msg = prefix(r) if prefix is not None else None
            if first_msg is not None:
                await f.send(first_msg)
                first = await f.receive()
                assert first.get("ok"), first
            try:
                await stream.send_all(payload(r))
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the server closed first: its replies are still readable
            for msg in await read_until_closed(f):
                check_reply(msg)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def worker(wid: int) -> None:
        nonlocal done
        while done < CONNECTIONS:
            seed = master.randrange(2 ** 63)
            with trio.fail_after(STEP_TIMEOUT):
                try:
                    await one(random.Random(seed))
                except AssertionError as exc:
                    raise AssertionError(f"connection with seed {seed}: {exc}") from None
            done += 1

    with trio.move_on_after(SECONDS):
        async with trio.open_nursery() as n:
            for i in range(WORKERS):
                n.start_soon(worker, i)
    return done


def assert_no_traceback(log: str, who: str) -> None:
    assert "Traceback" not in log, f"{who} logged a traceback:\n{log[-3000:]}"


# ---- the hypervisor ----------------------------------------------------------------------------

def _hello(secret: str, role: str) -> dict:
    return wire.request(0, "hello", {"role": role, "secret": secret})


async def fuzz_hypervisor(hv, *, introduce: bool) -> int:
    """Fuzz ``hv`` (hello'd as a random role first when ``introduce``); check it serves on; returns the count."""
    def prefix(r):
        return _hello(hv.secret, r.choice(["process", "host", "vcpu"])) if introduce else None

    async with hv.client("process") as bystander:
        n = await fuzz_connections(hv.stream, lambda r: rand_payload(r, OPS), prefix=prefix, why=hv.stderr)
        assert (await bystander.call("getpid")).value == bystander.hello["pid"]
    await hv.assert_healthy()
    warnings = (await hv.stats())["warnings"]
    assert not [w for w in warnings if "internal" in w], warnings
    assert_no_traceback(hv.stderr(), "the hypervisor")
    return n


class TestHypervisorProcess:
    @pytest.mark.parametrize("introduce", [False, True], ids=["before-hello", "after-hello"])
    async def test_unix_socket_survives_fuzz(self, fresh_hypervisor, introduce):
        """Thousands of Unix connections of random bytes and msgpack (before or after hello) leave the hypervisor
        alive, serving a bystander and new clients, with no traceback logged."""
        n = await fuzz_hypervisor(fresh_hypervisor, introduce=introduce)
        assert n > 0
        print(f"hypervisor unix {'after' if introduce else 'before'} hello: {n} connections")

    @pytest.mark.parametrize("introduce", [False, True], ids=["before-hello", "after-hello"])
    async def test_tcp_survives_fuzz(self, spawn_hypervisor, introduce):
        """Thousands of loopback TCP connections of random bytes and msgpack (before hello, so before the secret
        is checked, or after it) leave the hypervisor alive and serving, with no traceback logged."""
        hv = spawn_hypervisor("tcp:127.0.0.1:0")
        n = await fuzz_hypervisor(hv, introduce=introduce)
        assert n > 0
        print(f"hypervisor tcp {'after' if introduce else 'before'} hello: {n} connections")

    async def test_the_issue_bytes(self, fresh_hypervisor):
        """The issue's three bytes ``81 90 00`` close that connection only (before hello and after it)."""
        hv = fresh_hypervisor
        for introduce in (False, True):
            async with hv.framed() as f:
                if introduce:
                    await f.send(_hello(hv.secret, "process"))
                    assert (await f.receive())["ok"]
                await f.stream.send_all(b"\x81\x90\x00")
                with trio.fail_after(10):
                    assert await read_until_closed(f) == []
        await hv.assert_healthy()
        assert_no_traceback(hv.stderr(), "the hypervisor")

    async def test_not_a_request_gets_eproto(self, hypervisor):
        """A well-formed message that is not a request gets an EPROTO reply, then the connection is closed."""
        async with hypervisor.framed() as f:
            await f.send([1, 2, 3])
            with trio.fail_after(10):
                got = await read_until_closed(f)
        assert [m["errno"] for m in got] == [EPROTO]
        await hypervisor.assert_healthy()


# ---- a VMM -------------------------------------------------------------------------------------

@asynccontextmanager
async def running_vmm(nursery, hv):
    """A ``python -m vmm`` with a set-up MTE VM (1 vCPU, 1 MiB memfd RAM) and a control client kept open."""
    link = ProcessVmm(nursery, hv.address, hv.secret, "fz", "fuzz")
    await link.start()
    client = await link.connect()
    try:
        await client.call("vm-setup", {"name": "fz", "mte": True, "vcpus": 1,
                                       "memory": [{"ipa": RAM, "size": MiB, "backing": "memfd"}]})
        await client.call("guest-op", {"vcpu": 0, "op": "enable-mte", "args": {"tcf": "sync"}})
        await client.call("guest-op", {"vcpu": 0, "op": "map", "args": {"va": RAM, "ipa": RAM, "size": MiB,
                                                                         "attr": "tagged"}})
        yield link, client
    finally:
        with trio.CancelScope(shield=True):
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - the VMM may be dead already
                pass
            await link.stop()


class TestVmmProcess:
    async def test_control_socket_survives_fuzz(self, nursery, fresh_hypervisor):
        """Thousands of control connections of random bytes, msgpack and control requests (guest-ops reach the
        guest) leave the VMM and its guest alive and serving, with no traceback logged."""
        async with running_vmm(nursery, fresh_hypervisor) as (link, client):
            n = await fuzz_connections(lambda: open_connection(link.address),
                                       lambda r: rand_payload(r, VMM_CONTROL, exclude=("shutdown", "kill-guest")),
                                       why=link.log)
            assert link.process.poll() is None, link.log()[-3000:]
            status = (await client.call("status", {})).value
            assert status["guest"]["state"] == "running", status
            # random VMM ops may have moved or deleted the memslot: ask the guest something that needs no memory
            assert isinstance((await client.call("guest-op", {"vcpu": 0, "op": "read-tfsr", "args": {}})).value, int)
            fresh = await link.connect()
            assert (await fresh.call("status", {})).value["pid"] == status["pid"]
            await fresh.aclose()
            assert_no_traceback(link.log(), "the VMM or its guest")
        assert n > 0
        print(f"vmm control: {n} connections")


# ---- a guest -----------------------------------------------------------------------------------

@asynccontextmanager
async def guest_process(hv, name: str = "fz"):
    """A ``python -m guest`` on socket pairs: yields ``(process, channel FramedStream, stderr path)``.

    Our end of the exit channel is served (MMIO reads return zeros)."""
    chan_ours, chan_theirs = socket.socketpair()
    exit_ours, exit_theirs = socket.socketpair()
    env = dict(os.environ, MTEKVM_SECRET=hv.secret)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    err_path = Path(hv.stderr_path).with_name(f"guest-{name}-{os.getpid()}-{id(chan_ours)}.stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "guest", "--hypervisor", hv.address, "--name", name,
                                 "--channel-fd", str(chan_theirs.fileno()), "--exit-fd", str(exit_theirs.fileno())],
                                pass_fds=(chan_theirs.fileno(), exit_theirs.fileno()), stderr=err, env=env,
                                cwd=str(ROOT))
    chan_theirs.close()
    exit_theirs.close()
    channel = trio.SocketStream(trio.socket.from_stdlib_socket(chan_ours))
    exits = trio.SocketStream(trio.socket.from_stdlib_socket(exit_ours))

    async def on_exit(op, args, ctx):
        return bytes(min(args["size"], 4096)) if op == "exit-mmio" and not args["write"] else None

    try:
        async with trio.open_nursery() as n:
            n.start_soon(serve_requests, exits, EXIT_CHANNEL, on_exit)
            yield proc, wire.FramedStream(channel), err_path
            n.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()
            if proc.poll() is None:
                with trio.move_on_after(10):
                    while proc.poll() is None:
                        await trio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


async def guest_exit_status(proc) -> int:
    with trio.fail_after(20):
        while proc.poll() is None:
            await trio.sleep(0.02)
    return proc.returncode


class TestGuestProcess:
    async def test_channel_survives_thousands_of_random_requests(self, fresh_hypervisor):
        """Thousands of random guest-channel requests (random ops and arguments, wrong shapes) on a real guest
        with a vCPU are each answered once, with no internal error, and the guest goes on running guest ops."""
        hv = fresh_hypervisor
        async with hv.client("process") as owner:
            vm = (await owner.call("kvm-create-vm", {})).value
            await owner.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
            addr = (await owner.call("mmap", {"size": MiB, "backing": "memfd", "share": "shared",
                                              "prot": ["read", "write", "mte"]})).value
            await owner.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": RAM, "size": MiB, "addr": addr})
            token = (await owner.call("kvm-create-vcpu", {"vm": vm})).value["token"]
            async with guest_process(hv) as (proc, chan, err_path):
                await chan.send(wire.request(1, "vcpu-add", {"index": 0, "token": token}))
                with trio.fail_after(STEP_TIMEOUT):
                    assert (await chan.receive())["ok"]
                r = random.Random(SEED + 2)
                sent = 0
                with trio.move_on_after(SECONDS):
                    while sent < CONNECTIONS:
                        batch = [rand_request(r, GUEST_CHANNEL, rid=sent + i + 10) for i in range(8)]
                        batch = [m for m in batch if m.get("t") == "req" and isinstance(m.get("id"), int)
                                 and not isinstance(m.get("id"), bool) and str_keys_only(m)]
                        await chan.stream.send_all(b"".join(pack(m) for m in batch))
                        with trio.fail_after(STEP_TIMEOUT):
                            replies = [await chan.receive() for _ in batch]
                        assert sorted(m["id"] for m in replies) == sorted(m["id"] for m in batch)
                        for m in replies:
                            check_reply(m)
                        sent += len(batch)
                assert proc.poll() is None, err_path.read_text(errors="replace")[-3000:]
                # the random ops may have remapped RAM's VAs: check through a VA of our own, one op at a time
                rid = 1
                for op, args in [("map", {"va": FRESH_VA, "ipa": RAM + 0x8000, "size": 4096, "attr": "normal"}),
                                 ("store", {"addr": FRESH_VA, "data": b"alive"}),
                                 ("load", {"addr": FRESH_VA, "size": 5})]:
                    rid += 1
                    await chan.send(wire.request(rid, "guest-op", {"vcpu": 0, "op": op, "args": args}))
                    with trio.fail_after(STEP_TIMEOUT):
                        reply = await chan.receive()
                    assert reply["id"] == rid and reply["ok"], reply
                assert reply["value"] == b"alive", reply
            assert await guest_exit_status(proc) == 0
            assert_no_traceback(err_path.read_text(errors="replace"), "the guest")
        assert sent > 0
        print(f"guest channel: {sent} requests")

    async def test_garbage_closes_the_channel_and_the_guest_exits_cleanly(self, fresh_hypervisor):
        """Guests fed random bytes or msgpack on their channel reply only well-formed errors, and each exits 0
        (the channel closed) with no traceback."""
        hv = fresh_hypervisor
        master = random.Random(SEED + 3)
        count = 0
        with trio.move_on_after(SECONDS):
            while count < (40 if SLOW else 6):
                r = random.Random(master.randrange(2 ** 63))
                payload = rand_payload(r, GUEST_CHANNEL) if count else b"\x81\x90\x00"
                async with guest_process(hv, f"fz{count}") as (proc, chan, err_path):
                    try:
                        await chan.stream.send_all(payload)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    with trio.move_on_after(2):  # garbage closes at once; good requests wait for our close
                        for m in await read_until_closed(chan):
                            check_reply(m)
                assert await guest_exit_status(proc) == 0, err_path.read_text(errors="replace")[-3000:]
                assert_no_traceback(err_path.read_text(errors="replace"), "the guest")
                count += 1
        assert count > 0
