"""Real-text training data for the student tests: standard-library source, tokenized, with a fixed teacher.

Imported by the training tests and the training benchmark (no side effects on import). ``prepare(dir)`` trains a
byte-level BPE (``student.tokenizer``) on Python standard-library files (``pipeline.corpus.stdlib_files``),
tokenizes them into train / val token corpora (``student.batches``) and attaches soft targets from a fixed
teacher: a smoothed bigram model counted on the train split, whose top-k at position i is its distribution of
token i given token i-1 (top-k mass W < 1 because of the smoothing). ``prepare_snapshot`` stores the same
teacher's records through the storage layer instead (Parquet shards, DuckDB catalog, train / val snapshot
manifests for ``storage.reader.PackedReader``), the teacher vocabulary being the student's token bytes.
``write_spec`` writes a training spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.corpus import stdlib_files
from storage.catalog import Catalog
from storage.records import TeacherVocab, TopKRecord, sample_id
from storage.settings import StorageSettings
from storage.shards import ShardWriter
from storage.snapshot import create_snapshot
from student.batches import TokenCorpus
from student.tokenizer import StudentTokenizer

TINY_MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "seq_length": 64,
}


def bigram_logprobs(docs: list[list[int]], vocab: int, smoothing: float = 0.05) -> np.ndarray:
    """``log P(b | a)`` [V, V] of an add-``smoothing`` bigram model counted within documents."""
    counts = np.zeros((vocab, vocab), dtype=np.float64)
    for doc in docs:
        if len(doc) > 1:
            np.add.at(counts, (np.asarray(doc[:-1]), np.asarray(doc[1:])), 1.0)
    counts += smoothing
    return np.log(counts / counts.sum(axis=1, keepdims=True))


def attach_teacher(corpus: TokenCorpus, table: np.ndarray, k: int) -> TokenCorpus:
    """Top-k of the bigram teacher for every token that has a predecessor in its document."""
    top = np.argsort(-table, axis=1, kind="stable")[:, :k]
    prev = np.concatenate([[0], corpus.tokens[:-1]])
    ids = top[prev].astype(np.int32)
    logp = np.take_along_axis(table[prev], ids, axis=1).astype(np.float32)
    first = corpus.doc_starts[:-1]
    ids[first], logp[first] = -1, -np.inf
    corpus.topk_ids, corpus.topk_logprobs = ids, logp
    return corpus


def prepare(directory: Path, files: int = 24, vocab: int = 512, k: int = 8) -> dict[str, Path]:
    """Tokenizer + train/val token corpora with bigram-teacher top-k under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(files)]
    val_texts, train_texts = texts[: max(len(texts) // 6, 1)], texts[max(len(texts) // 6, 1) :]
    tokenizer = StudentTokenizer.train(train_texts, vocab)
    train_docs, val_docs = tokenizer.encode_batch(train_texts), tokenizer.encode_batch(val_texts)
    table = bigram_logprobs(train_docs, tokenizer.vocab_size)
    paths = {
        "tokenizer": tokenizer.save(directory / "tokenizer.json"),
        "train_data": attach_teacher(TokenCorpus.from_documents(train_docs), table, k).save(
            directory / "train.npz"
        ),
        "val_data": attach_teacher(TokenCorpus.from_documents(val_docs), table, k).save(
            directory / "val.npz"
        ),
    }
    return paths


def _record(text: str, split: str, tokenizer: StudentTokenizer, table: np.ndarray, k: int) -> TopKRecord:
    corpus = attach_teacher(TokenCorpus.from_documents([tokenizer.encode(text)]), table, k)
    params = {"k": k, "teacher": "bigram"}
    return TopKRecord(
        sample_id=sample_id(text, "bigram", params),
        split=split,
        teacher="bigram",
        mode="score",
        prompt="",
        text=text,
        tokens=corpus.tokens,
        topk_ids=corpus.topk_ids,
        topk_logprobs=corpus.topk_logprobs,
        params=params,
    )


def prepare_snapshot(directory: Path, files: int = 12, vocab: int = 512, k: int = 8, chunk: int = 3000):
    """Tokenizer + train / val snapshot manifests of bigram-teacher records (one per ``chunk`` characters)."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(files)]
    n_val = max(len(texts) // 6, 1)
    tokenizer = StudentTokenizer.train(texts[n_val:], vocab)
    table = bigram_logprobs(tokenizer.encode_batch(texts[n_val:]), tokenizer.vocab_size)
    teacher_vocab = TeacherVocab()
    for token_id, token_bytes in enumerate(tokenizer.vocab_bytes()):
        teacher_vocab.add(token_id, token_bytes)
    data_dir = directory / "data"
    with Catalog(data_dir) as catalog:
        writer = ShardWriter(data_dir, StorageSettings(data_dir=data_dir, shard_max_records=16), catalog)
        with writer:
            for i, text in enumerate(texts):
                split = "val" if i < n_val else "train"
                chunks = [text[j : j + chunk] for j in range(0, len(text), chunk)]
                writer.add(
                    [_record(c, split, tokenizer, table, k) for c in chunks if c.strip()], teacher_vocab
                )
        snapshots = {
            split: create_snapshot(catalog, split, splits=[split]).path for split in ("train", "val")
        }
    return {
        "tokenizer": tokenizer.save(directory / "tokenizer.json"),
        "train_data": snapshots["train"],
        "val_data": snapshots["val"],
    }


def write_spec(
    path: Path,
    data: dict[str, Path],
    out_dir: Path,
    train: dict[str, Any],
    loss: dict[str, Any],
    model: dict[str, Any] | None = None,
) -> Path:
    spec = {
        "model": {**TINY_MODEL, **(model or {})},
        "train": train,
        "loss": loss,
        **{key: str(value) for key, value in data.items()},
        "out_dir": str(out_dir),
    }
    path.write_text(json.dumps(spec, indent=2))
    return path


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]
