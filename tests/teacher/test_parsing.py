"""Parsers against recorded response bodies written from the documented shapes of OpenAI chat, OpenAI legacy
completions, and vLLM (prompt_logprobs, return_tokens_as_token_ids)."""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from storage.records import TeacherVocab
from teacher.client import body_problem, request_params
from teacher.collect import build_record
from teacher.dense import decode_body
from teacher.parsing import (
    DenseTokens,
    DenseTopK,
    Parsed,
    Resolve,
    ResponseShapeError,
    decode_token_string,
    parse_chat,
    parse_completion,
    parse_prompt_logprobs,
    token_id_names,
)
from teacher.settings import TeacherSettings
from tests.teacher.conftest import PLANTED_KEY, PROMPTS, Teacher

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def test_chat_bytes_sentinel_and_fewer_than_k() -> None:
    parsed = parse_chat(load("openai_chat_logprobs.json"), k=3)
    assert parsed.text == "Hi 🙂"
    # The emoji is split across two tokens; their bytes (not their strings) spell it.
    assert [t.data for t in parsed.tokens] == [b"Hi", b" \xf0\x9f\x99", b"\x82"]
    assert b"".join(t.data for t in parsed.tokens) == parsed.text.encode()
    first = parsed.candidates[0]
    assert [c.data for c in first] == [b"Hi", b"Hello", b"Hey"]  # sorted by decreasing logprob
    assert [c.logprob for c in first] == [-0.1, -2.5, -3.0]
    assert [c.data for c in parsed.candidates[1]] == [b" \xf0\x9f\x99", b" there"]  # -9999 dropped
    assert len(parsed.candidates[2]) == 2  # fewer than k given
    assert (parsed.prompt_tokens, parsed.completion_tokens, parsed.finish_reason) == (9, 3, "stop")
    assert len(parse_chat(load("openai_chat_logprobs.json"), k=1).candidates[0]) == 1


def test_completions_echo_score_mode_cuts_the_generated_token() -> None:
    parsed = parse_completion(load("openai_completions_echo.json"), k=2, echo_prompt="café ☕")
    assert parsed.text == "café ☕"
    assert [t.data for t in parsed.tokens] == [b"caf", b"\xc3", b"\xa9", b" ", b"\xe2\x98\x95"]
    assert parsed.candidates[0] == []  # no prediction for the first prompt token
    assert [c.data for c in parsed.candidates[1]] == [b"\xc3", b"e"]
    assert [c.data for c in parsed.candidates[4]] == [b"\xe2\x98\x95"]  # sentinel entry dropped
    assert [c.data for c in parsed.candidates[3]] == [b"\n", b" "]  # the actual token need not be top-1


def test_completions_generate_mode() -> None:
    parsed = parse_completion(load("openai_completions_generate.json"), k=2)
    assert parsed.text == " Paris."
    assert [t.data for t in parsed.tokens] == [b" Paris", b"."]
    assert [len(c) for c in parsed.candidates] == [2, 1]
    assert parsed.completion_tokens == 2


def test_vllm_prompt_logprobs_finds_the_prompt_tokens_by_text() -> None:
    body = load("vllm_prompt_logprobs.json")
    parsed = parse_prompt_logprobs(body, k=2, prompt="The cat sat")
    assert [t.data for t in parsed.tokens] == [b"The", b" cat", b" sat"]
    assert [t.id for t in parsed.tokens] == [None, 8415, 7731]
    # Position 1: the prompt token ranks 3rd, outside k=2, so it is not part of the top-k.
    assert [(c.id, c.logprob) for c in parsed.candidates[1]] == [(3290, -1.5), (1176, -1.9)]
    assert [c.id for c in parsed.candidates[2]] == [7731, 574]
    assert parsed.candidates[0] == []


