"""Byte alignment of teacher tokens to a real student tokenizer, and the coverage it reports."""

from __future__ import annotations

import numpy as np

from storage.alignment import Coverage, build_token_map, greedy_spelling, vocab_mapper
from student.tokenizer import StudentTokenizer

STUDENT = [b"a", b"b", b"c", b"ab", b"abc", b"\xe2", b"\x98", b"\x95", b" "]


def test_single_expand_and_unmapped() -> None:
    teacher = [b"ab", b"abcab", b"\xe2\x98\x95", b"zz", b"", b"c"]
    token_map = build_token_map(teacher, STUDENT)
    assert token_map.single.tolist() == [3, -1, -1, -1, -1, 2]
    assert token_map.expand[1].tolist() == [4, 3]  # longest match first: "abc" + "ab"
    assert token_map.expand[2].tolist() == [5, 6, 7]  # a multi-byte character spelled byte by byte
    assert 3 not in token_map.expand and 4 not in token_map.expand  # "zz" cannot be spelled; "" unused id
    assert greedy_spelling(STUDENT)(b"zz") is None


def test_coverage_counts_entries_and_mass() -> None:
    token_map = build_token_map([b"ab", b"zz", b"c"], STUDENT)
    ids = np.array([[0, 1, -1], [2, 1, 0]], dtype=np.int32)
    logprobs = np.log(np.array([[0.5, 0.25, 1.0], [0.6, 0.2, 0.1]]))
    logprobs[0, 2] = -np.inf
    cov = Coverage()
    cov.add(ids, logprobs.astype(np.float32), token_map)
    assert (cov.entries, cov.mapped_entries) == (5, 3)
    assert np.isclose(cov.mass_share, (0.5 + 0.6 + 0.1) / (0.5 + 0.25 + 0.6 + 0.2 + 0.1), rtol=1e-6)
    assert np.isclose(cov.entry_share, 3 / 5)


def test_vocab_mapper_with_the_student_tokenizer() -> None:
    texts = ["café ☕ naïve résumé", "hello world hello there", "def f(x): return x"] * 30
    tok = StudentTokenizer.train(texts, vocab_size=300)
    student = tok.vocab_bytes()
    teacher = [student[5], "☕".encode(), b"hello world", "é".encode()[:1]]
    token_map = vocab_mapper(tok)(teacher)
    assert token_map.single[0] == 5
    for t in (1, 2):
        spelled = token_map.single[t] if token_map.single[t] >= 0 else None
        pieces = [spelled] if spelled is not None else token_map.expand[t].tolist()
        assert b"".join(student[i] for i in pieces) == teacher[t]
    # a lone UTF-8 lead byte is a token of every byte-level BPE
    assert student[token_map.single[3]] == b"\xc3"
