"""Training entry point: ``torchrun --nproc-per-node=TP*DP -m student.train SPEC.json``.

SPEC is a JSON file (``TrainSpec``): ``model`` (ModelSettings), ``train`` (TrainSettings), ``loss``
(LossSettings), ``tokenizer`` (a tokenizer.json), ``train_data`` / ``val_data`` (a snapshot manifest read by
``storage.reader.PackedReader``, or a pre-tokenized ``.npz`` token corpus, see ``student.batches``),
``out_dir`` and optional ``resume`` (true: the newest checkpoint under ``out_dir/checkpoints`` if any; or a
checkpoint path).

``model.init`` (a Hugging Face Llama directory, ``student.hf_import``) starts the student from that checkpoint:
its architecture replaces the spec's (``seq_length`` and dropout stay), its weights are loaded before the
optimizer is made, and the checkpoints record the effective architecture. A resumed run builds the same
architecture and loads its own checkpoint instead.

One optimizer step: ``grad_accum_steps`` micro-batches per data-parallel rank; each micro-batch loss (a mean
over its tokens) is weighted by its share of the tokens of the *global* step (all micro-batches of all DP
ranks), so the step minimises the token mean of the global batch whatever the TP x DP grid or accumulation.
Gradients are summed over the DP group by megatron-core's DDP (bucketed, overlapped with the last backward),
clipped on the global norm (sharded parameters counted once per TP rank, replicated ones once), then AdamW and a
warmup + cosine schedule: megatron-core's distributed optimizer on CUDA (bf16 parameters with float32 main
weights by default, ``train.precision``), torch AdamW on CPU; see ``student.optim`` for why, and for the
checkpointed optimizer state that either path resumes.

Outputs in ``out_dir``: ``metrics.jsonl`` (one JSON object per line: ``step``, ``split`` train|val,
``loss``, ``lr``, ``tokens``, the loss's metrics, ``grad_norm`` for train), ``checkpoints/step_NNNNNN/``
(model + per-rank optimizer / scheduler / RNG / data position: a resumed run continues exactly),
``final/`` (model + tokenizer), ``train_summary.json`` and ``spec.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from storage.alignment import vocab_mapper
from storage.reader import PackedReader
from student import checkpoint as ckpt
from student.batches import TokenBatches, TokenCorpus
from student.distributed import (
    DistEnv,
    dp_group,
    init_distributed,
    rng_state,
    seed_everything,
    set_rng_state,
    teardown,
)
from student.hf_import import HFImportError, init_settings, load_hf_weights
from student.losses import METRIC_SUMS, distillation_loss
from student.losses.fused import OutputHead, fused_distillation_loss
from student.model import build_model, forward_hidden, forward_logits
from student.optim import TrainOptimizer, make_train_optimizer, resolve_precision
from student.settings import LossSettings, ModelSettings, TrainSettings
from student.specs import read_spec
from student.tokenizer import StudentTokenizer


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    tokenizer: Path
    train_data: Path
    val_data: Path | None = None
    out_dir: Path
    resume: bool | Path = False


class SpecError(ValueError):
    """A training spec that cannot be used; the message names the file and the field."""


def load_spec(path: str | Path) -> TrainSpec:
    path = Path(path)
    spec = read_spec(path, TrainSpec, "training", SpecError)
    for name in ("tokenizer", "train_data", "val_data"):
        value = getattr(spec, name)
        if value is not None and not value.is_file():
            raise SpecError(f"{path}: field '{name}': file {value} not found")
    try:
        effective_model(spec)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    try:
        resolve_precision(spec.train, torch.cuda.is_available())
    except ValueError as exc:
        raise SpecError(f"{path}: field 'train.precision': {exc}") from None
    return spec


def effective_model(spec: TrainSpec) -> ModelSettings:
    """The spec's model, or with ``model.init`` set the Hugging Face checkpoint's architecture (checked)."""
    if spec.model.init is None:
        return spec.model
    try:
        settings, vocab = init_settings(spec.model)
    except HFImportError as exc:
        raise SpecError(f"field 'model.init': {exc}") from None
    tokens = StudentTokenizer.load(spec.tokenizer).vocab_size
    if vocab != tokens:
        raise SpecError(
            f"field 'model.init': {spec.model.init} has vocab_size {vocab} but the tokenizer {spec.tokenizer} "
            f"has {tokens} tokens"
        )
    return settings


# --------------------------------------------------------------------------------------------- data


class Batches(Protocol):
    """An endless stream of micro-batches with a restorable data position (``TokenBatches``, ``PackedReader``)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_batches(
    path: Path, tokenizer: StudentTokenizer, spec: TrainSpec, env: DistEnv, train: bool
) -> Batches | PackedReader:
    """Training batches (shuffled, repeating) or validation batches (in order, one pass) from ``path``."""
    if path.suffix == ".npz":
        corpus = TokenCorpus.load(path)
        if int(corpus.tokens.max(initial=0)) >= tokenizer.vocab_size:
            raise SpecError(
                f"{path}: token ids reach {corpus.tokens.max()}, tokenizer has {tokenizer.vocab_size}"
            )
        return TokenBatches(
            corpus,
            spec.model.seq_length,
            spec.train.micro_batch_size,
            seed=spec.train.seed,
            dp_rank=env.dp_rank,
            dp_size=env.dp,
            shuffle=train,
        )
    return PackedReader(
        path,
        seq_len=spec.model.seq_length,
        micro_batch_size=spec.train.micro_batch_size,
        map_vocab=vocab_mapper(tokenizer),
        encode=tokenizer.encode,
        seed=spec.train.seed,
        dp_rank=env.dp_rank,
        dp_size=env.dp,
        epochs=None if train else 1,
        shuffle=train,
    )


