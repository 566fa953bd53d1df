"""Score mode over documents longer than the teacher's context: overlapping windows cut on the text, merged back.

``ask_scored`` asks for the whole document first. When the server refuses it for its length (a 400 that says
"maximum context length is N tokens", as vLLM, OpenAI and the local teacher word it, code
``context_length_exceeded``, or llama.cpp's ``exceed_context_size_error``), the document is scored in windows of at most ``context - 1`` tokens (a score
request also asks for one completion token). ``context`` is ``teacher.context_tokens`` when set, else the N of
the refusal (the smaller of the two when both are known).

Windows are cut on the text, at characters; their length in characters comes from the characters per token
measured on the answers so far (a window still refused for its length is shrunk by what the refusal says and
asked again). Each window after the first starts at a token boundary of the window before, ``overlap`` tokens
plus ``MARGIN`` before that window's end, where ``overlap = round(teacher.window_overlap * (context - 1))``.

Merging (``merge_windows``): where two windows overlap, the cut is the last byte offset of the document, up to
the earlier window's end, at which both windows' tokenizations have a token boundary (the earlier window's last
tokens may be a word cut in half; its end counts only where the later window starts a token there). Positions
before the cut keep the earlier window's top-k (it saw more of the document before them), positions from the
cut on the later window's. The merged tokens spell the document exactly, and the top-k of every position was
computed from the document's text before it, as far back as its window reaches.

How much context each position gets: a position in the first window sees the whole document before it; every
later position sees at least ``overlap`` tokens before it (with the default ``window_overlap = 0.5``: half the
teacher's context) when the two tokenizations share a boundary within the last ``MARGIN`` tokens of the
earlier window (a space or a line break there is enough for the usual BPE tokenizers).
``Merged.min_context`` is what a document actually got.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from typing import Protocol

import openai

from teacher.fragments import FragmentStats, repair
from teacher.inputs import WorkItem
from teacher.parsing import Parsed, ResponseShapeError

log = logging.getLogger(__name__)

MARGIN = 4  # tokens at the end of a window whose tokenization the cut may disagree with
FILL = 0.95  # share of the token budget a window aims at (the characters-per-token estimate varies)
FIRST_CHARS_PER_TOKEN = 4.0  # before anything is measured, when the refusal does not count the prompt
MAX_TRIES = 8  # requests for one window refused for its length before the document fails

_CONTEXT = re.compile(r"maximum context length is (\d+)", re.IGNORECASE)
_PROMPT = re.compile(
    r"(\d+) (?:tokens )?in (?:the|your) (?:prompt|messages)|request has (\d+) input tokens", re.IGNORECASE
)
LLAMA_CPP_TYPE = "exceed_context_size_error"  # llama.cpp's server: the numbers are fields of the error


class Asker(Protocol):
    """What asks the teacher for one work item (``teacher.client.TeacherClient``)."""

    async def ask(self, item: WorkItem) -> Parsed: ...


@dataclass(frozen=True)
class LengthRefusal:
    """A server's refusal of a prompt for its length: its context and the prompt's tokens, when it says them."""

    context: int | None
    prompt_tokens: int | None


def length_refusal(exc: BaseException) -> LengthRefusal | None:
    """The refusal ``exc`` is when it is a 400 for a prompt longer than the context, else None. Read from the
    message (vLLM, OpenAI, the local teacher) or from llama.cpp's ``n_ctx`` / ``n_prompt_tokens`` fields."""
    if not isinstance(exc, openai.BadRequestError):
        return None
    body = exc.body if isinstance(exc.body, dict) else {}
    if body.get("type") == LLAMA_CPP_TYPE:
        context, prompt = body.get("n_ctx"), body.get("n_prompt_tokens")
        return LengthRefusal(
            context if isinstance(context, int) else None, prompt if isinstance(prompt, int) else None
        )
    text = str(exc)
    found = _CONTEXT.search(text)
    if found is None and exc.code != "context_length_exceeded":
        return None
    counted = _PROMPT.search(text)
    return LengthRefusal(
        int(found.group(1)) if found else None,
        int(counted.group(1) or counted.group(2)) if counted else None,
    )


@dataclass(frozen=True)
class Window:
    """The teacher's answer for ``text[start : start + len(parsed.text)]`` of a document (tokens with bytes)."""

    start: int
    parsed: Parsed


