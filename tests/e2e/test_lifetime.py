"""End-to-end: nothing outlives its run. Real ``mtekvm run`` processes, real SIGKILLs.

Each test starts ``mtekvm run`` on a scenario long enough to still be
running when it is killed (one VM doing thousands of guest steps), with
``TMPDIR`` pointing at a folder of the test's own, and records every process
descended from it (pid and start time, from ``/proc``) while the VM is up.
Then something is SIGKILLed, and the test polls (up to :data:`WAIT` seconds;
no assertion on speed) until every recorded process is gone and the temp
folder is empty. Whatever happens, the test SIGKILLs what it recorded and is
still alive before it ends, so a failing test leaves no strays either.

The lifeline mechanism itself (:mod:`shared.lifeline`) is also tested
directly: a child whose program is wedged still exits, and cleans up, once
its parent's end of the pipe closes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import trio

from mtekvm.links import HostDied, HostStartError, ProcessHost, ProcessVmm
from shared import lifeline, wire
from shared.transport import open_connection

ROOT = Path(__file__).resolve().parents[2]
MTEKVM = Path(sys.executable).parent / "mtekvm"
WAIT = 15.0  # seconds anything may take to start, die or be cleaned up (a bound, not a speed claim)
STEPS = 6000  # guest steps: far more than can run before the test kills something

SCENARIO_HEAD = """
name = "a long-running VM"

[vms.vm0]
vcpus = 1
memory = [ { ipa = 0x4000_0000, size = "1MiB", backing = "memfd" } ]

[[steps]]
actor = "guest:vm0"
op = "enable-mte"
tcf = "sync"

