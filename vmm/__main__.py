"""``python -m vmm --hypervisor ADDR --listen unix:PATH --name NAME --session S``: one VMM process.

The VMM connects to the hypervisor at ADDR as the host process ``vmm:NAME``
in session S (the secret comes from ``MTEKVM_SECRET`` and is passed on to the
guest process it starts), creates the Unix socket PATH (mode 0600), prints
``listening on unix:PATH`` once ready and serves VMM_CONTROL connections
(:mod:`shared.control`) until a ``shutdown`` request or SIGTERM/SIGINT, which
destroy the VM and stop the guest before it exits.

Exit status: 0 after a shutdown, 1 when the hypervisor cannot be reached or
the socket cannot be created, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from hypervisor.listen import AddressError, open_listener, parse_address
from shared.wire import RemoteError
from vmm.guestlink import ProcessGuests
from vmm.hostlink import ProcessHost
from vmm.machine import Vmm, VmmError

PROG = "python -m vmm"
#: Seconds the control connections get to read the shutdown reply before the process exits.
CLOSE_GRACE = 2.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--hypervisor", required=True, help="the hypervisor's address: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--listen", required=True, help="the control socket: unix:PATH")
    p.add_argument("--name", required=True, help="the VM's name (the VMM is the process vmm:NAME)")
    p.add_argument("--session", default=None, help="the scenario's session (named memory objects are per session)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def run(args: argparse.Namespace, secret: str | None) -> int:
    """Run the VMM until shutdown.

    Args:
        args: the parsed command line.
        secret: the hypervisor's secret, or ``None``.

    Returns:
        The exit status.
    """
    path = parse_address(args.listen)[1]
    async with trio.open_nursery() as nursery:
        host = ProcessHost(nursery, address=args.hypervisor, secret=secret)
        vmm = Vmm(host.connect, ProcessGuests(nursery, args.hypervisor, secret), name=args.name,
                  session=args.session)
        try:
            await vmm.start()
            listener = await open_listener(args.listen)
        except (VmmError, RemoteError, OSError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 1
        try:
            print(f"listening on {args.listen}", flush=True)
            nursery.start_soon(trio.serve_listeners, vmm.serve, [listener])

            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        await vmm.shutdown()
                        return

            nursery.start_soon(on_signal)
            await vmm.done.wait()
            with trio.move_on_after(CLOSE_GRACE):
                await vmm.wait_clients_gone()
        finally:
            nursery.cancel_scope.cancel()
            try:
                os.unlink(path)
            except OSError:
                pass
    return 0


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    p = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format=f"vmm:{args.name}: %(levelname)s %(name)s: %(message)s")
    try:
        kind, _ = parse_address(args.listen)
        parse_address(args.hypervisor)
    except AddressError as exc:
        p.error(str(exc))
    if kind != "unix":
        p.error("--listen must be unix:PATH (the control channel is local)")
    secret = os.environ.get("MTEKVM_SECRET") or None
    try:
        return trio.run(run, args, secret)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
