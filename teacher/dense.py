"""The bulky arrays of score-mode and chat answers, parsed without a Python object per top-k entry.

A score answer for a 1,000-token text carries ~21,000 top-k entries (~2 MB of JSON), a chat answer of 1,000
generated tokens as many. Decoding it into dicts and one ``Token`` per entry costs far more CPU than everything
else the collector does, so ``decode_body`` scans the one bulky array (``choices[0].prompt_logprobs``,
``choices[0].logprobs.top_logprobs`` of an echo answer, or ``choices[0].logprobs.content`` of a chat answer) in
the raw bytes with compiled loops (``scan_*``: ids, ranks and the number texts of all entries, checked against
JSON's number grammar; Arrow converts all numbers at once, correctly rounded as orjson's full decode would, with
no Python object per number), decodes the rest with orjson and leaves a ``RawArray`` (the array's bytes and its
entries) in the array's place. The parsers turn the entries into a
``teacher.parsing.DenseTopK``: per position the kept entries sorted by decreasing logprob, as arrays.

The scanners accept one layout only, the one servers send for token-id answers (``"token_id:N"`` strings, no
raw logits); anything else (other keys, token strings, escapes in keys, malformed JSON) makes them give up, and
the caller decodes the array with orjson and takes the general path (``teacher.parsing``), which stores the
same thing and raises its precise errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from numba import njit

_OK, _GIVE_UP = 0, 1
_KEY_LOGPROB = np.frombuffer(b"logprob", np.uint8)
_KEY_RANK = np.frombuffer(b"rank", np.uint8)
_KEY_DECODED = np.frombuffer(b"decoded_token", np.uint8)
# The same keys as vLLM spells them (compact JSON), quotes and colon included: matched at once.
_LOGPROB_COLON = np.frombuffer(b'"logprob":', np.uint8)
_RANK_COLON = np.frombuffer(b'"rank":', np.uint8)
_DECODED_COLON = np.frombuffer(b'"decoded_token":', np.uint8)
_LOGPROB, _RANK, _DECODED = 0, 1, 2
_TOKEN_ID = np.frombuffer(b"token_id:", np.uint8)
# The bulky array of each answer shape: its key, and where it sits in the decoded body. Tried in this order (a
# chat answer's many "top_logprobs" are told from echo's one at the second). A chat answer's ``"content":``
# appears twice (``message.content`` too): its array is the one followed by ``[``.
BULKY = {
    "prompt_logprobs": (b'"prompt_logprobs":', ()),
    "top_logprobs": (b'"top_logprobs":', ("logprobs",)),
    "content": (b'"content":', ("logprobs",)),
}


@dataclass(frozen=True)
class RawArray:
    """A JSON array left undecoded (its bytes, and its entries when a scanner read them), in the place of a
    bulky array of a decoded body."""

    data: memoryview
    scanned: Scanned | None

    def decode(self) -> list:
        value = loads(self.data)
        if not isinstance(value, list):
            raise ValueError("not a JSON array")
        return value


def loads(data: bytes | memoryview) -> Any:
    """JSON by orjson, else by the standard library, which also reads ``NaN`` / ``-Infinity`` (orjson refuses
    them; some servers send them, and the parsers name such a logprob)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data))


# ---- splitting the body ---------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _string_end(buf, i):
    """The index after the JSON string starting at ``buf[i] == '"'`` (-1: unterminated)."""
    i += 1
    n = buf.shape[0]
    while i < n:
        c = buf[i]
        if c == 92:  # backslash: skip the escaped byte
            i += 2
        elif c == 34:
            return i + 1
        else:
            i += 1
    return -1


@njit(cache=True, nogil=True)
def array_end(buf, i):
    """The index after the JSON array starting at ``buf[i] == '['`` (-1: unbalanced or cut short)."""
    depth = 0
    n = buf.shape[0]
    while i < n:
        c = buf[i]
        if c == 34:
            i = _string_end(buf, i)
            if i < 0:
                return -1
            continue
        if c == 91 or c == 123:
            depth += 1
        elif c == 93 or c == 125:
            depth -= 1
            if depth == 0:
                return i + 1 if c == 93 else -1
        i += 1
    return -1


