"""The hypervisor's connection handling: every client connection is a host process.

:class:`Hypervisor` serves connections over any trio stream (Unix or TCP
socket, or an in-memory stream in controlled runs: the same code either way).
The first message must be ``hello``. A ``process`` connection then owns one
task (a new process, or the forked child whose token it presents) and may
touch only that task's address space and the VMs it created; when the
connection closes the process exits, its VMs are destroyed and its memory is
freed. A ``vcpu`` connection is a guest: ``vcpu-attach`` with a token from
``kvm-create-vcpu`` gives it that vCPU, and it may run only the vCPUs it
attached. A ``host`` connection drives the host kernel.

Each request runs concurrently in its own kernel context (named by the
request's ``ctx``), so one connection can carry parallel steps. At most
:data:`MAX_OUTSTANDING` requests per connection run at once; more get EAGAIN.
Nothing a client sends can take the hypervisor down: bad requests get errno
replies, malformed frames close that connection only, a message that is not a
request gets EPROTO and its connection is closed (see :mod:`shared.wire`), and
an unexpected error inside the model is reported (EIO, recorded in the
kernel's warnings). Before ``hello`` only ``hello`` is looked at: any other op
gets EPERM without its arguments being examined, and frames over
:data:`MAX_FRAME_BEFORE_HELLO` close the connection (a client sends larger
requests only once hello has been answered).

Errors replied:
    EPERM: no ``hello`` yet, wrong secret, or an op outside the connection's role.
    EPROTO: a message that is not a request envelope (then the connection is closed).
    EINVAL: a request id that is not an integer (replied with a nil id), a bad ``ctx``.
    ESRCH: ``attach`` token unknown or already used.
    EBUSY: ``boot`` while processes are attached; ``vcpu-attach`` of a vCPU
        another live guest connection runs.
    ESRCH: ``vcpu-attach`` token unknown, or its VM destroyed.
    EAGAIN: too many outstanding requests.
    EDEADLK: the controlled scheduler found every context blocked.
    plus whatever the op itself returns.
"""

from __future__ import annotations

import functools
import hmac
import logging
import traceback

import trio

from hypervisor.fork import do_exit
from hypervisor.kernel import Kernel
from hypervisor.process import Task
from hypervisor.sched import current_actor
from hypervisor.syscalls import HOST_OPS, PROCESS_OPS, VCPU_OPS
from shared import wire
from shared.abi import OPS, validate_args
from shared.errno import EDEADLK, EIO, EPERM, Deadlock, KernelError, ScheduleDivergence
from shared.rpc import DirectChannel, RequestLoop

log = logging.getLogger("mtekvm.hypervisor")

MAX_OUTSTANDING = 256
#: Largest frame accepted from a connection before its ``hello`` succeeds (a hello is a few hundred bytes).
MAX_FRAME_BEFORE_HELLO = 64 * 1024
OBSERVERS = frozenset({"check-invariants", "stats", "meminfo"})


