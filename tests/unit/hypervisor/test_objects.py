"""Named memory objects: shared within a session, invisible across sessions."""

from __future__ import annotations

from hypervisor.kernel import Kernel
from hypervisor.syscalls import PROCESS_OPS
from shared.abi import validate_args

RW_MTE = ["read", "write", "mte"]


async def call(k, task, op, **args):
    return await PROCESS_OPS[op](k, task, validate_args(op, args))


class TestObjectNamespace:
    async def test_same_session_shares_pages(self):
        """Two processes of one session naming the same memfd object see each other's data and tags."""
        k = Kernel()
        a, b = k.create_task("a", "s1"), k.create_task("b", "s1")
        x = await call(k, a, "mmap", size=4096, prot=RW_MTE, share="shared", backing="memfd", object="ram")
        y = await call(k, b, "mmap", size=4096, prot=RW_MTE, share="shared", backing="memfd", object="ram")
        await call(k, a, "stg", addr=x, tag=7, size=32)
        await call(k, a, "store", addr=x, tag=7, data=b"hi")
        assert (await call(k, b, "ldg", addr=y, size=32)).value == [7, 7]
        assert (await call(k, b, "load", addr=y, tag=7, size=2)).value == b"hi"

    async def test_other_session_gets_its_own_object(self):
        """A process of another session naming the same object gets fresh pages, not the first session's."""
        k = Kernel()
        a, c = k.create_task("a", "s1"), k.create_task("c", "s2")
        x = await call(k, a, "mmap", size=4096, prot=RW_MTE, share="shared", backing="memfd", object="ram")
        z = await call(k, c, "mmap", size=4096, prot=RW_MTE, share="shared", backing="memfd", object="ram")
        await call(k, a, "stg", addr=x, tag=7, size=32)
        await call(k, a, "store", addr=x, tag=7, data=b"secret")
        assert (await call(k, c, "ldg", addr=z, size=32)).value == [0, 0]
        assert (await call(k, c, "load", addr=z, size=6)).value == bytes(6)
