"""DRY over HTTP: /generate, /v1/completions and /v1/chat/completions take llama.cpp's `dry_*` fields (the tiny
word model); a seed reproduces a DRY answer; bad values are a 422 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

DRY = {"dry_multiplier": 3.0, "dry_base": 2.0, "dry_allowed_length": 2, "dry_penalty_last_n": -1}


def post(client: FlaskClient, path: str, body: dict[str, Any]) -> Any:
    chat = {"messages": [{"role": "user", "content": "the red hen"}], "unknown_chars": "drop"}  # no capitals
    prompt = chat if "chat" in path else {"prompt": "the "}
    return client.post(path, json={**prompt, **body})


def texts(answer: dict[str, Any]) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in answer["choices"]]


def repeated(text: str, width: int = 8) -> int:
    """How many windows of `width` characters occurred earlier in the text."""
    return sum(text[i : i + width] in text[: i + width - 1] for i in range(1, len(text) - width + 1))


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_dry_fields_are_taken_and_a_seed_reproduces_them(client: FlaskClient, path: str) -> None:
    length = {"max_tokens": 150} if path.startswith("/v1") else {"max_new_chars": 150}
    body = {**DRY, **length, "temperature": 0, "seed": 4, "dry_sequence_breakers": ["."]}
    first, again = post(client, path, body), post(client, path, body)
    assert first.status_code == 200, first.get_json()
    assert texts(first.get_json()) == texts(again.get_json())
    plain = post(client, path, {**length, "temperature": 0, "seed": 4})
    assert texts(plain.get_json()) != texts(first.get_json())


def test_dry_makes_greedy_text_repeat_less(client: FlaskClient) -> None:
    body = {"max_new_chars": 300, "temperature": 0, "dry_sequence_breakers": []}
    (plain,) = texts(post(client, "/generate", body).get_json())
    (dry,) = texts(post(client, "/generate", {**body, **DRY}).get_json())
    assert repeated(dry) < repeated(plain)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"dry_multiplier": -1}, "dry_multiplier"),
        ({"dry_multiplier": 6}, "dry_multiplier"),
        ({"dry_base": 1.0}, "dry_base"),
        ({"dry_base": 5}, "dry_base"),
        ({"dry_allowed_length": 0}, "dry_allowed_length"),
        ({"dry_allowed_length": 65}, "dry_allowed_length"),
        ({"dry_penalty_last_n": -2}, "dry_penalty_last_n"),
        ({"dry_penalty_last_n": 65537}, "dry_penalty_last_n"),
        ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": ["x" * 21]}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": [str(i) for i in range(17)]}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": [3]}, "dry_sequence_breakers"),
    ],
)
@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_bad_dry_values_are_422_naming_the_field(client: FlaskClient, path: str, bad: dict, field: str) -> None:
    response = post(client, path, {"dry_multiplier": 1.0, **bad})
    assert response.status_code == 422, response.get_json()
    detail = response.get_json()["error"]
    assert str(detail.get("field", detail.get("param"))).startswith(field), detail