def _skip_ws(content: bytes, i: int) -> int:
    while i < len(content) and content[i] in b" \t\r\n":
        i += 1
    return i


def _array_start(content: bytes, key: bytes) -> tuple[int, int]:
    """(where the value of the first ``key`` followed by ``[`` starts (-1: none), how many ``key`` come before
    it)."""
    before, at = 0, content.find(key)
    while at >= 0:
        start = _skip_ws(content, at + len(key))
        if start < len(content) and content[start] == ord("["):
            return start, before
        before, at = before + 1, content.find(key, at + 1)
    return -1, before


def _count(content: bytes, key: bytes, start: int, most: int) -> int:
    """How many ``key`` in ``content[start:]``, counted up to ``most``."""
    n, at = 0, content.find(key, start)
    while at >= 0 and n < most:
        n, at = n + 1, content.find(key, at + 1)
    return n


def decode_body(content: bytes, shape: str | None = None) -> Any:
    """A response body decoded (``loads``), its one bulky array (``BULKY``) left as a ``RawArray`` (scanned
    when its layout allows; chat's only when scanned: its general path decodes the whole body anyway); raises
    ``ValueError`` when the body is not JSON. ``shape`` (a ``BULKY`` key, from the request) looks for that array
    only: searching a 2 MB body for an absent key costs about half a millisecond.

    Outside the array its key must appear nowhere else (a duplicate key, several choices: decoded in full);
    chat's ``"content":`` exactly once more, as ``message.content``, a string."""
    for name, (key, path) in BULKY.items() if shape is None else [(shape, BULKY[shape])]:
        others = 1 if name == "content" else 0
        start, before = _array_start(content, key)
        if start < 0 or before > others:
            continue
        buf = np.frombuffer(content, np.uint8)
        end, scanned = scan_bulky(buf, start, name)
        if scanned is None:
            if name == "content":
                break
            end = int(array_end(buf, start))
        if end < 0:
            break  # cut short: the full decode names the error
        if before + _count(content, key, end, others - before + 1) != others:
            continue
        try:
            body = orjson.loads(content[:start] + b"null" + content[end:])
        except orjson.JSONDecodeError:
            return loads(content)
        try:
            choice = body["choices"][0]
            holder = choice
            for step in path:
                holder = holder[step]
            spoken = name != "content" or isinstance(choice["message"]["content"], str)
        except (KeyError, IndexError, TypeError):
            continue  # the key elsewhere (a chat answer's one top_logprobs, or a top-level extension)
        if not spoken or not isinstance(holder, dict) or name not in holder or holder[name] is not None:
            continue
        holder[name] = RawArray(memoryview(content)[start:end], scanned)
        return body
    return loads(content)


def decoded_array(value: Any) -> Any:
    """``value`` itself, or the list a ``RawArray`` holds (decoded now: the general path's input)."""
    if isinstance(value, RawArray):
        try:
            return value.decode()
        except ValueError:
            return None  # not a list: the caller names the missing field
    return value


# ---- scanning the bulky arrays --------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _ws(buf, i):
    n = buf.shape[0]
    while i < n and (buf[i] == 32 or buf[i] == 9 or buf[i] == 10 or buf[i] == 13):
        i += 1
    return i


@njit(cache=True, nogil=True)
def _is(buf, start, end, key):
    if end - start != key.shape[0]:
        return False
    for j in range(key.shape[0]):  # noqa: SIM110 (a loop numba compiles)
        if buf[start + j] != key[j]:
            return False
    return True


@njit(cache=True, nogil=True)
def _digits(buf, i, end):
    """The non-negative integer spelled by ``buf[i:end]`` (-1: not only digits, or none, or too long)."""
    if end <= i or end - i > 18:
        return -1
    value = 0
    for j in range(i, end):
        c = buf[j]
        if c < 48 or c > 57:
            return -1
        value = value * 10 + (c - 48)
    return value


