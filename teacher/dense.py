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
from llvmlite import ir
from numba import njit, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

_OK, _GIVE_UP = 0, 1
_KEY_LOGPROB = np.frombuffer(b"logprob", np.uint8)
_KEY_RANK = np.frombuffer(b"rank", np.uint8)
_KEY_DECODED = np.frombuffer(b"decoded_token", np.uint8)
_LOGPROB, _RANK, _DECODED = 0, 1, 2
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
    """A JSON array a scanner read, left undecoded (its bytes and its entries), in the place of a bulky array of
    a decoded body; ``decode`` gives the list the general path reads when the fast parsers decline it."""

    data: memoryview
    scanned: Scanned

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
    """A response body decoded (``loads``), its one bulky array (``BULKY``) left as a scanned ``RawArray`` when
    its layout allows (any other layout decoded as usual; for chat, the whole body at once); raises
    ``ValueError`` when the body is not JSON, the bulky array included. ``shape`` (a ``BULKY`` key, from the request) looks for that array
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
        if scanned is not None:
            holder[name] = RawArray(memoryview(content)[start:end], scanned)
            return body
        try:  # a layout the scanners do not read: decoded now, so that bytes that are not JSON fail as such
            holder[name] = loads(memoryview(content)[start:end])
        except ValueError:
            break  # the full decode names where
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
#
# The scanners and their helpers are compiled without numba's reference counting (``_nrt=False``: they allocate
# nothing, and the caller holds the arrays): with it, every call of a helper that takes an array counted a
# reference up and down (two atomic operations), inlined or not, and the counts kept LLVM from inlining the
# helper. So the scanners make no calls at all: LLVM inlines the smallest helpers (``_ws``, ``_is``,
# ``_is_null``), numba the others (``_inlined``; inlining by numba makes the first compile slower, ~8 s, so it is
# kept to those LLVM leaves alone). A scanner slower than before may have lost an inlining: ``inspect_llvm``
# lists its calls.

_scanner = njit(cache=True, nogil=True, _nrt=False)
_inlined = njit(cache=True, nogil=True, _nrt=False, inline="always")


@intrinsic
def _word(typingctx, buf, i):
    """The 8 bytes at ``buf[i]`` as one little-endian uint64, unchecked: the caller makes sure that
    ``i + 8 <= len(buf)``. Compared with a ``_spelled`` constant, it matches 8 bytes at once; ``_digit_run`` and
    ``_digits_value`` read 8 digits at once."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load(
            builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer()), align=1
        )

    return types.uint64(buf, types.intp), codegen


