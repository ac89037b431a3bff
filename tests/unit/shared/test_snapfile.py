"""The snapshot file format (shared.snapfile): encoding, parsing, and refusing every damaged file with EINVAL."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import snapfile as sf
from shared.errno import EINVAL
from shared.mte import PAGE_SIZE

P = PAGE_SIZE
T = sf.TAGS_PER_PAGE
RAM = 0x4000_0000

LAYOUT = (sf.SlotLayout(0, RAM, 16 * P, "memfd"), sf.SlotLayout(1, RAM + 0x10_0000, 8 * P, "anon", ("readonly",)))
HEADER = sf.Header(LAYOUT, 2, True, [{"sctlr": {"ata": True, "tcf": "sync"}, "gcr": 3}, {"tco": True}])


def page(byte: int) -> bytes:
    return bytes([byte]) * P


def tags_of(*values: int) -> bytes:
    """One page's tags per value (every granule of that page carries it)."""
    return b"".join(bytes([v]) * T for v in values)


def sample_file() -> bytes:
    """A file with: a data-only run, a zero page left out, a zero-data page with tags, a tagged run, two slots."""
    runs = [
        (0, 0, page(1) + page(0) + page(2) + page(0), tags_of(0, 0, 5, 7)),   # page 3: zero data, tag 7
        (0, 8, page(3) + page(4), tags_of(0, 0)),                             # untagged: no tag bytes
        (1, 2, page(9), tags_of(15)),
    ]
    return sf.encode(HEADER, runs)


def reseal(blob: bytes | bytearray) -> bytes:
    """Recompute the checksum of ``blob`` (so a structural fault is not caught by the checksum alone)."""
    body = bytes(blob[:-sf.DIGEST_SIZE])
    return body + _sha(body)


def _sha(body: bytes) -> bytes:
    d = sf.new_digest()
    d.update(body)
    return d.digest()


def refused(blob: bytes | bytearray, match: str | None = None) -> sf.SnapfileError:
    with pytest.raises(sf.SnapfileError, match=match) as info:
        sf.parse(blob)
    assert info.value.errno == EINVAL
    return info.value


def regions(blob: bytes) -> dict[str, range]:
    """Byte ranges of each part of ``blob``: magic, version, header length, header, records, trailer."""
    _, _, hlen = sf.PREAMBLE.unpack_from(blob, 0)
    body = sf.PREAMBLE.size + hlen
    n = len(blob)
    return {"magic": range(0, 8), "version": range(8, 12), "header-length": range(12, 16),
            "header": range(16, body), "records": range(body, n - sf.TRAILER_SIZE),
            "trailer-counts": range(n - sf.TRAILER_SIZE, n - sf.DIGEST_SIZE), "digest": range(n - sf.DIGEST_SIZE, n)}