@njit(cache=True, nogil=True)
def _copy_number(buf, i, numbers, o):
    """Copy the JSON number at ``buf[i]`` to ``numbers[o]``; (index after it, new o), or (-1, o) when none
    starts there (what JSON does not spell a number: ``+1``, ``01``, ``.5``, ``1.``), or for ``-0``, an integer
    JSON reads as 0 where a float parser keeps the sign. One pass: ``part`` is 0 before the digits, 1 in the
    integer part, 2 after ``.``, 3 after ``e``, 4 after its sign; ``digits`` counts the current part's."""
    n = buf.shape[0]
    j = i + 1 if i < n and buf[i] == 45 else i
    part = digits = 0
    leading_zero = False
    while j < n:
        c = buf[j]
        if 48 <= c <= 57:
            if part == 0:
                part, leading_zero = 1, c == 48
            elif part == 1 and leading_zero:
                return -1, o  # 01
            digits += 1
        elif c == 46 and part == 1:
            part, digits = 2, 0
        elif (c == 101 or c == 69) and (part == 1 or part == 2) and digits:
            part, digits = 3, 0
        elif (c == 43 or c == 45) and part == 3 and not digits:
            part = 4
        else:
            break
        j += 1
    if part == 0 or not digits or (part == 1 and leading_zero and buf[i] == 45):
        return -1, o  # no digits, a part left empty (1., 1e), or -0
    for m in range(i, j):
        numbers[o] = buf[m]
        o += 1
    return j, o


@njit(cache=True, nogil=True)
def _token_id_string(buf, i):
    """(id, index after) of the string ``"token_id:N"`` at ``buf[i]`` ((-1, i): another string)."""
    end = _string_end(buf, i)
    if end < 0 or end - i - 2 < _TOKEN_ID.shape[0] + 1:
        return -1, i
    if not _is(buf, i + 1, i + 1 + _TOKEN_ID.shape[0], _TOKEN_ID):
        return -1, i
    return _digits(buf, i + 1 + _TOKEN_ID.shape[0], end - 1), end


