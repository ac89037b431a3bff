"""End-to-end: host processes talking to a real hypervisor process over real sockets."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import msgpack
import pytest
import trio

from shared import wire
from shared.errno import EAGAIN, EFAULT, EPERM, ESRCH
from shared.mte import PAGE_SIZE

RW_MTE = ["read", "write", "mte"]
MiB = 1 << 20


async def expect_errno(client: wire.Client, errno: int, op: str, args: dict | None = None) -> wire.RemoteError:
    """Call ``op`` and insist it fails with ``errno``; returns the error."""
    with pytest.raises(wire.RemoteError) as info:
        await client.call(op, args or {})
    assert info.value.errno == errno, f"{op}: wanted errno {errno}, got {info.value}"
    return info.value


class TestSharedMemfd:
    async def test_two_processes_share_tags_of_a_memfd_object(self, hypervisor):
        """A tag stored by one process in a MAP_SHARED memfd is what LDG returns in another process mapping it."""
        async with hypervisor.client(session="memfd") as a, hypervisor.client(session="memfd") as b:
            assert a.hello["pid"] != b.hello["pid"]
            size = 4 * PAGE_SIZE
            addr_a = (await a.call("mmap", {"size": size, "prot": RW_MTE, "share": "shared",
                                            "backing": "memfd", "object": "x"})).value
            await a.call("stg", {"addr": addr_a + PAGE_SIZE, "tag": 5, "size": 64})
            await a.call("store", {"addr": addr_a + PAGE_SIZE, "tag": 5, "data": b"shared!"})
            addr_b = (await b.call("mmap", {"size": size, "prot": ["read", "write"], "share": "shared",
                                            "backing": "memfd", "object": "x"})).value
            await b.call("mprotect", {"addr": addr_b, "size": size, "prot": RW_MTE})
            tags = (await b.call("ldg", {"addr": addr_b + PAGE_SIZE, "size": 80})).value
            assert list(tags) == [5, 5, 5, 5, 0]
            data = (await b.call("load", {"addr": addr_b + PAGE_SIZE, "tag": 5, "size": 7})).value
            assert data == b"shared!"

    async def test_untagged_second_mapping_reads_zero_tags(self, hypervisor):
        """Before B maps the shared object with PROT_MTE its LDG reads zero (RAZ), while A still sees its tag."""
        async with hypervisor.client(session="raz") as a, hypervisor.client(session="raz") as b:
            addr_a = (await a.call("mmap", {"size": PAGE_SIZE, "prot": RW_MTE, "backing": "memfd",
                                            "share": "shared", "object": "raz-obj"})).value
            await a.call("stg", {"addr": addr_a, "tag": 9, "size": 32})
            addr_b = (await b.call("mmap", {"size": PAGE_SIZE, "prot": ["read", "write"], "backing": "memfd",
                                            "share": "shared", "object": "raz-obj"})).value
            assert list((await b.call("ldg", {"addr": addr_b, "size": 32})).value) == [0, 0]
            assert list((await a.call("ldg", {"addr": addr_a, "size": 32})).value) == [9, 9]


class TestTagCheckFaults:
    async def test_sync_fault_is_a_response_with_fault_data(self, hypervisor):
        """A sync tag-check fault is an ok response carrying `fault` data, and the store is not performed."""
        async with hypervisor.client() as p:
            await p.call("prctl", {"tcf": "sync"})
            addr = (await p.call("mmap", {"size": PAGE_SIZE, "prot": RW_MTE})).value
            await p.call("stg", {"addr": addr, "tag": 3, "size": 64})
            res = await p.call_raw("store", {"addr": addr + 32, "tag": 4, "data": b"\xff" * 8})
            assert res["t"] == "res" and res["ok"] is True, res
            assert res["fault"]["kind"] == "tag-check-fault"
            assert res["fault"]["addr"] == addr + 32
            assert res["fault"]["pointer_tag"] == 4 and res["fault"]["memory_tag"] == 3
            assert (await p.call("load", {"addr": addr + 32, "tag": 3, "size": 8})).value == bytes(8)

    async def test_matching_tag_passes_and_tagged_pointer_bits_work(self, hypervisor):
        """With tcf sync an access whose pointer tag (in bits 59:56) matches gets no fault and sees the data."""
        async with hypervisor.client() as p:
            await p.call("prctl", {"tcf": "sync"})
            addr = (await p.call("mmap", {"size": PAGE_SIZE, "prot": RW_MTE})).value
            await p.call("stg", {"addr": addr, "tag": 6, "size": 16})
            ptr = addr | (6 << 56)
            r = await p.call("store", {"addr": ptr, "data": b"abc"})
            assert r.fault is None
            r = await p.call("load", {"addr": ptr, "size": 3})
            assert r.fault is None and r.value == b"abc"

    async def test_async_fault_performs_the_access(self, hypervisor):
        """With tcf async a mismatching store is performed and reported as an async-tag-check-fault."""
        async with hypervisor.client() as p:
            await p.call("prctl", {"tcf": "async"})
            addr = (await p.call("mmap", {"size": PAGE_SIZE, "prot": RW_MTE})).value
            await p.call("stg", {"addr": addr, "tag": 1, "size": 16})
            r = await p.call("store", {"addr": addr, "tag": 2, "data": b"zz"})
            assert r.fault is not None and r.fault["kind"] == "async-tag-check-fault"
            assert (await p.call("load", {"addr": addr, "tag": 1, "size": 2})).value == b"zz"


class TestConcurrentRequests:
    async def test_fifty_concurrent_loads_through_the_client(self, hypervisor):
        """Fifty loads issued at once on one connection each get the bytes of their own address."""
        async with hypervisor.client() as p:
            addr = (await p.call("mmap", {"size": 50 * PAGE_SIZE, "prot": ["read", "write"]})).value
            await p.call("batch", {"ops": [["store", {"addr": addr + i * PAGE_SIZE, "data": bytes([i]) * 32}]
                                           for i in range(50)]})
            got: dict[int, bytes] = {}

            async def load(i):
                got[i] = (await p.call("load", {"addr": addr + i * PAGE_SIZE, "size": 32})).value

            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    for i in range(50):
                        n.start_soon(load, i)
            assert got == {i: bytes([i]) * 32 for i in range(50)}

    async def test_pipelined_raw_requests_answered_with_matching_ids(self, hypervisor):
        """Fifty requests written back to back before reading get fifty responses whose ids match their payloads."""
        async with hypervisor.framed() as f:
            await f.send(wire.request(1, "hello", {"role": "process", "secret": hypervisor.secret}))
            assert (await f.receive())["ok"] is True
            await f.send(wire.request(2, "mmap", {"size": 50 * PAGE_SIZE}))
            addr = (await f.receive())["value"]
            ops = [["store", {"addr": addr + i * PAGE_SIZE, "data": i.to_bytes(4, "little")}] for i in range(50)]
            await f.send(wire.request(3, "batch", {"ops": ops}))
            assert all(r[0] for r in (await f.receive())["value"])
            ids = {1000 + 7 * i: i for i in range(50)}
            blob = b"".join(msgpack.packb(wire.request(rid, "load", {"addr": addr + i * PAGE_SIZE, "size": 4}))
                            for rid, i in ids.items())
            await f.stream.send_all(blob)
            seen = {}
            with trio.fail_after(20):
                while len(seen) < len(ids):
                    msg = await f.receive()
                    assert msg["t"] == "res" and msg["ok"], msg
                    assert msg["id"] not in seen, f"id {msg['id']} answered twice"
                    seen[msg["id"]] = msg["value"]
            assert seen == {rid: i.to_bytes(4, "little") for rid, i in ids.items()}

    async def test_outstanding_requests_are_bounded(self, hypervisor):
        """Requests beyond the per-connection bound get EAGAIN, each id is answered once, and the connection goes on."""
        async with hypervisor.framed() as f:
            await f.send(wire.request(0, "hello", {"role": "process", "secret": hypervisor.secret}))
            pid = (await f.receive())["value"]["pid"]
            n = 600
            await f.stream.send_all(b"".join(msgpack.packb(wire.request(i, "getpid", {})) for i in range(1, n + 1)))
            answers = {}
            with trio.fail_after(30):
                while len(answers) < n:
                    msg = await f.receive()
                    assert msg["id"] not in answers
                    answers[msg["id"]] = msg
            assert set(answers) == set(range(1, n + 1))
            for msg in answers.values():
                assert (msg["ok"] and msg["value"] == pid) or msg["errno"] == EAGAIN, msg
            await f.send(wire.request(n + 1, "getpid", {}))
            assert (await f.receive())["value"] == pid


class TestClientDeath:
    async def test_abrupt_close_mid_request_frees_the_process(self, fresh_hypervisor):
        """Closing the socket while a large store is in flight exits the process, frees its frames, keeps serving."""
        hv = fresh_hypervisor
        base = await hv.stats()
        async with hv.framed() as f:
            await f.send(wire.request(1, "hello", {"role": "process", "secret": hv.secret}))
            assert (await f.receive())["ok"]
            await f.send(wire.request(2, "mmap", {"size": 64 * MiB}))
            addr = (await f.receive())["value"]
            await f.send(wire.request(3, "store", {"addr": addr, "data": b"\x5a" * (2 * MiB)}))
            assert (await f.receive())["ok"]
            grown = await hv.stats()
            assert grown["frames_allocated"] >= base["frames_allocated"] + 512
            assert grown["tasks"] == base["tasks"] + 1
            await f.send(wire.request(4, "store", {"addr": addr + 2 * MiB, "data": b"\x33" * (8 * MiB)}))
            # leave without reading the reply
        st = await hv.wait_stats(lambda s: s["tasks"] == base["tasks"])
        await trio.sleep(0.2)  # the exit path frees the frames before it drops the task
        st = await hv.stats()
        assert st["frames_allocated"] == base["frames_allocated"], st
        assert st["tasks"] == base["tasks"]
        assert st["warnings"] == []
        await hv.assert_healthy()

    async def test_close_while_pages_are_being_faulted_in_frees_every_frame(self, fresh_hypervisor):
        """Closing connections while their large stores are faulting pages in leaks no frame (five tries)."""
        hv = fresh_hypervisor
        base = await hv.stats()
        for attempt in range(5):
            async with hv.framed() as f:
                await f.send(wire.request(1, "hello", {"role": "process", "secret": hv.secret}))
                assert (await f.receive())["ok"]
                await f.send(wire.request(2, "mmap", {"size": 32 * MiB, "prot": RW_MTE}))
                addr = (await f.receive())["value"]
                await f.send(wire.request(3, "store", {"addr": addr, "data": b"\x77" * (16 * MiB)}))
                await trio.sleep(0.03 + 0.02 * attempt)  # let the store get under way, then vanish
        st = await hv.wait_stats(lambda s: s["tasks"] == base["tasks"], timeout=15)
        await trio.sleep(0.2)
        st = await hv.stats()
        assert st["tasks"] == base["tasks"]
        assert st["frames_allocated"] == base["frames_allocated"], f"frames leaked: {st}"
        await hv.assert_healthy()

    async def test_sigkilled_client_process_is_cleaned_up(self, fresh_hypervisor, tmp_path):
        """A client OS process killed with SIGKILL mid-run has its host process exited and memory freed."""
        hv = fresh_hypervisor
        base = await hv.stats()
        script = tmp_path / "client.py"
        script.write_text(textwrap.dedent("""
            import socket, sys, msgpack
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sys.argv[1])
            unp = msgpack.Unpacker(raw=False)
            def call(rid, op, args):
                s.sendall(msgpack.packb({"t": "req", "id": rid, "op": op, "args": args}))
                while True:
                    for msg in unp:
                        assert msg["ok"], msg
                        return msg["value"]
                    unp.feed(s.recv(1 << 16))
            call(1, "hello", {"role": "process", "secret": sys.argv[2]})
            addr = call(2, "mmap", {"size": 256 << 20, "prot": ["read", "write", "mte"]})
            call(3, "store", {"addr": addr, "data": b"\\x11" * (4 << 20)})
            print("ready", flush=True)
            rid = 4
            while True:  # keep the hypervisor busy until we are killed
                call(rid, "store", {"addr": addr + (4 << 20), "data": b"\\x22" * (1 << 20)})
                rid += 1
        """))
        proc = subprocess.Popen([sys.executable, str(script), hv.path, hv.secret], stdout=subprocess.PIPE)
        try:
            with trio.fail_after(20):
                line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line == b"ready\n"
            busy = await hv.stats()
            assert busy["frames_allocated"] >= base["frames_allocated"] + 1024
            assert busy["tasks"] == base["tasks"] + 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        st = await hv.wait_stats(lambda s: s["tasks"] == base["tasks"])
        await trio.sleep(0.2)  # the exit path frees the frames before it drops the task
        st = await hv.stats()
        assert st["frames_allocated"] == base["frames_allocated"], st
        assert st["tasks"] == base["tasks"]
        await hv.assert_healthy()

    async def test_unattached_fork_child_dies_with_its_parent(self, fresh_hypervisor):
        """A child forked but never attached is freed when its parent's connection closes."""
        hv = fresh_hypervisor
        base = await hv.stats()
        async with hv.client() as p:
            addr = (await p.call("mmap", {"size": MiB})).value
            await p.call("store", {"addr": addr, "data": b"\x01" * MiB})
            await p.call("fork", {"child": "orphan"})
            assert (await hv.stats())["tasks"] == base["tasks"] + 2
        st = await hv.wait_stats(lambda s: s["tasks"] == base["tasks"]
                                 and s["frames_allocated"] <= base["frames_allocated"])
        assert st["tasks"] == base["tasks"]
        assert st["frames_allocated"] == base["frames_allocated"]


