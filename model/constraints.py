r"""Constrained generation: a regular expression as an automaton over a model's own vocabulary.

A character model samples the very symbols a regular expression is written in, so a constraint is
exact: each row of a batch keeps a state of a deterministic automaton, and at each step the characters
that lead to a state from which no match can be completed are masked out (logit -inf) before the draw.
What comes out is always a prefix of a match; once the automaton accepts and no character can follow,
the sample ends ("stop").

    pattern --interegular's parser--> syntax tree --Thompson--> NFA --subsets, vocabulary only--> DFA
            --prune states that cannot reach an accepting one--> next_state (states, vocab), -1 = masked

interegular parses Python's regular-expression syntax (classes, repeats, alternation, groups, the i and
s flags), with `\w`, `\d` and `\s` in their ASCII meaning (as Python's re.ASCII flag reads them). Its
own FSM construction has no bound on the work a hostile pattern can cause, so the
automaton is built here, bounded: at most MAX_NFA_STATES in the expanded expression (`(a{999}){999}`
stops there) and MAX_TABLE entries (states x vocabulary) in the table, a pattern that needs more is a
ConstraintError. Lookarounds, anchors and backreferences are not regular over generated text and are
refused the same way. A list of choices is the alternation of its literals; a JSON schema becomes a
pattern through outlines-core (`json_constraint`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from re import _constants as sre_constants  # the standard library's parser, to measure a pattern's ranges
from re import _parser as sre_parser
from typing import Any

import interegular
import torch
from interegular import patterns as ip

MAX_PATTERN_CHARS = 16_384
MAX_NFA_STATES = 20_000
MAX_TABLE = 1 << 20  # DFA states x vocabulary size: 4 MiB of int32 per compiled pattern
MAX_RANGE_CHARS = 1 << 16
MAX_SCHEMA_CHARS = 8192
MAX_SCHEMA_PROPERTIES = 64
MAX_OPTIONAL_PROPERTIES = 6
MAX_WORK = 2_000_000  # NFA states visited while building the DFA: bounds compile time (~1 s)
_SUPPORTED_FLAGS = ip.REFlags.CASE_INSENSITIVE | ip.REFlags.SINGLE_LINE


class ConstraintError(ValueError):
    """A pattern cannot constrain this model: invalid, unsupported, unsatisfiable or too large."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled pattern: state 0 is the start; `next_state[s, c]` is -1 where character c may not follow."""

    pattern: str
    next_state: torch.Tensor  # (states, vocab) int32
    blocked: torch.Tensor  # (states, vocab) bool: next_state < 0
    accepting: tuple[bool, ...]  # per state: the text so far is a match
    masks: tuple[bool, ...]  # per state: some character is blocked
    finished: tuple[bool, ...]  # per state: accepting, and no character may follow

    @property
    def states(self) -> int:
        return self.next_state.size(0)

    @property
    def vocab_size(self) -> int:
        return self.next_state.size(1)

    def advance(self, state: int, char_id: int) -> int:
        """The state after `char_id` (which the mask allowed)."""
        return int(self.next_state[state, char_id])

    def allows(self, ids: Iterable[int]) -> bool:
        """Whether the ids are a prefix of a match (what every constrained sample produces)."""
        return self._run(ids) >= 0

    def matches(self, ids: Iterable[int]) -> bool:
        """Whether the ids are a whole match."""
        state = self._run(ids)
        return state >= 0 and self.accepting[state]

    def _run(self, ids: Iterable[int]) -> int:
        state = 0
        for i in ids:
            state = int(self.next_state[state, i])
            if state < 0:
                break
        return state


def regex_constraint(pattern: str, chars: Sequence[str]) -> Constraint:
    """The constraint "what is generated matches `pattern`" over the vocabulary `chars`; ConstraintError."""
    if not isinstance(pattern, str):
        raise ConstraintError("the pattern must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConstraintError(f"the pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS}")
    return _compiled(pattern, tuple(chars))


def clear_cache() -> None:
    """Forget the compiled patterns (each process keeps the last 32 it compiled, over all vocabularies)."""
    _compiled.cache_clear()


