"""A guest vCPU's architectural MTE state, as the guest kernel programs it.

The guest kernel owns these EL1 registers; KVM only traps or passes them
through, so the model keeps them in the guest process and sends what matters
for one access (the effective check mode, SCTLR_EL1.ATA) with each
``vcpu-access`` request. The registers (Arm ARM D10, arch/arm64/kernel/mte.c):

* ``ID_AA64PFR1_EL1.MTE``: what KVM exposes. 0 unless the VMM enabled
  ``KVM_CAP_ARM_MTE`` before creating the vCPU (``kvm_arm_read_id_reg``
  hides the field otherwise).
* ``SCTLR_EL1.ATA``: allocation tag access at EL1 (STG/LDG/IRG work; else
  tags read as zero and tag stores are ignored).
* ``SCTLR_EL1.TCF``: tag check fault mode for EL1 accesses: none, sync,
  async, or asymm (sync reads, async writes).
* ``GCR_EL1.Exclude``: the tags IRG may not return.
* ``PSTATE.TCO``: tag check override; set, nothing is checked.
* ``TFSR_EL1``: asynchronous faults pending: TF0 (bit 0) for addresses with
  bit 55 clear (TTBR0), TF1 (bit 1) for the others (TTBR1).
* ``MAIR_EL1``: the memory type of each stage-1 AttrIndx. Linux's
  ``__cpu_setup`` programs the ``MT_NORMAL_TAGGED`` slot as plain Normal
  (0xFF); ``cpu_enable_mte`` turns it into Normal-Tagged (0xF0) only on a CPU
  with MTE. On a vCPU without MTE a "tagged" stage-1 mapping is therefore
  ordinary Normal memory: unchecked, with no tag storage.
"""

from __future__ import annotations

import random

import attrs

from shared.mte import MTE_TAG_SHIFT

#: MAIR_EL1 attribute encodings (arch/arm64/include/asm/memory.h).
MAIR_ATTR_DEVICE_nGnRnE = 0x00
MAIR_ATTR_DEVICE_nGnRE = 0x04
MAIR_ATTR_NORMAL_NC = 0x44
MAIR_ATTR_NORMAL_TAGGED = 0xF0
MAIR_ATTR_NORMAL = 0xFF

#: Linux's AttrIndx slots.
MT_NORMAL = 0
MT_NORMAL_TAGGED = 1
MT_NORMAL_NC = 2
MT_DEVICE_nGnRnE = 3
MT_DEVICE_nGnRE = 4

#: The AttrIndx the guest kernel puts in a PTE for each stage-1 attribute.
ATTR_INDEX = {"normal": MT_NORMAL, "tagged": MT_NORMAL_TAGGED, "device": MT_DEVICE_nGnRE}

#: ID_AA64PFR1_EL1.MTE values: FEAT_MTE (instructions only), FEAT_MTE2 (tag storage), FEAT_MTE3 (asymm).
ID_AA64PFR1_MTE_NI = 0
ID_AA64PFR1_MTE_MTE2 = 2

TCF_MODES = ("none", "sync", "async", "asymm")

#: TFSR_EL1 bits.
TFSR_TF0 = 1 << 0
TFSR_TF1 = 1 << 1


def _mair_byte(mair: int, index: int) -> int:
    return (mair >> (8 * index)) & 0xFF


def boot_mair(has_mte: bool) -> int:
    """MAIR_EL1 as the guest kernel programs it at boot.

    Args:
        has_mte: the vCPU reports MTE (``cpu_enable_mte`` runs).

    Returns:
        The 64-bit MAIR_EL1 value.
    """
    slots = {
        MT_NORMAL: MAIR_ATTR_NORMAL,
        MT_NORMAL_TAGGED: MAIR_ATTR_NORMAL_TAGGED if has_mte else MAIR_ATTR_NORMAL,
        MT_NORMAL_NC: MAIR_ATTR_NORMAL_NC,
        MT_DEVICE_nGnRnE: MAIR_ATTR_DEVICE_nGnRnE,
        MT_DEVICE_nGnRE: MAIR_ATTR_DEVICE_nGnRE,
    }
    return sum(v << (8 * i) for i, v in slots.items())