@njit(cache=True, nogil=True)
def scan_prompt_logprobs(buf, start, pos, ids, ranks, numbers, ends, nulls):
    """vLLM ``prompt_logprobs`` at ``buf[start]``: ``[null | {"<id>": {"logprob": x, "rank": r | null,
    "decoded_token": "token_id:N" | null}, ...}, ...]``. Fills one row per entry (position, id, rank or -1, where
    its logprob text ends in ``numbers``) and the logprob texts, one after the other, into ``numbers``;
    ``nulls[p]`` marks null positions. Returns (status, index after the array, positions, entries, bytes of
    numbers)."""
    n = buf.shape[0]
    i = _ws(buf, start)
    if i >= n or buf[i] != 91:
        return _GIVE_UP, -1, 0, 0, 0
    i = _ws(buf, i + 1)
    p = e = o = 0
    if i < n and buf[i] == 93:
        return _OK, i + 1, 0, 0, 0
    while i < n:
        if i + 4 <= n and buf[i] == 110 and buf[i + 1] == 117 and buf[i + 2] == 108 and buf[i + 3] == 108:
            nulls[p] = True
            i += 4
        elif buf[i] == 123:
            i = _ws(buf, i + 1)
            if i < n and buf[i] == 125:
                i += 1
            else:
                while True:  # entries "<id>": {...}
                    if i >= n or buf[i] != 34:
                        return _GIVE_UP, -1, 0, 0, 0
                    j, token = i + 1, 0
                    while j < n and 48 <= buf[j] <= 57 and j - i <= 18:
                        token = token * 10 + (buf[j] - 48)
                        j += 1
                    if j == i + 1 or j >= n or buf[j] != 34:
                        return _GIVE_UP, -1, 0, 0, 0  # not only digits (or none, or too many)
                    i = _ws(buf, j + 1)
                    if i >= n or buf[i] != 58:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i + 1)
                    if i >= n or buf[i] != 123:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i + 1)
                    rank, has_logprob = -1, False
                    while True:  # fields
                        if i + 16 <= n and _is(buf, i, i + 10, _LOGPROB_COLON):  # compact: read at once
                            key, i = _LOGPROB, _ws(buf, i + 10)
                        elif i + 16 <= n and _is(buf, i, i + 7, _RANK_COLON):
                            key, i = _RANK, _ws(buf, i + 7)
                        elif i + 16 <= n and _is(buf, i, i + 16, _DECODED_COLON):
                            key, i = _DECODED, _ws(buf, i + 16)
                        else:
                            if i >= n or buf[i] != 34:
                                return _GIVE_UP, -1, 0, 0, 0
                            key_end = _string_end(buf, i)
                            if key_end < 0:
                                return _GIVE_UP, -1, 0, 0, 0
                            if _is(buf, i + 1, key_end - 1, _KEY_LOGPROB):
                                key = _LOGPROB
                            elif _is(buf, i + 1, key_end - 1, _KEY_RANK):
                                key = _RANK
                            elif _is(buf, i + 1, key_end - 1, _KEY_DECODED):
                                key = _DECODED
                            else:
                                return _GIVE_UP, -1, 0, 0, 0  # logits or anything else: the general path
                            i = _ws(buf, key_end)
                            if i >= n or buf[i] != 58:
                                return _GIVE_UP, -1, 0, 0, 0
                            i = _ws(buf, i + 1)
                        if i >= n:
                            return _GIVE_UP, -1, 0, 0, 0
                        is_null = (
                            i + 4 <= n
                            and buf[i] == 110
                            and buf[i + 1] == 117
                            and buf[i + 2] == 108
                            and buf[i + 3] == 108
                        )
                        if key == _LOGPROB:
                            if has_logprob:
                                return _GIVE_UP, -1, 0, 0, 0
                            i, o = _copy_number(buf, i, numbers, o)
                            if i < 0:
                                return _GIVE_UP, -1, 0, 0, 0
                            has_logprob = True
                        elif key == _RANK:
                            if is_null:
                                i += 4
                            else:
                                j = i
                                while j < n and 48 <= buf[j] <= 57:
                                    j += 1
                                rank = _digits(buf, i, j)
                                if rank < 0:
                                    return _GIVE_UP, -1, 0, 0, 0
                                i = j
                        elif is_null:
                            i += 4
                        else:
                            spelled, i = _token_id_string(buf, i) if buf[i] == 34 else (-1, i)
                            if spelled < 0:
                                return _GIVE_UP, -1, 0, 0, 0
                        i = _ws(buf, i)
                        if i < n and buf[i] == 44:
                            i = _ws(buf, i + 1)
                        elif i < n and buf[i] == 125:
                            i += 1
                            break
                        else:
                            return _GIVE_UP, -1, 0, 0, 0
                    if not has_logprob or e >= ids.shape[0]:
                        return _GIVE_UP, -1, 0, 0, 0
                    pos[e], ids[e], ranks[e], ends[e] = p, token, rank, o
                    e += 1
                    i = _ws(buf, i)
                    if i < n and buf[i] == 44:
                        i = _ws(buf, i + 1)
                    elif i < n and buf[i] == 125:
                        i += 1
                        break
                    else:
                        return _GIVE_UP, -1, 0, 0, 0
        else:
            return _GIVE_UP, -1, 0, 0, 0
        p += 1
        i = _ws(buf, i)
        if i < n and buf[i] == 44:
            i = _ws(buf, i + 1)
            if p >= nulls.shape[0]:
                return _GIVE_UP, -1, 0, 0, 0
        elif i < n and buf[i] == 93:
            return _OK, i + 1, p, e, o
        else:
            return _GIVE_UP, -1, 0, 0, 0
    return _GIVE_UP, -1, 0, 0, 0