class TestRoundTrip:
    def test_pages_and_tags_come_back_and_all_zero_pages_are_left_out(self):
        """Parsing an encoded file gives back every non-zero page with its tags; all-zero pages have no record."""
        snap = sf.parse(sample_file())
        assert snap.header == HEADER
        got = {}
        for r in snap.records:
            for i in range(r.count):
                tags = bytes(r.tags[i * T:(i + 1) * T]) if r.tags is not None else bytes(T)
                got[(r.slot, r.first + i)] = (bytes(r.data[i * P:(i + 1) * P]), tags)
        assert got == {
            (0, 0): (page(1), tags_of(0)), (0, 2): (page(2), tags_of(5)), (0, 3): (page(0), tags_of(7)),
            (0, 8): (page(3), tags_of(0)), (0, 9): (page(4), tags_of(0)), (1, 2): (page(9), tags_of(15)),
        }
        assert (snap.pages, snap.tagged_pages) == (6, 3)

    def test_a_run_without_tags_carries_no_tag_bytes(self):
        """A run whose tags are all zero is written without tag bytes (the record flag is clear)."""
        untagged = sf.encode(HEADER, [(0, 0, page(1), tags_of(0))])
        tagged = sf.encode(HEADER, [(0, 0, page(1), tags_of(1))])
        assert len(tagged) - len(untagged) == T
        (r,) = sf.parse(untagged).records
        assert r.tags is None and r.tagged == 0

    def test_a_file_starts_with_the_magic_and_version(self):
        """The first 12 bytes are the magic and the little-endian version."""
        blob = sample_file()
        assert blob[:8] == sf.MAGIC and struct.unpack_from("<I", blob, 8) == (sf.VERSION,)

    def test_writer_counts_match_the_trailer(self):
        """The streaming writer's record, page and tagged-page counts are the ones the parser finds."""
        out: list[bytes] = []
        w = sf.SnapshotWriter(lambda b: out.append(bytes(b)), HEADER)
        assert w.add_run(0, 0, page(0) * 3 + page(7), tags_of(0, 2, 0, 0)) == (2, 1)
        w.finish()
        blob = b"".join(out)
        snap = sf.parse(blob)
        assert (w.records, w.pages, w.tagged_pages, w.size) == (len(snap.records), 2, 1, len(blob))

    def test_an_empty_snapshot_is_valid(self):
        """A VM whose memory is all zero gives a file with no records that parses to zero pages."""
        snap = sf.parse(sf.encode(HEADER, [(0, 0, page(0) * 16, tags_of(*[0] * 16))]))
        assert snap.records == () and snap.pages == 0

    def test_a_non_mte_vm_has_no_tags(self):
        """A header without MTE refuses tags in the writer; data-only runs round trip."""
        header = sf.Header(LAYOUT, 1, False, None)
        with pytest.raises(ValueError):
            sf.encode(header, [(0, 0, page(1), tags_of(1))])
        (r,) = sf.parse(sf.encode(header, [(0, 0, page(1), None)])).records
        assert bytes(r.data) == page(1) and r.tags is None

    @pytest.mark.parametrize("run", [(0, 15, page(1) * 2, None), (2, 0, page(1), None), (0, 0, b"x", None),
                                     (0, 0, page(1), b"\x00")])
    def test_writer_refuses_runs_that_do_not_fit(self, run):
        """A run outside its slot, in no slot, not whole pages or with short tags is a caller's ValueError."""
        with pytest.raises(ValueError):
            sf.encode(HEADER, [run])

    def test_writer_refuses_runs_out_of_order(self):
        """Runs must come in layout order and page order, so that records never overlap."""
        with pytest.raises(ValueError):
            sf.encode(HEADER, [(1, 0, page(1), None), (0, 0, page(1), None)])
        with pytest.raises(ValueError):
            sf.encode(HEADER, [(0, 4, page(1), None), (0, 2, page(1) * 3, None)])


