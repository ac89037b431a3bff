"""One op vocabulary: every op is declared once, in shared/, and everything else derives from it.

The scenario layer (mtekvm.scenario), the runner, the VMM, the guest and the hypervisor's
dispatch tables read the op tables of shared.abi and shared.control; these tests check that
the derived tables cover the declared ones exactly, and that no module types the host-process
op names again.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from mtekvm.scenario import OPS_BY_KIND, ScenarioError, parse_scenario
from mtekvm.scenario import ops as scenario_ops
from shared.abi import ACCESS_KINDS, ACTORS, KIND_NAMES, OPS, PROCESS_OPS, bind, ops_of
from shared.control import ACTOR_CHANNEL, ACTOR_OPS, GUEST_OPS, KVM_OPS

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: ABI ops no scenario actor runs under their own name, and why.
INFRASTRUCTURE = {
    "hello": "the connection's introduction",
    "batch": "a round-trip optimisation of the process ops",
    "getpid": "the harness learns pids with it",
    "kvm-create-vm": "the VMM's vm-create / vm-setup",
    "kvm-destroy-vm": "the VMM's shutdown",
    "vcpu-attach": "the guest's vcpu-add",
    "vcpu-batch": "a round-trip optimisation of vcpu-access",
    "boot": "the harness boots each host",
    "check-invariants": "the harness runs the oracles",
    "stats": "reports and benchmarks",
}


def _scenario(steps: list[dict]) -> dict:
    return {"name": "vocabulary", "processes": {"p": {}},
            "vms": {"vm0": {"memory": [{"ipa": 0, "size": "2MiB"}]}}, "steps": steps}


class TestEveryOpHasOneForm:
    def test_scenario_ops_are_the_shared_actor_ops(self):
        """Each actor's scenario ops are exactly the ops the shared tables give that actor."""
        assert set(ACTORS) == set(OPS_BY_KIND) == set(ACTOR_OPS) == set(ACTOR_CHANNEL)
        for actor in ACTORS:
            assert set(OPS_BY_KIND[actor]) == set(ACTOR_OPS[actor]), actor

    def test_every_abi_op_is_an_actor_op_a_call_or_infrastructure(self):
        """Every op of the hypervisor's ABI is run by a scenario actor, built on by one, or named infrastructure."""
        called = {c for table in ACTOR_OPS.values() for d in table.values() for c in d.calls}
        for name, d in OPS.items():
            used = bool(d.actors) or name in called or name in INFRASTRUCTURE
            assert used, f"ABI op {name!r} has no scenario form and is not listed as infrastructure"
        assert not set(INFRASTRUCTURE) - set(OPS), "INFRASTRUCTURE names an op the ABI does not have"
        for table in ACTOR_OPS.values():
            for d in table.values():
                assert set(d.calls) <= set(OPS), f"{d.name} calls an op the ABI does not have"

    def test_each_scenario_op_maps_to_exactly_one_shared_op(self):
        """A vmm:VM op name is either a forwarded process op or a KVM op, never both; guest ops are their own table."""
        assert not set(ops_of(OPS, "vmm")) & set(KVM_OPS)
        for actor, table in ACTOR_OPS.items():
            for name, d in table.items():
                assert d.name == name and actor in d.actors, (actor, name)
        assert set(ACTOR_OPS["guest"]) == set(GUEST_OPS)
        # the guest's host-process instructions carry the process op's own fields, not a copy
        for name in ops_of(OPS, "guest"):
            assert GUEST_OPS[name].fields is OPS[name].fields

    def test_every_field_has_a_kind_and_a_scenario_form(self):
        """Every field of every actor op has a declared kind and a written form (or is documented sugar)."""
        for actor, table in ACTOR_OPS.items():
            for d in table.values():
                for f in d.fields:
                    assert f.kind.name in KIND_NAMES, (d.name, f.name)
                    if f.kind.options and f.kind.name in ("enum", "list"):
                        assert all(isinstance(o, str) for o in f.kind.options)
                    assert callable(scenario_ops.form(f.kind)), (d.name, f.name)
                keys = scenario_ops._keys(d)
                for k in keys:
                    field_keys = {f.key for f in d.fields}
                    assert k in field_keys or k in scenario_ops.SUGAR, (actor, d.name, k)

    def test_a_field_added_to_the_declaration_reaches_the_scenario(self):
        """The scenario parser takes a step's keys from the shared declaration: a bad enum value names the shared
        options."""
        for name, d in KVM_OPS.items():
            enums = [f for f in d.fields if f.kind.name == "enum" and f.required]
            if not enums:
                continue
            f = enums[0]
            with pytest.raises(ScenarioError) as exc:
                parse_scenario(_scenario([{"actor": "vmm:vm0", "op": name, f.key: "not-an-option"}]))
            # an earlier required field may be reported first; the option list shows when it is ours
            if exc.value.key == f.key:
                assert all(o in exc.value.message for o in f.kind.options)

    def test_docs_list_the_same_ops_per_actor(self):
        """docs/scenarios.md's op tables list exactly each actor's ops."""
        text = (ROOT / "docs" / "scenarios.md").read_text()
        sections = {"process": "### Host-process ops", "vmm": "### VMM ops", "guest": "### Guest ops",
                    "host": "### Host-kernel ops"}
        for actor, heading in sections.items():
            body = text.split(heading, 1)[1].split("\n#", 1)[0]
            listed = set()
            for line in body.splitlines():
                if line.startswith("| `"):
                    listed |= set(re.findall(r"`([a-z0-9-]+)`", line.split("|")[1]))
            want = set(ACTOR_OPS[actor])
            if actor == "vmm":  # the VMM ops table lists the KVM ops; the process ops are "every host-process op"
                want = set(KVM_OPS)
            assert listed == want, f"{heading}: docs list {sorted(listed ^ want)} differently"