[[steps]]
actor = "guest:vm0"
op = "map"
va = 0x4000_0000
ipa = 0x4000_0000
size = "64KiB"
attr = "tagged"
"""

STEP = """
[[steps]]
actor = "guest:vm0"
op = "ldg"
addr = 0x4000_0000
size = 16
"""


# ---- processes, from /proc ---------------------------------------------------------------

def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def descendants(root: int) -> dict[int, int]:
    """Every live process below ``root``: pid -> start time (to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is None or st[1] in ("Z", "X"):
            continue
        children.setdefault(st[0], []).append(int(name))
        starts[int(name)] = st[2]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def alive(pid: int, start: int) -> bool:
    """That very process (same start time) exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X") and st[2] == start


def program(pid: int) -> str:
    """``hypervisor`` / ``vmm`` / ``guest`` for our processes (``python -m X``), else the command."""
    cmd = _cmdline(pid)
    for i, arg in enumerate(cmd[:-1]):
        if arg == "-m":
            return cmd[i + 1]
    return " ".join(cmd)


async def until(pred, what: str, timeout: float = WAIT):
    """Poll ``pred()`` (sync or async) until it is true; fail the test after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while True:
            value = pred()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting until {what}")


# ---- a running `mtekvm run` --------------------------------------------------------------

class Run:
    """``mtekvm run`` on the long scenario, with its own TMPDIR; remembers every process it starts."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        scenario = tmp_path / "long.toml"
        scenario.write_text(SCENARIO_HEAD + STEP * STEPS)
        env = dict(os.environ, TMPDIR=str(self.tmp))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("MTEKVM_SECRET", None)
        cmd = [str(MTEKVM)] if MTEKVM.exists() else [sys.executable, "-m", "mtekvm.cli"]
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd + ["run", str(scenario), *extra], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))
        self.seen: dict[int, int] = {}  # every descendant ever seen: pid -> start time

    def scan(self) -> dict[int, int]:
        """Record the current descendants; returns them."""
        now = descendants(self.proc.pid)
        self.seen.update(now)
        return now

    def programs(self) -> dict[int, str]:
        """The live descendants by program name."""
        return {pid: program(pid) for pid in self.scan()}

    async def wait_vm_up(self, expect: list[str]) -> dict[int, str]:
        """Wait until the descendants are exactly ``expect`` (program names) and a guest is serving."""
        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"mtekvm exited early ({self.proc.returncode}): {self.stderr()}")
            progs = self.programs()
            return progs if sorted(progs.values()) == sorted(expect) else None

        await until(up, f"mtekvm runs {expect}")
        await trio.sleep(0.5)  # the guest steps are under way
        assert self.proc.poll() is None, "the scenario ended before the test could kill anything"
        return {pid: name for pid, name in self.programs().items()}

    def left(self) -> list[str]:
        """Recorded descendants still alive."""
        return [f"{pid} ({program(pid)})" for pid, start in self.seen.items() if alive(pid, start)]

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def temp_left(self) -> list[str]:
        return sorted(os.listdir(self.tmp))

    def cleanup(self) -> None:
        """SIGKILL whatever is left of this run (only the processes it started)."""
        self.scan()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pid, start in self.seen.items():
            if alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def mtekvm_run(tmp_path):
    """``start(*extra_args)`` -> a :class:`Run`; every run is SIGKILLed, with its descendants, afterwards."""
    runs: list[Run] = []

    def start(*extra: str) -> Run:
        folder = tmp_path / f"run{len(runs)}"
        folder.mkdir()
        run = Run(folder, *extra)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            run.cleanup()


EMBEDDED = ["hypervisor", "vmm", "guest"]
BOOT = {"mte": True, "ram": 256 << 20, "swap": 64 << 20, "bugs": []}
WITH_HOST = ["vmm", "guest"]


async def run_on_shared_host(mtekvm_run, hv, tmp_path) -> Run:
    """Start `mtekvm run --host` on ``hv`` (its secret in a file) and wait until its VM is up."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(hv.secret + "\n")
    run = mtekvm_run("--host", hv.address, "--secret-file", str(secret_file))
    await run.wait_vm_up(WITH_HOST)
    return run


def one_line_error(run: Run) -> str:
    """mtekvm's stderr, asserted to be a single line without a traceback."""
    err = run.stderr().strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


# ---- the tests -----------------------------------------------------------------------------

class TestSigkillOfTheClient:
    async def test_embedded_host_leaves_no_process_and_no_temp_folder(self, mtekvm_run):
        """SIGKILL of `mtekvm run` mid-scenario: its hypervisor, VMM and guest all exit and their temp folders go."""
        run = mtekvm_run()
        progs = await run.wait_vm_up(EMBEDDED)
        assert run.temp_left(), "the run has no temp folder to clean up: the test would prove nothing"
        run.proc.kill()
        run.proc.wait()
        await until(lambda: not run.left(), f"every process of the run exited (started: {progs}; left: {run.left()})")
        await until(lambda: not run.temp_left(), f"the temp folders are removed (left: {run.temp_left()})")

    async def test_shared_host_is_freed(self, mtekvm_run, spawn_hypervisor, tmp_path):
        """SIGKILL of `mtekvm run --host`: its VMM and guest exit, and the shared host accepts `boot` again."""
        hv = spawn_hypervisor()
        run = await run_on_shared_host(mtekvm_run, hv, tmp_path)
        stats = await hv.stats()
        assert stats["vms"] == 1 and stats["tasks"] >= 1, stats
        async with hv.client("host") as host:
            with pytest.raises(wire.RemoteError) as busy:
                await host.call("boot", BOOT)
            assert busy.value.name == "EBUSY", busy.value  # the run holds the host while it lives
        run.proc.kill()
        run.proc.wait()
        await until(lambda: not run.left(), f"every process of the run exited (left: {run.left()})")
        await until(lambda: not run.temp_left(), f"the temp folders are removed (left: {run.temp_left()})")

        async def boots() -> bool:
            async with hv.client("host") as host:
                try:
                    await host.call("boot", BOOT)
                except wire.RemoteError as exc:
                    assert exc.name == "EBUSY", exc
                    return False
                return True

        await until(boots, "the shared host accepts boot (not EBUSY)")
        stats = await hv.stats()
        assert stats["vms"] == 0 and stats["tasks"] == 0, stats
        await hv.assert_healthy()


class TestSigkillInsideTheRun:
    async def test_killed_vmm_takes_its_guest_and_the_run_reports_it(self, mtekvm_run):
        """SIGKILL of a VMM: its guest exits, `mtekvm run` fails with one line naming the VMM, nothing is left."""
        run = mtekvm_run()
        progs = await run.wait_vm_up(EMBEDDED)
        vmm = next(pid for pid, name in progs.items() if name == "vmm")
        os.kill(vmm, signal.SIGKILL)
        await until(lambda: run.proc.poll() is not None, "mtekvm run exited", WAIT * 2)
        err = one_line_error(run)
        assert run.proc.returncode == 3, err
        assert "VMM of vm0" in err and "SIGKILL" in err, err
        await until(lambda: not run.left(), f"every process of the run exited (left: {run.left()})")
        await until(lambda: not run.temp_left(), f"the temp folders are removed (left: {run.temp_left()})")

    async def test_killed_hypervisor_ends_the_vm_and_the_run_with_one_line(self, mtekvm_run):
        """SIGKILL of the embedded hypervisor: the VMM and guest exit, `mtekvm run` says so in one line (no
        traceback)."""
        run = mtekvm_run()
        progs = await run.wait_vm_up(EMBEDDED)
        hv = next(pid for pid, name in progs.items() if name == "hypervisor")
        os.kill(hv, signal.SIGKILL)
        await until(lambda: not run.left(), f"the VMM and the guest exited (left: {run.left()})")
        await until(lambda: run.proc.poll() is not None, "mtekvm run exited", WAIT * 2)
        err = one_line_error(run)
        assert run.proc.returncode == 3, err
        assert f"hypervisor (pid {hv}) died: killed by SIGKILL" in err, err
        await until(lambda: not run.temp_left(), f"the temp folders are removed (left: {run.temp_left()})")


    async def test_killed_shared_host_ends_the_run_with_one_line(self, mtekvm_run, spawn_hypervisor, tmp_path):
        """SIGKILL of the `--host` hypervisor: the VMM and guest exit, `mtekvm run` says so in one line, exit 3."""
        hv = spawn_hypervisor()
        run = await run_on_shared_host(mtekvm_run, hv, tmp_path)
        hv.proc.kill()
        hv.proc.wait()
        await until(lambda: not run.left(), f"the VMM and the guest exited (left: {run.left()})")
        await until(lambda: run.proc.poll() is not None, "mtekvm run exited", WAIT * 2)
        err = one_line_error(run)
        assert run.proc.returncode == 3, err
        assert f"the hypervisor at {hv.address} is gone" in err, err
        await until(lambda: not run.temp_left(), f"the temp folders are removed (left: {run.temp_left()})")


class TestVmmFollowsItsController:
    async def test_vmm_exits_when_its_control_connection_closes(self, nursery, fresh_hypervisor):
        """A VMM whose last control connection closes destroys its VM, stops its guest, exits 0, removes its folder."""
        hv = fresh_hypervisor
        link = ProcessVmm(nursery, hv.address, hv.secret, "vm0", "lifetime")
        await link.start()
        try:
            process, folder = link.process, link.folder
            client = await link.connect()
            await client.call("vm-setup", {"name": "vm0", "mte": True, "vcpus": 1,
                                           "memory": [{"ipa": 0x4000_0000, "size": 1 << 20, "backing": "memfd"}]})
            guests = await until(lambda: descendants(process.pid), "the VMM has started its guest")
            assert [program(pid) for pid in guests] == ["guest"]
            assert (await hv.stats())["vms"] == 1
            await client.aclose()
            with trio.move_on_after(WAIT):
                await process.wait()
            assert process.returncode == 0, link.log()
            await until(lambda: not any(alive(p, s) for p, s in guests.items()), "the guest exited")
            stats = await hv.wait_stats(lambda st: st["vms"] == 0 and st["tasks"] == 0)
            assert stats["vms"] == 0 and stats["tasks"] == 0, stats
            assert not os.path.exists(folder)
        finally:
            with trio.CancelScope(shield=True):
                await link.stop()

    async def test_control_call_after_the_vmm_died_raises_host_died(self, nursery, fresh_hypervisor):
        """A control call to a SIGKILLed VMM raises HostDied (a HostStartError) saying which VMM died and how."""
        hv = fresh_hypervisor
        link = ProcessVmm(nursery, hv.address, hv.secret, "vm7", "lifetime")
        await link.start()
        try:
            client = await link.connect()
            pid = link.process.pid
            assert (await client.call("status")).value["pid"] is not None
            link.process.kill()
            await link.process.wait()
            with pytest.raises(HostDied) as info:
                await client.call("status")
            assert isinstance(info.value, HostStartError) and isinstance(info.value, wire.ConnectionClosed)
            message = str(info.value)
            assert message == f"the VMM of vm7 (pid {pid}) died: killed by SIGKILL (during status)", message
        finally:
            with trio.CancelScope(shield=True):
                await link.stop()


def spawn_with_lifeline(args: list[str], env: dict, **kw) -> tuple[subprocess.Popen, int]:
    """``python -m ARGS --lifeline-fd R`` with a pipe whose write end only the caller holds (returned)."""
    r, w = os.pipe()
    env = dict(env, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", *args, "--lifeline-fd", str(r)],
                            pass_fds=(r, *kw.pop("pass_fds", ())), env=env, cwd=str(ROOT), **kw)
    os.close(r)
    return proc, w


def read_listening(proc: subprocess.Popen) -> str:
    """The address from a server's ``listening on ADDR`` line."""
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), line
    return line.split(" ", 2)[2].strip()