def test_vllm_prompt_logprobs_with_prompt_token_ids() -> None:
    body = load("vllm_prompt_logprobs.json")
    body["choices"][0]["prompt_token_ids"] = [791, 8415, 7731]
    parsed = parse_prompt_logprobs(body, k=2, prompt="The cat sat")
    assert [t.id for t in parsed.tokens] == [791, 8415, 7731]
    body["choices"][0]["prompt_token_ids"] = [791, 3290, 7731]  # " dog" does not spell the prompt
    with pytest.raises(ResponseShapeError, match="do not spell the prompt"):
        parse_prompt_logprobs(body, k=2, prompt="The cat sat")


def test_vllm_token_id_strings_resolved_through_the_tokenizer() -> None:
    body = load("vllm_completions_token_ids.json")
    table = {5634: b" mat", 6558: b" rug", 13: b".", 11: b","}
    parsed = parse_completion(body, k=2, resolve=table.__getitem__)
    assert [(t.id, t.data) for t in parsed.tokens] == [(5634, b" mat"), (13, b".")]
    assert [c.data for c in parsed.candidates[0]] == [b" mat", b" rug"]
    unresolved = parse_completion(body, k=2)
    assert unresolved.tokens[0].data is None
    with pytest.raises(ResponseShapeError, match="without its bytes"):
        build_record(unresolved, "p", "train", "m", "generate", {}, TeacherVocab())


@pytest.mark.parametrize(
    ("names", "ids"),
    [
        (["token_id:1", "token_id:22", "token_id:0"], [1, 22, 0]),
        ([], []),
        (["token_id: 5"], [5]),  # as int() reads it
        (["token_id:1", "x"], None),
        (["token_id:token_id:5", "7"], None),  # the prefix twice in one name, missing in the other
        (["token_id:1,token_id:2", "token_id:3"], None),  # a comma inside a name
        (["token_id:1,2"], None),
        (["token_id:1.0"], None),
        (["token_id:007"], None),  # int() reads it; the one-by-one path does
        (["token_id:" + "9" * 30], None),  # past 64 bits
        (["token_id:1", None], None),
        ([1, 2], None),
    ],
)
def test_token_id_names_read_at_once_or_decline(names: list, ids: list[int] | None) -> None:
    assert token_id_names(names) == ids
    if ids is not None:  # what the one-by-one reading gives
        assert [decode_token_string(n)[1] for n in names] == ids


def test_token_string_forms() -> None:
    assert decode_token_string("token_id:42") == (None, 42)
    assert decode_token_string("bytes:\\xe2\\x80") == (b"\xe2\x80", None)
    assert decode_token_string("é") == ("é".encode(), None)
    assert decode_token_string("\ufffd") == (None, None)  # lossy: bytes unknown
    with pytest.raises(ResponseShapeError):
        decode_token_string("token_id:x")


def test_record_from_chat_pads_varying_k() -> None:
    settings = TeacherSettings(mode="generate", api="chat", top_k=3)
    params = request_params(settings)
    vocab = TeacherVocab()
    parsed = parse_chat(load("openai_chat_logprobs.json"), k=3)
    record = build_record(parsed, "Say hi", "train", settings.model, "generate", params, vocab)
    assert record.topk_ids.shape == (3, 3)
    assert record.topk_ids[1, 2] == -1 and math.isinf(record.topk_logprobs[1, 2])
    assert [vocab.bytes_of(int(t)) for t in record.tokens] == [b"Hi", b" \xf0\x9f\x99", b"\x82"]
    assert np.all(np.diff(record.topk_logprobs[0]) <= 0)
    assert record.prompt == "Say hi" and record.text == "Hi 🙂"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"choices": [{"text": "x", "logprobs": nul', "not valid JSON"),
        (b'{"choices": [{"text": "x", "logprobs": null}]}', "no logprobs"),
        (b'{"choices": []}', "no choices"),
    ],
)
def test_unusable_200_bodies_are_named(body: bytes, problem: str) -> None:
    request = json.dumps({"model": "m", "prompt": "p", "logprobs": 2}).encode()
    assert problem in body_problem(request, body)
    assert body_problem(request, json.dumps(load("openai_completions_generate.json")).encode()) is None


