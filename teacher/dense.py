"""The bulky arrays of score-mode answers, parsed without a Python object per top-k entry.

A score answer for a 1,000-token text carries ~21,000 top-k entries (~2 MB of JSON). Decoding it into dicts and
one ``Token`` per entry costs far more CPU than everything else the collector does, so ``decode_body`` scans the
one bulky array (``choices[0].prompt_logprobs``, or ``choices[0].logprobs.top_logprobs`` of an echo answer) in
the raw bytes with compiled loops (``scan_*``: ids, ranks and the number texts of all entries; the numbers are
converted by orjson, exactly as a full decode would), decodes the rest with orjson and leaves a ``RawArray`` (the
array's bytes and its entries) in the array's place. The parsers turn the entries into a
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
from numba import njit

_OK, _GIVE_UP = 0, 1
_KEY_LOGPROB = np.frombuffer(b"logprob", np.uint8)
_KEY_RANK = np.frombuffer(b"rank", np.uint8)
_KEY_DECODED = np.frombuffer(b"decoded_token", np.uint8)
_TOKEN_ID = np.frombuffer(b"token_id:", np.uint8)
# The bulky array of each answer shape: its key, and where it sits in the decoded body.
BULKY = {"prompt_logprobs": (b'"prompt_logprobs":', ()), "top_logprobs": (b'"top_logprobs":', ("logprobs",))}


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


def decode_body(content: bytes) -> Any:
    """A response body decoded (``loads``), its one bulky array (``BULKY``) left as a ``RawArray`` (scanned
    when its layout allows); raises ``ValueError`` when the body is not JSON."""
    for name, (key, path) in BULKY.items():
        at = content.find(key)
        if at < 0 or content.find(key, at + 1) >= 0:
            continue  # absent, or several (several choices): decoded in full
        start = _skip_ws(content, at + len(key))
        if start >= len(content) or content[start] != ord("["):
            continue
        buf = np.frombuffer(content, np.uint8)
        end, scanned = scan_bulky(buf, start, name)
        if scanned is None:
            end = int(array_end(buf, start))
        if end < 0:
            break  # cut short: the full decode names the error
        try:
            body = orjson.loads(content[:start] + b"null" + content[end:])
        except orjson.JSONDecodeError:
            return loads(content)
        try:
            holder = body["choices"][0]
            for step in path:
                holder = holder[step]
        except (KeyError, IndexError, TypeError):
            return loads(content)
        if not isinstance(holder, dict) or name not in holder or holder[name] is not None:
            return loads(content)
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
    """Copy the number text at ``buf[i]`` to ``numbers[o]`` followed by a comma; (index after it, new o), or
    (-1, o) when no number starts there."""
    n = buf.shape[0]
    j = i
    while j < n:
        c = buf[j]
        if (48 <= c <= 57) or c == 45 or c == 43 or c == 46 or c == 101 or c == 69:
            j += 1
        else:
            break
    if j == i:
        return -1, o
    for m in range(i, j):
        numbers[o] = buf[m]
        o += 1
    numbers[o] = 44
    return j, o + 1


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
def scan_prompt_logprobs(buf, start, pos, ids, ranks, numbers, nulls):
    """vLLM ``prompt_logprobs`` at ``buf[start]``: ``[null | {"<id>": {"logprob": x, "rank": r | null,
    "decoded_token": "token_id:N" | null}, ...}, ...]``. Fills one row per entry (position, id, rank or -1) and
    the logprob texts (comma-separated) into ``numbers``; ``nulls[p]`` marks null positions. Returns (status,
    index after the array, positions, entries, bytes of numbers)."""
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
                    end = _string_end(buf, i)
                    if end < 0:
                        return _GIVE_UP, -1, 0, 0, 0
                    token = _digits(buf, i + 1, end - 1)
                    i = _ws(buf, end)
                    if token < 0 or i >= n or buf[i] != 58:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i + 1)
                    if i >= n or buf[i] != 123:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i + 1)
                    rank, has_logprob = -1, False
                    while True:  # fields
                        if i >= n or buf[i] != 34:
                            return _GIVE_UP, -1, 0, 0, 0
                        key_end = _string_end(buf, i)
                        if key_end < 0:
                            return _GIVE_UP, -1, 0, 0, 0
                        key_start = i + 1
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
                        if _is(buf, key_start, key_end - 1, _KEY_LOGPROB):
                            if has_logprob:
                                return _GIVE_UP, -1, 0, 0, 0
                            i, o = _copy_number(buf, i, numbers, o)
                            if i < 0:
                                return _GIVE_UP, -1, 0, 0, 0
                            has_logprob = True
                        elif _is(buf, key_start, key_end - 1, _KEY_RANK):
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
                        elif _is(buf, key_start, key_end - 1, _KEY_DECODED):
                            if is_null:
                                i += 4
                            else:
                                spelled, i = _token_id_string(buf, i)
                                if spelled < 0:
                                    return _GIVE_UP, -1, 0, 0, 0
                        else:
                            return _GIVE_UP, -1, 0, 0, 0  # logits or anything else: the general path
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
                    pos[e], ids[e], ranks[e] = p, token, rank
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
def scan_top_logprobs(buf, start, pos, ids, numbers, nulls):
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
                    pos[e], ids[e] = p, token
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
def top_rows(positions, pos, ids, values, ranks, k, floor):
    """Per position: its entries with a logprob above ``floor`` and a rank within ``k`` (or none), sorted by
    decreasing logprob (ties in arrival order), the first ``k``. Returns (ids [P, K], logprobs [P, K]), K the
    widest row (at least 1), or a (0, 0) pair when an id repeats within a position (a duplicate JSON key)."""
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
            for f in range(starts[p], e):
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


def scan_bulky(buf: np.ndarray, start: int, name: str) -> tuple[int, Scanned | None]:
    """The array ``name`` (a ``BULKY`` key) starting at ``buf[start]``: (index after it, its entries), or
    (-1, None) when its layout is not the one the scanners read."""
    capacity = (len(buf) - start) // 8 + 2  # an entry takes at least 8 bytes
    pos, ids, ranks = (np.empty(capacity, np.int64) for _ in range(3))
    numbers = np.empty(len(buf) - start + 2, np.uint8)
    nulls = np.zeros((len(buf) - start) // 2 + 2, np.bool_)  # a position takes at least 2 bytes
    if name == "prompt_logprobs":
        status, end, positions, entries, used = scan_prompt_logprobs(
            buf, start, pos, ids, ranks, numbers, nulls
        )
    else:
        status, end, positions, entries, used = scan_top_logprobs(buf, start, pos, ids, numbers, nulls)
        ranks[:entries] = -1
    if status != _OK:
        return -1, None
    try:
        values = np.array(orjson.loads(b"[" + numbers[: max(used - 1, 0)].tobytes() + b"]"), np.float64)
    except orjson.JSONDecodeError:
        return -1, None
    if len(values) != entries:
        return -1, None
    return end, Scanned(positions, nulls[:positions], pos[:entries], ids[:entries], ranks[:entries], values)
