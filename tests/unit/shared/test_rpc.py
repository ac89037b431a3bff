"""The one request loop (shared.rpc.RequestLoop): both roles, inline requests, coalesced replies, shielding."""

from __future__ import annotations

import ast
import contextvars
import inspect

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import shared.errno
from guest.agent import GuestError
from guest.stage1 import Stage1Error
from hypervisor.kernel import Kernel
from hypervisor.sched import ControlledScheduler
from hypervisor.server import Hypervisor
from shared import rpc, wire
from shared.abi import AbiError
from shared.control import KVM_OPS, VMM_CONTROL
from shared.errno import EINVAL, EIO, ERRNO_BY_NAME, ErrnoError, KernelError
from vmm.machine import Vmm, VmmError

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


class CountingStream(trio.abc.Stream):
    """A stream that counts the server's writes (one ``send_all`` per coalesced batch of replies)."""

    def __init__(self, inner: trio.abc.Stream):
        self.inner = inner
        self.writes = 0

    async def send_all(self, data) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def read_replies(stream: trio.abc.Stream, n: int) -> list[dict]:
    """Read ``n`` messages from ``stream`` (raw, so arrival order is visible)."""
    unpacker = msgpack.Unpacker(raw=False)
    out: list[dict] = []
    while len(out) < n:
        data = await stream.receive_some(65536)
        assert data, f"connection closed after {len(out)} of {n} replies"
        unpacker.feed(data)
        out.extend(unpacker)
    return out


def burst(*reqs: tuple[int, str, dict]) -> bytes:
    """Several requests packed back to back, to be written in one send."""
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join(packer.pack(wire.request(rid, op, args)) for rid, op, args in reqs)


class TestOneLoopForBothRoles:
    async def test_the_hypervisor_and_the_vmm_servers_run_the_same_loop(self, monkeypatch):
        """A hypervisor connection and a serve_requests (VMM/guest) connection are each served by a RequestLoop."""
        made: list[rpc.RequestLoop] = []
        real_run = rpc.RequestLoop.run

        async def counting_run(self):
            made.append(self)
            await real_run(self)

        monkeypatch.setattr(rpc.RequestLoop, "run", counting_run)

        async def vmm_handler(op, args, ctx):
            return {"op": op}

        hv = Hypervisor(Kernel())
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(hv.serve, b)
            c, d = trio.testing.memory_stream_pair()
            nursery.start_soon(rpc.serve_requests, d, VMM_CONTROL, vmm_handler)
            await a.send_all(burst((1, "hello", {"role": "process"}), (2, "getpid", {})))
            hv_replies = await read_replies(a, 2)
            op = next(iter(VMM_CONTROL))
            await c.send_all(burst((1, "no-such-op", {})))
            vmm_reply = (await read_replies(c, 1))[0]
            await a.aclose()
            await c.aclose()
        assert len(made) == 2 and made[0] is not made[1]
        assert [r["ok"] for r in hv_replies] == [True, True] and isinstance(hv_replies[1]["value"], int)
        assert vmm_reply["ok"] is False and vmm_reply["err"] == "ENOSYS", (op, vmm_reply)


class TestInlineAndCoalesced:
    async def test_a_burst_of_non_yielding_requests_is_answered_inline_in_one_write(self):
        """Sixteen getpids written at once run in the reading task (no task each) and are answered in one write."""
        hv = Hypervisor(Kernel())
        a, b = trio.testing.memory_stream_pair()
        counted = CountingStream(b)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hv.serve, counted)
            await a.send_all(burst((0, "hello", {"role": "process"})))
            await read_replies(a, 1)
            writes_before = counted.writes
            await a.send_all(burst(*[(i, "getpid", {}) for i in range(1, 17)]))
            replies = await read_replies(a, 16)
            await a.aclose()
        assert sorted(r["id"] for r in replies) == list(range(1, 17))
        assert all(r["ok"] for r in replies)
        assert counted.writes - writes_before == 1

    async def test_requests_in_flight_together_share_writes(self):
        """Replies that finish while another is being written go out together, not one write each."""
        gate = trio.Event()

        async def dispatch(op, args, ctx):
            await gate.wait()
            return op

        a, b = trio.testing.memory_stream_pair()
        counted = CountingStream(b)
        loop = rpc.RequestLoop(wire.FramedStream(counted), dispatch, inline=lambda: True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await a.send_all(burst(*[(i, f"op{i}", {}) for i in range(8)]))
            await trio.testing.wait_all_tasks_blocked()
            assert loop.outstanding == 8
            gate.set()
            replies = await read_replies(a, 8)
            await a.aclose()
        assert sorted(r["value"] for r in replies) == [f"op{i}" for i in range(8)]
        assert counted.writes < 8

    async def test_a_controlled_run_gives_each_request_a_task(self):
        """Under a controlled scheduler no request runs inline (its scheduling decisions stay as they were)."""
        sched = ControlledScheduler(seed=1)
        hv = Hypervisor(Kernel(sched=sched))
        a, b = trio.testing.memory_stream_pair()
        loops: list[rpc.RequestLoop] = []
        real_init = rpc.RequestLoop.__init__

        def spy(self, *args, **kw):
            real_init(self, *args, **kw)
            loops.append(self)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rpc.RequestLoop, "__init__", spy)
            async with trio.open_nursery() as nursery:
                await nursery.start(sched.run_driver)
                nursery.start_soon(hv.serve, b)
                await a.send_all(burst((0, "hello", {"role": "process"})))
                replies = await read_replies(a, 1)
                await a.send_all(burst((1, "getpid", {}), (2, "getpid", {})))
                replies += await read_replies(a, 2)
                await a.aclose()
                await hv.wait_idle()
                nursery.cancel_scope.cancel()
        assert [r["ok"] for r in replies] == [True, True, True], replies
        assert loops and loops[0].served_inline == 0


