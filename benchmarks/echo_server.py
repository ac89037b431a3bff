"""The baseline peer: a raw msgpack echo/sink/source server in its own trio process.

``python -m benchmarks.echo_server unix:PATH`` listens on a Unix socket, prints
``listening on unix:PATH`` and answers every request map with a response
envelope of the same shape the hypervisor sends, doing no work of its own:

* ``args`` holding ``data``: a sink; the reply's value is nil (mirrors a store);
* ``args`` holding an integer ``size``: a source; the value is that many zero
  bytes (mirrors a load);
* anything else: the value is ``args`` itself (mirrors a small op).

It uses msgpack's streaming ``Unpacker`` and ``receive_some(256 KiB)`` like the
hypervisor, but no envelope validation, no ABI checks, no kernel model and no
per-request task: what remains is the transport cost both sides share.
"""

from __future__ import annotations

import os
import sys

import msgpack
import trio

RECEIVE_SIZE = 256 * 1024
_ZEROS: dict[int, bytes] = {}


def _reply(msg) -> dict:
    args = msg.get("args") if isinstance(msg, dict) else None
    if isinstance(args, dict) and "data" in args:
        value = None
    elif isinstance(args, dict) and isinstance(args.get("size"), int) and 0 <= args["size"] <= 64 << 20:
        n = args["size"]
        value = _ZEROS.get(n)
        if value is None:
            value = _ZEROS[n] = bytes(n)
    else:
        value = args
    return {"t": "res", "id": msg.get("id") if isinstance(msg, dict) else None, "ok": True,
            "value": value, "fault": None}


async def serve(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=128 << 20)
    packer = msgpack.Packer(use_bin_type=True)
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            unpacker.feed(data)
            out = b"".join(packer.pack(_reply(msg)) for msg in unpacker)
            if out:
                try:
                    await stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def main(address: str) -> None:
    if not address.startswith("unix:"):
        raise SystemExit("usage: python -m benchmarks.echo_server unix:PATH")
    path = address[5:]
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    print(f"listening on {address}", flush=True)
    await trio.serve_listeners(serve, [trio.SocketListener(sock)])


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "")
    except KeyboardInterrupt:
        pass
