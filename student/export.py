"""Export a student checkpoint as a Hugging Face ``transformers`` ``LlamaForCausalLM`` directory.

Usage: ``distill export CHECKPOINT OUT_DIR`` or ``python -m student.export CHECKPOINT OUT_DIR [--tokenizer
tokenizer.json]``. Writes ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json`` through ``PreTrainedTokenizerFast``) into ``OUT_DIR`` atomically
(a temporary sibling renamed into place). ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` then gives the same
logits as ``student.inference`` (float32, to rounding).

The checkpoint may have been saved at any TP size: it is loaded at TP=1 in this process (a world of one;
``dist_checkpointing`` reshards), so the state dict below is the full, unsharded one.

Why Llama matches exactly (``student.model``): RMSNorm (same epsilon, weight only), SwiGLU
``down(silu(gate(x)) * up(x))``, RoPE over the whole head dimension with non-interleaved halves (megatron's
``rotary_interleaved=False`` is HF's ``rotate_half``) and the same ``rotary_base`` -> ``rope_theta``, softmax scale
1/sqrt(head_dim), no biases, no dropout at inference, embedding and output layer tied or not as trained,
grouped-query attention with ``num_query_groups`` -> ``num_key_value_heads``.

The weight mapping (``student.hf_weights``, shared with ``student.hf_import``) drops the vocabulary padding
rows: they are never targets, and ``student.inference`` drops their logits too. An unknown or missing key is an
error (a silently partial export would load with random weights). A model with tied embeddings
(``tie_embeddings``) is written with ``tie_word_embeddings=True`` and no ``lm_head.weight``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from student.hf_weights import WeightMappingError, split_fc1, split_qkv, to_hf_state_dict
from student.settings import ModelSettings

__all__ = ["ExportError", "export_checkpoint", "llama_config", "split_fc1", "split_qkv", "to_hf_state_dict"]


class ExportError(ValueError):
    """A checkpoint that cannot be exported as it is; the message names the file or weight."""


def llama_config(settings: ModelSettings, vocab_size: int, eos_id: int) -> Any:
    from transformers import LlamaConfig

    groups = settings.num_query_groups or settings.num_attention_heads
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.ffn_hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=groups,
        head_dim=settings.hidden_size // settings.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=settings.seq_length,
        rms_norm_eps=settings.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(settings.rotary_base)},
        tie_word_embeddings=settings.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=settings.init_method_std,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


def _load_full_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the checkpoint at TP=1 in this process and return its (unsharded) state dict and meta."""
    from student.checkpoint import load_checkpoint
    from student.distributed import distributed

    with distributed(tp=1, dp=1):
        model, meta = load_checkpoint(checkpoint)
        state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items() if v is not None}
    return state, meta


def _tokenizer_path(checkpoint: Path, tokenizer: Path | None) -> Path:
    path = tokenizer or checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: tokenizer file not found (pass --tokenizer tokenizer.json)")
    return path


def export_checkpoint(checkpoint: Path, out_dir: Path, tokenizer: Path | None = None) -> Path:
    """Write ``out_dir`` as a ``LlamaForCausalLM`` directory; must run in a process without megatron state."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from student.checkpoint import CheckpointError, read_meta
    from student.tokenizer import EOS, StudentTokenizer

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: checkpoint directory not found")
    try:
        read_meta(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    tokenizer_file = _tokenizer_path(checkpoint, tokenizer)
    student_tokenizer = StudentTokenizer.load(tokenizer_file)
    state, meta = _load_full_state(checkpoint)
    settings = ModelSettings(**meta["model"])
    vocab = int(meta["vocab_size"])
    if student_tokenizer.vocab_size != vocab:
        raise ExportError(
            f"{tokenizer_file}: tokenizer has {student_tokenizer.vocab_size} tokens but the checkpoint "
            f"{checkpoint} was trained with a vocabulary of {vocab}"
        )
    try:
        tensors = to_hf_state_dict(state, settings, vocab)
    except WeightMappingError as exc:
        raise ExportError(f"{checkpoint}: {exc}") from None
    config = llama_config(settings, vocab, student_tokenizer.eos_id)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=student_tokenizer.eos_id,
        eos_token_id=student_tokenizer.eos_id,
        pad_token_id=student_tokenizer.eos_id,
    ).save_pretrained(tmp)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )
    hf_tokenizer.model_max_length = settings.seq_length
    hf_tokenizer.save_pretrained(tmp)
    (tmp / "distill_export.json").write_text(
        json.dumps({"source_checkpoint": str(checkpoint), "step": meta.get("step"), "source_tp": meta["tp"]})
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a student checkpoint as a Hugging Face Llama model.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.json (default: the checkpoint's)"
    )
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer))
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
