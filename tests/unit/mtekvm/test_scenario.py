"""Unit tests for mtekvm.scenario: the scenario file parser and its normalisation."""

from __future__ import annotations

import pickle
import tomllib

import pytest

from mtekvm.scenario import (
    ERRNO_NAMES,
    Expect,
    HostSpec,
    MemslotSpec,
    Parallel,
    ScenarioError,
    SchedulerSpec,
    Step,
    load_scenario,
    parse_scenario,
    parse_size,
)

# The example from shared/SCENARIOS.md, verbatim.
CONTRACT_EXAMPLE = """
name = "guest tags survive host swap"

[host]
ram = "256MiB"

[vms.vm0]
mte = true                       # KVM_CAP_ARM_MTE, enabled before vCPUs are created
vcpus = 1
memory = [ { ipa = 0x4000_0000, size = "16MiB", backing = "memfd" } ]

[[steps]]
actor = "guest:vm0"
op = "enable-mte"
tcf = "sync"

[[steps]]
actor = "guest:vm0"
op = "map"
va = 0x4000_0000
ipa = 0x4000_0000
size = "64KiB"
attr = "tagged"

[[steps]]
actor = "guest:vm0"
op = "stg"
addr = 0x4000_0000
size = 4096
tag = 5

[[steps]]
actor = "host"
op = "swap-out"
vm = "vm0"
ipa = 0x4000_0000
size = 4096

[[steps]]
actor = "guest:vm0"
op = "ldg"
addr = 0x4000_0000
size = 64
expect = { outcome = "ok", value = [5, 5, 5, 5] }

[[steps]]
actor = "guest:vm0"
op = "store"
addr = 0x4000_0000
tag = 6
data = "00ff"
expect = "tag-check-fault"
"""

# A small world for step tests: one process, one two-vCPU VM.
WORLD = """
name = "t"
[processes.p]
[vms.vm0]
vcpus = 2
memory = [ { ipa = 0x4000_0000, size = "16MiB" } ]
"""


def parse(src: str, path: str = "s.toml"):
    """Decode TOML and parse it as a scenario."""
    return parse_scenario(tomllib.loads(src), path)


def steps(body: str):
    """Parse WORLD followed by ``body`` (some [[steps]]) and return its steps."""
    return parse(WORLD + body).steps


def one(actor: str, op: str, **args) -> Step:
    """Parse a single step with the given actor, op and arguments (as a TOML inline table)."""
    table = {"name": "t", "processes": {"p": {}},
             "vms": {"vm0": {"vcpus": 2, "memory": [{"ipa": 0x4000_0000, "size": "16MiB"}]}},
             "steps": [{"actor": actor, "op": op, **args}]}
    return parse_scenario(table, "s.toml").steps[0]


def error(src_or_table, path: str = "s.toml") -> ScenarioError:
    """Return the ScenarioError raised by parsing ``src_or_table``."""
    with pytest.raises(ScenarioError) as info:
        if isinstance(src_or_table, str):
            parse(src_or_table, path)
        else:
            parse_scenario(src_or_table, path)
    return info.value


def step_error(actor: str, op: str, **args) -> ScenarioError:
    """Return the ScenarioError raised by a single bad step."""
    with pytest.raises(ScenarioError) as info:
        one(actor, op, **args)
    return info.value


class TestContractExample:
    def test_example_parses_to_expected_steps(self):
        """The SCENARIOS.md example yields exactly the normalised steps the runner needs."""
        s = parse(CONTRACT_EXAMPLE, "scenarios/example.toml")
        g = dict(actor="guest:vm0", actor_kind="guest", actor_target="vm0", vcpu=0)
        base = 0x4000_0000
        assert s.steps == (
            Step(1, op="enable-mte", args={"tcf": "sync", "include": 0xFFFF}, expect=None,
                 path_in_parallel=None, **g),
            Step(2, op="map", args={"va": base, "ipa": base, "size": 65536, "attr": "tagged"},
                 expect=None, **g),
            Step(3, op="stg", args={"addr": base, "tag": 5, "size": 4096}, expect=None, **g),
            Step(4, "host", "host", "host", None, "swap-out",
                 {"process": None, "vm": "vm0", "addr": base, "size": 4096}, None),
            Step(5, op="ldg", args={"addr": base, "size": 64},
                 expect=Expect("ok", [5, 5, 5, 5], True), **g),
            Step(6, op="store", args={"addr": base, "tag": 6, "data": b"\x00\xff"},
                 expect=Expect("tag-check-fault", None, False), **g),
        )

    def test_example_top_level(self):
        """The example's hosts, VMs and defaults are filled in."""
        s = parse(CONTRACT_EXAMPLE, "scenarios/example.toml")
        assert s.name == "guest tags survive host swap"
        assert s.description == "" and s.bugs == () and s.path == "scenarios/example.toml"
        assert s.scheduler == SchedulerSpec("free", None, None)
        assert s.hosts == {"host": HostSpec("host", True, 256 << 20, 64 << 20)}
        assert s.processes == {}
        vm = s.vms["vm0"]
        assert (vm.host, vm.mte, vm.vcpus, vm.ipa_bits, vm.setup) == ("host", True, 1, 40, "auto")
        assert vm.memory == (MemslotSpec(0, 0x4000_0000, 16 << 20, "memfd", None, False),)