class TestBind:
    def test_bind_checks_the_handlers_against_the_table(self):
        """bind() maps identifier spellings to op names and refuses a missing or unknown handler."""
        table = {n: d for n, d in OPS.items() if d.role == "host"}
        handlers = {n.replace("-", "_"): n for n in table}
        assert bind(table, **handlers) == {n: n for n in table}
        missing = dict(handlers)
        missing.pop(next(iter(missing)))
        with pytest.raises(KeyError):
            bind(table, **missing)
        with pytest.raises(KeyError):
            bind(table, **handlers, not_an_op=None)

    def test_the_hypervisors_process_table_is_bound_to_the_abi(self):
        """The hypervisor dispatches exactly the ABI's process-role ops."""
        from hypervisor.syscalls import PROCESS_OPS as HANDLERS

        assert set(HANDLERS) == {n for n, d in OPS.items() if d.role == "process"}


#: Calls that name an op to use it: a request, a scheduling point's label, checking or noting an op's arguments.
USES = ("call", "_call", "point", "validate_args", "note_host_op")


def _literals(path: pathlib.Path, names: set[str]) -> list[tuple[str, int]]:
    """String constants in ``path`` equal to one of ``names`` that declare or dispatch on an op.

    Left out: a client's request (an argument of ``call``/``_call``, :data:`USES`, or the op of an
    ``(op, args)`` pair), a step's ``"op"`` value (a generated step names its op as a scenario file
    does), a comparison (``op == "mmap"``), ``__all__``, a tuple, list, set or dict naming only one
    op among other words (a stress family called ``fork``), a scheduling point's label
    (``sched.point("munmap")``), and one of the
    four memory-access kinds (``shared.abi.ACCESS_KINDS``, vcpu-access's ``kind``) where the access
    path compares or keys on it: those use a name, they do not declare an op.
    """
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if isinstance(node, ast.Call) and node.args and called in USES:
            skip.update(id(a) for a in node.args)
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[1], ast.Dict):
            skip.add(id(node.elts[0]))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            named = [e for e in elts if isinstance(e, ast.Constant) and e.value in names]
            if len(named) < 2:  # one op name among other words is a word (a family called fork), not a table
                skip.update(id(e) for e in named)
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "op":  # a step naming its op
                        skip.add(id(value))
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and sub.value in ACCESS_KINDS:
                        skip.add(id(sub))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                  for t in node.targets):
            for sub in ast.walk(node.value):  # names of Python objects (a function called load)
                skip.add(id(sub))
        elif isinstance(node, ast.Compare):  # a use of the name (``op == "mmap"``), not a declaration
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant):
                    skip.add(id(sub))
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
            and id(node) not in skip]


def test_each_host_process_op_name_is_written_once():
    """Outside tests and docs, each host-process op name is written once: in its shared.abi declaration."""
    names = set(PROCESS_OPS)
    assert len(names) == 15
    found: dict[str, list[str]] = {n: [] for n in names}
    for package in ("shared", "hypervisor", "vmm", "guest", "mtekvm"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, line in _literals(path, names):
                found[name].append(f"{path.relative_to(ROOT)}:{line}")
    for name, where in found.items():
        assert where == [w for w in where if w.startswith("shared/abi.py:")] and len(where) == 1, \
            f"op {name!r} is written at {where}"


def test_the_grep_sees_a_second_declaration():
    """The literal scan is not blind: a module that lists op names again is caught."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "m.py"
        p.write_text('OPS = ("mmap", "fork")\nif op == "store":\n    pass\nclient.call("munmap", {})\n')
        got = {n for n, _ in _literals(p, set(PROCESS_OPS))}
    assert got == {"mmap", "fork"}
