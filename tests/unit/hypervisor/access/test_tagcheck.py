"""The one tag-check core (hypervisor/access/tagcheck.py) that host and guest accesses share."""

from __future__ import annotations

from hypervisor.access.tagcheck import ASYNC_TAG_CHECK_FAULT, TAG_CHECK_FAULT, mte_check_access, tag_check_fault_kind
from shared.mte import MTE_GRANULES_PER_PAGE


def _tags(*pairs):
    t = bytearray(MTE_GRANULES_PER_PAGE)
    for g, v in pairs:
        t[g] = v
    return t


def test_matching_tags_pass():
    """An access whose every granule carries the pointer tag raises nothing."""
    tags = _tags((0, 3), (1, 3))
    assert mte_check_access([(tags, 0, 32)], 3, "sync", False) is None


def test_none_checks_nothing():
    """TCF none (or TCO) checks nothing, even over mismatching tags."""
    assert mte_check_access([(_tags((0, 5)), 0, 16)], 3, "none", False) is None


def test_unchecked_span_is_skipped():
    """A span without reachable tags (None) is not checked; the next span's mismatch is reported by index."""
    m = mte_check_access([(None, 0, 16), (_tags((2, 7)), 16, 32)], 0, "sync", False)
    assert (m.index, m.first, m.memory_tag, m.kind) == (1, 32, 7, TAG_CHECK_FAULT)


def test_unaligned_access_reports_its_first_byte():
    """An access starting inside the mismatching granule reports its own first byte, not the granule's."""
    m = mte_check_access([(_tags((0, 9)), 5, 4)], 0, "async", True)
    assert (m.first, m.memory_tag, m.kind) == (5, 9, ASYNC_TAG_CHECK_FAULT)


def test_second_granule_of_a_straddling_access():
    """An access spanning two granules is checked against both; the mismatching one's first byte is reported."""
    m = mte_check_access([(_tags((0, 1), (1, 2)), 12, 8)], 1, "sync", False)
    assert (m.first, m.memory_tag) == (16, 2)


def test_asymm_reads_sync_writes_async():
    """Under asymm a read mismatch is synchronous and a write mismatch asynchronous."""
    assert tag_check_fault_kind("asymm", False) == TAG_CHECK_FAULT
    assert tag_check_fault_kind("asymm", True) == ASYNC_TAG_CHECK_FAULT
    assert tag_check_fault_kind("sync", True) == TAG_CHECK_FAULT
    assert tag_check_fault_kind("async", False) == ASYNC_TAG_CHECK_FAULT
