"""The layout: one installed name (`charrnn`), the suite collected the same way however pytest is started,
and imports that run one way only: model <- corpora <- service.engine <- service.web <- charrnn (the CLI
and API that wire them), with no cycle between modules."""

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Modules that import shared helpers from `tests.conftest` / `tests.web.conftest`.
IMPORTING = ["tests/model/test_train.py", "tests/test_dockerfile.py", "tests/web/test_service_inspect.py"]
# The repository's folders and the names they install under (pyproject.toml's package-dir).
FOLDERS = {"charrnn": "charrnn", "model": "charrnn.model", "corpora": "charrnn.corpora", "service": "charrnn.service"}
WEB = ("flask", "werkzeug", "gunicorn", "charrnn.service.web")
# A module's prefix, and the modules it must never import.
FORBIDDEN = {
    "charrnn.model": ("charrnn.service", "charrnn.corpora", "charrnn.cli", "charrnn.api", *WEB),
    "charrnn.corpora": ("charrnn.service", "charrnn.cli", "charrnn.api"),
    "charrnn.service.engine": ("charrnn.cli", "charrnn.api", *WEB),
    "charrnn.service": ("charrnn.cli", "charrnn.api"),
}
DYNAMIC_IMPORTS = ("importlib.import_module", "import_module", "__import__")


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


def module_name(path: Path, root: Path = REPO) -> str:
    """The installed name of a source file: model/vocab.py -> charrnn.model.vocab."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = REPO, top_level_only: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in a file under `root`: function-local ones, relative ones (resolved)
    and importlib.import_module / __import__ of a literal name included; with `top_level_only`, the imports
    that run when the module is imported (the module's own statements, not those inside functions)."""
    name = module_name(path, root).split(".")
    package = name if path.name == "__init__.py" else name[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            # `from package import module` imports the module too
            yield from ((node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in DYNAMIC_IMPORTS and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value


def sources() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_import_scan_sees_local_relative_and_dynamic_imports(tmp_path: Path) -> None:
    source = tmp_path / "service" / "web" / "routes" / "x.py"
    source.parent.mkdir(parents=True)
    body = "def f():\n    import charrnn.cli\n    from .. import app\n"
    body += "    importlib.import_module('charrnn.corpora.registry')\n"
    source.write_text(body, encoding="utf-8")
    found = [module for _, module in imported_modules(source, root=tmp_path)]
    assert found == ["charrnn.cli", "charrnn.service.web", "charrnn.service.web.app", "charrnn.corpora.registry"]


@pytest.mark.parametrize("prefix", sorted(FORBIDDEN))
def test_a_package_never_imports_the_layers_above_it(prefix: str) -> None:
    violations = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sources()
        if under(module_name(path), prefix)
        for line, module in imported_modules(path)
        if any(under(module, banned) for banned in FORBIDDEN[prefix])
    ]
    assert violations == [], f"{prefix} must not import {', '.join(FORBIDDEN[prefix])}:\n" + "\n".join(violations)


def test_nothing_imports_a_top_level_model_service_or_corpora() -> None:
    bare = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sources()
        for line, module in imported_modules(path)
        if module.split(".")[0] in ("model", "service", "corpora")
    ]
    assert bare == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_modules_import_each_other_without_a_cycle() -> None:
    """Modules import each other one way only, function-local imports included (a package's __init__ aside)."""
    paths = {module_name(path): path for path in sources()}
    graph = {
        name: {
            module
            for _, module in imported_modules(path)
            if module in paths and module != name and not name.startswith(module + ".")
        }
        for name, path in paths.items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_pyproject_lists_every_package_folder() -> None:
    """pyproject.toml names the packages by hand (package-dir maps folders to charrnn.*): none left out."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert setuptools["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    folders = {module_name(init) for folder in FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    # built from a copy of the tracked files, so that setuptools' build/ never lands in the checkout
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    done = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("charrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {name for name in top if not name.endswith(".dist-info")} == {"charrnn"}
    # the files the code reads at run time travel too
    for needed in (
        "charrnn/service/engine/kernels/lstm_step.c",
        "charrnn/service/web/static/playground.html",
        "charrnn/corpora/manifest.json",
        "charrnn/service/default_model/shakespeare.safetensors",
    ):
        assert needed in names
    assert not any(re.search(r"(^|/)tests?/", name) for name in names)
