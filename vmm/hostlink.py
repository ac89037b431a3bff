"""How the orchestrator reaches a modelled host: a hypervisor process, or one in-process.

Both kinds hand out :class:`shared.wire.Client` connections speaking the same
msgpack protocol; only the byte stream differs:

* :class:`ProcessHost` starts ``python -m hypervisor`` on a private Unix socket
  (0600, secret passed in the environment) or connects to a running one
  (``--host ADDR``).
* :class:`InProcessHost` runs the :class:`~hypervisor.server.Hypervisor` in the
  caller's ``trio.run`` and connects through ``trio.testing.memory_stream_pair``.
  Controlled schedulers need this: one process, one event loop, one driver.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile

import trio
import trio.testing

from hypervisor.kernel import Kernel
from hypervisor.listen import open_connection
from hypervisor.sched import ControlledScheduler, Scheduler
from hypervisor.server import Hypervisor
from shared.wire import Client


class HostStartError(Exception):
    """The hypervisor process could not be started or reached."""


async def start_listening_process(cmd: list[str], env: dict, *, timeout: float = 30,
                                  log_path: str | None = None) -> tuple[trio.Process, str]:
    """Start a server process and wait for its ``listening on ADDR`` line.

    Its stderr goes to ``log_path`` when given (read back to explain a failed
    start), else to ours.

    Returns:
        The process and the address it announced.

    Raises:
        HostStartError: it exited or did not announce an address in time.
    """
    log = open(log_path, "wb") if log_path else None
    try:
        process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    finally:
        if log is not None:
            log.close()  # the child has its own descriptor
    line = b""
    with trio.move_on_after(timeout):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"listening on "):
        await stop_process(process)
        why = ""
        if log_path and os.path.exists(log_path):
            with open(log_path, errors="replace") as f:
                why = f.read()
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


class HostLink:
    """A modelled host the orchestrator can open connections to."""

    def __init__(self, nursery: trio.Nursery):
        self.nursery = nursery

    async def _stream(self) -> trio.abc.Stream:
        raise NotImplementedError

    async def connect(self, role: str, **hello) -> tuple[Client, dict]:
        """Open a connection and introduce it; returns the client and hello's reply.

        Raises:
            shared.wire.RemoteError: hello was refused.
        """
        stream = await self._stream()
        client = Client(stream)
        await self.nursery.start(client.run)
        reply = await client.call("hello", {"role": role, "secret": self.secret, **hello})
        return client, reply.value

    secret: str | None = None


class InProcessHost(HostLink):
    """A hypervisor in this trio run, reached through in-memory streams."""

    def __init__(self, nursery: trio.Nursery, kernel: Kernel):
        super().__init__(nursery)
        self.hv = Hypervisor(kernel)

    @property
    def sched(self) -> Scheduler:
        return self.hv.kernel.sched

    async def start(self) -> None:
        """Start the controlled scheduler's driver, if there is one."""
        if isinstance(self.sched, ControlledScheduler):
            await self.nursery.start(self.sched.run_driver)

    async def _stream(self) -> trio.abc.Stream:
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.hv.serve, server_end)
        return client_end


class ProcessHost(HostLink):
    """A ``python -m hypervisor`` process: started privately, or already running at ``address``."""

    def __init__(self, nursery: trio.Nursery, *, address: str | None = None, secret: str | None = None,
                 mte: bool = True, ram: int = 256 << 20, swap: int = 64 << 20, bugs=()):
        super().__init__(nursery)
        self.address = address
        self.secret = secret
        self._args = (mte, ram, swap, tuple(bugs))
        self.process: trio.Process | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    async def start(self) -> None:
        """Start the private hypervisor process (unless an address was given).

        Raises:
            HostStartError: it exited or never said it was listening.
        """
        if self.address is not None:
            return
        mte, ram, swap, bugs = self._args
        self._tmp = tempfile.TemporaryDirectory(prefix="mtekvm-")
        path = os.path.join(self._tmp.name, "hv.sock")
        self.secret = secrets.token_hex(16)
        cmd = [sys.executable, "-m", "hypervisor", "--listen", f"unix:{path}", "--ram", str(ram), "--swap", str(swap)]
        if not mte:
            cmd.append("--no-mte")
        for b in bugs:
            cmd += ["--bug", b]
        env = dict(os.environ, MTEKVM_SECRET=self.secret)
        try:
            self.process, self.address = await start_listening_process(
                cmd, env, log_path=os.path.join(self._tmp.name, "hypervisor.log"))
        except HostStartError:
            self._tmp.cleanup()
            self._tmp = None
            raise

    async def _stream(self) -> trio.abc.Stream:
        try:
            return await open_connection(self.address)
        except OSError as exc:
            raise HostStartError(f"cannot reach the hypervisor at {self.address}: {exc}") from None

    async def stop(self) -> None:
        """Stop the private hypervisor process."""
        if self.process is not None:
            await stop_process(self.process)
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ---- VMMs: one per VM, driven through VMM_CONTROL ----------------------------------------