@dataclass(frozen=True)
class Merged:
    """The merged answer, and where each of its positions came from: (window index, position in that window)."""

    parsed: Parsed
    sources: list[tuple[int, int]]

    @property
    def min_context(self) -> int | None:
        """The fewest tokens before any position taken from a window after the first (None: one window)."""
        later = [index for window, index in self.sources if window > 0]
        return min(later) if later else None


def token_offsets(parsed: Parsed) -> list[int]:
    """The byte offset in ``parsed.text`` at which each token starts."""
    offsets, at = [], 0
    for i, token in enumerate(parsed.tokens):
        if token.data is None:
            raise ResponseShapeError(
                f"token {i} (id {token.id}) came without its bytes: give the teacher's tokenizer "
                "(teacher.tokenizer_path) to resolve them"
            )
        if not token.data:
            raise ResponseShapeError(f"token {i} spells nothing: a window's tokens must each spell some text")
        offsets.append(at)
        at += len(token.data)
    return offsets


def next_start(window: Window, back: int) -> int:
    """The character offset (in the document) of the next window: the start of the token ``back`` tokens before
    the window's end, or the nearest earlier one that starts a character (never the window's first token)."""
    data = window.parsed.text.encode("utf-8")
    offsets = token_offsets(window.parsed)
    wanted = max(1, len(offsets) - back)
    order = [*range(wanted, 0, -1), *range(wanted + 1, len(offsets))]
    for i in order:
        if offsets[i] < len(data) and data[offsets[i]] & 0xC0 != 0x80:  # not a UTF-8 continuation byte
            return window.start + len(data[: offsets[i]].decode("utf-8"))
    raise ResponseShapeError(
        f"the window at character {window.start} has no token boundary to start the next window at"
    )


def _check_layout(text: str, windows: list[Window]) -> None:
    if not windows or windows[0].start != 0:
        raise ValueError("windows: the first window must start at the document's start")
    for window in windows:
        if not text.startswith(window.parsed.text, window.start) or not window.parsed.text:
            raise ValueError(
                f"windows: the window at character {window.start} is not the document's text there"
            )
    for before, after in itertools.pairwise(windows):
        if not before.start < after.start < before.start + len(before.parsed.text):
            raise ValueError(
                f"windows: the window at character {after.start} does not overlap the one before"
            )
    last = windows[-1]
    if last.start + len(last.parsed.text) != len(text):
        raise ValueError("windows: the last window must end at the document's end")


def merge_windows(text: str, windows: list[Window]) -> Merged:
    """One answer for ``text`` from overlapping windows' answers (see the module docstring for the cut)."""
    _check_layout(text, windows)
    merged: list[tuple[int, int, int]] = []  # (byte offset in the document, window index, position in it)
    merged_end = 0  # the byte offset where the merged tokens end: the previous window's end
    for w, window in enumerate(windows):
        base = len(text[: window.start].encode("utf-8"))
        starts = {base + offset: i for i, offset in enumerate(token_offsets(window.parsed))}
        end = base + len(window.parsed.text.encode("utf-8"))
        if merged:
            ours = {*starts, end}
            theirs = {offset for offset, _, _ in merged} | {merged_end}
            # the last boundary both tokenizations share (a token start, or the earlier window's end when a
            # token of this window starts there); the window's own first token (no prediction) only as a last
            # resort
            shared = [b for b in ours & theirs if base < b <= merged_end] or [
                b for b in ours & theirs if b == base
            ]
            if not shared:
                raise ResponseShapeError(
                    f"the windows at characters {windows[w - 1].start} and {window.start} share no token boundary"
                )
            cut = max(shared)
            merged = [entry for entry in merged if entry[0] < cut]
            merged += [(offset, w, i) for offset, i in starts.items() if offset >= cut]
        else:
            merged = [(offset, w, i) for offset, i in starts.items()]
        merged_end = end
    sources = [(w, i) for _, w, i in merged]
    answers = [window.parsed for window in windows]
    samples = None
    if all(p.samples is not None for p in answers):
        samples = [answers[w].samples[i] for w, i in sources]  # type: ignore[index]
    parsed = Parsed(
        text=text,
        tokens=[answers[w].tokens[i] for w, i in sources],
        candidates=[answers[w].candidates[i] for w, i in sources],
        finish_reason=answers[-1].finish_reason,
        prompt_tokens=sum(p.prompt_tokens for p in answers),
        completion_tokens=sum(p.completion_tokens for p in answers),
        samples=samples,
    )
    if b"".join(t.data or b"" for t in parsed.tokens) != text.encode("utf-8"):
        raise ResponseShapeError("the merged windows' tokens do not spell the document")
    return Merged(parsed, sources)


