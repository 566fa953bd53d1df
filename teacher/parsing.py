"""Pure parsers of OpenAI-compatible response bodies (plain JSON dicts) into per-position top-k.

Shapes handled (the documented ones):

- chat completions: ``choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}]}``; ``bytes`` carries the UTF-8 bytes of tokens that are fragments of a multi-byte character, except
  for a token spelled ``"token_id:123"`` when the tokenizer is given: its bytes are the tokenizer's (vLLM sends
  there the bytes of the string ``"token_id:123"``, or of a lossy decoded token).
- legacy completions: ``choices[0].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}``; with ``echo`` the prompt's tokens come first and the first position's ``top_logprobs`` is null.
  OpenAI spells a fragment token ``"bytes:\\xe2\\x80"``; vLLM with ``return_tokens_as_token_ids`` spells every
  token ``"token_id:123"``.
- vLLM ``prompt_logprobs`` extension: ``choices[0].prompt_logprobs = [null, {"<id>": {logprob, rank,
  decoded_token}}, ...]``: per prompt position the top-k plus the actual prompt token (k or k + 1 entries).
- the local teacher's ``return_logits`` extension: raw logits beside the logprobs.

A server that decodes a fragment of a multi-byte character to U+FFFD (vLLM, the local teacher) loses its bytes;
they are recovered from the token id when the server gave one and the caller passes ``resolve`` (teacher id ->
bytes, from the teacher's tokenizer). OpenAI's ``-9999`` "not returned" sentinel is dropped; fewer than k
entries is fine (k varies per position).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import numpy as np
import orjson

from teacher.dense import RawArray, Scanned, ScannedChat, decoded_array, entry_values

SENTINEL_LOGPROB = -9999.0
Resolve = Callable[[int], bytes]
Samples = tuple[list["Token"], list[int]]  # distinct tail samples of one position and the draws of each


class ResponseShapeError(ValueError):
    """A response body that does not have the documented shape; the message names the field."""


class ShiftedScoresError(ResponseShapeError):
    """The server's echo-mode scores are one position late: its own evidence (usage, text_offset) says so."""


LOGPROB_TOLERANCE = 1e-4  # a logprob above 0 by at most this much is rounding, stored as 0


@dataclass(frozen=True)
class Token:
    """One token as the server reported it: its bytes (None when unknown), its id if given, its raw logit."""

    data: bytes | None
    id: int | None
    logprob: float
    logit: float | None = None


@dataclass(frozen=True)
class DenseTopK(Sequence[list[Token]]):
    """Every position's top-k as arrays: ``ids`` [n, K] (-1: no entry), ``logprobs`` [n, K] float64 (-inf: no
    entry), each row sorted by decreasing logprob. Indexing gives a row as ``Token`` objects (bytes from
    ``resolve``), so code written for lists of tokens reads it unchanged."""

    ids: np.ndarray
    logprobs: np.ndarray
    resolve: Resolve

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> list[Token]: ...
    @overload
    def __getitem__(self, index: slice) -> DenseTopK: ...
    def __getitem__(self, index: int | slice) -> list[Token] | DenseTopK:
        if isinstance(index, slice):
            return DenseTopK(self.ids[index], self.logprobs[index], self.resolve)
        return [
            Token(self.resolve(int(t)), int(t), float(lp))
            for t, lp in zip(self.ids[index], self.logprobs[index], strict=True)
            if t >= 0
        ]

    def __iter__(self) -> Iterator[list[Token]]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class DenseTokens(Sequence[Token]):
    """The tokens of a fast-parsed answer as arrays: ``ids`` [n] (every id known), ``logprobs`` [n] float64
    (``SENTINEL_LOGPROB`` where the server gave none) and ``data``, each token's (non-empty) bytes as the
    tokenizer's ``resolve`` gives them (``resolved``: never the server's spelling). Indexing
    gives ``Token`` objects, so code written for lists of tokens reads it unchanged; ``build_record`` reads the
    arrays (no Python object per token)."""

    ids: np.ndarray
    logprobs: np.ndarray
    data: list[bytes]

    def __len__(self) -> int:
        return len(self.data)

    @overload
    def __getitem__(self, index: int) -> Token: ...
    @overload
    def __getitem__(self, index: slice) -> DenseTokens: ...
    def __getitem__(self, index: int | slice) -> Token | DenseTokens:
        if isinstance(index, slice):
            return DenseTokens(self.ids[index], self.logprobs[index], self.data[index])
        return Token(self.data[index], int(self.ids[index]), float(self.logprobs[index]))

    def __iter__(self) -> Iterator[Token]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def resolved(cls, ids: Sequence[int], logprobs: np.ndarray, resolve: Resolve) -> DenseTokens | None:
        """Tokens whose bytes come from ``resolve``; None when an id is negative or spells nothing (the general
        path then handles them, with ``teacher.fragments``)."""
        if len(ids) and min(ids) < 0:
            return None
        data = list(map(resolve, ids))
        if not all(data):
            return None
        return cls(np.asarray(ids, np.int64), logprobs, data)


