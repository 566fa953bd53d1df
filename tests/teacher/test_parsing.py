"""Parsers against recorded response bodies written from the documented shapes of OpenAI chat, OpenAI legacy
completions, and vLLM (prompt_logprobs, return_tokens_as_token_ids)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from storage.records import TeacherVocab
from teacher.client import body_problem, request_params
from teacher.collect import build_record
from teacher.parsing import (
    ResponseShapeError,
    decode_token_string,
    parse_chat,
    parse_completion,
    parse_prompt_logprobs,
)
from teacher.settings import TeacherSettings

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
