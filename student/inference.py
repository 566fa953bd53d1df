"""Inference with the student model at any tensor-parallel size: evaluation logits and text generation.

Public API (call after ``student.distributed.init_distributed``; under torchrun every TP rank makes the same
calls with the same arguments):

- ``InferenceModel.from_checkpoint(directory)``: the model saved by ``student.checkpoint`` at whatever TP size,
  resharded to the current one, with the tokenizer stored beside it (or ``tokenizer=`` a ``tokenizer.json``).
- ``InferenceModel.from_hf(directory, tokenizer=None)``: a Hugging Face ``LlamaForCausalLM`` directory
  (``student.hf_import``) at the current TP size, with the directory's ``tokenizer.json`` unless one is given.
- ``InferenceModel.random_init(model_settings, tokenizer, seed)``: a seeded, untrained model (tests and
  benchmarks serve a real model without training one); the same seed gives the same weights at any TP.
- ``model.logits(token_lists)``: full-vocabulary logits ``[len_i, V]`` (float32, padding rows of the
  vocabulary dropped) for a batch of variable-length token lists, run as one right-padded forward.
- ``model.logits_at(token_lists, positions)``: the same for chosen positions only. Under TP the
  vocabulary-parallel logits are gathered (megatron's ``gather_from_tensor_model_parallel_region``) for those
  rows only.
- ``model.generate(prompts, params)``: greedy / temperature / top-p / seed / stop / max_tokens decoding of
  ``student.generation``, all prompts as one batch.
- ``model.decoder()``: a ``student.generation.Decoder`` over this model, for callers that batch themselves
  (the local teacher server).

Generation uses megatron-core's KV cache (``StaticInferenceContext``): prompts are **left**-padded so that all
rows advance at the same cache offset, pad keys are masked out, and each step feeds one token per row. RoPE
scores depend only on the offset between two positions, so left padding changes no logit (the tests check
cached decoding against a full recomputation). The output layer returns gathered logits (megatron's inference
path requires it), only for the last position of each step, or every prompt position when prompt logprobs
are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from student.checkpoint import CheckpointError, load_checkpoint
from student.distributed import seed_everything
from student.generation import Completion, Decoder, SamplingParams
from student.model import build_model, forward_logits
from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer


def _tokenizer_of(
    directory: Path, tokenizer: str | Path | None, error: type[Exception]
) -> tuple[Path, StudentTokenizer]:
    """The given tokenizer, else the ``tokenizer.json`` inside the model directory (``error`` when absent)."""
    path = Path(tokenizer) if tokenizer is not None else directory / "tokenizer.json"
    if not path.is_file():
        raise error(f"{directory}: no tokenizer.json inside; pass the tokenizer explicitly")
    return path, StudentTokenizer.load(path)


@dataclass
class InferenceModel:
    model: GPTModel
    settings: ModelSettings
    tokenizer: StudentTokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.model.true_vocab_size)

    @property
    def max_length(self) -> int:
        return self.settings.seq_length

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tokenizer: str | Path | None = None) -> InferenceModel:
        """The checkpoint's model at the current TP size, with its own tokenizer unless one is given."""
        directory = Path(directory)
        path, tok = _tokenizer_of(directory, tokenizer, CheckpointError)
        seed_everything(0)  # megatron's attention forks the model-parallel RNG tracker even without dropout
        model, meta = load_checkpoint(directory)
        if tok.vocab_size != meta["vocab_size"]:
            raise CheckpointError(
                f"{path}: tokenizer has {tok.vocab_size} tokens but the checkpoint {directory} was trained "
                f"with {meta['vocab_size']}"
            )
        model.eval()
        return cls(model, ModelSettings(**meta["model"]), tok)

    @classmethod
    def from_hf(cls, directory: str | Path, tokenizer: str | Path | None = None) -> InferenceModel:
        """A Hugging Face Llama checkpoint at the current TP size, with its own tokenizer unless one is given."""
        from student.hf_import import HFImportError, build_from_hf

        directory = Path(directory)
        path, tok = _tokenizer_of(directory, tokenizer, HFImportError)
        seed_everything(0)
        model, settings = build_from_hf(directory)
        if tok.vocab_size != model.true_vocab_size:
            raise HFImportError(
                f"{path}: tokenizer has {tok.vocab_size} tokens but {directory / 'config.json'} has vocab_size "
                f"{model.true_vocab_size}"
            )
        model.eval()
        return cls(model, settings, tok)

    @classmethod
    def random_init(cls, settings: ModelSettings, tokenizer: StudentTokenizer, seed: int) -> InferenceModel:
        seed_everything(seed)
        model = build_model(settings, tokenizer.vocab_size)
        model.eval()
        return cls(model, settings, tokenizer)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits_at(self, token_lists: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """Full-vocabulary logits ``[len(positions[i]), V]`` at the chosen positions of each token list."""
        if len(token_lists) != len(positions):
            raise ValueError(f"{len(token_lists)} token lists but {len(positions)} position lists")
        lengths = [len(t) for t in token_lists]
        if min(lengths, default=0) < 1:
            raise ValueError("every token list must hold at least one token")
        for row, (n, wanted) in enumerate(zip(lengths, positions, strict=True)):
            if any(not 0 <= p < n for p in wanted):
                raise ValueError(f"row {row}: positions {wanted} outside [0, {n})")
        device = self._device()
        batch, seq = len(token_lists), max(lengths)
        tokens = torch.zeros(batch, seq, dtype=torch.long)
        doc_ids = torch.full((batch, seq), -1, dtype=torch.long)
        for row, toks in enumerate(token_lists):
            tokens[row, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
            doc_ids[row, : len(toks)] = 0
        position_ids = torch.arange(seq, dtype=torch.long).expand(batch, seq).contiguous()
        local = forward_logits(self.model, tokens.to(device), position_ids.to(device), doc_ids.to(device))
        rows = torch.as_tensor([r for r, wanted in enumerate(positions) for _ in wanted], dtype=torch.long)
        cols = torch.as_tensor([p for wanted in positions for p in wanted], dtype=torch.long)
        picked = local[rows.to(device), cols.to(device)].float()
        full = gather_from_tensor_model_parallel_region(picked)[:, : self.vocab_size].cpu()
        return list(full.split([len(w) for w in positions]))

    def logits(self, token_lists: list[list[int]]) -> list[torch.Tensor]:
        """Full-vocabulary logits ``[len_i, V]`` of every position of each token list."""
        return self.logits_at(token_lists, [list(range(len(t))) for t in token_lists])

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def session(self, max_new_tokens: int) -> CachedSession:
        if self.model.training:  # megatron ignores the inference context in training mode: wrong tokens
            raise RuntimeError("generation needs the model in eval mode (call model.eval() first)")
        return CachedSession(self, max_new_tokens)

    def decoder(self) -> Decoder:
        return Decoder(self.session, self.token_bytes)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        for prompt, sp in zip(prompts, params, strict=True):
            if len(prompt) + sp.max_tokens > self.max_length:
                raise ValueError(
                    f"prompt of {len(prompt)} tokens + max_tokens {sp.max_tokens} exceeds the model's "
                    f"context of {self.max_length} tokens"
                )
        return self.decoder().run(prompts, params)


class CachedSession:
    """A ``student.generation.Session`` over megatron-core's static KV cache (see the module docstring)."""

    def __init__(self, runner: InferenceModel, max_new_tokens: int) -> None:
        self._runner = runner
        self._max_new = max_new_tokens
        self._context: StaticInferenceContext | None = None
        self._valid = torch.zeros(0, 0, dtype=torch.bool)  # [rows, capacity]: which cache slots hold tokens

    def _forward(self, tokens: torch.Tensor, blocked: torch.Tensor, offset: int) -> torch.Tensor:
        device = self._runner._device()
        rows, seq = tokens.shape
        positions = torch.arange(offset, offset + seq, dtype=torch.long).expand(rows, seq)
        logits = self._runner.model(
            input_ids=tokens.to(device),
            position_ids=positions.to(device),
            attention_mask=blocked.to(device),
            inference_context=self._context,
            runtime_gather_output=True,
        )
        return logits[..., : self._runner.vocab_size].float().cpu()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], every_position: list[bool]) -> list[torch.Tensor]:
        rows, longest = len(prompts), max(len(p) for p in prompts)
        capacity = longest + self._max_new
        self._context = StaticInferenceContext(rows, capacity)
        self._context.materialize_only_last_token_logits = not any(every_position)
        tokens = torch.zeros(rows, longest, dtype=torch.long)
        self._valid = torch.zeros(rows, capacity, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            self._valid[row, longest - len(prompt) : longest] = True
        causal = torch.ones(longest, longest, dtype=torch.bool).tril_()
        allowed = causal & self._valid[:, None, :longest]
        allowed |= torch.eye(longest, dtype=torch.bool)  # a pad row attends to itself: never fully blocked
        logits = self._forward(tokens, ~allowed[:, None], 0)
        self._context.sequence_len_offset = longest
        return [
            logits[row, longest - len(p) :] if every else logits[row, -1:]
            for row, (p, every) in enumerate(zip(prompts, every_position, strict=True))
        ]

    @torch.no_grad()
    def extend(self, tokens: list[int]) -> torch.Tensor:
        offset = self._context.sequence_len_offset
        if offset >= self._valid.shape[1]:
            raise ValueError(f"the KV cache holds {self._valid.shape[1]} positions; all are used")
        self._valid[:, offset] = True
        blocked = ~self._valid[:, None, None, : offset + 1]
        logits = self._forward(torch.as_tensor(tokens, dtype=torch.long)[:, None], blocked, offset)
        self._context.sequence_len_offset = offset + 1
        return logits[:, -1]
