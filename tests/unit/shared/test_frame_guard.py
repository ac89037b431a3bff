"""The frame guard: msgpack headers walked as bytes arrive, oversized frames refused at once."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.wire import WireError, _FrameGuard

LIMIT = 1 << 20

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=300) | st.binary(max_size=70_000)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(min_size=1, max_size=300)),
    lambda kids: st.lists(kids, max_size=20) | st.dictionaries(st.text(max_size=5), kids, max_size=20),
    max_leaves=30,
)


class TestValidStreams:
    @settings(max_examples=80, deadline=None)
    @given(st.lists(values, min_size=1, max_size=3), st.lists(st.integers(1, 5000), min_size=1, max_size=50))
    def test_any_split_of_valid_messages_ends_between_frames(self, msgs, cuts):
        """Valid messages fed in arbitrary pieces leave the guard at a frame boundary, having refused nothing."""
        blob = b"".join(msgpack.packb(m, use_bin_type=True) for m in msgs)
        g = _FrameGuard(1 << 26)
        pos, i = 0, 0
        while pos < len(blob):
            step = cuts[i % len(cuts)]
            g.feed(blob[pos:pos + step])
            pos += step
            i += 1
        assert (g.frame, g.stack, g.skip, g.partial) == (0, [], 0, b"")


class TestRefusals:
    @pytest.mark.parametrize("first, tail", [(b"\xc6", b""), (b"\xdb", b""), (b"\xc9", b"\x05")],
                             ids=["bin32", "str32", "ext32"])
    def test_oversized_header_refused_before_its_body(self, first, tail):
        """A bin/str/ext header declaring more than the bound is refused on the header alone."""
        with pytest.raises(WireError, match="larger than"):
            _FrameGuard(LIMIT).feed(first + (LIMIT + 1).to_bytes(4, "big") + tail)

    def test_many_small_bins_over_the_bound_refused(self):
        """A frame of bins each under the bound but together over it is refused."""
        frame = msgpack.packb([bytes(LIMIT // 4)] * 5)
        with pytest.raises(WireError):
            _FrameGuard(LIMIT).feed(frame)

    def test_frames_are_bounded_separately(self):
        """Several frames each under the bound pass, however much they add up to."""
        g = _FrameGuard(LIMIT)
        for _ in range(8):
            g.feed(msgpack.packb(bytes(LIMIT // 2)))
        assert g.frame == 0

    def test_invalid_first_byte_refused(self):
        """0xc1, which starts no msgpack value, is refused."""
        with pytest.raises(WireError, match="0xc1"):
            _FrameGuard(LIMIT).feed(b"\xc1")

    def test_huge_container_count_refused(self):
        """An array header declaring more items than the bound has bytes is refused."""
        with pytest.raises(WireError, match="container"):
            _FrameGuard(LIMIT).feed(b"\xdd" + (LIMIT + 1).to_bytes(4, "big"))


class TestFramedStreamBound:
    """FramedStream applies the guard to the frame left incomplete after each chunk."""

    async def test_oversized_header_after_a_message_in_one_chunk(self):
        """A complete message followed, in the same chunk, by an oversized header: the message arrives, then
        WireError."""
        import trio.testing

        from shared.wire import FramedStream

        a, b = trio.testing.memory_stream_pair()
        f = FramedStream(b, max_frame=LIMIT)
        await a.send_all(msgpack.packb({"t": "req"}) + b"\xc6" + (LIMIT + 1).to_bytes(4, "big"))
        assert await f.receive() == {"t": "req"}
        with pytest.raises(WireError, match="larger than"):
            await f.receive()

    async def test_frame_growing_over_many_chunks_is_cut_at_the_bound(self):
        """A frame of many small bins sent in pieces is refused once its declared size passes the bound."""
        import trio.testing

        from shared.wire import FramedStream

        a, b = trio.testing.memory_stream_pair()
        f = FramedStream(b, max_frame=LIMIT)
        blob = msgpack.packb([bytes(LIMIT // 8)] * 12)
        for i in range(0, len(blob) - 1, 4096):  # all but the last byte: never a complete message
            await a.send_all(blob[i:min(i + 4096, len(blob) - 1)])
        with pytest.raises(WireError, match="larger than"):
            await f.receive()

    async def test_many_small_messages_pass(self):
        """Thousands of small messages in arbitrary chunks all arrive in order."""
        import trio.testing

        from shared.wire import FramedStream

        a, b = trio.testing.memory_stream_pair()
        f = FramedStream(b, max_frame=LIMIT)
        blob = b"".join(msgpack.packb({"id": i, "v": bytes(i % 300)}) for i in range(2000))
        for i in range(0, len(blob), 777):
            await a.send_all(blob[i:i + 777])
        assert [(await f.receive())["id"] for _ in range(2000)] == list(range(2000))
