"""Tokens whose bytes the server did not send, recovered from the text they spell, or marked unknown.

Servers send a token that is only part of a UTF-8 character (or one longer than 32 bytes) as ``""`` or a lone
space with ``"bytes": null``; several such candidates at one position collapse into one key. The parsers turn
them into ``Token(data=None, id=None)``. Here:

- a run of one unknown actual token between known ones gets exactly the bytes of the text between them;
- a run of several (a character split in pieces whose boundaries are unknown) becomes one token spelling the
  run's bytes, with no soft target at its position (counted: never guessed);
- an unknown top-k candidate gets the actual token's recovered bytes when it has the actual token's logprob,
  otherwise it is dropped from that position's top-k (counted);
- tokens that spell nothing (an end-of-text token spelled ``""`` at the end, a special token whose id
  resolves to no bytes) are dropped.

What cannot be recovered unambiguously makes the record fail with a message naming the token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from teacher.parsing import Parsed, ResponseShapeError, Token


@dataclass
class FragmentStats:
    """What ``repair`` did, summed over records."""

    recovered_tokens: int = 0  # unknown actual tokens whose bytes came from the text
    unknown_positions: int = 0  # positions left without a soft target (pieces of one merged token)
    dropped_candidates: int = 0  # unknown top-k candidates left out
    dropped_empty_tokens: int = 0  # trailing zero-byte tokens (end-of-text) left out

    def add(self, other: FragmentStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def render(self) -> str:
        return (
            f"split/unknown tokens: {self.recovered_tokens} recovered from the text, {self.unknown_positions} "
            f"positions without soft target, {self.dropped_candidates} unknown top-k entries dropped"
        )


def is_unknown(token: Token) -> bool:
    """Neither bytes nor id: the server sent a fragment or an over-long token as ``""``."""
    return token.id is None and not token.data


def _reach(states: dict, end: int, ways: int, back: tuple[int, int]) -> None:
    """One more way to reach byte ``end`` (ways counted up to 2; the first back pointer kept)."""
    old = states.get(end)
    states[end] = (min(2, ways + (old[0] if old else 0)), old[1] if old else back)


def _run_sizes(text: bytes, items: list[tuple[int, bytes]]) -> list[int]:
    """The byte count of every unknown run, from the text: ``items`` alternate ``(run_length, b"")`` for a run of
    unknown tokens and ``(0, data)`` for a known stretch. A forward search over byte positions (each known
    stretch must match where the run before it ends); raises when no spelling or more than one fits."""
    states: dict[int, tuple[int, tuple[int, int] | None]] = {0: (1, None)}  # pos -> (ways <= 2, back pointer)
    history = []
    for index, (run, data) in enumerate(items):
        new: dict[int, tuple[int, tuple[int, int] | None]] = {}
        reach = functools.partial(_reach, new)
        last = index == len(items) - 1
        for pos, (ways, _) in states.items():
            if not run:
                if text.startswith(data, pos):
                    reach(pos + len(data), ways, (pos, 0))
            elif last:
                if len(text) - pos >= run:
                    reach(len(text), ways, (pos, len(text) - pos))
            else:
                follow = items[index + 1][1]
                at = text.find(follow, pos + run)
                while at >= 0:
                    reach(at, ways, (pos, at - pos))
                    at = text.find(follow, at + 1)
        history.append(new)
        states = new
    if len(text) not in states:
        raise ResponseShapeError("the tokens do not spell the text (the unknown tokens' bytes fit nowhere)")
    if states[len(text)][0] > 1:
        raise ResponseShapeError(
            "the bytes of the unknown (split-character) tokens cannot be recovered: more than one way fits the text"
        )
    sizes, pos = [], len(text)
    for index in range(len(items) - 1, -1, -1):
        back = history[index][pos][1]
        assert back is not None
        pos, size = back
        if items[index][0]:
            sizes.append(size)
    return sizes[::-1]


def _with_candidate(candidates: list[Token], actual: Token) -> list[Token]:
    """Give the actual token's recovered bytes to the unknown candidate with its logprob."""
    out = []
    for c in candidates:
        if is_unknown(c) and c.logprob == actual.logprob and actual.data:
            c = replace(c, data=actual.data)
        out.append(c)
    return out


