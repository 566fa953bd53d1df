"""Held-out evaluation entry point: ``torchrun --nproc-per-node=TP*DP -m student.evaluate SPEC.json``.

SPEC is a JSON file (``EvalSpec``):

- ``data``: the held-out data, never trained on: a snapshot manifest (``storage.reader.PackedReader``) or a
  pre-tokenized ``.npz`` token corpus with teacher top-k (``student.batches``);
- ``tokenizer``: the student ``tokenizer.json``; ``models``: ``{name: {checkpoint, role, train_log}}`` in
  report order (``role`` = ``student`` | ``teacher``: a teacher that is a project checkpoint is evaluated by the
  same code; ``train_log`` is the model's ``metrics.jsonl``, recorded for the report's curves);
- ``out``: where ``metrics.json`` goes (``per_sequence.npz`` is written beside it);
- ``tensor_parallel``, ``seq_length`` (default: the first model's), ``seed``, ``prompts`` (optional list of
  ``{prompt, reference}``; default: ``generation_prompts`` taken from the held-out rows) and the fields of
  ``pipeline.config.EvaluateSettings`` (``max_batches``, ``micro_batch_size``, ``bootstrap_samples``,
  ``confidence``, ``ece_bins``, ``generation_prompts``, ``generation_tokens``, ``prompt_tokens``), e.g.
  ``EvalSpec(**config.evaluate.model_dump(), data=..., ...)``.

Every model sees the same held-out rows in the same order (no shuffling), so the soft − hard difference is a
paired bootstrap over the same sequences. A sequence is one packed row of ``seq_length`` tokens; rows without
a real label (padding) are dropped. Per-token values come from the loss's own vocab-parallel kernel
(``student.losses.topk_cross_entropy``: hard CE, KL over k+1 bins, teacher entropy, top-1 agreement) plus one
MAX and one SUM all-reduce of ``[N]`` / ``[N, 2]`` for the student's top-1 probability and correctness (ECE).
Rows of the padded vocabulary are masked out: the distribution evaluated is over the tokenizer's vocabulary, as
``student.inference`` serves it and the Hugging Face export computes it.

``metrics.json`` (schema ``distill-eval/1``)::

    {"schema": "distill-eval/1",
     "models": ["soft", "hard", "teacher"],                       # report order
     "held_out": {"data": path, "snapshot_hash": str|null, "sequences": S, "tokens": N, "soft_tokens": M,
                  "seq_length": int},
     "bootstrap": {"samples": R, "confidence": 0.95, "unit": "sequence", "seed": int},
     "<model>": {"role": "student"|"teacher", "checkpoint": path, "step": int, "train_log": path|null,
                 "held_out_tokens": N, "held_out_soft_tokens": M,
                 "ce" | "perplexity" | "soft_ce" | "kl_teacher_student" | "top1_agreement" | "ece":
                     {"value": float|null, "ci_low": float|null, "ci_high": float|null}},
     "differences": {"<a>-<b>": {metric: {value, ci_low, ci_high}}},  # paired, every pair of students in order
     "generations": [{"prompt": str, "reference": str|null, "outputs": {model: str}}]}

A value is null where it is undefined (no positions with a teacher top-k). Bad input (a missing checkpoint, a
vocabulary or TP size that does not match) exits 2 with a message naming the model, the file and what was
expected; nothing is written then.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from student import metrics
from student.specs import read_spec

for _message in ("Apex is not installed", "Transformer Engine and Apex", "CUDA_DEVICE_MAX_CONNECTIONS"):
    warnings.filterwarnings("ignore", message=f".*{_message}.*")

SCHEMA = "distill-eval/1"
RESERVED = frozenset({"schema", "models", "held_out", "bootstrap", "differences", "generations"})


class EvalError(ValueError):
    """An evaluation that cannot run as specified; the message names the model, file or field."""


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path
    role: Literal["student", "teacher"] = "student"
    train_log: Path | None = None


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    reference: str | None = None


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path
    tokenizer: Path
    models: dict[str, ModelEntry] = Field(min_length=1)
    out: Path
    tensor_parallel: int = Field(1, gt=0)
    seq_length: int | None = Field(None, gt=1)
    seed: int = 0
    prompts: list[Prompt] | None = None
    max_batches: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    bootstrap_samples: int = Field(gt=0)
    confidence: float = Field(gt=0, lt=1)
    ece_bins: int = Field(gt=0)
    generation_prompts: int = Field(ge=0)
    generation_tokens: int = Field(gt=0)
    prompt_tokens: int = Field(gt=0)


def load_spec(path: str | Path) -> EvalSpec:
    path = Path(path)
    spec = read_spec(path, EvalSpec, "evaluation", EvalError)
    clash = RESERVED & set(spec.models)
    if clash:
        raise EvalError(f"{path}: model names {sorted(clash)} are reserved keys of metrics.json")
    for field in ("data", "tokenizer"):
        if not getattr(spec, field).is_file():
            raise EvalError(f"{path}: field '{field}': file {getattr(spec, field)} not found")
    return spec


# --------------------------------------------------------------------------------------------- checks


def check_checkpoint(name: str, directory: Path, vocab_size: int, tp: int) -> dict[str, Any]:
    """The checkpoint's meta, or a clear error when it is missing or cannot run with this tokenizer / TP."""
    from student.checkpoint import CheckpointError, read_meta

    if not directory.is_dir():
        raise EvalError(f"model {name!r}: checkpoint directory {directory} not found")
    try:
        meta = read_meta(directory)
    except CheckpointError as exc:
        raise EvalError(f"model {name!r}: {exc}") from None
    if meta["vocab_size"] != vocab_size:
        raise EvalError(
            f"model {name!r}: checkpoint {directory} has a vocabulary of {meta['vocab_size']} tokens but the "
            f"evaluation tokenizer has {vocab_size}: it was trained with another tokenizer"
        )
    model = meta["model"]
    groups = model.get("num_query_groups") or model["num_attention_heads"]
    sizes = {
        "key/value heads": groups,
        "ffn_hidden_size": model["ffn_hidden_size"],
        "padded vocabulary": meta["padded_vocab_size"],
    }
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        detail = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise EvalError(
            f"model {name!r}: checkpoint {directory} (saved at TP={meta['tp']}) cannot run at "
            f"tensor_parallel={tp}: TP must divide {detail}"
        )
    return meta