@dataclass
class Parsed:
    """The teacher's answer for one sample, before teacher-vocab ids are assigned.

    ``tokens[i]`` is the i-th token of ``text``; ``candidates[i]`` its top-k (sorted by decreasing logprob; a
    ``DenseTopK`` from the fast parsers of token-id answers, lists of tokens otherwise);
    ``samples[i]`` its tail samples (the local teacher's ``return_samples``: distinct tokens and their counts),
    None where the position has none; ``samples`` is None when they were not asked for.
    """

    text: str
    tokens: list[Token] | DenseTokens
    candidates: list[list[Token]] | DenseTopK
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    samples: list[Samples | None] | None = None


def decode_token_string(token: str) -> tuple[bytes | None, int | None]:
    """Bytes and id of a token string: ``token_id:N`` (id only), ``bytes:\\xNN..`` (raw bytes), a string with
    U+FFFD (bytes lost), else its UTF-8."""
    if token.startswith("token_id:"):
        try:
            return None, int(token[len("token_id:") :])
        except ValueError:
            raise ResponseShapeError(f"token {token!r}: 'token_id:' not followed by an integer") from None
    if token.startswith("bytes:"):
        escapes = token[len("bytes:") :]
        if "'" in escapes or "\n" in escapes:
            raise ResponseShapeError(f"token {token!r}: 'bytes:' not followed by \\xNN escapes")
        try:
            return ast.literal_eval(f"b'{escapes}'"), None
        except (ValueError, SyntaxError):
            raise ResponseShapeError(f"token {token!r}: 'bytes:' not followed by \\xNN escapes") from None
    if "\ufffd" in token or token == "":  # lossy, or a fragment / over-long token sent as ""
        return None, None
    return token.encode("utf-8"), None


def make_token(
    token: str,
    logprob: float,
    resolve: Resolve | None,
    data: bytes | None = None,
    token_id: int | None = None,
    logit: float | None = None,
) -> Token:
    """A token from its string (``data``/``token_id`` when the server gave them apart), with its bytes resolved
    from its id when the string does not carry them."""
    decoded, parsed_id = decode_token_string(token)
    token_id = token_id if token_id is not None else parsed_id
    data = data if data is not None else decoded
    if data is None and token_id is not None and resolve is not None:
        data = resolve(token_id)
    return Token(data, token_id, logprob, logit)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ResponseShapeError(f"{where}: expected a number, got {value!r}")
    return float(value)


def check_logprob(value: float, where: str) -> float:
    """A logprob as stored: finite and <= 0 (up to rounding), or the ``-9999`` sentinel / ``-inf`` (no entry)."""
    if math.isnan(value) or value == math.inf or value > LOGPROB_TOLERANCE:
        raise ResponseShapeError(f"{where}: a log-probability must be <= 0 and not NaN, got {value!r}")
    return min(value, 0.0)


def _logprob(value: Any, where: str) -> float:
    return check_logprob(_number(value, where), where)


def _checked(scanned: Scanned | None) -> Scanned | None:
    """Scanned entries with their logprobs as ``check_logprob`` stores them; None when one of them is refused
    (the general path then names it)."""
    if scanned is None:
        return None
    values = scanned.values
    if not np.all((values <= LOGPROB_TOLERANCE) | (values == -np.inf)):
        return None
    return replace(scanned, values=np.minimum(values, 0.0))


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ResponseShapeError(f"{where}: missing field '{key}'")
    return obj[key]