@njit(cache=True, nogil=True)
def scan_top_logprobs(buf, start, pos, ids, numbers, ends, nulls):
    """Legacy completions' ``top_logprobs`` of a token-id answer: ``[null | {"token_id:N": x, ...}, ...]``.
    Same outputs as ``scan_prompt_logprobs`` (no ranks)."""
    n = buf.shape[0]
    i = _ws(buf, start)
    if i >= n or buf[i] != 91:
        return _GIVE_UP, -1, 0, 0, 0
    i = _ws(buf, i + 1)
    p = e = o = 0
    if i < n and buf[i] == 93:
        return _OK, i + 1, 0, 0, 0
    while i < n:
        if i + 4 <= n and buf[i] == 110 and buf[i + 1] == 117 and buf[i + 2] == 108 and buf[i + 3] == 108:
            nulls[p] = True
            i += 4
        elif buf[i] == 123:
            i = _ws(buf, i + 1)
            if i < n and buf[i] == 125:
                i += 1
            else:
                while True:
                    if i >= n or buf[i] != 34:
                        return _GIVE_UP, -1, 0, 0, 0
                    token, i = _token_id_string(buf, i)
                    if token < 0:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i)
                    if i >= n or buf[i] != 58 or e >= ids.shape[0]:
                        return _GIVE_UP, -1, 0, 0, 0
                    i, o = _copy_number(buf, _ws(buf, i + 1), numbers, o)
                    if i < 0:
                        return _GIVE_UP, -1, 0, 0, 0
                    pos[e], ids[e], ends[e] = p, token, o
                    e += 1
                    i = _ws(buf, i)
                    if i < n and buf[i] == 44:
                        i = _ws(buf, i + 1)
                    elif i < n and buf[i] == 125:
                        i += 1
                        break
                    else:
                        return _GIVE_UP, -1, 0, 0, 0
        else:
            return _GIVE_UP, -1, 0, 0, 0
        p += 1
        i = _ws(buf, i)
        if i < n and buf[i] == 44:
            i = _ws(buf, i + 1)
            if p >= nulls.shape[0]:
                return _GIVE_UP, -1, 0, 0, 0
        elif i < n and buf[i] == 93:
            return _OK, i + 1, p, e, o
        else:
            return _GIVE_UP, -1, 0, 0, 0
    return _GIVE_UP, -1, 0, 0, 0


@njit(cache=True, nogil=True)
def _is_null(buf, i):
    return (
        i + 4 <= buf.shape[0]
        and buf[i] == 110
        and buf[i + 1] == 117
        and buf[i + 2] == 108
        and buf[i + 3] == 108
    )


# The keys of chat logprob objects, and how they are spelled.
_CHAT_TOKEN, _CHAT_LOGPROB, _CHAT_BYTES, _CHAT_TOP = 0, 1, 2, 3
_CHAT_KEY_TOKEN = b'"token"'
_CHAT_KEY_LOGPROB = b'"logprob"'
_CHAT_KEY_BYTES = b'"bytes"'
_CHAT_KEY_TOP = b'"top_logprobs"'


@njit(cache=True, nogil=True)
def _chat_key(buf, i):
    """(which ``_CHAT_*`` key starts at ``buf[i]``, the index after it); (-1, -1): another key (escapes
    included) or none. Compared byte by byte with bytes constants: picking one of several constant arrays for
    ``_is`` compiles to reference counting on every call."""
    n = buf.shape[0]
    if i + 3 >= n or buf[i] != 34:
        return -1, -1
    c = buf[i + 1]
    if c == 116 and buf[i + 3] == 107:  # "tok
        which, key = _CHAT_TOKEN, _CHAT_KEY_TOKEN
    elif c == 116:
        which, key = _CHAT_TOP, _CHAT_KEY_TOP
    elif c == 108:
        which, key = _CHAT_LOGPROB, _CHAT_KEY_LOGPROB
    elif c == 98:
        which, key = _CHAT_BYTES, _CHAT_KEY_BYTES
    else:
        return -1, -1
    if i + len(key) > n:
        return -1, -1
    for j in range(len(key)):
        if buf[i + j] != key[j]:
            return -1, -1
    return which, i + len(key)


