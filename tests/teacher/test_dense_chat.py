"""The fast path of chat answers (``teacher.dense`` scanning ``choices[0].logprobs.content`` of a token-id
answer) against the general path (the body decoded in full, one ``Token`` per entry): both store the same
record, and what the scanner does not read goes to the general path with the same outcome."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from storage.records import TeacherVocab, TopKRecord
from teacher.collect import PinnedIds, _dense_arrays, build_record
from teacher.dense import RawArray, decode_body
from teacher.inputs import WorkItem
from teacher.parsing import (
    DenseTopK,
    Parsed,
    ResponseShapeError,
    chat_samples,
    parse_chat,
    with_samples,
)
from tests.teacher.conftest import PLANTED_KEY, PROMPTS, Teacher
from tests.teacher.test_collect_e2e import run
from tests.teacher.test_parsing import SPLIT_VOCAB, any_id, mutated, same_stored, stored

RESOLVE = SPLIT_VOCAB.__getitem__


def _item(token: int, value: float, data: str, rng: np.random.Generator) -> dict:
    """One ``{token, logprob, bytes}`` object; ``data``: how its bytes are sent (the token's, null, vLLM's
    bytes of the string "token_id:N", or a mix)."""
    if data == "mixed":
        data = ["token", "null", "vllm"][int(rng.integers(3))]
    name = f"token_id:{token}"
    sent = {"token": list(SPLIT_VOCAB[token]), "null": None, "vllm": list(name.encode())}[data]
    return {"token": name, "logprob": value, "bytes": sent}


def _chat(seed: int, data: str = "token", reorder: bool = False) -> dict:
    """A token-id chat answer over ``SPLIT_VOCAB`` (split characters, ties, the sentinel, a logprob a hair above
    0, an id listed twice, positions with fewer entries than others, none, or null top_logprobs)."""
    rng = np.random.default_rng(seed)
    words = [[0], [2], [3, 4], [5, 6], [7], [8], [9, 5, 6], [10, 11]]  # whole characters
    ids = [t for w in rng.integers(0, len(words), 30) for t in words[w]]
    content = []
    for i, actual in enumerate(ids):
        width = [6, 6, 6, 3, 0][i % 5]
        others = [int(t) for t in rng.permutation(len(SPLIT_VOCAB))][:width]
        values = [float(v) for v in np.round(-rng.exponential(2.0, width), 1)]  # rounded: ties
        if width and i % 7 == 0:
            values[int(rng.integers(width))] = -9999.0
        if width and i % 11 == 0:
            values[0] = 5e-5  # rounding above 0: stored as 0
        if width and i % 13 == 0:
            others[-1] = others[0]  # an id listed twice
        entry = _item(
            actual, -9999.0 if i % 17 == 0 else float(np.round(-rng.exponential(1.0), 2)), data, rng
        )
        top = [_item(t, v, data, rng) for t, v in zip(others, values, strict=True)]
        entry["top_logprobs"] = None if i % 19 == 18 else top
        if reorder and i % 2:
            entry = dict(reversed(entry.items()))
        content.append(entry)
    text = b"".join(SPLIT_VOCAB[t] for t in ids).decode("utf-8")
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": {"content": content, "refusal": None},
              "finish_reason": "length"}  # fmt: skip
    usage = {"prompt_tokens": 9, "completion_tokens": len(ids), "total_tokens": 9 + len(ids)}
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice], "usage": usage}


def _same(fast: Parsed, general: Parsed) -> None:
    """Both answers parse to the same tokens, top-k, text and counts, and build the same record."""
    assert [(t.data, t.id, t.logprob, t.logit) for t in fast.tokens] == [
        (t.data, t.id, t.logprob, t.logit) for t in general.tokens
    ]
    assert list(fast.candidates) == list(general.candidates)
    assert (fast.text, fast.finish_reason, fast.prompt_tokens, fast.completion_tokens) == (
        general.text, general.finish_reason, general.prompt_tokens, general.completion_tokens,
    )  # fmt: skip
    assert fast.samples == general.samples
    a, b = _record(fast), _record(general)
    if isinstance(a, str) or isinstance(b, str):
        assert a == b  # both refused, for the same reason
        return
    for name in ("tokens", "topk_ids", "topk_logprobs", "token_logprobs", "topk_logits", "sample_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.sample_id == b.sample_id and a.text == b.text


def _record(parsed: Parsed) -> TopKRecord | str:
    """The record built from ``parsed``, or why it was refused."""
    try:
        return build_record(parsed, "p", "train", "m", "generate", {}, TeacherVocab())
    except ValueError as exc:
        return f"{type(exc).__name__}: {exc}"


LAYOUTS = {
    "default": {},
    "compact": {"separators": (",", ":")},
    "indented": {"indent": 1},
    "tabs": {"indent": "\t", "separators": (" ,", ":\t")},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("data", ["token", "null", "vllm", "mixed"])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_fast_chat_parser_stores_what_the_general_one_stores(layout: str, data: str, k: int) -> None:
    for seed in range(2):
        raw = json.dumps(_chat(seed, data, reorder=seed == 1), **LAYOUTS[layout]).encode()
        decoded = decode_body(raw)
        assert isinstance(decoded["choices"][0]["logprobs"]["content"], RawArray)
        fast = parse_chat(decoded, k, RESOLVE)
        assert isinstance(fast.candidates, DenseTopK)  # the fast path was taken
        assert _dense_arrays(fast, TeacherVocab(), PinnedIds()) is not None  # and build_record's dense one
        general = parse_chat(json.loads(raw), k, RESOLVE)
        assert not isinstance(general.candidates, DenseTopK)
        _same(fast, general)
        assert max(len(row) for row in fast.candidates) <= k


def test_bytes_of_token_ids_come_from_the_tokenizer() -> None:
    """vLLM sends the bytes of "token_id:N" (or of a lossy decoded token): the tokenizer's bytes are kept."""
    raw = json.dumps(_chat(3, "vllm")).encode()
    for body in (decode_body(raw), json.loads(raw)):
        parsed = parse_chat(body, 5, RESOLVE)
        assert all(t.data == SPLIT_VOCAB[t.id] for t in parsed.tokens)
        assert all(t.data == SPLIT_VOCAB[t.id] for row in parsed.candidates for t in row)