from vmm.guestlink import InProcessGuests  # noqa: E402 - the VMM side, after the host side
from vmm.machine import Vmm  # noqa: E402


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


class InProcessVmm(VmmLink):
    """A :class:`vmm.machine.Vmm` in this trio run, with an in-process guest.

    Args:
        nursery: where the VMM runs.
        host: the hypervisor (its ``connect`` gives the VMM's and the guest's connections).
        name: the VM's name.
        session: the scenario's session.
        copy_chunk: passed to :class:`~vmm.machine.Vmm` when given.
    """

    def __init__(self, nursery: trio.Nursery, host: HostLink, name: str, session: str | None, *,
                 copy_chunk: int | None = None):
        super().__init__(nursery, name, session)
        self.host = host
        self.copy_chunk = copy_chunk
        self.vmm: Vmm | None = None
        self._inner: trio.Nursery | None = None

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
            extra = {} if self.copy_chunk is None else {"copy_chunk": self.copy_chunk}
            self.vmm = Vmm(self.host.connect, InProcessGuests(inner, self.host.connect), name=self.name,
                           session=self.session, **extra)
            await self.vmm.start()
            task_status.started()
            await trio.sleep_forever()  # stop() cancels

    async def connect(self) -> Client:
        """A control connection over an in-memory stream."""
        client_end, server_end = trio.testing.memory_stream_pair()
        self._inner.start_soon(self.vmm.serve, server_end)
        client = Client(client_end)
        await self._inner.start(client.run)
        return client

    async def stop(self) -> None:
        """Shut the VMM down, then cancel its tasks (control clients see their connection close)."""
        if self.vmm is not None:
            await self.vmm.shutdown()
        if self._inner is not None:
            self._inner.cancel_scope.cancel()
            self._inner = None


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
        self._tmp: tempfile.TemporaryDirectory | None = None

    async def start(self) -> None:
        """Start the VMM process and wait until it listens.

        Raises:
            HostStartError: it exited (e.g. could not reach the hypervisor) or never said it was listening.
        """
        self._tmp = tempfile.TemporaryDirectory(prefix="mtekvm-vmm-")
        path = os.path.join(self._tmp.name, "vmm.sock")
        self.log_path = os.path.join(self._tmp.name, "vmm.log")
        cmd = [sys.executable, "-m", "vmm", "--hypervisor", self.hv_address, "--listen", f"unix:{path}",
               "--name", self.name]
        if self.session is not None:
            cmd += ["--session", self.session]
        env = {k: v for k, v in os.environ.items() if k != "MTEKVM_SECRET"}
        if self.secret is not None:
            env["MTEKVM_SECRET"] = self.secret
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.process, self.address = await start_listening_process(cmd, env, log_path=self.log_path)
        except HostStartError:
            self._tmp.cleanup()
            self._tmp = None
            raise

    def log(self) -> str:
        """What the VMM process (and its guest) wrote to stderr so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    async def connect(self) -> Client:
        """A control connection to the VMM's socket.

        Raises:
            HostStartError: the VMM is not listening (it exited).
        """
        try:
            stream = await open_connection(self.address)
        except OSError as exc:
            raise HostStartError(f"cannot reach the VMM at {self.address}: {exc}") from None
        client = Client(stream)
        await self.nursery.start(client.run)
        return client

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
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
