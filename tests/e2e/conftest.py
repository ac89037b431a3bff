"""End-to-end fixtures: real ``python -m hypervisor`` processes on real sockets.

``hypervisor`` (one per test module) and ``fresh_hypervisor`` (one per test)
start ``python -m hypervisor --listen unix:TMP/hv.sock`` with ``MTEKVM_SECRET``
in its environment, wait for its ``listening on ...`` line and hand the test a
:class:`RunningHypervisor`: its address, secret, socket path and process, plus
helpers to open introduced clients or raw framed streams. ``spawn_hypervisor``
starts one with any extra arguments (TCP listeners, secret files) or reports
how it refused to start. Every process started here is terminated afterwards.

Helpers are fixtures (not imports from this file) so that the test modules do
not depend on how pytest names conftest modules.
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from shared import lifeline, wire
from shared.transport import open_connection

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


class HypervisorStartFailed(Exception):
    """The hypervisor process exited, or never printed ``listening on``."""

    def __init__(self, returncode, stdout: str, stderr: str):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"hypervisor did not start (status {returncode}): {stderr.strip() or stdout.strip()}")


class RunningHypervisor:
    """A ``python -m hypervisor`` process and how to reach it."""

    def __init__(self, proc: subprocess.Popen, address: str, secret: str | None, path: str | None,
                 stderr_path: Path):
        self.proc = proc
        self.address = address
        self.secret = secret
        self.path = path  # the Unix socket file, or None for TCP
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """The process has not exited."""
        return self.proc.poll() is None

    def stderr(self) -> str:
        """What the hypervisor wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    async def stream(self) -> trio.abc.Stream:
        """A new, not yet introduced, byte stream to the hypervisor."""
        return await open_connection(self.address)

    @asynccontextmanager
    async def framed(self):
        """A raw :class:`shared.wire.FramedStream` (no hello sent); closed on exit."""
        framed = wire.FramedStream(await self.stream())
        try:
            yield framed
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await framed.aclose()
                except Exception:  # noqa: BLE001 - already broken
                    pass

    @asynccontextmanager
    async def client(self, role: str | None = "process", *, secret: str | None | bool = True, **hello):
        """A :class:`shared.wire.Client` with its receive loop running.

        Args:
            role: sent in ``hello`` (``None``: send no hello at all).
            secret: ``True`` presents the hypervisor's secret, ``None`` none, a string that one.
            hello: further ``hello`` arguments (``session``, ``attach``, ``name``).

        The hello reply's value is available as ``client.hello``.
        """
        stream = await self.stream()
        client = wire.Client(stream)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                client.hello = None
                if role is not None:
                    args = {"role": role, **hello}
                    sec = self.secret if secret is True else secret
                    if sec is not None:
                        args["secret"] = sec
                    client.hello = (await client.call("hello", args)).value
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await client.aclose()
                    except Exception:  # noqa: BLE001
                        pass
                nursery.cancel_scope.cancel()

    async def stats(self) -> dict:
        """The host kernel's ``stats`` over a fresh host connection."""
        async with self.client("host") as host:
            return (await host.call("stats")).value

    async def wait_stats(self, pred, timeout: float = 10.0) -> dict:
        """Poll ``stats`` until ``pred(stats)`` holds; returns the last stats (pred may not hold)."""
        st = await self.stats()
        with trio.move_on_after(timeout):
            while not pred(st):
                await trio.sleep(0.02)
                st = await self.stats()
        return st

    async def assert_healthy(self) -> None:
        """The process is alive and a brand-new client gets served."""
        assert self.alive(), f"hypervisor exited with {self.proc.returncode}: {self.stderr()[-2000:]}"
        with trio.fail_after(10):
            async with self.client("process") as c:
                pid = (await c.call("getpid")).value
                assert pid == c.hello["pid"]
        assert self.alive()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_hypervisor(workdir: Path, listen: str | None = None, *extra: str, secret: str | None = "env",
                     timeout: float = START_TIMEOUT) -> RunningHypervisor:
    """Start ``python -m hypervisor`` and wait for its ``listening on`` line.

    Args:
        workdir: where the socket and the stderr log go.
        listen: the ``--listen`` address (default ``unix:WORKDIR/hv.sock``).
        extra: more command-line arguments.
        secret: ``"env"`` for a fresh ``MTEKVM_SECRET``; a string for that one; ``None`` for none.

    Raises:
        HypervisorStartFailed: it exited or did not say it was listening in time.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = None
    if listen is None:
        path = str(workdir / "hv.sock")
        listen = f"unix:{path}"
    elif listen.startswith("unix:"):
        path = listen[5:]
    env = {k: v for k, v in os.environ.items() if k != "MTEKVM_SECRET"}
    if secret == "env":
        secret = secrets.token_hex(16)
    if secret is not None:
        env["MTEKVM_SECRET"] = secret
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    stderr_path = workdir / f"hv-{time.monotonic_ns()}.stderr"
    with open(stderr_path, "wb") as err:
        # the test session's lifeline: a SIGKILLed pytest leaves no hypervisor behind
        fd = lifeline.child_fd()
        proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "--listen", listen, "--lifeline-fd", str(fd),
                                 *extra], stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(ROOT),
                                pass_fds=(fd,))
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            break
        line += chunk
    if not line.startswith(b"listening on "):
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        out = line.decode(errors="replace") + proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        raise HypervisorStartFailed(proc.returncode, out, stderr_path.read_text(errors="replace"))
    address = line.decode().split(" ", 2)[2].strip()
    return RunningHypervisor(proc, address, secret, path, stderr_path)


@pytest.fixture(scope="module")
def hypervisor(tmp_path_factory):
    """One hypervisor process shared by the tests of a module."""
    hv = start_hypervisor(tmp_path_factory.mktemp("hv"))
    try:
        yield hv
    finally:
        hv.stop()


@pytest.fixture
def fresh_hypervisor(tmp_path_factory):
    """A hypervisor process of the test's own (clean statistics)."""
    hv = start_hypervisor(tmp_path_factory.mktemp("hvfresh"))
    try:
        yield hv
    finally:
        hv.stop()


@pytest.fixture
def spawn_hypervisor(tmp_path_factory):
    """``spawn(listen=None, *extra, secret="env")``: start hypervisors with any arguments.

    Raises :class:`HypervisorStartFailed` (exposed as ``spawn.Failed``) when one refuses to start.
    """
    started: list[RunningHypervisor] = []

    def spawn(listen=None, *extra, secret="env", workdir=None):
        hv = start_hypervisor(workdir or tmp_path_factory.mktemp("hvspawn"), listen, *extra, secret=secret)
        started.append(hv)
        return hv

    spawn.Failed = HypervisorStartFailed
    try:
        yield spawn
    finally:
        for hv in started:
            hv.stop()