def _list(obj: Any, where: str) -> list:
    if not isinstance(obj, list):
        raise ResponseShapeError(f"{where}: expected a list, got {type(obj).__name__}")
    return obj


def top_k(entries: list[Token], k: int) -> list[Token]:
    """Drop the ``-9999`` sentinel, sort by decreasing logprob, keep at most ``k``."""
    kept = [e for e in entries if e.logprob > SENTINEL_LOGPROB + 0.5]
    kept.sort(key=lambda e: -e.logprob)
    return kept[:k]


def _first_choice(body: Any) -> dict:
    choices = _list(_field(body, "choices", "response"), "response.choices")
    if not choices or not isinstance(choices[0], dict):
        raise ResponseShapeError("response.choices: expected at least one choice object")
    return choices[0]


def _usage(body: dict) -> tuple[int, int]:
    usage = body.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _optional_number(value: Any, where: str) -> float | None:
    return None if value is None else _number(value, where)


# ---- chat completions ---------------------------------------------------------------------------------------


def _chat_token(item: Any, where: str, resolve: Resolve | None, logit: float | None = None) -> Token:
    token = _field(item, "token", where)
    if not isinstance(token, str):
        raise ResponseShapeError(f"{where}.token: expected a string")
    logprob = _logprob(_field(item, "logprob", where), f"{where}.logprob")
    raw = item.get("bytes")
    data = None
    if raw is None and "bytes" in item and token.strip(" ") == "":
        return Token(
            None, None, logprob, logit
        )  # a fragment of a character (or a long token) sent as "" / " "
    if raw is not None:
        try:
            data = bytes(_list(raw, f"{where}.bytes"))
        except (ValueError, TypeError):
            raise ResponseShapeError(f"{where}.bytes: expected a list of integers 0..255") from None
    if resolve is not None and token.startswith("token_id:"):
        data = None  # the tokenizer's: vLLM sends the bytes of "token_id:N", or of a lossy decoded token
    return make_token(token, logprob, resolve, data=data, logit=logit)


def _dense_chat(body: dict, choice: dict, raw: RawArray, k: int, resolve: Resolve | None) -> Parsed | None:
    """``parse_chat`` of a token-id answer from its undecoded ``logprobs.content`` (None: not that layout, or
    something the general path refuses; it reads the answer and names what is wrong)."""
    scanned = _checked(raw.scanned) if resolve is not None else None
    if resolve is None or not isinstance(scanned, ScannedChat):
        return None
    values = scanned.token_values
    if not np.all((values <= LOGPROB_TOLERANCE) | (values == -np.inf)):
        return None
    top = scanned.top(k, SENTINEL_LOGPROB + 0.5)
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if top is None or not isinstance(text, str):
        return None
    ids, values = scanned.tokens.tolist(), np.minimum(values, 0.0)
    tokens = DenseTokens.resolved(ids, values, resolve) or [
        Token(resolve(t), t, lp) for t, lp in zip(ids, values.tolist(), strict=True)
    ]  # a token spelling nothing (end of text): listed, for ``teacher.fragments``
    prompt_tokens, completion_tokens = _usage(body)
    candidates = DenseTopK(top[0], top[1], resolve)
    return Parsed(text, tokens, candidates, choice.get("finish_reason"), prompt_tokens, completion_tokens)


def parse_chat(body: Any, k: int, resolve: Resolve | None = None) -> Parsed:
    """A chat completion with ``logprobs: true, top_logprobs: k`` (generate mode)."""
    choice = _first_choice(body)
    logprobs = choice.get("logprobs")
    raw = logprobs.get("content") if isinstance(logprobs, dict) else None
    if isinstance(raw, RawArray):
        parsed = _dense_chat(body, choice, raw, k, resolve)
        if parsed is not None:
            return parsed
        logprobs = {**logprobs, "content": decoded_array(raw)}
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        raise ResponseShapeError("choices[0].logprobs.content: missing (did the server ignore logprobs?)")
    tokens, candidates = [], []
    for i, item in enumerate(logprobs["content"]):
        where = f"choices[0].logprobs.content[{i}]"
        tokens.append(_chat_token(item, where, resolve))
        tops = _list(item.get("top_logprobs") or [], f"{where}.top_logprobs")
        logits = _list(item.get("top_logits") or [], f"{where}.top_logits")
        if logits and len(logits) != len(tops):
            raise ResponseShapeError(
                f"{where}.top_logits: {len(logits)} entries for {len(tops)} top_logprobs"
            )
        entries = [
            _chat_token(
                t, f"{where}.top_logprobs[{j}]", resolve,
                _number(_field(logits[j], "logit", f"{where}.top_logits[{j}]"), f"{where}.top_logits[{j}]")
                if logits else None,
            )
            for j, t in enumerate(tops)
        ]  # fmt: skip
        candidates.append(top_k(entries, k))
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise ResponseShapeError("choices[0].message.content: expected a string")
    prompt_tokens, completion_tokens = _usage(body)
    return Parsed(text, tokens, candidates, choice.get("finish_reason"), prompt_tokens, completion_tokens)