def memory_type(mair: int, attr: str) -> str:
    """The memory type a stage-1 attribute really gives under ``mair``.

    Args:
        mair: the vCPU's MAIR_EL1.
        attr: ``"tagged"``, ``"normal"`` or ``"device"`` as the stage-1 PTE says.

    Returns:
        ``"tagged"`` (Normal-Tagged), ``"normal"`` (any other Normal type) or ``"device"``.
    """
    byte = _mair_byte(mair, ATTR_INDEX[attr])
    if byte == MAIR_ATTR_NORMAL_TAGGED:
        return "tagged"
    if byte & 0xF0 == 0:  # outer attribute 0b0000: Device memory
        return "device"
    return "normal"


def tfsr_bit(va: int) -> int:
    """The TFSR_EL1 bit an asynchronous fault at ``va`` sets: TF1 if bit 55 is set, else TF0."""
    return TFSR_TF1 if (va >> (MTE_TAG_SHIFT - 1)) & 1 else TFSR_TF0


def _rng_for(self: VcpuRegs) -> random.Random:
    return random.Random(self.index)


def _mair_for(self: VcpuRegs) -> int:
    return boot_mair(self.has_mte)


@attrs.define(eq=False)
class VcpuRegs:
    """The MTE registers of one vCPU, as its guest kernel has programmed them.

    Attributes:
        index: the vCPU's index in the VM (as ``kvm-create-vcpu`` numbered it).
        token: the token the guest presented with ``vcpu-attach``.
        mte: ID_AA64PFR1_EL1.MTE as KVM exposes it (0: no MTE).
        vcpu: the vCPU id the hypervisor named in ``vcpu-attach``'s reply
            (what ``vcpu-access`` takes); the index when it named none.
        vm: the VM handle from ``vcpu-attach``'s reply.
        sctlr_ata: SCTLR_EL1.ATA.
        tcf: SCTLR_EL1.TCF: none, sync, async or asymm.
        gcr_excl: GCR_EL1.Exclude (16 bits; bit n set: IRG never returns tag n).
        tco: PSTATE.TCO.
        tfsr: TFSR_EL1.
        rng: IRG's random source, seeded by the index (runs are reproducible).
        mair: MAIR_EL1, programmed at boot from ``mte``.
    """

    index: int
    token: str = ""
    mte: int = 0
    vcpu: int | None = None
    vm: int | None = None
    sctlr_ata: bool = False
    tcf: str = "none"
    gcr_excl: int = 0
    tco: bool = False
    tfsr: int = 0
    rng: random.Random = attrs.field(default=attrs.Factory(_rng_for, takes_self=True))
    mair: int = attrs.field(default=attrs.Factory(_mair_for, takes_self=True))

    def __attrs_post_init__(self) -> None:
        if self.vcpu is None:
            self.vcpu = self.index

    @property
    def has_mte(self) -> bool:
        """The vCPU reports MTE (any non-zero ID_AA64PFR1_EL1.MTE)."""
        return bool(self.mte)

    def enable_mte(self, tcf: str, include: int = 0xFFFF) -> None:
        """What the guest kernel's MTE setup writes: SCTLR_EL1.ATA=1, TCF, GCR_EL1.

        Args:
            tcf: the tag check fault mode.
            include: the tags IRG may return (GCR_EL1.Exclude = ~include).

        Raises:
            ValueError: ``tcf`` is not a mode, or ``include`` is not 16 bits.
        """
        if tcf not in TCF_MODES:
            raise ValueError(f"tcf {tcf!r} is not one of {', '.join(TCF_MODES)}")
        if not 0 <= include <= 0xFFFF:
            raise ValueError(f"include mask {include:#x} is not 16 bits")
        self.sctlr_ata = True
        self.tcf = tcf
        self.gcr_excl = ~include & 0xFFFF

    def effective_check(self) -> str:
        """The check mode an access runs under now: ``"none"`` if PSTATE.TCO is set or TCF is none."""
        if self.tco or self.tcf == "none":
            return "none"
        return self.tcf

    def memory_type(self, attr: str) -> str:
        """The memory type of a stage-1 attribute under this vCPU's MAIR_EL1 (see :func:`memory_type`)."""
        return memory_type(self.mair, attr)

    def record_async_fault(self, va: int) -> None:
        """Set TFSR_EL1.TF0 or TF1 for an asynchronous tag check fault at ``va`` (untagged)."""
        self.tfsr |= tfsr_bit(va)

    def irg(self) -> int:
        """IRG: a random tag not in GCR_EL1.Exclude; 0 if every tag is excluded or ATA is 0."""
        allowed = [t for t in range(16) if not self.gcr_excl & (1 << t)]
        if not allowed or not self.sctlr_ata:
            return 0
        return self.rng.choice(allowed)


