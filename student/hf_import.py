"""Hugging Face ``LlamaForCausalLM`` checkpoints in: architecture, weights, at any tensor-parallel size.

Public API (``load_hf_weights`` / ``build_from_hf`` after ``student.distributed.init_distributed``; under
torchrun every TP rank makes the same calls):

- ``hf_model_settings(directory, seq_length=None) -> (ModelSettings, vocab_size)``: our architecture from the
  directory's ``config.json``; ``seq_length`` defaults to ``max_position_embeddings``. Anything the student
  cannot compute exactly as ``transformers`` does (RoPE scaling, biases, another activation, another
  architecture, a head dimension other than hidden / heads) is an ``HFImportError`` naming the file and key.
- ``init_settings(settings) -> (ModelSettings, vocab_size)``: ``settings`` with ``settings.init``'s architecture
  (every field of ``ARCHITECTURE_FIELDS``) in place of its own; ``seq_length``, dropout and padding kept.
- ``load_hf_state_dict(directory) -> dict[str, Tensor]``: ``model.safetensors``, or the shards listed by
  ``model.safetensors.index.json``.
- ``load_hf_weights(model, directory)``: copy the checkpoint into a ``GPTModel`` built at the current TP size.
  The mapping is ``student.hf_weights.from_hf_state_dict`` (vocabulary rows zero-padded to
  ``model.padded_vocab_size``); each rank keeps its slice of every TP-sharded weight, split along the
  dimension megatron-core records on the parameter (``student.hf_weights.tp_shard``). Every weight of the
  checkpoint must be used and every parameter of the model filled.
- ``build_from_hf(directory, seq_length=None) -> (GPTModel, ModelSettings)``.

Every rank reads the whole checkpoint (it is what a small student starts from; a 135M model is 0.5 GB).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from student.hf_weights import WeightMappingError, from_hf_state_dict, tp_shard
from student.model import build_model
from student.settings import ModelSettings

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "rotary_base",
    "norm_epsilon",
    "tie_embeddings",
)
"""The ``ModelSettings`` fields a Hugging Face config decides (``init`` replaces them)."""


class HFImportError(ValueError):
    """A Hugging Face directory the student cannot load exactly; the message names the file and key."""


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise HFImportError(f"{path}: not found (a Hugging Face model directory has a {CONFIG})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HFImportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path}: expected a JSON object")
    return config


def _rope_theta(config: dict[str, Any], path: Path) -> float:
    """``rope_theta`` from ``rope_parameters`` (transformers >= 5) or the top level; only unscaled RoPE."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
        if kind != "default":
            raise HFImportError(
                f"{path}: key '{key}': RoPE type {kind!r} is not supported (only unscaled 'default' RoPE)"
            )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(theta, int | float) or theta <= 0:
        raise HFImportError(f"{path}: key 'rope_theta': expected a positive number, got {theta!r}")
    return float(theta)


def _require(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFImportError(f"{path}: key '{key}': expected a positive integer, got {value!r}")
    return value


def hf_model_settings(directory: str | Path, seq_length: int | None = None) -> tuple[ModelSettings, int]:
    """Our ``ModelSettings`` (with ``init`` = the directory) and the vocabulary size of a Llama checkpoint."""
    directory = Path(directory)
    path = directory / CONFIG
    config = _read_config(directory)
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" or architectures != ["LlamaForCausalLM"]:
        raise HFImportError(
            f"{path}: key 'architectures' / 'model_type': {architectures} / {config.get('model_type')!r}; "
            "only LlamaForCausalLM (model_type 'llama') is supported"
        )
    for key, expected in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, expected) != expected:
            raise HFImportError(
                f"{path}: key '{key}': {config[key]!r} is not supported (expected {expected!r})"
            )
    hidden = _require(config, "hidden_size", path)
    heads = _require(config, "num_attention_heads", path)
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise HFImportError(
            f"{path}: key 'head_dim': {head_dim} x {heads} heads != hidden_size {hidden}; the student's head "
            "dimension is hidden_size / num_attention_heads"
        )
    settings = ModelSettings(
        num_layers=_require(config, "num_hidden_layers", path),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        ffn_hidden_size=_require(config, "intermediate_size", path),
        seq_length=seq_length or _require(config, "max_position_embeddings", path),
        rotary_base=_rope_theta(config, path),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init=str(directory),
    )
    return settings, _require(config, "vocab_size", path)


def init_settings(settings: ModelSettings) -> tuple[ModelSettings, int]:
    """``settings`` with the architecture of ``settings.init`` (see ``ARCHITECTURE_FIELDS``) and its vocab size."""
    if settings.init is None:
        raise ValueError("model.init is not set")
    arch, vocab = hf_model_settings(settings.init, settings.seq_length)
    return settings.model_copy(update={name: getattr(arch, name) for name in ARCHITECTURE_FIELDS}), vocab


def load_hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists, on the CPU."""
    from safetensors.torch import load_file

    directory = Path(directory)
    single, index = directory / SINGLE_FILE, directory / INDEX
    if single.is_file():
        return load_file(str(single))
    if not index.is_file():
        raise HFImportError(f"{directory}: neither {SINGLE_FILE} nor {INDEX} found")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise HFImportError(f"{index}: expected a JSON object with a 'weight_map' ({exc})") from None
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise HFImportError(f"{index}: shard files missing in {directory}: {missing}")
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(load_file(str(directory / name)))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise HFImportError(f"{index}: weights listed but not in their shard: {absent}")
    return state


@torch.no_grad()
def load_hf_weights(model: GPTModel, directory: str | Path, settings: ModelSettings | None = None) -> None:
    """Copy a Llama checkpoint into ``model`` (built at the current TP size from ``settings``)."""
    directory = Path(directory)
    if settings is None:
        settings, _ = hf_model_settings(directory)
    try:
        full = from_hf_state_dict(load_hf_state_dict(directory), settings, model.padded_vocab_size)
    except WeightMappingError as exc:
        raise HFImportError(f"{directory}: {exc}") from None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    if set(params) != set(full):
        raise HFImportError(
            f"{directory}: the model's parameters and the checkpoint differ: only in the model "
            f"{sorted(set(params) - set(full))}, only in the checkpoint {sorted(set(full) - set(params))}"
        )
    try:
        for name, param in params.items():
            param.copy_(tp_shard(full[name], param, name, rank, tp).to(param.dtype))
    except WeightMappingError as exc:
        raise HFImportError(f"{directory}: {exc}") from None


def build_from_hf(directory: str | Path, seq_length: int | None = None) -> tuple[GPTModel, ModelSettings]:
    """A ``GPTModel`` at the current TP size holding the Llama checkpoint in ``directory``."""
    settings, vocab = hf_model_settings(directory, seq_length)
    model = build_model(settings, vocab)
    load_hf_weights(model, directory, settings)
    return model, settings