class TestForkAttach:
    async def test_child_attached_with_token_sees_parent_memory_and_tags(self, hypervisor):
        """A forked child attached over a second connection with its token sees the parent's data and tags."""
        async with hypervisor.client(session="forky") as parent:
            addr = (await parent.call("mmap", {"size": 2 * PAGE_SIZE, "prot": RW_MTE})).value
            await parent.call("stg", {"addr": addr, "tag": 7, "size": 48})
            await parent.call("store", {"addr": addr, "tag": 7, "data": b"before fork"})
            child = (await parent.call("fork", {"child": "kid"})).value
            assert isinstance(child["pid"], int) and isinstance(child["token"], str) and len(child["token"]) >= 16
            async with hypervisor.client(attach=child["token"]) as kid:
                assert kid.hello["pid"] == child["pid"]
                assert (await kid.call("getpid")).value == child["pid"]
                assert list((await kid.call("ldg", {"addr": addr, "size": 48})).value) == [7, 7, 7]
                assert (await kid.call("load", {"addr": addr, "tag": 7, "size": 11})).value == b"before fork"
                # copy-on-write: the child's store is its own
                await kid.call("store", {"addr": addr, "tag": 7, "data": b"AFTER"})
                assert (await parent.call("load", {"addr": addr, "tag": 7, "size": 11})).value == b"before fork"
                # same session: the parent may read the child's tags
                peek = (await parent.call("ptrace-peek-tags", {"target": child["pid"], "addr": addr,
                                                               "count": 3})).value
                assert list(peek) == [7, 7, 7]

    async def test_token_attaches_only_once(self, hypervisor):
        """A fork token cannot be used by a second connection once the child is attached (ESRCH)."""
        async with hypervisor.client() as parent:
            child = (await parent.call("fork", {"child": "once"})).value
            async with hypervisor.client(attach=child["token"]):
                async with hypervisor.client(role=None) as thief:
                    err = await expect_errno(thief, ESRCH, "hello", {"role": "process", "attach": child["token"],
                                                                     "secret": hypervisor.secret})
                    assert "token" in err.message

    async def test_unknown_token_is_refused(self, hypervisor):
        """Attaching with a token no child holds fails with ESRCH."""
        async with hypervisor.client(role=None) as c:
            await expect_errno(c, ESRCH, "hello", {"role": "process", "attach": "0" * 32,
                                                   "secret": hypervisor.secret})


