"""Stop strings in a stream of generated characters, found with an Aho-Corasick automaton.

`StopMatcher` is what `model.generation` (the CLI's sampler) and `charrnn.service.engine.scheduler` (the service's
scheduler thread) both use. A pushed character costs O(1) amortised whatever the number and length
of the stop strings (the naive way, searching the held-back text for every stop and every prefix,
costs O(sum of their lengths squared) per character). The automaton's state is the longest suffix
of the stream that is a prefix of some stop string: exactly the characters that must be held back,
since the next characters might complete a stop string that they begin.

    stops "he", "she", "hers"       trie: root -h-> h -e-> he* -r-> her -s-> hers*
                                          root -s-> s -h-> sh -e-> she*
    failure links: she -> he, sh -> h, hers -> s (the longest proper suffix that is also in the trie)
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence
from typing import Protocol, TypeVar


class _Token(Protocol):
    char: str


T = TypeVar("T", bound=_Token)


class StopAutomaton:
    """The stop strings' trie with failure links; immutable once built, so shared by every matcher.

    Node 0 is the root (the empty string). Per node: `depth`, the length of the prefix it stands
    for; `fail`, the node of its longest proper suffix in the trie; `match`, the length of the
    longest stop string that is a suffix of it (0: none).
    """

    def __init__(self, stops: Sequence[str]):
        self.edges: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.fail = [0]
        self.match = [0]
        for stop in stops:
            self._insert(stop)
        self._link()

    def _insert(self, stop: str) -> None:
        node = 0
        for char in stop:
            child = self.edges[node].get(char)
            if child is None:
                child = len(self.edges)
                self.edges[node][char] = child
                self.edges.append({})
                self.depth.append(self.depth[node] + 1)
                self.fail.append(0)
                self.match.append(0)
            node = child
        self.match[node] = len(stop)

    def _link(self) -> None:
        """Failure links, breadth first (a node's link is shallower than the node, so already set)."""
        queue = deque(self.edges[0].values())  # depth 1: linked to the root
        while queue:
            node = queue.popleft()
            for char, child in self.edges[node].items():
                self.fail[child] = self.next(self.fail[node], char)
                self.match[child] = self.match[child] or self.match[self.fail[child]]
                queue.append(child)

    def next(self, node: int, char: str) -> int:
        """The state after reading `char` in state `node` (following failure links as needed)."""
        while True:
            found = self.edges[node].get(char)
            if found is not None:
                return found
            if node == 0:
                return 0
            node = self.fail[node]


@functools.lru_cache(maxsize=256)
def automaton(stops: tuple[str, ...]) -> StopAutomaton:
    """The automaton of `stops`, built once for every job that asks for the same ones."""
    return StopAutomaton(stops)


class StopMatcher:
    """Finds stop strings in a stream of tokens, even when one straddles two chunks.

    Tokens that might be the start of a stop string are held back (at most the longest stop
    string's length minus one) until it is clear they are not; a matched stop is never emitted.
    Each token carries one character (`.char`), as the character-level models generate.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._automaton = automaton(self.stops) if self.stops else None
        self._empty_stop = "" in self.stops  # a stop that is there before any character
        self._node = 0
        self._pending: deque = deque()

    @property
    def pending(self) -> list:
        """The tokens held back now."""
        return list(self._pending)

    def push(self, token: T) -> tuple[list[T], bool]:
        """Add a token: (tokens now safe to emit, whether a stop string has appeared)."""
        self._pending.append(token)
        if self._automaton is None:
            return self.flush(), False
        if self._empty_stop:
            self.reset()
            return [], True
        auto = self._automaton
        self._node = auto.next(self._node, token.char)
        matched = auto.match[self._node]
        if matched:  # the stop string is the last `matched` characters: release what came before it
            ready = self._release(len(self._pending) - matched)
            self.reset()
            return ready, True
        return self._release(len(self._pending) - auto.depth[self._node]), False

    def flush(self) -> list[T]:
        """Everything still held back (at the end of generation); the matcher starts afresh."""
        ready = list(self._pending)
        self.reset()
        return ready

    def reset(self) -> None:
        """Forget the stream so far."""
        self._pending.clear()
        self._node = 0

    def _release(self, count: int) -> list[T]:
        """The `count` oldest held-back tokens, no longer held."""
        return [self._pending.popleft() for _ in range(count)]