# ---- legacy completions -------------------------------------------------------------------------------------


def _dense_completion_tokens(
    logprobs: dict, raw: RawArray, k: int, resolve: Resolve | None
) -> tuple[DenseTokens, DenseTopK] | None:
    """``_completion_tokens`` of a token-id echo answer from its undecoded ``top_logprobs`` (None: not that
    layout; the general path reads it)."""
    names, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if resolve is None or logprobs.get("top_logits") is not None:
        return None
    if not isinstance(names, list) or not isinstance(values, list) or len(names) != len(values):
        return None
    scanned = _checked(raw.scanned)
    if scanned is None or scanned.positions != len(names):
        return None
    top = scanned.top(k, SENTINEL_LOGPROB + 0.5)
    if top is None:
        return None
    token_ids = token_id_names(names)
    if token_ids is None or not set(map(type, values)) <= {float, int, type(None)}:
        return None
    logprobs = np.array(values, np.float64)  # None reads as NaN, which JSON cannot spell
    logprobs[np.isnan(logprobs)] = SENTINEL_LOGPROB
    if not np.all((logprobs <= LOGPROB_TOLERANCE) | (logprobs == -np.inf)):
        return None
    tokens = DenseTokens.resolved(token_ids, np.minimum(logprobs, 0.0), resolve)
    if tokens is None:
        return None
    return tokens, DenseTopK(top[0], top[1], resolve)


def _completion_tokens(
    logprobs: dict, k: int, resolve: Resolve | None
) -> tuple[list[Token] | DenseTokens, list[list[Token]] | DenseTopK]:
    raw = logprobs.get("top_logprobs")
    if isinstance(raw, RawArray):
        dense = _dense_completion_tokens(logprobs, raw, k, resolve)
        if dense is not None:
            return dense
        logprobs = {**logprobs, "top_logprobs": decoded_array(raw)}
    where = "choices[0].logprobs"
    names = _list(_field(logprobs, "tokens", where), f"{where}.tokens")
    values = _list(_field(logprobs, "token_logprobs", where), f"{where}.token_logprobs")
    tops = _list(_field(logprobs, "top_logprobs", where), f"{where}.top_logprobs")
    logits = logprobs.get("top_logits")
    logits = [None] * len(tops) if logits is None else _list(logits, f"{where}.top_logits")
    if not len(names) == len(values) == len(tops) == len(logits):
        raise ResponseShapeError(
            f"{where}: tokens/token_logprobs/top_logprobs(/top_logits) lengths differ "
            f"({len(names)}, {len(values)}, {len(tops)}, {len(logits)})"
        )
    tokens, candidates = [], []
    for i, (name, value, top, top_logits) in enumerate(zip(names, values, tops, logits, strict=True)):
        if not isinstance(name, str):
            raise ResponseShapeError(f"{where}.tokens[{i}]: expected a string")
        logprob = None if value is None else _logprob(value, f"{where}.token_logprobs[{i}]")
        tokens.append(make_token(name, SENTINEL_LOGPROB if logprob is None else logprob, resolve))
        if top is None:
            candidates.append([])
            continue
        if not isinstance(top, dict) or not (top_logits is None or isinstance(top_logits, dict)):
            raise ResponseShapeError(f"{where}.top_logprobs[{i}]: expected an object or null")
        entries = [
            make_token(
                t, _logprob(lp, f"{where}.top_logprobs[{i}][{t!r}]"), resolve,
                logit=None if top_logits is None else _optional_number(top_logits.get(t), f"{where}.top_logits[{i}]"),
            )
            for t, lp in top.items()
        ]  # fmt: skip
        candidates.append(top_k(entries, k))
    return tokens, candidates