def test_without_a_tokenizer_the_general_path_reads_the_bytes() -> None:
    raw = json.dumps(_chat(4, "token")).encode()
    fast, general = parse_chat(decode_body(raw), 3), parse_chat(json.loads(raw), 3)
    assert not isinstance(fast.candidates, DenseTopK)
    _same(fast, general)


def _variants() -> list[tuple[str, Callable[[bytes], bytes]]]:
    """Bodies the scanner does not read (the general path does, or refuses them with its precise error)."""
    first = b'"token": "token_id:'
    return [
        ("top_logits", lambda b: b.replace(b'"top_logprobs": [', b'"top_logits": [], "top_logprobs": [', 1)),
        ("a logit", lambda b: b.replace(b'"bytes"', b'"logit": -1.5, "bytes"', 1)),
        ("token strings", lambda b: b.replace(b'"token": "token_id:2"', b'"token": " the"', 1)),
        ("an escaped key", lambda b: b.replace(b'"token":', b'"tok\\u0065n":', 1)),
        ("an escaped token", lambda b: b.replace(b'"token_id:2"', b'"token_id:\\u0032"', 1)),
        ("a positive logprob", lambda b: re.sub(rb'"logprob": -[0-9.]+', b'"logprob": 0.5', b, count=1)),
        (
            "a positive top logprob",
            lambda b: re.sub(rb'("top_logprobs": \[\{[^}]*"logprob": )-[0-9.]+', rb"\g<1>0.5", b, count=1),
        ),
        ("NaN", lambda b: re.sub(rb'"logprob": -[0-9.]+', b'"logprob": NaN', b, count=1)),
        ("-Infinity", lambda b: re.sub(rb'"logprob": -[0-9.]+', b'"logprob": -Infinity', b, count=1)),
        ("an integer logprob", lambda b: re.sub(rb'"logprob": -[0-9.]+', b'"logprob": -3', b, count=1)),
        ("a string logprob", lambda b: re.sub(rb'"logprob": -[0-9.]+', b'"logprob": "-1"', b, count=1)),
        ("no logprob", lambda b: re.sub(rb'"logprob": -[0-9.]+, ', b"", b, count=1)),
        ("no token", lambda b: re.sub(rb'"token": "token_id:\d+", ', b"", b, count=1)),
        (
            "a duplicate logprob",
            lambda b: re.sub(rb'"logprob": (-[0-9.]+)', rb'"logprob": -0.25, "logprob": \1', b, count=1),
        ),
        ("a duplicate token", lambda b: b.replace(first, b'"token": "token_id:7", ' + first, 1)),
        ("a byte above 255", lambda b: re.sub(rb'"bytes": \[\d+', b'"bytes": [256', b, count=1)),
        ("a leading zero", lambda b: re.sub(rb'"bytes": \[(\d+)', rb'"bytes": [0\1', b, count=1)),
        ("bytes as text", lambda b: re.sub(rb'"bytes": \[[\d, ]*\]', b'"bytes": "ab"', b, count=1)),
        ("a bad id", lambda b: b.replace(b'"token_id:2"', b'"token_id:x"', 1)),
        ("a null entry", lambda b: b.replace(b'"content": [{', b'"content": [null, {', 1)),
        (
            "top_logprobs an object",
            lambda b: b.replace(b'"top_logprobs": null', b'"top_logprobs": {"a": 1}', 1),
        ),
        ("an empty top entry", lambda b: b.replace(b'"top_logprobs": [', b'"top_logprobs": [{}, ', 1)),
        (
            "no message text",
            lambda b: re.sub(
                rb'"message": \{"role": "assistant", "content": "[^"]*"',
                b'"message": {"role": "assistant", "content": null',
                b,
                count=1,
            ),
        ),
        (
            "a duplicate content",
            lambda b: b.replace(
                b', "refusal": null}, "finish_reason"', b', "content": null}, "finish_reason"', 1
            ),
        ),
        (
            "a second choice",
            lambda b: b.replace(
                b'}], "usage"',
                b'}, {"index": 1, "message": {"content": "x"}, "logprobs": {"content": []}}], "usage"',
                1,
            ),
        ),
        ("a trailing comma", lambda b: b.replace(b'}], "refusal"', b'},], "refusal"', 1)),
        ("an unquoted token", lambda b: b.replace(b'"token": "token_id:2"', b'"token": 5token_id:2"', 1)),
        ("samples", lambda b: b.replace(b'"bytes"', b'"samples": {"ids": [1], "counts": [2]}, "bytes"', 1)),
        (
            "a nested top_logprobs",
            lambda b: b.replace(b'"top_logprobs": [{', b'"top_logprobs": [{"top_logprobs": [], ', 1),
        ),
        ("empty bytes", lambda b: re.sub(rb'"bytes": \[[\d, ]*\]', b'"bytes": []', b, count=1)),
        ("a fractional byte", lambda b: re.sub(rb'"bytes": \[\d+', b'"bytes": [1.5', b, count=1)),
        ("a negative byte", lambda b: re.sub(rb'"bytes": \[\d+', b'"bytes": [-1', b, count=1)),
    ]


