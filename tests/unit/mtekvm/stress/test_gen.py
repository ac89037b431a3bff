"""The stress generator: deterministic, valid scenario files, the op families it is asked for."""

from __future__ import annotations

import tomllib

import pytest

from mtekvm.stress.gen import FAMILIES, GenConfig, generate, load, parse_ops, parse_weights, to_toml


def _ops(g) -> set[str]:
    return {sub["op"] for s in g.steps for sub in s.get("parallel", [s])}


def test_same_seed_same_scenario():
    """A seed always gives the same scenario text."""
    assert to_toml(generate(17)) == to_toml(generate(17))
    assert to_toml(generate(17)) != to_toml(generate(18))


def test_generated_scenarios_parse():
    """Every scenario of the first 150 seeds is a valid scenario file for the project's parser."""
    for seed in range(150):
        scn = load(generate(seed))
        assert scn.steps, seed


def test_toml_round_trip():
    """The written TOML reads back as the same steps."""
    g = generate(5)
    data = tomllib.loads(to_toml(g))
    assert len(data["steps"]) == len(g.steps)
    assert data["name"] == g.name


def test_collisions_have_a_parallel_block():
    """Most scenarios race at least two operations in a parallel step."""
    racing = sum(any("parallel" in s for s in generate(seed).steps) for seed in range(60))
    assert racing >= 50


def test_ops_restrict_the_world():
    """With only guest families there are no host processes; with only process families no VM."""
    cfg = GenConfig(ops=("guest", "copy-tags"))
    for seed in range(30):
        g = generate(seed, cfg)
        assert g.vm is not None and not g.processes
    cfg = GenConfig(ops=("fault", "fork"))
    for seed in range(30):
        g = generate(seed, cfg)
        assert g.vm is None and g.processes


def test_every_family_is_drawn():
    """Over many seeds each family's typical operation shows up."""
    seen = set().union(*(_ops(generate(seed)) for seed in range(300)))
    for op in ("store", "stg", "mprotect", "munmap", "fork", "ptrace-peek-tags", "ptrace-poke-tags", "swap-out",
               "ksm-merge", "migrate-pages", "copy-tags", "dirty-log", "dma-write", "set-memory-region"):
        assert op in seen, op


def test_hugetlb_off():
    """``hugetlb=False`` never backs memory with hugetlb."""
    cfg = GenConfig(hugetlb=False)
    assert not any('"hugetlb"' in to_toml(generate(seed, cfg)) for seed in range(80))
    assert any('"hugetlb"' in to_toml(generate(seed)) for seed in range(80))


def test_kernel_fixes_written():
    """The host table carries the kernel fixes asked for, and none when asked for none."""
    assert 'kernel-fixes = ["sanitise-whole-hugetlb-folio"]' in to_toml(generate(1))
    assert "kernel-fixes" not in to_toml(generate(1, GenConfig(kernel_fixes=())))


def test_parse_ops():
    """--ops takes a list, all, or -NAME exclusions; an unknown family is an error."""
    assert parse_ops(None) == tuple(FAMILIES)
    assert parse_ops("guest,dma") == ("guest", "dma")
    assert "memslot" not in parse_ops("-memslot") and len(parse_ops("-memslot")) == len(FAMILIES) - 1
    with pytest.raises(ValueError, match="unknown op family"):
        parse_ops("guest,nope")


def test_parse_weights():
    """--weights overrides the defaults; a bad entry is an error."""
    w = parse_weights("guest=9,dma=0")
    assert w["guest"] == 9 and w["dma"] == 0 and w["fault"] == FAMILIES["fault"]
    for bad in ("guest", "guest=x", "nope=1", "guest=-1"):
        with pytest.raises(ValueError):
            parse_weights(bad)


def test_weight_zero_drops_a_family():
    """A family with weight 0 is never drawn into a race."""
    cfg = GenConfig(weights=dict(FAMILIES, dma=0))
    for seed in range(100):
        g = generate(seed, cfg)
        for s in g.steps:
            assert not any(sub["op"].startswith("dma") for sub in s.get("parallel", []))


def test_migration_family_races_a_migrate_with_the_guest():
    """The migration family declares two hosts and races a migrate (0-3 passes, no expect) with guest ops."""
    cfg = GenConfig(ops=parse_ops("migration,guest"))
    zero_tagged = faults = 0
    for seed in range(60):
        g = generate(seed, cfg)
        assert g.hosts == ("src", "dst") and g.vm is not None and g.vm["host"] == "src", seed
        scn = load(g)
        assert scn.steps, seed
        blocks = [s["parallel"] for s in g.steps if "parallel" in s]
        assert blocks, seed
        for block in blocks:
            migrates = [op for op in block if op["op"] == "migrate"]
            assert len(migrates) == 1 and 0 <= migrates[0]["max-passes"] <= 3, seed
            assert any(op["actor"].startswith("guest:vm0") for op in block), seed
            faults += "fail" in migrates[0]
        assert not any("expect" in sub for s in g.steps for sub in s.get("parallel", [s])), seed
        stored = {s["addr"] for s in g.steps if s.get("op") == "store"}
        zero_tagged += any(s.get("op") == "stg" and s["addr"] not in stored for s in g.steps)
        assert g.steps[-1]["op"] == "ldg", seed  # read back after the move
    assert zero_tagged >= 20 and faults >= 3, (zero_tagged, faults)


def test_default_families_include_migration_worlds():
    """With every family, some seeds build a migration world and the others the one-host world."""
    worlds = [bool(generate(seed).hosts) for seed in range(100)]
    assert 10 <= sum(worlds) <= 50
