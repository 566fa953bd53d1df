"""Training batches from pre-tokenized text: the storage-free data source, same batch dict as the reader.

A *token corpus* (``.npz``) holds documents already tokenized by the student tokenizer: ``tokens`` int32 [N]
(all documents concatenated), ``doc_starts`` int64 [D+1] (document d is ``tokens[doc_starts[d]:
doc_starts[d+1]]``) and, optionally, soft targets in the student's vocabulary: ``topk_ids`` int32 [N, K]
(-1 pad) and ``topk_logprobs`` float32 [N, K] (-inf pad), where row i is a teacher's distribution over token
i given the tokens before it in its document (the convention of ``storage.records``).

``TokenBatches`` cuts the concatenated stream into windows of ``seq_len + 1`` tokens (stride ``seq_len``),
shuffles the windows per epoch from the seed, and serves micro-batch ``g`` as global rows
``[g*B*DP, (g+1)*B*DP)`` of that order, rank r taking its ``B`` rows. So the global batch does not depend on
the DP size (DP=2 x B equals DP=1 x 2B), and micro-batch ``g`` is a pure function of ``(seed, g)``: resuming
at a data position (``state_dict``, as ``storage.reader.PackedReader`` has) costs nothing. Batches are the dicts described in ``docs/architecture.md`` (``tokens``,
``labels``, ``loss_mask``, ``soft_mask``, ``topk_ids``, ``topk_logprobs``, ``position_ids``, ``doc_ids``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class TokenCorpus:
    tokens: np.ndarray  # int32 [N]
    doc_starts: np.ndarray  # int64 [D+1]
    topk_ids: np.ndarray | None = None  # int32 [N, K]
    topk_logprobs: np.ndarray | None = None  # float32 [N, K]

    @classmethod
    def from_documents(cls, docs: list[list[int]]) -> TokenCorpus:
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        tokens = (
            np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        )
        return cls(tokens=tokens, doc_starts=starts)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"tokens": self.tokens, "doc_starts": self.doc_starts}
        if self.topk_ids is not None:
            arrays |= {"topk_ids": self.topk_ids, "topk_logprobs": self.topk_logprobs}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenCorpus:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: token corpus not found")
        with np.load(path) as z:
            missing = {"tokens", "doc_starts"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: token corpus lacks arrays {sorted(missing)}")
            corpus = cls(
                tokens=z["tokens"].astype(np.int32),
                doc_starts=z["doc_starts"].astype(np.int64),
                topk_ids=z["topk_ids"].astype(np.int32) if "topk_ids" in z.files else None,
                topk_logprobs=z["topk_logprobs"].astype(np.float32) if "topk_logprobs" in z.files else None,
            )
        corpus.validate(str(path))
        return corpus

    def validate(self, where: str = "token corpus") -> None:
        n = len(self.tokens)
        if self.doc_starts[0] != 0 or self.doc_starts[-1] != n or np.any(np.diff(self.doc_starts) < 0):
            raise ValueError(f"{where}: doc_starts must rise from 0 to len(tokens)={n}")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError(f"{where}: topk_ids and topk_logprobs come together")
        if self.topk_ids is not None and (
            self.topk_ids.shape[0] != n or self.topk_ids.shape != self.topk_logprobs.shape
        ):
            raise ValueError(f"{where}: topk arrays must be [len(tokens)={n}, K], got {self.topk_ids.shape}")


class TokenBatches:
    """Packed micro-batches of a ``TokenCorpus`` for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        corpus: TokenCorpus,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.corpus, self.seq_len, self.batch = corpus, seq_len, micro_batch_size
        self.seed, self.dp_rank, self.dp_size, self.shuffle = seed, dp_rank, dp_size, shuffle
        n = len(corpus.tokens)
        if n < 2:
            raise ValueError("token corpus has fewer than 2 tokens")
        self.starts = np.arange(0, max(n - 1, 1), seq_len, dtype=np.int64)
        doc_of = np.zeros(n, dtype=np.int64)
        doc_of[corpus.doc_starts[1:-1]] = 1
        self.doc_of = np.cumsum(doc_of)
        self.pos_in_doc = np.arange(n, dtype=np.int64) - corpus.doc_starts[self.doc_of]
        self._order_cache: dict[int, np.ndarray] = {}
        self.position = 0

    def __len__(self) -> int:
        """Micro-batches per epoch (for this rank)."""
        return max(len(self.starts) // (self.batch * self.dp_size), 1)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order_cache = {epoch: rng.permutation(len(self.starts))}
            else:
                self._order_cache = {epoch: np.arange(len(self.starts))}
        return self._order_cache[epoch]

    def _window(self, global_row: int) -> int:
        epoch, i = divmod(global_row, len(self.starts))
        return int(self.starts[self._order(epoch)[i]])

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        first = (index * self.dp_size + self.dp_rank) * self.batch
        rows = [self._row(self._window(first + b)) for b in range(self.batch)]
        return {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the data position on, forever (epoch after epoch)."""
        while True:
            batch = self.micro_batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The data position: micro-batches already served (``load_state_dict`` resumes exactly there)."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def _row(self, start: int) -> dict[str, np.ndarray]:
        c, s = self.corpus, self.seq_len
        end = min(start + s + 1, len(c.tokens))
        span = end - start
        ids = np.zeros(s + 1, dtype=np.int64)
        ids[:span] = c.tokens[start:end]
        doc = np.full(s + 1, -1, dtype=np.int64)
        doc[:span] = self.doc_of[start:end] - self.doc_of[start]
        pos = np.zeros(s, dtype=np.int64)
        inputs = min(span, s)
        pos[:inputs] = self.pos_in_doc[start : start + inputs]
        first_doc_offset = pos[0]
        same_row_doc = doc[:s] == 0
        pos[same_row_doc] -= first_doc_offset
        loss_mask = (doc[:s] >= 0) & (doc[:s] == doc[1:])
        k = c.topk_ids.shape[1] if c.topk_ids is not None else 1
        topk_ids = np.full((s, k), -1, dtype=np.int64)
        topk_lp = np.full((s, k), -np.inf, dtype=np.float32)
        if c.topk_ids is not None and span > 1:
            topk_ids[: span - 1] = c.topk_ids[start + 1 : end]
            topk_lp[: span - 1] = c.topk_logprobs[start + 1 : end]
        soft_mask = loss_mask & (topk_ids[:, 0] >= 0)
        topk_ids[~loss_mask] = -1
        topk_lp[~loss_mask] = -np.inf
        return {
            "tokens": ids[:s],
            "labels": ids[1:],
            "loss_mask": loss_mask.astype(np.float32),
            "soft_mask": soft_mask,
            "topk_ids": topk_ids,
            "topk_logprobs": topk_lp,
            "position_ids": pos,
            "doc_ids": doc[:s],
        }
