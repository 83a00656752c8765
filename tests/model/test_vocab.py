import pytest

from charrnn.model.vocab import UnknownCharactersError, Vocab


def test_round_trip_with_non_ascii() -> None:
    text = "Crème brûlée, 東京タワー and 🦊🚀 — “quoted”\n\ttabs"
    vocab = Vocab(text)
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.decode(vocab.encode_array(text).tolist()) == text


def test_order_is_by_code_point_whatever_the_input_order() -> None:
    assert Vocab("cba").chars == ("a", "b", "c")
    assert Vocab("🦊a東") == Vocab("東🦊a")
    assert Vocab("🦊a東").chars == ("a", "東", "🦊")


def test_unknown_characters_are_an_error_naming_them() -> None:
    vocab = Vocab("abc ")
    with pytest.raises(UnknownCharactersError) as info:
        vocab.encode("abc xyz!")
    assert info.value.chars == ["!", "x", "y", "z"]
    assert "'x'" in str(info.value) and "'!'" in str(info.value)


def test_unknown_characters_can_be_dropped() -> None:
    vocab = Vocab("abc")
    assert vocab.decode(vocab.encode("axbyc", unknown="drop")) == "abc"


def test_encode_array_refuses_unknown_characters() -> None:
    with pytest.raises(UnknownCharactersError):
        Vocab("ab").encode_array("abé")


def test_id_dtype_grows_with_the_vocabulary() -> None:
    assert Vocab("ab").id_dtype.itemsize == 1
    assert Vocab(chr(i) for i in range(300)).id_dtype.itemsize == 2


@pytest.mark.parametrize("bad", [["b", "a"], ["a", "a"], ["ab"], "abc", [1, 2]])
def test_from_json_refuses_malformed_lists(bad: object) -> None:
    with pytest.raises(ValueError):
        Vocab.from_json(bad)
