"""Keeps the client package's public surface honest: `__all__`, docstrings, imports, data."""

from __future__ import annotations

import ast
import inspect
import re
import sys
from importlib import resources
from pathlib import Path

import pytest
from raptorflow.data import client as package

PACKAGE_DIR = Path(package.__file__).parent
# What stubs/pyproject.toml declares (grpcio, grpcio-status, protobuf,
# googleapis-common-protos) plus the package itself and the generated code.
ALLOWED_IMPORT_ROOTS = (
    "grpc",
    "grpc_status",
    "google.protobuf",
    "google.rpc",
    "raptorflow.data.client",
    "raptorflow.data.v1",
)
# Public submodules, imported by name: `compat` keeps the old integration layer's
# names out of the package namespace.
PUBLIC_MODULES = {"compat.py"}


def _isort_key(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 enforces: CONSTANTS, then Classes, then the rest.
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted_and_unique() -> None:
    assert package.__all__ == sorted(package.__all__, key=_isort_key)
    assert len(set(package.__all__)) == len(package.__all__)


def test_all_equals_the_public_names() -> None:
    # A public submodule becomes an attribute of the package once imported.
    submodules = {Path(name).stem for name in PUBLIC_MODULES}
    public = {name for name in vars(package) if not name.startswith("_")} - submodules
    assert set(package.__all__) == public


def test_every_public_name_is_documented() -> None:
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_modules_are_private_and_start_with_a_docstring() -> None:
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        assert (
            path.name == "__init__.py" or path.name.startswith("_") or path.name in PUBLIC_MODULES
        ), path.name
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


def test_compat_all_is_sorted_honest_and_documented() -> None:
    from raptorflow.data.client import compat

    assert compat.__all__ == sorted(compat.__all__, key=_isort_key)
    defined: set[str] = set()
    for node in ast.parse(Path(compat.__file__).read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.Assign):
            defined.update(target.id for target in node.targets if isinstance(target, ast.Name))
    assert set(compat.__all__) == {name for name in defined if not name.startswith("_")}
    for name in compat.__all__:
        obj = getattr(compat, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"compat.{name} has no docstring"


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.glob("*.py")), ids=lambda path: path.name)
def test_client_depends_only_on_its_declared_packages(path: Path) -> None:
    # Consumers install only the stubs distribution: an import of asyncpg or
    # of the server would break them at import time.
    for module in _imported_modules(path):
        root = module.split(".")[0]
        if root in sys.stdlib_module_names or root == "__future__":
            continue
        assert any(
            module == allowed or module.startswith(allowed + ".")
            for allowed in ALLOWED_IMPORT_ROOTS
        ), f"{path.name} imports {module}"


def test_declared_dependencies_match() -> None:
    pyproject = (PACKAGE_DIR.parent.parent.parent / "pyproject.toml").read_text()
    names = set(re.findall(r'^\s*"([A-Za-z0-9_.-]+)[<>=!~ ]', pyproject, flags=re.MULTILINE))
    assert names == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}


def test_package_data_is_present() -> None:
    files = resources.files(package)
    assert files.joinpath("py.typed").is_file()
    assert files.joinpath("service_config.json").is_file()
