"""Chat templates: a conversation rendered into a character model's prompt, the reply's stop strings, and
the template as a model card stores it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from charrnn.model.chat_template import ChatTemplate, ChatTemplateError

CONVERSATION = [
    ("system", "Verona. A summer night."),
    ("user", "Good even, fair lady."),
    ("assistant", "Good even, sir."),
    ("user", "What news?"),
]


def test_a_script_renders_each_message_as_a_speech_and_ends_on_the_assistants_header() -> None:
    prompt, stop = ChatTemplate.of("script").render(CONVERSATION)
    assert prompt == (
        "Verona. A summer night.\n\n"
        "ROMEO:\nGood even, fair lady.\n\n"
        "JULIET:\nGood even, sir.\n\n"
        "ROMEO:\nWhat news?\n\n"
        "JULIET:\n"
    )
    assert stop == ("\n\n",)  # a blank line ends every speech: the reply ends before whoever speaks next


def test_a_scripts_names_are_the_cards_to_choose() -> None:
    template = ChatTemplate.of("script", user="HAMLET", assistant="OPHELIA")
    assert template.render([("user", "Nymph.")]) == ("HAMLET:\nNymph.\n\nOPHELIA:\n", ("\n\n",))


def test_the_transcript_is_the_default_and_stops_at_either_speakers_header() -> None:
    template = ChatTemplate.from_card(None)
    prompt, stop = template.render(CONVERSATION)
    assert prompt == (
        "Verona. A summer night.\n\n"
        "User: Good even, fair lady.\n"
        "Assistant: Good even, sir.\n"
        "User: What news?\n"
        "Assistant: "
    )
    assert stop == ("\nUser:", "\nAssistant:")
    assert ChatTemplate.from_card({"name": "x"}) == template  # a card without a template


def test_a_reply_sent_back_is_read_again_as_the_model_wrote_it() -> None:
    for template in (ChatTemplate.of("script"), ChatTemplate.of("transcript")):
        prompt, _ = template.render([("user", "Hi.")])
        again, _ = template.render([("user", "Hi."), ("assistant", "Well met."), ("user", "Bye.")])
        assert again.startswith(prompt + "Well met.")


def test_a_system_message_is_a_paragraph_where_it_stands_and_an_empty_one_is_nothing() -> None:
    template = ChatTemplate.of("script")
    assert template.render([("user", "Hi."), ("system", "Exit ROMEO.")])[0] == "ROMEO:\nHi.\n\nExit ROMEO.\n\nJULIET:\n"
    assert template.render([("system", ""), ("user", "Hi.")])[0] == "ROMEO:\nHi.\n\nJULIET:\n"


def test_the_card_holds_every_field_and_reads_back_the_same_template() -> None:
    template = ChatTemplate.of("script", user="A", stop=["\n\nA:", "\n\nB:"])
    card = {"chat_template": template.to_card()}
    assert card["chat_template"] == {"kind": "script", "user": "A", "assistant": "JULIET", "stop": ["\n\nA:", "\n\nB:"]}
    assert ChatTemplate.from_card(card) == template


def test_missing_lists_the_template_characters_a_vocabulary_lacks() -> None:
    template = ChatTemplate.of("script")
    assert template.missing("ROMEJULIT:\n") == ""
    assert template.missing("abc\n") == ":EIJLMORTU"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "chat_template: must be an object"),
        ({"user": "A"}, "chat_template.kind: missing"),
        ({"kind": "sonnet"}, "chat_template.kind: must be one of script, transcript, got 'sonnet'"),
        ({"kind": "script", "speaker": "A"}, "chat_template: unknown field 'speaker'"),
        ({"kind": "script", "user": ""}, "chat_template.user: must be a name"),
        ({"kind": "script", "assistant": "A\nB"}, "chat_template.assistant: must be a name"),
        ({"kind": "script", "user": 5}, "chat_template.user: must be a name"),
        ({"kind": "script", "stop": "\n\n"}, "chat_template.stop: must be a list of strings"),
        ({"kind": "script", "stop": []}, "chat_template.stop: must be 1 to 4 strings"),
        ({"kind": "script", "stop": [""]}, "chat_template.stop: must be 1 to 4 strings"),
        ({"kind": "script", "stop": [1]}, "chat_template.stop: must be 1 to 4 strings"),
    ],
)
def test_an_invalid_template_is_refused_naming_its_field(value: Any, message: str) -> None:
    with pytest.raises(ChatTemplateError, match="^" + re.escape(message)):
        ChatTemplate.from_dict(value)


@pytest.mark.parametrize(
    ("messages", "message"),
    [([], "messages: a conversation needs at least one message"), ([("tool", "x")], "messages\\[0\\].role")],
)
def test_a_conversation_that_cannot_be_rendered_is_refused(messages: list, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate.of("transcript").render(messages)