class TestSizes:
    @pytest.mark.parametrize("value, expected", [
        (0, 0), (4096, 4096), ("4096", 4096), ("4096B", 4096), ("4KiB", 4096),
        ("4 KiB", 4096), ("16MiB", 16 << 20), ("1GiB", 1 << 30), ("2TiB", 2 << 40)])
    def test_accepted_forms(self, value, expected):
        """Integers and strings with a binary unit parse to bytes."""
        assert parse_size(value, path="f", step=None, key="size") == expected

    @pytest.mark.parametrize("value", [-1, True, 1.5, "4KB", "4kib", "4  KiB", "0x1000", "", None])
    def test_rejected_forms(self, value):
        """Negative numbers, booleans, floats, decimal units and odd spellings are errors."""
        with pytest.raises(ScenarioError) as info:
            parse_size(value, path="f.toml", step=3, key="size")
        assert (info.value.path, info.value.step, info.value.key) == ("f.toml", 3, "size")

    def test_size_strings_in_steps(self):
        """Step arguments that are sizes or addresses accept unit strings."""
        st = one("p", "munmap", addr="1MiB", size="8KiB")
        assert st.args == {"addr": 1 << 20, "size": 8192}


class TestActors:
    def test_actor_kinds(self):
        """Each actor form resolves to its kind, target and vCPU."""
        got = [(s.actor_kind, s.actor_target, s.vcpu) for s in (
            one("p", "irg"), one("vmm:vm0", "irg"), one("guest:vm0", "irg"),
            one("guest:vm0:1", "irg"), one("host:host", "page-flags", process="p", addr=0),
            one("host", "page-flags", vm="vm0", ipa=0))]
        assert got == [("process", "p", None), ("vmm", "vm0", None), ("guest", "vm0", 0),
                       ("guest", "vm0", 1), ("host", "host", None), ("host", "host", None)]

    @pytest.mark.parametrize("actor", ["q", "vmm:vm1", "guest:vm1", "host:h2", "vm0", "vmm"])
    def test_unknown_actor(self, actor):
        """An actor that names nothing declared is an error on key 'actor'."""
        e = step_error(actor, "irg")
        assert (e.step, e.key) == (1, "actor") and "unknown actor" in e.message

    def test_vcpu_out_of_range(self):
        """guest:VM:N needs N below the VM's vcpus."""
        e = step_error("guest:vm0:2", "irg")
        assert e.key == "actor" and "0..1" in e.message

    def test_fork_child_becomes_actor(self):
        """A fork's child is an actor in later steps and inherits its parent's host."""
        s = steps('[[steps]]\nactor = "p"\nop = "fork"\nchild = "c"\n'
                  '[[steps]]\nactor = "c"\nop = "prctl-get"\n'
                  '[[steps]]\nactor = "host"\nop = "swap-out"\nprocess = "c"\naddr = 0\n'
                  'size = 4096\n')
        assert s[0].args == {"child": "c"}
        assert (s[1].actor_kind, s[1].actor_target) == ("process", "c")
        assert s[2].args["process"] == "c"

    def test_fork_child_not_an_actor_before_fork(self):
        """A child used before the fork that creates it is an unknown actor."""
        with pytest.raises(ScenarioError) as info:
            steps('[[steps]]\nactor = "c"\nop = "irg"\n'
                  '[[steps]]\nactor = "p"\nop = "fork"\nchild = "c"\n')
        assert (info.value.step, info.value.key) == (1, "actor")

    def test_fork_child_clash(self):
        """A fork child may not reuse an existing process name."""
        e = step_error("vmm:vm0", "fork", child="p")
        assert e.key == "child" and "already exists" in e.message