def choice_constraint(options: Sequence[str], chars: Sequence[str]) -> Constraint:
    """The constraint "what is generated is one of `options`" (a regex alternation of the literals)."""
    if not options or any(not isinstance(o, str) or not o for o in options):
        raise ConstraintError("choices must be a non-empty list of non-empty strings")
    return regex_constraint("|".join(_literal(o) for o in options), chars)


def json_constraint(schema: Mapping[str, Any] | str, chars: Sequence[str]) -> Constraint:
    """The constraint "what is generated is JSON valid under `schema`": outlines-core turns the schema
    into a regular expression (whitespace between tokens limited to one optional space)."""
    from outlines_core.json_schema import build_regex_from_schema

    text = schema if isinstance(schema, str) else json.dumps(schema)
    _check_schema_size(text)
    try:
        pattern = build_regex_from_schema(text)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"not a JSON schema that can be turned into a pattern: {exc}".strip()) from None
    return regex_constraint(pattern, chars)


def _check_schema_size(text: str) -> None:
    """Refuse a schema whose pattern would be too large before outlines-core builds it: the pattern grows
    with the square of an object's optional properties (12 untyped ones: 1 MB; 1,000: 7 GB and a minute),
    with no bound of its own, so the schema is bounded here."""
    if len(text) > MAX_SCHEMA_CHARS:
        raise ConstraintError(f"the JSON schema is {len(text)} characters long; at most {MAX_SCHEMA_CHARS}")
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        raise ConstraintError("not a JSON schema: not valid JSON") from None
    total = optional = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                required = node.get("required") if isinstance(node.get("required"), list) else []
                total += len(properties)
                optional += sum(name not in required for name in properties)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if total > MAX_SCHEMA_PROPERTIES or optional > MAX_OPTIONAL_PROPERTIES:
        raise ConstraintError(
            f"the JSON schema has {total} properties, {optional} of them optional; at most {MAX_SCHEMA_PROPERTIES} "
            f"and {MAX_OPTIONAL_PROPERTIES} (the pattern grows with the square of the optional ones)"
        )


def _literal(text: str) -> str:
    """`text` as a pattern interegular reads literally: every non-alphanumeric character in a class."""
    return "".join(c if c.isalnum() else ("\\\\" if c == "\\" else f"[{_class_char(c)}]") for c in text)


def _class_char(c: str) -> str:
    return "\\" + c if c in "]^-[" else c


@functools.lru_cache(maxsize=32)
def _compiled(pattern: str, chars: tuple[str, ...]) -> Constraint:
    try:
        re.compile(pattern)
    except (re.error, OverflowError) as exc:  # OverflowError: a repeat count past 2^32
        raise ConstraintError(f"not a valid regular expression: {exc}") from None
    except RecursionError:
        raise ConstraintError("the pattern nests too deeply") from None
    opcodes = _opcodes(pattern)
    if any(op is sre_constants.POSSESSIVE_REPEAT or op is sre_constants.ATOMIC_GROUP for op, _ in opcodes):
        raise ConstraintError("possessive repeats (*+, ++, ?+) and atomic groups are not supported")
    if sum(arg[1] - arg[0] + 1 for op, arg in opcodes if op is sre_constants.RANGE) > MAX_RANGE_CHARS:
        raise ConstraintError(f"its character ranges span more than {MAX_RANGE_CHARS} characters; use . or [^...]")
    if re.search(r"(?<!\\)(?:\\\\)*\\[1-9]", pattern):
        raise ConstraintError("backreferences are not supported")
    try:
        tree = interegular.parse_pattern(pattern)
    except (interegular.Unsupported, interegular.InvalidSyntax) as exc:
        raise ConstraintError(f"unsupported in a constraint: {exc}") from None
    except RecursionError:
        raise ConstraintError("the pattern nests too deeply") from None
    except Exception as exc:  # interegular fails on some valid patterns, e.g. a (?#comment): refuse, never crash
        raise ConstraintError(f"unsupported in a constraint ({type(exc).__name__} reading it)") from None
    nfa = _NFA(chars)
    try:
        start, end = nfa.build(tree, ip.REFlags(0))
    except RecursionError:
        raise ConstraintError("the pattern nests too deeply") from None
    return _determinize(pattern, nfa, start, end, len(chars))


