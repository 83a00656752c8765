r"""Chat templates: how a conversation becomes a prompt for a character model, and where the reply ends.

A character model has no chat training: it continues text. A template lays the conversation out the way
the model's corpus is written, ends the prompt where the assistant's turn begins, and gives the stop
strings that end the reply where the next turn would begin. Two layouts, the template's `kind`:

                 script (a play)                    transcript (any other text; the default)
    system       "You are in Verona.\n\n"           "You are in Verona.\n\n"
    user         "ROMEO:\nGood morrow.\n\n"         "User: Good morrow.\n"
    assistant    "JULIET:\nAnd to you.\n\n"         "Assistant: And to you.\n"
    user         "ROMEO:\nWhat news?\n\n"           "User: What news?\n"
    the prompt   "JULIET:\n"                        "Assistant: "
    ends with
    stop         "\n\n" (a blank line ends every    "\nUser:", "\nAssistant:"
                 speech, whoever speaks next)

A system message is its text and a blank line, where it stands (first, it is a preface). The prompt
ends exactly as an assistant's turn begins, so a reply sent back as the assistant's message is read
again as the model wrote it. The names and the stops are the card's to set; the template lives in the
model card as its "chat_template" object ({"kind", "user", "assistant", "stop"}), and a card without one
gets the transcript.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_NAME_CHARS = 64
MAX_STOPS = 4
MAX_STOP_CHARS = 64


class ChatTemplateError(ValueError):
    """A template or a conversation that cannot be rendered; the message names the field at fault."""


@dataclass(frozen=True)
class _Layout:
    """How one kind of template writes a turn: `header` (with the speaker's name), text, `turn_end`."""

    header: str
    turn_end: str
    user: str
    assistant: str

    def default_stop(self, user: str, assistant: str) -> tuple[str, ...]:
        """Where a reply ends unless the card says otherwise."""
        if self.turn_end == "\n\n":  # a play: a blank line ends every speech, whoever speaks next
            return ("\n\n",)
        return tuple("\n" + self.header.format(name=name).rstrip() for name in (user, assistant))


LAYOUTS = {
    "script": _Layout(header="{name}:\n", turn_end="\n\n", user="ROMEO", assistant="JULIET"),
    "transcript": _Layout(header="{name}: ", turn_end="\n", user="User", assistant="Assistant"),
}
FIELDS = ("kind", "user", "assistant", "stop")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat layout: its `kind`, the speakers' names for the user and the assistant, the reply's stops."""

    kind: str
    user: str
    assistant: str
    stop: tuple[str, ...]

    def __post_init__(self) -> None:
        _layout(self.kind)
        _check_name("user", self.user)
        _check_name("assistant", self.assistant)
        _check_stop(self.stop)

    @classmethod
    def of(
        cls, kind: str, user: str | None = None, assistant: str | None = None, stop: Sequence[str] | None = None
    ) -> ChatTemplate:
        """A template of `kind`, with that kind's default names and stops for whatever is not given."""
        layout = _layout(kind)
        user = layout.user if user is None else user
        assistant = layout.assistant if assistant is None else assistant
        _check_name("user", user)  # before the default stops are made of them
        _check_name("assistant", assistant)
        return cls(kind, user, assistant, layout.default_stop(user, assistant) if stop is None else tuple(stop))

    @classmethod
    def from_dict(cls, value: Any) -> ChatTemplate:
        """The template a card's "chat_template" object (or a --chat-template file) describes."""
        if not isinstance(value, Mapping):
            raise ChatTemplateError(f"chat_template: must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(FIELDS))
        if unknown:
            raise ChatTemplateError(f"chat_template: unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
        if "kind" not in value:
            raise ChatTemplateError(f"chat_template.kind: missing (one of {', '.join(LAYOUTS)})")
        stop = value.get("stop")
        if stop is not None and not isinstance(stop, list):
            raise ChatTemplateError(f"chat_template.stop: must be a list of strings, got {stop!r}")
        return cls.of(value["kind"], value.get("user"), value.get("assistant"), stop)

    @classmethod
    def from_card(cls, card: Mapping[str, Any] | None) -> ChatTemplate:
        """The template of a model card; the transcript when there is no card or it has no template."""
        if card is None or card.get("chat_template") is None:
            return cls.of("transcript")
        return cls.from_dict(card["chat_template"])

    def to_card(self) -> dict[str, Any]:
        """The card's "chat_template" object, every field written out."""
        return {"kind": self.kind, "user": self.user, "assistant": self.assistant, "stop": list(self.stop)}

    def render(self, messages: Sequence[tuple[str, str]]) -> tuple[str, tuple[str, ...]]:
        """(prompt, stop strings) for a conversation of (role, text) messages: its turns, then the
        assistant's header, after which the model's continuation is the reply."""
        if not messages:
            raise ChatTemplateError("messages: a conversation needs at least one message")
        turns = [self._turn(i, role, text) for i, (role, text) in enumerate(messages)]
        return "".join(turns) + self._header(self.assistant), self.stop

    def missing(self, alphabet: str) -> str:
        """The characters of the template's own text (names, headers, turn ends) that `alphabet` lacks."""
        own = self._header(self.user) + self._header(self.assistant) + _layout(self.kind).turn_end + "\n\n"
        return "".join(sorted(set(own) - set(alphabet)))

    def _header(self, name: str) -> str:
        return _layout(self.kind).header.format(name=name)

    def _turn(self, index: int, role: str, text: str) -> str:
        if role == "system":
            return text + "\n\n" if text else ""
        if role in ("user", "assistant"):
            return self._header(getattr(self, role)) + text + _layout(self.kind).turn_end
        raise ChatTemplateError(f"messages[{index}].role: must be one of {', '.join(ROLES)}, got {role!r}")


def _layout(kind: Any) -> _Layout:
    layout = LAYOUTS.get(kind) if isinstance(kind, str) else None
    if layout is None:
        raise ChatTemplateError(f"chat_template.kind: must be one of {', '.join(LAYOUTS)}, got {kind!r}")
    return layout


def _check_name(field: str, name: Any) -> None:
    """A speaker's name: one line of text, not blank."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or "\n" in name or "\r" in name:
        raise ChatTemplateError(
            f"chat_template.{field}: must be a name of 1 to {MAX_NAME_CHARS} characters on one line, got {name!r}"
        )


def _check_stop(stop: Any) -> None:
    """The reply's stop strings: 1 to MAX_STOPS non-empty strings (a reply with none would never end early)."""
    valid = isinstance(stop, tuple) and 1 <= len(stop) <= MAX_STOPS
    if not valid or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
        raise ChatTemplateError(
            f"chat_template.stop: must be 1 to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters, got {stop!r}"
        )
