"""Held-out documents for evaluation, scored without context cuts.

Training packs documents into fixed-length rows, so a document continues in the next row without the context
before the cut. Evaluation instead gives each document rows of its own: one row when its labels fit the model's
context, else sliding windows (``windows``): each window holds ``context`` input tokens, consecutive windows
start ``stride`` tokens apart (the last one ends at the document's end), and each label is scored once, in the
first window that holds it after the labels already scored. So every scored label sees its whole document
before it up to the context length in the first window, and at least ``context - stride`` tokens after that.

``load_documents`` reads a snapshot manifest (documents in manifest order: ``storage.snapshot`` lists records
by ``storage.snapshot.order_key``, a hash of the prompt and text, and so are the documents here: the order
does not depend on the teacher's name, when it answered or which shard a record landed in) through the storage reader's own
mapping to the student's vocabulary, or a ``.npz`` token corpus (``student.batches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Documents:
    """Held-out documents in the student's vocabulary; token ``i`` carries the teacher's top-k for predicting it
    from the tokens before it (``topk_ids`` -1 / ``topk_logprobs`` -inf padding)."""

    offsets: np.ndarray  # int64 [D + 1]
    tokens: np.ndarray  # int64 [L]
    topk_ids: np.ndarray  # int64 [L, K]
    topk_logprobs: np.ndarray  # float32 [L, K]
    sample_ids: list[str | None]  # [D]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def head(self, count: int) -> Documents:
        """The first ``count`` documents."""
        end = int(self.offsets[min(count, len(self))])
        return Documents(
            self.offsets[: count + 1],
            self.tokens[:end],
            self.topk_ids[:end],
            self.topk_logprobs[:end],
            self.sample_ids[:count],
        )

    def take(self, order: np.ndarray) -> Documents:
        """The documents in ``order`` (evaluation reads them by ``order_key``, whatever the shard layout)."""
        from storage.codec import concat_ranges, segment_starts

        lengths = np.diff(self.offsets)[order]
        index = concat_ranges(self.offsets[:-1][order], lengths)
        return Documents(
            segment_starts(lengths),
            self.tokens[index],
            self.topk_ids[index],
            self.topk_logprobs[index],
            [self.sample_ids[i] for i in order],
        )

    def label_facts(self) -> dict[str, np.ndarray]:
        """Per token [L] (token ``i`` as the label of position ``i-1``): ``hard`` (a real label: not a document's
        first token), ``soft`` (with a teacher top-k), ``topk_mass`` W (sum of the top-k probabilities) and
        ``in_topk`` (the actual token is among the top-k)."""
        hard = np.ones(len(self.tokens), bool)
        hard[self.offsets[:-1][np.diff(self.offsets) > 0]] = False
        soft = hard & (self.topk_ids[:, 0] >= 0)
        mass = np.exp(self.topk_logprobs.astype(np.float64)).sum(-1)
        in_topk = (self.topk_ids == self.tokens[:, None]).any(-1)
        return {"hard": hard, "soft": soft, "topk_mass": mass, "in_topk": in_topk & soft}


def load_documents(data: Path, tokenizer: Any) -> Documents:
    """The held-out documents of a snapshot manifest or a ``.npz`` token corpus with teacher top-k."""
    if data.suffix == ".npz":
        from student.batches import TokenCorpus

        corpus = TokenCorpus.load(data)
        if corpus.topk_ids is None:
            raise ValueError(f"{data}: held-out token corpus has no teacher top-k (topk_ids/topk_logprobs)")
        return Documents(
            corpus.doc_starts.astype(np.int64),
            corpus.tokens.astype(np.int64),
            corpus.topk_ids.astype(np.int64),
            corpus.topk_logprobs.astype(np.float32),
            [None] * (len(corpus.doc_starts) - 1),
        )
    import pyarrow as pa

    from storage.alignment import vocab_mapper
    from storage.reader import PackedReader, _gather
    from storage.shards import read_shard_table
    from storage.snapshot import shard_order_keys

    reader = PackedReader(
        data, seq_len=2, micro_batch_size=1, map_vocab=vocab_mapper(tokenizer), encode=tokenizer.encode
    )
    offsets, tokens, ids, logprobs, sample_ids, keys, base = [np.zeros(1, np.int64)], [], [], [], [], [], 0
    for index, shard in enumerate(reader.snapshot.shards):
        docs = reader._docs_of(index)
        shard_ids, shard_logprobs, _ = _gather(docs.tables, docs.row, reader.k, False)
        offsets.append(docs.doc_offsets[1:] + base)
        base += len(docs.tokens)
        tokens.append(docs.tokens)
        ids.append(shard_ids)
        logprobs.append(shard_logprobs)
        column = read_shard_table(shard.path, columns=["sample_id"]).column("sample_id")
        sample_ids += column.take(pa.array(shard.rows)).to_pylist()
        shard_keys = shard_order_keys(shard.path)
        keys += [shard_keys[r] for r in shard.rows]
    k = reader.k
    docs = Documents(
        np.concatenate(offsets),
        np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
        np.concatenate(ids) if ids else np.zeros((0, k), np.int64),
        np.concatenate(logprobs) if logprobs else np.zeros((0, k), np.float32),
        sample_ids,
    )
    return docs.take(np.argsort(np.array(keys, dtype=object), kind="stable"))


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """``(start, first_scored)`` of each window over a document of ``n_tokens`` tokens: inputs
    ``tokens[start : start + context]`` (fewer at the end), labels shifted by one; the window scores its input
    positions from ``first_scored`` on (window-relative). Every label 1..n_tokens-1 is scored exactly once."""
    labels = n_tokens - 1
    if labels <= 0:
        return []
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    out, start, scored = [], 0, 0
    while True:
        end = min(start + context, labels)
        out.append((start, scored - start))
        scored = end
        if end >= labels:
            return out
        start = min(start + stride, labels - context)


@dataclass(frozen=True)
class Window:
    doc: int
    start: int
    first_scored: int


def document_windows(docs: Documents, doc_range: range, context: int, stride: int) -> list[Window]:
    lengths = np.diff(docs.offsets)
    return [Window(d, s, f) for d in doc_range for s, f in windows(int(lengths[d]), context, stride)]


def window_batch(docs: Documents, chosen: list[Window], context: int, batch: int) -> dict[str, torch.Tensor]:
    """A micro-batch of one row per window in ``chosen`` (at most ``batch``), as long as its longest window
    (at most ``context``: a model's context can be far longer than its held-out documents, and the logits are
    ``[rows, length, V]``): the batch dict of ``docs/architecture.md`` plus ``key`` [B, S], the global index of
    each scored label token (-1: not scored).
    """
    if len(chosen) > batch:
        raise ValueError(f"{len(chosen)} windows for a batch of {batch}")
    k = docs.topk_ids.shape[1]
    spans = []
    for w in chosen:
        first = int(docs.offsets[w.doc]) + w.start
        spans.append((first, min(first + context + 1, int(docs.offsets[w.doc + 1]))))
    batch = max(1, len(chosen))
    context = max([1] + [end - first - 1 for first, end in spans])
    tokens = np.zeros((batch, context), np.int64)
    labels = np.zeros((batch, context), np.int64)
    key = np.full((batch, context), -1, np.int64)
    doc_ids = np.full((batch, context), -1, np.int64)
    for row, (w, (first, end)) in enumerate(zip(chosen, spans, strict=True)):
        n = end - first - 1
        tokens[row, :n] = docs.tokens[first : first + n]
        labels[row, :n] = docs.tokens[first + 1 : end]
        doc_ids[row, :n] = 0
        key[row, w.first_scored : n] = np.arange(first + 1 + w.first_scored, end)
    scored = key >= 0
    safe = np.where(scored, key, 0)
    topk_ids = np.where(scored[..., None], docs.topk_ids[safe], -1)
    topk_logprobs = np.where(scored[..., None], docs.topk_logprobs[safe], -np.inf).astype(np.float32)
    out = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": scored.astype(np.float32),
        "soft_mask": scored & (topk_ids[..., 0] >= 0),
        "topk_ids": topk_ids.reshape(batch, context, k),
        "topk_logprobs": topk_logprobs.reshape(batch, context, k),
        "position_ids": np.broadcast_to(np.arange(context), (batch, context)).copy(),
        "doc_ids": doc_ids,
        "key": key,
    }
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in out.items()}
