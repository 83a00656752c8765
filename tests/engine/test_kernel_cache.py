"""The C kernel's cache loads only what this user (or root) wrote: anything planted, writable by others,
linked or foreign falls back to the PyTorch step with a warning, and generation goes on."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from charrnn.model.decoding import SamplingParams
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.batch import FastLSTMBatch, NativeLSTMBatch, make_batch
from charrnn.service.engine.scheduler import Engine, JobSpec
from tests.helpers import tiny_model

OTHER_UID = 54321  # a user that is neither the tests' nor root
REPO = Path(__file__).resolve().parents[2]


def compile_library(path: Path, source: str) -> Path:
    """`source` compiled into a shared library at `path` (mode 0755)."""
    src = path.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True, capture_output=True)
    src.unlink()
    path.chmod(0o755)
    return path


def planted_source(marker: Path) -> str:
    """A library that writes `marker` the moment it is loaded: proof that planted code ran."""
    body = f'fclose(fopen("{marker}", "w"));'
    return f"#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {{ {body} }}\n"


@pytest.fixture(autouse=True)
def _compiler(native_kernel: object) -> None:
    """These tests compile libraries: without a compiler they fail in CI and skip elsewhere (see conftest)."""


@pytest.fixture(scope="module")
def good_kernel(tmp_path_factory: pytest.TempPathFactory, native_kernel: object) -> Path:
    """A real kernel, compiled once for the module; tests copy it where they need it."""
    return lstm_kernel._build(directory=tmp_path_factory.mktemp("built") / "kernels")


@pytest.fixture
def kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CHARRNN_KERNEL_DIR (not yet created); `load()` forgets what it loaded before (and after)."""
    directory = tmp_path / "kernels"
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(directory))
    monkeypatch.setattr(lstm_kernel, "_loaded", {})
    return directory


def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As in the runtime image: nothing rebuilds a refused kernel, so what is there is what is judged."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "no-such-compiler")


def refused(caplog: pytest.LogCaptureFixture, reason: str) -> bool:
    """load() gave None and warned, saying `reason`."""
    with caplog.at_level(logging.WARNING, logger="charrnn.service.engine.lstm_kernel"):
        library = lstm_kernel.load()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert library is None, "the kernel was loaded"
    assert any("using the PyTorch step" in w and reason in w for w in warnings), warnings
    return True


def test_a_fresh_cache_is_private_and_its_kernel_loads(kernels: Path) -> None:
    assert lstm_kernel.load() is not None
    assert oct(kernels.stat().st_mode & 0o777) == oct(0o700)
    (built,) = kernels.glob("*.so")
    assert built.stat().st_mode & 0o022 == 0 and built.stat().st_uid == os.geteuid()
    assert not [p for p in kernels.iterdir() if p.is_dir()]  # the temporary build directory is gone


def plant(kernels: Path, tmp_path: Path, mode: int = 0o755, uid: int | None = None) -> Path:
    """A library whose constructor writes tmp_path/pwned, at the path the kernel is looked for."""
    kernels.mkdir(mode=0o700, exist_ok=True)
    target = compile_library(lstm_kernel.kernel_path(), planted_source(tmp_path / "pwned"))
    target.chmod(mode)
    if uid is not None:
        os.chown(target, uid, uid)
    return target


@pytest.mark.parametrize(
    ("mode", "uid", "reason"),
    [
        (0o755, OTHER_UID, f"belongs to uid {OTHER_UID}"),
        (0o775, None, "writable by other users (mode 775)"),
        (0o757, None, "writable by other users (mode 757)"),
    ],
    ids=["another-users-file", "group-writable-file", "world-writable-file"],
)
def test_a_planted_kernel_is_refused_before_any_of_its_code_runs(
    kernels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, mode: int, uid: int | None, reason: str
) -> None:
    if os.geteuid() != 0 and uid is not None:
        pytest.skip("chown to another user needs root")
    plant(kernels, tmp_path, mode, uid)
    no_compiler(monkeypatch, tmp_path)
    assert refused(caplog, reason)
    assert not (tmp_path / "pwned").exists(), "the planted library's code ran"


@pytest.mark.parametrize(
    ("mode", "uid", "reason"),
    [
        (0o755, OTHER_UID, f"directory {{dir}} belongs to uid {OTHER_UID}"),
        (0o777, None, "directory {dir} is writable by other users (mode 777)"),
        (0o770, None, "directory {dir} is writable by other users (mode 770)"),
    ],
    ids=["another-users-directory", "world-writable-directory", "group-writable-directory"],
)
def test_a_directory_others_can_write_is_refused_with_the_kernel_in_it(
    kernels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, mode: int, uid: int | None, reason: str
) -> None:
    if os.geteuid() != 0 and uid is not None:
        pytest.skip("chown to another user needs root")
    plant(kernels, tmp_path)  # a file of ours: only the directory is wrong
    kernels.chmod(mode)
    if uid is not None:
        os.chown(kernels, uid, uid)
    assert refused(caplog, reason.format(dir=kernels))  # with a compiler too: nothing is built there
    assert not (tmp_path / "pwned").exists()
    assert [p.name for p in kernels.iterdir()] == [lstm_kernel.kernel_path().name]


