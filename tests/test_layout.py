"""The suite is collected the same way whichever way a user starts pytest."""

import shutil
import subprocess
import sys
from pathlib import Path

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
