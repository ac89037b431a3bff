"""How the orchestrator reaches a modelled host: a hypervisor process, or one in-process.

Both kinds hand out :class:`shared.wire.Client` connections speaking the same
msgpack protocol; only the byte stream differs:

* :class:`ProcessHost` starts ``python -m hypervisor`` on a private Unix socket
  (0600, secret passed in the environment) or connects to a running one
  (``--host ADDR``).
* :class:`InProcessHost` runs the :class:`~hypervisor.server.Hypervisor` in the
  caller's ``trio.run`` and connects through ``trio.testing.memory_stream_pair``.
  Controlled schedulers need this: one process, one event loop, one driver.

Both are :class:`shared.transport.Connector`\\ s (connect + hello, the code
the VMM and guest processes use too) with the small interface the runner
asks of any host (:class:`HostLink`). VMMs are driven through a
:class:`VmmLink`: :class:`ProcessVmm` (``python -m vmm``), or
:class:`InProcessVmm`, which puts a :class:`vmm.machine.Vmm` and its
:class:`guest.agent.GuestAgent` in this run: the harness joins them, since
``vmm/`` and ``guest/`` import only ``shared/``.

Nothing outlives its run: every process started here (the private
hypervisor, the VMMs) gets this process's lifeline (:mod:`shared.lifeline`,
``--lifeline-fd``) and its private folder (``--remove-dir``), so if this
process dies, by any signal, each child shuts down and removes its folder by
itself. A hypervisor or VMM that dies mid-run surfaces from the links' calls
as :class:`HostDied`, with a one-line message saying which process died and
how.
"""

from __future__ import annotations

import inspect
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref

import trio
import trio.testing

from hypervisor.kernel import Kernel
from hypervisor.sched import ControlledScheduler, Scheduler
from hypervisor.server import Hypervisor
from shared import lifeline
from shared.abi import validate_args
from shared.control import VMM_CONTROL
from shared.rpc import DirectChannel
from shared.transport import Connector, ExplainedClient, PeerLost, open_connection, unreachable
from shared.wire import Client


class HostStartError(Exception):
    """The hypervisor process could not be started or reached."""


class HostDied(HostStartError, PeerLost):
    """A hypervisor or VMM process died (or closed its connection) mid-run; the message is one line.

    It is a :class:`HostStartError` (the infrastructure failed) and a
    :class:`shared.transport.PeerLost`, so a
    :class:`shared.wire.ConnectionClosed` (code that handles a closed
    connection keeps working).
    """


#: Seconds a link waits for a process whose connection closed to be reaped (to say how it died).
REAP_WAIT = 2.0
#: Private hypervisors by address, so a VMM link whose VMM died can tell whether its host died first.
_PRIVATE_HOSTS: weakref.WeakValueDictionary[str, ProcessHost] = weakref.WeakValueDictionary()


def describe_status(returncode: int) -> str:
    """``killed by SIGKILL`` / ``exited with status N``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


async def _reaped_status(process: trio.Process | None) -> str | None:
    """How ``process`` ended, waiting up to :data:`REAP_WAIT` for it; ``None`` if it still runs."""
    if process is None:
        return None
    with trio.move_on_after(REAP_WAIT):
        await process.wait()
    return None if process.returncode is None else describe_status(process.returncode)


class ChildLog:
    """A child's stderr file, readable even after the child has removed its folder (we keep it open)."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> str:
        """Everything the child wrote so far."""
        if self._fd is None:
            return ""
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = os.pread(self._fd, 1 << 16, offset)
            if not chunk:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(chunk)
            offset += len(chunk)

    def last_line(self) -> str:
        """The last non-empty line the child wrote, or ``""``."""
        lines = self.read().strip().splitlines()
        return lines[-1].strip() if lines else ""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def with_lifeline(cmd: list[str], folder: str | None = None) -> tuple[list[str], tuple[int, ...]]:
    """``cmd`` plus ``--lifeline-fd N`` (and ``--remove-dir FOLDER``), and the fds to pass down."""
    fd = lifeline.child_fd()
    extra = ["--lifeline-fd", str(fd)] + (["--remove-dir", folder] if folder else [])
    return cmd + extra, (fd,)