def _opcodes(pattern: str) -> list[tuple[Any, Any]]:
    """Every (opcode, argument) pair of Python's own parse of the pattern, nested ones included: what
    interegular would misread (possessive repeats: it reads a nested repeat) or expand at great cost (a
    range: it lists every character, so `[\\x00-\\U0010ffff]` costs a million strings) is found here."""
    found: list[tuple[Any, Any]] = []
    stack: list[object] = [sre_parser.parse(pattern)]
    while stack:
        item = stack.pop()
        if isinstance(item, sre_parser.SubPattern):
            stack.extend(item.data)
        elif isinstance(item, list | tuple):
            if len(item) == 2 and type(item[0]) is type(sre_constants.RANGE):  # an opcode, not a number
                found.append((item[0], item[1]))
            stack.extend(item)
    return found


class _NFA:
    """A Thompson automaton: each state has epsilon moves and at most one move on a set of vocabulary ids."""

    def __init__(self, chars: tuple[str, ...]):
        self.chars = chars
        self.eps: list[list[int]] = []
        self.moves: list[tuple[tuple[int, ...], int] | None] = []
        self.class_members: list[list[int]] = []
        self.work = 0

    def _state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ConstraintError(f"the pattern expands to more than {MAX_NFA_STATES} states; write it shorter")
        self.eps.append([])
        self.moves.append(None)
        return len(self.eps) - 1

    def build(self, node: object, flags: ip.REFlags) -> tuple[int, int]:
        """(start, end) states of a fragment matching `node`."""
        if isinstance(node, ip.Pattern):  # alternation, with its own flags
            flags = ip._combine_flags(flags, node.added_flags, node.removed_flags)
            if flags & ~_SUPPORTED_FLAGS:
                raise ConstraintError(f"unsupported flag {flags & ~_SUPPORTED_FLAGS}")
            start, end = self._state(), self._state()
            for option in node.options:
                s, e = self.build(option, flags)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        if isinstance(node, ip._Concatenation):
            start = end = self._state()
            for part in node.parts:
                if isinstance(part, ip._NonCapturing):
                    raise ConstraintError("lookahead and lookbehind are not supported")
                s, e = self.build(part, flags)
                self.eps[end].append(s)
                end = e
            return start, end
        if isinstance(node, ip._Repeated):
            start = end = self._state()
            for _ in range(node.min):
                s, e = self.build(node.base, flags)
                self.eps[end].append(s)
                end = e
            if node.max is None:  # a star: loop back
                s, e = self.build(node.base, flags)
                after = self._state()
                self.eps[end] += [s, after]
                self.eps[e] += [s, after]
                return start, after
            tail = self._state()  # each optional copy may be skipped to the end
            for _ in range(node.max - node.min):
                s, e = self.build(node.base, flags)
                self.eps[end] += [s, tail]
                end = e
            self.eps[end].append(tail)
            return start, tail
        if isinstance(node, ip._CharGroup):
            return self._move(self._ids(node, flags))
        if node is ip._DOT:
            dotall = bool(flags & ip.REFlags.SINGLE_LINE)
            return self._move(tuple(i for i, c in enumerate(self.chars) if dotall or c != "\n"))
        if node is ip._EMPTY:
            state = self._state()
            return state, state
        raise ConstraintError(f"unsupported in a constraint: {type(node).__name__}")

    def _ids(self, group: ip._CharGroup, flags: ip.REFlags) -> tuple[int, ...]:
        chars = set(group.chars)
        if flags & ip.REFlags.CASE_INSENSITIVE:
            chars |= {c.lower() for c in group.chars} | {c.upper() for c in group.chars}
        return tuple(i for i, c in enumerate(self.chars) if (c in chars) != group.negated)

    def _move(self, ids: tuple[int, ...]) -> tuple[int, int]:
        start, end = self._state(), self._state()
        self.moves[start] = (ids, end)
        return start, end

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        """The states reachable from `states` by epsilon moves (counted against MAX_WORK)."""
        seen = set(states)
        stack = list(seen)
        while stack:
            for t in self.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        self.spend(len(seen))
        return frozenset(seen)

    def spend(self, work: int) -> None:
        self.work += work
        if self.work > MAX_WORK:
            raise ConstraintError("the pattern's automaton is too large to build; write it simpler")

    def classes(self) -> tuple[list[int], list[tuple[int, ...] | None]]:
        """Characters that every move treats alike, as one class: (a representative id per class, each
        state's move as the classes it accepts). The subset construction then works per class."""
        groups = {ids: k for k, ids in enumerate(dict.fromkeys(m[0] for m in self.moves if m is not None))}
        signature: list[list[int]] = [[] for _ in self.chars]
        for ids, k in groups.items():
            for i in ids:
                signature[i].append(k)
        members: dict[tuple[int, ...], list[int]] = {}
        for i, sig in enumerate(signature):
            if sig:  # a character no move accepts never appears in a match
                members.setdefault(tuple(sig), []).append(i)
        self.class_members = list(members.values())
        class_of = {sig: c for c, sig in enumerate(members)}
        by_group: dict[int, list[int]] = {k: [] for k in groups.values()}
        for sig, c in class_of.items():
            for k in sig:
                by_group[k].append(c)
        accepts = [None if m is None else tuple(by_group[groups[m[0]]]) for m in self.moves]
        return [ids[0] for ids in self.class_members], accepts