async def _ask_window(
    asker: Asker, item: WorkItem, start: int, budget: int, chars_per_token: float, stats: FragmentStats | None
) -> tuple[Window, float]:
    """The window starting at ``start`` that fits ``budget`` tokens, and the characters per token it measured."""
    text = item.prompt_text()
    for _ in range(MAX_TRIES):
        end = min(len(text), start + max(1, int(budget * FILL * chars_per_token)))
        piece = text[start:end]
        try:
            parsed = await asker.ask(WorkItem(prompt=piece, split=item.split, source_id=item.source_id))
        except openai.BadRequestError as exc:
            refusal = length_refusal(exc)
            if refusal is None:
                raise
            measured = len(piece) / refusal.prompt_tokens if refusal.prompt_tokens else chars_per_token
            chars_per_token = min(measured, chars_per_token * 0.8)
            continue
        parsed = repair(parsed, stats)
        return Window(start, parsed), len(piece) / max(1, parsed.prompt_tokens or len(parsed.tokens))
    raise ValueError(
        f"no window at character {start} fits the teacher's context of {budget + 1} tokens after {MAX_TRIES} tries"
    )


async def ask_windows(
    asker: Asker,
    item: WorkItem,
    context: int,
    overlap: float,
    prompt_tokens: int | None = None,
    stats: FragmentStats | None = None,
) -> list[Window]:
    """The document of ``item`` asked in overlapping windows that fit ``context`` tokens; ``prompt_tokens`` (the
    whole document's count, when the server's refusal gave it) sizes the first window."""
    text = item.prompt_text()
    budget = context - 1
    back = max(1, round(overlap * budget)) + MARGIN
    if budget <= back:
        raise ValueError(
            f"a teacher context of {context} tokens leaves no room to advance with teacher.window_overlap = "
            f"{overlap} (and {MARGIN} tokens of margin)"
        )
    chars_per_token = len(text) / prompt_tokens if prompt_tokens else FIRST_CHARS_PER_TOKEN
    windows = [(await _ask_window(asker, item, 0, budget, chars_per_token, stats))]
    while True:
        window, chars_per_token = windows[-1]
        end = window.start + len(window.parsed.text)
        if end == len(text):
            return [w for w, _ in windows]
        following = await _ask_window(asker, item, next_start(window, back), budget, chars_per_token, stats)
        if following[0].start + len(following[0].parsed.text) <= end:
            raise ValueError(
                f"the window after character {window.start} does not reach past the one before: lower "
                "teacher.window_overlap or raise teacher.context_tokens"
            )
        windows.append(following)


async def ask_scored(
    asker: Asker,
    item: WorkItem,
    context_tokens: int | None,
    overlap: float,
    stats: FragmentStats | None = None,
) -> Parsed:
    """The teacher's score-mode answer for the whole document of ``item``: one request when it fits the
    teacher's context, else overlapping windows merged into one answer (the module docstring says how)."""
    try:
        return await asker.ask(item)
    except openai.BadRequestError as exc:
        refusal = length_refusal(exc)
        if refusal is None:
            raise
        known = [c for c in (context_tokens, refusal.context) if c is not None]
        if not known:
            raise ValueError(
                f"{exc}: the document is longer than the teacher's context, which the server does not state; "
                "set teacher.context_tokens to score it in windows"
            ) from None
        windows = await ask_windows(asker, item, min(known), overlap, refusal.prompt_tokens, stats)
    merged = merge_windows(item.prompt_text(), windows)
    log.debug(
        "scored %d characters in %d windows of at most %d tokens (fewest tokens before a position: %s)",
        len(item.prompt_text()), len(windows), min(known), merged.min_context,
    )  # fmt: skip
    return merged.parsed