# --------------------------------------------------------------------------------------------- step


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(env: DistEnv, settings: TrainSettings):
    """On CUDA in bf16: the parameters are bf16 already; autocast keeps softmax and norms in float32."""
    cuda = env.device.type == "cuda"
    return torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=cuda and resolve_precision(settings, cuda) == "bf16"
    )


def model_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    settings: TrainSettings,
    loss_settings: LossSettings,
    env: DistEnv,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``distillation_loss`` of the model on a batch; with ``fused_output_loss`` the output layer and the loss
    are one Function that never holds the logits (``student.losses.fused``; same loss and metrics)."""
    with _autocast(env, settings):
        if settings.fused_output_loss:
            hidden, weight = forward_hidden(model, batch["tokens"], batch["position_ids"], batch["doc_ids"])
            head = OutputHead(hidden, weight, model.true_vocab_size)
            return fused_distillation_loss(head, batch, loss_settings)
        logits = forward_logits(model, batch["tokens"], batch["position_ids"], batch["doc_ids"])
    return distillation_loss(logits, batch, loss_settings)


MEANS = {
    "hard_ce": ("hard_ce_sum", "tokens"),
    "kl": ("kl_sum", "soft_tokens"),
    "teacher_entropy": ("teacher_entropy_sum", "soft_tokens"),
    "top1_agreement": ("top1_agree_sum", "soft_tokens"),
}
"""Logged means of the loss's summed metrics (``student.losses.METRIC_SUMS``): numerator, count."""


class _Tally:
    """Sums of the loss's ``METRIC_SUMS`` (and of loss x tokens) over micro-batches and the DP group."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys((*METRIC_SUMS, "loss_sum"), 0.0)

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        for key in METRIC_SUMS:
            self.sums[key] += float(metrics[key])
        self.sums["loss_sum"] += float(loss) * float(metrics["tokens"])

    def reduce(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values, group=dp_group())
        sums = dict(zip(keys, values.tolist(), strict=True))
        out = {"loss": sums["loss_sum"] / sums["tokens"] if sums["tokens"] else None}
        for name, (numerator, count) in MEANS.items():
            out[name] = sums[numerator] / sums[count] if sums[count] else None
        return {**out, "step_tokens": sums["tokens"], "soft_tokens": sums["soft_tokens"]}


def train_step(
    model: torch.nn.Module,
    optimizer: TrainOptimizer,
    microbatches: list[dict[str, torch.Tensor]],
    settings: TrainSettings,
    loss_settings: LossSettings,
    env: DistEnv,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the global token-mean loss and metrics.

    Each micro-batch back-propagates its loss *sum* (mean x contributing tokens); after the DP reduction the
    gradient is divided by the step's total token count, so it is the gradient of the global token mean.
    """
    model.train()
    optimizer.zero_grad()
    tally = _Tally()
    for index, mb in enumerate(microbatches):
        batch = _to_device(mb, env.device)
        loss, metrics = model_loss(model, batch, settings, loss_settings, env)
        with optimizer.backward_context(last=index == len(microbatches) - 1):
            (loss * metrics["tokens"]).backward()
        tally.add(loss.detach(), metrics)
    result = tally.reduce(env.device)
    grad_norm, lr = optimizer.step(1.0 / max(result["step_tokens"], 1.0))
    return {**result, "lr": lr, "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    settings: TrainSettings,
    loss_settings: LossSettings,
    env: DistEnv,
    max_batches: int,
) -> dict[str, float]:
    model.eval()
    tally = _Tally()
    for mb in islice(batches, max_batches):
        batch = _to_device(mb, env.device)
        loss, metrics = model_loss(model, batch, settings, loss_settings, env)
        tally.add(loss, metrics)
    return tally.reduce(env.device)


# --------------------------------------------------------------------------------------------- run


class MetricsLog:
    """``metrics.jsonl`` on rank 0; on resume, lines after the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [
                ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step
            ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _format(record: dict[str, Any]) -> str:
    shown = {k: v for k, v in record.items() if k not in ("split", "step") and v is not None}
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    return f"[{record['split']} step {record['step']}] " + " ".join(parts)


def _resume_from(spec: TrainSpec) -> Path | None:
    if spec.resume is False:
        return None
    if spec.resume is True:
        return ckpt.latest_checkpoint(spec.out_dir / "checkpoints")
    return spec.resume


def _clear_previous_run(out: Path) -> None:
    """A fresh (not resumed) run into a used ``out_dir`` starts clean: no stale checkpoint can be resumed later."""
    for stale in (out / "checkpoints", out / "final", out / "train_summary.json"):
        if stale.exists():
            print(f"fresh run: removing {stale} of an earlier run", file=sys.stderr)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if (p / ckpt.META).is_file())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def run(spec: TrainSpec) -> dict[str, Any]:
    """Train as one rank of the torchrun job; returns (and on rank 0 writes) the run summary."""
    settings = spec.train
    torch.set_num_threads(settings.threads_per_rank)
    env = init_distributed(settings.tensor_parallel, settings.data_parallel)
    try:
        return _train(spec, env)
    finally:
        teardown()


def _train(spec: TrainSpec, env: DistEnv) -> dict[str, Any]:
    settings = spec.train
    out = spec.out_dir
    resume = _resume_from(spec)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(spec.model_dump_json(indent=2))
        if resume is None:
            _clear_previous_run(out)
    seed_everything(settings.seed)
    tokenizer = StudentTokenizer.load(spec.tokenizer)
    model_settings = effective_model(spec)
    model = build_model(model_settings, tokenizer.vocab_size)
    if resume is not None:
        ckpt.load_model_weights(model, resume)
    elif model_settings.init is not None:
        load_hf_weights(model, model_settings.init, model_settings)
    optimizer = make_train_optimizer(model, settings, env)  # after the float32 weights are in place
    train_batches = make_batches(spec.train_data, tokenizer, spec, env, train=True)

    step, tokens_seen = 0, 0.0
    if resume is not None:
        state = ckpt.load_train_state(resume)
        optimizer.load_state_dict(state)
        set_rng_state(state["rng"])
        train_batches.load_state_dict(state["data"])
        step, tokens_seen = state["step"], state["tokens"]
    log = MetricsLog(out / "metrics.jsonl", env.is_main, step)

    def emit(record: dict[str, Any]) -> None:
        log.write(record)
        if env.is_main:
            tqdm.write(_format(record))

    def save(directory: Path, with_state: bool) -> None:
        states = None
        if with_state:
            states = {
                "step": step,
                "data": train_batches.state_dict(),
                "tokens": tokens_seen,
                **optimizer.state_dict(),  # "optimizer" and "scheduler"
                "rng": rng_state(),
            }
        with optimizer.float32_weights():
            ckpt.save_checkpoint(
                directory,
                model,
                model_settings,
                step,
                train_states=states,
                tokenizer=spec.tokenizer,
                extra={"loss": spec.loss.model_dump(), "tokens": tokens_seen},
            )

    def validate() -> dict[str, float] | None:
        if spec.val_data is None:
            return None
        val_batches = make_batches(spec.val_data, tokenizer, spec, env, train=False)
        result = evaluate(model, val_batches, settings, spec.loss, env, settings.eval_batches)
        result["eval_tokens"] = result.pop("step_tokens")
        emit(
            {
                "step": step,
                "split": "val",
                **result,
                "lr": optimizer.scheduler.get_last_lr()[0],
                "tokens": tokens_seen,
            }
        )
        return result

    if resume is None:
        validate()
    stream = iter(train_batches)
    started, start_tokens = time.perf_counter(), tokens_seen
    last_train: dict[str, float] = {}
    last_val: dict[str, float] | None = None
    bar = tqdm(total=settings.steps, initial=step, disable=not env.is_main, desc="train", unit="step")
    while step < settings.steps:
        micro = list(islice(stream, settings.grad_accum_steps))
        result = train_step(model, optimizer, micro, settings, spec.loss, env)
        step += 1
        tokens_seen += result["step_tokens"]
        last_train = result
        bar.update(1)
        if result["loss"] is not None:
            bar.set_postfix(loss=f"{result['loss']:.4f}")
        if step % settings.log_every == 0 or step == settings.steps:
            emit({"step": step, "split": "train", **result, "tokens": tokens_seen})
        if step % settings.eval_every == 0 or step == settings.steps:
            last_val = validate() or last_val
        if step % settings.checkpoint_every == 0 and step < settings.steps:
            save(out / "checkpoints" / f"step_{step:06d}", with_state=True)
            if env.is_main:
                _prune_checkpoints(out / "checkpoints", settings.keep_checkpoints)
    bar.close()
    elapsed = time.perf_counter() - started
    save(out / "checkpoints" / f"step_{step:06d}", with_state=True)
    save(out / "final", with_state=False)
    summary = {
        "steps": step,
        "tokens": tokens_seen,
        "train_loss": last_train.get("loss"),
        "val_loss": last_val["loss"] if last_val else None,
        "seconds": elapsed,
        "tokens_per_s": (tokens_seen - start_tokens) / elapsed if elapsed > 0 else None,
        "resumed_from": str(resume) if resume else None,
        "tensor_parallel": env.tp,
        "data_parallel": env.dp,
        "device": env.device.type,
        "precision": resolve_precision(settings, env.device.type == "cuda"),
        "loss": spec.loss.model_dump(),
        "final_checkpoint": "final",  # relative: the pipeline renames this folder once the stage is complete
    }
    coverage = getattr(train_batches, "coverage", None)
    if coverage is not None:  # teacher top-k entries that map onto one student token (the reader's mapping)
        summary["alignment"] = {
            "entries_kept": coverage.kept,
            "entries_dropped": coverage.dropped,
            "coverage": coverage.fraction_kept,
            "tokens_spelled_in_pieces": coverage.expanded_tokens,
        }
    if env.is_main:
        _prune_checkpoints(out / "checkpoints", settings.keep_checkpoints)
        tmp = out / "train_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "train_summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun --nproc-per-node=TP*DP -m student.train SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = load_spec(args[0])
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
