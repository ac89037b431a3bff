"""python -m hypervisor's start-up checks: what --remove-dir may remove when the host listens on TCP."""

from __future__ import annotations

import os
import tempfile

from hypervisor.__main__ import _private_folder


def test_remove_dir_with_tcp_must_be_a_private_folder(tmp_path):
    """A mkdtemp folder (0700, ours) may be removed on exit; a folder others may enter, a file or home may not."""
    private = tempfile.mkdtemp(dir=tmp_path)
    assert _private_folder(private)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    assert not _private_folder(str(shared))
    (tmp_path / "file").write_text("x")
    assert not _private_folder(str(tmp_path / "file"))
    assert not _private_folder(str(tmp_path / "missing"))
    assert not _private_folder(os.path.expanduser("~"))