class TestOps:
    def test_op_not_allowed_for_actor(self):
        """An op outside the actor kind's table is an error listing the allowed ops."""
        e = step_error("p", "map", va=0, ipa=0, size=4096, attr="normal")
        assert e.key == "op" and "mmap" in e.message and "ptrace-poke-tags" in e.message

    def test_vmm_has_process_ops(self):
        """The VMM may run every host-process op on its own address space."""
        assert one("vmm:vm0", "mprotect", addr=0, size=4096, prot=[]).args["prot"] == ()

    def test_mmap_defaults(self):
        """mmap fills in addr, prot, share, backing, object and offset."""
        assert one("p", "mmap", size="64KiB").args == {
            "addr": None, "size": 65536, "prot": ("read", "write"), "share": "private",
            "backing": "anon", "object": None, "offset": 0}

    @pytest.mark.parametrize("backing, share", [
        ("anon", "private"), ("hugetlb", "private"), ("anon-shared", "shared"),
        ("memfd", "shared"), ("shmem", "shared"), ("file", "shared"), ("device", "shared")])
    def test_mmap_share_default_by_backing(self, backing, share):
        """The default share follows the backing."""
        assert one("p", "mmap", size=4096, backing=backing).args["share"] == share

    def test_mmap_anon_shared_private_is_error(self):
        """share = private contradicts backing anon-shared."""
        assert step_error("p", "mmap", size=4096, backing="anon-shared",
                          share="private").key == "share"

    def test_kernel_checked_values_pass(self):
        """Misalignments the kernel must reject with an errno are left for the kernel."""
        assert one("p", "mmap", addr=0x1001, size=4096).args["addr"] == 0x1001
        assert one("p", "munmap", addr=0x1000, size=100).args["size"] == 100
        assert one("p", "stg", addr=0x1008, size=20).args == {"addr": 0x1008, "tag": 0,
                                                               "size": 20}
        ct = one("vmm:vm0", "copy-tags", ipa=0x4000_0001, length=17, direction="from-guest",
                 flags=6, reserved=[1, 0])
        assert ct.args == {"ipa": 0x4000_0001, "length": 17, "direction": "from-guest",
                           "tags": None, "flags": 6, "reserved": (1, 0)}

    def test_store_data_and_fill(self):
        """store's data or fill+size both become bytes under 'data', with tag 0 by default."""
        assert one("p", "store", addr=0, data="00FFab").args == {
            "addr": 0, "tag": 0, "data": b"\x00\xff\xab"}
        assert one("p", "store", addr=0, fill=0xAA, size=3).args["data"] == b"\xaa\xaa\xaa"

    @pytest.mark.parametrize("args, key", [
        ({"data": "0"}, "data"), ({"data": "zz"}, "data"), ({}, "data"),
        ({"data": "00", "fill": 1, "size": 1}, "data"), ({"data": "00", "size": 1}, "size"),
        ({"fill": 256, "size": 1}, "fill"), ({"fill": 1}, "size")])
    def test_store_data_errors(self, args, key):
        """Bad hex, both or neither of data/fill, and fill out of range are errors."""
        assert step_error("p", "store", addr=0, **args).key == key

    def test_prctl_needs_something(self):
        """prctl needs tcf or include, and fills the other with None."""
        assert one("p", "prctl", tcf="async").args == {"tcf": "async", "include": None}
        assert step_error("p", "prctl").key == "tcf"
        assert step_error("p", "prctl", include=0x10000).key == "include"

    def test_ptrace(self):
        """ptrace ops resolve their target; poke needs a list of tags."""
        assert one("p", "ptrace-peek-tags", target="vmm:vm0", addr=16, count=4).args == {
            "target": "vmm:vm0", "addr": 16, "count": 4}
        assert one("vmm:vm0", "ptrace-poke-tags", target="p", addr=0, tags=[1, 2]).args[
            "tags"] == (1, 2)
        assert step_error("p", "ptrace-poke-tags", target="p", addr=0, tags=3).key == "tags"
        assert step_error("p", "ptrace-peek-tags", target="nobody", addr=0,
                          count=1).key == "target"

    def test_vmm_ops_defaults(self):
        """VMM ops normalise flags lists and fill their defaults."""
        assert one("vmm:vm0", "enable-cap", cap="arm-mte").args == {"cap": "arm-mte",
                                                                    "flags": 0}
        assert one("vmm:vm0", "create-vcpu").args == {"aarch32": False}
        assert one("vmm:vm0", "set-memory-region", slot=1, ipa=0, size="4KiB", addr=0,
                   flags=["readonly"]).args["flags"] == ("readonly",)
        assert step_error("vmm:vm0", "check-extension", cap="arm-sve").key == "cap"

    def test_copy_tags_single_int(self):
        """A single integer for to-guest tags means that tag for length // 16 granules."""
        args = one("vmm:vm0", "copy-tags", ipa=0, length=64, direction="to-guest",
                   tags=7).args
        assert args["tags"] == (7, 7, 7, 7) and args["flags"] is None

    def test_guest_ops(self):
        """Guest ops take their own arguments and defaults."""
        assert one("guest:vm0", "read-tfsr").args == {}
        assert one("guest:vm0", "tco", on=True).args == {"on": True}
        assert step_error("guest:vm0", "map", va=0, ipa=0, size=1, attr="weird").key == "attr"

    def test_host_op_forms(self):
        """Host ops need exactly one of process+addr or vm+ipa; page-flags takes no size."""
        assert one("host", "page-flags", vm="vm0", ipa=0).args == {
            "process": None, "vm": "vm0", "addr": 0, "size": None}
        assert step_error("host", "ksm-merge", size=4096).key == "process"
        assert step_error("host", "ksm-merge", process="p", vm="vm0", addr=0,
                          size=4096).key == "process"
        assert step_error("host", "swap-out", vm="vm0", addr=0, size=4096).key == "addr"
        assert step_error("host", "page-flags", vm="vm0", ipa=0, size=4096).key == "size"

    def test_host_op_on_other_host(self):
        """A host kernel only acts on processes and VMs that live on it."""
        e = error({"name": "t", "hosts": {"a": {}, "b": {}}, "processes": {"p": {"host": "b"}},
                   "steps": [{"actor": "host:a", "op": "swap-out", "process": "p", "addr": 0,
                              "size": 4096}]})
        assert e.key == "process" and "'b'" in e.message