class TestIsolation:
    async def test_ptrace_across_sessions_is_eperm(self, hypervisor):
        """A process cannot peek or poke the tags of a process of another session (EPERM)."""
        async with hypervisor.client(session="s-one") as a, hypervisor.client(session="s-two") as b, \
                hypervisor.client(session="s-one") as a2:
            addr = (await a.call("mmap", {"size": PAGE_SIZE, "prot": RW_MTE})).value
            await a.call("stg", {"addr": addr, "tag": 2, "size": 16})
            pid_a = a.hello["pid"]
            await expect_errno(b, EPERM, "ptrace-peek-tags", {"target": pid_a, "addr": addr, "count": 1})
            await expect_errno(b, EPERM, "ptrace-poke-tags", {"target": pid_a, "addr": addr, "tags": b"\x05"})
            assert list((await a2.call("ptrace-peek-tags", {"target": pid_a, "addr": addr, "count": 1})).value) == [2]
            assert list((await a.call("ldg", {"addr": addr, "size": 16})).value) == [2]

    async def test_processes_have_separate_address_spaces(self, hypervisor):
        """An address mapped by one process is not mapped in another (EFAULT there)."""
        async with hypervisor.client() as a, hypervisor.client() as b:
            addr = (await a.call("mmap", {"size": PAGE_SIZE})).value
            await a.call("store", {"addr": addr, "data": b"mine"})
            err = await expect_errno(b, EFAULT, "load", {"addr": addr, "size": 4})
            assert "SIGSEGV" in err.message


