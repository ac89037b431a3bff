"""The live-migration stream between two VMMs (format documented in docs/migration.md).

A migration connection carries, in each direction, a fixed header (:data:`MAGIC`
then the version as a 32-bit big-endian integer) and then records: a 32-bit
big-endian length and that many bytes of one msgpack map whose ``t`` names the
record. Each record is validated strictly on receipt (:func:`check_record`):
unknown types, missing or extra keys, wrong types, pages outside the layout and
oversized bodies are refused with EPROTO; a stream that ends or breaks is
ECONNRESET. Nothing a peer sends raises anything else.

Records (source -> destination unless said otherwise)::

    challenge  dst->src {nonce: bytes}                  (the destination speaks first)
    hello      {version, name, auth: HMAC-SHA256(secret, nonce) or nil}
    layout     {mte, ipa_bits, vcpus, slots: [{slot, ipa, size, flags, backing, object,
                                               hugepage_size, prot_mte, share}]}
    answer     dst->src {errno, message}                (0: the VM is built; else nothing was)
    pages      {pass, slot, first, data, tags}          (tags: 256 per page, nil without MTE)
    zero       {pass, slot, first, count}               (zero-page markers: the zoo's shortcut)
    pass-end   {pass, pages}
    stop       {}                                       (the source's vCPUs are paused)
    vcpus      {state}                                  (GUEST_CHANNEL vcpu-state-get)
    witness    {entries}                                (ghost-export, oracle equipment, or nil)
    end        {}
    resumed    dst->src {}                              (the VM runs on the destination)
    error      either way {errno, message}              (then the sender closes)
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import msgpack
import trio

from shared import wire
from shared.errno import ECONNRESET, EPROTO, ErrnoError

MAGIC = b"MTEKVM-MIGRATE\r\n"
VERSION = 1
_HEADER = struct.Struct(">16sI")
_LENGTH = struct.Struct(">I")
PAGE_SIZE = 4096
TAGS_PER_PAGE = 256
#: Largest page run one record may carry (bytes of data).
MAX_RUN = 16 << 20
#: Largest record body (a page run with its tags, or a witness).
MAX_RECORD = 64 << 20
#: Deepest nesting of lists and maps a record may have.
MAX_DEPTH = 32
NONCE_SIZE = 32
BACKINGS = ("anon", "anon-shared", "memfd", "shmem", "file", "hugetlb")
SLOT_FLAGS = ("log-dirty-pages", "readonly")


class StreamError(ErrnoError):
    """The migration stream failed: EPROTO (malformed), ECONNRESET (ended or broken), EPERM (auth)."""


def auth_tag(secret: str, nonce: bytes) -> bytes:
    """The hello's proof that the source knows the destination host's secret."""
    return hmac.new(secret.encode(), b"mtekvm-migrate\0" + nonce, hashlib.sha256).digest()


def auth_ok(secret: str | None, nonce: bytes, auth: bytes | None) -> bool:
    """Whether ``auth`` proves ``secret`` (any hello passes when there is no secret); constant time."""
    if secret is None:
        return True
    return auth is not None and hmac.compare_digest(auth_tag(secret, nonce), auth)


# ---- validation ---------------------------------------------------------------------------

def _bad(why: str) -> StreamError:
    return StreamError(EPROTO, f"malformed migration record: {why}")


def _uint(rec: dict, key: str, hi: int = (1 << 64) - 1) -> int:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise _bad(f"{rec['t']}.{key} must be an integer 0..{hi}")
    return v


def _depth_ok(obj: Any, budget: int) -> bool:
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            if d >= budget:
                return False
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            if d >= budget:
                return False
            stack.extend((v, d + 1) for v in o)
    return True


_FIELDS: dict[str, tuple[str, ...]] = {
    "challenge": ("nonce",), "hello": ("version", "name", "auth"),
    "layout": ("mte", "ipa_bits", "vcpus", "slots"), "answer": ("errno", "message"),
    "pages": ("pass", "slot", "first", "data", "tags"), "zero": ("pass", "slot", "first", "count"),
    "pass-end": ("pass", "pages"), "stop": (), "vcpus": ("state",), "witness": ("entries",), "end": (),
    "resumed": (), "error": ("errno", "message"),
}
#: Every record type.
RECORD_TYPES = tuple(_FIELDS)
_SLOT_KEYS = ("slot", "ipa", "size", "flags", "backing", "object", "hugepage_size", "prot_mte", "share")


#: Keys a layout slot has only when it is bound to a node or backed by a named region (physical memory).
_SLOT_PLACE_KEYS = ("node", "region")


def _check_slot(s: Any) -> dict:
    if not isinstance(s, dict) or not set(_SLOT_KEYS) <= set(s) <= set(_SLOT_KEYS + _SLOT_PLACE_KEYS):
        raise _bad(f"layout.slots items must be maps of exactly {', '.join(_SLOT_KEYS)} (and node, region)")
    if any(not isinstance(s[k], str) or not 0 < len(s[k]) <= 64 for k in _SLOT_PLACE_KEYS if k in s):
        raise _bad("layout slot node and region must be names")
    s = dict(s, t="layout.slot")
    for k in ("slot", "ipa", "size", "hugepage_size"):
        _uint(s, k)
    if s["slot"] >= 1 << 15 or s["size"] == 0 or (s["ipa"] | s["size"]) % PAGE_SIZE:
        raise _bad("a layout slot needs a slot id < 32768 and a page-aligned, non-empty ipa and size")
    if not isinstance(s["flags"], list) or any(f not in SLOT_FLAGS for f in s["flags"]):
        raise _bad(f"layout slot flags must be a list of {', '.join(SLOT_FLAGS)}")
    if s["backing"] not in BACKINGS or s["share"] not in ("private", "shared"):
        raise _bad("layout slot backing or share is unknown")
    if s["object"] is not None and (not isinstance(s["object"], str) or len(s["object"]) > 256):
        raise _bad("layout slot object must be nil or a name")
    if not isinstance(s["prot_mte"], bool):
        raise _bad("layout slot prot_mte must be a boolean")
    del s["t"]
    return s


def check_record(rec: Any, expect: tuple[str, ...], layout: dict | None = None) -> dict:
    """Validate one decoded record.

    Args:
        rec: what msgpack decoded.
        expect: the record types allowed here (``error`` is always allowed).
        layout: the accepted layout, to check page records against (slots by id, mte).

    Returns:
        The record (``layout`` records get ``slots`` as a dict by slot id under ``by_slot``).

    Raises:
        StreamError: EPROTO, saying what is wrong.
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("t"), str):
        raise _bad("a record must be a map with a string t")
    t = rec["t"]
    if t not in _FIELDS:
        raise _bad(f"unknown record type {t[:40]!r}")
    if t not in expect and t != "error":
        raise _bad(f"{t} record where {' or '.join(expect)} was expected")
    if set(rec) != {"t", *_FIELDS[t]}:
        raise _bad(f"{t} must have exactly the keys {', '.join(_FIELDS[t]) or '(none)'}")
    if t == "challenge":
        if not isinstance(rec["nonce"], bytes) or len(rec["nonce"]) != NONCE_SIZE:
            raise _bad(f"challenge.nonce must be {NONCE_SIZE} bytes")
    elif t == "hello":
        _uint(rec, "version")
        if not isinstance(rec["name"], str) or len(rec["name"]) > 256:
            raise _bad("hello.name must be a name")
        if rec["auth"] is not None and not isinstance(rec["auth"], bytes):
            raise _bad("hello.auth must be bytes or nil")
    elif t == "layout":
        if not isinstance(rec["mte"], bool):
            raise _bad("layout.mte must be a boolean")
        _uint(rec, "ipa_bits", 64)
        _uint(rec, "vcpus", 512)
        if not isinstance(rec["slots"], list) or len(rec["slots"]) > 512:
            raise _bad("layout.slots must be a list of at most 512 slots")
        slots = [_check_slot(s) for s in rec["slots"]]
        by_slot = {s["slot"]: s for s in slots}
        if len(by_slot) != len(slots):
            raise _bad("layout.slots names a slot twice")
        rec = dict(rec, slots=slots, by_slot=by_slot)
    elif t in ("answer", "error"):
        _uint(rec, "errno", 4095)
        if not isinstance(rec["message"], str):
            raise _bad(f"{t}.message must be a string")
        if t == "error" and rec["errno"] == 0:
            raise _bad("error.errno must not be 0")
    elif t in ("pages", "zero"):
        _uint(rec, "pass")
        slot_id, first = _uint(rec, "slot"), _uint(rec, "first")
        if t == "pages":
            data, tags = rec["data"], rec["tags"]
            if not isinstance(data, bytes) or not data or len(data) % PAGE_SIZE or len(data) > MAX_RUN:
                raise _bad(f"pages.data must be 1..{MAX_RUN // PAGE_SIZE} whole pages")
            count = len(data) // PAGE_SIZE
            if tags is not None and (not isinstance(tags, bytes) or len(tags) != count * TAGS_PER_PAGE):
                raise _bad("pages.tags must be nil or 256 bytes per page")
        else:
            count = _uint(rec, "count", MAX_RUN // PAGE_SIZE)
            if count == 0:
                raise _bad("zero.count must be at least 1")
        if layout is not None:
            slot = layout["by_slot"].get(slot_id)
            if slot is None or first + count > slot["size"] // PAGE_SIZE:
                raise _bad(f"{t} for pages {first}..{first + count} of slot {slot_id}: not in the layout")
            if t == "pages" and (rec["tags"] is not None) != layout["mte"]:
                raise _bad("pages.tags must be given exactly when the VM has MTE")
    elif t == "pass-end":
        _uint(rec, "pass")
        _uint(rec, "pages")
    elif t == "vcpus":
        if not isinstance(rec["state"], dict) or not _depth_ok(rec["state"], 8):
            raise _bad("vcpus.state must be a map")
    elif t == "witness":
        if rec["entries"] is not None and (not isinstance(rec["entries"], dict)
                                           or not _depth_ok(rec["entries"], MAX_DEPTH)):
            raise _bad("witness.entries must be nil or a map")
    return rec


# ---- the stream -----------------------------------------------------------------------------

class RecordStream:
    """Records over one migration connection (one task sends, one receives).

    Args:
        stream: the connection (closed by :meth:`aclose`).
    """

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._buf = bytearray()
        self.peer_version: int | None = None
        self._packer = msgpack.Packer(use_bin_type=True)
        #: a socket's record bodies are read straight into this buffer (kept between records)
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._body = bytearray()

    async def send_header(self) -> None:
        """Send the magic and :data:`VERSION`."""
        await self._send(_HEADER.pack(MAGIC, VERSION))

    async def receive_header(self) -> int:
        """Receive the peer's magic and version.

        Raises:
            StreamError: EPROTO for another magic or version; ECONNRESET if the stream ends.
        """
        magic, version = _HEADER.unpack(await self._exactly(_HEADER.size))
        if magic != MAGIC:
            raise StreamError(EPROTO, "not a migration stream (bad magic)")
        if version != VERSION:
            raise StreamError(EPROTO, f"migration stream version {version}; this VMM speaks {VERSION}")
        self.peer_version = version
        return version

    async def send(self, record: dict) -> None:
        """Send one record (``t`` and its fields).

        Raises:
            StreamError: ECONNRESET when the peer has gone.
        """
        parts = wire.pack_parts(self._packer, record)  # a page run's data and tags are not copied
        if self._sock is None:  # a memory stream (in-process runs): the two writes it always took
            body = wire.join_parts(parts)
            await self._send(_LENGTH.pack(len(body)))
            await self._send(body)
            return
        parts[0] = _LENGTH.pack(sum(map(len, parts))) + parts[0]
        for part in parts:
            await self._send(part)

    async def receive(self, *expect: str, layout: dict | None = None) -> dict:
        """Receive and validate one record of a type in ``expect`` (or ``error``).

        Raises:
            StreamError: EPROTO (malformed), ECONNRESET (the stream ended or broke).
        """
        (n,) = _LENGTH.unpack(await self._exactly(_LENGTH.size))
        if n > MAX_RECORD:
            raise StreamError(EPROTO, f"malformed migration record: {n} bytes is over {MAX_RECORD}")
        body = await self._body_of(n)
        try:
            rec = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder refuses is malformed, never a crash
            raise StreamError(EPROTO, f"malformed migration record: {type(exc).__name__}") from None
        return check_record(rec, expect, layout)

    async def _body_of(self, n: int) -> bytes | memoryview:
        """The next ``n`` bytes; from a socket, a view of a buffer kept between records (valid until the next
        receive): read with ``recv_into``, no copy on our side."""
        if self._sock is None or n < wire.BIG_BIN or len(self._buf) >= n:
            return await self._exactly(n)
        if len(self._body) < n:
            self._body = bytearray(n)
        view = memoryview(self._body)[:n]
        got = len(self._buf)  # what the length's read brought of the body
        view[:got] = self._buf
        self._buf.clear()
        while got < n:
            try:
                k = await self._sock.recv_into(view[got:], n - got)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise StreamError(ECONNRESET, f"the migration connection broke: {exc}") from None
            if not k:
                raise StreamError(ECONNRESET, "the migration connection closed")
            got += k
        return view

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamError(ECONNRESET, f"the migration connection broke: {exc}") from None

    async def _exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            try:
                # the whole rest of the record at once (a memory stream moves its buffer on every read)
                chunk = await self.stream.receive_some(max(n - len(buf), 1 << 16))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise StreamError(ECONNRESET, f"the migration connection broke: {exc}") from None
            if not chunk:
                raise StreamError(ECONNRESET, "the migration connection closed")
            buf += chunk
        if len(buf) == n:
            out = bytes(buf)
            buf.clear()
            return out
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def aclose(self) -> None:
        """Close the connection (errors ignored)."""
        try:
            await self.stream.aclose()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass
