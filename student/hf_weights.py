"""The one weight-name mapping between our megatron-core ``GPTModel`` and Hugging Face's ``LlamaForCausalLM``.

``student.export`` (megatron -> HF) and ``student.hf_import`` (HF -> megatron) both go through here, so the two
directions cannot drift. Both work on *full* (TP=1 layout) state dicts; ``tp_shard`` cuts a full tensor into
one tensor-parallel rank's slice.

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
``output_layer.weight`` [Vp, h]                         ``lm_head.weight`` = rows [:V]; absent when the
                                                        embeddings are tied (``tie_embeddings``)
======================================================  ==============================================

The vocabulary padding rows are dropped on the way out and filled with zeros on the way in (they are never
targets, and ``student.model.forward_logits`` masks their logits). An unknown or missing key is an error both
ways: a silently partial mapping would leave random weights behind.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from student.settings import ModelSettings

LAYER_PREFIX = "decoder.layers."
GLU_SUFFIX = "mlp.linear_fc1.weight"
"""Megatron's fused SwiGLU input weight [gate; up]."""


class WeightMappingError(ValueError):
    """A state dict that does not map onto the other side; the message names the weight."""


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused, per-group interleaved QKV weight -> (q, k, v) weights in HF's head order."""
    per_group = heads // groups
    rows, hidden = qkv.shape
    head_dim = rows // (groups * (per_group + 2))
    if head_dim * groups * (per_group + 2) != rows:
        raise WeightMappingError(
            f"linear_qkv has {rows} rows, not a multiple of groups ({groups}) x (heads/group + 2)"
        )
    grouped = qkv.view(groups, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(groups * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF's (q, k, v) weights -> megatron's fused QKV weight; the inverse of ``split_qkv``."""
    per_group = heads // groups
    hidden = q.shape[1]
    head_dim = q.shape[0] // heads
    expected = {
        "q": (heads * head_dim, hidden),
        "k": (groups * head_dim, hidden),
        "v": (groups * head_dim, hidden),
    }
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tuple(tensor.shape) != expected[name]:
            raise WeightMappingError(
                f"{name}_proj has shape {tuple(tensor.shape)}, expected {expected[name]} for {heads} heads, "
                f"{groups} key/value heads of dimension {head_dim}"
            )
    grouped = torch.cat(
        [
            q.view(groups, per_group, head_dim, hidden),
            k.view(groups, 1, head_dim, hidden),
            v.view(groups, 1, head_dim, hidden),
        ],
        dim=1,
    )
    return grouped.reshape(groups * (per_group + 2) * head_dim, hidden).contiguous()


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's fused SwiGLU input weight [gate; up] -> (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's (gate, up) weights -> megatron's fused [gate; up]; the inverse of ``split_fc1``."""
    if gate.shape != up.shape:
        raise WeightMappingError(
            f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape"
        )
    return torch.cat([gate, up], dim=0).contiguous()


def _layer_pairs(layer: int) -> list[tuple[str, str]]:
    """(megatron, HF) names of the weights that map one to one in ``layer``."""
    src, dst = f"{LAYER_PREFIX}{layer}.", f"model.layers.{layer}."
    return [
        (src + "input_layernorm.weight", dst + "input_layernorm.weight"),
        (src + "self_attention.linear_proj.weight", dst + "self_attn.o_proj.weight"),
        (src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight"),
        (src + "mlp.linear_fc2.weight", dst + "mlp.down_proj.weight"),
    ]


class _Taker:
    """Pops weights out of a state dict by name, so leftovers can be reported as unknown."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        self.weights = {k: v for k, v in state.items() if not k.endswith("._extra_state") and v is not None}
        self.what = what

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            raise WeightMappingError(f"{self.what} has no weight {name!r}")
        return self.weights.pop(name).detach().float().cpu()

    def finish(self, counterpart: str) -> None:
        if self.weights:
            raise WeightMappingError(
                f"{self.what} weights with no {counterpart} counterpart: {sorted(self.weights)}"
            )


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], settings: ModelSettings, vocab_size: int
) -> dict[str, torch.Tensor]:
    """The full (TP=1) megatron-core state dict -> ``LlamaForCausalLM`` state dict; see the module docstring."""
    take = _Taker(state, "checkpoint")
    heads = settings.num_attention_heads
    groups = settings.num_query_groups or heads
    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:vocab_size].contiguous()}
    for layer in range(settings.num_layers):
        src, dst = f"{LAYER_PREFIX}{layer}.", f"model.layers.{layer}."
        q, k, v = split_qkv(take(src + "self_attention.linear_qkv.weight"), heads, groups)
        gate, up = split_fc1(take(src + GLU_SUFFIX))
        out.update({hf: take(ours) for ours, hf in _layer_pairs(layer)})
        out.update(
            {
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
            }
        )
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if not settings.tie_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")[:vocab_size].contiguous()
    take.finish("Llama")
    return out


def _pad_rows(weight: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if weight.shape[0] > rows:
        raise WeightMappingError(f"{name} has {weight.shape[0]} rows, more than the padded vocabulary {rows}")
    padded = weight.new_zeros(rows, weight.shape[1])
    padded[: weight.shape[0]] = weight
    return padded


def from_hf_state_dict(
    state: Mapping[str, torch.Tensor], settings: ModelSettings, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` state dict -> the full (TP=1) megatron-core state dict, vocabulary rows zero-padded
    to ``padded_vocab``. Tied models: a stored ``lm_head.weight`` must equal the embedding (it is dropped)."""
    take = _Taker(state, "Hugging Face checkpoint")
    heads = settings.num_attention_heads
    groups = settings.num_query_groups or heads
    embed = take("model.embed_tokens.weight")
    out = {"embedding.word_embeddings.weight": _pad_rows(embed, padded_vocab, "model.embed_tokens.weight")}
    for layer in range(settings.num_layers):
        src, dst = f"{LAYER_PREFIX}{layer}.", f"model.layers.{layer}."
        attn = [take(dst + f"self_attn.{p}_proj.weight") for p in "qkv"]
        out[src + "self_attention.linear_qkv.weight"] = merge_qkv(*attn, heads, groups)
        out[src + GLU_SUFFIX] = merge_fc1(
            take(dst + "mlp.gate_proj.weight"), take(dst + "mlp.up_proj.weight")
        )
        out.update({ours: take(hf) for ours, hf in _layer_pairs(layer)})
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if settings.tie_embeddings:
        if "lm_head.weight" in take.weights and not torch.equal(take("lm_head.weight"), embed):
            raise WeightMappingError(
                "tied embeddings, but lm_head.weight differs from model.embed_tokens.weight"
            )
    else:
        out["output_layer.weight"] = _pad_rows(take("lm_head.weight"), padded_vocab, "lm_head.weight")
    take.finish("megatron-core")
    return out


def tp_shard(full: torch.Tensor, param: torch.Tensor, name: str, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of the full (TP=1 layout) tensor of parameter ``param``.

    The layout comes from megatron-core's own parameter attributes, as its CPU initialisation slices a master
    weight: ``tensor_model_parallel`` (else replicated: the whole tensor), ``partition_dim`` and
    ``partition_stride`` s: the dimension is cut into ``tp * s`` equal chunks and rank r holds chunks
    ``r, r + tp, ...`` stacked. The fused SwiGLU ``linear_fc1`` [gate; up] has s = 2: each rank holds its slice
    of gate on its slice of up.
    """
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
        pieces = tp * stride
        if full.shape[dim] % pieces:
            raise WeightMappingError(
                f"{name}: dimension {dim} of {tuple(full.shape)} does not split into {tp} ranks x stride {stride}"
            )
        chunks = torch.split(full, full.shape[dim] // pieces, dim=dim)
        full = torch.cat(chunks[rank::tp], dim=dim)
    if full.shape != param.shape:
        raise WeightMappingError(
            f"{name}: the checkpoint gives shape {tuple(full.shape)} on TP rank {rank}, the model has "
            f"{tuple(param.shape)}"
        )
    return full.contiguous()
