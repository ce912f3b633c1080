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


def face_imports(source: str, module: str) -> list[str]:
    """The names ``module`` (dotted, its ``source`` given) takes from ``llm_nb/__init__.py`` itself,
    the kernel side's face, rather than from a module of the package.

    ``from .. import processes`` names the module ``llm_nb.processes``; ``from .. import __version__``
    reads the package face, which a host or worker module must not lean on.
    """
    package = module.split(".")[:-1]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            if [*base, *(node.module.split(".") if node.module else [])] != ["llm_nb"]:
                continue
            for alias in node.names:
                target = PACKAGE / alias.name
                if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()):
                    found.append(alias.name)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name == "llm_nb"]
    return found


def module_name(path: Path) -> str:
    """``llm_nb/host/app.py`` is ``llm_nb.host.app``; a package's ``__init__`` keeps that name, so its
    relative imports resolve from the package itself."""
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_host_and_worker_modules_take_nothing_from_the_package_face():
    files = [*(PACKAGE / "host").rglob("*.py"), *(PACKAGE / "backends").rglob("*.py"), PACKAGE / "worker.py"]
    assert len(files) > 40, "the host and backends are where this test looks for them"
    offenders = {str(p.relative_to(PACKAGE.parent)): face_imports(p.read_text(), module_name(p)) for p in files}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_face_import_finder_tells_the_face_from_a_module():
    source = "from .. import __version__, processes\nfrom ..host import app\nfrom ._version import v\nimport llm_nb\n"
    assert face_imports(source, "llm_nb.host.openapi") == ["__version__", "llm_nb"]
    assert face_imports("from ... import __version__\n", "llm_nb.host.deployments.routes") == ["__version__"]
    assert face_imports("from . import memory\n", "llm_nb.host.deployments.__init__") == []