class TestExpect:
    @pytest.mark.parametrize("raw, expected", [
        ("ok", Expect("ok")), ("EINVAL", Expect("EINVAL")), ("EHWPOISON", Expect("EHWPOISON")),
        ("tag-check-fault", Expect("tag-check-fault")),
        ("async-tag-check-fault", Expect("async-tag-check-fault")),
        ({"outcome": "ok"}, Expect("ok", None, False)),
        ({"outcome": "ok", "value": 3}, Expect("ok", 3, True)),
        ({"outcome": "tag-check-fault", "value": 0x1010}, Expect("tag-check-fault", 0x1010,
                                                                 True))])
    def test_forms(self, raw, expected):
        """Every expect form of the contract parses."""
        assert one("p", "irg", expect=raw).expect == expected

    def test_omitted(self):
        """An omitted expect is None."""
        assert one("p", "irg").expect is None

    def test_load_value_lowercased(self):
        """A hex string expected from load is lowercased."""
        st = one("p", "load", addr=0, size=2, expect={"outcome": "ok", "value": "00FF"})
        assert st.expect == Expect("ok", "00ff", True)

    @pytest.mark.parametrize("raw, key", [
        ("EFOO", "expect"), ("fail", "expect"), (5, "expect"), ({"value": 1}, "expect.outcome"),
        ({"outcome": "ok", "val": 1}, "expect.val"), ({"outcome": "nope"}, "expect.outcome")])
    def test_bad_expect(self, raw, key):
        """Unknown outcomes and keys in expect are errors naming the key."""
        assert step_error("p", "irg", expect=raw).key == key

    def test_errno_table(self):
        """The errno table has the names the kernel model returns."""
        assert {"EPERM", "EINVAL", "EFAULT", "EBUSY", "ENOMEM", "EOPNOTSUPP", "EHWPOISON",
                "ENOSYS", "EOVERFLOW"} <= ERRNO_NAMES


class TestErrors:
    def test_message_format(self):
        """str() names the file, step and key in the contract's order."""
        e = ScenarioError("scenarios/x.toml", 3, "size", "must be a multiple of 16 (got 20)")
        assert str(e) == ("scenarios/x.toml: step 3: key 'size': must be a multiple of 16 "
                          "(got 20)")
        assert str(ScenarioError("x.toml", None, None, "bad")) == "x.toml: bad"

    def test_pickles(self):
        """A ScenarioError survives pickling with its attributes."""
        e = pickle.loads(pickle.dumps(ScenarioError("f", 2, "k", "m")))
        assert (e.path, e.step, e.key, e.message) == ("f", 2, "k", "m")

    def test_step_error_names_file_step_and_key(self):
        """An error inside a step names the file, the 1-based step and the key."""
        with pytest.raises(ScenarioError) as info:
            parse(WORLD + '[[steps]]\nactor = "p"\nop = "irg"\n'
                  '[[steps]]\nactor = "p"\nop = "stg"\naddr = 0\nsize = 16\ntag = 16\n',
                  "scenarios/bad.toml")
        assert str(info.value).startswith("scenarios/bad.toml: step 2: key 'tag': ")

    def test_unknown_argument(self):
        """An unknown argument key is named in the error."""
        e = step_error("p", "stg", addr=0, sise=16)
        assert e.key == "sise" and "addr, tag, size" in e.message

    def test_missing_argument(self):
        """A missing required argument is named in the error."""
        e = step_error("p", "ldg", addr=0)
        assert e.key == "size" and "required" in e.message

    @pytest.mark.parametrize("table, key", [
        ({}, "name"), ({"name": ""}, "name"), ({"name": "t", "bogus": 1}, "bogus"),
        ({"name": "t", "bugs": ["no-such-bug"]}, "bugs"), ({"name": "t", "bugs": "x"}, "bugs"),
        ({"name": "t", "bugs": [["x"]]}, "bugs"),
        ({"name": "t", "steps": {"actor": "p"}}, "steps"),
        ({"name": "t", "host": {}, "hosts": {"a": {}}}, "hosts"),
        ({"name": "t", "host": {"ram": "1KB"}}, "host.ram"),
        ({"name": "t", "processes": {"p": {"host": "h9"}}}, "processes.p.host"),
        ({"name": "t", "processes": {"host": {}}}, "processes.host"),
        ({"name": "t", "scheduler": {"kind": "replay"}}, "scheduler.schedule"),
        ({"name": "t", "scheduler": {"seed": 1}}, "scheduler.seed")])
    def test_top_level_errors(self, table, key):
        """Bad top-level tables are errors naming the key, outside any step."""
        e = error(table)
        assert (e.path, e.step, e.key) == ("s.toml", None, key)

    def test_known_bugs_accepted(self):
        """Names from the shared bug zoo are accepted."""
        assert parse('name = "t"\nbugs = ["no-tag-lock", "flag-before-init"]').bugs == (
            "no-tag-lock", "flag-before-init")

    def test_load_scenario_bad_toml(self, tmp_path):
        """A TOML syntax error becomes a ScenarioError with the line and column."""
        f = tmp_path / "bad.toml"
        f.write_text('name = "t"\nsize = = 3\n')
        with pytest.raises(ScenarioError) as info:
            load_scenario(f)
        assert info.value.path == str(f) and "line 2" in info.value.message

    def test_load_scenario_reads_file(self, tmp_path):
        """load_scenario parses a file and records its path."""
        f = tmp_path / "ok.toml"
        f.write_text(CONTRACT_EXAMPLE)
        assert load_scenario(str(f)).path == str(f)
        with pytest.raises(ScenarioError):
            load_scenario(tmp_path / "missing.toml")