# --------------------------------------------------------------------------------------------- data


def held_out_batches(spec: EvalSpec, tokenizer: Any, seq_length: int, dp_rank: int, dp: int) -> list[dict]:
    """This DP rank's held-out micro-batches (at most ``max_batches``), each with ``row``: the global row index
    of each sequence. Deterministic order; every row of the data at most once."""
    batch = spec.micro_batch_size
    if spec.data.suffix == ".npz":
        from student.batches import TokenBatches, TokenCorpus

        corpus = TokenCorpus.load(spec.data)
        if corpus.topk_ids is None:
            raise EvalError(
                f"{spec.data}: held-out token corpus has no teacher top-k (topk_ids/topk_logprobs)"
            )
        source = TokenBatches(
            corpus, seq_length, batch, seed=spec.seed, dp_rank=dp_rank, dp_size=dp, shuffle=False
        )
        total_rows = len(source.starts)
        count = min(spec.max_batches, -(-total_rows // (batch * dp)))
        batches: Iterator[dict[str, torch.Tensor]] = (source.micro_batch(i) for i in range(count))
    else:
        from storage.reader import PackedReader
        from teacher.alignment import vocab_mapper

        reader = PackedReader(
            spec.data,
            seq_len=seq_length,
            micro_batch_size=batch,
            map_vocab=vocab_mapper(tokenizer),
            encode=tokenizer.encode,
            seed=spec.seed,
            dp_rank=dp_rank,
            dp_size=dp,
            epochs=1,
            shuffle=False,
        )
        total_rows = None
        batches = islice(iter(reader), spec.max_batches)
    out = []
    for index, micro in enumerate(batches):
        rows = torch.arange(batch) + (index * dp + dp_rank) * batch
        if total_rows is not None:  # the token corpus wraps around: blank the rows past its end
            micro["loss_mask"] = micro["loss_mask"] * (rows < total_rows).unsqueeze(-1).to(micro["loss_mask"])
        out.append({**micro, "row": rows})
    return out


# --------------------------------------------------------------------------------------------- per token


def token_stats(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], vocab_size: int
) -> dict[str, torch.Tensor]:
    """Per-position values ``[N]`` from vocab-parallel logits ``[N, V_padded/TP]`` (every TP rank returns the same).

    ``batch`` holds flat ``labels`` [N], ``topk_ids`` / ``topk_logprobs`` [N, K]. Returns ``ce``, ``kl``,
    ``soft_ce`` (= teacher entropy over the bins + KL), ``agree``, ``confidence``, ``correct``.
    """
    from student.losses import topk_cross_entropy
    from student.losses.parallel import vocab_shard

    shard = vocab_shard(logits.shape[-1])
    columns = torch.arange(shard.start, shard.end, device=logits.device)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype).masked_fill(columns >= vocab_size, float("-inf"))
    labels, ids = batch["labels"].long(), batch["topk_ids"].long()
    zeros_w = torch.zeros(ids.shape, dtype=dtype, device=z.device)
    out = topk_cross_entropy(
        z, ids, batch["topk_logprobs"], zeros_w, zeros_w[:, 0], labels, None, 1.0, inplace=False
    )
    row_max = z.amax(-1)
    shard.all_reduce(row_max, dist.ReduceOp.MAX)
    column, held = shard.local_index(labels.unsqueeze(-1))
    z_label = z.gather(-1, column).masked_fill(~held, 0.0).squeeze(-1)
    partial = torch.stack([(z - row_max.unsqueeze(-1)).exp().sum(-1), z_label], -1)
    shard.all_reduce(partial)
    sum_exp, z_label = partial.unbind(-1)
    return {
        "ce": out.hard_ce,
        "kl": out.kl,
        "soft_ce": out.kl + out.teacher_entropy,
        "agree": out.top1_agree,
        "confidence": 1.0 / sum_exp,
        "correct": z_label == row_max,
    }