def _prompt_length(
    tokens: Sequence[Token], prompt: str, offsets: np.ndarray | None, usage_prompt: int
) -> int:
    """How many leading tokens are the prompt's (echo puts the completion after them): the tokens that start
    before the prompt's end by ``text_offset`` (characters), else the usage's count when a token's bytes are
    unknown, else the tokens spelling exactly the prompt's bytes."""
    if offsets is not None:
        return int(np.count_nonzero(offsets < len(prompt)))
    target, total = len(prompt.encode("utf-8")), 0
    for i, token in enumerate(tokens):
        if total == target:
            return i
        if token.data is None and token.id is None and 0 < usage_prompt <= len(tokens):
            return usage_prompt
        if token.data is None:
            raise ResponseShapeError(
                f"choices[0].logprobs.tokens[{i}]: the token's bytes are unknown (a lossy token string): ask for "
                "token ids and give the teacher's tokenizer"
            )
        total += len(token.data)
    if total == target:
        return len(tokens)
    raise ResponseShapeError(
        f"choices[0].logprobs.tokens: the echoed tokens do not spell the prompt ({total} vs {target} bytes)"
    )


def _offsets(logprobs: dict, n: int) -> np.ndarray | None:
    """``text_offset`` as an array (int64; object for integers past 64 bits), checked."""
    raw = logprobs.get("text_offset")
    if raw is None:
        return None
    where = "choices[0].logprobs.text_offset"
    expected = f"{where}: expected {n} integer character offsets, one per token"
    if not isinstance(raw, list) or len(raw) != n:
        raise ResponseShapeError(expected)
    try:
        values = np.asarray(raw)
    except ValueError:  # nested lists of different lengths
        values = np.zeros(0, object)
    if values.ndim != 1 or values.dtype.kind != "i":  # checked one by one: booleans, integers past int64
        if not all(isinstance(o, int) for o in raw):
            raise ResponseShapeError(expected)
        values = np.array(raw, dtype=object)
    if (np.diff(values) < 0).any() or (n and values[0] != 0):
        raise ResponseShapeError(f"{where}: offsets must start at 0 and never decrease, got {raw[:8]}...")
    return values


def check_echo_alignment(body: dict, tokens: Sequence[Token], offsets: np.ndarray | None, text: Any) -> None:
    """Refuse an echo answer whose scores are shifted by one position, from the answer's own evidence: more
    tokens than ``usage`` accounts for, or a token listed at or after the end of the echoed text."""
    prompt_tokens, completion_tokens = _usage(body)
    accounted, n_tokens = prompt_tokens + completion_tokens, len(tokens)
    if prompt_tokens and n_tokens != accounted:
        raise ShiftedScoresError(
            f"the server listed {n_tokens} echoed tokens but its usage accounts for {accounted} "
            f"({prompt_tokens} prompt + {completion_tokens} completion): this server returns echo-mode "
            "prompt logprobs one position late; its scores cannot be used (use score_api = 'prompt_logprobs' "
            "or another server)"
        )
    last_spells_text = bool(tokens and tokens[-1].data)
    if (
        offsets is not None
        and len(offsets)
        and isinstance(text, str)
        and last_spells_text
        and offsets[-1] >= len(text)
    ):
        raise ShiftedScoresError(
            f"choices[0].logprobs.text_offset: token {len(offsets) - 1} starts at character {offsets[-1]}, "
            f"at or after the end of the {len(text)}-character text: this server lists one token too many in "
            "echo mode (its prompt logprobs are one position late); its scores cannot be used"
        )