class TestPipelining:
    async def test_a_slow_request_does_not_block_a_fast_one_behind_it(self):
        """Inline, a request that waits hands reading on: the fast request behind it runs and is answered first."""
        fast_done = trio.Event()

        async def dispatch(op, args, ctx):
            if op == "slow":
                await fast_done.wait()  # only the fast request behind it can release it
                return "slow"
            fast_done.set()
            return "fast"

        a, b = trio.testing.memory_stream_pair()
        loop = rpc.RequestLoop(wire.FramedStream(b), dispatch, inline=lambda: True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await a.send_all(burst((1, "slow", {}), (2, "fast", {})))
            with trio.fail_after(10):  # a deadlock guard, not a timing assertion
                replies = await read_replies(a, 2)
            await a.aclose()
        assert [r["value"] for r in replies] == ["fast", "slow"]
        assert loop.served_inline == 1  # the fast one; the slow one finished in the task that had been reading

    async def test_the_reader_after_a_hand_off_does_not_inherit_the_request_context(self):
        """A request that sets a context variable and yields leaves the next request's context unset."""
        seen: dict[str, str] = {}
        release = trio.Event()

        async def dispatch(op, args, ctx):
            seen[op] = _VAR.get()
            if op == "first":
                _VAR.set("first's")
                await release.wait()
            else:
                release.set()
            return op

        a, b = trio.testing.memory_stream_pair()
        loop = rpc.RequestLoop(wire.FramedStream(b), dispatch, inline=lambda: True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await a.send_all(burst((1, "first", {}), (2, "second", {})))
            await read_replies(a, 2)
            await a.aclose()
        assert seen == {"first": "unset", "second": "unset"}


class TestShield:
    @pytest.mark.parametrize("inline", [True, False])
    async def test_a_request_in_flight_finishes_after_its_connection_closes(self, inline):
        """With shield, closing the connection does not cancel a request in flight: it runs to its end."""
        finished: list[str] = []
        release = trio.Event()

        async def dispatch(op, args, ctx):
            await trio.lowlevel.checkpoint()
            await release.wait()
            await trio.lowlevel.checkpoint()
            finished.append(op)
            return op

        a, b = trio.testing.memory_stream_pair()
        loop = rpc.RequestLoop(wire.FramedStream(b), dispatch, inline=lambda: inline, shield=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await a.send_all(burst((1, "fault", {})))
            await trio.testing.wait_all_tasks_blocked()
            await a.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert finished == []
            release.set()
        assert finished == ["fault"]

    async def test_a_cancellation_from_outside_stops_reading_but_lets_requests_finish(self):
        """With shield, an outside cancel closes the stream; the request in flight still finishes, then the cancel ends
        run()."""
        finished: list[str] = []
        release = trio.Event()

        async def dispatch(op, args, ctx):
            await release.wait()
            finished.append(op)
            return op

        a, b = trio.testing.memory_stream_pair()
        loop = rpc.RequestLoop(wire.FramedStream(b), dispatch, inline=lambda: True, shield=True)
        returned = False
        async with trio.open_nursery() as nursery:
            async def serve_then_note():
                nonlocal returned
                with trio.CancelScope() as scope:
                    cancel_scopes.append(scope)
                    await loop.run()
                returned = True

            cancel_scopes: list[trio.CancelScope] = []
            nursery.start_soon(serve_then_note)
            await a.send_all(burst((1, "fault", {})))
            await trio.testing.wait_all_tasks_blocked()
            cancel_scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert finished == [] and not returned  # still in flight, run() waits for it
            release.set()
        assert finished == ["fault"] and returned

    async def test_without_shield_a_closed_connection_cancels_its_requests(self):
        """Without shield (the VMM's and guest's loops), a request in flight is cancelled when its connection closes."""
        finished: list[str] = []
        cancelled: list[str] = []

        async def dispatch(op, args, ctx):
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.append(op)
                raise
            finished.append(op)

        a, b = trio.testing.memory_stream_pair()
        loop = rpc.RequestLoop(wire.FramedStream(b), dispatch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await a.send_all(burst((1, "wait", {})))
            await trio.testing.wait_all_tasks_blocked()
            await a.aclose()
        assert cancelled == ["wait"] and finished == []


class TestErrors:
    async def test_errno_errors_and_bugs_become_replies(self):
        """An ErrnoError is replied with its errno; any other exception is EIO, and the loop goes on serving."""
        async def dispatch(op, args, ctx):
            if op == "bad":
                raise KernelError("EFAULT", "no such address")
            if op == "bug":
                raise ZeroDivisionError("oops")
            return "fine"

        a, b = trio.testing.memory_stream_pair()
        loop = rpc.RequestLoop(wire.FramedStream(b), dispatch, inline=lambda: True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await a.send_all(burst((1, "bad", {}), (2, "bug", {}), (3, "good", {})))
            replies = {r["id"]: r for r in await read_replies(a, 3)}
            await a.aclose()
        assert (replies[1]["err"], replies[1]["msg"]) == ("EFAULT", "no such address")
        assert replies[2]["errno"] == EIO and "ZeroDivisionError" in replies[2]["msg"]
        assert replies[3]["value"] == "fine"

    def test_every_errno_carrying_exception_is_an_errno_error(self):
        """Every errno-carrying exception (kernel, ABI, wire, VMM, guest) shares the ErrnoError base and its
        errno/message/name."""
        for exc in (KernelError("EINVAL", "m"), AbiError(EINVAL, "m"), wire.RemoteError(EINVAL, "m"),
                    wire.EnvelopeError(EINVAL, "m"), VmmError("EINVAL", "m"), GuestError(EINVAL, "m"),
                    Stage1Error(EINVAL, "m")):
            assert isinstance(exc, ErrnoError), type(exc)
            assert (exc.errno, exc.message, exc.name) == (EINVAL, "m", "EINVAL")

    def test_errno_constants_are_spelled_out(self):
        """Every errno name is a plain module-level assignment in shared/errno.py (visible to linters), equal to its
        table entry."""
        tree = ast.parse(inspect.getsource(shared.errno))
        assigned = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
        assert {name: assigned.get(name) for name in ERRNO_BY_NAME} == ERRNO_BY_NAME
        assert "globals" not in inspect.getsource(shared.errno)


class TestVmmDispatchTables:
    def test_every_vmm_op_has_a_handler_in_the_tables(self):
        """The VMM dispatches through tables that cover exactly the control and KVM op tables (no name-built
        getattr)."""
        assert set(Vmm.CONTROL_HANDLERS) == set(VMM_CONTROL)
        assert set(Vmm.KVM_HANDLERS) == set(KVM_OPS)
        assert all(inspect.iscoroutinefunction(h) for h in [*Vmm.CONTROL_HANDLERS.values(), *Vmm.KVM_HANDLERS.values()])
        assert 'getattr(self, "_' not in inspect.getsource(Vmm)


_any_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=8) | st.sampled_from(["read", "write", "mte", "\udc80"]),
    lambda kids: st.lists(kids, max_size=5) | st.tuples(kids) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
    | st.lists(st.integers(-1, 300), max_size=5) | st.lists(st.sampled_from(["read", "é", "\ud800"]), max_size=3),
    max_leaves=12,
)


def _typed(v):
    """``v`` with every value tagged by its type (so that True and 1, or a tuple and a list, differ)."""
    if isinstance(v, dict):
        return ("dict", sorted((_typed(k), _typed(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_typed(x) for x in v])
    return (type(v).__name__, v)


@settings(max_examples=400, deadline=None)
@given(_any_values)
def test_decoded_is_the_msgpack_round_trip_or_declines(value):
    """DirectChannel's shortcut gives what a msgpack round trip gives, types included, or declines."""
    got = rpc._decoded(value)
    try:
        want = msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)
    except (TypeError, ValueError, OverflowError):  # not sendable (a lone surrogate, a 70-bit int, ...)
        assert got is rpc._NOT_STABLE
        return
    if got is rpc._NOT_STABLE:
        return
    assert _typed(got) == _typed(want)
    if isinstance(value, (list, dict)):
        assert got is not value  # a new container: the two sides share none
