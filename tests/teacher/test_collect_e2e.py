"""End to end: the real local teacher server, the real ``openai`` client, every mode and API, k = 1..20, on
unicode text whose tokens split characters."""

from __future__ import annotations

import numpy as np
import pytest

from storage.records import TeacherVocab, TopKRecord
from teacher.collect import CollectResult, collect
from teacher.inputs import WorkItem
from teacher.settings import TeacherSettings
from tests.teacher.conftest import PLANTED_KEY, PROMPTS, Teacher, fault_proxy

MODES = [
    ("score", "completions", "prompt_logprobs"),
    ("score", "completions", "echo"),
    ("generate", "completions", "echo"),
    ("generate", "chat", "echo"),
]


def run(
    teacher: Teacher, items: list[WorkItem], base_url: str | None = None, **overrides
) -> tuple[list[TopKRecord], TeacherVocab, CollectResult]:
    defaults = {"model": "local-teacher", "max_tokens": 6, "concurrency": 4, "timeout_s": 60}
    settings = TeacherSettings(**{**defaults, **overrides})
    records: list[TopKRecord] = []
    vocab = TeacherVocab()
    result = collect(
        items, settings, base_url or teacher.base_url, PLANTED_KEY, set(), lambda rs, v: records.extend(rs),
        vocab=vocab, progress=False, resolve=teacher.tokenizer.token_bytes,
    )  # fmt: skip
    return records, vocab, result


def spell(record: TopKRecord, vocab: TeacherVocab) -> bytes:
    return b"".join(vocab.bytes_of(int(t)) for t in record.tokens)


@pytest.mark.parametrize(("mode", "api", "score_api"), MODES)
@pytest.mark.parametrize("k", [1, 7, 20])
def test_modes_and_k(teacher: Teacher, mode: str, api: str, score_api: str, k: int) -> None:
    items = [WorkItem(prompt=p) for p in PROMPTS[:4]]
    records, vocab, result = run(
        teacher, items, mode=mode, api=api, score_api=score_api, top_k=k, temperature=0.0
    )
    assert not result.failures and result.collected == len(items) == len(records)
    for record in records:
        ids, lps = record.topk_ids, record.topk_logprobs
        assert ids.shape[1] <= k
        have = ids >= 0
        assert np.array_equal(have, np.isfinite(lps))
        assert np.all(np.diff(np.where(have, lps, -1e30), axis=1) <= 0)  # sorted, padding last
        assert np.all(lps[have] <= 0) and np.all(np.exp(lps).sum(axis=1) <= 1 + 1e-4)
        if mode == "score":
            assert spell(record, vocab) == record.text.encode()  # the tokens spell the text exactly
            assert not have[0].any() and have[1:].sum(axis=1).tolist() == [k] * (len(record.tokens) - 1)
        else:
            assert have.sum(axis=1).tolist() == [k] * len(record.tokens)
            # temperature 0: each generated token is the teacher's top-1 at its position
            np.testing.assert_array_equal(record.tokens, ids[:, 0])
            assert record.completion_tokens == len(record.tokens)
        if mode == "generate":  # a random teacher may generate invalid UTF-8: text shows it replaced
            assert spell(record, vocab).decode("utf-8", "replace") == record.text
        assert record.prompt_tokens > 0


def test_unicode_fragments_and_both_score_apis_agree(teacher: Teacher) -> None:
    items = [WorkItem(prompt=p) for p in PROMPTS]
    echo, vocab_a, _ = run(teacher, items, mode="score", score_api="echo", top_k=5)
    plp, _, _ = run(teacher, items, mode="score", score_api="prompt_logprobs", top_k=5)
    fragments = 0
    for a, b in zip(sorted(echo, key=lambda r: r.text), sorted(plp, key=lambda r: r.text), strict=True):
        assert a.text == b.text
        # Two response shapes (echo+logprobs, vLLM prompt_logprobs) give the same ids and numbers.
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        for t in a.tokens:
            try:
                vocab_a.bytes_of(int(t)).decode("utf-8")
            except UnicodeDecodeError:
                fragments += 1
    assert fragments > 0, "the test text should have tokens that split a multi-byte character"


