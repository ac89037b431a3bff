"""mtekvm, the harness: load scenarios, run them against the model, report.

The public face (everything else in the package is private to it)::

    import trio
    import mtekvm

    scenario = mtekvm.load_scenario("scenarios/x.toml")
    result = trio.run(mtekvm.run_scenario, scenario, mtekvm.RunOptions())
    assert result.passed, result.failures

:func:`load_scenario` parses a scenario file (:class:`ScenarioError` when it is
not valid, docs/scenarios.md is the format), :func:`run_scenario` runs one in
the way :class:`RunOptions` says (a host to use, extra bugs, a
:class:`SchedulerSpec` overriding the file's) and returns a
:class:`ScenarioResult`. :func:`hunt` runs one scenario many times under a
policy (seeds, or every interleaving with ``dfs`` / ``bounded:N``), shrinks the
first failure's schedule and returns a :class:`HuntResult` with its replay command.

The names are loaded on first use, so that ``mtekvm.cli`` (the ``mtekvm``
command) starts without importing the model first: the command installs its
Ctrl-C handler before the heavy imports.

Layout: ``scenario`` (the file format), ``runner`` (one execution),
``links`` (the hypervisor and VMMs as OS processes or in-process), ``report``
(tables, JSON, JUnit, TAP), ``cli`` (the command). The hypervisor, VMM and
guest packages never import this one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports happen in __getattr__, on first use; "X as X" marks a re-export
    from mtekvm.hunt import HuntResult as HuntResult
    from mtekvm.hunt import hunt as hunt
    from mtekvm.runner import RunOptions as RunOptions
    from mtekvm.runner import ScenarioResult as ScenarioResult
    from mtekvm.runner import run_scenario as run_scenario
    from mtekvm.scenario import ScenarioError as ScenarioError
    from mtekvm.scenario import SchedulerSpec as SchedulerSpec
    from mtekvm.scenario import load_scenario as load_scenario
    from mtekvm.scenario import parse_scenario as parse_scenario

#: Public name -> the module that defines it.
_PUBLIC = {
    "load_scenario": "mtekvm.scenario",
    "parse_scenario": "mtekvm.scenario",
    "ScenarioError": "mtekvm.scenario",
    "SchedulerSpec": "mtekvm.scenario",
    "run_scenario": "mtekvm.runner",
    "RunOptions": "mtekvm.runner",
    "ScenarioResult": "mtekvm.runner",
    "hunt": "mtekvm.hunt",
    "HuntResult": "mtekvm.hunt",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Load a public name from its module the first time it is asked for (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mtekvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public names, for completion and ``help``."""
    return sorted(set(globals()) | set(_PUBLIC))
