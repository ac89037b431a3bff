"""The layout's "never" rules: which package may import which (docs: README "Layout").

``shared/`` is the ABI every process speaks and imports no other project
package; ``hypervisor/``, ``vmm/`` and ``guest/`` are three processes that
import only ``shared/`` and themselves; ``mtekvm/`` (the harness) may import
everything. Imports are read with :mod:`ast`, runtime ones only: an import
under ``if TYPE_CHECKING:`` is for the type checker and is not counted, an
import inside a function is.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Every top-level package of the project.
PROJECT = ("shared", "hypervisor", "vmm", "guest", "mtekvm", "benchmarks", "tests")
#: Package -> the project packages it may import (besides itself).
ALLOWED = {
    "shared": set(),
    "hypervisor": {"shared"},
    "vmm": {"shared"},
    "guest": {"shared"},
}


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(source: str, package: str) -> set[str]:
    """The top-level package names ``source`` (a module of ``package``) imports when it runs.

    Skips the body of ``if TYPE_CHECKING:`` (its ``else:`` runs); a relative
    import is of ``package`` itself.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def forbidden_imports(package: str) -> list[str]:
    """``file: package`` for every runtime import of a project package that ``package`` may not import."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        others = runtime_imports(path.read_text(), package) & set(PROJECT)
        for other in sorted(others - ALLOWED[package] - {package}):
            bad.append(f"{path.relative_to(ROOT)}: {other}")
    return bad


def modules_loaded_by(module: str) -> set[str]:
    """The project modules a fresh interpreter has loaded after ``import module``."""
    code = (f"import sys, {module}\n"
            f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] in {PROJECT!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


class TestTheChecker:
    def test_finds_a_module_level_and_a_function_level_import(self):
        """An import at module level and one inside a function both count as runtime imports."""
        src = textwrap.dedent("""
            import hypervisor.kernel
            def f():
                from mtekvm.links import ProcessHost
        """)
        assert runtime_imports(src, "vmm") == {"hypervisor", "mtekvm"}

    def test_skips_type_checking_but_not_its_else(self):
        """An import under ``if TYPE_CHECKING:`` is not counted; one in its ``else:`` is."""
        src = textwrap.dedent("""
            import typing
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from hypervisor.kernel import Kernel
            if typing.TYPE_CHECKING:
                import mtekvm
            else:
                import guest
        """)
        assert runtime_imports(src, "vmm") == {"typing", "guest"}

    def test_relative_import_is_the_package_itself(self):
        """``from . import x`` and ``from .machine import Vmm`` are imports of the module's own package."""
        assert runtime_imports("from . import dma\nfrom .machine import Vmm\n", "vmm") == {"vmm"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    """shared/ imports no other project package; hypervisor/, vmm/, guest/ import only shared/ and themselves."""
    assert forbidden_imports(package) == []


@pytest.mark.parametrize("module, forbidden", [
    ("vmm.__main__", ("hypervisor", "guest", "mtekvm")),
    ("guest.__main__", ("hypervisor", "vmm", "mtekvm")),
    ("hypervisor.__main__", ("vmm", "guest", "mtekvm")),
])
def test_a_process_loads_no_other_process(module, forbidden):
    """Starting one process's ``__main__`` loads no module of another process or of the harness."""
    loaded = modules_loaded_by(module)
    assert module in loaded  # the probe saw the import it made
    assert sorted(m for m in loaded if m.split(".")[0] in forbidden) == []