class TestParallel:
    def test_numbering(self):
        """Sub-steps share the parallel step's number and count their position from 1."""
        s = steps('[[steps]]\nactor = "p"\nop = "irg"\n'
                  '[[steps]]\nparallel = [ { actor = "p", op = "irg" },'
                  ' { actor = "guest:vm0:1", op = "irg", expect = "ok" } ]\n'
                  '[[steps]]\nactor = "p"\nop = "irg"\n')
        par = s[1]
        assert isinstance(par, Parallel) and par.number == 2 and s[2].number == 3
        assert [(x.number, x.path_in_parallel, x.vcpu) for x in par.steps] == [
            (2, 1, None), (2, 2, 1)]

    def test_sub_step_error_key(self):
        """An error in a sub-step names the step and parallel[i].key."""
        with pytest.raises(ScenarioError) as info:
            steps('[[steps]]\nparallel = [ { actor = "p", op = "irg" },'
                  ' { actor = "p", op = "load", addr = 0, size = "4KB" } ]\n')
        assert (info.value.step, info.value.key) == (1, "parallel[2].size")

    @pytest.mark.parametrize("body, key", [
        ('parallel = []', "parallel"),
        ('parallel = [ { parallel = [ { actor = "p", op = "irg" } ] } ]', "parallel[1].parallel"),
        ('parallel = [ { actor = "p", op = "irg" } ]\nactor = "p"', "actor")])
    def test_shape_errors(self, body, key):
        """Empty, nested, or mixed parallel steps are errors."""
        with pytest.raises(ScenarioError) as info:
            steps(f"[[steps]]\n{body}\n")
        assert info.value.key == key

    def test_fork_child_not_visible_to_siblings(self):
        """A child forked in a parallel step is an actor only after that step."""
        with pytest.raises(ScenarioError) as info:
            steps('[[steps]]\nparallel = [ { actor = "p", op = "fork", child = "c" },'
                  ' { actor = "c", op = "irg" } ]\n')
        assert info.value.key == "parallel[2].actor"
        s = steps('[[steps]]\nparallel = [ { actor = "p", op = "fork", child = "c" } ]\n'
                  '[[steps]]\nactor = "c"\nop = "irg"\n')
        assert s[1].actor_target == "c"


class TestHostsAndScheduler:
    def test_default_host(self):
        """Without [host] or [hosts], one default host named 'host' exists."""
        s = parse('name = "t"\n[processes.p]\n')
        assert list(s.hosts) == ["host"] and s.processes["p"].host == "host"

    def test_several_hosts(self):
        """[hosts.NAME] declares several hosts; processes default to the first."""
        s = parse('name = "t"\n[hosts.a]\nmte = false\nswap = 0\n[hosts.b]\nram = "1GiB"\n'
                  '[processes.p]\n[processes.q]\nhost = "b"\n')
        assert s.hosts["a"] == HostSpec("a", False, 256 << 20, 0)
        assert s.hosts["b"].ram == 1 << 30
        assert (s.processes["p"].host, s.processes["q"].host) == ("a", "b")

    @pytest.mark.parametrize("sched, expected", [
        ({}, SchedulerSpec("free", None, None)),
        ({"kind": "random"}, SchedulerSpec("random", 0, None)),
        ({"kind": "random", "seed": 42}, SchedulerSpec("random", 42, None)),
        ({"kind": "replay", "schedule": "0,1,1"}, SchedulerSpec("replay", None, "0,1,1"))])
    def test_scheduler(self, sched, expected):
        """Scheduler kinds parse; random without a seed uses seed 0."""
        assert parse_scenario({"name": "t", "scheduler": sched}).scheduler == expected


