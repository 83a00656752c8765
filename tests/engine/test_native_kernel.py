"""The C kernel is a C source file shipped with the package: built from its bytes, into the directory it is
given, with the compiler's output logged when it fails, one layer limit, and a required kernel in CI."""

from __future__ import annotations

import ctypes
import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from charrnn.service.config import ConfigError
from charrnn.service.engine import lstm_kernel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load()` forgets what it loaded before (and after)."""
    monkeypatch.setattr(lstm_kernel, "_loaded", {})


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the kernel's sources that the loader reads instead of the package's."""
    copy = tmp_path / "src"
    shutil.copytree(lstm_kernel.SOURCE_DIR, copy)
    monkeypatch.setattr(lstm_kernel, "SOURCE_DIR", copy)
    return copy


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_the_kernel_is_a_c_file_in_the_package_data() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = package_data["charrnn.service.engine"]
    for name in lstm_kernel.SOURCE_FILES:
        relative = (lstm_kernel.SOURCE_DIR / name).relative_to(REPO / "service" / "engine").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in shipped), f"{relative} is not package data"
    assert "#include" not in Path(lstm_kernel.__file__).read_text()  # no C left in a Python string


def test_the_cache_key_is_the_hash_of_the_source_files_and_flags(sources: Path) -> None:
    before = lstm_kernel.kernel_path(simd=False)
    assert lstm_kernel.kernel_path(simd=True) != before
    header = sources / "lstm_step.h"
    header.write_bytes(header.read_bytes() + b"\n/* one more line */\n")  # the header counts too
    assert lstm_kernel.kernel_path(simd=False) != before


def test_the_layer_limit_is_the_one_python_constant(native_kernel: ctypes.CDLL) -> None:
    assert native_kernel.charrnn_max_layers() == lstm_kernel.MAX_LAYERS
    assert native_kernel.charrnn_net_size() == ctypes.sizeof(lstm_kernel.Net)
    assert len(lstm_kernel.Net().w) == len(lstm_kernel.Net().wh) == lstm_kernel.MAX_LAYERS
    for name in lstm_kernel.SOURCE_FILES:
        assert f"[{lstm_kernel.MAX_LAYERS}]" not in (lstm_kernel.SOURCE_DIR / name).read_text()


def test_a_kernel_built_for_another_layer_limit_is_refused(
    native_kernel: ctypes.CDLL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None, caplog
) -> None:
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path / "kernels"))
    target = lstm_kernel.kernel_path()
    target.parent.mkdir(mode=0o700)
    flags = [f for f in lstm_kernel._flags(lstm_kernel._cpu_has_avx2()) if not f.startswith("-DCHARRNN_MAX_LAYERS")]
    source = lstm_kernel.SOURCE_DIR / "lstm_step.c"
    subprocess.run(["cc", *flags, "-DCHARRNN_MAX_LAYERS=8", "-o", str(target), str(source), "-lm"], check=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # nothing rebuilds it
    with caplog.at_level(logging.WARNING, logger="charrnn.service.engine.lstm_kernel"):
        assert lstm_kernel.load() is None
    assert "built for another layout (up to 8 layers" in warnings_of(caplog)


def test_a_failing_build_logs_the_compilers_command_and_output(
    native_kernel: ctypes.CDLL, sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None, caplog
) -> None:
    kernels = tmp_path / "kernels"
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(kernels))
    with (sources / "lstm_step.c").open("a") as source:
        source.write('\n#error "a planted build failure"\n')
    with caplog.at_level(logging.WARNING, logger="charrnn.service.engine.lstm_kernel"):
        assert lstm_kernel.load() is None
    logged = warnings_of(caplog)
    assert "compiling the native kernel" in logged and "failed with exit status" in logged
    assert f"-DCHARRNN_MAX_LAYERS={lstm_kernel.MAX_LAYERS}" in logged and "lstm_step.c" in logged  # the command
    assert "a planted build failure" in logged  # the compiler's own message
    assert "using the PyTorch step" in logged
    assert list(kernels.iterdir()) == []  # neither a library nor the temporary build directory is left


def test_a_missing_compiler_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None, caplog) -> None:
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", "no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="charrnn.service.engine.lstm_kernel"):
        assert lstm_kernel.load() is None
    assert "no C compiler (cc) on PATH" in warnings_of(caplog)


def test_settings_are_read_through_functions_that_take_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARRNN_NATIVE", "0")
    assert lstm_kernel.native_enabled() is False
    assert lstm_kernel.native_enabled(True) is True and lstm_kernel.native_enabled("1") is True
    monkeypatch.setenv("CHARRNN_NATIVE", "1")
    assert lstm_kernel.native_enabled() is True and lstm_kernel.native_enabled(False) is False
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path / "from-env"))
    assert lstm_kernel.kernel_dir() == tmp_path / "from-env"
    assert lstm_kernel.kernel_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("CHARRNN_KERNEL_DIR")
    assert lstm_kernel.kernel_dir() == Path.home() / ".cache" / "charrnn" / "kernels"


def test_the_settings_are_checked_as_the_services_are(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    monkeypatch.setenv("CHARRNN_NATIVE", "maybe")
    with pytest.raises(ConfigError, match="CHARRNN_NATIVE: must be true or false, got 'maybe'"):
        lstm_kernel.load()
    monkeypatch.setenv("CHARRNN_NATIVE", "off")
    monkeypatch.setenv("CHARRNN_WORKERS", "lots")  # not the loader's setting: not its error
    assert lstm_kernel.load() is None


def test_the_answer_is_kept_per_directory(
    native_kernel: ctypes.CDLL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None, caplog
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="charrnn.service.engine.lstm_kernel"):
        assert lstm_kernel.load(directory=tmp_path / "a") is None
        assert lstm_kernel.load(directory=tmp_path / "a") is None
    assert warnings_of(caplog).count("no C compiler") == 1  # the failure is not retried for that directory
    monkeypatch.delenv("CC")
    assert lstm_kernel.load(directory=tmp_path / "b") is not None  # another directory is looked at afresh
    assert lstm_kernel.load(directory=tmp_path / "b") is lstm_kernel.load(directory=tmp_path / "b")


def test_a_kernel_turned_off_is_neither_built_nor_loaded(tmp_path: Path, fresh: None) -> None:
    assert lstm_kernel.load(native=False, directory=tmp_path / "kernels") is None
    assert not (tmp_path / "kernels").exists()


def test_a_directory_given_to_load_is_where_it_builds(native_kernel: ctypes.CDLL, tmp_path: Path, fresh: None) -> None:
    assert lstm_kernel.load(native=True, directory=tmp_path / "given") is not None
    assert [p.name for p in (tmp_path / "given").glob("*.so")] == [lstm_kernel.kernel_path().name]


def test_tests_build_kernels_in_a_temporary_directory_not_the_home_cache(tmp_path_factory) -> None:
    assert lstm_kernel.kernel_dir() == tmp_path_factory.getbasetemp() / "kernels"
    assert not lstm_kernel.kernel_dir().is_relative_to(Path.home() / ".cache")


def run_kernel_test(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """This module's layer-limit test in a fresh pytest session, without a compiler, under `env`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    environ |= {"CC": "no-such-compiler", **env}
    test = f"{Path(__file__).relative_to(REPO)}::test_the_layer_limit_is_the_one_python_constant"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), test]
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_without_a_kernel_ci_fails_where_a_developer_machine_skips(tmp_path: Path) -> None:
    ci = run_kernel_test(tmp_path, CI="true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "the native kernel is required in CI (CI=true): no C compiler" in ci.stdout
    local = run_kernel_test(tmp_path)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 skipped" in local.stdout
