"""Starting the guest: a ``python -m guest`` process, or a guest agent in this trio run.

A VMM starts its guest when it creates the first vCPU. The guest gets two
streams, the same in both forms:

* GUEST_CHANNEL (the VMM calls, the guest serves): ``vcpu-add``, ``guest-op``;
* EXIT_CHANNEL (the guest calls, the VMM serves): ``exit-mmio``, ``exit-error``.

and makes its own hypervisor connection with hello ``{role: "vcpu"}``.

* :class:`ProcessGuests` spawns ``python -m guest --hypervisor ADDR
  --channel-fd N --exit-fd M --name NAME --lifeline-fd L`` (secret in
  ``MTEKVM_SECRET``) with the child ends of two ``socket.socketpair()``\\ s
  and the VMM's lifeline (:mod:`shared.lifeline`) passed down: the guest
  exits when its channel closes or when the VMM dies, whatever the signal.
* :class:`InProcessGuests` runs a guest agent (the harness passes
  :class:`guest.agent.GuestAgent`; the VMM does not import the guest) over
  ``trio.testing.memory_stream_pair`` streams, with a hypervisor connection
  from the VMM's ``connect``: what the controlled scheduler needs.

Both return a :class:`GuestHandle` and, when the guest dies (exit, kill, or
its channel closing), set its ``detail`` (``"killed by SIGKILL"``,
``"exited with status N"``) and call the VMM's ``on_exit(handle)``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from shared import lifeline
from shared.errno import EIO
from shared.wire import Client
from vmm import machine

log = logging.getLogger("mtekvm.vmm.guest")

ServeExits = Callable[[trio.abc.Stream], Awaitable[None]]
OnExit = Callable[["GuestHandle"], Awaitable[None]]
#: The directory holding the ``guest`` package (put on a child's PYTHONPATH).
ROOT = str(Path(__file__).resolve().parents[1])


async def _close(resource) -> None:
    """Close a stream or client, ignoring a peer that has already gone."""
    with trio.CancelScope(shield=True):
        try:
            await resource.aclose()
        except Exception:  # noqa: BLE001 - closing something broken
            pass


class GuestHandle:
    """A started guest as its VMM sees it.

    Attributes:
        name: the VM's name.
        client: the GUEST_CHANNEL client (the VMM's side).
        died: set once the guest is dead and reaped.
        detail: how it died (``None`` while it runs).
    """

    def __init__(self, name: str, client: Client):
        self.name = name
        self.client = client
        self.died = trio.Event()
        self.detail: str | None = None

    @property
    def alive(self) -> bool:
        """The guest has not died yet."""
        return not self.died.is_set()

    async def kill(self) -> None:
        """Kill the guest at once (SIGKILL) and wait until it is reaped."""
        raise NotImplementedError

    async def stop(self, grace: float = 5.0) -> None:
        """Close the guest's channel (it exits), killing it after ``grace`` seconds."""
        await _close(self.client)
        with trio.move_on_after(grace):
            await self.died.wait()
        if self.alive:
            await self.kill()


class GuestLauncher:
    """Starts guests (one per VM) in some form.

    Args:
        nursery: where the guests' background tasks run.
    """

    def __init__(self, nursery: trio.Nursery):
        self.nursery = nursery

    async def start(self, name: str, serve_exits: ServeExits, on_exit: OnExit) -> GuestHandle:
        """Start a guest for VM ``name``.

        Args:
            name: the VM's name.
            serve_exits: the VMM's EXIT_CHANNEL server, run on the VMM's end.
            on_exit: awaited with the handle once the guest has died.

        Returns:
            The running guest.

        Raises:
            VmmError: EIO when the guest cannot be started.
        """
        raise NotImplementedError


class _InProcessGuest(GuestHandle):
    def __init__(self, name: str, client: Client):
        super().__init__(name, client)
        self._scope = trio.CancelScope()
        self._killed = False

    async def kill(self) -> None:
        self._killed = True
        self._scope.cancel()
        await self.died.wait()

    async def _run(self, agent, channel: trio.abc.Stream, exits: Client, exits_vmm: trio.abc.Stream,
                   hv: Client, serve_exits: ServeExits, on_exit: OnExit, *,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
        status, why = None, ""
        try:
            with self._scope:
                task_status.started()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(serve_exits, exits_vmm)
                        await nursery.start(exits.run)
                        await agent.serve(channel)
                        nursery.cancel_scope.cancel()
                    status = 0
                except Exception as exc:  # noqa: BLE001 - a crashed guest is an exit, not a VMM crash
                    log.exception("guest:%s crashed", self.name)
                    status, why = 1, f": {type(exc).__name__}: {exc}"
        finally:
            for r in (channel, exits, exits_vmm, hv, self.client):
                await _close(r)
            if self._killed or status is None:
                self.detail = "killed by SIGKILL"
            else:
                self.detail = f"exited with status {status}{why}"
            self.died.set()
        await on_exit(self)


class InProcessGuests(GuestLauncher):
    """Guests as agents in this trio run.

    Args:
        nursery: where the guests run.
        connect: ``await connect(role, **hello)`` -> ``(Client, hello_reply)`` to the hypervisor.
        agent: ``agent(hv, exits)`` -> the guest (an object whose ``await serve(stream)``
            serves GUEST_CHANNEL until it closes): :class:`guest.agent.GuestAgent`.
    """

    def __init__(self, nursery: trio.Nursery, connect, agent: Callable[[Client, Client], Any]):
        super().__init__(nursery)
        self.connect = connect
        self.agent = agent

    async def start(self, name: str, serve_exits: ServeExits, on_exit: OnExit) -> GuestHandle:
        """Start an in-process guest (see :meth:`GuestLauncher.start`)."""
        hv, _ = await self.connect("vcpu", name=f"guest:{name}")
        vmm_end, guest_end = trio.testing.memory_stream_pair()
        exits_guest, exits_vmm = trio.testing.memory_stream_pair()
        client = Client(vmm_end)
        await self.nursery.start(client.run)
        exits = Client(exits_guest)
        handle = _InProcessGuest(name, client)
        agent = self.agent(hv, exits)
        await self.nursery.start(handle._run, agent, guest_end, exits, exits_vmm, hv, serve_exits, on_exit)
        return handle


class _ProcessGuest(GuestHandle):
    def __init__(self, name: str, client: Client, process: trio.Process, grace: float):
        super().__init__(name, client)
        self.process = process
        self.grace = grace

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.died.wait()

    async def _watch(self, on_exit: OnExit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        channel_closed = trio.Event()

        async def run_channel(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await self.client.run(task_status=task_status)
            finally:
                channel_closed.set()

        async def reap_after_close():
            await channel_closed.wait()  # a guest that closed its channel is dead to the VMM
            with trio.move_on_after(self.grace):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_channel)
                task_status.started()
                nursery.start_soon(reap_after_close)
                await self.process.wait()
                nursery.cancel_scope.cancel()
        finally:
            await _close(self.client)
            rc = self.process.returncode
            if rc is not None and rc < 0:
                try:
                    self.detail = f"killed by {signal.Signals(-rc).name}"
                except ValueError:
                    self.detail = f"killed by signal {-rc}"
            else:
                self.detail = f"exited with status {rc}"
            self.died.set()
        await on_exit(self)


class ProcessGuests(GuestLauncher):
    """Guests as ``python -m guest`` processes.

    Args:
        nursery: where the watchers and exit servers run.
        address: the hypervisor the guest connects to.
        secret: the hypervisor's secret (passed in ``MTEKVM_SECRET``), or ``None``.
        python: the interpreter to run.
        grace: seconds a guest whose channel closed may take to exit before SIGKILL.
    """

    def __init__(self, nursery: trio.Nursery, address: str, secret: str | None, *,
                 python: str = sys.executable, grace: float = 5.0):
        super().__init__(nursery)
        self.address = address
        self.secret = secret
        self.python = python
        self.grace = grace

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "MTEKVM_SECRET"}
        if self.secret is not None:
            env["MTEKVM_SECRET"] = self.secret
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    async def start(self, name: str, serve_exits: ServeExits, on_exit: OnExit) -> GuestHandle:
        """Spawn a guest process (see :meth:`GuestLauncher.start`)."""
        chan_parent, chan_child = socket.socketpair()
        exit_parent, exit_child = socket.socketpair()
        life = lifeline.child_fd()
        cmd = [self.python, "-m", "guest", "--hypervisor", self.address,
               "--channel-fd", str(chan_child.fileno()), "--exit-fd", str(exit_child.fileno()),
               "--name", f"guest:{name}", "--lifeline-fd", str(life)]
        try:
            process = await trio.lowlevel.open_process(
                cmd, pass_fds=(chan_child.fileno(), exit_child.fileno(), life), env=self._env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as exc:
            chan_parent.close()
            exit_parent.close()
            raise machine.VmmError(EIO, f"cannot start the guest: {exc}") from None
        finally:
            chan_child.close()
            exit_child.close()
        client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(chan_parent)))
        exits = trio.SocketStream(trio.socket.from_stdlib_socket(exit_parent))
        handle = _ProcessGuest(name, client, process, self.grace)
        self.nursery.start_soon(serve_exits, exits)
        await self.nursery.start(handle._watch, on_exit)
        return handle
