"""``mtekvm stress`` and ``mtekvm stress merge`` as a user runs them: exit statuses, files, jobs, shards."""

from __future__ import annotations

import json

import pytest

from mtekvm.cli import main

BUG = ["--bug", "kvm-tags-zero-page", "--ops", "guest", "--no-hugetlb"]  # found in the first few runs


def _stress(tmp_path, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "r.json"
    rc = main(["stress", "--out", str(tmp_path / "out"), "--json", str(report), *extra])
    return rc, json.loads(report.read_text()) if report.exists() else {}


def test_clean_budget_exits_0(tmp_path, capsys):
    """A run budget on the fixed model runs out clean: exit 0, the runs counted in the report."""
    rc, doc = _stress(tmp_path, "--budget", "8runs", "--ops", "fault,tags")
    assert rc == 0
    assert doc["schema"] == "mtekvm-stress/1" and doc["exit_status"] == 0
    assert doc["summary"]["runs"] == 8 and doc["failures"] == []


def test_failure_exits_1_and_writes_files(tmp_path, capsys):
    """A found failure: exit 1, the shrunk scenario, its schedule and a valid Chrome trace in --out and --trace."""
    trace = tmp_path / "trace.json"
    rc, doc = _stress(tmp_path, *BUG, "--budget", "30runs", "--max-failures", "1", "--trace", str(trace))
    assert rc == 1
    f = doc["failures"][0]
    assert f["key"]["invariant"] == "ZERO-PAGE-NEVER-FLAGGED"
    files = f["files"]
    assert open(files["scenario"]).read().startswith("name = ")
    assert "replay:   mtekvm run" in open(files["schedule"]).read()
    for path in (files["trace"], str(trace)):
        events = json.load(open(path))["traceEvents"]
        assert any(e.get("cat") == "violation" for e in events)
    out = capsys.readouterr().out
    assert "FAILURE ZERO-PAGE-NEVER-FLAGGED" in out and "interleaving:" in out


def test_the_written_scenario_replays(tmp_path, capsys):
    """The replay command printed for a failure reproduces it with ``mtekvm run`` (exit 1)."""
    rc, doc = _stress(tmp_path, *BUG, "--budget", "30runs", "--max-failures", "1")
    f = doc["failures"][0]
    argv = f["replay"].split()[1:]
    schedule_at = argv.index("--schedule") + 1
    argv[schedule_at] = argv[schedule_at].strip("'")
    assert main(argv) == 1


@pytest.mark.parametrize("argv", [
    ["--budget", "soon"], ["--shard", "2/2"], ["--jobs", "0"], ["--ops", "nope"], ["--weights", "guest=x"],
    ["--policy", "nope"], ["--depth", "3"], ["--bug", "nope"], ["--runs-per-scenario", "0"],
])
def test_bad_usage_exits_2(tmp_path, argv, capsys):
    """A bad option is one line on stderr and exit 2, before anything runs."""
    try:
        rc = main(["stress", "--out", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse's own errors (a --bug that is not in the zoo)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("mtekvm: ") and "Traceback" not in err


def test_jobs_split_the_run_budget(tmp_path, capsys):
    """--jobs 2 runs the budget in two worker processes, which together run it all."""
    rc, doc = _stress(tmp_path, "--budget", "6runs", "--jobs", "2", "--ops", "fault,tags")
    assert rc == 0
    assert doc["summary"]["runs"] == 6 and doc["config"]["jobs"] == 2


def test_jobs_find_a_failure(tmp_path, capsys):
    """Worker processes report their failures to the parent, which writes them."""
    rc, doc = _stress(tmp_path, *BUG, "--budget", "16runs", "--jobs", "2", "--no-shrink")
    assert rc == 1 and doc["failures"]
    assert open(doc["failures"][0]["files"]["scenario"]).read()


def test_shards_merge(tmp_path, capsys):
    """Two shards' reports merge into one: runs added, shards listed, failures deduplicated, exit 1."""
    docs = []
    for i in range(2):
        d = tmp_path / f"s{i}"
        d.mkdir()
        rc, doc = _stress(d, *BUG, "--budget", "12runs", "--shard", f"{i}/2", "--no-shrink")
        assert rc == 1
        assert all(f["seed"] % 2 == i for f in doc["failures"])
        docs.append(d / "r.json")
    merged = tmp_path / "m.json"
    assert main(["stress", "merge", *map(str, docs), "--json", str(merged)]) == 1
    m = json.loads(merged.read_text())
    assert m["config"]["shards"] == ["0/2", "1/2"]
    assert m["summary"]["runs"] == 24 and m["summary"]["reports"] == 2
    keys = [(f["key"]["invariant"], tuple(f["key"]["path"])) for f in m["failures"]]
    assert len(keys) == len(set(keys))


def test_merge_refuses_other_files(tmp_path, capsys):
    """Merging a file that is not a stress report is exit 2 with one line."""
    bad = tmp_path / "x.json"
    bad.write_text('{"schema": "mtekvm-report/1"}')
    assert main(["stress", "merge", str(bad)]) == 2
    assert "not a mtekvm-stress/1 report" in capsys.readouterr().err