#: The keys of one vCPU's saved state (:meth:`VcpuRegs.get_state`).
STATE_KEYS = ("mte", "sctlr_ata", "tcf", "gcr_excl", "pstate_tco", "tfsr", "mair", "rng")


def _check_state(state: object) -> dict:
    """Validate one vCPU's saved state (msgpack shapes); raise ValueError saying what is wrong."""
    if not isinstance(state, dict):
        raise ValueError("a vCPU state must be a map")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"a vCPU state lacks {', '.join(missing)}")
    extra = sorted(set(state) - set(STATE_KEYS), key=repr)
    if extra:
        raise ValueError(f"a vCPU state has unknown key {repr(extra[0])[:40]}")

    def uint(name: str, hi: int) -> int:
        v = state[name]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise ValueError(f"{name} must be an integer 0..{hi:#x}")
        return v

    def flag(name: str) -> bool:
        if not isinstance(state[name], bool):
            raise ValueError(f"{name} must be a boolean")
        return state[name]

    if state["tcf"] not in TCF_MODES:
        raise ValueError(f"tcf must be one of {', '.join(TCF_MODES)}")
    rng = state["rng"]
    if not (isinstance(rng, (list, tuple)) and len(rng) == 3 and isinstance(rng[0], int)
            and isinstance(rng[1], (list, tuple)) and len(rng[1]) == 625
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 32 for x in rng[1])
            and (rng[2] is None or isinstance(rng[2], float))):
        raise ValueError("rng must be [version, 625 32-bit words, gauss_next] (random.Random.getstate())")
    return {"mte": uint("mte", 15), "sctlr_ata": flag("sctlr_ata"), "tcf": state["tcf"],
            "gcr_excl": uint("gcr_excl", 0xFFFF), "pstate_tco": flag("pstate_tco"),
            "tfsr": uint("tfsr", TFSR_TF0 | TFSR_TF1),
            "mair": uint("mair", (1 << 64) - 1), "rng": (rng[0], tuple(rng[1]), rng[2])}


def get_state(regs: VcpuRegs) -> dict:
    """The vCPU's architectural state as msgpack-safe values (what KVM_GET_ONE_REG would save).

    Holds SCTLR_EL1.ATA/TCF, GCR_EL1.Exclude, TFSR_EL1, PSTATE.TCO, MAIR_EL1,
    ID_AA64PFR1_EL1.MTE (for checking, not restored) and IRG's random state, so a
    restored vCPU behaves identically. The attach details (token, vcpu, vm) are the
    host's, not the vCPU's, and are not part of it.
    """
    version, words, gauss = regs.rng.getstate()
    return {"mte": regs.mte, "sctlr_ata": regs.sctlr_ata, "tcf": regs.tcf, "gcr_excl": regs.gcr_excl,
            "pstate_tco": regs.tco, "tfsr": regs.tfsr, "mair": regs.mair, "rng": [version, list(words), gauss]}


def check_state(state: object) -> dict:
    """Validate a saved vCPU state (see :func:`get_state`).

    Raises:
        ValueError: the state is malformed (what is wrong is said).
    """
    return _check_state(state)


def set_state(regs: VcpuRegs, state: dict) -> None:
    """Install a state :func:`check_state` accepted (KVM_SET_ONE_REG of each register).

    ID_AA64PFR1_EL1.MTE stays what this host's KVM exposes.
    """
    regs.sctlr_ata = state["sctlr_ata"]
    regs.tcf = state["tcf"]
    regs.gcr_excl = state["gcr_excl"]
    regs.tco = state["pstate_tco"]
    regs.tfsr = state["tfsr"]
    regs.mair = state["mair"]
    regs.rng.setstate(state["rng"])
