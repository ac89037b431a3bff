"""End-to-end: a ``[vms]`` VM whose setup fails fails the run (exit 1) before its first step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REFUSED = """
name = "an MTE VM on a host whose KVM refuses MTE"
[host]
tag-storage = "dynamic"
kvm-tag-storage = "refuse"
[vms.vm0]
mte = true
memory = [ { ipa = 0x4000_0000, size = "1MiB", backing = "anon" } ]
[[steps]]
actor = "host"
op = "meminfo"
"""


def test_vm_setup_failure_exits_1_naming_vm_and_errno(tmp_path):
    """A refused capability fails the scenario with exit 1, one line naming the VM and EINVAL, counted as failed."""
    path = tmp_path / "refused.toml"
    path.write_text(REFUSED)
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "mtekvm.cli", "run", str(path), "--json", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "vm0" in line and "EINVAL" in line and "Traceback" not in r.stderr
    report = json.loads(out.read_text())
    assert report["summary"]["failed"] == 1 and report["problems"][0]["kind"] == "setup-failed"