class TestVms:
    def test_vm_fields_and_slots(self):
        """VM fields parse and memslots are numbered from 0 in order."""
        s = parse('name = "t"\n[vms.v]\nmte = false\nvcpus = 4\nipa_bits = 36\n'
                  'setup = "manual"\nmemory = [ { ipa = 0, size = "1MiB", prot_mte = true },'
                  ' { ipa = "1MiB", size = "2MiB", backing = "shmem", object = "ram" } ]\n')
        v = s.vms["v"]
        assert (v.mte, v.vcpus, v.ipa_bits, v.setup) == (False, 4, 36, "manual")
        assert v.memory == (MemslotSpec(0, 0, 1 << 20, "anon", None, True),
                            MemslotSpec(1, 1 << 20, 2 << 20, "shmem", "ram", False))

    @pytest.mark.parametrize("slot, key", [
        ({"ipa": 0x800, "size": 4096}, "vms.v.memory[0].ipa"),
        ({"ipa": 0, "size": 100}, "vms.v.memory[0].size"),
        ({"ipa": 0, "size": 0}, "vms.v.memory[0].size"),
        ({"ipa": 0x800, "size": 4096, "backing": "hugetlb"}, "vms.v.memory[0].ipa"),
        ({"ipa": 0, "size": 4096, "object": "o"}, "vms.v.memory[0].object"),
        ({"ipa": 0, "size": 4096, "colour": 1}, "vms.v.memory[0].colour"),
        ({"size": 4096}, "vms.v.memory[0].ipa"),
        ({"ipa": 1 << 40, "size": 4096}, "vms.v.memory[0].size")])
    def test_bad_memslot(self, slot, key):
        """Unaligned, empty, out-of-range or malformed memslots are errors naming the key."""
        assert error({"name": "t", "vms": {"v": {"memory": [slot]}}}).key == key

    def test_overlapping_memslots(self):
        """Two memslots may not overlap in IPA space."""
        e = error({"name": "t", "vms": {"v": {"memory": [{"ipa": 0, "size": 8192},
                                                         {"ipa": 4096, "size": 4096}]}}})
        assert e.key == "vms.v.memory[1].ipa" and "overlaps memslot 0" in e.message

    def test_object_keeps_one_backing(self):
        """An object shared between a memslot and an mmap must keep one backing."""
        e = error({"name": "t", "processes": {"p": {}},
                   "vms": {"v": {"memory": [{"ipa": 0, "size": 4096, "backing": "memfd",
                                             "object": "ram"}]}},
                   "steps": [{"actor": "p", "op": "mmap", "size": 4096, "backing": "file",
                              "object": "ram"}]})
        assert (e.step, e.key) == (1, "object")

    @pytest.mark.parametrize("vm, key", [
        ({"vcpus": 0}, "vms.v.vcpus"), ({"ipa_bits": 64}, "vms.v.ipa_bits"),
        ({"setup": "auto-ish"}, "vms.v.setup"), ({"host": "nope"}, "vms.v.host"),
        ({"mte": 1}, "vms.v.mte")])
    def test_bad_vm_fields(self, vm, key):
        """Bad VM fields are errors naming the key."""
        assert error({"name": "t", "vms": {"v": vm}}).key == key


class TestPctScheduler:
    def test_pct_with_depth(self):
        """``kind = "pct"`` takes a seed and a depth."""
        s = parse('name = "x"\n[scheduler]\nkind = "pct"\nseed = 4\ndepth = 2\n')
        assert (s.scheduler.kind, s.scheduler.seed, s.scheduler.depth) == ("pct", 4, 2)

    def test_pct_defaults(self):
        """PCT without seed or depth uses seed 0 and depth 3."""
        s = parse('name = "x"\n[scheduler]\nkind = "pct"\n')
        assert (s.scheduler.seed, s.scheduler.depth) == (0, 3)

    def test_depth_only_for_pct(self):
        """``depth`` with another kind is an error naming the key."""
        e = error('name = "x"\n[scheduler]\nkind = "random"\ndepth = 2\n')
        assert e.key == "scheduler.depth"

    def test_depth_range(self):
        """A depth of 0 is refused."""
        e = error('name = "x"\n[scheduler]\nkind = "pct"\ndepth = 0\n')
        assert e.key == "scheduler.depth"


