"""The one settings object: parsing and bounds, Gunicorn's configuration, the kernel switch, the hard bounds."""

from __future__ import annotations

import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flask import Flask

import charrnn.model.config
from charrnn.service import config
from charrnn.service.config import ConfigError, ServiceConfig, load_config
from charrnn.service.engine import batch, collector
from charrnn.service.engine.batch import FastLSTMBatch
from charrnn.service.web import schemas
from charrnn.service.web.openapi import openapi_document
from tests.helpers import GUNICORN_COMMAND, REPO, gunicorn_command

GUNICORN_CONF = GUNICORN_COMMAND[2].removeprefix("python:")  # charrnn.service.web.gunicorn_conf


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHARRNN_WORKERS": "x"}, "CHARRNN_WORKERS must be an integer >= 1, got 'x'"),
        ({"CHARRNN_WORKERS": "0"}, "CHARRNN_WORKERS must be an integer >= 1, got 0"),
        ({"CHARRNN_THREADS": "2.5"}, "CHARRNN_THREADS must be an integer >= 1, got '2.5'"),
        ({"CHARRNN_PORT": "70000"}, "CHARRNN_PORT must be an integer between 0 and 65535, got 70000"),
        ({"CHARRNN_WORKER_TIMEOUT": "-1"}, "CHARRNN_WORKER_TIMEOUT must be an integer >= 0, got -1"),
        ({"CHARRNN_MAX_REQUESTS": "lots"}, "CHARRNN_MAX_REQUESTS must be an integer >= 0, got 'lots'"),
        ({"CHARRNN_LOG_LEVEL": "loud"}, "CHARRNN_LOG_LEVEL must be one of debug, info, warning, error, critical"),
        ({"CHARRNN_MAX_N": "17"}, "CHARRNN_MAX_N must be an integer between 1 and 16, got 17"),
        ({"CHARRNN_REQUEST_TIMEOUT": "0"}, "CHARRNN_REQUEST_TIMEOUT must be a number > 0, got 0.0"),
        ({"CHARRNN_HEALTH_TIMEOUT": "nan"}, "CHARRNN_HEALTH_TIMEOUT must be a number > 0, got nan"),
        ({"CHARRNN_NATIVE": "maybe"}, "CHARRNN_NATIVE must be true or false, got 'maybe'"),
        ({"CHARRNN_MAX_CLIENT_JOBS": "-1"}, "CHARRNN_MAX_CLIENT_JOBS must be an integer >= 0, got -1"),
        ({"CHARRNN_PROMPT_CACHE_BYTES": "-1"}, "CHARRNN_PROMPT_CACHE_BYTES must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_value_names_its_variable_and_the_allowed_range(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert config.describe(info.value).startswith(message)
    assert info.value.field == next(iter(env))


def test_a_bad_test_mapping_value_is_refused_like_a_variable() -> None:
    with pytest.raises(ConfigError, match="CHARRNN_MAX_BATCH: must be an integer >= 1, got True"):
        load_config({}, {"MAX_BATCH": True})
    with pytest.raises(ConfigError, match="CHARRNN_NATIVE: must be true or false, got 0"):
        ServiceConfig(native=0)  # type: ignore[arg-type]


def test_there_is_one_config_error() -> None:
    assert config.ConfigError is charrnn.model.config.ConfigError


def test_values_are_parsed_by_their_fields_type() -> None:
    env = {"CHARRNN_NATIVE": "off", "CHARRNN_KERNEL_DIR": "/k", "CHARRNN_LOG_LEVEL": "DEBUG", "CHARRNN_PORT": "0"}
    settings = load_config(env | {"CHARRNN_MAX_REQUEST_CHARS": "9", "CHARRNN_REQUEST_TIMEOUT": "1.5"})
    assert (settings.native, settings.kernel_dir, settings.log_level, settings.port) == (False, Path("/k"), "debug", 0)
    assert (settings.max_request_chars, settings.request_timeout) == (9, 1.5)
    assert load_config({"CHARRNN_NATIVE": "1", "CHARRNN_THREADS": ""}).native is True  # empty: the default
    assert load_config({}, {"NATIVE": "false", "ALLOWED_HOSTS": ["a", "b"]}).allowed_hosts == ("a", "b")


def run_gunicorn_conf(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, object]:
    """The settings Gunicorn reads from charrnn.service.web.gunicorn_conf under `env` (every other CHARRNN_* unset)."""
    # The module names what it makes (the metrics directory with 2 workers, the reload signal file) in
    # os.environ for the workers: here a copy, so that nothing it sets outlives the test.
    monkeypatch.setattr(__import__("os"), "environ", dict(__import__("os").environ))
    for name in [n for n in __import__("os").environ if n.startswith("CHARRNN_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    conf = runpy.run_module(GUNICORN_CONF)
    conf["on_exit"](None)  # what it made for its workers (in /dev/shm), gone as after a server's stop
    return conf


def test_gunicorn_takes_its_settings_from_the_settings_object(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = run_gunicorn_conf(monkeypatch)
    two = min(2, len(__import__("os").sched_getaffinity(0)))  # unset: 2 workers where there are 2 cores
    assert (defaults["bind"], defaults["workers"], defaults["threads"]) == ("127.0.0.1:8000", two, 64)
    assert (defaults["timeout"], defaults["graceful_timeout"], defaults["max_requests"]) == (60, 30, 0)
    assert defaults["loglevel"] == "info" and defaults["threads"] == config.DEFAULT_MAX_BATCH
    env = {"CHARRNN_HOST": "0.0.0.0", "CHARRNN_PORT": "9001", "CHARRNN_MAX_BATCH": "8", "CHARRNN_LOG_LEVEL": "debug"}
    chosen = run_gunicorn_conf(monkeypatch, **env, CHARRNN_WORKER_TIMEOUT="5", CHARRNN_MAX_REQUESTS="100")
    assert (chosen["bind"], chosen["threads"], chosen["timeout"]) == ("0.0.0.0:9001", 8, 5)  # threads: max_batch
    assert (chosen["max_requests"], chosen["max_requests_jitter"], chosen["loglevel"]) == (100, 10, "debug")
    assert run_gunicorn_conf(monkeypatch, CHARRNN_MAX_BATCH="8", CHARRNN_THREADS="3")["threads"] == 3


def test_a_new_worker_gets_its_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    want = 2 if threads == 1 else 1  # other than now, so that the hook is seen to set it
    conf = run_gunicorn_conf(monkeypatch, CHARRNN_TORCH_THREADS=str(want))
    logged: list[tuple] = []
    server = SimpleNamespace(log=SimpleNamespace(info=lambda *args: logged.append(args)))
    try:
        conf["post_fork"](server, SimpleNamespace(pid=123))
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(threads)
    assert [args[1:] for args in logged] == [(123, want)]


def test_a_core_board_is_made_for_several_workers_unless_torch_threads_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = run_gunicorn_conf(monkeypatch, CHARRNN_WORKERS="2")["_core_board"]
    assert made is not None and made.name.startswith("charrnn-cores-")
    assert not made.exists()  # on_exit removed it (run_gunicorn_conf runs it, as a server's stop does)
    assert run_gunicorn_conf(monkeypatch, CHARRNN_WORKERS="1")["_core_board"] is None
    assert run_gunicorn_conf(monkeypatch, CHARRNN_WORKERS="2", CHARRNN_TORCH_THREADS="1")["_core_board"] is None


def test_a_worker_settles_its_garbage_collector_once_its_app_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = run_gunicorn_conf(monkeypatch)
    calls: list[None] = []
    monkeypatch.setattr(collector, "settle_for_serving", lambda: calls.append(None))
    conf["post_worker_init"](SimpleNamespace(pid=123))
    assert len(calls) == 1


def test_gunicorn_with_a_bad_value_exits_with_a_message_not_a_traceback(model_dir: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "CHARRNN_MODEL_DIR": str(model_dir), "CHARRNN_WORKERS": "x"}
    result = subprocess.run(gunicorn_command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "charrnn: CHARRNN_WORKERS must be an integer >= 1, got 'x'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_charrnn_serve_with_a_bad_value_exits_with_a_message(model_dir: Path) -> None:
    command = [sys.executable, "-m", "charrnn.cli", "serve", "--model-dir", str(model_dir)]
    env = {"CHARRNN_THREADS": "none", "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "charrnn: CHARRNN_THREADS must be an integer >= 1, got 'none'" in result.stderr
    assert "Traceback" not in result.stderr


class LoadRecorder:
    """Stands for lstm_kernel.load: records each request for the kernel and answers that there is none."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __call__(self, native: object = None, directory: object = None) -> None:
        self.calls.append({"native": native, "directory": directory})


def generate_once(app: Flask) -> None:
    answer = app.test_client().post("/generate", json={"prompt": "the", "max_new_chars": 3, "seed": 1})
    assert answer.status_code == 200, answer.json


def test_a_test_mapping_turns_the_kernel_off(make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = LoadRecorder()
    monkeypatch.setattr(batch.lstm_kernel, "load", recorder)
    app = make_app(NATIVE=False)
    generate_once(app)
    assert recorder.calls == []  # the kernel is never asked for
    engine = app.extensions["charrnn"].engine
    assert isinstance(engine._batches[engine.models["tiny"].key], FastLSTMBatch)


def test_the_kernel_directory_setting_reaches_the_kernel_loader(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    recorder = LoadRecorder()
    monkeypatch.setattr(batch.lstm_kernel, "load", recorder)
    generate_once(make_app(KERNEL_DIR=str(tmp_path)))
    # asked for as the engine starts (so that the first request does not wait) and by the first batch
    assert recorder.calls == [{"native": None, "directory": tmp_path}] * 2


def test_the_hard_bounds_are_written_once() -> None:
    assert (config.MAX_SAMPLES, config.MAX_PROMPTS, config.MAX_LAYER_INDEX) == (
        16,
        16,
        charrnn.model.config.MAX_LAYERS - 1,
    )
    assert (schemas.MAX_STOP_STRINGS, schemas.MAX_STOP_CHARS, schemas.TOP_LOGPROBS) == (4, 256, 5)
    assert ServiceConfig().max_n == config.MAX_SAMPLES and ServiceConfig().max_batch == config.DEFAULT_MAX_BATCH
    props = {name: m.model_json_schema()["properties"] for name, m in vars(schemas).items() if name.endswith("Request")}
    assert props["GenerateRequest"]["n"]["maximum"] == config.MAX_SAMPLES
    assert props["InspectRequest"]["layer"]["anyOf"][0]["maximum"] == config.MAX_LAYER_INDEX
    assert props["GenerateRequest"]["stop"]["anyOf"][1]["maxItems"] == config.MAX_STOP_STRINGS
    with pytest.raises(ValueError, match="layers"):
        charrnn.model.config.ModelConfig(vocab_size=3, layers=charrnn.model.config.MAX_LAYERS + 1)


def test_the_openapi_document_states_every_configured_limit_and_no_mark() -> None:
    settings = ServiceConfig(max_n=3, max_new_chars=40, max_prompt_chars=50, max_inspect_chars=60)
    document = openapi_document(settings)
    assert schemas.SETTING_KEY not in str(document)
    found = document["components"]["schemas"]
    assert found["GenerateRequest"]["properties"]["n"]["maximum"] == 3
    assert found["CompletionRequest"]["properties"]["n"]["anyOf"][0]["maximum"] == 3
    assert found["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 40
    assert found["GenerateRequest"]["properties"]["max_new_chars"]["maximum"] == 40
    for name, field in [("GenerateRequest", "prompt"), ("ScoreRequest", "text"), ("TokenizeRequest", "prompt")]:
        assert found[name]["properties"][field]["maxLength"] == 50
    assert found["DetokenizeRequest"]["properties"]["tokens"]["maxItems"] == 50
    assert found["InspectRequest"]["properties"]["text"]["maxLength"] == 60
    again = openapi_document(ServiceConfig(max_n=2))  # the marks survive a first build
    assert again["components"]["schemas"]["GenerateRequest"]["properties"]["n"]["maximum"] == 2