@njit(cache=True, nogil=True)
def _byte_list_end(buf, i):
    """The index after the list of integers 0..255 at ``buf[i] == '['`` (-1: anything else)."""
    n = buf.shape[0]
    i = _ws(buf, i + 1)
    if i < n and buf[i] == 93:
        return i + 1
    while True:
        j = i
        while j < n and 48 <= buf[j] <= 57:
            j += 1
        value = _digits(buf, i, j)
        if value < 0 or value > 255 or (buf[i] == 48 and j - i > 1):  # JSON spells no leading zero
            return -1
        i = _ws(buf, j)
        if i < n and buf[i] == 44:
            i = _ws(buf, i + 1)
        elif i < n and buf[i] == 93:
            return i + 1
        else:
            return -1


_OBJECT, _FIELD, _AFTER_VALUE = 0, 1, 2  # where scan_chat_content is: an object's start, a key, after a value


@njit(cache=True, nogil=True)
def scan_chat_content(buf, start, pos, ids, numbers, ends, tokens, token_numbers, token_ends):
    """Chat ``logprobs.content`` of a token-id answer at ``buf[start]``: ``[{"token": "token_id:N", "logprob": x,
    "bytes": [...] | null, "top_logprobs": [{"token", "logprob", "bytes"}, ...] | null}, ...]`` (fields in any
    order; ``bytes`` and ``top_logprobs`` optional; ``bytes`` checked and skipped: a token named by its id takes
    the tokenizer's bytes). Fills ``tokens[p]`` with each position's token id and its logprob text into
    ``token_numbers`` (ending at ``token_ends[p]``), and its top entries as ``scan_top_logprobs``. Returns (status, index after the array,
    positions, entries, bytes of numbers, bytes of token numbers).

    One loop reads both levels (a content entry, an entry of its ``top_logprobs``): a helper per object or
    field, called from two places, is not inlined, and its reference counting made the scan twice as slow."""
    n = buf.shape[0]
    i = _ws(buf, start)
    if i >= n or buf[i] != 91:
        return _GIVE_UP, -1, 0, 0, 0, 0
    i = _ws(buf, i + 1)
    if i < n and buf[i] == 93:
        return _OK, i + 1, 0, 0, 0, 0
    p = e = o = t = 0
    inner = False  # in an entry of top_logprobs, else in a content entry
    seen = outer_seen = 0  # bits of the keys read in the current object (and in its content entry)
    token = outer_token = -1
    state = _OBJECT
    while True:
        if state == _OBJECT:
            if i >= n or buf[i] != 123 or p >= tokens.shape[0] or e >= ids.shape[0]:
                return _GIVE_UP, -1, 0, 0, 0, 0
            i = _ws(buf, i + 1)
            seen, token, state = 0, -1, _FIELD
        elif state == _FIELD:
            which, i = _chat_key(buf, i)
            if which < 0 or seen & (1 << which) or (inner and which == _CHAT_TOP):
                return _GIVE_UP, -1, 0, 0, 0, 0  # another key (logits, samples...), or a duplicate one
            i = _ws(buf, i)
            if i >= n or buf[i] != 58:
                return _GIVE_UP, -1, 0, 0, 0, 0
            i = _ws(buf, i + 1)
            seen |= 1 << which
            state = _AFTER_VALUE
            if which == _CHAT_TOKEN:
                if i >= n or buf[i] != 34:
                    return _GIVE_UP, -1, 0, 0, 0, 0
                token, i = _token_id_string(buf, i)
                if token < 0:
                    return _GIVE_UP, -1, 0, 0, 0, 0
            elif which == _CHAT_LOGPROB:
                if inner:
                    i, o = _copy_number(buf, i, numbers, o)
                else:
                    i, t = _copy_number(buf, i, token_numbers, t)
            elif _is_null(buf, i):
                i += 4
            elif which == _CHAT_BYTES:
                i = _byte_list_end(buf, i) if i < n and buf[i] == 91 else -1
            elif i < n and buf[i] == 91:  # top_logprobs
                i = _ws(buf, i + 1)
                if i < n and buf[i] == 93:
                    i += 1
                else:
                    inner, outer_seen, outer_token, state = True, seen, token, _OBJECT
            else:
                return _GIVE_UP, -1, 0, 0, 0, 0
            if i < 0:
                return _GIVE_UP, -1, 0, 0, 0, 0
        else:
            i = _ws(buf, i)
            if i < n and buf[i] == 44:
                i, state = _ws(buf, i + 1), _FIELD
                continue
            if i >= n or buf[i] != 125 or seen & 3 != 3:
                return _GIVE_UP, -1, 0, 0, 0, 0  # not an object's end, or one without token and logprob
            if inner:
                pos[e], ids[e], ends[e] = p, token, o
                e += 1
            else:
                tokens[p], token_ends[p] = token, t
                p += 1
            i = _ws(buf, i + 1)
            if i < n and buf[i] == 44:
                i, state = _ws(buf, i + 1), _OBJECT
            elif i < n and buf[i] == 93 and inner:
                i, inner, seen, token = i + 1, False, outer_seen, outer_token  # back in the content entry
            elif i < n and buf[i] == 93:
                return _OK, i + 1, p, e, o, t
            else:
                return _GIVE_UP, -1, 0, 0, 0, 0