def parse_completion(
    body: Any, k: int, echo_prompt: str | None = None, resolve: Resolve | None = None
) -> Parsed:
    """A legacy completion with ``logprobs: k``.

    Generate mode: every token is a completion token. Score mode (``echo_prompt`` given: the request used echo):
    only the tokens spelling the prompt are kept, the completion token the server added is cut off.
    """
    choice = _first_choice(body)
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        raise ResponseShapeError("choices[0].logprobs: missing (did the server ignore logprobs?)")
    tokens, candidates = _completion_tokens(logprobs, k, resolve)
    prompt_tokens, completion_tokens = _usage(body)
    if echo_prompt is None:
        text = choice.get("text")
        if not isinstance(text, str):
            raise ResponseShapeError("choices[0].text: expected a string")
        return Parsed(text, tokens, candidates, choice.get("finish_reason"), prompt_tokens, completion_tokens)
    offsets = _offsets(logprobs, len(tokens))
    check_echo_alignment(body, tokens, offsets, choice.get("text"))
    n = _prompt_length(tokens, echo_prompt, offsets, prompt_tokens)
    return Parsed(echo_prompt, tokens[:n], candidates[:n], None, prompt_tokens, 0)


# ---- vLLM prompt_logprobs -----------------------------------------------------------------------------------


def _prompt_entries(
    raw: dict, where: str, k: int, resolve: Resolve | None
) -> tuple[list[Token], dict[int, Token]]:
    """The top-k of one prompt position, and every entry by id (the actual token may rank below k)."""
    by_id: dict[int, Token] = {}
    in_top: list[Token] = []
    for key, entry in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ResponseShapeError(f"{where}: key {key!r} is not a token id") from None
        logprob = _logprob(_field(entry, "logprob", f"{where}[{key}]"), f"{where}[{key}].logprob")
        decoded = entry.get("decoded_token")
        logit = _optional_number(entry.get("logit"), f"{where}[{key}].logit")
        token = make_token(
            decoded if isinstance(decoded, str) else "\ufffd", logprob, resolve, None, token_id, logit
        )
        by_id[token_id] = token
        rank = entry.get("rank")
        if rank is None or int(rank) <= k:
            in_top.append(token)
    return top_k(in_top, k), by_id


def _actual_ids_from_text(positions: list[dict[int, Token]], prompt: bytes) -> list[int] | None:
    """Which entry of positions 1..n-1 is the prompt's token, found by spelling the prompt backwards.

    Needed because ``prompt_logprobs`` does not say which entry is the prompt token when it ranks within k.
    Candidates whose bytes end the remaining prompt are tried, longest first (a memoized search); position 0
    takes whatever bytes are left.
    """
    failed: set[tuple[int, int]] = set()

    def search(i: int, end: int) -> list[int] | None:
        if i == 0:
            return [] if end > 0 else None
        if (i, end) in failed:
            return None
        for token in sorted(positions[i].values(), key=lambda t: -len(t.data or b"")):
            if token.data and prompt[:end].endswith(token.data):
                rest = search(i - 1, end - len(token.data))
                if rest is not None:
                    return [*rest, token.id]
        failed.add((i, end))
        return None

    return search(len(positions) - 1, len(prompt))


def token_id_names(names: list) -> list[int] | None:
    """The ids of a list of ``"token_id:N"`` strings (the usual spelling), read at once: joined, the prefix
    counted at each name's start and nowhere else, the numbers read as one JSON array of exactly one integer per
    name. None for any other spelling (``decode_token_string`` then reads them one by one)."""
    n = len(names)
    try:
        joined = ",".join(names)
    except TypeError:  # not all strings
        return None
    if n and not (
        joined.startswith("token_id:")
        and joined.count("token_id:") == n
        and joined.count(",token_id:") == n - 1
    ):
        return None
    try:
        ids = orjson.loads("[" + joined.replace("token_id:", "") + "]")
    except orjson.JSONDecodeError:
        return None
    return ids if len(ids) == n and set(map(type, ids)) <= {int} else None  # no bool, float or list


def _echoed_ids(choice: dict, n: int) -> list[int] | None:
    """Prompt token ids from an ``echo`` + ``return_tokens_as_token_ids`` answer sent with the request."""
    logprobs = choice.get("logprobs")
    names = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(names, list) or len(names) < n:
        return None
    fast = token_id_names(names[:n])
    if fast is not None:
        return fast
    ids = [decode_token_string(t)[1] if isinstance(t, str) else None for t in names[:n]]
    return None if any(i is None for i in ids) else ids


def _prompt_ids(body: dict, choice: dict, n: int) -> list[int] | None:
    """The prompt's token ids, when the answer names them (``prompt_token_ids`` or an id echo)."""
    named = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
    ids = [int(t) for t in _list(named, "choices[0].prompt_token_ids")] if named else _echoed_ids(choice, n)
    if ids is None:
        return None
    if len(ids) != n:
        raise ResponseShapeError(
            f"choices[0].prompt_token_ids: {len(ids)} ids for {n} prompt_logprobs positions"
        )
    return ids


