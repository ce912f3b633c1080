"""The arrows between the parts point one way: host and backends never reach into the kernel side,
and backends, which run in workers, know nothing of HTTP.

The kernel side's own rule (no host, no model library in a kernel) is proven beside the
kernel-side modules: tests/test_consume.py and tests/test_magics.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llm_nb

PACKAGE = Path(llm_nb.__file__).parent
KERNEL_SIDE = (
    "llm_nb.magics",
    "llm_nb.api",
    "llm_nb.reply",
    "llm_nb.structured",
    "llm_nb.widgets",
    "llm_nb.cli",
    "llm_nb.client",
    "llm_nb.consume",
)
MODEL_LIBRARIES = ("torch", "transformers", "llama_cpp")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_host_imports_no_kernel_side_module_and_no_model_library():
    code = f"import sys, llm_nb.host.app\nprint(sorted(set({KERNEL_SIDE + MODEL_LIBRARIES!r}) & set(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_no_backend_imports_aiohttp():
    files = sorted((PACKAGE / "backends").rglob("*.py"))
    assert len(files) > 3, "the backends are where this test looks for them"
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name for name in imported_modules(path) if name == "aiohttp" or name.startswith("aiohttp.")
        )
        for path in files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_import_finder_sees_aiohttp_where_it_is_imported():
    # The finder itself, on a host module that does import aiohttp: a check that cannot fail proves nothing.
    assert "aiohttp" in imported_modules(PACKAGE / "host" / "remote.py")
