"""The layout: the suite is collected the same way whichever way a user starts pytest, and each package
imports only the packages below it (model/ <- corpora/ <- service/ <- charrnn/, the CLI that wires them)."""

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Modules that import shared helpers from `tests.conftest` / `tests.service.conftest`.
IMPORTING = ["tests/test_train.py", "tests/test_dockerfile.py", "tests/service/test_service_inspect.py"]


def test_bare_pytest_collects_modules_that_import_shared_helpers() -> None:
    pytest_exe = shutil.which("pytest", path=str(Path(sys.executable).parent)) or "pytest"
    done = subprocess.run(
        [pytest_exe, "--collect-only", "-q", "-p", "no:cacheprovider", *IMPORTING],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().splitlines()[-1], done.stdout[-3000:]


# -- layering: each package imports only the packages below it -------------------------------------------

# A package, and the packages above it that it must never import (the CLI, charrnn/, wires all three).
ABOVE = {
    "model": ("service", "corpora", "charrnn"),
    "corpora": ("service", "charrnn"),
    "service": ("charrnn",),
}
DYNAMIC_IMPORTS = ("importlib.import_module", "import_module", "__import__")


def imported_modules(path: Path, root: Path = REPO) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in a file under `root`: function-local ones, relative ones (resolved)
    and importlib.import_module / __import__ of a literal name included."""
    package = path.relative_to(root).parent.parts
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in DYNAMIC_IMPORTS and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                yield node.lineno, name.value


def imports_of(path: Path, packages: tuple[str, ...]) -> list[str]:
    """Where `path` imports one of `packages`, as 'file:line imports module'."""
    return [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for line, module in imported_modules(path)
        if module.split(".")[0] in packages
    ]


def test_the_import_scan_sees_local_relative_and_dynamic_imports(tmp_path: Path) -> None:
    source = tmp_path / "service" / "routes" / "x.py"
    source.parent.mkdir(parents=True)
    body = "def f():\n    import charrnn.cli\n    from .. import app\n    importlib.import_module('corpora.registry')\n"
    source.write_text(body, encoding="utf-8")
    found = [module for _, module in imported_modules(source, root=tmp_path)]
    assert found == ["charrnn.cli", "service", "corpora.registry"]


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_a_package_never_imports_the_packages_above_it(package: str) -> None:
    violations = [
        violation for path in sorted((REPO / package).rglob("*.py")) for violation in imports_of(path, ABOVE[package])
    ]
    assert violations == [], f"{package}/ must not import {', '.join(ABOVE[package])}:\n" + "\n".join(violations)
