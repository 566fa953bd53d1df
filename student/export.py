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
1/sqrt(head_dim), no biases, no dropout at inference, untied embedding and output layer, grouped-query attention
with ``num_query_groups`` -> ``num_key_value_heads``.

Weight mapping (megatron-core name at TP=1 -> HF name), ``h`` hidden, ``hn`` head dim, ``ng`` key/value groups,
``npg`` query heads per group, ``f`` ffn, ``V`` true vocabulary, ``Vp`` padded:

======================================================  ==============================================
``embedding.word_embeddings.weight`` [Vp, h]            ``model.embed_tokens.weight`` = rows [:V]
``decoder.layers.L.input_layernorm.weight``             ``model.layers.L.input_layernorm.weight``
``decoder.layers.L.self_attention.linear_qkv.weight``   viewed [ng, npg + 2, hn, h]: per group its npg query
  [ng * (npg + 2) * hn, h]                              heads, then its key head, then its value head:
                                                        ``q_proj`` = [:, :npg] -> [ng*npg*hn, h] (query head
                                                        g*npg + j uses key/value head g, as HF's repeat_kv),
                                                        ``k_proj`` = [:, npg], ``v_proj`` = [:, npg + 1]
``decoder.layers.L.self_attention.linear_proj.weight``  ``model.layers.L.self_attn.o_proj.weight``
``decoder.layers.L.pre_mlp_layernorm.weight``           ``model.layers.L.post_attention_layernorm.weight``
``decoder.layers.L.mlp.linear_fc1.weight`` [2f, h]      ``gate_proj`` = rows [:f], ``up_proj`` = rows [f:]
                                                        (megatron's glu: ``silu(first half) * second half``)
``decoder.layers.L.mlp.linear_fc2.weight``              ``model.layers.L.mlp.down_proj.weight``
``decoder.final_layernorm.weight``                      ``model.norm.weight``
``output_layer.weight`` [Vp, h]                         ``lm_head.weight`` = rows [:V]
======================================================  ==============================================

The vocabulary padding rows are dropped: they are never targets, and ``student.inference`` drops their
logits too. An unknown or missing key is an error (a silently partial export would load with random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from student.settings import ModelSettings

LAYER_PREFIX = "decoder.layers."


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
        tie_word_embeddings=False,
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


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused, per-group interleaved QKV weight -> (q, k, v) weights in HF's head order."""
    per_group = heads // groups
    rows, hidden = qkv.shape
    head_dim = rows // (groups * (per_group + 2))
    if head_dim * groups * (per_group + 2) != rows:
        raise ExportError(
            f"linear_qkv has {rows} rows, not a multiple of groups ({groups}) x (heads/group + 2)"
        )
    grouped = qkv.view(groups, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(groups * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's fused SwiGLU input weight [gate; up] -> (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], settings: ModelSettings, vocab_size: int
) -> dict[str, torch.Tensor]:
    """The full (TP=1) megatron-core state dict -> ``LlamaForCausalLM`` state dict; see the module docstring."""
    weights = {k: v for k, v in state.items() if not k.endswith("._extra_state") and v is not None}
    heads = settings.num_attention_heads
    groups = settings.num_query_groups or heads
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ExportError(f"checkpoint has no weight {name!r}")
        return weights.pop(name).detach().float().cpu()

    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")[:vocab_size].contiguous()
    for layer in range(settings.num_layers):
        src, dst = f"{LAYER_PREFIX}{layer}.", f"model.layers.{layer}."
        q, k, v = split_qkv(take(src + "self_attention.linear_qkv.weight"), heads, groups)
        gate, up = split_fc1(take(src + "mlp.linear_fc1.weight"))
        out.update(
            {
                dst + "input_layernorm.weight": take(src + "input_layernorm.weight"),
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": take(src + "self_attention.linear_proj.weight"),
                dst + "post_attention_layernorm.weight": take(src + "pre_mlp_layernorm.weight"),
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": take(src + "mlp.linear_fc2.weight"),
            }
        )
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    out["lm_head.weight"] = take("output_layer.weight")[:vocab_size].contiguous()
    if weights:
        raise ExportError(f"checkpoint weights with no Llama counterpart: {sorted(weights)}")
    return out


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
    tensors = to_hf_state_dict(state, settings, vocab)
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
