"""The coverage-guided policy prefers pairs of scheduling points it has not taken yet."""

from __future__ import annotations

import attrs

from hypervisor.sched.policies import Coverage, Decision, parse_policy


@attrs.frozen
class _Ctx:
    name: str
    label: str
    alive: bool = True


def _decision(*ctxs: _Ctx, last: str = "start") -> Decision:
    return Decision(tuple(ctxs), last, ctxs[0], (last, 1), 1)


def test_prefers_a_new_pair():
    """Once (start, x) is covered, the context parked at a new label is chosen (explore off)."""
    a, b = _Ctx("a", "x"), _Ctx("b", "y")
    for seed in range(20):
        p = Coverage(seed, explore=0.0)
        p.covered.add(("start", "x"))
        assert p.choose(_decision(a, b)) is b


def test_covered_pairs_accumulate_across_executions():
    """Pairs taken in one execution stay covered in the next of the same object."""
    p = Coverage(1, explore=0.0)
    a, b = _Ctx("a", "x"), _Ctx("b", "y")
    first = p.choose(_decision(a, b))
    assert p.new_execution() and p.new_execution()
    second = p.choose(_decision(a, b))
    assert first is not second
    assert {("start", "x"), ("start", "y")} <= p.covered


def test_single_choice_and_name():
    """A lone runnable context is taken; the policy is known to parse_policy and describes itself."""
    p = parse_policy("coverage", seed=4)
    assert isinstance(p, Coverage) and p.describe() == "coverage(seed=4)"
    c = _Ctx("a", "x")
    assert p.choose(_decision(c)) is c
