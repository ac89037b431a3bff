"""``python -m vmm --hypervisor ADDR --listen unix:PATH --name NAME --session S``: one VMM process.

The VMM connects to the hypervisor at ADDR as the host process ``vmm:NAME``
in session S (the secret comes from ``MTEKVM_SECRET`` and is passed on to the
guest process it starts), creates the Unix socket PATH (mode 0600), prints
``listening on unix:PATH`` once ready and serves VMM_CONTROL connections
(:mod:`shared.control`) until a ``shutdown`` request or SIGTERM/SIGINT, which
destroy the VM and stop the guest before it exits.

Live migration (:mod:`vmm.migration`): ``migrate-incoming`` listens on a Unix socket in
a private folder of this process (removed on exit) or on TCP 127.0.0.1:0; a hello must
prove ``MTEKVM_SECRET`` when it is set. Fault injection SIGKILLs this process. A
destination whose incoming migration fails discards the VM and exits (status 0).

Nothing outlives its run: the VMM also shuts down (the same way) when its
last control connection closes (the harness that drives it has gone), when
its hypervisor connection is lost (exit status 1), and when its
``--lifeline-fd`` pipe (:mod:`shared.lifeline`) reaches end-of-file, i.e.
its parent died, whatever the signal; if that shutdown wedges it exits hard
after a grace period. It removes ``--remove-dir DIR`` (its launcher's private
folder) on the way out. The guest it starts watches the VMM's own lifeline.

Exit status: 0 after a shutdown, 1 when the hypervisor cannot be reached (at
start or later) or the socket cannot be created, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys

import trio

from shared import lifeline
from shared.transport import AddressError, Connector, open_listener, parse_address
from shared.wire import RemoteError
from vmm.guestlink import ProcessGuests
from vmm.machine import Vmm, VmmError
from vmm.migration import ProcessTransport

PROG = "python -m vmm"
log = logging.getLogger("mtekvm.vmm")
#: Seconds the control connections get to read the shutdown reply before the process exits.
CLOSE_GRACE = 2.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--hypervisor", required=True, help="the hypervisor's address: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--listen", required=True, help="the control socket: unix:PATH")
    p.add_argument("--name", required=True, help="the VM's name (the VMM is the process vmm:NAME)")
    p.add_argument("--session", default=None, help="the scenario's session (named memory objects are per session)")
    p.add_argument("--remove-dir", metavar="DIR", help="remove this folder (the launcher's) when exiting")
    lifeline.add_argument(p)
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
    path = str(parse_address(args.listen)[1])  # a unix:PATH (main() refuses anything else)
    status = 0
    async with trio.open_nursery() as nursery:
        host = Connector(nursery, args.hypervisor, secret)
        # the migration socket goes in the launcher's private folder when there is one (removed even if we
        # are SIGKILLed), else in a temporary folder of our own
        transport = ProcessTransport(nursery, secret, args.remove_dir)
        vmm = Vmm(host.connect, ProcessGuests(nursery, args.hypervisor, secret), name=args.name,
                  session=args.session, migration=transport, die=_sigkill_self)
        stop = trio.Event()  # set (with a logged reason) when the VMM should shut down

        def stop_because(why: str) -> None:
            if not stop.is_set():
                log.info("vmm:%s: shutting down: %s", args.name, why)
                stop.set()

        if args.lifeline_fd is not None:
            token = trio.lowlevel.current_trio_token()
            lifeline.watch(args.lifeline_fd, lambda: token.run_sync_soon(stop_because, "the launcher has gone"),
                           cleanup=[lambda: _remove(path, args.remove_dir)])
        try:
            await vmm.start()
            listener = await open_listener(args.listen)
        except (VmmError, RemoteError, OSError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 1
        try:
            async def on_signal(task_status=trio.TASK_STATUS_IGNORED):
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    task_status.started()
                    async for signum in signals:
                        stop_because(signal.Signals(signum).name)
                        return

            async def on_hypervisor_lost():
                await host.lost.wait()
                if not vmm.closing:
                    nonlocal status
                    status = 1
                    print(f"{PROG}: {args.name}: lost the hypervisor connection ({args.hypervisor})",
                          file=sys.stderr, flush=True)
                    stop_because("lost the hypervisor connection")

            async def on_stop():
                await stop.wait()
                await vmm.shutdown()

            await nursery.start(on_signal)
            nursery.start_soon(on_hypervisor_lost)
            nursery.start_soon(on_stop)
            controls = _ControlCount(vmm, stop_because)
            nursery.start_soon(trio.serve_listeners, controls.serve, [listener])
            print(f"listening on {args.listen}", flush=True)
            await vmm.done.wait()
            if status == 0:  # a shutdown reply to deliver; nobody waits for one when the hypervisor is gone
                with trio.move_on_after(CLOSE_GRACE):
                    await vmm.wait_clients_gone()
        finally:
            nursery.cancel_scope.cancel()
            _remove(path, None)
            transport.close()
    return status


async def _sigkill_self() -> None:
    """Fault injection (a migration's kill-source/kill-destination): SIGKILL this process, now."""
    os.kill(os.getpid(), signal.SIGKILL)
    await trio.sleep_forever()  # not reached


class _ControlCount:
    """Serves control connections; once the last one has closed, the VMM has no one to obey and stops."""

    def __init__(self, vmm: Vmm, stop_because):
        self.vmm = vmm
        self.stop_because = stop_because
        self.open = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.open += 1
        try:
            await self.vmm.serve(stream)
        finally:
            self.open -= 1
            if self.open == 0:
                self.stop_because("its last control connection closed")


def _remove(path: str, folder: str | None) -> None:
    """Unlink the control socket, and remove the launcher's folder if we were given one."""
    try:
        os.unlink(path)
    except OSError:
        pass
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


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
    if args.lifeline_fd is not None:
        try:
            lifeline.check_fd(args.lifeline_fd)
        except ValueError as exc:
            p.error(str(exc))
    path = str(parse_address(args.listen)[1])  # a unix:PATH (checked above)
    socket_dir = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if args.remove_dir and socket_dir != os.path.realpath(args.remove_dir):
        p.error("--remove-dir must be the folder holding the --listen socket (it is removed on exit)")
    secret = os.environ.get("MTEKVM_SECRET") or None
    try:
        return trio.run(run, args, secret)
    except KeyboardInterrupt:
        return 0
    finally:
        if args.remove_dir:
            shutil.rmtree(args.remove_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