class TestDamage:
    def test_truncated_at_every_offset_is_refused(self):
        """The file cut at any length short of whole is EINVAL."""
        blob = sample_file()
        for n in range(len(blob)):
            refused(blob[:n])

    def test_each_region_truncated_is_refused_with_a_reason(self):
        """A cut inside each region (magic, version, header length, header, a record, the trailer) is EINVAL."""
        blob = sample_file()
        for name, r in regions(blob).items():
            for n in (r.start, (r.start + r.stop) // 2, r.stop - 1):
                err = refused(blob[:n])
                assert "damaged" in err.message or "not a snapshot file" in err.message, name

    @pytest.mark.parametrize("garbage", [b"\x00", b"\x00" * 64, b"MTESNEND" + bytes(56)])
    def test_trailing_garbage_is_refused(self, garbage):
        """Bytes after the trailer make the file EINVAL."""
        refused(sample_file() + garbage, "damaged")

    @settings(max_examples=300, deadline=None)
    @given(data=st.data())
    def test_a_corrupted_byte_in_any_region_is_refused(self, data):
        """Changing one byte anywhere (sampled in every region) makes the file EINVAL."""
        blob = sample_file()
        regs = regions(blob)
        name = data.draw(st.sampled_from(sorted(regs)))
        off = data.draw(st.sampled_from(regs[name]))
        flip = data.draw(st.integers(1, 255))
        bad = bytearray(blob)
        bad[off] ^= flip
        refused(bad)

    def test_not_a_snapshot_file(self):
        """Empty files, text and other formats are 'not a snapshot file'."""
        for blob in (b"", b"hello world\n", b"\x7fELF" + bytes(100), msgpack.packb({"layout": []})):
            refused(blob, "not a snapshot file")

    def test_another_version_is_refused(self):
        """A file of version 2 (even with a good checksum) is EINVAL naming the version."""
        bad = bytearray(sample_file())
        struct.pack_into("<I", bad, 8, 2)
        refused(reseal(bad), "another version")

    def test_a_header_length_past_the_end_is_refused(self):
        """A header length that runs past the file is EINVAL (truncated), before any decoding."""
        bad = bytearray(sample_file())
        struct.pack_into("<I", bad, 12, 1 << 30)
        refused(bad)


def rebuild(header: dict | None = None, records: bytes | None = None, counts: tuple | None = None) -> bytes:
    """A sealed file from a raw header map, raw record bytes and trailer counts (defaults: the sample's)."""
    snap = sf.parse(sample_file())
    if header is None:
        header = HEADER.to_wire()
    if records is None:
        records = b"".join(raw_record(r.slot, r.first, r.count, bytes(r.data), r.tags and bytes(r.tags))
                           for r in snap.records)
    if counts is None:
        counts = (len(snap.records), snap.pages, snap.tagged_pages)
    hbytes = msgpack.packb(header, use_bin_type=True)
    body = (sf.PREAMBLE.pack(sf.MAGIC, sf.VERSION, len(hbytes)) + hbytes + records
            + sf.TRAILER.pack(sf.END_MAGIC, *counts))
    return body + _sha(body)


def raw_record(slot: int, first: int, count: int, data: bytes, tags: bytes | None, flags: int | None = None) -> bytes:
    if flags is None:
        flags = sf.REC_TAGS if tags is not None else 0
    return struct.pack("<IIQI", slot, flags, first, count) + data + (tags or b"")


class TestCraftedFiles:
    """Files with a correct checksum but a wrong structure are refused too."""

    def test_the_rebuilt_sample_parses(self):
        """The crafting helper itself makes a valid file (so the refusals below are about the change)."""
        assert rebuild() == sample_file()

    @pytest.mark.parametrize("change", [
        {"vcpus": -1}, {"vcpus": True}, {"mte": 1}, {"layout": {}}, {"page-size": 65536}, {"extra": 1},
        {"layout": [{"slot": 0, "ipa": RAM + 1, "size": P, "backing": "anon", "flags": []}]},
        {"layout": [{"slot": 0, "ipa": RAM, "size": 0, "backing": "anon", "flags": []}]},
        {"layout": [{"slot": 0, "ipa": RAM, "size": P, "backing": "floppy", "flags": []}]},
        {"layout": [{"slot": 0, "ipa": RAM, "size": P, "backing": "anon", "flags": ["fast"]}]},
        {"layout": [{"slot": 0, "ipa": RAM, "size": 2 * P, "backing": "anon", "flags": []},
                    {"slot": 1, "ipa": RAM + P, "size": P, "backing": "anon", "flags": []}]},
        {"layout": [{"slot": 0, "ipa": RAM, "size": P, "backing": "anon", "flags": []},
                    {"slot": 0, "ipa": RAM + P, "size": P, "backing": "anon", "flags": []}]},
    ])
    def test_bad_headers_are_refused(self, change):
        """A header with a bad or missing key, an unaligned, overlapping or doubled slot is EINVAL."""
        header = HEADER.to_wire() | change
        refused(rebuild(header=header, records=b"", counts=(0, 0, 0)))

    def test_a_header_that_is_not_msgpack_is_refused(self):
        """Header bytes that do not decode are EINVAL."""
        hbytes = b"\xc1\xc1\xc1"
        body = sf.PREAMBLE.pack(sf.MAGIC, sf.VERSION, 3) + hbytes + sf.TRAILER.pack(sf.END_MAGIC, 0, 0, 0)
        refused(body + _sha(body), "not msgpack")

    @pytest.mark.parametrize("records,why", [
        (raw_record(7, 0, 1, page(1), None), "does not have"),
        (raw_record(0, 16, 1, page(1), None), "outside"),
        (raw_record(0, 0, 0, b"", None), "outside"),
        (raw_record(0, 2, 1, page(1), None) + raw_record(0, 1, 1, page(1), None), "out of order"),
        (raw_record(0, 0, 2, page(1) * 2, None) + raw_record(0, 1, 1, page(1), None), "overlaps"),
        (raw_record(1, 0, 1, page(1), None) + raw_record(0, 0, 1, page(1), None), "out of order"),
        (raw_record(0, 0, 1, page(1), None, flags=2), "flags"),
        (raw_record(0, 0, 1, page(1), tags_of(16)), "over 15"),
        (raw_record(0, 0, 1, page(1), tags_of(0)), "every tag is zero"),
        (raw_record(0, 0, 2, page(1), None), "runs into the trailer"),
        (b"\x00" * 5, "runs into the trailer"),
    ])
    def test_bad_records_are_refused(self, records, why):
        """Records in no slot, outside their slot, out of order, overlapping or with bad flags or tags are EINVAL."""
        refused(rebuild(records=records, counts=(0, 0, 0)), why)

    def test_tags_in_a_file_without_mte_are_refused(self):
        """A record with tags in the snapshot of a VM without MTE is EINVAL."""
        header = HEADER.to_wire() | {"mte": False}
        refused(rebuild(header=header, records=raw_record(0, 0, 1, page(1), tags_of(1)), counts=(1, 1, 1)), "flags")

    @pytest.mark.parametrize("counts", [(5, 6, 3), (4, 7, 3), (4, 6, 2)])
    def test_trailer_counts_must_match(self, counts):
        """A trailer whose record, page or tagged-page count differs from the records is EINVAL."""
        refused(rebuild(counts=counts), "counts")

    def test_a_bad_trailer_magic_is_refused(self):
        """A trailer without its magic is EINVAL even when the checksum matches."""
        blob = bytearray(sample_file())
        blob[-sf.TRAILER_SIZE] ^= 1
        refused(reseal(blob), "trailer magic")


class TestCompatible:
    def layout(self) -> list[sf.SlotLayout]:
        return [sf.SlotLayout(9, RAM, 16 * P, "memfd"), sf.SlotLayout(3, RAM + 0x10_0000, 8 * P, "anon")]

    def test_same_places_with_other_slot_ids_and_flags_fit(self):
        """Slots at the same IPA, size and backing fit whatever their ids and flags; slot_map pairs them."""
        sf.check_compatible(HEADER, self.layout(), 2, True)
        assert {k: v.slot for k, v in sf.slot_map(HEADER, self.layout()).items()} == {0: 9, 1: 3}

    @pytest.mark.parametrize("vcpus,mte,layout,why", [
        (2, False, None, "MTE"),
        (1, True, None, "vCPU"),
        (2, True, [sf.SlotLayout(0, RAM, 16 * P, "memfd")], "layout"),
        (2, True, [sf.SlotLayout(0, RAM, 16 * P, "shmem"), sf.SlotLayout(1, RAM + 0x10_0000, 8 * P, "anon")],
         "layout"),
        (2, True, [sf.SlotLayout(0, RAM, 32 * P, "memfd"), sf.SlotLayout(1, RAM + 0x10_0000, 8 * P, "anon")],
         "layout"),
        (2, True, [sf.SlotLayout(0, RAM + P, 16 * P, "memfd"), sf.SlotLayout(1, RAM + 0x10_0000, 8 * P, "anon")],
         "layout"),
    ])
    def test_another_layout_vcpu_count_or_mte_setting_is_einval(self, vcpus, mte, layout, why):
        """A VM whose MTE setting, vCPU count, or slots' IPA, size or backing differ is refused with EINVAL."""
        with pytest.raises(sf.SnapfileError, match=why) as info:
            sf.check_compatible(HEADER, layout if layout is not None else self.layout(), vcpus, mte)
        assert info.value.errno == EINVAL


class TestHelpers:
    def test_kept_runs_split_around_all_zero_pages(self):
        """kept_runs yields the runs of pages with non-zero data or tags."""
        data = page(0) + page(1) + page(0) + page(0) + page(2)
        assert list(sf.kept_runs(data, None, 5)) == [(1, 1), (4, 1)]
        assert list(sf.kept_runs(data, tags_of(0, 0, 0, 3, 0), 5)) == [(1, 1), (3, 2)]

    def test_zeros_across_a_page_boundary_do_not_make_a_zero_page(self):
        """4 KiB of zeros straddling two pages leaves both pages kept, and 256 zero tags straddling two both tagged."""
        data = b"\x01" * 2048 + bytes(PAGE_SIZE) + b"\x01" * 2048
        assert list(sf.kept_runs(data, None, 2)) == [(0, 2)]
        assert list(sf.kept_runs(page(3) * 3, None, 3)) == [(0, 3)]
        tags = b"\x02" * 128 + bytes(T) + b"\x02" * 128
        assert sf.tagged_pages_of(tags, 2) == 2
        assert sf.tagged_pages_of(tags_of(1, 1, 1), 3) == 3

    def test_tagged_pages_of_counts_pages_with_any_non_zero_tag(self):
        """A page counts as tagged when any one granule's tag is non-zero."""
        tags = bytearray(tags_of(0, 0, 0))
        tags[T + 200] = 1
        assert sf.tagged_pages_of(bytes(tags), 3) == 1
        assert sf.tagged_pages_of(tags_of(0, 0), 2) == 0
