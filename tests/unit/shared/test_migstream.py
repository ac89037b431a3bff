"""The migration stream's record validation and hello authentication (shared.migstream)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from shared import migstream

MiB = 1 << 20
PAGE_SIZE = 4096
LAYOUT = {"t": "layout", "mte": True, "ipa_bits": 40, "vcpus": 1,
          "slots": [{"slot": 0, "ipa": 0x4000_0000, "size": MiB, "flags": [], "backing": "anon", "object": None,
                     "hugepage_size": 2 * MiB, "prot_mte": False, "share": "private"}]}


def test_record_validation_refuses_bad_records():
    """check_record accepts a well-formed page run and refuses wrong types, keys, sizes and slots with EPROTO."""
    lay = migstream.check_record(LAYOUT, ("layout",))
    ok = {"t": "pages", "pass": 0, "slot": 0, "first": 255, "data": bytes(PAGE_SIZE), "tags": bytes(256)}
    assert migstream.check_record(ok, ("pages",), lay) is ok
    for bad in ({**ok, "first": 256}, {**ok, "slot": 1}, {**ok, "tags": None}, {**ok, "data": b""},
                {**ok, "pass": -1}, {**ok, "extra": 0}, {"t": 5}, [ok]):
        with pytest.raises(migstream.StreamError) as info:
            migstream.check_record(bad, ("pages",), lay)
        assert info.value.errno == migstream.EPROTO
    with pytest.raises(migstream.StreamError):
        migstream.check_record(ok, ("layout",), lay)


def test_auth_compares_the_hmac():
    """auth_ok accepts the HMAC of the secret over the nonce, refuses another secret or none, and passes without one."""
    nonce = bytes(range(32))
    assert migstream.auth_ok("k", nonce, migstream.auth_tag("k", nonce))
    assert not migstream.auth_ok("k", nonce, migstream.auth_tag("j", nonce))
    assert not migstream.auth_ok("k", nonce, None)
    assert migstream.auth_ok(None, nonce, None)


async def test_records_round_trip_and_a_short_stream_is_econnreset():
    """Header and records sent arrive validated; a stream that ends mid-record is ECONNRESET."""
    a, b = trio.testing.memory_stream_pair()
    sa, sb = migstream.RecordStream(a), migstream.RecordStream(b)
    await sa.send_header()
    await sa.send(LAYOUT)
    assert await sb.receive_header() == migstream.VERSION
    rec = await sb.receive("layout")
    assert rec["by_slot"][0]["size"] == MiB
    await a.send_all(migstream._LENGTH.pack(10) + b"abc")
    await a.aclose()
    with pytest.raises(migstream.StreamError) as info:
        await sb.receive("end")
    assert info.value.errno == migstream.ECONNRESET


def test_layout_validation_refuses_bad_slots():
    """A layout slot with an unknown backing, an unaligned size or a repeated id is EPROTO."""
    slot = LAYOUT["slots"][0]
    for bad in ({**slot, "backing": "device"}, {**slot, "size": 100}, {**slot, "flags": ["x"]}):
        with pytest.raises(migstream.StreamError):
            migstream.check_record({**LAYOUT, "slots": [bad]}, ("layout",))
    with pytest.raises(migstream.StreamError):
        migstream.check_record({**LAYOUT, "slots": [slot, slot]}, ("layout",))