def _prompt_parsed(
    body: dict,
    prompt: str,
    ids: list[int],
    later: list[Token],
    candidates: Sequence[list[Token]],
    resolve: Resolve | None,
) -> Parsed:
    """The answer from the prompt's ids and tokens after the first: the first token spells what they leave."""
    prompt_bytes = prompt.encode("utf-8")
    first_bytes = prompt_bytes[: len(prompt_bytes) - sum(len(t.data or b"") for t in later)]
    first = Token(first_bytes, ids[0] if ids[0] >= 0 else None, 0.0)
    if resolve is not None and first.id is not None and resolve(first.id) != first_bytes:
        raise ResponseShapeError("choices[0].prompt_logprobs: the prompt tokens do not spell the prompt")
    tokens = [first, *later]
    if any(t.data is None for t in later) or b"".join(t.data or b"" for t in tokens) != prompt_bytes:
        raise ResponseShapeError("choices[0].prompt_logprobs: the prompt tokens do not spell the prompt")
    prompt_tokens, _ = _usage(body)
    return Parsed(prompt, tokens, candidates, None, prompt_tokens, 0)


def _dense_prompt_logprobs(
    body: dict, choice: dict, raw: RawArray, k: int, prompt: str, resolve: Resolve | None
) -> Parsed | None:
    """``parse_prompt_logprobs`` of a token-id answer from its undecoded array (None: not that layout, or the
    prompt's ids are not named; the general path reads it)."""
    scanned = _checked(raw.scanned) if resolve is not None else None
    if scanned is None or not scanned.positions or not scanned.nulls[0] or scanned.nulls[1:].any():
        return None
    ids = _prompt_ids(body, choice, scanned.positions)
    top = scanned.top(k, SENTINEL_LOGPROB + 0.5)
    if ids is None or top is None or resolve is None:
        return None
    wanted = np.array(ids, np.int64)
    wanted[0] = -1
    actual = entry_values(scanned.positions, scanned.pos, scanned.ids, scanned.values, wanted)
    if np.isnan(actual[1:]).any():
        return None  # a position lacks the prompt token: the general path says which
    actual[0] = 0.0  # the first token has no prediction
    candidates = DenseTopK(top[0], top[1], resolve)
    tokens = DenseTokens.resolved(ids, actual, resolve)
    if tokens is None:
        later = [Token(resolve(t), t, lp) for t, lp in zip(ids[1:], actual[1:].tolist(), strict=True)]
        return _prompt_parsed(body, prompt, ids, later, candidates, resolve)
    if b"".join(tokens.data) != prompt.encode("utf-8"):
        raise ResponseShapeError("choices[0].prompt_logprobs: the prompt tokens do not spell the prompt")
    return Parsed(prompt, tokens, candidates, None, _usage(body)[0], 0)


def parse_prompt_logprobs(body: Any, k: int, prompt: str, resolve: Resolve | None = None) -> Parsed:
    """A vLLM completion with ``prompt_logprobs: k`` (score mode): the top-k at every prompt position."""
    choice = _first_choice(body)
    raw = choice.get("prompt_logprobs")
    if isinstance(raw, RawArray):
        parsed = _dense_prompt_logprobs(body, choice, raw, k, prompt, resolve)
        if parsed is not None:
            return parsed
        raw = decoded_array(raw)
    if not isinstance(raw, list) or not raw:
        raise ResponseShapeError("choices[0].prompt_logprobs: missing (does the server support it?)")
    if raw[0] is not None:
        raise ResponseShapeError("choices[0].prompt_logprobs[0]: expected null (no prediction for token 0)")
    candidates: list[list[Token]] = [[]]
    by_position: list[dict[int, Token]] = [{}]
    for i, entry in enumerate(raw[1:], start=1):
        where = f"choices[0].prompt_logprobs[{i}]"
        if not isinstance(entry, dict):
            raise ResponseShapeError(f"{where}: expected an object keyed by token id")
        top, by_id = _prompt_entries(entry, where, k, resolve)
        candidates.append(top)
        by_position.append(by_id)
    prompt_bytes = prompt.encode("utf-8")
    ids = _prompt_ids(body, choice, len(raw))
    if ids is not None:
        missing = [i for i in range(1, len(raw)) if ids[i] not in by_position[i]]
        if missing:
            raise ResponseShapeError(f"choices[0].prompt_logprobs[{missing[0]}]: lacks the prompt token")
    else:
        found = _actual_ids_from_text(by_position, prompt_bytes)
        if found is None:
            raise ResponseShapeError(
                "choices[0].prompt_logprobs: the tokens do not spell the prompt (lossy decoded_token strings? "
                "give the teacher's tokenizer, or use echo scoring)"
            )
        ids = [-1, *found]
    later = [by_position[i][ids[i]] for i in range(1, len(raw))]
    return _prompt_parsed(body, prompt, ids, later, candidates, resolve)


