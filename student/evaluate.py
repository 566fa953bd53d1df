"""Held-out evaluation entry point: ``torchrun --nproc-per-node=TP*DP -m student.evaluate SPEC.json``.

SPEC is a JSON file (``EvalSpec``):

- ``data``: the held-out data, never trained on: a snapshot manifest or a pre-tokenized ``.npz`` token corpus
  with teacher top-k (``student.heldout.load_documents``);
- ``tokenizer``: the student ``tokenizer.json``; ``models``: ``{name: {checkpoint, role, train_log, group,
  seed}}`` in report order. ``role`` = ``student`` | ``teacher``; a teacher that is a project checkpoint or a
  Hugging Face Llama directory (dispatch on ``config.json`` in it) is evaluated by the same code and gives the
  full-vocabulary metrics. Models with the same ``group`` are one student trained once per ``seed``;
- ``clusters``: optional JSON ``{sample_id: source file}``: held-out documents are clustered by source file for
  the bootstrap (a document without an entry is its own cluster);
- ``out``: where ``metrics.json`` goes (``per_cluster.npz`` is written beside it);
- ``tensor_parallel``, ``seq_length`` (cap on each model's own context), ``seed``, ``prompts`` (optional list
  of ``{prompt, reference}``) and the fields of ``pipeline.config.EvaluateSettings``.

No context cuts: every model sees every held-out document in its own rows (sliding windows at its own context
length for longer documents, ``student.heldout``), so each label is scored with its document's context. Per
label: the loss's own vocab-parallel kernel (``student.losses.topk_cross_entropy``: hard CE, KL over top-k +
tail bins, teacher entropy, top-1 agreement), the student's top-1 probability and correctness (ECE), and, when
the teacher model is available and shares the students' tokenizer, KL(teacher||student) over the whole
vocabulary (vocab-parallel log-softmax of both, one all-reduce per reduction; the teacher's log-probabilities
of a chunk of documents are kept while every model scores that chunk). Rows of the padded vocabulary are
masked out.

``metrics.json`` (schema ``distill-eval/2``)::

    {"schema": "distill-eval/2", "models": ["soft", "hard", "teacher"], "seeds": [...],
     "held_out": {"data", "snapshot_hash", "documents", "clusters", "tokens", "soft_tokens",
                  "context": {model: {"length", "stride"}},
                  "teacher_topk_mass_mean": E, "actual_in_teacher_topk_rate": E},
     "bootstrap": {"samples", "confidence", "unit", "method", "seed"},
     "full_vocab": {"available": bool, "teacher": name|null, "reason": str|null},
     "mass_buckets": [edges of W],
     "<model>": {"role", "runs": [{"name", "seed", "checkpoint", "step", "train_log"}], "train_log",
                 "held_out_tokens", "held_out_soft_tokens", <metric>: E for every ``student.metrics.METRICS``,
                 "by_teacher_mass": [{"low", "high", "tokens", "ce": E, "kl_teacher_student": E,
                                      "full_kl_teacher_student": E}]},
     "differences": {"<a>-<b>": {metric: E}},     # paired, every pair of students in order
     "generations": [{"prompt", "reference", "outputs": {model name: str}}]}

where E = ``{"value", "ci_low", "ci_high", "spread", "seeds": [per-seed values]}`` (``student.metrics``: mean
over seeds, their standard deviation, and the interval of the clustered, seed-aware bootstrap). A value is
null where it is undefined (no positions with a teacher top-k; no teacher model for the full-vocabulary KL:
``full_vocab.reason`` says why). Bad input (a missing checkpoint, a vocabulary or TP size that does not match)
exits 2 with a message naming the model, the file and what was expected; nothing is written then.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from student import metrics
from student.heldout import Documents, document_windows, load_documents, window_batch
from student.specs import read_spec

SCHEMA = "distill-eval/2"
RESERVED = frozenset(
    {
        "schema",
        "models",
        "seeds",
        "held_out",
        "bootstrap",
        "full_vocab",
        "mass_buckets",
        "differences",
        "generations",
    }
)


class EvalError(ValueError):
    """An evaluation that cannot run as specified; the message names the model, file or field."""


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path
    role: Literal["student", "teacher"] = "student"
    train_log: Path | None = None
    group: str | None = None
    seed: int | None = None


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
    seeds: list[int] = Field(default_factory=list)
    window_stride: float = Field(0.5, gt=0, le=1)
    mass_buckets: list[float] = Field(default_factory=lambda: [0.5, 0.8, 0.95])
    clusters: Path | None = None


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


def log_softmax_parallel(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This TP rank's slice of log-softmax over the tokenizer's vocabulary (padding rows -inf), float64."""
    from student.losses.parallel import vocab_shard

    shard = vocab_shard(logits.shape[-1])
    columns = torch.arange(shard.start, shard.end, device=logits.device)
    z = logits.to(torch.float64).masked_fill(columns >= vocab_size, float("-inf"))
    row_max = z.amax(-1)
    shard.all_reduce(row_max, dist.ReduceOp.MAX)
    sum_exp = (z - row_max.unsqueeze(-1)).exp().sum(-1)
    shard.all_reduce(sum_exp)
    return z - (row_max + sum_exp.log()).unsqueeze(-1)


def full_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher||student) over the whole vocabulary per row, from vocab-parallel log-softmax slices [N, V/TP]
    (one SUM all-reduce of [N]); 0 log 0 = 0."""
    from student.losses.parallel import vocab_shard

    p = teacher_logprobs.exp()
    terms = torch.where(p > 0, p * (teacher_logprobs - student_logprobs), torch.zeros_like(p))
    out = terms.sum(-1)
    vocab_shard(teacher_logprobs.shape[-1]).all_reduce(out)
    return out


def gather_vocab(local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, vocab_size]: a vocab-parallel slice [N, V_padded/TP] gathered over the TP group, padding cut off.
    Used when two models' padded vocabularies differ (checkpoints saved at different TP sizes), so their slices
    do not cover the same ids."""
    from student.losses.parallel import vocab_shard

    shard = vocab_shard(local.shape[-1])
    if shard.group is None:
        return local[:, :vocab_size]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(parts, local.contiguous(), group=shard.group)
    return torch.cat(parts, -1)[:, :vocab_size]


def full_kl_any(teacher: torch.Tensor, student: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``full_kl`` of two slices; gathered to the whole vocabulary first when their layouts differ."""
    if teacher.shape[-1] == student.shape[-1]:
        return full_kl(teacher, student)
    t, q = gather_vocab(teacher, vocab_size), gather_vocab(student, vocab_size)
    p = t.exp()
    return torch.where(p > 0, p * (t - q), torch.zeros_like(p)).sum(-1)


VALUE_FIELDS = ("ce", "soft_ce", "kl", "agree", "confidence", "correct", "full_kl")


def _model_forward(runner: Any, micro: dict[str, torch.Tensor]) -> torch.Tensor:
    from student.model import forward_logits

    device = next(runner.model.parameters()).device
    logits = forward_logits(
        runner.model,
        micro["tokens"].to(device),
        micro["position_ids"].to(device),
        micro["doc_ids"].to(device),
    )
    return logits.reshape(-1, logits.shape[-1])


@dataclass
class TeacherCache:
    """The teacher's full-vocabulary log-probabilities (this rank's slice) of one chunk's scored labels."""

    row_of_key: np.ndarray  # [L] -> row of ``logprobs``, -1: not in this chunk
    logprobs: torch.Tensor  # [n, V/TP] float64


def context_of(runner: Any, spec: EvalSpec) -> tuple[int, int]:
    """(context, stride) of a model's held-out windows: its own context length (``seq_length`` caps it)."""
    context = (
        runner.settings.seq_length if spec.seq_length is None else min(spec.seq_length, runner.max_length)
    )
    return context, max(1, int(context * spec.window_stride))


def _batches(docs: Documents, chunk: range, context: int, stride: int, size: int):
    chosen = document_windows(docs, chunk, context, stride)
    for i in range(0, len(chosen), size):
        yield window_batch(docs, chosen[i : i + size], context, size)


CACHE_BYTES = 256 << 20
"""Memory for one chunk's full-vocabulary float64 log-probabilities (the teacher's, then each student's): at a
real vocabulary (SmolLM2: 49,152) eight documents of 300 tokens would hold about 1 GB per copy."""


def document_chunks(docs: Documents, max_docs: int, vocab_size: int) -> list[range]:
    """Consecutive documents grouped so that a chunk holds at most ``max_docs`` documents and (unless one
    document alone is longer) at most ``CACHE_BYTES`` of float64 log-probabilities over the vocabulary."""
    budget = max(1, CACHE_BYTES // (8 * vocab_size))
    lengths = np.diff(docs.offsets)
    chunks, first, tokens = [], 0, 0
    for index, length in enumerate(lengths):
        if index > first and (index - first >= max_docs or tokens + length > budget):
            chunks.append(range(first, index))
            first, tokens = index, 0
        tokens += int(length)
    if first < len(lengths):
        chunks.append(range(first, len(lengths)))
    return chunks


@torch.no_grad()
def teacher_cache(
    runner: Any, docs: Documents, chunk: range, spec: EvalSpec, vocab_size: int
) -> TeacherCache:
    context, stride = context_of(runner, spec)
    keys, parts = [], []
    for micro in _batches(docs, chunk, context, stride, spec.micro_batch_size):
        key = micro["key"].reshape(-1)
        scored = key >= 0
        logprobs = log_softmax_parallel(_model_forward(runner, micro), vocab_size)
        keys.append(key[scored].numpy())
        parts.append(logprobs[scored.to(logprobs.device)])
    row_of_key = np.full(len(docs.tokens), -1, np.int64)
    flat = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    row_of_key[flat] = np.arange(len(flat))
    return TeacherCache(row_of_key, torch.cat(parts) if parts else torch.zeros(0, 1, dtype=torch.float64))


@torch.no_grad()
def score_model(
    runner: Any,
    docs: Documents,
    chunk: range,
    spec: EvalSpec,
    vocab_size: int,
    cache: TeacherCache | None,
    out: dict[str, np.ndarray],
) -> None:
    """Per-label values of one model on one chunk of documents, written into ``out`` at each label's key."""
    context, stride = context_of(runner, spec)
    for micro in _batches(docs, chunk, context, stride, spec.micro_batch_size):
        key = micro["key"].reshape(-1)
        scored = key >= 0
        logits = _model_forward(runner, micro)
        k = micro["topk_ids"].shape[-1]
        device = logits.device
        flat = {
            "labels": micro["labels"].reshape(-1).to(device),
            "topk_ids": micro["topk_ids"].reshape(-1, k).to(device),
            "topk_logprobs": micro["topk_logprobs"].reshape(-1, k).to(device),
        }
        stats = token_stats(logits, flat, vocab_size)
        where = key[scored].numpy()
        for name, value in stats.items():
            out[name][where] = value[scored.to(device)].double().cpu().numpy()
        if cache is not None:
            student = log_softmax_parallel(logits[scored.to(device)], vocab_size)
            teacher = cache.logprobs[torch.from_numpy(cache.row_of_key[where]).to(device)]
            out["full_kl"][where] = full_kl_any(teacher, student, vocab_size).cpu().numpy()


def merge_ranks(
    values: dict[str, dict[str, np.ndarray]], tp_rank: int
) -> dict[str, dict[str, np.ndarray]] | None:
    """Every DP rank's values on global rank 0 (each label was scored by one DP rank; TP ranks are identical)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    gathered = [None] * dist.get_world_size() if _is_main() else None
    dist.gather_object(values if tp_rank == 0 else None, gathered, dst=0)
    if not _is_main():
        return None
    parts = [g for g in gathered if g is not None]
    merged = parts[0]
    for part in parts[1:]:
        for name, table in part.items():
            for field, array in table.items():
                merged[name][field] = np.where(np.isnan(array), merged[name][field], array)
    return merged


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------- generations


def default_prompts(docs: Documents, tokenizer: Any, spec: EvalSpec) -> list[Prompt]:
    """Prompts from the first held-out documents: their first ``prompt_tokens`` tokens (at most half the
    document), the reference being the held-out tokens that followed them."""
    prompts: list[Prompt] = []
    for d in range(len(docs)):
        if len(prompts) >= spec.generation_prompts:
            break
        doc = docs.tokens[docs.offsets[d] : docs.offsets[d + 1]].tolist()
        if len(doc) < 2:
            continue
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


def clusters_of(docs: Documents, mapping: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """The cluster index of each document (its source file from ``mapping``; a document without one is its
    own cluster) and the cluster names."""
    names: dict[str, int] = {}
    index = np.empty(len(docs), np.int64)
    for d, sample in enumerate(docs.sample_ids):
        name = mapping.get(sample) if sample is not None else None
        name = name if name is not None else f"document:{sample if sample is not None else d}"
        index[d] = names.setdefault(name, len(names))
    return index, list(names)


def token_rows(docs: Documents, values: dict[str, np.ndarray], doc_cluster: np.ndarray) -> metrics.TokenRows:
    """One model's per-label values over every label of the documents (the data's facts attached)."""
    facts = docs.label_facts()
    scored = facts["hard"] & np.isfinite(values["ce"])
    doc_of_token = np.repeat(np.arange(len(docs)), np.diff(docs.offsets))
    pick = np.flatnonzero(scored)
    return metrics.TokenRows(
        cluster=doc_cluster[doc_of_token[pick]],
        hard=np.ones(len(pick), bool),
        soft=facts["soft"][pick],
        ce=values["ce"][pick],
        soft_ce=values["soft_ce"][pick],
        kl=values["kl"][pick],
        confidence=values["confidence"][pick],
        correct=values["correct"][pick] > 0,
        agree=values["agree"][pick] > 0,
        full_kl=values["full_kl"][pick],
        topk_mass=facts["topk_mass"][pick],
        in_topk=facts["in_topk"][pick],
    )


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def model_groups(spec: EvalSpec) -> dict[str, list[str]]:
    """Report name -> the spec's models of it in seed order (a student trained once per seed is one group)."""
    groups: dict[str, list[str]] = {}
    for name, entry in spec.models.items():
        groups.setdefault(entry.group or name, []).append(name)
    return groups