def test_an_existing_directory_of_another_user_is_not_built_into(kernels: Path, caplog) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    kernels.mkdir(mode=0o755)
    os.chown(kernels, OTHER_UID, OTHER_UID)
    assert refused(caplog, f"belongs to uid {OTHER_UID}")
    assert list(kernels.iterdir()) == []


def test_a_symbolic_link_in_place_of_the_kernel_is_refused(
    kernels: Path, tmp_path: Path, good_kernel: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    kernels.mkdir(mode=0o700)
    lstm_kernel.kernel_path().symlink_to(good_kernel)  # even one pointing at a good kernel
    no_compiler(monkeypatch, tmp_path)
    assert refused(caplog, "is a symbolic link")


def test_a_symbolic_link_as_the_kernel_directory_is_refused(
    tmp_path: Path, good_kernel: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setattr(lstm_kernel, "_loaded", {})
    (tmp_path / "link").symlink_to(good_kernel.parent)
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path / "link"))
    no_compiler(monkeypatch, tmp_path)
    assert refused(caplog, "is a symbolic link")


def test_a_library_without_the_kernels_functions_falls_back_to_pytorch(
    kernels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    kernels.mkdir(mode=0o700)
    compile_library(lstm_kernel.kernel_path(), "int not_the_kernel(void) { return 1; }\n")
    no_compiler(monkeypatch, tmp_path)
    assert refused(caplog, "lacks charrnn_lstm_step")


def test_generation_goes_on_through_the_pytorch_step_when_the_kernel_is_refused(
    kernels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    plant(kernels, tmp_path, mode=0o777)
    no_compiler(monkeypatch, tmp_path)
    loaded = tiny_model("lstm")
    assert lstm_kernel.load() is None
    assert isinstance(make_batch(loaded.model, 4, None), FastLSTMBatch)
    engine = Engine({loaded.name: loaded}, max_batch=4, native=True)
    engine.start()
    try:
        spec = JobSpec(model=loaded.name, prompt_ids=(), max_new_chars=20, params=SamplingParams(), seed=1, timeout=60)
        tokens, reason = engine.submit(spec).result(timeout=60)
    finally:
        engine.close()
    assert reason == "length" and len(tokens) == 20
    assert not (tmp_path / "pwned").exists()
    assert any("writable by other users" in r.getMessage() for r in caplog.records)


def test_a_root_owned_read_only_kernel_directory_serves_another_user(good_kernel: Path) -> None:
    """The Docker image: kernels built by root in the build stage, in /opt/kernels, loaded as uid 10001."""
    if os.geteuid() != 0:
        pytest.skip("needs root to build the directory and to run as another user")
    shared = Path(tempfile.mkdtemp(prefix="charrnn-kernels-"))  # /tmp, so that the other user can reach it
    try:
        shared.chmod(0o755)
        shutil.copy(good_kernel, shared / good_kernel.name)
        (shared / good_kernel.name).chmod(0o755)
        env = {"PATH": "/nonexistent", "CC": "none", "CHARRNN_KERNEL_DIR": str(shared), "HOME": str(shared)}
        probe = (
            "from charrnn.service.engine import lstm_kernel, batch; assert lstm_kernel.load() is not None, 'not loaded'"
        )
        try:
            result = subprocess.run(
                [sys.executable, "-c", probe],
                cwd=REPO,
                env=env,
                user=10001,
                group=10001,
                capture_output=True,
                text=True,
            )
        except PermissionError:
            pytest.skip("this Python is not executable by another user here")
        if "Permission denied" in result.stderr:
            pytest.skip(f"another user cannot read this Python or the project here: {result.stderr[-200:]}")
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(shared)


def test_root_owned_kernels_are_trusted_by_every_user(
    kernels: Path, good_kernel: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same, judged as uid 10001 would judge it (for where another user cannot run this Python)."""
    if os.geteuid() != 0:
        pytest.skip("needs root-owned files")
    kernels.mkdir(mode=0o755)
    shutil.copy(good_kernel, lstm_kernel.kernel_path())
    lstm_kernel.kernel_path().chmod(0o755)
    no_compiler(monkeypatch, tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    assert lstm_kernel.load() is not None


def test_the_batch_uses_the_kernel_it_trusts(kernels: Path) -> None:
    loaded = tiny_model("lstm")
    lib = lstm_kernel.load()
    assert lib is not None and isinstance(make_batch(loaded.model, 4, lib), NativeLSTMBatch)
    engine = Engine({loaded.name: loaded}, max_batch=4, native=True)
    engine.start()
    try:
        spec = JobSpec(model=loaded.name, prompt_ids=(), max_new_chars=5, params=SamplingParams(), seed=1, timeout=60)
        engine.submit(spec).result(timeout=60)
    finally:
        engine.close()
    assert isinstance(engine._batches[loaded.key], NativeLSTMBatch)
    assert isinstance(engine._decoders[loaded.key].fast, lstm_kernel.KernelDraw)  # the draw: the kernel's too
