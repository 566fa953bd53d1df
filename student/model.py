"""The student: a Llama-compatible megatron-core ``GPTModel`` and its forward pass over packed batches.

Public API (stable; call after ``student.distributed.init_distributed``):

- ``padded_vocab_size(vocab_size, tp, multiple=128) -> int``: the vocabulary rounded up to a multiple of
  ``multiple * tp`` (every TP rank holds an equal, aligned slice). Rows past ``vocab_size`` are padding: never a
  target, their logits are real numbers the model learns to push down; exporters may drop them.
- ``transformer_config(settings, dtype=torch.float32) -> TransformerConfig`` for the current TP size.
- ``build_model(settings, vocab_size, padded_vocab=None) -> GPTModel`` on the current device, float32
  parameters. ``vocab_size`` is the tokenizer's; ``padded_vocab`` (default ``padded_vocab_size``) lets a
  checkpoint's padding be reused at another TP size. Weights are initialised on the CPU from the global torch
  generator (full matrices, then sliced per TP rank), so the same seed gives the same model at any TP size.
  The model carries ``model.true_vocab_size`` and ``model.padded_vocab_size``.
- ``attention_mask(doc_ids) -> BoolTensor [B,1,S,S]``: True where attention is *blocked*. Position ``i`` sees
  ``j <= i`` of the same document; padding (``doc_id = -1``) sees only itself (never a fully blocked row).
- ``forward_logits(model, tokens, position_ids, doc_ids) -> [B, S, V_padded / TP]``: vocabulary-parallel
  logits, float32 (bf16 under GPU autocast), this rank's slice ``[tp_rank * V/TP, (tp_rank+1) * V/TP)``.
  Columns of padding rows (``>= model.true_vocab_size``) hold ``PAD_LOGIT`` and get no gradient: they never
  win a softmax, an argmax or a top-k.
- ``forward_hidden(model, tokens, position_ids, doc_ids) -> (hidden [B, S, h], weight [V_padded/TP, h])``: the
  output layer's input and weight shard, for the fused output layer + loss that never holds the logits.

Architecture, as Hugging Face's ``LlamaForCausalLM`` computes it: token embedding (no positional table),
pre-norm blocks of RMSNorm -> attention with RoPE (non-interleaved halves, ``rotary_base``) -> residual ->
RMSNorm -> SwiGLU MLP (``down(silu(gate(x)) * up(x))``) -> residual, a final RMSNorm and an output layer (tied
to the embedding when ``tie_embeddings``: megatron's ``share_embeddings_and_output_weights``); no biases, no
dropout by default. Weight layout for exporters (megatron names, TP=1):
``decoder.layers.N.self_attention.linear_qkv.weight`` is ``[ng * (np/ng + 2) * hn, h]`` grouped per key/value
head: for each group g the rows hold its ``np/ng`` query heads, then its key head, then its value head;
``mlp.linear_fc1.weight`` is ``[gate; up]`` stacked (``2 * ffn``), ``mlp.linear_fc2`` is ``down``; the norms are
``input_layernorm.weight``, ``pre_mlp_layernorm.weight`` and ``decoder.final_layernorm.weight`` (torch
``RMSNorm``: ``x * rsqrt(mean(x^2) + eps) * weight``); ``embedding.word_embeddings.weight`` and
``output_layer.weight`` (absent when tied) are ``[V_padded, h]``. At TP > 1 each rank holds its slice of those
(``linear_fc1``: its slice of gate stacked on its slice of up); ``dist_checkpointing`` stores the TP=1 layout.

RoPE angles come from the position within the packed row (megatron ignores ``position_ids`` for RoPE);
with the block-diagonal mask a score depends only on the offset ``i - j`` inside one document, so each
document is computed as if it started at position 0 (equal up to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from student.settings import ModelSettings

PAD_LOGIT = -1e4
"""Logit of the vocabulary's padding columns: ``exp`` underflows to exactly 0 against any real logit, so they
never win a softmax or a top-k. Finite on purpose: ``-inf`` would make ``log q`` of those columns ``-inf`` and
a metric's ``0 * log q`` NaN; ``-1e4`` is exact in bf16 and fp16 too."""


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    step = multiple * tp
    return -(-vocab_size // step) * step


def transformer_config(settings: ModelSettings, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    heads, groups = settings.num_attention_heads, settings.num_query_groups or settings.num_attention_heads
    if settings.hidden_size % heads:
        raise ValueError(f"model.hidden_size {settings.hidden_size} is not divisible by {heads} heads")
    if heads % groups:
        raise ValueError(f"model.num_attention_heads {heads} is not divisible by num_query_groups {groups}")
    if groups % tp or settings.ffn_hidden_size % tp:
        raise ValueError(
            f"tensor_parallel {tp} must divide the key/value heads ({groups}) and ffn_hidden_size "
            f"({settings.ffn_hidden_size})"
        )
    return TransformerConfig(
        num_layers=settings.num_layers,
        hidden_size=settings.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=settings.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        normalization="RMSNorm",
        layernorm_epsilon=settings.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=settings.hidden_dropout,
        attention_dropout=settings.attention_dropout,
        init_method_std=settings.init_method_std,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=False,
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def _block_spec(config: TransformerConfig) -> TransformerBlockSubmodules:
    """The local layer spec with torch RMSNorm everywhere, final norm included (Apex/TE never picked)."""
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=WrappedTorchNorm)


def build_model(settings: ModelSettings, vocab_size: int, padded_vocab: int | None = None) -> GPTModel:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab or padded_vocab_size(vocab_size, tp, settings.vocab_multiple)
    if padded < vocab_size or padded % tp:
        raise ValueError(f"padded vocabulary {padded} must be >= {vocab_size} and divisible by TP={tp}")
    config = transformer_config(settings)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(config),
        vocab_size=padded,
        max_sequence_length=settings.seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=settings.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=settings.rotary_base,
    )
    model.true_vocab_size = vocab_size
    model.padded_vocab_size = padded
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask from ``doc_ids [B,S]``; True = blocked (megatron's convention)."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril_()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    allowed = same_doc & causal & (doc_ids[:, :, None] >= 0)
    allowed |= torch.eye(seq, dtype=torch.bool, device=doc_ids.device)
    return ~allowed[:, None]


def forward_logits(
    model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor
) -> torch.Tensor:
    """Vocabulary-parallel logits ``[B, S, V_padded/TP]`` of a packed batch, padding columns at ``PAD_LOGIT``."""
    logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask(doc_ids))
    return mask_padded_vocab(logits, model.true_vocab_size)


def forward_hidden(
    model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the output layer would read: final hidden states ``[B, S, h]`` (after the final norm) and this rank's
    output weight ``[V_padded/TP, h]`` (the embedding's when tied), for the fused output layer + loss
    (``student.losses.fused``); ``forward_logits`` is ``mask_padded_vocab(hidden @ weight.T)``."""
    inner = getattr(model, "module", model)
    # GPTModel._postprocess then returns the decoder's output: the output layer is skipped
    inner.post_process = False
    try:
        hidden = model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask(doc_ids))
    finally:
        inner.post_process = True
    tied = inner.share_embeddings_and_output_weights
    weight = inner.shared_embedding_or_output_weight() if tied else inner.output_layer.weight
    return hidden.transpose(0, 1), weight


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set this TP rank's columns of padding rows (global id ``>= vocab_size``) to ``PAD_LOGIT``, no gradient."""
    local = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local
    if first + local <= vocab_size:
        return logits
    padding = torch.arange(first, first + local, device=logits.device) >= vocab_size
    return logits.masked_fill(padding, PAD_LOGIT)