def build_metrics(
    spec: EvalSpec,
    rows: dict[str, metrics.TokenRows],
    clusters: list[str],
    metas: dict[str, dict[str, Any]],
    generations: list[dict[str, Any]],
    contexts: dict[str, tuple[int, int]],
    full_vocab: dict[str, Any],
    documents: int,
) -> dict[str, Any]:
    """The ``metrics.json`` document (module docstring) from every model's per-label rows."""
    n = len(clusters)
    sums = {name: metrics.per_cluster_sums(r, n, spec.ece_bins) for name, r in rows.items()}
    groups = model_groups(spec)
    boot = (spec.bootstrap_samples, spec.confidence, spec.seed)
    first = next(iter(sums.values()))
    data = metrics.summarize_runs([first], *boot)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "models": list(groups),
        "seeds": spec.seeds,
        "held_out": {
            "data": str(spec.data),
            "snapshot_hash": _data_hash(spec.data),
            "documents": documents,
            "clusters": n,
            "tokens": int(first["tokens"].sum()),
            "soft_tokens": int(first["soft_tokens"].sum()),
            "context": {name: {"length": c, "stride": s} for name, (c, s) in contexts.items()},
            **{key: data[key] for key in metrics.DATA_METRICS},
        },
        "bootstrap": {
            "samples": spec.bootstrap_samples,
            "confidence": spec.confidence,
            "unit": "source file (documents clustered by source file) x training seed",
            "method": (
                "each replicate draws the held-out source files with replacement (the same draw for every "
                "model) and the training seeds with replacement (the same seed indices for both models of a "
                "difference), averages each seed's metric on the drawn files over the drawn seeds, its seed "
                "part scaled by sqrt(J/(J-1)); percentile interval. One seed: held-out sampling only."
            ),
            "seed": spec.seed,
        },
        "full_vocab": full_vocab,
        "mass_buckets": spec.mass_buckets,
    }
    for group, members in groups.items():
        entries = [spec.models[m] for m in members]
        table = metrics.summarize_runs([sums[m] for m in members], *boot)
        result[group] = {
            "role": entries[0].role,
            "runs": [
                {
                    "name": m,
                    "seed": spec.models[m].seed,
                    "checkpoint": str(spec.models[m].checkpoint),
                    "step": metas[m].get("step"),
                    "train_log": str(spec.models[m].train_log) if spec.models[m].train_log else None,
                }
                for m in members
            ],
            "train_log": str(entries[0].train_log) if entries[0].train_log else None,
            "held_out_tokens": int(sums[members[0]]["tokens"].sum()),
            "held_out_soft_tokens": int(sums[members[0]]["soft_tokens"].sum()),
            **{key: table[key] for key in metrics.METRICS},
            "by_teacher_mass": _breakdown(rows, members, n, spec),
        }
    students = [g for g, members in groups.items() if spec.models[members[0]].role == "student"]
    result["differences"] = {
        f"{a}-{b}": {
            key: value
            for key, value in metrics.difference_runs(
                [sums[m] for m in groups[a]], [sums[m] for m in groups[b]], *boot
            ).items()
            if key in metrics.METRICS
        }
        for i, a in enumerate(students)
        for b in students[i + 1 :]
    }
    result["generations"] = generations
    return _clean(result)