class TestContractAdditions:
    """Keys the contract added: host tcf-preferred/kernel-fixes, hugepage-size, dirty-log protect2,
    dirty-log clear ranges, expect-violations, the livelock outcome."""

    def test_host_tcf_preferred_and_kernel_fixes(self):
        """tcf-preferred and kernel-fixes parse into the host spec; defaults are Linux's (async, none)."""
        s = parse('name = "t"\n[hosts.a]\ntcf-preferred = "sync"\n'
                  'kernel-fixes = ["sanitise-whole-hugetlb-folio"]\nfault-replay-limit = 8\n[hosts.b]\n')
        a, b = s.hosts["a"], s.hosts["b"]
        assert (a.tcf_preferred, a.kernel_fixes, a.fault_replay_limit) == (
            "sync", ("sanitise-whole-hugetlb-folio",), 8)
        assert (b.tcf_preferred, b.kernel_fixes, b.fault_replay_limit) == ("async", (), 64)

    @pytest.mark.parametrize("host, key", [
        ({"tcf-preferred": "none"}, "host.tcf-preferred"),
        ({"kernel-fixes": ["fix-everything"]}, "host.kernel-fixes"),
        ({"kernel-fixes": "sanitise-whole-hugetlb-folio"}, "host.kernel-fixes"),
        ({"fault-replay-limit": 0}, "host.fault-replay-limit")])
    def test_bad_host_keys(self, host, key):
        """An unknown preferred mode, an unknown kernel fix or a zero replay limit is an error naming the key."""
        assert error({"name": "t", "host": host}).key == key

    def test_mmap_hugepage_size_only_when_given(self):
        """hugepage-size on a hugetlb mmap becomes hugepage_size in bytes; without it the key is absent."""
        assert one("p", "mmap", size="32MiB", backing="hugetlb",
                   **{"hugepage-size": "32MiB"}).args["hugepage_size"] == 32 << 20
        assert "hugepage_size" not in one("p", "mmap", size="2MiB", backing="hugetlb").args

    @pytest.mark.parametrize("args, key", [
        ({"backing": "hugetlb", "hugepage-size": "4MiB"}, "hugepage-size"),
        ({"backing": "anon", "hugepage-size": "2MiB"}, "hugepage-size")])
    def test_bad_mmap_hugepage_size(self, args, key):
        """A size arm64 hugetlb does not have, or hugepage-size on a non-hugetlb mapping, is an error."""
        assert step_error("p", "mmap", size="4MiB", **args).key == key

    def test_memslot_hugepage_size_is_kept_and_slots_need_page_alignment_only(self):
        """A hugetlb memslot's hugepage-size is kept in bytes; like KVM, its ipa/size need only page alignment."""
        ok = parse_scenario({"name": "t", "vms": {"v": {"memory": [
            {"ipa": 0x4000_0000, "size": "64KiB", "backing": "hugetlb", "hugepage-size": "64KiB"}]}}})
        assert ok.vms["v"].memory[0].hugepage_size == 64 << 10
        off = parse_scenario({"name": "t", "vms": {"v": {"memory": [
            {"ipa": 0x4000_1000, "size": "2MiB", "backing": "hugetlb", "hugepage-size": "32MiB"}]}}})
        assert (off.vms["v"].memory[0].ipa, off.vms["v"].memory[0].size) == (0x4000_1000, 2 << 20)
        e = error({"name": "t", "vms": {"v": {"memory": [
            {"ipa": 0x4000_0800, "size": "2MiB", "backing": "hugetlb"}]}}})
        assert e.key == "vms.v.memory[0].ipa"
        e = error({"name": "t", "vms": {"v": {"memory": [
            {"ipa": 0, "size": "2MiB", "backing": "memfd", "hugepage-size": "2MiB"}]}}})
        assert e.key == "vms.v.memory[0].hugepage-size"

    def test_manual_dirty_log_protect2_and_args(self):
        """check-extension and enable-cap take manual-dirty-log-protect2; args is a list of ints, absent unless
        given."""
        assert one("vmm:vm0", "check-extension", cap="manual-dirty-log-protect2").args == {
            "cap": "manual-dirty-log-protect2"}
        assert one("vmm:vm0", "enable-cap", cap="manual-dirty-log-protect2", args=[3]).args == {
            "cap": "manual-dirty-log-protect2", "flags": 0, "args": (3,)}
        assert "args" not in one("vmm:vm0", "enable-cap", cap="arm-mte").args
        assert step_error("vmm:vm0", "enable-cap", cap="arm-mte", args=3).key == "args"
        assert step_error("vmm:vm0", "enable-cap", cap="dirty-ring").key == "cap"

    def test_dirty_log_clear_range(self):
        """dirty-log clear takes optional first and count (absent unless given); other actions refuse them."""
        assert one("vmm:vm0", "dirty-log", slot=0, action="clear", first=64, count=64).args == {
            "slot": 0, "action": "clear", "first": 64, "count": 64}
        assert one("vmm:vm0", "dirty-log", slot=0, action="clear").args == {"slot": 0, "action": "clear"}
        assert step_error("vmm:vm0", "dirty-log", slot=0, action="get", first=1).key == "first"

    def test_expect_violations_canonical(self):
        """expect-violations keeps canonical names (old spellings are translated), without duplicates."""
        s = parse_scenario({"name": "t", "expect-violations": [
            "GUEST-VISIBLE=>TAGGED", "TAGS-AS-WRITTEN", "GUEST-VISIBLE-IMPLIES-TAGGED"]})
        assert s.expect_violations == ("GUEST-VISIBLE-IMPLIES-TAGGED", "TAGS-AS-WRITTEN")
        assert parse_scenario({"name": "t"}).expect_violations == ()

    @pytest.mark.parametrize("value", [["NO-SUCH-INVARIANT"], "INIT-ONCE", [1]])
    def test_bad_expect_violations(self, value):
        """An invariant the model does not check, or not a list of names, makes the file invalid."""
        e = error({"name": "t", "expect-violations": value})
        assert e.key == "expect-violations"

    def test_livelock_outcome(self):
        """The contract's livelock outcome is a valid expectation."""
        assert one("p", "load", addr=0, size=1, expect="livelock").expect == Expect("livelock")


