"""The guest kernel of one VM: its vCPUs' MTE registers, stage 1, and the agent serving the VMM.

* :mod:`guest.cpu`: a vCPU's MTE state (SCTLR_EL1.ATA/TCF, GCR_EL1, PSTATE.TCO,
  TFSR_EL1, MAIR_EL1) as the guest kernel programs it.
* :mod:`guest.stage1`: the guest's stage-1 tables (VA -> IPA + attribute, TBI).
* :mod:`guest.agent`: :class:`~guest.agent.GuestAgent`, which serves the VMM's
  guest channel and turns each guest op into one ``vcpu-access`` request.
* ``python -m guest``: the guest process the VMM spawns.
"""
