"""The stop-string automaton: the same answers as the naive search, in linear time on hostile input."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.model.stops import StopAutomaton, StopMatcher


@dataclass(frozen=True)
class Char:
    """A token with only a character (and its position, so released tokens can be told apart)."""

    char: str
    at: int


class NaiveStopMatcher:
    """The reference: the matcher this project shipped before the automaton, searching the text each push."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending: list[Char] = []

    def push(self, token: Char) -> tuple[list[Char], bool]:
        self.pending.append(token)
        if not self.stops:
            ready, self.pending = self.pending, []
            return ready, False
        text = "".join(t.char for t in self.pending)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            ready, self.pending = self.pending[: min(hits)], []
            return ready, True
        keep = max(
            (k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0
        )
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return ready, False

    def flush(self) -> list[Char]:
        ready, self.pending = self.pending, []
        return ready


def run(matcher: StopMatcher | NaiveStopMatcher, text: str) -> list[tuple[list[Char], bool]]:
    """Every push's answer over `text`, then the flush, as long as no stop has appeared."""
    answers = []
    for at, char in enumerate(text):
        ready, stopped = matcher.push(Char(char, at))
        answers.append((ready, stopped))
        if stopped:
            return answers
    answers.append((matcher.flush(), False))
    return answers


ALPHABET = st.sampled_from("abc\n")  # few characters: stops overlap and partly match all the time


@settings(max_examples=500, deadline=None)
@given(
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=6), max_size=4).map(tuple),
    text=st.text(ALPHABET, max_size=60),
)
def test_the_automaton_answers_every_push_as_the_naive_search_does(stops: tuple[str, ...], text: str) -> None:
    assert run(StopMatcher(stops), text) == run(NaiveStopMatcher(stops), text)


@settings(max_examples=100, deadline=None)
@given(stops=st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4), text=st.text(ALPHABET))
def test_what_is_released_plus_what_is_held_is_the_text_up_to_the_stop(stops: list[str], text: str) -> None:
    matcher = StopMatcher(stops)
    released = ""
    for at, char in enumerate(text):
        ready, stopped = matcher.push(Char(char, at))
        released += "".join(t.char for t in ready)
        if stopped:
            seen = text[: at + 1]
            first = min(seen.find(s) + len(s) for s in stops if s in seen)
            assert first == at + 1  # it stops at the first character that completes a stop string
            # the text before the earliest-starting stop, i.e. the longest one that ends here
            assert released == seen[: min(at + 1 - len(s) for s in stops if seen.endswith(s))]
            return
        assert released + "".join(t.char for t in matcher.pending) == text[: at + 1]
        assert len(matcher.pending) < max(map(len, stops))


def test_a_stop_split_across_pushes_is_held_back_then_released_when_it_cannot_match() -> None:
    matcher = StopMatcher(["END", "ENZYME"])
    assert matcher.push(Char("E", 0)) == ([], False)
    assert matcher.push(Char("N", 1)) == ([], False)
    ready, stopped = matcher.push(Char("x", 2))
    assert not stopped and "".join(t.char for t in ready) == "ENx"
    assert matcher.pending == []


def test_the_longest_stop_ending_at_a_character_decides_what_is_cut() -> None:
    matcher = StopMatcher(["she", "he", "e"])
    answers = run(matcher, "ashe")
    assert answers[-1][1] and answers[-1][0] == []  # "a" went out before; "she" is cut, not just "e"
    assert "".join(t.char for ready, _ in answers for t in ready) == "a"


class CountingList(list):
    """A list that counts its reads (what the automaton's failure links cost)."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        CountingList.reads += 1
        return super().__getitem__(index)


def failure_reads(stop_length: int, chars: int) -> int:
    """Failure links followed while four long stops that keep almost matching read `chars` characters."""
    stops = tuple("a" * (stop_length - 1) + end for end in "bcde")
    matcher = StopMatcher(stops)
    auto = StopAutomaton(stops)
    auto.fail = CountingList(auto.fail)
    matcher._automaton = auto
    CountingList.reads = 0
    for at in range(chars):  # runs of a's just short of a stop, then an f that matches nothing
        char = "f" if at % stop_length == stop_length - 1 else "a"
        _, stopped = matcher.push(Char(char, at))
        assert not stopped and len(matcher.pending) < stop_length
    return CountingList.reads


def test_hostile_stop_strings_cost_constant_work_per_character() -> None:
    # The naive search did O(sum of the stops' lengths squared) work per character here.
    chars = 20_000
    for stop_length in (16, 256, 2048):
        assert failure_reads(stop_length, chars) <= 2 * chars


def test_same_stops_share_one_automaton() -> None:
    assert StopMatcher(["x", "yz"])._automaton is StopMatcher(("x", "yz"))._automaton