@torch.no_grad()
def evaluate_model(model: Any, batches: list[dict], vocab_size: int, desc: str) -> dict[str, np.ndarray]:
    """Per-token rows of one model over this rank's batches, as numpy arrays (``sequence`` = global row)."""
    from student.model import forward_logits

    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    for micro in tqdm(batches, desc=desc, disable=not _is_main(), leave=False):
        logits = forward_logits(
            model, micro["tokens"].to(device), micro["position_ids"].to(device), micro["doc_ids"].to(device)
        )
        flat = {
            "labels": micro["labels"].reshape(-1).to(device),
            "topk_ids": micro["topk_ids"].reshape(-1, micro["topk_ids"].shape[-1]).to(device),
            "topk_logprobs": micro["topk_logprobs"].reshape(-1, micro["topk_ids"].shape[-1]).to(device),
        }
        stats = token_stats(logits.reshape(-1, logits.shape[-1]), flat, vocab_size)
        seq_len = micro["tokens"].shape[1]
        hard = micro["loss_mask"].reshape(-1) > 0
        values = {
            **{k: v.cpu().numpy() for k, v in stats.items()},
            "sequence": micro["row"].repeat_interleave(seq_len).numpy(),
            "hard": hard.numpy(),
            "soft": (micro["soft_mask"].reshape(-1).bool() & hard).numpy(),
        }
        for key, value in values.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def gather_rows(rows: dict[str, np.ndarray], tp_rank: int) -> dict[str, np.ndarray] | None:
    """All DP ranks' rows on global rank 0 (TP ranks hold identical rows: only TP rank 0 sends)."""
    mine = rows if tp_rank == 0 else None
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    gathered = [None] * dist.get_world_size() if _is_main() else None
    dist.gather_object(mine, gathered, dst=0)
    if not _is_main():
        return None
    parts = [g for g in gathered if g is not None]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def to_token_rows(rows: dict[str, np.ndarray], keep: np.ndarray) -> tuple[metrics.TokenRows, int]:
    """Renumber sequences to the kept rows (those with at least one real label), same order for every model."""
    size = int(max(rows["sequence"].max(initial=-1), keep.max(initial=-1))) + 1
    renumber = np.full(size, -1, dtype=np.int64)
    renumber[keep] = np.arange(len(keep))
    sequence = renumber[rows["sequence"]]
    mask = sequence >= 0
    fields = {
        k: rows[k][mask] for k in ("hard", "soft", "ce", "soft_ce", "kl", "confidence", "correct", "agree")
    }
    return metrics.TokenRows(sequence=sequence[mask], **fields), len(keep)