@pytest.mark.parametrize(("what", "edit"), _variants(), ids=[v[0] for v in _variants()])
def test_other_layouts_take_the_general_path_with_the_same_outcome(
    what: str, edit: Callable[[bytes], bytes]
) -> None:
    original = json.dumps(_chat(5)).encode()
    raw = edit(original)
    assert raw != original, what
    try:
        expected = parse_chat(json.loads(raw), 3, RESOLVE)
    except (ResponseShapeError, ValueError) as exc:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            parse_chat(decode_body(raw), 3, RESOLVE)
        return
    fast = parse_chat(decode_body(raw), 3, RESOLVE)
    assert not isinstance(fast.candidates, DenseTopK) or what in ("an integer logprob", "empty bytes")
    _same(fast, expected)


def test_random_edits_and_cuts_store_what_a_full_decode_stores() -> None:
    """``test_parsing``'s random edits for chat: 400 compact bodies with byte edits and cuts from
    ``logprobs.content`` on store what the standard library's full decode stores, or are refused with the same
    error (and the 8-byte reads never pass the end)."""
    rng = random.Random("edits-chat")
    outcomes = []
    for n in range(400):
        raw = json.dumps(
            _chat(n % 7, data=["token", "null", "vllm", "mixed"][n % 4]), separators=(",", ":")
        ).encode()
        edited = mutated(raw, raw.index(b'"content":['), rng)
        fast = stored(edited, decode_body, lambda body: parse_chat(body, 3, any_id), "generate")
        assert same_stored(
            fast, stored(edited, json.loads, lambda body: parse_chat(body, 3, any_id), "generate")
        )
        outcomes.append(isinstance(fast, str))
    assert 20 <= sum(outcomes) <= 380  # edits that are refused and edits that are stored both occurred