class TestRoles:
    async def test_host_op_on_process_connection_is_eperm(self, hypervisor):
        """A process connection may not run host-role ops such as stats or swap-out (EPERM)."""
        async with hypervisor.client() as p:
            await expect_errno(p, EPERM, "stats")
            await expect_errno(p, EPERM, "swap-out", {"pid": p.hello["pid"], "addr": 0, "size": 4096})
            await expect_errno(p, EPERM, "boot")

    async def test_process_op_on_host_connection_is_eperm(self, hypervisor):
        """A host connection may not run process-role ops such as mmap or getpid (EPERM)."""
        async with hypervisor.client("host") as h:
            await expect_errno(h, EPERM, "mmap", {"size": PAGE_SIZE})
            await expect_errno(h, EPERM, "getpid")
            assert isinstance((await h.call("stats")).value["frames_allocated"], int)

    async def test_hello_required_first(self, hypervisor):
        """Any op before hello is refused with EPERM; after hello the same op works; a second hello is EPERM."""
        async with hypervisor.client(role=None) as c:
            await expect_errno(c, EPERM, "getpid")
            await expect_errno(c, EPERM, "stats")
            await expect_errno(c, EPERM, "mmap", {"size": PAGE_SIZE})
            pid = (await c.call("hello", {"role": "process", "secret": hypervisor.secret})).value["pid"]
            assert (await c.call("getpid")).value == pid
            await expect_errno(c, EPERM, "hello", {"role": "host", "secret": hypervisor.secret})

    async def test_wrong_secret_on_unix_socket_is_eperm(self, hypervisor):
        """With MTEKVM_SECRET set, a hello with a wrong or missing secret is refused (EPERM)."""
        async with hypervisor.client(role=None) as c:
            await expect_errno(c, EPERM, "hello", {"role": "host", "secret": "not-it"})
            await expect_errno(c, EPERM, "hello", {"role": "process"})
            await expect_errno(c, EPERM, "stats")