def repair(parsed: Parsed, stats: FragmentStats | None = None) -> Parsed:
    """``parsed`` with unknown tokens recovered or marked (see the module docstring); raises
    ``ResponseShapeError`` when the tokens do not spell the text."""
    stats = stats if stats is not None else FragmentStats()
    if any(t.data is None and t.id is not None for t in parsed.tokens):
        return parsed  # ids without the tokenizer: the caller names that configuration error
    text = parsed.text.encode("utf-8")
    tokens, candidates = list(parsed.tokens), list(parsed.candidates)
    while tokens and not tokens[-1].data and _spelled_known(tokens[:-1]) == len(text):
        tokens.pop()  # a zero-byte end-of-text token: nothing of the text is its
        candidates.pop()
        stats.dropped_empty_tokens += 1
    # a special token spelling nothing (an id resolving to no bytes) has no student token: left out
    indexed = [(i, t) for i, t in enumerate(tokens) if not (t.data == b"" and t.id is not None)]
    stats.dropped_empty_tokens += len(tokens) - len(indexed)
    if not any(is_unknown(t) for _, t in indexed):
        if not spells(b"".join(t.data or b"" for _, t in indexed), parsed.text):
            raise ResponseShapeError("the tokens do not spell the text")
        keep = [i for i, _ in indexed]
        samples = None if parsed.samples is None else [parsed.samples[i] for i in keep]
        return replace(
            parsed, tokens=[t for _, t in indexed], candidates=[candidates[i] for i in keep], samples=samples
        )
    groups: list[list[tuple[int, Token]]] = []
    for i, token in indexed:
        if groups and is_unknown(groups[-1][-1][1]) == is_unknown(token):
            groups[-1].append((i, token))
        else:
            groups.append([(i, token)])
    items = [
        (len(g), b"") if is_unknown(g[0][1]) else (0, b"".join(t.data or b"" for _, t in g)) for g in groups
    ]
    sizes = iter(_run_sizes(text, items))
    out_tokens: list[Token] = []
    out_candidates: list[list[Token]] = []
    source: list[int | None] = []  # the input position of each output position (None: a merged run)
    pos = 0
    for group in groups:
        if not is_unknown(group[0][1]):
            for i, token in group:
                out_tokens.append(token)
                out_candidates.append(candidates[i])
                source.append(i)
                pos += len(token.data or b"")
            continue
        size = next(sizes)
        data = text[pos : pos + size]
        pos += size
        if len(group) == 1:
            i, token = group[0]
            recovered = replace(token, data=data)
            out_tokens.append(recovered)
            out_candidates.append(_with_candidate(candidates[i], recovered))
            source.append(i)
            stats.recovered_tokens += 1
        else:  # piece boundaries unknown: one token for the whole run, no soft target
            out_tokens.append(Token(data, None, sum(t.logprob for _, t in group)))
            out_candidates.append([])
            source.append(None)
            stats.unknown_positions += len(group)
    kept = []
    for row in out_candidates:
        known = [c for c in row if not is_unknown(c)]
        stats.dropped_candidates += len(row) - len(known)
        kept.append(known)
    samples = parsed.samples
    if samples is not None:
        samples = [None if j is None else samples[j] for j in source]
    return replace(parsed, tokens=out_tokens, candidates=kept, samples=samples)


def spells(data: bytes, text: str) -> bool:
    """Whether tokens' bytes spell ``text``: exactly, or as the server's lossy decoding of them (a completion
    cut inside a character ends in U+FFFD; the token bytes are then the truth)."""
    return data == text.encode("utf-8") or data.decode("utf-8", "replace") == text


def _spelled_known(tokens: list[Token]) -> int:
    """Bytes spelled by tokens, counting unknown ones as at least one byte each."""
    return sum(len(t.data) if t.data else 1 for t in tokens)
