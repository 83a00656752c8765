"""The app factory: configuration sources, model discovery and loading, start-up failures, `serve`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from charrnn.service.config import DEFAULT_MODEL_DIR, ConfigError, ServiceConfig, load_config
from charrnn.service.web.app import StartupError, create_app
from charrnn.service.web.server import check_model_dir, gunicorn_command


@pytest.fixture
def mixed_dir(model_dir: Path, tmp_path: Path) -> Path:
    """A model directory with a file checkpoint, a run directory, a corrupt file and files to ignore."""
    tiny = model_dir / "tiny.safetensors"
    shutil.copy(tiny, tmp_path / "alpha.safetensors")
    (tmp_path / "run-b").mkdir()
    shutil.copy(tiny, tmp_path / "run-b" / "best.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    shutil.copy(tiny, tmp_path / ".hidden.safetensors")
    shutil.copy(tiny, tmp_path / ".gamma.safetensors.tmp-1a2b")
    shutil.copy(tiny, tmp_path / "delta.safetensors.tmp-1a2b")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty-run").mkdir()
    return tmp_path


def close(app) -> None:
    app.extensions["charrnn"].close()


def test_every_checkpoint_is_served_and_a_bad_one_is_reported(mixed_dir: Path) -> None:
    app = create_app({"MODEL_DIR": mixed_dir})
    try:
        listing = app.test_client().get("/models").json
        by_name = {m["name"]: m for m in listing["models"]}
        assert set(by_name) == {"alpha", "broken", "run-b"}
        assert by_name["alpha"]["status"] == by_name["run-b"]["status"] == "loaded"
        assert by_name["run-b"]["file"] == "run-b/best.safetensors"
        assert by_name["broken"]["status"] == "failed" and "truncated" in by_name["broken"]["error"]
        assert "cell" not in by_name["broken"]
        assert listing["default"] == "alpha"
        assert set(app.extensions["charrnn"].engine.models) == {"alpha", "run-b"}
    finally:
        close(app)


def test_the_default_model_can_be_configured(mixed_dir: Path) -> None:
    app = create_app({"MODEL_DIR": mixed_dir, "DEFAULT_MODEL": "run-b"})
    try:
        answer = app.test_client().post("/generate", json={"prompt": "the", "max_new_chars": 3}, buffered=True)
        assert answer.json["model"] == "run-b"
    finally:
        close(app)


def test_a_model_called_default_is_the_default(model_dir: Path, tmp_path: Path) -> None:
    for name in ("aaa", "default"):
        shutil.copy(model_dir / "tiny.safetensors", tmp_path / f"{name}.safetensors")
    app = create_app({"MODEL_DIR": tmp_path})
    try:
        assert app.extensions["charrnn"].default_model == "default"
    finally:
        close(app)


def test_an_empty_model_dir_refuses_to_start_and_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"no checkpoints.*CHARRNN_MODEL_DIR"):
        create_app({"MODEL_DIR": tmp_path})


def test_a_missing_model_dir_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"does not exist.*CHARRNN_MODEL_DIR"):
        create_app({"MODEL_DIR": tmp_path / "nowhere"})


def test_a_model_dir_where_nothing_loads_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04 pickled")
    with pytest.raises(StartupError, match=r"none of the checkpoints.*bad: .*pickle"):
        create_app({"MODEL_DIR": tmp_path})


def test_without_configuration_the_shipped_default_model_dir_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHARRNN_MODEL_DIR", raising=False)
    assert load_config().model_dir == DEFAULT_MODEL_DIR
    if not any(DEFAULT_MODEL_DIR.glob("*.safetensors")) and not any(DEFAULT_MODEL_DIR.glob("*/best.safetensors")):
        with pytest.raises(StartupError, match="CHARRNN_MODEL_DIR"):
            create_app()


def test_environment_variables_override_defaults_and_the_test_mapping_overrides_both() -> None:
    env = {"CHARRNN_MAX_N": "4", "CHARRNN_API_KEYS": "a, b", "CHARRNN_BATCHING": "false", "CHARRNN_MODEL_DIR": "/m"}
    config = load_config(env)
    assert config.max_n == 4 and config.api_keys == ("a", "b") and config.batching is False
    assert config.model_dir == Path("/m")
    assert config.max_new_chars == ServiceConfig().max_new_chars
    assert load_config(env, {"MAX_N": 2, "API_KEYS": ["c"]}).max_n == 2
    assert load_config(env, {"API_KEYS": "x,y"}).api_keys == ("x", "y")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CHARRNN_MAX_N": "many"}, "CHARRNN_MAX_N"),
        ({"CHARRNN_MAX_N": "0"}, "CHARRNN_MAX_N"),
        ({"CHARRNN_BATCHING": "maybe"}, "CHARRNN_BATCHING"),
        ({"CHARRNN_REQUEST_TIMEOUT": "-1"}, "CHARRNN_REQUEST_TIMEOUT"),
    ],
)
def test_a_bad_setting_fails_naming_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(env)


def test_serve_checks_the_model_dir_before_starting_gunicorn(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"no checkpoints.*--model-dir"):
        check_model_dir(tmp_path)
    check_model_dir(model_dir)


def test_serve_runs_gunicorn_with_the_shipped_config() -> None:
    command = gunicorn_command()
    assert command[1:3] == ["-m", "gunicorn"]
    assert command[3:5] == [
        "-c",
        "python:charrnn.service.web.gunicorn_conf",
    ]  # a module: found wherever the package is
    assert command[5] == "charrnn.service.web.app:create_app()"