def _determinize(pattern: str, nfa: _NFA, start: int, end: int, vocab: int) -> Constraint:
    """The subset construction over the vocabulary's characters, pruned to the states that can still match."""
    max_states = max(1, MAX_TABLE // max(vocab, 1))
    _, accepts = nfa.classes()
    members = nfa.class_members
    first = nfa.closure((start,))
    index = {first: 0}
    subsets = [first]
    table: list[list[int]] = []  # per DFA state: the next state per character class, -1 for none
    closures: dict[frozenset[int], frozenset[int]] = {}
    while len(table) < len(subsets):
        subset = subsets[len(table)]
        targets: dict[int, set[int]] = {}
        for s in subset:
            classes = accepts[s]
            if classes is not None:
                nfa.spend(len(classes))
                target = nfa.moves[s][1]  # type: ignore[index]
                for c in classes:
                    targets.setdefault(c, set()).add(target)
        row = [-1] * len(members)
        for c, after in targets.items():
            key = frozenset(after)
            closed = closures.get(key)
            if closed is None:
                closed = closures[key] = nfa.closure(key)
            j = index.get(closed)
            if j is None:
                if len(subsets) >= max_states:
                    raise ConstraintError(
                        f"the pattern's automaton has more than {max_states} states over this vocabulary; "
                        "write it simpler"
                    )
                j = index[closed] = len(subsets)
                subsets.append(closed)
            row[c] = j
        table.append(row)
    accepting = [end in subset for subset in subsets]
    # Live states: those from which an accepting state can be reached (a reverse search).
    back: list[list[int]] = [[] for _ in subsets]
    for s, row in enumerate(table):
        for t in row:
            if t >= 0:
                back[t].append(s)
    live = set(s for s, ok in enumerate(accepting) if ok)
    stack = list(live)
    while stack:
        for s in back[stack.pop()]:
            if s not in live:
                live.add(s)
                stack.append(s)
    if 0 not in live:
        raise ConstraintError("no text made of this model's characters can match the pattern")
    next_state = torch.full((len(table), vocab), -1, dtype=torch.int32)
    for c, ids in enumerate(members):
        column = torch.tensor([row[c] if row[c] in live else -1 for row in table], dtype=torch.int32)
        next_state[:, ids] = column.unsqueeze(1)
    blocked = next_state < 0
    finished = tuple(bool(accepting[s] and blocked[s].all()) for s in range(len(table)))
    if finished[0]:
        raise ConstraintError("the pattern matches only the empty text: there is nothing to generate")
    masks = tuple(bool(row.any()) for row in blocked)
    return Constraint(pattern, next_state, blocked, tuple(accepting[: len(table)]), masks, finished)
