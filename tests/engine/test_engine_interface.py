"""docs/ENGINE_INTERFACE.md names every public name of charrnn.service.engine, each public method and
attribute of its classes, and each parameter of their signatures: the page cannot fall behind the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import charrnn.service.engine as engine

PAGE = Path(__file__).resolve().parents[2] / "docs" / "ENGINE_INTERFACE.md"


def documented() -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", PAGE.read_text(encoding="utf-8")))


def public_surface(name: str) -> set[str]:
    """The name, and for a class its public members and fields; for anything callable its parameters."""
    value = getattr(engine, name)
    names = {name}
    if inspect.isclass(value):
        names |= {member for member in vars(value) if not member.startswith("_")}
        if dataclasses.is_dataclass(value):
            names |= {field.name for field in dataclasses.fields(value)}
        callables = [value.__init__, *(m for k, m in vars(value).items() if callable(m) and not k.startswith("_"))]
    else:
        callables = [value] if callable(value) else []
    for function in callables:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            continue
        names |= {p for p in parameters if p not in ("self", "args", "kwargs")}
    return names


@pytest.mark.parametrize("name", engine.__all__)
def test_the_engine_interface_page_names_everything_public(name: str) -> None:
    missing = sorted(public_surface(name) - documented())
    assert missing == [], f"docs/ENGINE_INTERFACE.md does not mention {missing} (of {name})"


def test_every_public_engine_name_is_exported() -> None:
    """What the HTTP layer imports from the engine's modules is exported by the package (and so documented)."""
    from charrnn.service.engine import scheduler

    public = {n for n, v in vars(scheduler).items() if inspect.isclass(v) and v.__module__ == scheduler.__name__}
    assert {n for n in public if not n.startswith("_")} <= set(engine.__all__)