# ---- the fast path of score answers (teacher.dense) against the general path --------------------------------

SPLIT_VOCAB = [
    b"a",
    b"b",
    b" the",
    b"\xe2\x98",
    b"\x95",
    b"\xc3",
    b"\xa9",
    b"x",
    b"!",
    b"caf",
    b" \xf0\x9f\x99",
    b"\x82",
]


def _synthetic(shape: str, seed: int, ranks: bool = True) -> tuple[dict, str]:
    """A token-id score answer over ``SPLIT_VOCAB`` (split characters, ties, the sentinel, ranks beyond k, a
    logprob a hair above 0), as a dict, and its prompt."""
    rng = np.random.default_rng(seed)
    words = [[0], [2], [3, 4], [5, 6], [7], [8], [9, 5, 6], [10, 11]]  # whole characters
    ids = [t for w in rng.integers(0, len(words), 40) for t in words[w]]
    prompt = b"".join(SPLIT_VOCAB[t] for t in ids).decode("utf-8")
    positions = []
    for i, actual in enumerate(ids):
        if i == 0:
            positions.append(None)
            continue
        others = [int(t) for t in rng.permutation(len(SPLIT_VOCAB)) if t != actual][:5]
        values = [float(v) for v in np.round(-rng.exponential(2.0, 6), 1)]  # rounded: ties
        values[int(rng.integers(6))] = -9999.0 if i % 7 == 0 else values[0]
        if i % 11 == 0:
            values[0] = 5e-5  # rounding above 0: stored as 0
        positions.append(list(zip([actual, *others], values, strict=True)))
    offsets = [
        len(b"".join(SPLIT_VOCAB[t] for t in ids[:i]).decode("utf-8", "ignore")) for i in range(len(ids))
    ]
    names = [f"token_id:{t}" for t in ids]
    usage = {"prompt_tokens": len(ids), "completion_tokens": 1}
    if shape == "echo":
        top = [None] + [{f"token_id:{t}": v for t, v in p} for p in positions[1:]] + [{"token_id:7": -0.5}]
        logprobs = {
            "tokens": [*names, "token_id:7"],
            "token_logprobs": [None] + [dict(p)[ids[i + 1]] for i, p in enumerate(positions[1:])] + [-0.5],
            "top_logprobs": top,
            "text_offset": [*offsets, len(prompt)],
        }
        return {"choices": [{"text": prompt + "x", "logprobs": logprobs}], "usage": usage}, prompt
    vllm = [None] + [
        {str(t): {"logprob": v, **({"rank": r} if ranks else {}), "decoded_token": f"token_id:{t}"}
         for r, (t, v) in enumerate(p, start=1 if i % 3 else 3)}
        for i, p in enumerate(positions[1:])
    ]  # fmt: skip
    echo = {"tokens": [*names, "token_id:7"], "token_logprobs": [None] * (len(ids) + 1)}
    return {
        "choices": [{"text": prompt + "x", "logprobs": echo, "prompt_logprobs": vllm}],
        "usage": usage,
    }, prompt


def _parse(body: Any, shape: str, prompt: str, k: int, resolve: Resolve = SPLIT_VOCAB.__getitem__) -> Parsed:
    if shape == "echo":
        return parse_completion(body, k, prompt, resolve)
    return parse_prompt_logprobs(body, k, prompt, resolve)