@intrinsic
def _put_word(typingctx, out, i, word):
    """Store the uint64 ``word`` at ``out[i:i + 8]``, unchecked."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store(
            args[2], builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer()), align=1
        )
        return context.get_dummy_value()

    return types.none(out, types.intp, types.uint64), codegen


def _spelled(text: bytes) -> np.uint64:
    """The ``_word`` of ``text`` (at most 8 bytes, the rest zero)."""
    return np.uint64(int.from_bytes(text, "little"))


_ZEROS, _LOW_7_BITS, _ADD_118, _HIGH_BITS = (_spelled(bytes([c] * 8)) for c in (0x30, 0x7F, 0x76, 0x80))
_SEVEN_BYTES = _spelled(b"\xff" * 7)
_3, _6, _8, _16, _32 = np.uint64(3), np.uint64(6), np.uint64(8), np.uint64(16), np.uint64(32)
_TEN, _EVEN_BYTES = np.uint64(10), np.uint64(0x000000FF000000FF)
_100_1000000, _1_10000 = np.uint64(100 + (1000000 << 32)), np.uint64(1 + (10000 << 32))
_W_TOKEN_ID = _spelled(b"token_id")
# The keys as vLLM spells them (compact JSON), quotes and colon included: matched at once.
_W_LOGPROB, _W_OGPROB_COLON = _spelled(b'"logprob'), _spelled(b'ogprob":')
_W_RANK_COLON = _spelled(b'"rank":')
_W_DECODED, _W_TOKEN_COLON = _spelled(b'"decoded'), _spelled(b'_token":')


@_inlined
def _padded_word(buf, i):
    """``_word``, those of the 8 bytes past the end of ``buf`` read as 0."""
    n = buf.shape[0]
    if i + 8 <= n:
        return _word(buf, i)
    word = np.uint64(0)
    for j in range(i, n):
        word |= np.uint64(buf[j]) << np.uint64(8 * (j - i))
    return word


@_scanner
def _ws(buf, i):
    n = buf.shape[0]
    while i < n and (buf[i] == 32 or buf[i] == 9 or buf[i] == 10 or buf[i] == 13):
        i += 1
    return i


@_scanner
def _is(buf, start, end, key):
    if end - start != key.shape[0]:
        return False
    for j in range(key.shape[0]):  # noqa: SIM110 (a loop numba compiles)
        if buf[start + j] != key[j]:
            return False
    return True


@_inlined
def _digit_run(buf, i):
    """How many digits start at ``buf[i]``. Eight bytes at a time: ``t`` holds their distances from ``0``, and
    the high bit of each byte of ``other`` is set where one is above 9 (the add carries into no other byte), so
    a run of digits costs no branch per digit."""
    n = buf.shape[0]
    j = i
    while j + 8 <= n:
        t = _word(buf, j) ^ _ZEROS
        other = (((t & _LOW_7_BITS) + _ADD_118) | t) & _HIGH_BITS
        if other:
            return j - i + np.int64(trailing_zeros(other) >> _3)
        j += 8
    while j < n and 48 <= buf[j] <= 57:
        j += 1
    return j - i


@_inlined
def _fraction_run(buf, i):
    """``_digit_run`` for the fraction of a logprob (15 to 17 digits, mostly): 24 bytes at once, where the loop
    of ``_digit_run`` would end after two or three words, a mispredicted branch every other number. ``z`` is 64
    for a word of digits only (``z >> 6`` is 1 then, else 0): the run ends ``z1``, 64 + ``z2`` or 128 + ``z3``
    bits in, picked without a branch."""
    n = buf.shape[0]
    if i + 24 > n:
        return _digit_run(buf, i)
    t1, t2, t3 = _word(buf, i) ^ _ZEROS, _word(buf, i + 8) ^ _ZEROS, _word(buf, i + 16) ^ _ZEROS
    z1 = trailing_zeros((((t1 & _LOW_7_BITS) + _ADD_118) | t1) & _HIGH_BITS)
    z2 = trailing_zeros((((t2 & _LOW_7_BITS) + _ADD_118) | t2) & _HIGH_BITS)
    z3 = trailing_zeros((((t3 & _LOW_7_BITS) + _ADD_118) | t3) & _HIGH_BITS)
    if z1 & z2 & z3 == 64:  # 24 digits
        return 24 + _digit_run(buf, i + 24)
    return np.int64((z1 + (z1 >> _6) * (z2 + (z2 >> _6) * z3)) >> _3)


@_inlined
def _digits_value(buf, i, count):
    """The integer spelled by the ``count`` (1 to 18) digits at ``buf[i]``. Up to 8 of them at once: shifted to
    the top of a word (after as many zeros), their bytes are summed by pairs, then the pairs, then the
    quadruples, each by one multiply."""
    if count <= 8 and i + 8 <= buf.shape[0]:
        t = (_word(buf, i) ^ _ZEROS) << np.uint64(64 - 8 * count)
        t = t * _TEN + (t >> _8)
        return np.int64(((t & _EVEN_BYTES) * _100_1000000 + ((t >> _16) & _EVEN_BYTES) * _1_10000) >> _32)
    value = 0
    for j in range(i, i + count):
        value = value * 10 + (buf[j] - 48)
    return value


@_inlined
def _copy_number(buf, i, numbers, o):
    """Copy the JSON number at ``buf[i]`` to ``numbers[o]``; (index after it, new o), or (-1, o) when none
    starts there (what JSON does not spell a number: ``+1``, ``01``, ``.5``, ``1.``), or for ``-0``, an integer
    JSON reads as 0 where a float parser keeps the sign. Copied as three words when it fits (a float's 17
    digits, sign, point and exponent take at most 24 bytes) and both arrays have room for them."""
    n = buf.shape[0]
    j = i + 1 if i < n and buf[i] == 45 else i
    count = _digit_run(buf, j)
    if count == 0 or (count > 1 and buf[j] == 48):
        return -1, o  # no digits, or 01
    j += count
    integer = j
    if j < n and buf[j] == 46:
        count = _fraction_run(buf, j + 1)
        if count == 0:
            return -1, o  # 1.
        j += 1 + count
    if j < n and (buf[j] == 101 or buf[j] == 69):
        j += 1
        if j < n and (buf[j] == 43 or buf[j] == 45):
            j += 1
        count = _digit_run(buf, j)
        if count == 0:
            return -1, o  # 1e
        j += count
    elif j == integer and j - i == 2 and buf[i] == 45 and buf[i + 1] == 48:
        return -1, o  # -0
    size = j - i
    if size <= 24 and i + 24 <= n and o + 24 <= numbers.shape[0]:
        _put_word(numbers, o, _word(buf, i))
        _put_word(numbers, o + 8, _word(buf, i + 8))
        _put_word(numbers, o + 16, _word(buf, i + 16))
    else:
        for m in range(size):
            numbers[o + m] = buf[i + m]
    return j, o + size


@_inlined
def _token_id_string(buf, i):
    """(id, index after) of the string ``"token_id:N"`` at ``buf[i]`` (N: 1 to 18 digits), else (-1, i)."""
    n = buf.shape[0]
    if i + 10 > n or _word(buf, i + 1) != _W_TOKEN_ID or buf[i + 9] != 58:
        return -1, i
    count = _digit_run(buf, i + 10)
    end = i + 10 + count
    if count == 0 or count > 18 or end >= n or buf[end] != 34:
        return -1, i
    return _digits_value(buf, i + 10, count), end + 1


@_scanner
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
                    count = _digit_run(buf, i + 1)
                    if count == 0 or count > 18 or i + 1 + count >= n or buf[i + 1 + count] != 34:
                        return _GIVE_UP, -1, 0, 0, 0  # not only digits (or none, or too many)
                    token = _digits_value(buf, i + 1, count)
                    i = _ws(buf, i + 2 + count)
                    if i >= n or buf[i] != 58:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i + 1)
                    if i >= n or buf[i] != 123:
                        return _GIVE_UP, -1, 0, 0, 0
                    i = _ws(buf, i + 1)
                    rank, has_logprob = -1, False
                    while True:  # fields
                        word = _word(buf, i) if i + 16 <= n else np.uint64(0)  # compact keys: read at once
                        if word == _W_LOGPROB and _word(buf, i + 2) == _W_OGPROB_COLON:
                            key, i = _LOGPROB, _ws(buf, i + 10)
                        elif word & _SEVEN_BYTES == _W_RANK_COLON:
                            key, i = _RANK, _ws(buf, i + 7)
                        elif word == _W_DECODED and _word(buf, i + 8) == _W_TOKEN_COLON:
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
                                count = _digit_run(buf, i)
                                if count == 0 or count > 18:
                                    return _GIVE_UP, -1, 0, 0, 0
                                rank = _digits_value(buf, i, count)
                                i += count
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


@_scanner
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


@_scanner
def _is_null(buf, i):
    return (
        i + 4 <= buf.shape[0]
        and buf[i] == 110
        and buf[i + 1] == 117
        and buf[i + 2] == 108
        and buf[i + 3] == 108
    )


# The keys of chat logprob objects; compact, with their colon: matched at once.
_CHAT_TOKEN, _CHAT_LOGPROB, _CHAT_BYTES, _CHAT_TOP = 0, 1, 2, 3
_W_TOKEN, _W_BYTES = _spelled(b'"token"'), _spelled(b'"bytes"')
_W_LOGPROB_QUOTE, _W_TOP_LOG, _W_OGPROBS = _spelled(b'logprob"'), _spelled(b'"top_log'), _spelled(b'ogprobs"')
_W_TOKEN_KEY, _W_BYTES_KEY = _spelled(b'"token":'), _spelled(b'"bytes":')


@_inlined
def _chat_key(buf, i):
    """(which ``_CHAT_*`` key starts at ``buf[i]``, where its value starts: after the colon); (-1, -1): another
    key (escapes included), none, or no colon after it. The compact spellings (``"token":``) are tried first."""
    word = _padded_word(buf, i)
    if word == _W_TOKEN_KEY:
        return _CHAT_TOKEN, _ws(buf, i + 8)
    if word == _W_LOGPROB and _padded_word(buf, i + 2) == _W_OGPROB_COLON:
        return _CHAT_LOGPROB, _ws(buf, i + 10)
    if word == _W_BYTES_KEY:
        return _CHAT_BYTES, _ws(buf, i + 8)
    if word & _SEVEN_BYTES == _W_TOKEN:
        which, i = _CHAT_TOKEN, _ws(buf, i + 7)
    elif word == _W_LOGPROB and _padded_word(buf, i + 1) == _W_LOGPROB_QUOTE:
        which, i = _CHAT_LOGPROB, _ws(buf, i + 9)
    elif word & _SEVEN_BYTES == _W_BYTES:
        which, i = _CHAT_BYTES, _ws(buf, i + 7)
    elif word == _W_TOP_LOG and _padded_word(buf, i + 6) == _W_OGPROBS:
        which, i = _CHAT_TOP, _ws(buf, i + 14)
    else:
        return -1, -1
    if i >= buf.shape[0] or buf[i] != 58:
        return -1, -1
    return which, _ws(buf, i + 1)


@_inlined
def _byte_list_end(buf, i):
    """The index after the list of integers 0..255 at ``buf[i] == '['`` (-1: anything else)."""
    n = buf.shape[0]
    i = _ws(buf, i + 1)
    if i < n and buf[i] == 93:
        return i + 1
    while True:
        count = _digit_run(buf, i)
        if count == 0 or count > 3 or (count > 1 and buf[i] == 48):  # JSON spells no leading zero
            return -1
        if _digits_value(buf, i, count) > 255:
            return -1
        i = _ws(buf, i + count)
        if i < n and buf[i] == 44:
            i = _ws(buf, i + 1)
        elif i < n and buf[i] == 93:
            return i + 1
        else:
            return -1


_OBJECT, _FIELD, _AFTER_VALUE = 0, 1, 2  # where scan_chat_content is: an object's start, a key, after a value


@_scanner
def scan_chat_content(buf, start, pos, ids, numbers, ends, tokens, token_numbers, token_ends):
    """Chat ``logprobs.content`` of a token-id answer at ``buf[start]``: ``[{"token": "token_id:N", "logprob": x,
    "bytes": [...] | null, "top_logprobs": [{"token", "logprob", "bytes"}, ...] | null}, ...]`` (fields in any
    order; ``bytes`` and ``top_logprobs`` optional; ``bytes`` checked and skipped: a token named by its id takes
    the tokenizer's bytes). Fills ``tokens[p]`` with each position's token id and its logprob text into
    ``token_numbers`` (ending at ``token_ends[p]``), and its top entries as ``scan_top_logprobs``. Returns (status, index after the array,
    positions, entries, bytes of numbers, bytes of token numbers).

    One loop reads both levels (a content entry, an entry of its ``top_logprobs``): each helper is inlined
    where it is called, so a helper per object or field, called from two places, would double the code."""
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
            if state == _AFTER_VALUE and i < n and buf[i] == 44:  # compact: the next key at once
                i, state = _ws(buf, i + 1), _FIELD
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
    unless ``repeats`` (entries of a list, kept as they come). Ids are the scanners' digits (>= 0); a repeat is
    found by stamping each id with its position (``last_seen``), not by comparing every pair of entries."""
    starts = np.zeros(positions + 1, np.int64)
    top_id = 0
    for e in range(pos.shape[0]):
        starts[pos[e] + 1] += 1
        top_id = max(top_id, ids[e])
    for p in range(positions):
        starts[p + 1] += starts[p]
    last_seen = np.zeros(0 if repeats else top_id + 1, np.int32)  # 1 + the last position listing each id
    width = 1
    kept = np.empty(pos.shape[0], np.int64)
    counts = np.zeros(positions, np.int64)
    for p in range(positions):
        m = 0
        for e in range(starts[p], starts[p + 1]):
            if not repeats:
                if last_seen[ids[e]] == p + 1:
                    return np.empty((0, 0), np.int32), np.empty((0, 0), np.float64)
                last_seen[ids[e]] = p + 1
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
