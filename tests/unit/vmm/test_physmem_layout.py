"""Migration and snapshot layouts of the physical-memory contract: a slot's node and region.

Checked: a snapshot header carries a slot's node and region and parses them back; restore
(check_compatible) refuses a target whose slot has another node or region with EINVAL; the
migration stream accepts a layout slot with node and region names and refuses other values;
the VMM leaves pfnmap and p2pmem slots out of its RAM slots, as it does device ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shared import migstream, snapfile
from shared.errno import EINVAL
from vmm import dma, guestram

SLOT = {"slot": 0, "ipa": 0x4000_0000, "size": 4096, "flags": [], "backing": "anon", "object": None,
        "hugepage_size": 2 << 20, "prot_mte": False, "share": "private"}


def test_snapshot_header_round_trip_with_node_and_region():
    """A header's slot keeps its node and region through to_wire and parse_header."""
    layout = (snapfile.SlotLayout(0, 0x4000_0000, 4096, "anon", (), "cxl0", None),
              snapfile.SlotLayout(1, 0x8000_0000, 4096, "dax", (), None, "pmem0"))
    h = snapfile.parse_header(snapfile.Header(layout, 1, False).to_wire())
    assert [(s.node, s.region) for s in h.layout] == [("cxl0", None), (None, "pmem0")]


@pytest.mark.parametrize("node, region", [("gpu0", None), (None, None), (None, "pmem0")])
def test_restore_needs_the_same_node_and_region(node, region):
    """A snapshot of a slot bound to node cxl0 does not fit a slot with another node or region: EINVAL."""
    snap = snapfile.Header((snapfile.SlotLayout(0, 0x4000_0000, 4096, "anon", (), "cxl0", None),), 1, False)
    target = (snapfile.SlotLayout(0, 0x4000_0000, 4096, "anon", (), node, region),)
    with pytest.raises(snapfile.SnapfileError) as exc:
        snapfile.check_compatible(snap, target, 1, False)
    assert exc.value.errno == EINVAL
    snapfile.check_compatible(snap, (snapfile.SlotLayout(3, 0x4000_0000, 4096, "anon", (), "cxl0", None),), 1, False)


def test_migration_layout_slot_node_and_region():
    """A migration layout slot may name a node and a region; a non-name or an unknown key is malformed."""
    assert migstream._check_slot(dict(SLOT, node="cxl0"))["node"] == "cxl0"
    assert migstream._check_slot(dict(SLOT, region="pmem0"))["region"] == "pmem0"
    for bad in (dict(SLOT, node=3), dict(SLOT, region=""), dict(SLOT, colour="red")):
        with pytest.raises(migstream.StreamError):
            migstream._check_slot(bad)


def test_device_memory_slots_are_not_ram():
    """pfnmap and p2pmem slots, like device ones, are left out of the RAM slots; dax and node-bound anon are
    RAM, with their region and node in the layout."""
    backings = [("anon", "cxl0", None), ("pfnmap", None, "bar0"), ("p2pmem", None, "p2p0"), ("device", None, None),
                ("dax", None, "pmem0")]
    vmm = SimpleNamespace(slots={}, mappings=[])
    for i, (backing, node, region) in enumerate(backings):
        addr = 0x1000_0000 * (i + 1)
        guestram.record_mmap(vmm, addr, {"size": 4096, "backing": backing, "object": None,
                                         "hugepage_size": 2 << 20, "prot": ["read", "write"], "share": "shared",
                                         "offset": 0, "node": node, "region": region})
        vmm.slots[i] = dma.Memslot(i, 0x4000_0000 + i * 4096, 4096, addr)
    ram = guestram.ram_slots(vmm)
    assert [(s.backing, s.node, s.region) for s in ram] == [("anon", "cxl0", None), ("dax", None, "pmem0")]
    assert ram[0].layout()["node"] == "cxl0" and "region" not in ram[0].layout()
