"""The VM snapshot file format (``snapshot`` / ``restore`` VMM ops): encoder, parser, validator.

Pure functions and one streaming encoder; no I/O policy (the caller opens, writes, renames,
maps). The format, version 1 (all integers little-endian; documented for users in
``docs/snapshot-format.md``)::

    preamble   8 bytes  MAGIC  b"\\x89MTESNAP"
               u32      VERSION (1)
               u32      header length H
    header     H bytes  msgpack map: {"layout": [{"slot", "ipa", "size", "backing", "flags"[, "node", "region"]}, ...],
                                      "vcpus": N, "mte": bool, "vcpu-state": any msgpack value,
                                      "page-size": 4096}
    records    repeated until the trailer:
               u32 slot, u32 flags (bit 0: tags follow), u64 first page (in the slot),
               u32 count (>= 1 pages), then count * 4096 data bytes,
               then count * 256 tag bytes (one 4-bit tag per byte, granule order) if bit 0
    trailer    8 bytes  END_MAGIC b"MTESNEND"
               u64 records, u64 pages, u64 tagged pages (pages with a non-zero tag)
               32 bytes SHA-256 of every byte of the file before these 32

Records are in layout order, then by first page, and never overlap. A page the file holds
no record for reads zero data and zero tags. The page counts are in the trailer (not the
header) so that a VMM can write the file in one pass while it reads guest memory.

Errors: :func:`parse` and :func:`check_compatible` raise :class:`SnapfileError` with EINVAL
(the contract's "not a snapshot file, a damaged one, another version" and "another layout,
vCPU count or MTE setting").
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import msgpack

from shared.abi import BACKINGS, MEMSLOT_FLAGS
from shared.errno import EINVAL, ErrnoError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SIZE

MAGIC = b"\x89MTESNAP"
VERSION = 1
END_MAGIC = b"MTESNEND"
#: magic, version, header length
PREAMBLE = struct.Struct("<8sII")
#: slot, flags, first page, page count
RECORD = struct.Struct("<IIQI")
#: end magic, records, pages, tagged pages (the digest follows)
TRAILER = struct.Struct("<8sQQQ")
DIGEST_SIZE = 32
TRAILER_SIZE = TRAILER.size + DIGEST_SIZE
#: record flag: the page run's tags follow its data
REC_TAGS = 1
REC_FLAGS = REC_TAGS
#: tag bytes per page (one tag per granule, one byte each: the KVM_ARM_MTE_COPY_TAGS format)
TAGS_PER_PAGE = MTE_GRANULES_PER_PAGE
#: the largest header a parser accepts (vCPU state with stage-1 tables fits many times over)
MAX_HEADER = 64 << 20
#: the largest record (pages) a parser accepts: 1 GiB of guest memory
MAX_RECORD_PAGES = (1 << 30) // PAGE_SIZE

ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_TAGS = bytes(TAGS_PER_PAGE)
#: the bytes a tag may be (tags are 4 bits)
_TAG_VALUES = bytes(range(16))

HEADER_KEYS = frozenset({"layout", "vcpus", "mte", "vcpu-state", "page-size"})
SLOT_KEYS = frozenset({"slot", "ipa", "size", "backing", "flags"})
#: Optional layout keys: a slot bound to a node, or backed by a named device region.
SLOT_PLACE_KEYS = frozenset({"node", "region"})


class SnapfileError(ErrnoError):
    """A file that is not a usable snapshot (``errno`` EINVAL; ``message`` says what is wrong and where)."""


def new_digest() -> Any:
    """The running checksum of a snapshot file (SHA-256)."""
    return hashlib.sha256()


@attrs.frozen
class SlotLayout:
    """One guest RAM memslot as a snapshot records it.

    Attributes:
        slot: the memslot id.
        ipa: its first guest-physical address (page aligned).
        size: bytes (a positive page multiple).
        backing: the backing kind (:data:`shared.abi.BACKINGS`).
        flags: the memslot flags when the snapshot was taken (informational).
        node, region: the node the slot's memory is bound to, or the named device region behind
            it (physical memory; absent from the header when None).
    """

    slot: int
    ipa: int
    size: int
    backing: str
    flags: tuple[str, ...] = ()
    node: str | None = None
    region: str | None = None

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def to_wire(self) -> dict:
        return {"slot": self.slot, "ipa": self.ipa, "size": self.size, "backing": self.backing,
                "flags": list(self.flags),
                **{k: v for k, v in (("node", self.node), ("region", self.region)) if v is not None}}

    def same_place(self, other: SlotLayout) -> bool:
        """Same IPA, size, backing kind, node and region (what restore requires; ids and flags may differ)."""
        return (self.ipa, self.size, self.backing, self.node, self.region) == \
            (other.ipa, other.size, other.backing, other.node, other.region)


@attrs.frozen
class Header:
    """The snapshot header: what the VM looked like.

    Attributes:
        layout: the guest RAM memslots, in the order their records come.
        vcpus: the vCPU count.
        mte: whether the VM had KVM_CAP_ARM_MTE.
        vcpu_state: the guest's vCPU state (registers and stage 1), as the guest reports it.
    """

    layout: tuple[SlotLayout, ...]
    vcpus: int
    mte: bool
    vcpu_state: Any = None

    def to_wire(self) -> dict:
        return {"layout": [s.to_wire() for s in self.layout], "vcpus": self.vcpus, "mte": self.mte,
                "vcpu-state": self.vcpu_state, "page-size": PAGE_SIZE}


@attrs.frozen
class Record:
    """One run of saved pages.

    Attributes:
        slot: the memslot id.
        first: the run's first page, counted from the slot's start.
        count: pages.
        data: ``count * PAGE_SIZE`` bytes (a view into the parsed buffer).
        tags: ``count * TAGS_PER_PAGE`` tag bytes, or None when every tag of the run is zero.
        tagged: pages of the run with a non-zero tag.
    """

    slot: int
    first: int
    count: int
    data: memoryview
    tags: memoryview | None
    tagged: int


@attrs.frozen
class Snapshot:
    """A parsed, validated snapshot file (its records are views into the caller's buffer)."""

    header: Header
    records: tuple[Record, ...]
    pages: int
    tagged_pages: int


def _err(msg: str) -> SnapfileError:
    return SnapfileError(EINVAL, msg)


# ---- encoding ------------------------------------------------------------------------------------

def encode_preamble(header: Header) -> bytes:
    """The file's first bytes: magic, version, header length, header."""
    body = msgpack.packb(header.to_wire(), use_bin_type=True)
    return PREAMBLE.pack(MAGIC, VERSION, len(body)) + body


def encode_record(slot: int, first: int, count: int, tagged: bool) -> bytes:
    """A record's fixed part (its data, then its tags if ``tagged``, follow it)."""
    return RECORD.pack(slot, REC_TAGS if tagged else 0, first, count)


def encode_trailer(records: int, pages: int, tagged_pages: int, digest: bytes) -> bytes:
    """The trailer; ``digest`` is the SHA-256 of the file up to (and including) the trailer's counts."""
    return TRAILER.pack(END_MAGIC, records, pages, tagged_pages) + digest


def tagged_pages_of(tags: bytes | memoryview, count: int) -> int:
    """How many of ``count`` pages in ``tags`` (one byte per granule) have a non-zero tag."""
    t = bytes(tags)
    if t.count(0) == len(t):
        return 0
    if t.find(ZERO_TAGS) < 0:  # no 256 zero bytes anywhere: every page has a non-zero tag
        return count
    return sum(1 for i in range(count) if t[i * TAGS_PER_PAGE:(i + 1) * TAGS_PER_PAGE] != ZERO_TAGS)


def kept_runs(data: bytes, tags: bytes | None, count: int) -> Iterator[tuple[int, int]]:
    """The runs ``(first, n)`` of pages among ``count`` that are not all zero (data and tags).

    A page whose data and tags are all zero may be left out of a snapshot; a page with zero
    data and a non-zero tag is kept.
    """
    if data.find(ZERO_PAGE) < 0:  # no 4 KiB of zeros anywhere: every page is kept
        if count:
            yield 0, count
        return
    if tags is not None and tags.count(0) == len(tags):
        tags = None
    start = None
    for i in range(count):
        zero = (data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == ZERO_PAGE
                and (tags is None or tags[i * TAGS_PER_PAGE:(i + 1) * TAGS_PER_PAGE] == ZERO_TAGS))
        if zero:
            if start is not None:
                yield start, i - start
                start = None
        elif start is None:
            start = i
    if start is not None:
        yield start, count - start


class SnapshotWriter:
    """Streams one snapshot file to ``sink`` (anything that takes bytes: ``file.write``).

    Call :meth:`add_run` for each run of guest pages read, in layout order and page order,
    then :meth:`finish`. All-zero pages (data and tags) are left out; the checksum is computed
    on the way, so nothing is kept in memory but the current run.

    Args:
        sink: ``sink(chunk)`` writes bytes (or a memoryview) to the file.
        header: the VM's layout, vCPU count, MTE setting and vCPU state.
    """

    def __init__(self, sink: Callable[[Any], object], header: Header):
        self._sink = sink
        self._hash = new_digest()
        self.header = header
        self._slots = {s.slot: (i, s) for i, s in enumerate(header.layout)}
        self._pos: tuple[int, int] = (0, 0)  # (layout index, next page) every new run must start at or after
        self.records = 0
        self.pages = 0
        self.tagged_pages = 0
        self.size = 0
        self.finished = False
        self._emit(encode_preamble(header))

    def _emit(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self._sink(chunk)
        self.size += len(chunk)

    def add_run(self, slot: int, first: int, data: bytes, tags: bytes | None = None) -> tuple[int, int]:
        """Add pages ``first..`` of ``slot``: their data and (MTE VMs) their tags.

        Args:
            slot: a memslot id of the header's layout.
            first: the first page, counted from the slot's start.
            data: a page multiple of bytes.
            tags: ``TAGS_PER_PAGE`` bytes per page, or None (every tag zero).

        Returns:
            ``(pages, tagged pages)`` written from this run (all-zero pages are left out).

        Raises:
            ValueError: a run outside the slot, before an earlier run, of the wrong length,
                or with tags for a VM without MTE (a caller's bug, not a file's).
        """
        if self.finished:
            raise ValueError("the snapshot is finished")
        if slot not in self._slots:
            raise ValueError(f"slot {slot} is not in the snapshot's layout")
        index, lay = self._slots[slot]
        if len(data) % PAGE_SIZE:
            raise ValueError("data must be whole pages")
        count = len(data) // PAGE_SIZE
        if tags is not None and len(tags) != count * TAGS_PER_PAGE:
            raise ValueError(f"{count} pages need {count * TAGS_PER_PAGE} tag bytes, not {len(tags)}")
        if tags is not None and not self.header.mte:
            raise ValueError("tags for a VM without MTE")
        if (index, first) < self._pos or first + count > lay.pages:
            raise ValueError(f"pages {first}..{first + count} of slot {slot} are out of order or outside it")
        self._pos = (index, first + count)
        data = bytes(data)
        tags = bytes(tags) if tags is not None else None
        view = memoryview(data)
        pages = tagged = 0
        for start, n in kept_runs(data, tags, count):
            run_tags = tags[start * TAGS_PER_PAGE:(start + n) * TAGS_PER_PAGE] if tags is not None else None
            t = tagged_pages_of(run_tags, n) if run_tags is not None else 0
            self._emit(encode_record(slot, first + start, n, t > 0))
            self._emit(view[start * PAGE_SIZE:(start + n) * PAGE_SIZE])
            if t:
                assert run_tags is not None
                self._emit(run_tags)
            self.records += 1
            pages += n
            tagged += t
        self.pages += pages
        self.tagged_pages += tagged
        return pages, tagged

    def finish(self) -> None:
        """Write the trailer (counts and checksum); the file is complete."""
        if self.finished:
            raise ValueError("the snapshot is finished")
        counts = TRAILER.pack(END_MAGIC, self.records, self.pages, self.tagged_pages)
        self._hash.update(counts)
        self._sink(counts)
        self._sink(self._hash.digest())
        self.size += TRAILER_SIZE
        self.finished = True


def encode(header: Header, runs: Iterable[tuple[int, int, bytes, bytes | None]]) -> bytes:
    """A whole snapshot file in memory (tests and small tools): ``runs`` are ``add_run``'s arguments."""
    out: list[bytes] = []
    w = SnapshotWriter(lambda b: out.append(bytes(b)), header)
    for slot, first, data, tags in runs:
        w.add_run(slot, first, data, tags)
    w.finish()
    return b"".join(out)


# ---- decoding ------------------------------------------------------------------------------------

def _int_in(v: Any, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _err(f"damaged snapshot: {what} is not an integer in {lo}..{hi}")
    return v


def parse_header(raw: Any) -> Header:
    """Check a decoded header map and build its :class:`Header`.

    Raises:
        SnapfileError: EINVAL for a missing, unknown or ill-typed key, an unaligned or
            overlapping slot, a backing kind the ABI does not know.
    """
    if not isinstance(raw, dict) or set(raw) != HEADER_KEYS:
        raise _err("damaged snapshot: the header is not a map of " + ", ".join(sorted(HEADER_KEYS)))
    if raw["page-size"] != PAGE_SIZE or isinstance(raw["page-size"], bool):
        raise _err(f"snapshot of another page size ({raw['page-size']!r}); this VMM uses {PAGE_SIZE}")
    if not isinstance(raw["mte"], bool):
        raise _err("damaged snapshot: header mte is not a boolean")
    vcpus = _int_in(raw["vcpus"], "header vcpus", 0, 1 << 16)
    if not isinstance(raw["layout"], list):
        raise _err("damaged snapshot: header layout is not a list")
    layout: list[SlotLayout] = []
    for i, s in enumerate(raw["layout"]):
        if not isinstance(s, dict) or not SLOT_KEYS <= set(s) <= SLOT_KEYS | SLOT_PLACE_KEYS \
                or any(not isinstance(s[k], str) or not 0 < len(s[k]) <= 64 for k in SLOT_PLACE_KEYS if k in s):
            raise _err(f"damaged snapshot: layout entry {i} is not a map of " + ", ".join(sorted(SLOT_KEYS)))
        slot = _int_in(s["slot"], f"layout entry {i} slot", 0, 0xFFFFFFFF)
        ipa = _int_in(s["ipa"], f"layout entry {i} ipa")
        size = _int_in(s["size"], f"layout entry {i} size", PAGE_SIZE)
        if (ipa | size) % PAGE_SIZE or ipa + size > 1 << 64:
            raise _err(f"damaged snapshot: layout entry {i} is not page aligned")
        if s["backing"] not in BACKINGS:
            raise _err(f"damaged snapshot: layout entry {i} has an unknown backing {s['backing']!r}")
        flags = s["flags"]
        if not isinstance(flags, list) or not all(f in MEMSLOT_FLAGS for f in flags):
            raise _err(f"damaged snapshot: layout entry {i} has unknown flags")
        layout.append(SlotLayout(slot, ipa, size, s["backing"], tuple(flags), s.get("node"), s.get("region")))
    if len({s.slot for s in layout}) != len(layout):
        raise _err("damaged snapshot: a memslot appears twice in the layout")
    spans = sorted((s.ipa, s.ipa + s.size) for s in layout)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise _err("damaged snapshot: memslots overlap in the layout")
    return Header(tuple(layout), vcpus, raw["mte"], raw["vcpu-state"])


def parse(buf: bytes | bytearray | memoryview | Any) -> Snapshot:
    """Parse and validate a whole snapshot file held in ``buf`` (bytes, or an ``mmap``).

    Everything is checked before anything is returned: magic, version, lengths, the
    checksum, the header, every record (slot, bounds, order, flags, tag values) and the
    trailer's counts. The records' data and tags are views into ``buf`` (no copy).

    Raises:
        SnapfileError: EINVAL, its message saying what is wrong (not a snapshot file,
            another version, or damaged: truncated, checksum mismatch, bad header/record).
    """
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    n = len(mv)
    if n < len(MAGIC) or bytes(mv[:len(MAGIC)]) != MAGIC:
        raise _err("not a snapshot file (no snapshot magic)")
    if n < PREAMBLE.size:
        raise _err(f"damaged snapshot: truncated at {n} bytes, inside the preamble")
    _, version, hlen = PREAMBLE.unpack_from(mv, 0)
    if version != VERSION:
        raise _err(f"snapshot of another version ({version}); this VMM reads version {VERSION}")
    if hlen > MAX_HEADER:
        raise _err(f"damaged snapshot: header length {hlen} is over {MAX_HEADER}")
    body = PREAMBLE.size + hlen
    if n < body + TRAILER_SIZE:
        raise _err(f"damaged snapshot: truncated at {n} bytes (the header and trailer alone need "
                   f"{body + TRAILER_SIZE})")
    digest = new_digest()
    digest.update(mv[:n - DIGEST_SIZE])
    if digest.digest() != bytes(mv[n - DIGEST_SIZE:]):
        raise _err("damaged snapshot: checksum mismatch (truncated, extended or corrupted)")
    try:
        raw = msgpack.unpackb(mv[PREAMBLE.size:body], raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a damaged file
        raise _err(f"damaged snapshot: the header is not msgpack ({type(exc).__name__})") from None
    header = parse_header(raw)
    records = parse_records(mv, body, n - TRAILER_SIZE, header)
    end, nrec, pages, tagged = TRAILER.unpack_from(mv, n - TRAILER_SIZE)
    if end != END_MAGIC:
        raise _err("damaged snapshot: no trailer magic")
    if (nrec, pages, tagged) != (len(records), sum(r.count for r in records), sum(r.tagged for r in records)):
        raise _err("damaged snapshot: the trailer's counts do not match the records")
    return Snapshot(header, tuple(records), pages, tagged)


def parse_records(mv: memoryview, pos: int, end: int, header: Header) -> list[Record]:
    """The records in ``mv[pos:end]``, checked against ``header`` (see :func:`parse`)."""
    index = {s.slot: (i, s) for i, s in enumerate(header.layout)}
    records: list[Record] = []
    after = (0, 0)  # (layout index, page) the next record may start at
    while pos < end:
        if end - pos < RECORD.size:
            raise _err(f"damaged snapshot: a record header at offset {pos} runs into the trailer")
        slot, flags, first, count = RECORD.unpack_from(mv, pos)
        where = f"record {len(records)} at offset {pos}"
        if slot not in index:
            raise _err(f"damaged snapshot: {where} names slot {slot}, which the layout does not have")
        i, lay = index[slot]
        if flags & ~REC_FLAGS or (flags & REC_TAGS and not header.mte):
            raise _err(f"damaged snapshot: {where} has flags {flags:#x}")
        if not 1 <= count <= MAX_RECORD_PAGES or first + count > lay.pages:
            raise _err(f"damaged snapshot: {where} (pages {first}+{count}) is outside slot {slot}")
        if (i, first) < after:
            raise _err(f"damaged snapshot: {where} is out of order or overlaps the one before")
        after = (i, first + count)
        pos += RECORD.size
        size = count * PAGE_SIZE + (count * TAGS_PER_PAGE if flags & REC_TAGS else 0)
        if end - pos < size:
            raise _err(f"damaged snapshot: {where} runs into the trailer")
        data = mv[pos:pos + count * PAGE_SIZE]
        tags = None
        tagged = 0
        if flags & REC_TAGS:
            tags = mv[pos + count * PAGE_SIZE:pos + size]
            raw_tags = bytes(tags)
            if raw_tags.translate(None, _TAG_VALUES):
                raise _err(f"damaged snapshot: {where} holds a tag over 15")
            tagged = tagged_pages_of(raw_tags, count)
            if tagged == 0:
                raise _err(f"damaged snapshot: {where} says tags follow but every tag is zero")
        pos += size
        records.append(Record(slot, first, count, data, tags, tagged))
    return records


def check_compatible(header: Header, layout: Sequence[SlotLayout], vcpus: int, mte: bool) -> None:
    """Check that a snapshot fits a VM: same RAM memslots (IPA, size, backing kind), vCPU count and MTE.

    Raises:
        SnapfileError: EINVAL naming the first difference.
    """
    if mte != header.mte:
        raise _err(f"the snapshot is of a VM {'with' if header.mte else 'without'} MTE; this VM "
                   f"{'has' if mte else 'does not have'} it")
    if vcpus != header.vcpus:
        raise _err(f"the snapshot has {header.vcpus} vCPU(s); this VM has {vcpus}")
    mine = sorted(layout, key=lambda s: s.ipa)
    theirs = sorted(header.layout, key=lambda s: s.ipa)
    if len(mine) != len(theirs) or not all(a.same_place(b) for a, b in zip(mine, theirs, strict=True)):
        def show(slots: Iterable[SlotLayout]) -> str:
            return ", ".join(f"{s.ipa:#x}+{s.size:#x} {s.backing}"
                             + "".join(f" {k} {v}" for k, v in (("node", s.node), ("region", s.region)) if v)
                             for s in slots) or "none"
        raise _err(f"the snapshot's memory layout ({show(theirs)}) is not this VM's ({show(mine)})")


def slot_map(header: Header, layout: Sequence[SlotLayout]) -> dict[int, SlotLayout]:
    """Snapshot slot id -> the VM's slot at the same IPA (after :func:`check_compatible`)."""
    by_ipa = {s.ipa: s for s in layout}
    return {s.slot: by_ipa[s.ipa] for s in header.layout}