def _assert_same_record(fast: Parsed, general: Parsed, prompt: str) -> None:
    a = build_record(fast, prompt, "train", "m", "score", {}, TeacherVocab())
    b = build_record(general, prompt, "train", "m", "score", {}, TeacherVocab())
    for name in ("tokens", "topk_ids", "topk_logprobs", "token_logprobs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.sample_id == b.sample_id and a.text == b.text


LAYOUTS = {
    "default": {},
    "compact": {"separators": (",", ":")},
    "indented": {"indent": 1},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", ["prompt_logprobs", "echo"])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_fast_score_parsers_store_what_the_general_ones_store(shape: str, layout: str, k: int) -> None:
    for seed in range(3):
        body, prompt = _synthetic(shape, seed)
        raw = json.dumps(body, **LAYOUTS[layout]).encode()
        fast = _parse(decode_body(raw), shape, prompt, k)
        assert isinstance(fast.candidates, DenseTopK)  # the fast path was taken
        assert isinstance(fast.tokens, DenseTokens)  # positions kept as arrays
        general = _parse(json.loads(raw), shape, prompt, k)
        assert not isinstance(general.candidates, DenseTopK)
        assert [(t.data, t.id, t.logprob) for t in fast.tokens] == [
            (t.data, t.id, t.logprob) for t in general.tokens
        ]
        assert list(fast.candidates) == list(general.candidates)
        _assert_same_record(fast, general, prompt)


def _variants() -> list[tuple[str, str, Callable[[bytes], bytes]]]:
    """Layouts the scanners do not read (the general path does), and bodies both paths refuse."""
    return [
        ("prompt_logprobs", "no ranks", lambda b: b),
        ("prompt_logprobs", "token strings", lambda b: b.replace(b'"token_id:2"', b'" the"', 1)),
        (
            "prompt_logprobs",
            "an extra key",
            lambda b: b.replace(b'"rank"', b'"extra": [1, {"a": "]"}], "rank"', 1),
        ),
        ("prompt_logprobs", "logits", lambda b: b.replace(b'"rank"', b'"logit": 1.5, "rank"', 1)),
        (
            "prompt_logprobs",
            "an unquoted decoded token",
            lambda b: b.replace(b'"decoded_token": "token_id:', b'"decoded_token": Xtoken_id:', 1),
        ),
        (
            "prompt_logprobs",
            "a duplicate key",
            lambda b: re.sub(
                rb'\[null, \{("\d+"): \{', rb'[null, {\1: {"logprob": -0.25}, \1: {', b, count=1
            ),
        ),
        (
            "prompt_logprobs",
            "-Infinity",
            lambda b: b.replace(b'"logprob": -', b'"logprob": -Infinity, "x": -', 1),
        ),
        ("echo", "token strings", lambda b: b.replace(b'{"token_id:2"', b'{"token_id:2": -8.5, " the"', 1)),
        (
            "echo",
            "an escaped key",
            lambda b: b.replace(b'"token_id:7": -0.5', b'"token_id:\\u0037": -0.5', 1),
        ),
        ("echo", "a positive logprob", lambda b: b.replace(b'"token_id:7": -0.5', b'"token_id:7": 0.5', 1)),
        ("echo", "NaN", lambda b: b.replace(b'"token_id:7": -0.5', b'"token_id:7": NaN', 1)),
    ]


@pytest.mark.parametrize(("shape", "what", "edit"), _variants(), ids=[v[1] + "-" + v[0] for v in _variants()])
def test_other_layouts_take_the_general_path_with_the_same_outcome(
    shape: str, what: str, edit: Callable[[bytes], bytes]
) -> None:
    body, prompt = _synthetic(shape, 5, ranks=what != "no ranks")
    raw = edit(json.dumps(body).encode())
    assert raw != json.dumps(body).encode() or what == "no ranks"
    try:
        expected = _parse(json.loads(raw), shape, prompt, 3)
    except (ResponseShapeError, ValueError) as exc:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            _parse(decode_body(raw), shape, prompt, 3)
        return
    fast = _parse(decode_body(raw), shape, prompt, 3)
    assert list(fast.candidates) == list(expected.candidates)
    _assert_same_record(fast, expected, prompt)


EDIT_BYTES = b'{}[]:,"-.0123456789eE+ nultrk_id\\'  # JSON's structure, numbers and the keys' letters, mostly


def mutated(raw: bytes, start: int, rng: random.Random) -> bytes:
    """``raw`` with 1-3 random byte edits (replace, insert, delete) at or after ``start``, cut short a third of the
    time: mostly ``EDIT_BYTES``, any byte one time in ten."""
    data = bytearray(raw)
    for _ in range(rng.choice([1, 1, 2, 3])):
        at = rng.randrange(start, len(data))
        byte = rng.choice(EDIT_BYTES) if rng.random() < 0.9 else rng.randrange(256)
        kind = rng.random()
        if kind < 0.5:
            data[at] = byte
        elif kind < 0.8:
            data.insert(at, byte)
        else:
            del data[at]
    if rng.random() < 0.33:
        data = data[: rng.randrange(start, len(data) + 1)]
    return bytes(data)


def stored(raw: bytes, decode: Callable[[bytes], Any], parse: Callable[[Any], Parsed], mode: str) -> Any:
    """What the collector would store from ``raw`` decoded by ``decode``: the record's arrays and text, or the
    error that refused it (at decoding, parsing or building; ``resolve`` refusing an id out of range
    included)."""
    try:
        record = build_record(parse(decode(raw)), "p", "train", "m", mode, {}, TeacherVocab())
    except (ResponseShapeError, ValueError, IndexError) as exc:
        return f"{type(exc).__name__}: {exc}"
    arrays = ("tokens", "topk_ids", "topk_logprobs", "token_logprobs", "topk_logits", "sample_ids")
    return record.text, *(getattr(record, name) for name in arrays)


def same_stored(a: Any, b: Any) -> bool:
    """``stored`` outcomes alike: the same error, or the same text and arrays (equal values: NaN as NaN, -0.0 as
    0.0)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a[0] == b[0] and all(
        (x is None) == (y is None) and (x is None or np.array_equal(x, y, equal_nan=True))
        for x, y in zip(a[1:], b[1:], strict=True)
    )


def any_id(token: int) -> bytes:
    """``SPLIT_VOCAB``'s bytes, and made-up ones for an id an edit invented. (An unknown id among the entries
    past the top k: the general path resolves every entry and fails, the fast one only the kept ones.)"""
    return SPLIT_VOCAB[token] if 0 <= token < len(SPLIT_VOCAB) else b"<%d>" % token


@pytest.mark.parametrize("shape", ["prompt_logprobs", "echo"])
def test_random_edits_and_cuts_store_what_a_full_decode_stores(shape: str) -> None:
    """The scanners read 8 bytes at a time with no bounds checks of their own (``teacher.dense._word``): 400
    bodies in vLLM's compact layout with random byte edits and cuts from the bulky array on store what the
    standard library's full decode stores, or are refused with the same error (and nothing reads past the
    end)."""
    rng = random.Random(f"edits-{shape}")
    key = b'"prompt_logprobs":' if shape == "prompt_logprobs" else b'"top_logprobs":'
    outcomes = []
    for n in range(400):
        body, prompt = _synthetic(shape, n % 7)
        raw = json.dumps(body, separators=(",", ":")).encode()
        edited = mutated(raw, raw.index(key), rng)
        parse = functools.partial(_parse, shape=shape, prompt=prompt, k=3, resolve=any_id)
        fast = stored(edited, decode_body, parse, "score")
        assert same_stored(fast, stored(edited, json.loads, parse, "score")), (n, edited)
        outcomes.append(isinstance(fast, str))
    assert 20 <= sum(outcomes) <= 380  # edits that are refused and edits that are stored both occurred


VALID_NUMBERS = ["-1E5", "-1e-05", "-2.5e+1", "-0.0", "0", "-0e3", "-3", "-12345678901234567890123",
                 "-0.30000000000000004", "-4.9e-324", "-1e-400", "-1e400"]  # fmt: skip
INVALID_NUMBERS = ["+1", "-01", "-.5", "-1.", "-1.e5", "-0", "-1e", "--1", "-1.2.3"]


@pytest.mark.parametrize("shape", ["prompt_logprobs", "echo"])
@pytest.mark.parametrize("number", VALID_NUMBERS + INVALID_NUMBERS)
def test_every_json_number_spelling_reads_as_a_full_decode_reads_it(shape: str, number: str) -> None:
    """The scanners copy each logprob's text and Arrow converts them all at once: a JSON number gives the value
    a full decode gives (to the bit); a text JSON does not read as a number makes the scanner give up and the body
    fail as JSON does, and ``-0`` (an integer JSON reads as 0, where a float parser keeps the sign) goes to the
    general path."""
    body, prompt = _synthetic(shape, 2)
    raw = json.dumps(body).encode()
    key = b'"logprob": ' if shape == "prompt_logprobs" else b'"token_id:7": '
    at = raw.index(key, raw.index(b'"prompt_logprobs"' if shape == "prompt_logprobs" else b'"top_logprobs"'))
    end = re.compile(rb"[-0-9.eE+]+").match(raw, at + len(key)).end()
    raw = raw[: at + len(key)] + number.encode() + raw[end:]
    if number in INVALID_NUMBERS and number != "-0":
        with pytest.raises(json.JSONDecodeError) as refused:
            json.loads(raw)
        with pytest.raises(ValueError, match=re.escape(str(refused.value))):
            decode_body(raw)
        return
    bulky = decode_body(raw)["choices"][0]
    bulky = bulky["prompt_logprobs"] if shape == "prompt_logprobs" else bulky["logprobs"]["top_logprobs"]
    if number == "-0":
        assert isinstance(bulky, list)  # decoded as JSON reads it: the general path
        return
    assert bulky.scanned is not None
    expected = json.loads(raw)  # the standard library: it also reads 1e400
    choice = expected["choices"][0]
    if shape == "prompt_logprobs":
        values = [e["logprob"] for p in choice["prompt_logprobs"] if p for e in p.values()]
    else:
        values = [v for p in choice["logprobs"]["top_logprobs"] if p for v in p.values()]
    assert float(number) in [float(v) for v in values]
    assert bulky.scanned.values.tobytes() == np.array([float(v) for v in values]).tobytes()
    try:
        general = _parse(expected, shape, prompt, 3)
    except (ResponseShapeError, ValueError) as exc:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            _parse(decode_body(raw), shape, prompt, 3)
        return
    _assert_same_record(_parse(decode_body(raw), shape, prompt, 3), general, prompt)


def test_bodies_cut_short_or_without_logprobs_are_named() -> None:
    body, _ = _synthetic("prompt_logprobs", 1)
    raw = json.dumps(body).encode()
    asked = json.dumps({"prompt_logprobs": 3, "logprobs": 0}).encode()
    assert body_problem(asked, raw) is None
    assert body_problem(asked, raw[: len(raw) // 2]) == "a body that is not valid JSON"
    del body["choices"][0]["prompt_logprobs"]
    assert body_problem(asked, json.dumps(body).encode()) == "no prompt_logprobs although they were asked for"


@pytest.mark.parametrize("score_api", ["prompt_logprobs", "echo"])
def test_real_server_answers_parse_the_same_on_both_paths(teacher: Teacher, score_api: str) -> None:
    """The local teacher's answers (its tokenizer splits characters): fast and general paths agree."""
    resolve = teacher.tokenizer.token_bytes
    headers = {"Authorization": f"Bearer {PLANTED_KEY}"}
    for prompt in PROMPTS:
        request = {"model": "local-teacher", "prompt": prompt, "echo": True, "max_tokens": 1, "temperature": 0.0,
                   "return_tokens_as_token_ids": True}  # fmt: skip
        request.update(
            {"logprobs": 0, "prompt_logprobs": 5} if score_api == "prompt_logprobs" else {"logprobs": 5}
        )
        raw = httpx.post(teacher.base_url + "/completions", json=request, headers=headers, timeout=60).content
        parse = parse_prompt_logprobs if score_api == "prompt_logprobs" else parse_completion
        fast = parse(decode_body(raw), 5, prompt, resolve)
        assert isinstance(fast.candidates, DenseTopK)
        general = parse(json.loads(raw), 5, prompt, resolve)
        _assert_same_record(fast, general, prompt)
