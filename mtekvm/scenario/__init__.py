"""Scenario files: parse and validate them (the format is described in ``docs/scenarios.md``).

``model`` holds the value classes a parsed scenario is made of, ``ops`` the steps' op tables
(derived from :mod:`shared.abi` and :mod:`shared.control`) with the sugar a file adds, and
``parse`` the files, tables and steps. Everything is re-exported here.
"""

from mtekvm.scenario.model import (
    FAULT_REPLAY_LIMIT,
    GRANULE,
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    Expect,
    HostSpec,
    MemslotSpec,
    Parallel,
    ProcessSpec,
    Scenario,
    ScenarioError,
    SchedulerSpec,
    Step,
    VmSpec,
)
from mtekvm.scenario.ops import GUEST_OPS, HOST_OPS, OPS_BY_KIND, PROCESS_OPS, VMM_OPS, parse_size
from mtekvm.scenario.parse import ERRNO_NAMES, OUTCOMES, TCF_PREFERRED, load_scenario, parse_scenario
from shared.abi import BACKINGS, PROTS
from shared.control import KVM_CAPS
from shared.mte import TCF_MODES

__all__ = [
    "FAULT_REPLAY_LIMIT", "GRANULE", "HUGE_PAGE_SIZE", "PAGE_SIZE", "Expect", "HostSpec", "MemslotSpec",
    "Parallel", "ProcessSpec", "Scenario", "ScenarioError", "SchedulerSpec", "Step", "VmSpec",
    "GUEST_OPS", "HOST_OPS", "OPS_BY_KIND", "PROCESS_OPS", "VMM_OPS", "parse_size",
    "BACKINGS", "ERRNO_NAMES", "KVM_CAPS", "OUTCOMES", "PROTS", "TCF_MODES", "TCF_PREFERRED",
    "load_scenario", "parse_scenario",
]