@njit(cache=True, nogil=True)
def top_rows(positions, pos, ids, values, ranks, k, floor, repeats=False):
    """Per position: its entries with a logprob above ``floor`` and a rank within ``k`` (or none), sorted by
    decreasing logprob (ties in arrival order), the first ``k``. Returns (ids [P, K], logprobs [P, K]), K the
    widest row (at least 1), or a (0, 0) pair when an id repeats within a position (a duplicate JSON key),
    unless ``repeats`` (entries of a list, kept as they come)."""
    starts = np.zeros(positions + 1, np.int64)
    for e in range(pos.shape[0]):
        starts[pos[e] + 1] += 1
    for p in range(positions):
        starts[p + 1] += starts[p]
    width = 1
    kept = np.empty(pos.shape[0], np.int64)
    counts = np.zeros(positions, np.int64)
    for p in range(positions):
        m = 0
        for e in range(starts[p], starts[p + 1]):
            for f in range(starts[p], starts[p] if repeats else e):
                if ids[f] == ids[e]:
                    return np.empty((0, 0), np.int32), np.empty((0, 0), np.float64)
            if values[e] > floor and (ranks[e] < 0 or ranks[e] <= k):
                j = starts[p] + m  # insertion sort, stable: after every entry with a logprob >= this one's
                while j > starts[p] and values[kept[j - 1]] < values[e]:
                    kept[j] = kept[j - 1]
                    j -= 1
                kept[j] = e
                m += 1
        counts[p] = min(m, k)
        width = max(width, counts[p])
    out_ids = np.full((positions, width), -1, np.int32)
    out_logprobs = np.full((positions, width), -np.inf, np.float64)
    for p in range(positions):
        for r in range(counts[p]):
            e = kept[starts[p] + r]
            out_ids[p, r] = ids[e]
            out_logprobs[p, r] = values[e]
    return out_ids, out_logprobs


@njit(cache=True, nogil=True)
def entry_values(positions, pos, ids, values, wanted):
    """Per position ``p``, the value of its entry with id ``wanted[p]`` (NaN: none; ``wanted[p] < 0``: skipped)."""
    out = np.full(positions, np.nan)
    for e in range(pos.shape[0]):
        if wanted[pos[e]] >= 0 and ids[e] == wanted[pos[e]]:
            out[pos[e]] = values[e]
    return out


