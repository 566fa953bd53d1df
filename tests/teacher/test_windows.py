"""Score-mode windows: the pure cut/merge on hand-made and generated windows, and a document longer than the real
local teacher's context collected whole, each position scored as its window's context says."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest

from storage.settings import StorageSettings
from storage.shards import ShardWriter
from teacher.client import TeacherClient
from teacher.collect import collect
from teacher.inputs import WorkItem
from teacher.parsing import Parsed, ResponseShapeError, Token
from teacher.settings import TeacherSettings
from teacher.windows import (
    MARGIN,
    Window,
    ask_windows,
    length_refusal,
    merge_windows,
    next_start,
    token_offsets,
)
from tests.teacher.conftest import PLANTED_KEY, Teacher, stored_records

# ---- pure data ------------------------------------------------------------------------------------------------

TOY_TOKEN = re.compile(
    r"\s*\S{1,3}|\s+"
)  # a toy tokenizer: a word's first 3 characters carry its leading space


def toy_answer(text: str) -> Parsed:
    """What a teacher with the toy tokenizer answers for ``text``: each candidate's logprob says how many tokens
    came before it in this answer (-index / 1000), so tests can see which window a position came from."""
    pieces = TOY_TOKEN.findall(text)
    tokens = [Token(p.encode("utf-8"), None, -i / 1000) for i, p in enumerate(pieces)]
    candidates = [[] if i == 0 else [t] for i, t in enumerate(tokens)]
    return Parsed(text, tokens, candidates, prompt_tokens=len(tokens))


def window(text: str, start: int, end: int) -> Window:
    return Window(start, toy_answer(text[start:end]))


def pieces(merged: Parsed) -> list[str]:
    return [t.data.decode("utf-8") for t in merged.tokens]


def test_cut_at_the_last_shared_boundary_drops_a_word_cut_in_half() -> None:
    text = "the cat sat on the mat"
    first, second = window(text, 0, 13), window(text, 3, len(text))  # "the cat sat o" | " cat sat on the mat"
    merged = merge_windows(text, [first, second])
    assert pieces(merged.parsed) == ["the", " cat", " sat", " on", " the", " mat"]
    # " o" (the earlier window's last token, a word cut in half) is replaced by " on" from the later window
    assert merged.sources == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
    assert merged.min_context == 2


def test_the_earlier_window_keeps_its_last_token_when_it_ends_where_the_later_one_cuts() -> None:
    text = "one two three"
    first, second = window(text, 0, 7), window(text, 3, len(text))  # "one two" | " two three"
    merged = merge_windows(text, [first, second])
    assert pieces(merged.parsed) == ["one", " two", " thr", "ee"]
    assert merged.sources == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_no_shared_boundary_but_the_window_start_gives_that_position_no_soft_target() -> None:
    text = "abcdefgh"
    first, second = window(text, 0, 5), window(text, 3, len(text))  # abc|de  and  def|gh
    merged = merge_windows(text, [first, second])
    assert pieces(merged.parsed) == ["abc", "def", "gh"]
    assert merged.sources == [(0, 0), (1, 0), (1, 1)]
    assert merged.parsed.candidates[1] == []  # a window's first token has no prediction: never invented


def test_next_start_never_splits_a_character() -> None:
    text = "aé b"
    answer = Parsed(
        text, [Token(b"a", None, 0.0), Token(b"\xc3", 1, -1.0), Token(b"\xa9 b", 2, -1.0)], [[]] * 3
    )
    assert next_start(Window(10, answer), back=1) == 11  # not byte 2 (inside "é"): the token before it


def test_bad_layouts_are_refused() -> None:
    text = "the cat sat on the mat"
    with pytest.raises(ValueError, match="does not overlap"):
        merge_windows(text, [window(text, 0, 11), window(text, 11, len(text))])
    with pytest.raises(ValueError, match="end at the document's end"):
        merge_windows(text, [window(text, 0, 11), window(text, 4, 20)])
    with pytest.raises(ValueError, match="not the document's text"):
        merge_windows(text, [Window(0, toy_answer("the dog"))])
    lossy = Parsed("ab", [Token(None, 7, 0.0), Token(b"b", None, -1.0)], [[], []])
    with pytest.raises(ResponseShapeError, match="without its bytes"):
        token_offsets(lossy)


def plan(text: str, budget: int, overlap: float) -> list[Window]:
    """Windows of at most ``budget`` toy tokens laid out as ``ask_windows`` lays them out."""
    windows, start = [], 0
    while True:
        end = start + 1
        while end < len(text) and len(TOY_TOKEN.findall(text[start : end + 1])) <= budget:
            end += 1
        windows.append(window(text, start, end))
        if end == len(text):
            return windows
        start = next_start(windows[-1], round(overlap * budget) + MARGIN)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.8])
def test_generated_documents_merge_into_one_consistent_answer(seed: int, overlap: float) -> None:
    rng = random.Random(seed)
    words = [
        "def",
        "return",
        "café",
        "日本語",
        "x",
        "🙂",
        "naïve",
        "\n",
        "    ",
        "résumé",
        "a",
        "tokenization",
    ]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(80, 200)))
    budget = rng.choice([24, 40, 64])
    windows = plan(text, budget, overlap)
    assert len(windows) >= 3
    merged = merge_windows(text, windows)
    assert b"".join(t.data for t in merged.parsed.tokens) == text.encode("utf-8")
    order = [w for w, _ in merged.sources]
    assert order == sorted(order) and set(order) <= set(range(len(windows)))
    assert merged.min_context is not None and merged.min_context >= round(overlap * budget)
    for (w, i), token, candidates in zip(
        merged.sources, merged.parsed.tokens, merged.parsed.candidates, strict=True
    ):
        assert token is windows[w].parsed.tokens[i] and candidates is windows[w].parsed.candidates[i]
    assert merged.parsed.prompt_tokens == sum(w.parsed.prompt_tokens for w in windows)


def refusal(message: str, code: str | None = None, **fields: object) -> openai.BadRequestError:
    request = httpx2.Request("POST", "http://teacher.test/v1/completions")
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": code, **fields}
    return openai.BadRequestError(message, response=httpx2.Response(400, request=request), body=body)


def test_length_refusals_as_servers_word_them() -> None:
    local = refusal(
        "This model's maximum context length is 256 tokens. However, you requested 303 tokens (302 in the "
        "prompt, 1 in the completion).",
        "context_length_exceeded",
    )
    assert (length_refusal(local).context, length_refusal(local).prompt_tokens) == (256, 302)
    openai_style = refusal(
        "This model's maximum context length is 4097 tokens, however you requested 5000 tokens (4999 in your "
        "prompt; 1 for the completion). Please reduce your prompt; or completion length."
    )
    assert (length_refusal(openai_style).context, length_refusal(openai_style).prompt_tokens) == (4097, 4999)
    vllm_v1 = refusal(
        "This model's maximum context length is 2048 tokens. However, your request has 2050 input tokens. "
        "Please reduce the length of the input messages."
    )
    assert (length_refusal(vllm_v1).context, length_refusal(vllm_v1).prompt_tokens) == (2048, 2050)
    llama_cpp = refusal(
        "the request exceeds the available context size, try increasing it",
        type="exceed_context_size_error", n_prompt_tokens=5000, n_ctx=4096,
    )  # fmt: skip
    assert (length_refusal(llama_cpp).context, length_refusal(llama_cpp).prompt_tokens) == (4096, 5000)
    unstated = length_refusal(refusal("prompt too long", "context_length_exceeded"))
    assert unstated is not None and unstated.context is None
    assert length_refusal(refusal("top_logprobs must be at most 20")) is None
    assert length_refusal(ValueError("maximum context length is 5")) is None


# ---- the real local teacher (context 256 tokens) ---------------------------------------------------------------

CONTEXT = 256
LONG = "".join(
    f"def step_{i}(values, café='☕'):\n    return [v * {i} for v in values if v]  # 日本 {i}\n"
    for i in range(24)
)


def score_settings() -> TeacherSettings:
    return TeacherSettings(model="local-teacher", mode="score", score_api="prompt_logprobs", top_k=4)


def test_a_document_longer_than_the_context_is_stored_whole(teacher: Teacher, tmp_path: Path) -> None:
    settings = score_settings()
    items = [WorkItem(prompt=LONG), WorkItem(prompt="short text")]
    with ShardWriter(tmp_path, StorageSettings(data_dir=tmp_path, logprob_codec="f32")) as writer:
        result = collect(
            items, settings, teacher.base_url, PLANTED_KEY, set(), writer, progress=False,
            resolve=teacher.tokenizer.token_bytes,
        )  # fmt: skip
    assert not result.failures and result.collected == 2
    (record,) = [r for r in stored_records(tmp_path) if r.text == LONG]
    assert len(record.tokens) > 2 * CONTEXT  # at least three windows
    assert b"".join(teacher.tokenizer.token_bytes(int(t)) for t in record.tokens) == LONG.encode("utf-8")
    assert np.isfinite(record.topk_logprobs[1:, 0]).all()  # a soft target at every position but the first

    async def windows_and_references() -> tuple[list[Window], list[Parsed], list[int]]:
        async with TeacherClient(
            settings, teacher.base_url, PLANTED_KEY, teacher.tokenizer.token_bytes
        ) as client:
            windows = await ask_windows(client, WorkItem(prompt=LONG), CONTEXT, settings.window_overlap)
            merged = merge_windows(LONG, windows)
            # positions deep in the document (from the third window on) whose next token starts a new word
            deep = [
                p
                for p, (w, _) in enumerate(merged.sources[:-1])
                if w >= 2 and merged.parsed.tokens[p + 1].data[:1] in (b" ", b"\n")
            ][::7]
            references = []
            for p in deep:
                w, _ = merged.sources[p]
                end = len(b"".join(t.data for t in merged.parsed.tokens[: p + 1]).decode("utf-8"))
                references.append(await client.ask(WorkItem(prompt=LONG[windows[w].start : end])))
            return windows, [merged.parsed, *references], deep

    windows, (merged, *references), deep = asyncio.run(windows_and_references())
    assert len(windows) >= 3 and len(deep) >= 4
    assert merge_windows(LONG, windows).min_context >= round(settings.window_overlap * (CONTEXT - 1))
    np.testing.assert_array_equal(
        record.tokens, [t.id for t in merged.tokens]
    )  # the same windows as collect's
    sources = merge_windows(LONG, windows).sources
    for p, reference in zip(deep, references, strict=True):
        w, i = sources[p]
        assert [t.data for t in reference.tokens] == [t.data for t in windows[w].parsed.tokens[: i + 1]]
        # the reference request holds exactly the window's text before position p: same top-k, same logprobs
        ids = [c.id for c in reference.candidates[-1]]
        np.testing.assert_array_equal(record.topk_ids[p, : len(ids)], ids)
        np.testing.assert_allclose(
            record.topk_logprobs[p, : len(ids)], [c.logprob for c in reference.candidates[-1]], atol=1e-4
        )