def test_small_and_empty_answers() -> None:
    body = _chat(6)
    content = body["choices"][0]["logprobs"]["content"]
    for entries in ([], content[:1]):
        body["choices"][0]["logprobs"]["content"] = entries
        body["choices"][0]["message"]["content"] = b"".join(
            SPLIT_VOCAB[int(e["token"][9:])] for e in entries
        ).decode("utf-8", "replace")
        raw = json.dumps(body, separators=(",", ":")).encode()
        fast = parse_chat(decode_body(raw), 3, RESOLVE)
        assert isinstance(fast.candidates, DenseTopK)
        _same(fast, parse_chat(json.loads(raw), 3, RESOLVE))


def test_bodies_cut_short_are_not_json() -> None:
    raw = json.dumps(_chat(7)).encode()
    for end in (len(raw) // 2, len(raw) - 3):
        with pytest.raises(ValueError):
            decode_body(raw[:end])


def _ask_chat(teacher: Teacher, prompt: str, **extra: Any) -> bytes:
    request = {"model": "local-teacher", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
               "temperature": 1.0, "seed": 3, "logprobs": True, "top_logprobs": 5,
               "return_tokens_as_token_ids": True, **extra}  # fmt: skip
    headers = {"Authorization": f"Bearer {PLANTED_KEY}"}
    response = httpx.post(teacher.base_url + "/chat/completions", json=request, headers=headers, timeout=60)
    response.raise_for_status()
    return response.content


@pytest.mark.parametrize("extension", ["none", "samples", "logits", "prompt_logprobs"])
def test_real_server_chat_answers_parse_the_same_on_both_paths(teacher: Teacher, extension: str) -> None:
    """The local teacher's chat answers (its tokenizer splits characters): fast and general paths agree; its
    ``samples`` and ``top_logits`` extensions take the general path."""
    resolve = teacher.tokenizer.token_bytes
    extra: dict[str, Any] = {
        "none": {},
        "samples": {"return_samples": 4, "sample_seed": 1},
        "logits": {"return_logits": True},
        "prompt_logprobs": {"prompt_logprobs": 2},
    }[extension]
    draws = extra.get("return_samples", 0)
    for prompt in PROMPTS[:4]:
        raw = _ask_chat(teacher, prompt, **extra)
        decoded, plain = decode_body(raw), json.loads(raw)
        fast = with_samples(parse_chat(decoded, 5, resolve), chat_samples(decoded, draws, resolve))
        general = with_samples(parse_chat(plain, 5, resolve), chat_samples(plain, draws, resolve))
        assert isinstance(fast.candidates, DenseTopK) == (extension in ("none", "prompt_logprobs"))
        assert (fast.samples is not None) == bool(draws)
        _same(fast, general)


def test_collect_chat_with_samples(teacher: Teacher) -> None:
    """Generate mode over chat with the samples extension: collected, samples stored (the general path)."""
    items = [WorkItem(prompt=p) for p in PROMPTS[:2]]
    records, _, result = run(teacher, items, mode="generate", api="chat", top_k=4, samples=3)
    assert not result.failures and len(records) == 2
    for record in records:
        assert record.sample_ids is not None and record.sample_ids.shape[0] == len(record.tokens)
        assert (record.sample_counts.sum(axis=1) == 3).all()
