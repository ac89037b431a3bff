"""Traces of a controlled run: Chrome trace event JSON, the text interleaving, the kernel path."""

from __future__ import annotations

import json

from hypervisor.sched.policies import Random
from mtekvm.runner import RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec
from mtekvm.stress.gen import generate, load
from mtekvm.stress.trace import Point, Recording, chrome_trace, kernel_path, text_interleaving

PHASES = {"M", "X", "i", "s", "f"}


def _points() -> list[Point]:
    return [Point(1, "a/1", "enter", ("a/1", "b/2")), Point(2, "a/1", "lock:take", ("a/1", "b/2")),
            Point(3, "b/2", "enter", ("b/2",)), Point(4, "a/1", "work", ("a/1",)),
            Point(5, "b/2", "lock:take", ("b/2",))]


def test_chrome_trace_shape():
    """One named track per actor, a slice per context, an instant per point, the violation marked."""
    doc = chrome_trace(_points(), steps={"a/1": "stg", "b/2": "mprotect"},
                       violations=[{"invariant": "EXCLUSIVE-INIT", "actor": "b/2", "message": "m", "pfn": 1}])
    doc = json.loads(json.dumps(doc))  # JSON all the way down
    ev = doc["traceEvents"]
    assert all(e["ph"] in PHASES and "pid" in e and "tid" in e for e in ev)
    assert all("ts" in e for e in ev if e["ph"] != "M")
    names = {e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    assert names == {"a", "b"}
    slices = [e for e in ev if e["ph"] == "X"]
    assert sorted(e["name"] for e in slices) == ["1 stg", "2 mprotect"]
    assert len([e for e in ev if e["ph"] == "i" and e.get("cat") == "point"]) == 5
    assert any(e.get("cat") == "violation" and "EXCLUSIVE-INIT" in e["name"] for e in ev)


def test_handoff_flow():
    """A context absent from the runnable set (blocked) and then back gets a flow from the context that ran."""
    doc = chrome_trace(_points())
    flows = [e for e in doc["traceEvents"] if e["ph"] in ("s", "f")]
    assert flows and {e["ph"] for e in flows} == {"s", "f"}


def test_text_interleaving_marks_switches():
    """The text form has one line per decision, a * at each context switch, and the violations."""
    lines = text_interleaving(_points(), violations=[{"invariant": "X", "actor": "a/1", "message": "m"}])
    assert len(lines) == 6
    assert "*" in lines[2] and "*" not in lines[1]
    assert lines[-1].startswith("  VIOLATION X")


def test_kernel_path():
    """The kernel path is the functions of the violating context's last labels, without lock waits, sorted."""
    pts = [Point(1, "a/1", "enter", ("a/1",)), Point(2, "a/1", "handle_mm_fault", ("a/1",)),
           Point(3, "a/1", "mte_sync_tags:clear", ("a/1",)), Point(4, "a/1", "mte_sync_tags:set", ("a/1",)),
           Point(5, "a/1", "mmap_lock[p0]:read_lock", ("a/1",)), Point(6, "a/1", "uaccess", ("a/1",)),
           Point(7, "b/2", "set_pte_at", ("b/2",))]
    assert kernel_path(pts, "a/1") == ("handle_mm_fault", "mte_sync_tags")
    assert kernel_path(pts, "a") == ("handle_mm_fault", "mte_sync_tags")
    assert kernel_path(pts, "b/2") == ("set_pte_at",)
    assert kernel_path(pts, "nobody") == ()


async def test_recorded_run_is_valid_chrome_json(tmp_path):
    """A real controlled run, recorded, writes a Chrome trace that json.load reads back."""
    scn = load(generate(6))
    rec = Recording(Random(3))
    r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("random", 3, policy=rec)))
    assert rec.points
    path = tmp_path / "t.json"
    path.write_text(json.dumps(chrome_trace(rec.points, violations=list(r.violations))))
    doc = json.loads(path.read_text())
    assert len([e for e in doc["traceEvents"] if e["ph"] == "i"]) >= len(rec.points)
