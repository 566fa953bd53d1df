"""Records for storage tests: a small teacher vocabulary with unicode and byte-fragment tokens, random top-k."""

from __future__ import annotations

import numpy as np

from storage.records import TeacherVocab, TopKRecord, sample_id

# every single byte (so anything can be spelled), some words, a multi-byte character and its fragments
SPECIAL = ["é", "日本", "🙂", " the", "def", "\n    ", "λx"]


def teacher_vocab() -> TeacherVocab:
    vocab = TeacherVocab()
    for b in range(256):
        vocab.add(b, bytes([b]))
    for i, word in enumerate(SPECIAL):
        vocab.add(256 + i, word.encode())
    smile = "🙂".encode()
    vocab.add(300, smile[:2])  # fragments of a 4-byte character
    vocab.add(301, smile[2:])
    for i in [*range(256 + len(SPECIAL), 300), *range(302, 400)]:
        vocab.add(i, f"w{i}".encode())
    return vocab


def random_topk(rng: np.random.Generator, n: int, width: int, vocab_size: int = 400):
    """Sorted top-k with a varying number of entries per position (-1 / -inf padding)."""
    ids = np.stack([rng.choice(vocab_size, width, replace=False) for _ in range(n)]) if n else None
    ids = np.zeros((0, width), np.int64) if ids is None else ids
    alpha = rng.uniform(0.05, 1.0)
    probs = rng.dirichlet(np.full(width + 5, alpha), size=n)[:, :width] if n else np.zeros((0, width))
    logprobs = np.log(np.maximum(probs, 1e-30))
    logprobs = -np.sort(-logprobs, axis=1)
    k = rng.integers(0, width + 1, size=n)
    pad = np.arange(width)[None, :] >= k[:, None]
    ids[pad] = -1
    logprobs[pad] = -np.inf
    return ids.astype(np.int32), logprobs.astype(np.float32)


def make_record(
    rng: np.random.Generator,
    index: int,
    n: int,
    width: int = 6,
    split: str = "train",
    mode: str = "score",
    teacher: str = "tiny-teacher",
    logits: bool = False,
    tokens: np.ndarray | None = None,
) -> TopKRecord:
    params = {"k": width, "temperature": 1.0, "mode": mode}
    prompt = f"prompt {index} ✓"
    ids, logprobs = random_topk(rng, n, width)
    if tokens is None:
        tokens = rng.integers(0, 400, size=n)
        in_topk = (rng.random(n) < 0.7) & (ids[:, 0] >= 0)
        tokens[in_topk] = ids[in_topk, 0]
    if mode == "score" and n:
        ids[0], logprobs[0] = -1, -np.inf  # score mode: the first position has no prediction
    return TopKRecord(
        sample_id=sample_id(prompt, teacher, params),
        split=split,
        teacher=teacher,
        mode=mode,
        prompt=prompt,
        text="".join(chr(0x3B1 + int(t) % 20) for t in tokens),
        tokens=np.asarray(tokens, np.int32),
        topk_ids=ids,
        topk_logprobs=logprobs,
        params=params,
        created_at=1_700_000_000.0 + index,
        prompt_tokens=3,
        completion_tokens=n,
        finish_reason="stop" if mode == "generate" else None,
        topk_logits=(logprobs * 1.5 + 2.0) if logits else None,
    )


def make_records(seed: int, count: int, start: int = 0, max_len: int = 40, **kwargs) -> list[TopKRecord]:
    """``count`` records of 0 to ``max_len - 1`` tokens; prompts (hence sample ids) numbered from ``start``."""
    rng = np.random.default_rng(seed)
    return [make_record(rng, start + i, int(rng.integers(0, max_len)), **kwargs) for i in range(count)]