def test_chat_messages_input_and_bytes(teacher: Teacher) -> None:
    items = [WorkItem(messages=({"role": "system", "content": "be brief ☕"}, {"role": "user", "content": p}))
             for p in PROMPTS[:3]]  # fmt: skip
    records, vocab, result = run(teacher, items, mode="generate", api="chat", top_k=3, token_ids=False)
    assert not result.failures and len(records) == 3
    for record in records:
        assert spell(record, vocab).decode("utf-8", "replace") == record.text
        assert record.prompt.startswith("[{")  # messages stored as canonical JSON


@pytest.mark.parametrize(("mode", "api", "score_api"), MODES)
def test_raw_logits_extension(teacher: Teacher, mode: str, api: str, score_api: str) -> None:
    items = [WorkItem(prompt=p) for p in PROMPTS[:2]]
    records, _, result = run(teacher, items, mode=mode, api=api, score_api=score_api, top_k=6, logits=True)
    assert not result.failures
    for record in records:
        have = record.topk_ids >= 0
        assert record.topk_logits is not None and np.array_equal(have, np.isfinite(record.topk_logits))
        rows = have.any(axis=1)
        # log-softmax shifts every logit of a position by the same constant
        shift = record.topk_logits[rows] - record.topk_logprobs[rows]
        np.testing.assert_allclose(shift - shift[:, :1], 0.0, atol=1e-3)


# One request at a time: the local server's batches then have the same shapes, and its numbers the same bits.
ONE_AT_A_TIME = {"top_k": 5, "temperature": 0.0, "concurrency": 1}


@pytest.mark.parametrize(("mode", "api", "score_api"), MODES)
def test_both_http_transports_store_the_same(teacher: Teacher, mode: str, api: str, score_api: str) -> None:
    """``teacher.http_transport``: aiohttp (the default) and httpx (the SDK's own) give the same records. One
    request at a time: the server's batches then have the same shapes, and its numbers the same bits."""
    items = [WorkItem(prompt=p) for p in PROMPTS[:3]]
    common = {"mode": mode, "api": api, "score_api": score_api, **ONE_AT_A_TIME}
    by_transport = {}
    for transport in ("aiohttp", "httpx"):
        records, vocab, result = run(teacher, items, http_transport=transport, **common)
        assert not result.failures and len(records) == len(items)
        by_transport[transport] = sorted(
            (r.sample_id, spell(r, vocab), r.topk_logprobs.tobytes(), r.text) for r in records
        )
    assert by_transport["aiohttp"] == by_transport["httpx"]


@pytest.mark.parametrize(("mode", "api", "score_api"), MODES)
def test_gzip_bodies_are_decoded_by_both_transports(
    teacher: Teacher, mode: str, api: str, score_api: str
) -> None:
    """A gateway that gzips the answers (``content-encoding: gzip``, the fault proxy's ``gzip``): both transports
    store what they store without it (the aiohttp one reads each body whole and leaves decoding to httpx)."""
    items = [WorkItem(prompt=p) for p in PROMPTS[:3]]
    common = {"mode": mode, "api": api, "score_api": score_api, **ONE_AT_A_TIME}
    direct, vocab, _ = run(teacher, items, **common)
    expected = sorted((r.sample_id, spell(r, vocab), r.topk_logprobs.tobytes()) for r in direct)
    with fault_proxy(teacher.origin, {"gzip": True}) as proxy:
        for transport in ("aiohttp", "httpx"):
            records, vocab, result = run(teacher, items, proxy.base_url, http_transport=transport, **common)
            assert not result.failures, result.failures
            assert (
                sorted((r.sample_id, spell(r, vocab), r.topk_logprobs.tobytes()) for r in records) == expected
            )
        assert proxy.stats()["forwarded"] == 2 * len(items)