class TestEachProgramWatchesItsLifeline:
    """Each program exits when only its lifeline closes: its connections and channels are still open."""

    async def test_hypervisor(self, tmp_path):
        """A hypervisor whose launcher's lifeline closes exits 0 and removes --remove-dir, with a client attached."""
        folder = tmp_path / "hv"
        folder.mkdir()
        env = dict(os.environ, MTEKVM_SECRET="s3cret")
        proc, w = spawn_with_lifeline(["hypervisor", "--listen", f"unix:{folder}/hv.sock", "--remove-dir",
                                       str(folder)], env, stdout=subprocess.PIPE)
        try:
            address = read_listening(proc)
            client = wire.Client(await open_connection(address))
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                await client.call("hello", {"role": "process", "secret": "s3cret"})
                os.close(w)
                w = None
                await until(lambda: proc.poll() is not None, "the hypervisor exited")
                nursery.cancel_scope.cancel()
            assert proc.returncode == 0
            assert not folder.exists()
        finally:
            if w is not None:
                os.close(w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()

    async def test_vmm(self, fresh_hypervisor, tmp_path):
        """A VMM whose lifeline closes destroys its VM, ends its guest, exits and removes --remove-dir, while
        controlled."""
        hv = fresh_hypervisor
        folder = tmp_path / "vmm"
        folder.mkdir()
        env = dict(os.environ, MTEKVM_SECRET=hv.secret)
        proc, w = spawn_with_lifeline(["vmm", "--hypervisor", hv.address, "--listen", f"unix:{folder}/vmm.sock",
                                       "--name", "vm0", "--session", "life", "--remove-dir", str(folder)],
                                      env, stdout=subprocess.PIPE)
        try:
            address = read_listening(proc)
            client = wire.Client(await open_connection(address))
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                await client.call("vm-setup", {"name": "vm0", "mte": True, "vcpus": 1, "memory": [
                    {"ipa": 0x4000_0000, "size": 1 << 20, "backing": "memfd"}]})
                guests = await until(lambda: descendants(proc.pid), "the VMM started its guest")
                assert (await hv.stats())["vms"] == 1
                os.close(w)
                w = None
                await until(lambda: proc.poll() is not None, "the VMM exited")
                nursery.cancel_scope.cancel()
            await until(lambda: not any(alive(p, st) for p, st in guests.items()), "the guest exited")
            stats = await hv.wait_stats(lambda st: st["vms"] == 0 and st["tasks"] == 0)
            assert stats["vms"] == 0 and stats["tasks"] == 0, stats
            assert not folder.exists()
        finally:
            if w is not None:
                os.close(w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()

    async def test_guest(self, fresh_hypervisor):
        """A guest whose lifeline closes exits (status 1) although its VMM's channel is still open."""
        hv = fresh_hypervisor
        chan, chan_child = socket.socketpair()
        exits, exits_child = socket.socketpair()
        env = dict(os.environ, MTEKVM_SECRET=hv.secret)
        proc, w = spawn_with_lifeline(["guest", "--hypervisor", hv.address, "--channel-fd", str(chan_child.fileno()),
                                       "--exit-fd", str(exits_child.fileno())], env,
                                      pass_fds=(chan_child.fileno(), exits_child.fileno()))
        chan_child.close()
        exits_child.close()
        try:
            framed = wire.FramedStream(trio.SocketStream(trio.socket.from_stdlib_socket(chan)))
            await framed.send(wire.request(1, "no-such-op", {}))
            with trio.fail_after(WAIT):
                reply = await framed.receive()
            assert reply["id"] == 1 and not reply["ok"]  # the guest serves its channel
            os.close(w)
            w = None
            await until(lambda: proc.poll() is not None, "the guest exited")
            assert proc.returncode == 1
        finally:
            if w is not None:
                os.close(w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            chan.close()
            exits.close()


class TestInterruptedStart:
    async def test_cancelled_host_start_leaves_no_process_and_no_folder(self, nursery, tmp_path, monkeypatch):
        """A private hypervisor start cancelled before the child says it listens kills the child and removes its
        folder."""
        hang = tmp_path / "hang.py"
        hang.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")  # never says it listens
        hang.chmod(0o700)
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        monkeypatch.setattr(sys, "executable", str(hang))
        host = ProcessHost(nursery)
        seen: dict[int, int] = {}

        def child_started() -> bool:
            seen.update({pid: start for pid, start in descendants(os.getpid()).items()
                         if str(tmp) in " ".join(_cmdline(pid))})
            return bool(seen)

        try:
            with trio.CancelScope() as scope:
                async def cancel_once_spawned():
                    await until(child_started, "the hypervisor process was spawned")
                    scope.cancel()

                nursery.start_soon(cancel_once_spawned)
                await host.start()
            assert scope.cancelled_caught and seen
            assert not any(alive(pid, start) for pid, start in seen.items())
            assert os.listdir(tmp) == []
        finally:
            for pid, start in seen.items():
                if alive(pid, start):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("program", ["hypervisor", "vmm"])
def test_remove_dir_must_be_the_socket_folder(program, tmp_path):
    """--remove-dir naming any folder but the one holding the program's socket is refused (exit 2), nothing removed."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    sock = f"unix:{tmp_path / 'elsewhere' / 'x.sock'}"
    args = {"hypervisor": ["--listen", sock],
            "vmm": ["--hypervisor", "unix:/nonexistent/hv.sock", "--listen", sock, "--name", "v"]}[program]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MTEKVM_SECRET="s")
    r = subprocess.run([sys.executable, "-m", program, *args, "--remove-dir", str(precious)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--remove-dir must be the folder" in r.stderr
    assert (precious / "keep").exists()


class TestLifeline:
    def _child(self, tmp_path: Path, body: str) -> tuple[subprocess.Popen, int, Path]:
        """A Python child watching a lifeline whose write end only this test holds."""
        folder = tmp_path / "owned"
        folder.mkdir()
        r, w = os.pipe()
        code = textwrap.dedent(f"""
            import shutil, sys, time
            from shared import lifeline
            {body}
            time.sleep(600)  # wedged: it never stops by itself
        """)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-c", code, str(r), str(folder)], pass_fds=(r,), env=env)
        os.close(r)
        return proc, w, folder

    async def test_wedged_child_exits_and_cleans_up_when_the_parent_end_closes(self, tmp_path):
        """A child whose program ignores the request to stop still exits (status 1) and removes its folder."""
        proc, w, folder = self._child(tmp_path, """
            fd, folder = int(sys.argv[1]), sys.argv[2]
            lifeline.watch(fd, lambda: None, grace=0.2, cleanup=[lambda: shutil.rmtree(folder)])
        """)
        try:
            await trio.sleep(0.5)
            assert proc.poll() is None, "the child exited while its parent still held the lifeline"
            assert folder.exists()
            os.close(w)  # what the kernel does when the parent dies
            await until(lambda: proc.poll() is not None, "the child exited")
            assert proc.returncode == 1
            assert not folder.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    async def test_on_gone_is_asked_first(self, tmp_path):
        """The watcher calls on_gone before the grace period, so a program can stop cleanly with its own status."""
        proc, w, folder = self._child(tmp_path, """
            import os
            fd, folder = int(sys.argv[1]), sys.argv[2]
            def stop():
                shutil.rmtree(folder)
                os._exit(0)
            lifeline.watch(fd, stop, grace=60)
        """)
        try:
            await trio.sleep(0.5)
            assert proc.poll() is None
            os.close(w)
            await until(lambda: proc.poll() is not None, "the child exited")
            assert proc.returncode == 0  # on_gone's exit, not the hard one after the grace period
            assert not folder.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def test_the_pipe_is_private_and_children_check_it(self, tmp_path):
        """One pipe per process, neither end inheritable unless passed; a child refuses a non-pipe lifeline."""
        fd = lifeline.child_fd()
        assert lifeline.child_fd() == fd
        assert not os.get_inheritable(fd) and not os.get_inheritable(lifeline._pipe[1])
        lifeline.check_fd(fd)
        with open(tmp_path / "file", "w") as f:
            with pytest.raises(ValueError, match="not a pipe"):
                lifeline.check_fd(f.fileno())
        closed = os.open(os.devnull, os.O_RDONLY)
        os.close(closed)
        with pytest.raises(ValueError, match="not an open descriptor"):
            lifeline.check_fd(closed)
