"""Every third-party import of the pack is a declared dependency or in a named extra, and the
install files agree with each other."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from trainer.dependencies import (
    COMFYUI_MODULES,
    PACKAGES,
    MissingPackageError,
    import_optional,
    missing_package_message,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"trainer", "nodes"}


def pack_sources() -> list[Path]:
    return [REPO / "__init__.py", *sorted((REPO / "trainer").rglob("*.py")), *sorted((REPO / "nodes").rglob("*.py"))]


def third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> files importing it (absolute imports anywhere in a file, those
    inside functions included; standard library and the pack itself left out)."""
    found: dict[str, set[str]] = {}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, set()).add(file.name)
    return found


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0).lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(required distributions, {extra: distributions}) from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project.get("optional-dependencies", {}).items()}
    return {_name(r) for r in project["dependencies"]}, extras


def requirement_lines(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def undeclared_imports(files: list[Path]) -> dict[str, set[str]]:
    """Imports that are neither a declared dependency, a package of a named extra, nor
    ComfyUI's own modules."""
    required, extras = declared()
    problems = {}
    for module, where in third_party_imports(files).items():
        if module in COMFYUI_MODULES:
            continue
        package = PACKAGES.get(module)
        if package is None:
            problems[module] = where
            continue
        wanted = required if package.extra is None else extras.get(package.extra, set())
        if package.pip_name.lower() not in wanted:
            problems[module] = where
    return problems


def test_every_import_of_the_pack_is_declared():
    assert undeclared_imports(pack_sources()) == {}


def test_an_undeclared_import_is_caught(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\n\ndef later():\n    import yaml\n    from protobuf_like.sub import x\n")
    assert undeclared_imports([*pack_sources(), planted]) == {"yaml": {"planted.py"}, "protobuf_like": {"planted.py"}}


def test_every_known_package_is_declared_where_it_says():
    required, extras = declared()
    for module, package in PACKAGES.items():
        wanted = required if package.extra is None else extras[package.extra]
        assert package.pip_name.lower() in wanted, module


def test_requirements_txt_matches_pyproject():
    """ComfyUI users install requirements.txt: the same packages and bounds, without torch."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    from_pyproject = sorted(r.replace(" ", "").replace("'", '"') for r in project["dependencies"] if _name(r) != "torch")
    from_requirements = sorted(r.replace(" ", "") for r in requirement_lines("requirements.txt"))
    assert from_requirements == from_pyproject


def test_the_test_requirements_install_every_extra_that_runs_on_cpu():
    _, extras = declared()
    tested = {_name(r) for r in requirement_lines("requirements-test.txt")}
    for extra, packages in extras.items():
        if extra not in ("flash", "fp8-attention"):  # GPU kernels: Hopper/Blackwell, a CUDA torch's cuDNN
            assert packages <= tested, extra


def test_a_missing_optional_package_says_how_to_install_it():
    message = missing_package_message("optimum.quanto", 'base_model_precision "int8-quanto"')
    assert "'optimum-quanto'" in message
    assert 'pip install ".[quant]"' in message and "pip install optimum-quanto" in message
    with pytest.raises(MissingPackageError, match=r"the optimizer 'x' needs the Python package 'no_such_package_x'"):
        import_optional("no_such_package_x", "the optimizer 'x'")