async def start_listening_process(cmd: list[str], env: dict, *, timeout: float = 30,
                                  log_path: str | None = None, log: ChildLog | None = None,
                                  pass_fds: tuple[int, ...] = ()) -> tuple[trio.Process, str]:
    """Start a server process and wait for its ``listening on ADDR`` line.

    Its stderr goes to ``log`` (or a new :class:`ChildLog` at ``log_path``)
    when given (read back to explain a failed start), else to ours.

    Returns:
        The process and the address it announced.

    Raises:
        HostStartError: it exited or did not announce an address in time.
    """
    own_log = None
    if log is None and log_path:
        log = own_log = ChildLog(log_path)
    try:
        return await _start_listening(cmd, env, timeout, log, pass_fds)
    finally:
        if own_log is not None:
            own_log.close()


async def _start_listening(cmd: list[str], env: dict, timeout: float, log: ChildLog | None,
                           pass_fds: tuple[int, ...]) -> tuple[trio.Process, str]:
    err = open(log.path, "ab") if log is not None else None
    try:
        process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=err, env=env,
                                                   pass_fds=pass_fds)
    finally:
        if err is not None:
            err.close()  # the child has its own descriptor
    stdout = process.stdout
    assert stdout is not None  # opened with stdout=PIPE
    line = b""
    try:
        with trio.move_on_after(timeout):
            while not line.endswith(b"\n"):
                chunk = await stdout.receive_some(1)
                if not chunk:
                    break
                line += chunk
    except BaseException:  # cancelled or interrupted while it starts: it must not outlive the attempt
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            await stdout.aclose()
        raise
    if not line.startswith(b"listening on "):
        await stop_process(process)
        why = log.read() if log is not None else ""
        last = why.strip().splitlines()[-1:] or [f"said {line!r}"]
        raise HostStartError(f"{' '.join(cmd[1:3])} did not start: {last[0]}")
    return process, line.decode().split(" ", 2)[2].strip()