class TestPhysicalMemoryKeys:
    """The host keys of the physical-memory part: tag storage, CPU features, nodes and regions."""

    def test_keys_parse_into_the_host_spec(self):
        """Every key reaches HostSpec.physmem, nodes and regions in declared order with their defaults."""
        s = parse('name = "t"\n[host]\ntag-storage = "dynamic"\ntag-block-size = "16KiB"\nkvm-tag-storage = "refuse"\n'
                  'stage2-fwb = false\n[host.nodes.gpu0]\nkind = "gpu"\nsize = "64MiB"\n'
                  '[host.nodes.d1]\nkind = "dram"\nsize = "128MiB"\ntag-storage = "none"\n'
                  '[host.regions.bar]\ntype = "pfnmap"\nsize = "8KiB"\nattr = "write-combine"\n')
        pm = s.hosts["host"].physmem
        assert (pm.tag_storage, pm.tag_block_size, pm.kvm_tag_storage, pm.stage2_fwb, pm.cache_dic) == (
            "dynamic", 16 << 10, "refuse", False, True)
        assert [(n.name, n.kind, n.zone, n.tag_storage) for n in pm.nodes] == [
            ("gpu0", "gpu", "movable", None), ("d1", "dram", "normal", "none")]
        assert [(r.name, r.type, r.attr, r.allow_any_uncached) for r in pm.regions] == [
            ("bar", "pfnmap", "write-combine", True)]
        assert parse('name = "t"\n').hosts["host"].physmem.is_default

    @pytest.mark.parametrize("host, key", [
        ({"tag-storage": "sometimes"}, "host.tag-storage"),
        ({"nodes": {"node0": {"kind": "dram", "size": "2MiB"}}}, "host.nodes"),
        ({"regions": {"tag-storage": {"type": "pfnmap", "size": "4KiB"}}}, "host.nodes"),
        ({"nodes": {"x": {"kind": "dram", "size": "2MiB"}}, "regions": {"x": {"type": "pfnmap", "size": "4KiB"}}},
         "host.nodes"),
        ({"nodes": {"n": {"kind": "dram", "size": "3MiB"}}}, "host.nodes.n.size"),
        ({"nodes": {"n": {"size": "2MiB"}}}, "host.nodes.n.kind"),
        ({"nodes": {"n": {"kind": "hbm", "size": "2MiB"}}}, "host.nodes.n.kind"),
        ({"regions": {"r": {"type": "pfnmap", "size": "6KiB"}}}, "host.regions.r.size"),
        ({"regions": {"r": {"type": "coherent", "size": "4KiB", "attr": "device"}}}, "host.regions.r.attr"),
        ({"regions": {"r": {"type": "fs-dax", "size": "4KiB", "allow-any-uncached": False}}},
         "host.regions.r.allow-any-uncached")])
    def test_bad_keys(self, host, key):
        """Reserved or repeated names, bad sizes, kinds, types, or a key for another region type name the key."""
        assert error({"name": "t", "host": host}).key == key

    def test_stage2_entry_names_a_vm_of_the_scenario(self):
        """stage2-entry takes a VM by name; an unknown one makes the file invalid."""
        assert one("host", "stage2-entry", vm="vm0", ipa=0x4000_0000).args == {"vm": "vm0", "ipa": 0x4000_0000}
        assert step_error("host", "stage2-entry", vm="nope", ipa=0).key.endswith("vm")