# --------------------------------------------------------------------------------------------- generations


def default_prompts(batches: list[dict], tokenizer: Any, spec: EvalSpec) -> list[Prompt]:
    """Prompts from the first held-out rows: the first ``prompt_tokens`` tokens of the row's first document,
    the reference being the held-out tokens that followed them."""
    prompts: list[Prompt] = []
    for micro in batches:
        for tokens, doc_ids, mask in zip(micro["tokens"], micro["doc_ids"], micro["loss_mask"], strict=True):
            if len(prompts) >= spec.generation_prompts or mask.sum() == 0:
                continue
            doc = tokens[doc_ids == doc_ids[0]].tolist()
            cut = min(spec.prompt_tokens, max(1, len(doc) // 2))
            reference = doc[cut : cut + spec.generation_tokens]
            prompts.append(Prompt(prompt=tokenizer.decode(doc[:cut]), reference=tokenizer.decode(reference)))
    return prompts


def generate_samples(
    model: Any, settings: Any, tokenizer: Any, prompts: list[Prompt], spec: EvalSpec
) -> list[str]:
    """Greedy continuations (``student.inference``), the prompt cut from the left to fit the context."""
    from student.generation import SamplingParams
    from student.inference import InferenceModel

    runner = InferenceModel(model, settings, tokenizer)
    budget = max(1, settings.seq_length - spec.generation_tokens)
    encoded = [tokenizer.encode(p.prompt)[-budget:] or [tokenizer.eos_id] for p in prompts]
    params = [
        SamplingParams(max_tokens=min(spec.generation_tokens, settings.seq_length - len(e)), temperature=0.0)
        for e in encoded
    ]
    return [c.text for c in runner.generate(encoded, params)]


# --------------------------------------------------------------------------------------------- output


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _clean_metrics(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {m: {k: _clean(v) for k, v in entry.items()} for m, entry in table.items()}


def build_metrics(
    spec: EvalSpec,
    sums: dict[str, dict[str, np.ndarray]],
    metas: dict[str, dict[str, Any]],
    generations: list[dict[str, Any]],
    seq_length: int,
) -> dict[str, Any]:
    """The ``metrics.json`` document (module docstring) from per-sequence sums of every model."""
    first = next(iter(sums.values()))
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "models": list(spec.models),
        "held_out": {
            "data": str(spec.data),
            "snapshot_hash": _data_hash(spec.data),
            "sequences": len(first["tokens"]),
            "tokens": int(first["tokens"].sum()),
            "soft_tokens": int(first["soft_tokens"].sum()),
            "seq_length": seq_length,
        },
        "bootstrap": {
            "samples": spec.bootstrap_samples,
            "confidence": spec.confidence,
            "unit": "sequence",
            "seed": spec.seed,
        },
    }
    for name, entry in spec.models.items():
        table = metrics.summarize(sums[name], spec.bootstrap_samples, spec.confidence, spec.seed)
        result[name] = {
            "role": entry.role,
            "checkpoint": str(entry.checkpoint),
            "step": metas[name].get("step"),
            "train_log": str(entry.train_log) if entry.train_log else None,
            "held_out_tokens": int(sums[name]["tokens"].sum()),
            "held_out_soft_tokens": int(sums[name]["soft_tokens"].sum()),
            **_clean_metrics(table),
        }
    students = [n for n, e in spec.models.items() if e.role == "student"]
    result["differences"] = {
        f"{a}-{b}": _clean_metrics(
            metrics.paired_difference(sums[a], sums[b], spec.bootstrap_samples, spec.confidence, spec.seed)
        )
        for i, a in enumerate(students)
        for b in students[i + 1 :]
    }
    result["generations"] = generations
    return result


def _data_hash(path: Path) -> str | None:
    """The snapshot's content hash (a token corpus: the sha256 of its file), to tell held-out sets apart."""
    if path.suffix == ".npz":
        import hashlib

        return hashlib.sha256(path.read_bytes()).hexdigest()
    from storage.snapshot import load_snapshot

    return load_snapshot(path).content_hash


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(out: Path, document: dict[str, Any], sums: dict[str, dict[str, np.ndarray]]) -> None:
    """``metrics.json`` and ``per_sequence.npz`` (``<model>/<sum key>`` arrays, to redo any bootstrap)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{m}/{k}": v for m, table in sums.items() for k, v in table.items()}
    _atomic_write(out.with_name("per_sequence.npz"), lambda p: np.savez(p, **arrays))
    _atomic_write(
        out, lambda p: p.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", "utf-8")
    )


# --------------------------------------------------------------------------------------------- main


def run(spec: EvalSpec) -> dict[str, Any] | None:
    """Evaluate every model of ``spec``; returns the metrics document on global rank 0 (None elsewhere)."""
    from student.distributed import distributed
    from student.inference import InferenceModel
    from student.tokenizer import StudentTokenizer

    tokenizer = StudentTokenizer.load(spec.tokenizer)
    metas = {
        name: check_checkpoint(name, entry.checkpoint, tokenizer.vocab_size, spec.tensor_parallel)
        for name, entry in spec.models.items()
    }
    seq_length = spec.seq_length or next(iter(metas.values()))["model"]["seq_length"]
    with distributed(tp=spec.tensor_parallel) as env:
        batches = held_out_batches(spec, tokenizer, seq_length, env.dp_rank, env.dp)
        prompts = spec.prompts
        if prompts is None:
            holder = [default_prompts(batches, tokenizer, spec) if env.is_main else None]
            dist.broadcast_object_list(holder, src=0)
            prompts = holder[0]
        all_rows, outputs = {}, {}
        for name, entry in spec.models.items():
            loaded = InferenceModel.from_checkpoint(entry.checkpoint, tokenizer=spec.tokenizer)
            rows = evaluate_model(loaded.model, batches, tokenizer.vocab_size, desc=f"evaluate {name}")
            all_rows[name] = gather_rows(rows, env.tp_rank)
            outputs[name] = (
                generate_samples(loaded.model, loaded.settings, tokenizer, prompts, spec) if prompts else []
            )
            del loaded
        if not env.is_main:
            return None
    reference = next(iter(all_rows.values()))
    counted = np.bincount(
        reference["sequence"][reference["hard"]], minlength=int(reference["sequence"].max()) + 1
    )
    keep = np.flatnonzero(counted > 0)
    if len(keep) < 2:
        raise EvalError(
            f"{spec.data}: fewer than 2 held-out sequences with real labels ({len(keep)}); need more data"
        )
    sums = {}
    for name, rows in all_rows.items():
        token_rows, count = to_token_rows(rows, keep)
        sums[name] = metrics.per_sequence_sums(token_rows, count, spec.ece_bins)
    generations = [
        {"prompt": p.prompt, "reference": p.reference, "outputs": {n: outputs[n][i] for n in spec.models}}
        for i, p in enumerate(prompts)
    ]
    document = build_metrics(spec, sums, metas, generations, seq_length)
    write_outputs(spec.out, document, sums)
    return document


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node=TP*DP -m student.evaluate SPEC.json", file=sys.stderr)
        return 2
    from student.checkpoint import CheckpointError

    try:
        document = run(load_spec(argv[0]))
    except (EvalError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if document is not None:
        print(f"wrote {load_spec(argv[0]).out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