async def stop_process(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after 5 s; close its stdout pipe."""
    process.terminate()
    with trio.move_on_after(5):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()


class HostLink(Connector):
    """A modelled host the orchestrator can open connections to (:meth:`connect` says hello).

    Calls on a connection whose host went away raise :class:`HostDied`. What
    the runner asks of a host, whatever its kind, is this class's methods: it
    never looks inside a link.
    """

    lost_error = HostDied

    async def start(self) -> None:
        """Make the host ready (start its process, or its scheduler's driver)."""

    def discard(self) -> None:
        """The run has been judged and this host ends with it: skip work nobody will observe (only an
        in-process host does so: :meth:`InProcessHost.discard`)."""

    async def stop(self) -> None:
        """Let the host finish its work and release it (idempotent)."""

    def vmm_link(self, name: str, session: str | None) -> VmmLink:
        """A link (not started yet) to a new VMM for the VM ``name`` on this host."""
        raise NotImplementedError

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler of an in-process host (``None`` for a process: its own, out of reach)."""
        return None

    @property
    def transport(self) -> str:
        """How the host is reached: ``tcp`` (a VMM migrating to it uses TCP too) or ``unix``."""
        return "tcp" if isinstance(self.address, str) and self.address.startswith("tcp:") else "unix"

    def schedule(self) -> str:
        """The run's schedule so far (empty unless the host runs under a controlled scheduler)."""
        return self.scheduler.schedule if self.scheduler is not None else ""

    def failures(self) -> list[str]:
        """The scheduler's failures (deadlock, divergence), one line each; ``[]`` for a process host."""
        return []


class InProcessHost(HostLink):
    """A hypervisor in this trio run, reached through in-memory streams.

    Args:
        nursery: where the hypervisor's connections and the scheduler's driver run.
        kernel: the modelled host kernel (:meth:`boot` builds one).
        direct: connections are :class:`shared.rpc.DirectChannel`\\ s
            (:meth:`~hypervisor.server.Hypervisor.open_direct`: the server's own dispatch,
            called in the caller's task, no stream and no task per request); false: msgpack
            over in-memory streams served by :meth:`~hypervisor.server.Hypervisor.serve`.
            Both give the same schedules, outcomes and violations (tests/unit/mtekvm/test_direct.py).
    """

    def __init__(self, nursery: trio.Nursery, kernel: Kernel, *, drive: bool = True, migration=None,
                 direct: bool = False, vmm_direct: bool | None = None):
        super().__init__(nursery)
        self.hv = Hypervisor(kernel)
        self.drive = drive
        self.migration = migration
        self.direct = direct
        self.vmm_direct = direct if vmm_direct is None else vmm_direct

    @classmethod
    def boot(cls, nursery: trio.Nursery, sched: Scheduler, *, drive: bool = True, pid_base: int | None = None,
             migration=None, direct: bool = False, vmm_direct: bool | None = None, **kernel_args) -> InProcessHost:
        """A host whose kernel boots with ``kernel_args`` (mte, ram, swap, bugs, boot extras) under ``sched``.

        Several in-process hosts of one run share one scheduler (one driver: ``drive`` on exactly
        one of them), so that every host's contexts interleave under one policy. ``pid_base``: the
        first pid this kernel hands out (each host of a run gets its own range, so that kernel
        contexts named after a pid, such as a process's exit, never meet one of another host's
        under the shared scheduler). ``migration``: how this host's VMMs make their migration
        transport (:func:`in_process_migration`). ``vmm_direct``: the VMMs' control and guest
        channels are direct too (default: as ``direct``).

        Raises:
            TypeError: an argument this build's kernel does not take.
        """
        kernel = Kernel(sched=sched, **kernel_args)
        if pid_base is not None:
            kernel._pids = itertools.count(pid_base)  # the model's pid allocator (Kernel.create_task)
        return cls(nursery, kernel, drive=drive, migration=migration, direct=direct, vmm_direct=vmm_direct)

    @property
    def scheduler(self) -> Scheduler:
        """The kernel's scheduler."""
        return self.hv.kernel.sched

    async def start(self) -> None:
        """Start the controlled scheduler's driver, if there is one and this host drives it."""
        if self.drive and isinstance(self.scheduler, ControlledScheduler):
            self.scheduler.start_driver(self.nursery)

    def discard(self) -> None:
        """The kernel dies with the run: its processes' connections close without their exits
        (:meth:`hypervisor.server.Hypervisor.discard`)."""
        self.hv.discard()

    @property
    def idle(self) -> bool:
        """Every connection has ended, its process's exit included (:meth:`stop` would return at once)."""
        return self.hv.connections == 0

    async def stop(self, timeout: float = 60) -> None:
        """Wait (up to ``timeout`` seconds) until the hypervisor is idle: exits run as kernel
        contexts, so the scheduler's driver must outlive them."""
        with trio.move_on_after(timeout):
            await self.hv.wait_idle()

    def vmm_link(self, name: str, session: str | None) -> VmmLink:
        """An in-process VMM (and guest) on this hypervisor."""
        return InProcessVmm(self.nursery, self, name, session, migration=self.migration, direct=self.vmm_direct)

    def failures(self) -> list[str]:
        """What the hypervisor recorded of its scheduler's failures."""
        return list(self.hv.failures)

    async def connect(self, role: str, **hello) -> tuple[Client, dict]:
        """A connection introduced with ``hello``: direct (see ``direct``), or over an in-memory stream.

        Raises:
            shared.wire.RemoteError: hello was refused (the connection is closed).
        """
        if not self.direct:
            return await super().connect(role, **hello)
        client = self.hv.open_direct(self.nursery)
        try:
            reply = await client.call("hello", {"role": role, "secret": self.secret, **hello})
        except BaseException:  # refused or cancelled: the connection is of no use
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        return client, reply.value

    async def open_stream(self) -> trio.abc.Stream:
        """One end of an in-memory stream; the hypervisor serves the other."""
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.hv.serve, server_end)
        return client_end


class ProcessHost(HostLink):
    """A ``python -m hypervisor`` process: started privately, or already running at ``address``."""

    def __init__(self, nursery: trio.Nursery, *, address: str | None = None, secret: str | None = None,
                 mte: bool = True, ram: int = 256 << 20, swap: int = 64 << 20, bugs=(), listen: str = "unix"):
        super().__init__(nursery, address, secret)
        if listen not in ("unix", "tcp"):
            raise ValueError(f"listen must be 'unix' or 'tcp' (got {listen!r})")
        self._args = (mte, ram, swap, tuple(bugs))
        self.listen = listen  # a private hypervisor: on a 0600 Unix socket, or on TCP loopback (any free port)
        self.process: trio.Process | None = None
        self.folder: str | None = None  # the private hypervisor's folder (it removes it itself if we die)
        self.log: ChildLog | None = None

    async def start(self) -> None:
        """Start the private hypervisor process (unless an address was given).

        The process gets our lifeline and its folder to remove: if we die, it
        exits and removes the folder on its own. It listens on a Unix socket in
        that folder, or (``listen = "tcp"``) on a free TCP port of 127.0.0.1;
        either way with a fresh secret.

        Raises:
            HostStartError: it exited or never said it was listening.
        """
        if self.address is not None:
            return
        mte, ram, swap, bugs = self._args
        self.folder = tempfile.mkdtemp(prefix="mtekvm-")
        path = os.path.join(self.folder, "hv.sock")
        self.secret = secrets.token_hex(16)
        where = f"unix:{path}" if self.listen == "unix" else "tcp:127.0.0.1:0"  # TCP: the secret is required
        cmd = [sys.executable, "-m", "hypervisor", "--listen", where, "--ram", str(ram), "--swap", str(swap)]
        if not mte:
            cmd.append("--no-mte")
        for b in bugs:
            cmd += ["--bug", b]
        cmd, fds = with_lifeline(cmd, self.folder)
        env = dict(os.environ, MTEKVM_SECRET=self.secret)
        try:
            self.log = ChildLog(os.path.join(self.folder, "hypervisor.log"))
            self.process, self.address = await start_listening_process(cmd, env, log=self.log, pass_fds=fds)
        except BaseException as exc:  # interrupted too: the folder must not outlive the attempt
            self._cleanup()
            if isinstance(exc, OSError):
                raise HostStartError(f"cannot start the hypervisor: {exc}") from None
            raise
        _PRIVATE_HOSTS[self.address] = self

    async def open_stream(self) -> trio.abc.Stream:
        """A connection to the hypervisor's socket.

        Raises:
            HostStartError: nobody listens there.
        """
        if self.address is None:
            raise HostStartError("the hypervisor has not started")
        try:
            return await open_connection(self.address)
        except OSError as exc:
            raise HostStartError(f"cannot reach the hypervisor at {self.address}: {exc}") from None

    async def why_lost(self) -> str | None:
        """The private hypervisor's death (how it ended, its last words), or that the host at ADDR went away."""
        if self.process is not None:
            how = await _reaped_status(self.process)
            if how is not None:
                last = self.log.last_line() if self.log is not None else ""
                return f"the hypervisor (pid {self.process.pid}) died: {how}" + (f": {last}" if last else "")
        return await super().why_lost()

    def vmm_link(self, name: str, session: str | None) -> VmmLink:
        """A ``python -m vmm`` process connecting to this hypervisor."""
        assert self.address is not None, "the host is not started"
        return ProcessVmm(self.nursery, self.address, self.secret, name, session)

    async def stop(self) -> None:
        """Stop the private hypervisor process (if we started it) and remove its folder."""
        if self.process is not None:
            await stop_process(self.process)
            self.process = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# ---- VMMs: one per VM, driven through VMM_CONTROL ----------------------------------------

from guest.agent import GuestAgent  # noqa: E402 - the VMM side, after the host side
from shared.control import EXIT_CHANNEL, GUEST_CHANNEL  # noqa: E402
from vmm.guestlink import GuestHandle, GuestLauncher, InProcessGuests, OnExit, ServeExits  # noqa: E402
from vmm.machine import Vmm  # noqa: E402


class _DirectGuest(GuestHandle):
    """An in-process guest reached through :class:`shared.rpc.DirectChannel`\\ s (see :class:`DirectGuests`)."""

    def __init__(self, name: str):
        super().__init__(name, DirectChannel(self._unset, name="guest"))
        self._scope = trio.CancelScope()
        self._killed = False
        self._requests: set[trio.CancelScope] = set()  # one per request in flight on either channel

    @staticmethod
    async def _unset(op, args, ctx):
        raise RuntimeError("the guest's channel has no server yet")

    def serving(self, table, handler):
        """A dispatch running ``handler`` on requests validated against ``table`` (as ``serve_requests``
        does), each in a cancel scope that the guest's death cancels."""

        async def dispatch(op, args, ctx):
            with trio.CancelScope() as scope:
                self._requests.add(scope)
                try:
                    return await handler(op, validate_args(op, args, table), ctx)
                finally:
                    self._requests.discard(scope)
            return None  # cancelled: the guest died and closed both channels, so the caller gets ConnectionClosed

        return dispatch

    async def kill(self) -> None:
        self._killed = True
        self._scope.cancel()
        await self.died.wait()

    async def run(self, exits: DirectChannel, hv: Client, on_exit: OnExit, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The guest's life: until the VMM closes its channel (exit 0) or it is killed; then, as
        ``vmm.guestlink``'s in-process guest, its connections close and ``on_exit`` runs."""
        channel = self.client
        assert isinstance(channel, DirectChannel)
        try:
            with self._scope:
                task_status.started()
                await channel.wait_closed()
        finally:
            channel.close("the guest has exited")
            exits.close("the guest has exited")
            for scope in list(self._requests):
                scope.cancel()
            await _close_quietly(hv)
            self.detail = "killed by SIGKILL" if self._killed else "exited with status 0"
            self.died.set()
        await on_exit(self)


class DirectGuests(GuestLauncher):
    """:class:`vmm.guestlink.InProcessGuests` with direct channels: the VMM's GUEST_CHANNEL requests
    run the agent's handler, and the guest's EXIT_CHANNEL requests the VMM's, in the caller's task
    (:class:`shared.rpc.DirectChannel`; no streams, no serving tasks). Killing the guest cancels
    the requests in flight on both channels and closes them, as cancelling its tasks closes its
    streams. ``vmm`` is set once the :class:`~vmm.machine.Vmm` that owns the launcher exists.
    """

    def __init__(self, nursery: trio.Nursery, connect, agent):
        super().__init__(nursery)
        self.connect = connect
        self.agent = agent
        self.vmm: Vmm | None = None

    async def start(self, name: str, serve_exits: ServeExits, on_exit: OnExit) -> GuestHandle:
        """Start a guest agent for VM ``name`` (see :meth:`GuestLauncher.start`)."""
        assert self.vmm is not None
        hv, _ = await self.connect("vcpu", name=f"guest:{name}")
        guest = _DirectGuest(name)
        exits = DirectChannel(guest.serving(EXIT_CHANNEL, self.vmm._handle_exit), name=f"vmm:{name}:exits")
        agent = self.agent(hv, exits)
        assert isinstance(guest.client, DirectChannel)
        guest.client.dispatch = guest.serving(GUEST_CHANNEL, agent.handle)
        await self.nursery.start(guest.run, exits, hv, on_exit)
        return guest


def in_process_migration():
    """How in-process VMMs make their migration transport: ``factory(nursery, secret)`` ->
    ``vmm.migration.InProcessTransport`` (``listen(handler) -> "mem:N"``, ``dial(address, secret)
    -> stream``; the addresses of every in-process VMM meet in one registry, and an accepted
    connection runs in the listening VMM's nursery, so it dies with that VMM), or ``None`` in a
    build without one (a ``migrate`` step then fails in the VMM)."""
    try:
        from vmm.migration import InProcessTransport
    except ImportError:
        return None
    return InProcessTransport


async def _close_quietly(client: Client) -> None:
    """Close a connection, ignoring one that is already broken."""
    with trio.CancelScope(shield=True):
        try:
            await client.aclose()
        except Exception:  # noqa: BLE001 - closing something broken
            pass


class VmmLink:
    """A VMM the orchestrator drives through its control channel (:data:`shared.control.VMM_CONTROL`).

    Args:
        nursery: where the link's background tasks run.
        name: the VM's name (the VMM is the host process ``vmm:NAME``).
        session: the scenario's session.
    """

    def __init__(self, nursery: trio.Nursery, name: str, session: str | None):
        self.nursery = nursery
        self.name = name
        self.session = session

    async def start(self) -> None:
        """Start the VMM (it connects to the hypervisor).

        Raises:
            HostStartError: the VMM could not be started or reach the hypervisor.
        """
        raise NotImplementedError

    async def connect(self) -> Client:
        """Open a control connection; returns a client with its receive loop running."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Shut the VMM down (VM destroyed, guest stopped); idempotent."""
        raise NotImplementedError

    async def check_alive(self) -> None:
        """Raise :class:`HostDied` if the VMM or the hypervisor under it has died (an error reply
        may be the first sign of that: a guest that lost its hypervisor answers ESRCH)."""

    async def kill(self) -> None:
        """SIGKILL the VMM: it stops at once, without a shutdown (the hypervisor sees its
        connections close and exits the process: its VM destroyed, its memory freed). Returns once
        the VMM is dead; idempotent."""
        raise NotImplementedError


class InProcessVmm(VmmLink):
    """A :class:`vmm.machine.Vmm` in this trio run, with an in-process guest.

    Args:
        nursery: where the VMM runs.
        host: the hypervisor (its ``connect`` gives the VMM's and the guest's connections).
        name: the VM's name.
        session: the scenario's session.
        copy_chunk: passed to :class:`~vmm.machine.Vmm` when given.
        migration: ``factory(nursery, secret)`` -> the VMM's migration transport, or None.
        direct: control connections are :class:`shared.rpc.DirectChannel`\\ s (a request runs
            the VMM's handler in the caller's task, validated against ``VMM_CONTROL`` as
            ``Vmm.serve`` does; killing or stopping the VMM cancels the requests in flight and
            closes the connections, as cancelling its tasks closes its streams); false: msgpack
            over in-memory streams served by ``Vmm.serve``.
    """

    def __init__(self, nursery: trio.Nursery, host: HostLink, name: str, session: str | None, *,
                 copy_chunk: int | None = None, migration=None, direct: bool = False):
        super().__init__(nursery, name, session)
        self.host = host
        self.copy_chunk = copy_chunk
        self.migration = migration
        self.direct = direct
        self._controls: list[DirectChannel] = []  # the direct control connections
        self._requests: set[trio.CancelScope] = set()  # one per direct control request in flight
        self.vmm: Vmm | None = None
        self.dead = False
        self._inner: trio.Nursery | None = None
        self._hv_clients: list[Client] = []  # every hypervisor connection of the VMM and its guest

    async def _connect(self, role: str, **hello):
        """The host's ``connect``, remembering the connection (to close it if the VMM is killed)."""
        client, reply = await self.host.connect(role, **hello)
        self._hv_clients.append(client)
        if self.dead:  # opened while being killed: a dead process holds no connection
            await _close_quietly(client)
        return client, reply

    async def start(self) -> None:
        """Start the VMM's tasks and connect it to the hypervisor.

        Raises:
            vmm.machine.VmmError: the hypervisor could not be reached.
            shared.wire.RemoteError: the hypervisor refused the VMM's hello.
        """
        await self.nursery.start(self._run)

    async def _run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as inner:
            self._inner = inner
            extra: dict = {} if self.copy_chunk is None else {"copy_chunk": self.copy_chunk}
            accepted = inspect.signature(Vmm).parameters
            if "migration" in accepted and self.migration is not None:
                extra["migration"] = self.migration(inner, self.host.secret)
            if "die" in accepted:
                extra["die"] = self.kill
            guests: GuestLauncher = (DirectGuests(inner, self._connect, GuestAgent) if self.direct
                                     else InProcessGuests(inner, self._connect, GuestAgent))
            self.vmm = Vmm(self._connect, guests, name=self.name, session=self.session, **extra)
            if isinstance(guests, DirectGuests):
                guests.vmm = self.vmm
            await self.vmm.start()
            task_status.started()
            await trio.sleep_forever()  # stop() or kill() cancels

    async def connect(self) -> Client:
        """A control connection: direct (see ``direct``), or over an in-memory stream."""
        if self._inner is None or self.vmm is None:
            raise RuntimeError(f"VMM {self.name} has not started")
        if self.direct:
            channel = DirectChannel(self._serve_direct, name=f"vmm:{self.name}")
            self._controls.append(channel)
            return channel
        client_end, server_end = trio.testing.memory_stream_pair()
        self._inner.start_soon(self.vmm.serve, server_end)
        client = Client(client_end)
        await self._inner.start(client.run)
        return client

    async def _serve_direct(self, op, args, ctx):
        """One request of a direct control connection, as ``Vmm.serve`` runs one (validated against
        VMM_CONTROL), in a cancel scope that :meth:`_drop_controls` cancels (the VMM died)."""
        vmm = self.vmm
        assert vmm is not None
        with trio.CancelScope() as scope:
            self._requests.add(scope)
            try:
                return await vmm._handle(op, validate_args(op, args, VMM_CONTROL), ctx)
            finally:
                self._requests.discard(scope)
        return None  # cancelled by _drop_controls, which closed the connection first: the caller gets ConnectionClosed

    def _drop_controls(self, why: str) -> None:
        """The VMM's tasks are gone: its direct control connections close and their requests stop."""
        for channel in self._controls:
            channel.close(why)
        self._controls.clear()
        for scope in list(self._requests):
            scope.cancel()

    async def stop(self) -> None:
        """Shut the VMM down, then cancel its tasks (control clients see their connection close)."""
        if self.vmm is not None and not self.dead:
            await self.vmm.shutdown()
        self._drop_controls(f"the VMM {self.name} has stopped")
        if self._inner is not None:
            self._inner.cancel_scope.cancel()
            self._inner = None

    async def kill(self) -> None:
        """Kill the VMM as SIGKILL would: close its and its guest's hypervisor connections without
        a shutdown (the hypervisor exits the process), cancel its tasks (control clients and the
        migration peer see their connections close). Called by the VMM itself too (its ``die``,
        for fault injection): then the calling task is cancelled as the process would vanish."""
        if self.dead:
            return
        self.dead = True
        inner, self._inner = self._inner, None
        for client in self._hv_clients:
            await _close_quietly(client)
        self._drop_controls(f"the VMM {self.name} was killed")
        if inner is not None:
            inner.cancel_scope.cancel()


class ProcessVmm(VmmLink):
    """A ``python -m vmm`` process on a private Unix socket.

    Args:
        nursery: where control clients' receive loops run.
        address: the hypervisor's address.
        secret: the hypervisor's secret (passed in ``MTEKVM_SECRET``), or ``None``.
        name: the VM's name.
        session: the scenario's session.
    """

    def __init__(self, nursery: trio.Nursery, address: str, secret: str | None, name: str,
                 session: str | None):
        super().__init__(nursery, name, session)
        self.hv_address = address
        self.secret = secret
        self.address: str | None = None
        self.process: trio.Process | None = None
        self.log_path: str | None = None
        self.folder: str | None = None  # the VMM's folder (it removes it itself if we die)
        self._log: ChildLog | None = None
        self._final_log = ""  # what the log held when the link stopped

    async def start(self) -> None:
        """Start the VMM process and wait until it listens.

        The VMM gets our lifeline and its folder to remove: if we die, it shuts
        down (VM destroyed, guest stopped) and removes the folder on its own.

        Raises:
            HostStartError: it exited (e.g. could not reach the hypervisor) or never said it was listening.
        """
        self.folder = tempfile.mkdtemp(prefix="mtekvm-vmm-")
        path = os.path.join(self.folder, "vmm.sock")
        self.log_path = os.path.join(self.folder, "vmm.log")
        cmd = [sys.executable, "-m", "vmm", "--hypervisor", self.hv_address, "--listen", f"unix:{path}",
               "--name", self.name]
        if self.session is not None:
            cmd += ["--session", self.session]
        cmd, fds = with_lifeline(cmd, self.folder)
        env = {k: v for k, v in os.environ.items() if k != "MTEKVM_SECRET"}
        if self.secret is not None:
            env["MTEKVM_SECRET"] = self.secret
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._log = ChildLog(self.log_path)
            self.process, self.address = await start_listening_process(cmd, env, log=self._log, pass_fds=fds)
        except BaseException as exc:  # interrupted too: the folder must not outlive the attempt
            self._cleanup()
            if isinstance(exc, OSError):
                raise HostStartError(f"cannot start the VMM of {self.name}: {exc}") from None
            raise

    def log(self) -> str:
        """What the VMM process (and its guest) wrote to stderr so far (also after it removed its folder)."""
        return self._log.read() if self._log is not None else self._final_log

    async def why_lost(self) -> str:
        """Why the control channel broke: the hypervisor under the VMM died, or the VMM itself did."""
        if await unreachable(self.hv_address) is not None:
            host = _PRIVATE_HOSTS.get(self.hv_address)
            why = await host.why_lost() if host is not None else None
            if why is not None:
                return why
            return f"the hypervisor at {self.hv_address} is gone: {await unreachable(self.hv_address)}"
        how = await _reaped_status(self.process)
        pid = self.process.pid if self.process is not None else "?"
        if how is None:
            return f"the VMM of {self.name} (pid {pid}) closed its control channel"
        last = self._log.last_line() if self._log is not None else ""
        return f"the VMM of {self.name} (pid {pid}) died: {how}" + (f": {last}" if last else "")

    async def check_alive(self) -> None:
        """Raise :class:`HostDied` if the hypervisor is unreachable or the VMM process has exited."""
        if await unreachable(self.hv_address) is not None or (
                self.process is not None and self.process.poll() is not None):
            raise HostDied(await self.why_lost())

    async def connect(self) -> Client:
        """A control connection to the VMM's socket (the VMM exits once its last one closes).

        Raises:
            HostStartError: the VMM is not listening (it exited).
        """
        if self.address is None:
            raise HostStartError(f"VMM {self.name} has not started")
        try:
            stream = await open_connection(self.address)
        except OSError as exc:
            raise HostStartError(f"cannot reach the VMM at {self.address}: {exc}") from None
        client = ExplainedClient(stream, self.why_lost, HostDied)
        await self.nursery.start(client.run)
        return client

    async def kill(self) -> None:
        """SIGKILL the VMM process and reap it (its guest follows it through its lifeline)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()

    async def stop(self) -> None:
        """Ask for a shutdown, wait for the process to exit (SIGTERM, then SIGKILL if it does not)."""
        from shared.wire import RemoteError, WireError

        if self.process is not None:
            if self.process.returncode is None:
                with trio.move_on_after(15):
                    try:
                        client = await self.connect()
                        try:
                            await client.call("shutdown")
                        finally:
                            await client.aclose()
                    except (HostStartError, RemoteError, WireError, OSError):
                        pass
                    await self.process.wait()
            await stop_process(self.process)
            self.process = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._final_log = self._log.read()
            self._log.close()
            self._log = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