# ---- the local teacher's return_samples extension ------------------------------------------------------------


def _position_samples(raw: Any, where: str, draws: int, resolve: Resolve | None) -> Samples | None:
    """One position's ``{"ids": [...], "counts": [...]}`` (or null) as tokens and counts summing to ``draws``."""
    if raw is None:
        return None
    ids = _list(_field(raw, "ids", where), f"{where}.ids")
    counts = _list(_field(raw, "counts", where), f"{where}.counts")
    if len(ids) != len(counts):
        raise ResponseShapeError(f"{where}: {len(ids)} ids for {len(counts)} counts")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in [*ids, *counts]):
        raise ResponseShapeError(f"{where}: ids and counts must be non-negative integers")
    if ids and sum(counts) != draws:
        raise ResponseShapeError(f"{where}: counts sum to {sum(counts)}, expected {draws} draws")
    tokens = [Token(resolve(i) if resolve is not None else None, i, math.nan) for i in ids]
    return tokens, [int(c) for c in counts]


def _samples_list(raw: Any, where: str, draws: int, resolve: Resolve | None) -> list[Samples | None]:
    if raw is None:
        raise ResponseShapeError(f"{where}: missing (does the server support return_samples?)")
    return [_position_samples(r, f"{where}[{i}]", draws, resolve) for i, r in enumerate(_list(raw, where))]


def completion_samples(body: Any, draws: int, resolve: Resolve | None) -> list[Samples | None] | None:
    """Legacy completions' ``logprobs.samples`` (aligned with ``logprobs.tokens``); None when ``draws`` is 0."""
    if not draws:
        return None
    logprobs = _first_choice(body).get("logprobs")
    raw = logprobs.get("samples") if isinstance(logprobs, dict) else None
    return _samples_list(raw, "choices[0].logprobs.samples", draws, resolve)


def prompt_samples(body: Any, draws: int, resolve: Resolve | None) -> list[Samples | None] | None:
    """``choices[0].prompt_samples`` (aligned with ``prompt_logprobs``); None when ``draws`` is 0."""
    if not draws:
        return None
    raw = _first_choice(body).get("prompt_samples")
    return _samples_list(raw, "choices[0].prompt_samples", draws, resolve)


def chat_samples(body: Any, draws: int, resolve: Resolve | None) -> list[Samples | None] | None:
    """Each chat ``content`` entry's ``samples``; None when ``draws`` is 0."""
    if not draws:
        return None
    logprobs = _first_choice(body).get("logprobs")
    content = decoded_array(logprobs.get("content")) if isinstance(logprobs, dict) else None
    where = "choices[0].logprobs.content"
    out = []
    for i, entry in enumerate(_list(content, where)):
        if not isinstance(entry, dict) or "samples" not in entry:
            raise ResponseShapeError(
                f"{where}[{i}].samples: missing (does the server support return_samples?)"
            )
        out.append(_position_samples(entry["samples"], f"{where}[{i}].samples", draws, resolve))
    return out


def with_samples(parsed: Parsed, samples: list[Samples | None] | None) -> Parsed:
    """``parsed`` with the samples of its positions (a list aligned with the answer's tokens, which may run
    past them: echo's completion token)."""
    if samples is None:
        return parsed
    if len(samples) < len(parsed.tokens):
        raise ResponseShapeError(f"samples: {len(samples)} positions for {len(parsed.tokens)} tokens")
    return replace(parsed, samples=samples[: len(parsed.tokens)])