@dataclass(frozen=True)
class Scanned:
    """All entries of a bulky array, in arrival order."""

    positions: int
    nulls: np.ndarray  # bool [positions]
    pos: np.ndarray  # int64 [entries]
    ids: np.ndarray  # int64 [entries]
    ranks: np.ndarray  # int64 [entries], -1: none given
    values: np.ndarray  # float64 [entries], the logprobs as sent

    def top(self, k: int, floor: float) -> tuple[np.ndarray, np.ndarray] | None:
        """``top_rows`` of these entries, logprobs above ``floor`` (None: a duplicate id)."""
        ids, logprobs = top_rows(self.positions, self.pos, self.ids, self.values, self.ranks, k, floor)
        return None if ids.shape[0] != self.positions else (ids, logprobs)


@dataclass(frozen=True)
class ScannedChat(Scanned):
    """A chat ``logprobs.content`` array: its top entries, and each position's actual token."""

    tokens: np.ndarray  # int64 [positions]
    token_values: np.ndarray  # float64 [positions], their logprobs as sent

    def top(self, k: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
        """``top_rows`` of these entries, logprobs above ``floor``; an id listed twice at a position is kept
        twice, as the general path keeps it."""
        return top_rows(self.positions, self.pos, self.ids, self.values, self.ranks, k, floor, True)


def _numbers(numbers: np.ndarray, ends: np.ndarray, count: int) -> np.ndarray | None:
    """The ``count`` JSON number texts of ``numbers`` (the i-th ends at ``ends[i]``) as float64, converted by
    Arrow: correctly rounded, as orjson's full decode is (``1e400``: infinite, as the standard library reads it);
    None when Arrow refuses one."""
    offsets = np.zeros(count + 1, np.int32)
    offsets[1:] = ends[:count]
    text = pa.Array.from_buffers(
        pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(numbers[: offsets[-1]])]
    )
    try:
        return text.cast(pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        return None


def scan_bulky(buf: np.ndarray, start: int, name: str) -> tuple[int, Scanned | None]:
    """The array ``name`` (a ``BULKY`` key) starting at ``buf[start]``: (index after it, its entries), or
    (-1, None) when its layout is not the one the scanners read."""
    capacity = (len(buf) - start) // 8 + 2  # an entry takes at least 8 bytes
    pos, ids, ranks, ends = (np.empty(capacity, np.int64) for _ in range(4))
    numbers = np.empty(len(buf) - start + 2, np.uint8)
    nulls = np.zeros((len(buf) - start) // 2 + 2, np.bool_)  # a position takes at least 2 bytes
    if name == "content":
        tokens, token_ends = np.empty(capacity, np.int64), np.empty(capacity, np.int64)
        token_numbers = np.empty(len(buf) - start + 2, np.uint8)
        status, end, positions, entries, _, _ = scan_chat_content(
            buf, start, pos, ids, numbers, ends, tokens, token_numbers, token_ends
        )
        if status != _OK:
            return -1, None
        values = _numbers(numbers, ends, entries)
        token_values = _numbers(token_numbers, token_ends, positions)
        if values is None or token_values is None:
            return -1, None
        ranks[:entries] = -1
        return end, ScannedChat(
            positions, nulls[:positions], pos[:entries], ids[:entries], ranks[:entries], values,
            tokens[:positions], token_values,
        )  # fmt: skip
    if name == "prompt_logprobs":
        status, end, positions, entries, _ = scan_prompt_logprobs(
            buf, start, pos, ids, ranks, numbers, ends, nulls
        )
    else:
        status, end, positions, entries, _ = scan_top_logprobs(buf, start, pos, ids, numbers, ends, nulls)
        ranks[:entries] = -1
    if status != _OK:
        return -1, None
    values = _numbers(numbers, ends, entries)
    if values is None:
        return -1, None
    return end, Scanned(positions, nulls[:positions], pos[:entries], ids[:entries], ranks[:entries], values)