class TestListeners:
    def test_unix_socket_is_mode_0600(self, hypervisor):
        """The hypervisor's Unix socket file is a socket with mode 0600."""
        st = os.stat(hypervisor.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600

    async def test_tcp_requires_the_secret_from_the_file(self, spawn_hypervisor, tmp_path):
        """A loopback TCP listener with --secret-file admits the file's secret and refuses others (EPERM)."""
        secret_file = tmp_path / "secret"
        secret_file.write_text("s3cret-for-tcp\n")
        hv = spawn_hypervisor("tcp:127.0.0.1:0", "--secret-file", str(secret_file), secret=None)
        assert hv.address.startswith("tcp:127.0.0.1:") and not hv.address.endswith(":0")
        hv.secret = "s3cret-for-tcp"
        async with hv.client("host") as h:
            assert "frames_allocated" in (await h.call("stats")).value
        async with hv.client("process") as p:
            assert (await p.call("getpid")).value == p.hello["pid"]
        async with hv.client(role=None) as c:
            await expect_errno(c, EPERM, "hello", {"role": "host", "secret": "wrong"})
            await expect_errno(c, EPERM, "hello", {"role": "process"})
        await hv.assert_healthy()

    async def test_missing_secret_file_is_created_0600(self, spawn_hypervisor, tmp_path):
        """--secret-file naming a missing file creates it mode 0600 with a fresh secret that clients must present."""
        secret_file = tmp_path / "new-secret"
        hv = spawn_hypervisor("tcp:127.0.0.1:0", "--secret-file", str(secret_file), secret=None)
        assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
        hv.secret = secret_file.read_text().strip()
        assert len(hv.secret) >= 32
        await hv.assert_healthy()
        async with hv.client(role=None) as c:
            await expect_errno(c, EPERM, "hello", {"role": "process", "secret": ""})

    def test_non_loopback_tcp_refused_without_allow_remote(self, spawn_hypervisor, tmp_path):
        """Listening on a non-loopback address without --allow-remote exits non-zero and says why."""
        secret_file = tmp_path / "secret"
        secret_file.write_text("x" * 32)
        with pytest.raises(spawn_hypervisor.Failed) as info:
            spawn_hypervisor("tcp:0.0.0.0:0", "--secret-file", str(secret_file))
        assert info.value.returncode not in (None, 0)
        assert "non-loopback" in info.value.stderr and "--allow-remote" in info.value.stderr

    def test_tcp_without_secret_refused(self, spawn_hypervisor):
        """A TCP listener with neither --secret-file nor MTEKVM_SECRET exits non-zero and asks for a secret."""
        with pytest.raises(spawn_hypervisor.Failed) as info:
            spawn_hypervisor("tcp:127.0.0.1:0", secret=None)
        assert info.value.returncode not in (None, 0)
        assert "secret" in info.value.stderr

    def test_bad_listen_address_refused(self, spawn_hypervisor):
        """A --listen value that is neither unix:PATH nor tcp:HOST:PORT exits non-zero naming the forms."""
        with pytest.raises(spawn_hypervisor.Failed) as info:
            spawn_hypervisor("udp:127.0.0.1:9")
        assert info.value.returncode not in (None, 0)
        assert "unix:PATH" in info.value.stderr

    async def test_stale_socket_file_is_replaced(self, spawn_hypervisor, tmp_path):
        """A leftover socket file from a dead hypervisor does not stop a new one from listening there."""
        path = tmp_path / "stale.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
        hv = spawn_hypervisor(f"unix:{path}", workdir=tmp_path)
        await hv.assert_healthy()


def vm_rss_mib(pid: int) -> float:
    """VmRSS of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


class TestMemoryReuse:
    CYCLES = 60

    async def _cycle(self, hv, backing: str) -> tuple[float, dict]:
        """Map, fully tag and unmap a 2 MiB region CYCLES times; returns (RSS growth in MiB, stats after)."""
        async with hv.client() as p:
            async def once():
                addr = (await p.call("mmap", {"size": 2 * MiB, "backing": backing, "prot": RW_MTE})).value
                await p.call("stg", {"addr": addr, "tag": 3, "size": 2 * MiB})
                await p.call("munmap", {"addr": addr, "size": 2 * MiB})

            for _ in range(5):  # warm up the allocator and the interpreter
                await once()
            before = vm_rss_mib(hv.pid)
            for _ in range(self.CYCLES):
                await once()
            after = vm_rss_mib(hv.pid)
        return after - before, await hv.stats()

    @pytest.mark.parametrize("backing", ["anon", "hugetlb"])
    async def test_map_touch_unmap_cycles_do_not_grow_the_hypervisor(self, fresh_hypervisor, backing):
        """Mapping, tagging and unmapping 2 MiB sixty times reuses freed frames: RSS grows by under 10 MiB."""
        growth, st = await self._cycle(fresh_hypervisor, backing)
        assert st["frames_allocated"] == 0
        assert growth < 10, f"{backing}: RSS grew {growth:.1f} MiB over {self.CYCLES} cycles of 2 MiB"


class TestListenerSafety:
    @pytest.mark.parametrize("content", ["", "  \n"], ids=["empty", "blank"])
    async def test_empty_secret_file_does_not_open_tcp_to_everyone(self, spawn_hypervisor, tmp_path, content):
        """An empty secret file either stops the TCP listener from starting or still refuses a hello without secret."""
        secret_file = tmp_path / "secret"
        secret_file.write_text(content)
        try:
            hv = spawn_hypervisor("tcp:127.0.0.1:0", "--secret-file", str(secret_file), secret=None)
        except spawn_hypervisor.Failed as exc:
            assert exc.returncode not in (None, 0)
            assert "secret" in exc.stderr
            return
        async with hv.client(role=None) as c:
            r = await c.call_raw("hello", {"role": "host"})
            assert r["ok"] is False and r["errno"] == EPERM, f"no secret was needed: {r}"

    async def test_second_hypervisor_does_not_steal_a_live_socket(self, spawn_hypervisor, tmp_path):
        """Starting a hypervisor on the socket path of a live one fails, and the live one stays reachable there."""
        first = spawn_hypervisor(workdir=tmp_path / "first")
        try:
            second = spawn_hypervisor(first.address, workdir=tmp_path / "second")
        except spawn_hypervisor.Failed as exc:
            assert exc.returncode not in (None, 0)
        else:
            pytest.fail(f"a second hypervisor (alive: {second.alive()}) unlinked the live socket of the first "
                        "and now listens in its place")
        async with first.client("host") as h:  # the first one's secret works only on the first one
            assert "frames_allocated" in (await h.call("stats")).value
