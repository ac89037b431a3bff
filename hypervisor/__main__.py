"""``python -m hypervisor --listen unix:PATH|tcp:HOST:PORT``: run one modelled host.

Prints ``listening on ADDR`` once ready (a launcher waits for that line).
With TCP a secret is always required: ``--secret-file F`` reads it (or, if F
does not exist, writes a fresh one there, mode 0600); clients present it in
``hello``. Binding a non-loopback address needs ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import sys

import trio

from hypervisor.kernel import Kernel
from hypervisor.listen import AddressError, listener_address, open_listener, parse_address
from hypervisor.server import Hypervisor
from shared.bugs import BUGS


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


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m hypervisor", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="unix:PATH or tcp:HOST:PORT")
    p.add_argument("--no-mte", action="store_true", help="model a CPU without MTE")
    p.add_argument("--ram", type=_size, default=256 << 20, help="RAM size (default 256MiB)")
    p.add_argument("--swap", type=_size, default=64 << 20, help="swap size (default 64MiB)")
    p.add_argument("--bug", action="append", default=[], choices=sorted(BUGS), help="switch on a bug-zoo race")
    p.add_argument("--secret-file", help="file holding the secret clients must present")
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback TCP address")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        kind, where = parse_address(args.listen)
    except AddressError as exc:
        p.error(str(exc))
    secret = None
    if args.secret_file:
        secret = _read_secret(args.secret_file)
    elif os.environ.get("MTEKVM_SECRET"):
        secret = os.environ["MTEKVM_SECRET"]
    if secret is not None and not secret:
        p.error("the secret is empty: put a real secret in the file (or delete it to have one made)")
    if kind == "tcp":
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

    async def run():
        try:
            listener = await open_listener(args.listen)
        except OSError as exc:
            print(f"python -m hypervisor: cannot listen on {args.listen}: {exc}", file=sys.stderr)
            return 1
        print(f"listening on {listener_address(listener, args.listen)}", flush=True)
        await trio.serve_listeners(hv.serve, [listener])
        return 0

    try:
        return trio.run(run)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
