"""The guest's saved state (guest.cpu get/check/set_state, guest.stage1 export) used by migration and snapshots."""

from __future__ import annotations

import msgpack
import pytest

from guest import cpu
from guest.stage1 import Stage1, Stage1Error


def test_state_survives_msgpack_and_restores_every_register():
    """A vCPU's state packed with msgpack and installed in another vCPU gives the same registers and IRG draws."""
    a = cpu.VcpuRegs(index=0, mte=2)
    a.enable_mte("async", include=0x0FF0)
    a.tco, a.tfsr = True, cpu.TFSR_TF1
    a.irg()
    state = msgpack.unpackb(msgpack.packb(cpu.get_state(a)))
    b = cpu.VcpuRegs(index=5, mte=2)
    cpu.set_state(b, cpu.check_state(state))
    assert cpu.get_state(b) == cpu.get_state(a)
    assert [b.irg() for _ in range(10)] == [a.irg() for _ in range(10)]


@pytest.mark.parametrize("change", [{"tcf": "loud"}, {"gcr_excl": 1 << 16}, {"pstate_tco": 1}, {"rng": [3, [], None]},
                                    {"extra": 1}])
def test_a_malformed_state_is_refused(change):
    """check_state refuses a wrong value, a bad random state or an unknown key with ValueError."""
    state = {**cpu.get_state(cpu.VcpuRegs(index=0)), **change}
    with pytest.raises(ValueError):
        cpu.check_state(state)


def test_stage1_export_round_trips_and_bad_extents_are_einval():
    """Stage 1 extents exported and rebuilt translate the same; a malformed extent is refused."""
    s = Stage1()
    s.map(0x1000, 0x4000_0000, 0x3000, "tagged")
    s.map(0x2000, 0x5000_0000, 0x1000, "device")
    t = Stage1.from_export(msgpack.unpackb(msgpack.packb(s.export())))
    assert t.extents == s.extents
    with pytest.raises(Stage1Error):
        Stage1.from_export([[0x1001, 0x1000, 0, "normal"]])
    with pytest.raises(Stage1Error):
        Stage1.from_export([["x"]])
