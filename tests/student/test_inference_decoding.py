"""Decoding (``student.generation``) on a small exact language model: a bigram table whose logits depend only on
the previous token, so every expectation below is computed independently of the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student.generation import Decoder, SamplingParams, position_reports, top_p_filter

# single bytes (two of them the halves of "é", 0xC3 0xA9) and one two-byte token "ba"
TOKEN_BYTES = [b"a", b"b", b"\n", b"\xc3", b"\xa9", b"c", b"ba"]
VOCAB = len(TOKEN_BYTES)


def bigram_table(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))


class BigramSession:
    """An exact ``Session``: the logits after a token are its row of the table."""

    def __init__(self, table: torch.Tensor, calls: list[int] | None) -> None:
        self.table, self.calls = table, calls

    def prefill(self, prompts: list[list[int]], every_position: list[bool]) -> list[torch.Tensor]:
        self._count(len(prompts))
        return [self.table[p if every else p[-1:]] for p, every in zip(prompts, every_position, strict=True)]

    def extend(self, tokens: list[int]) -> torch.Tensor:
        self._count(len(tokens))
        return self.table[tokens]

    def _count(self, rows: int) -> None:
        if self.calls is not None:
            self.calls.append(rows)


def decoder(table: torch.Tensor, calls: list[int] | None = None) -> Decoder:
    return Decoder(lambda max_new: BigramSession(table, calls), TOKEN_BYTES.__getitem__)


def test_top_p_filter_matches_reference() -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    # sorted: 0.4, 0.3, 0.15 (cum 0.85), 0.1, 0.05; top_p 0.8 keeps the first three
    kept = top_p_filter(probs, 0.8)
    expected = torch.tensor([0, 0.4, 0, 0.3, 0.15], dtype=torch.float64) / 0.85
    torch.testing.assert_close(kept, expected)
    torch.testing.assert_close(
        top_p_filter(probs, 1e-9), torch.tensor([0, 1.0, 0, 0, 0], dtype=torch.float64)
    )


def test_greedy_follows_argmax_chain() -> None:
    table = bigram_table()
    (c,) = decoder(table).run([[0]], [SamplingParams(max_tokens=6, temperature=0, logprobs=2)])
    expected, prev = [], 0
    for _ in range(6):
        prev = int(table[prev].argmax())
        expected.append(prev)
    assert c.tokens == expected and c.finish_reason == "length" and c.generated == 6
    for report, token, before in zip(c.reports, expected, [0, *expected[:-1]], strict=True):
        ref = torch.log_softmax(table[before].double(), -1)
        assert report.token == token and report.rank == 1
        assert report.logprob == pytest.approx(float(ref[token]), abs=1e-6)
        assert report.top_ids == ref.argsort(descending=True)[:2].tolist()


def test_seeded_sampling_is_independent_of_batch_mates() -> None:
    table = bigram_table(1)
    params = SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, seed=42)
    (alone,) = decoder(table).run([[1]], [params])
    others = [SamplingParams(max_tokens=m, temperature=1.0, seed=s) for m, s in ((3, 1), (12, 2))]
    calls: list[int] = []
    batch = decoder(table, calls).run([[0], [1], [2, 5]], [others[0], params, others[1]])
    assert batch[1].tokens == alone.tokens
    assert calls == [3] * 12  # one prefill and 11 steps of the whole batch (the longest asks for 12 tokens)
    assert [len(c.tokens) for c in batch] == [3, 10, 12]
    again = decoder(table).run([[1]], [params])
    assert again[0].tokens == alone.tokens


def test_sampling_frequencies_match_the_distribution() -> None:
    """Temperature sampling draws from softmax(z / T): the empirical frequencies agree (chi-square bound)."""
    table = bigram_table(2)
    temperature, n = 0.7, 3000
    params = [SamplingParams(max_tokens=1, temperature=temperature, seed=s) for s in range(n)]
    completions = decoder(table).run([[3]] * n, params)
    counts = np.bincount([c.tokens[0] for c in completions], minlength=VOCAB)
    expected = torch.softmax(table[3].double() / temperature, -1).numpy() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 6 degrees of freedom: p < 1e-4 of exceeding this by chance


def test_stop_string_cuts_text_and_keeps_overlapping_tokens() -> None:
    # a table that deterministically spells a b \n c a b ... under greedy decoding
    table = torch.full((VOCAB, VOCAB), -10.0)
    for prev, nxt in ((0, 1), (1, 2), (2, 5), (5, 0), (3, 4), (4, 0)):
        table[prev, nxt] = 10.0
    (c,) = decoder(table).run([[5]], [SamplingParams(max_tokens=8, temperature=0, stop=("\nc",), logprobs=1)])
    assert c.text == "ab" and c.finish_reason == "stop"
    assert c.tokens == [0, 1] and len(c.reports) == 2 and c.generated == 4
    # a stop that begins inside a token keeps that token: "ba" with stop "a" gives the text "b"
    inside = table.clone()
    inside[1, 2], inside[1, 6] = -10.0, 10.0
    (d,) = decoder(inside).run([[1]], [SamplingParams(max_tokens=5, temperature=0, stop=("a",))])
    assert d.tokens == [6] and d.text == "b" and d.generated == 1
    # a lone continuation byte decodes to U+FFFD and counts as one character of the text
    (e,) = decoder(table).run([[3]], [SamplingParams(max_tokens=5, temperature=0, stop=("b",))])
    assert e.tokens == [4, 0] and e.text == "\ufffda"
    (f,) = decoder(table).run([[2]], [SamplingParams(max_tokens=3, temperature=0, stop=("zz",))])
    assert f.finish_reason == "length" and f.text == "cab"


def test_prompt_reports_and_zero_tokens() -> None:
    table = bigram_table(3)
    prompt = [0, 3, 4, 1]
    (c,) = decoder(table).run([prompt], [SamplingParams(max_tokens=0, prompt_logprobs=3)])
    assert c.tokens == [] and c.text == "" and c.prompt_reports[0] is None
    expected = position_reports(table[prompt[:-1]], prompt[1:], 3)
    assert c.prompt_reports[1:] == expected
    for report, prev, token in zip(c.prompt_reports[1:], prompt[:-1], prompt[1:], strict=True):
        ref = torch.log_softmax(table[prev].double(), -1)
        assert report.logprob == pytest.approx(float(ref[token]), abs=1e-6)
        assert report.rank == 1 + int((ref > ref[token]).sum())
        assert report.top_logits == table[prev][report.top_ids].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": -1}, {"temperature": -0.1}, {"top_p": 0.0}, {"stop": ("",)}, {"stop": tuple("abcde")}],
)
def test_invalid_sampling_params(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
