"""``python -m hypervisor --listen unix:PATH|tcp:HOST:PORT``: run one modelled host.

Prints ``listening on ADDR`` once ready (a launcher waits for that line).
With TCP a secret is always required: ``--secret-file F`` reads it (or, if F
does not exist, writes a fresh one there, mode 0600); clients present it in
``hello``. Binding a non-loopback address needs ``--allow-remote``.

A launcher passes ``--lifeline-fd N`` (:mod:`shared.lifeline`): the host
stops when that pipe reaches end-of-file, i.e. when the launcher has died, by
whatever signal; ``--remove-dir DIR`` names the launcher's private folder
(the socket's; with TCP a directory of ours with mode 0700), removed when
the host exits, for that reason too. SIGTERM
stops the host cleanly as well.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import stat
import sys

import trio

from hypervisor.kernel import Kernel
from hypervisor.server import Hypervisor
from shared import lifeline
from shared.bugs import BUGS
from shared.transport import AddressError, listener_address, open_listener, parse_address


def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    for u, m in units.items():
        if text.endswith(u):
            return int(text[: -len(u)]) * m
    return int(text, 0)


def _read_secret(path: str) -> str:
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def _inside(path: str, folder: str) -> bool:
    """``path`` is directly inside ``folder`` (what --remove-dir may remove is the socket's own folder)."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(folder)


def _private_folder(folder: str) -> bool:
    """``folder`` is a launcher's private folder: a directory of ours that nobody else may enter (mkdtemp's 0700).

    What --remove-dir may remove when the host listens on TCP (there is no socket file to tie it to).
    """
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    real = os.path.realpath(folder)
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
            and real not in ("/", os.path.realpath(os.path.expanduser("~"))))


#: glibc's mallopt() parameter M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3


def _return_large_buffers_to_the_os(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; returns whether it was set.

    glibc raises the threshold to the size of each mmapped block it frees (up
    to 32 MiB), so after the first 16 MiB reply every later one is carved from
    the heap, and the heap keeps those pages once they are freed: a 1 GiB
    COPY_TAGS dump left 30-40 MiB in the hypervisor's RSS for good. A fixed
    threshold keeps large buffers mmapped, so freeing one gives it back. Other
    C libraries: nothing to do.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _collect_garbage_less_often() -> None:
    """Run the cyclic garbage collector's youngest generation every 50,000 allocations, not 700.

    The model of a 1 GiB guest holds millions of objects (a ``Pte``, a ``Page``
    and their dict entries per page) and a bulk copy allocates a few per page,
    so the default threshold ran a collection every few hundred pages: 20-35%
    of the CPU time of a 16 MiB store or load. Little of the model's garbage is
    cyclic, so memory does not grow for it.
    """
    gc.set_threshold(50_000, 20, 100)


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    _return_large_buffers_to_the_os()
    _collect_garbage_less_often()
    p = argparse.ArgumentParser(prog="python -m hypervisor", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="unix:PATH or tcp:HOST:PORT")
    p.add_argument("--no-mte", action="store_true", help="model a CPU without MTE")
    p.add_argument("--ram", type=_size, default=256 << 20, help="RAM size (default 256MiB)")
    p.add_argument("--swap", type=_size, default=64 << 20, help="swap size (default 64MiB)")
    p.add_argument("--bug", action="append", default=[], choices=sorted(BUGS), help="switch on a bug-zoo race")
    p.add_argument("--secret-file", help="file holding the secret clients must present")
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback TCP address")
    p.add_argument("--remove-dir", metavar="DIR", help="remove this folder (the launcher's) when exiting")
    lifeline.add_argument(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        kind, where = parse_address(args.listen)
    except AddressError as exc:
        p.error(str(exc))
    if args.lifeline_fd is not None:
        try:
            lifeline.check_fd(args.lifeline_fd)
        except ValueError as exc:
            p.error(str(exc))
    if args.remove_dir and not (_inside(where, args.remove_dir) if isinstance(where, str)  # unix:PATH
                                else _private_folder(args.remove_dir)):
        p.error("--remove-dir must be the folder holding the unix:PATH socket, or with tcp a private folder "
                "of ours (mode 0700); it is removed on exit")
    secret = None
    if args.secret_file:
        secret = _read_secret(args.secret_file)
    elif os.environ.get("MTEKVM_SECRET"):
        secret = os.environ["MTEKVM_SECRET"]
    if secret is not None and not secret:
        p.error("the secret is empty: put a real secret in the file (or delete it to have one made)")
    if not isinstance(where, str):  # tcp:HOST:PORT
        host = where[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and not args.allow_remote:
            p.error(f"refusing to listen on non-loopback {host}: anyone reaching it could drive the host "
                    "(pass --allow-remote, with --secret-file)")
        if secret is None:
            p.error("TCP needs a secret: pass --secret-file FILE (created if missing) or set MTEKVM_SECRET")
    try:
        kernel = Kernel(mte=not args.no_mte, ram=args.ram, swap=args.swap, bugs=args.bug)
    except ValueError as exc:
        p.error(str(exc))
    hv = Hypervisor(kernel, secret=secret)

    def remove_dir() -> None:
        if args.remove_dir:
            shutil.rmtree(args.remove_dir, ignore_errors=True)

    async def run():
        try:
            listener = await open_listener(args.listen)
        except OSError as exc:
            print(f"python -m hypervisor: cannot listen on {args.listen}: {exc}", file=sys.stderr)
            return 1
        async with trio.open_nursery() as nursery:
            if args.lifeline_fd is not None:
                token = trio.lowlevel.current_trio_token()
                lifeline.watch(args.lifeline_fd, lambda: token.run_sync_soon(nursery.cancel_scope.cancel),
                               cleanup=[remove_dir])
            await nursery.start(_stop_on_sigterm, nursery.cancel_scope)
            nursery.start_soon(trio.serve_listeners, hv.serve, [listener])
            print(f"listening on {listener_address(listener, args.listen)}", flush=True)
        return 0

    try:
        return trio.run(run)
    except KeyboardInterrupt:
        return 0
    finally:
        remove_dir()


async def _stop_on_sigterm(scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM ends the host like a lost lifeline: connections are cleaned up, the run returns."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


if __name__ == "__main__":
    sys.exit(main())
