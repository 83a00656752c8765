"""A small client for the service, on `requests`.

    client = Client("http://127.0.0.1:8000", api_key=None)
    answer = client.generate("ROMEO:", max_new_chars=100, seed=42)
    print(answer["choices"][0]["text"])
    for text in client.stream("ROMEO:", max_new_chars=100):
        print(text, end="", flush=True)

Every failure (an error answer, or no answer at all) raises ClientError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests


class ClientError(Exception):
    """An error from the service: HTTP status, and the error's code, message and field from its JSON body.

    `status` is None when no answer came (connection refused, timeout); `code` is then "connection_error".
    """

    def __init__(self, status: int | None, code: str, message: str, field: str | None = None, body: Any = None):
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.body = body
        where = f" ({field})" if field else ""
        super().__init__(f"{status or 'no answer'} {code}{where}: {message}")


class Client:
    """Talks to one service at `url`; sends `api_key` as a bearer token when given."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key is not None:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def generate(self, prompt: str = "", **params: Any) -> dict[str, Any]:
        """POST /generate; the parsed answer (`choices`, `usage`, `seed`, ...). Parameters as the API names them."""
        if params.get("stream"):
            raise TypeError("generate() returns one answer; use stream() or events() to stream")
        response = self._request("POST", "/generate", json={"prompt": prompt, **params})
        return response.json()

    def stream(self, prompt: str = "", **params: Any) -> Iterator[str]:
        """Text as it is generated (all samples' chunks in order, when n > 1)."""
        for event, data in self.events(prompt, **params):
            if event == "chunk":
                yield data["text"]

    def events(self, prompt: str = "", **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every event of a streamed /generate as (event name, data): "chunk"s, then "done".

        An `error` event raises ClientError.
        """
        response = self._request("POST", "/generate", json={"prompt": prompt, **params, "stream": True}, stream=True)
        finished = False
        with response:
            try:
                for event, data in _parse_sse(response):
                    if event == "error":
                        error = data.get("error", {})
                        code, message = error.get("code", "error"), error.get("message", "")
                        raise ClientError(response.status_code, code, message, error.get("field"), data)
                    finished = event == "done"
                    yield event, data
            except requests.RequestException as exc:
                raise ClientError(None, "connection_error", f"the stream broke off: {exc}") from exc
        if not finished:
            raise ClientError(response.status_code, "incomplete_stream", "the stream ended without a done event")

    def models(self) -> dict[str, Any]:
        """GET /models."""
        return self._request("GET", "/models").json()

    def health(self) -> dict[str, Any]:
        """GET /health; ClientError (status 503) when the service is not ready."""
        return self._request("GET", "/health").json()

    def close(self) -> None:
        """Close the connection pool."""
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ClientError(None, "connection_error", str(exc)) from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response


def _error_from(response: requests.Response) -> ClientError:
    """A ClientError from an error answer, whether or not its body is the service's JSON error."""
    try:
        body = response.json()
        error = body["error"]
        return ClientError(response.status_code, error["code"], error["message"], error.get("field"), body)
    except (ValueError, KeyError, TypeError):
        return ClientError(response.status_code, "http_error", response.text[:200] or response.reason)


def _parse_sse(response: requests.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) for each Server-Sent Event of a streaming response; comments are skipped."""
    buffer = b""
    for piece in response.iter_content(chunk_size=None):
        buffer += piece
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in raw.decode("utf-8").split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if data:
                yield event, json.loads("\n".join(data))