class Hypervisor:
    """One modelled host serving its clients.

    Args:
        kernel: the host kernel (a fresh default one if omitted).
        secret: when set, every ``hello`` must present it.
    """

    def __init__(self, kernel: Kernel | None = None, *, secret: str | None = None):
        self.kernel = kernel or Kernel()
        self.secret = secret
        self.connections = 0
        self.failures: list[str] = []  # scheduler failures (deadlock, divergence)
        #: set by :meth:`discard`: connections closing from now on end without their processes' exits
        self.discarding = False
        self._idle = trio.Event()
        self._idle.set()

    def discard(self) -> None:
        """Nothing will look at this kernel again (an in-process host whose run has been judged): a
        connection that closes from now on ends without its process's exit (do_exit(), its page-table
        teardown and the scheduling decisions of its exit context), which nobody would observe."""
        self.discarding = True

    async def wait_idle(self) -> None:
        """Wait until every connection has closed and its process has exited."""
        await self._idle.wait()

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it closes; never raises for client misbehaviour."""
        conn = _Connection(self, wire.FramedStream(stream))
        self.connections += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            await conn.run()
        except Exception:  # noqa: BLE001 - a bug serving one connection must not take the host down
            log.exception("connection failed; closing it")
        finally:
            with trio.CancelScope(shield=True):
                await conn.cleanup()
                try:
                    await stream.aclose()
                except Exception:  # noqa: BLE001 - closing a broken stream
                    pass
            self._connection_gone()

    def open_direct(self, nursery: trio.Nursery) -> DirectChannel:
        """A connection served by direct calls (:class:`shared.rpc.DirectChannel`), for a client in
        this process: the same :class:`_Connection` (hello, roles, kernel contexts, errno replies,
        the process's exit when it closes) without a stream or a task per request. Once it closes
        and its requests in flight finish, its process's exit runs in a task started then in
        ``nursery``, as :meth:`serve`'s does; a connection with no exit to run (no process, or a
        discarded host) ends there and then, with no task at all."""
        conn = _Connection(self, None)
        assert conn.channel is not None
        self.connections += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        conn.channel.when_done(functools.partial(self._direct_done, nursery, conn))
        return conn.channel

    def _direct_done(self, nursery: trio.Nursery, conn: _Connection) -> None:
        """A direct connection has closed and its requests have finished: what :meth:`serve` does after
        its loop, in a task only when there is a process to exit."""
        task = conn.release()
        if task is not None:
            try:
                nursery.start_soon(self._exit_direct, conn, task)
                return
            except RuntimeError:  # the host's nursery is gone with its run: nobody will look at the exit
                pass
        self._connection_gone()

    async def _exit_direct(self, conn: _Connection, task: Task) -> None:
        try:
            with trio.CancelScope(shield=True):
                await conn.exit(task)
        except Exception:  # noqa: BLE001 - a bug serving one connection must not take the host down
            log.exception("connection failed; closing it")
        finally:
            self._connection_gone()

    def _connection_gone(self) -> None:
        self.connections -= 1
        if self.connections == 0:
            self._idle.set()


async def _in_kernel(k: Kernel, task: Task, call):
    """A syscall of ``task`` (arch/arm64/kernel/syscall.c el0_svc_common()): counted as inside the kernel
    until it returns, so that do_exit() (kernel/exit.c) waits for it rather than cutting it in half."""
    task.in_kernel += 1
    try:
        return await call
    finally:
        task.in_kernel -= 1
        if task.in_kernel == 0:
            k.sched.wake()


class _Connection:
    """One client connection: the hypervisor's policy plugged into :class:`shared.rpc.RequestLoop`.

    The loop reads, replies (coalesced) and shields (a kernel path runs to its
    end even if its client dies: no half-done faults, no leaks); this class
    decides what a request may do (hello, roles, attached vCPUs) and runs it as
    a kernel context. Under the free scheduler requests run inline in the
    reading task (one that never yields costs no task); under a controlled
    scheduler each runs in a task of its own, as the scheduler's decisions
    were pinned with.
    """

    def __init__(self, hv: Hypervisor, framed: wire.FramedStream | None):
        self.hv = hv
        self.framed = framed  # None: a direct connection (self.channel)
        self.role: str | None = None
        self.task: Task | None = None
        self.vcpus: dict = {}  # index -> Vcpu this guest connection attached
        self.seq = 0
        self.loop: RequestLoop | None = None
        self.channel: DirectChannel | None = None
        if framed is None:
            self.channel = DirectChannel(self._dispatch, max_outstanding=MAX_OUTSTANDING, name="hypervisor",
                                         shield=True, on_internal_error=self._internal_error,
                                         on_unencodable=self._unencodable)
        else:
            framed.limit_frames(MAX_FRAME_BEFORE_HELLO)  # raised by a successful hello
            self.loop = RequestLoop(framed, self._dispatch, max_outstanding=MAX_OUTSTANDING, name="hypervisor",
                                    inline=self._free, shield=True, on_internal_error=self._internal_error,
                                    on_unencodable=self._unencodable)

    @property
    def k(self) -> Kernel:
        return self.hv.kernel

    async def run(self) -> None:
        assert self.loop is not None
        await self.loop.run()

    def _free(self) -> bool:
        return self.hv.kernel.sched.kind == "free"

    def _internal_error(self, op, exc: Exception) -> tuple[int, str]:
        if isinstance(exc, (Deadlock, ScheduleDivergence)):
            self.hv.failures.append(f"{type(exc).__name__}: {exc}")
            return EDEADLK, f"{type(exc).__name__}: {exc}"
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.k.warn_once(f"internal error in {op}: {detail}")
        log.error("internal error in %s", op, exc_info=exc)
        return EIO, f"internal model error in {op}: {detail}"

    def _unencodable(self, detail: str) -> None:
        self.k.warn_once(f"internal error: unencodable reply: {detail}")

    async def _dispatch(self, op, args, ctx):
        if self.role is None and op != "hello":  # nothing but hello is examined before it
            raise KernelError(EPERM, f"{wire.brief(op)}: say hello first")
        a = validate_args(op, args)
        d = OPS[op]
        if op == "hello":
            return self._hello(a)
        if d.role != "any" and d.role != self.role:
            raise KernelError(EPERM, f"{op} is a {d.role} op; this connection is a {self.role}")
        if op == "boot":
            return self._boot(a)
        if self.task is not None and (self.task.sigkill or self.task.exiting):  # fatal_signal_pending()
            raise KernelError("ESRCH", f"{op}: process {self.task.pid} was killed")
        self.seq += 1
        if op == "vcpu-attach":
            return self._attach_vcpu(a["token"])
        k = self.k
        if op in OBSERVERS:  # oracles and statistics look; they are not kernel contexts
            result = await HOST_OPS[op](k, a)
        else:
            name = ctx if isinstance(ctx, str) and ctx else f"{self.task.name if self.task else self.role}#{self.seq}"
            if k.sched.kind == "free":  # its context() only names the actor: without an async context manager
                token = current_actor.set(name)
                try:
                    result = await self._run(k, op, a)
                finally:
                    current_actor.reset(token)
            else:
                async with k.sched.context(name):
                    result = await self._run(k, op, a)
        return result  # a value, or a Reply (an access's AccessResult) carrying a fault

    def _run(self, k: Kernel, op: str, a: dict):
        if self.role == "process":
            task = self.task
            assert task is not None
            return _in_kernel(k, task, PROCESS_OPS[op](k, task, a))
        if self.role == "vcpu":
            return VCPU_OPS[op](k, self._vcpu(a["vcpu"]), a)
        return HOST_OPS[op](k, a)

    def _attach_vcpu(self, token: str) -> dict:
        vcpu = self.k.kvm.vcpu_by_token(token)
        if vcpu.attached is not None and vcpu.attached is not self:
            raise KernelError("EBUSY", f"vCPU {vcpu.index} is already run by another guest connection")
        vcpu.attached = self
        self.vcpus[vcpu.index] = vcpu
        from hypervisor.kvm.kvm_host import kvm_has_mte

        return {"vcpu": vcpu.index, "vm": vcpu.kvm.handle, "mte": kvm_has_mte(self.k, vcpu.kvm)}

    def _vcpu(self, index: int):
        vcpu = self.vcpus.get(index)
        if vcpu is None:
            raise KernelError(EPERM, f"vCPU {index} is not attached to this connection (present its token)")
        if vcpu.kvm.destroyed:
            raise KernelError("ESRCH", f"vCPU {index}: its VM was destroyed")
        return vcpu

    def _hello(self, a: dict) -> dict:
        if self.role is not None:
            raise KernelError(EPERM, "hello: already introduced")
        if self.hv.secret is not None and not hmac.compare_digest(  # as bytes: str must be ASCII there
                (a["secret"] or "").encode("utf-8", "surrogatepass"), self.hv.secret.encode("utf-8", "surrogatepass")):
            raise KernelError(EPERM, "hello: wrong or missing secret")
        if a["role"] in ("host", "vcpu"):
            self.role = a["role"]
            self._unlimit()
            return {"role": a["role"]}
        if a["attach"] is not None:
            task = next((t for t in self.k.tasks.values() if t.fork_token == a["attach"] and not t.attached), None)
            if task is None:
                raise KernelError("ESRCH", "hello: no unattached child holds that token")
        else:
            task = self.k.create_task(a["name"] or "", a["session"])
        task.attached = True
        task.fork_token = None
        task.on_kill = self._close
        self.task = task
        self.role = "process"
        self._unlimit()
        return {"role": "process", "pid": task.pid}

    def _unlimit(self) -> None:
        if self.framed is not None:
            self.framed.limit_frames(None)

    def _boot(self, a: dict) -> dict:
        if any(t.attached for t in self.k.tasks.values()):
            raise KernelError("EBUSY", "boot: processes are still attached to this host")
        try:
            self.hv.kernel = Kernel(mte=a["mte"], ram=a["ram"], swap=a["swap"], bugs=a["bugs"],
                                    sched=self.k.sched, tcf_preferred=a["tcf_preferred"],
                                    kernel_fixes=a["kernel_fixes"], fault_replay_limit=a["fault_replay_limit"],
                                    physmem=a["physmem"])
        except ValueError as exc:
            raise KernelError("EINVAL", f"boot: {exc}") from None
        return {"booted": True}

    async def _close(self) -> None:
        """The process was killed: close its connection (reading stops; requests in flight finish)."""
        if self.channel is not None:
            self.channel.close()
            return
        assert self.framed is not None
        try:
            await self.framed.stream.aclose()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass

    async def cleanup(self) -> None:
        """The connection has closed: it lets go of its vCPUs, and its process exits."""
        task = self.release()
        if task is not None:
            await self.exit(task)

    def release(self) -> Task | None:
        """Let go of the vCPUs this connection attached; returns its process, which is to exit now
        (None: no process, or a discarded host, whose processes are left as they are)."""
        for vcpu in self.vcpus.values():
            if vcpu.attached is self:
                vcpu.attached = None
        self.vcpus.clear()
        task, self.task = self.task, None
        return None if self.hv.discarding else task

    async def exit(self, task: Task) -> None:
        """do_exit() of the connection's process, and of the children it forked and nobody attached
        (they die with their parent's connection), each as a kernel context."""
        orphans = [t for t in self.k.tasks.values() if t.parent == task.pid and not t.attached]
        for t in [task, *orphans]:
            try:
                async with self.k.sched.context(f"exit:{t.name}:{t.pid}"):
                    await do_exit(self.k, t)
            except Exception:  # noqa: BLE001
                log.exception("exit of pid %s failed", t.pid)