def _breakdown(rows: dict[str, metrics.TokenRows], members: list[str], n: int, spec: EvalSpec) -> list[dict]:
    """The breakdown metrics per bucket of the teacher's top-k mass W (soft positions only)."""
    out = []
    edges = [0.0, *spec.mass_buckets, 1.0]
    for bucket in range(len(spec.mass_buckets) + 1):
        runs = []
        for m in members:
            r = rows[m]
            mass = np.nan_to_num(r.topk_mass, nan=-1.0)
            mask = r.soft & (metrics.mass_buckets(mass, spec.mass_buckets) == bucket) & (mass >= 0)
            runs.append(metrics.per_cluster_sums(r.select(mask), n, spec.ece_bins))
        table = metrics.summarize_runs(runs, spec.bootstrap_samples, spec.confidence, spec.seed)
        out.append(
            {
                "low": edges[bucket],
                "high": edges[bucket + 1],
                "tokens": int(runs[0]["tokens"].sum()),
                **{key: table[key] for key in metrics.BREAKDOWN_METRICS},
            }
        )
    return out


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


def write_outputs(out: Path, document: dict[str, Any], rows: dict[str, metrics.TokenRows], n: int, bins: int):
    """``metrics.json`` and ``per_cluster.npz`` (``<model>/<sum key>`` arrays, to redo any bootstrap)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{m}/{k}": v for m, r in rows.items() for k, v in metrics.per_cluster_sums(r, n, bins).items()}
    _atomic_write(out.with_name("per_cluster.npz"), lambda p: np.savez(p, **arrays))
    _atomic_write(
        out, lambda p: p.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", "utf-8")
    )


def is_hf_directory(directory: Path) -> bool:
    """A Hugging Face model directory (``config.json``) rather than a project checkpoint."""
    return (Path(directory) / "config.json").is_file()


def load_model(name: str, entry: ModelEntry, tokenizer_path: Path) -> Any:
    from student.inference import InferenceModel

    if is_hf_directory(entry.checkpoint):
        return InferenceModel.from_hf(entry.checkpoint)
    return InferenceModel.from_checkpoint(entry.checkpoint, tokenizer=tokenizer_path)


def full_vocab_reason(teacher: str | None, runners: dict[str, Any], tokenizer: Any) -> str | None:
    """Why KL(teacher||student) over the whole vocabulary cannot be given (None: it can)."""
    if teacher is None:
        return (
            "the teacher is an API that returns only its top-k: KL(teacher||student) over the whole "
            "vocabulary cannot be computed (the top-k + tail bins KL, the CE outside the teacher's top-k, the "
            "top-k mass W and the in-top-k rate are given)"
        )
    runner = runners[teacher]
    if runner.tokenizer.vocab_bytes() != tokenizer.vocab_bytes():
        return (
            f"the teacher '{teacher}' has another tokenizer than the students: distributions over different "
            "vocabularies have no token-by-token KL, so it is not given"
        )
    return None


def run(spec: EvalSpec) -> dict[str, Any] | None:
    """Evaluate every model of ``spec``; returns the metrics document on global rank 0 (None elsewhere)."""
    from student.distributed import distributed
    from student.tokenizer import StudentTokenizer

    tokenizer = StudentTokenizer.load(spec.tokenizer)
    metas = {
        name: {}
        if is_hf_directory(entry.checkpoint)
        else check_checkpoint(name, entry.checkpoint, tokenizer.vocab_size, spec.tensor_parallel)
        for name, entry in spec.models.items()
    }
    try:
        docs = load_documents(spec.data, tokenizer)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    docs = docs.head(spec.max_batches * spec.micro_batch_size)
    teacher = next((n for n, e in spec.models.items() if e.role == "teacher"), None)
    with distributed(tp=spec.tensor_parallel) as env:
        runners = {name: load_model(name, entry, spec.tokenizer) for name, entry in spec.models.items()}
        reason = full_vocab_reason(teacher, runners, tokenizer)
        values = {name: {f: np.full(len(docs.tokens), np.nan) for f in VALUE_FIELDS} for name in spec.models}
        for number, chunk in enumerate(document_chunks(docs, spec.micro_batch_size, tokenizer.vocab_size)):
            if number % env.dp != env.dp_rank:
                continue
            cache = None
            if reason is None:
                cache = teacher_cache(runners[teacher], docs, chunk, spec, tokenizer.vocab_size)
            for name, runner in runners.items():
                score_model(runner, docs, chunk, spec, tokenizer.vocab_size, cache, values[name])
        prompts = spec.prompts if spec.prompts is not None else default_prompts(docs, tokenizer, spec)
        outputs = {
            name: generate_samples(r.model, r.settings, tokenizer, prompts, spec) if prompts else []
            for name, r in runners.items()
        }
        contexts = {name: context_of(r, spec) for name, r in runners.items()}
        merged = merge_ranks(values, env.tp_rank)
        if not env.is_main:
            return None
    mapping = json.loads(spec.clusters.read_text(encoding="utf-8")) if spec.clusters else {}
    doc_cluster, clusters = clusters_of(docs, mapping)
    if len(clusters) < 2:
        raise EvalError(
            f"{spec.data}: the held-out documents come from {len(clusters)} source file(s); a clustered "
            "bootstrap needs at least 2: hold out more data"
        )
    rows = {name: token_rows(docs, merged[name], doc_cluster) for name in spec.models}
    generations = [
        {"prompt": p.prompt, "reference": p.reference, "outputs": {n: outputs[n][i] for n in spec.models}}
        for i, p in enumerate(prompts)
    ]
    full = {"available": reason is None, "teacher": teacher, "reason": reason}
    document = build_metrics(spec, rows, clusters, metas, generations, contexts, full, len(docs))
    write_outputs(spec.out, document, rows, len(clusters), spec.ece_bins)
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
