"""``python -m guest --hypervisor ADDR --channel-fd N --exit-fd M [--name NAME]``: one guest.

The VMM spawns this process for its VM with two inherited stream sockets:

* ``--channel-fd``: the VMM calls the guest here (:data:`shared.control.GUEST_CHANNEL`);
* ``--exit-fd``: the guest calls the VMM here (:data:`shared.control.EXIT_CHANNEL`).

The guest connects to the hypervisor at ``ADDR`` itself (``unix:PATH`` or
``tcp:HOST:PORT``) and introduces itself with hello role ``vcpu``, presenting
the secret from the environment variable ``MTEKVM_SECRET`` when there is one.
It serves the channel until the VMM closes it, then exits 0. With
``--lifeline-fd L`` (:mod:`shared.lifeline`; the VMM passes its own) it also
exits, status 1, when that pipe reaches end-of-file: the VMM died, whatever
the signal, so no guest outlives its VMM. Exit status 1: the hypervisor could
not be reached or refused the hello, or the VMM died; 2: bad arguments.
Logs go to stderr; nothing is written to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

import trio

from guest.agent import GuestAgent
from shared import lifeline, wire
from shared.transport import AddressError, Connector, Unreachable

log = logging.getLogger("mtekvm.guest")


def socket_stream(fd: int) -> trio.SocketStream:
    """Wrap an inherited stream socket descriptor in a trio stream (the stream owns the fd).

    Raises:
        OSError: ``fd`` is not an open socket.
    """
    sock = socket.socket(fileno=fd)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def run_guest(address: str, channel_fd: int, exit_fd: int, name: str, secret: str | None,
                    lifeline_fd: int | None = None) -> int:
    """Connect, say hello, serve the guest channel until it closes (or the VMM dies).

    Args:
        address: the hypervisor's ``unix:PATH`` / ``tcp:HOST:PORT``.
        channel_fd: the GUEST_CHANNEL socket (we serve it).
        exit_fd: the EXIT_CHANNEL socket (we call it).
        name: a label for the hypervisor's traces.
        secret: the hypervisor's secret, or None.
        lifeline_fd: the VMM's lifeline pipe, or None.

    Returns:
        The exit status: 0 when the VMM closed the channel, 1 when the hypervisor
        could not be reached or refused us, or the VMM died.
    """
    life = trio.CancelScope()
    if lifeline_fd is not None:
        token = trio.lowlevel.current_trio_token()
        lifeline.watch(lifeline_fd, lambda: token.run_sync_soon(life.cancel))
    with life:
        return await _run_guest(address, channel_fd, exit_fd, name, secret)
    log.info("guest %s: the VMM has gone, exiting", name)
    return 1


async def _run_guest(address: str, channel_fd: int, exit_fd: int, name: str, secret: str | None) -> int:
    try:
        channel = socket_stream(channel_fd)
        exit_stream = socket_stream(exit_fd)
    except OSError as exc:
        log.error("guest %s: the inherited channel sockets are unusable: %s", name, exc)
        return 1
    exits = wire.Client(exit_stream)
    hv: wire.Client | None = None
    status = 1
    async with trio.open_nursery() as nursery:
        try:
            hv, _ = await Connector(nursery, address, secret).connect("vcpu", name=name)
        except Unreachable as exc:  # "cannot reach the hypervisor at ADDR: why"
            log.error("guest %s: %s", name, exc)
        except AddressError as exc:
            log.error("guest %s: cannot reach the hypervisor at %s: %s", name, address, exc)
        except (wire.RemoteError, wire.WireError) as exc:
            log.error("guest %s: the hypervisor refused hello: %s", name, exc)
        else:
            await nursery.start(exits.run)
            log.info("guest %s: serving the guest channel", name)
            await GuestAgent(hv, exits).serve(channel)
            status = 0
        nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        for closer in (channel.aclose, exits.aclose) + ((hv.aclose,) if hv is not None else ()):
            try:
                await closer()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
    log.info("guest %s: channel closed, exiting with %d", name, status)
    return status


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m guest", description=__doc__.splitlines()[0])
    p.add_argument("--hypervisor", required=True, help="unix:PATH or tcp:HOST:PORT")
    p.add_argument("--channel-fd", type=int, required=True, help="inherited GUEST_CHANNEL socket")
    p.add_argument("--exit-fd", type=int, required=True, help="inherited EXIT_CHANNEL socket")
    p.add_argument("--name", default="guest", help="a label for logs and traces")
    lifeline.add_argument(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.lifeline_fd is not None:
        try:
            lifeline.check_fd(args.lifeline_fd)
        except ValueError as exc:
            p.error(str(exc))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    secret = os.environ.get("MTEKVM_SECRET") or None
    try:
        return trio.run(run_guest, args.hypervisor, args.channel_fd, args.exit_fd, args.name, secret,
                        args.lifeline_fd)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
