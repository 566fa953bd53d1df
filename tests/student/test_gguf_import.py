"""GGUF -> Hugging Face Llama directory: weights exactly as gguf dequantizes them, logits and tokenizers as
transformers' own GGUF loader gives them, on files written here with gguf.GGUFWriter and on the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.corpus import stdlib_files
from student.gguf_import import GGUFImportError, bundled_smollm2_gguf, convert_gguf, main
from student.tokenizer import StudentTokenizer
from tests.student.test_tokenizer import sentencepiece_style_tokenizer

Q = gguf.GGMLQuantizationType
# Worst absolute error of a quantized weight, as a fraction of the tensor's largest magnitude.
QUANT_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 15}
TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_1,
    "attn_k": Q.Q4_0,
    "attn_v": Q.Q4_1,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q4_1,
    "output": Q.F16,
}
TEXTS = ["def f(x):\n    return x ** 2  # 1234\n", "naïve café — ünïcödé ✓ 日本語 🐍\n\tend"]


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` permutation of q/k rows (the inverse of what the import undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, tuple[np.ndarray, str]]:
    """llama.cpp name -> (HF weight as llama.cpp stores it, HF name)."""
    cfg = model.config
    out = {}
    for name, value in model.state_dict().items():
        w = value.detach().numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            leaf = {
                "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm",
                "q_proj": "attn_q",
                "k_proj": "attn_k",
                "v_proj": "attn_v",
                "o_proj": "attn_output",
                "gate_proj": "ffn_gate",
                "up_proj": "ffn_up",
                "down_proj": "ffn_down",
            }[parts[-2]]
            if leaf == "attn_q":
                w = permute_for_llama_cpp(w, cfg.num_attention_heads)
            if leaf == "attn_k":
                w = permute_for_llama_cpp(w, cfg.num_key_value_heads)
            out[f"blk.{parts[2]}.{leaf}.weight"] = (w, name)
        else:
            leaf = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm"}
            out[f"{leaf.get(name, 'output')}.weight"] = (w, name)
    return out


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer_meta: dict, chat_template: str | None) -> dict:
    """Write ``model`` as llama.cpp would (permuted q/k, quantized per TYPES); returns name -> (HF, type)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model(tokenizer_meta["model"])
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokenizer_meta["tokens"])
    writer.add_token_types(tokenizer_meta["types"])
    if "merges" in tokenizer_meta:
        writer.add_token_merges(tokenizer_meta["merges"])
    if "scores" in tokenizer_meta:
        writer.add_token_scores(tokenizer_meta["scores"])
    writer.add_eos_token_id(tokenizer_meta["eos"])
    if "bos" in tokenizer_meta:
        writer.add_bos_token_id(tokenizer_meta["bos"])
    if chat_template:
        writer.add_chat_template(chat_template)
    stored = {}
    for gname, (w, hf_name) in gguf_tensors(model).items():
        qtype = TYPES.get(gname.split(".")[-2], Q.F32) if w.ndim == 2 else Q.F32
        data = w if qtype == Q.F32 else gguf.quants.quantize(w, qtype)
        writer.add_tensor(gname, data, raw_dtype=None if qtype == Q.F32 else qtype)
        stored[gname] = (hf_name, w, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def transformers_gguf_model(path: Path) -> LlamaForCausalLM:
    """The model as transformers' own GGUF loader builds it (``from_pretrained(gguf_file=)`` needs accelerate;
    without it, the same ``load_gguf_checkpoint`` that ``from_pretrained`` calls)."""
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = LlamaForCausalLM(AutoConfig.from_pretrained(path.parent, gguf_file=path.name)).float()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def byte_level_meta(texts: list[str], tmp_path: Path) -> dict:
    spec = json.loads(StudentTokenizer.train(texts, 320).save(tmp_path / "trained.json").read_text())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    return {
        "model": "gpt2",
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "eos": tokens.index("<|endoftext|>"),
    }


def sentencepiece_meta(texts: list[str]) -> dict:
    spec = json.loads(sentencepiece_style_tokenizer(texts, merges=120).to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    types = [
        2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens
    ]
    scores = [-float(i) if ty == 1 else 0.0 for i, ty in enumerate(types)]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "eos": 2, "bos": 1}


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [p.read_text(encoding="utf-8").encode("ascii", "ignore").decode() for p in stdlib_files(4)]


@pytest.mark.parametrize("tied,kind", [(True, "gpt2"), (False, "llama")])
def test_synthetic_gguf_matches_gguf_and_transformers(tmp_path, corpus, tied, kind):
    meta = byte_level_meta(corpus, tmp_path) if kind == "gpt2" else sentencepiece_meta(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(meta["tokens"]),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    source = tmp_path / "src" / "model.gguf"
    source.parent.mkdir()
    stored = write_gguf(source, model, meta, TEMPLATE)
    out = convert_gguf(source, tmp_path / "hf")
    assert not list(tmp_path.glob("*.tmp")) and (out / "config.json").is_file(), (
        "no temporary directory left behind"
    )

    ours = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in ours) is not tied
    reader = gguf.GGUFReader(source)
    for tensor in reader.tensors:
        hf_name, original, qtype = stored[tensor.name]
        assert tensor.tensor_type == qtype
        values = ours[hf_name]
        assert values.dtype == np.float32 and values.shape == original.shape
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(_stored_layout(values, tensor.name, config), reference)
        hf_original = model.state_dict()[hf_name].numpy()
        bound = QUANT_ERROR[qtype] * np.abs(hf_original).max() + 1e-7
        assert np.abs(values - hf_original).max() <= bound, (tensor.name, qtype.name)

    reference_model = transformers_gguf_model(source)
    ours_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([StudentTokenizer.load(out / "tokenizer.json").encode(TEXTS[0])[:40]])
    with torch.no_grad():
        torch.testing.assert_close(ours_model(ids).logits, reference_model(ids).logits, atol=1e-5, rtol=0)

    student = StudentTokenizer.load(out / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    for text in [*TEXTS, corpus[0][:3000]]:
        assert student.encode(text) == hf_tok.encode(text, add_special_tokens=False), text[:40]
        assert student.decode(student.encode(text)) == text
    assert student.eos_id == meta["eos"] and student.bos_id == meta.get("bos")
    messages = [{"role": "user", "content": "hi"}]
    assert student.render_chat(messages) == hf_tok.apply_chat_template(messages, tokenize=False)


def _stored_layout(values: np.ndarray, gguf_name: str, config: LlamaConfig) -> np.ndarray:
    """Our (HF layout) weight put back in llama.cpp's row order."""
    if ".attn_q." in gguf_name:
        return permute_for_llama_cpp(values, config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return permute_for_llama_cpp(values, config.num_key_value_heads)
    return values


def test_real_smollm2_gguf(tmp_path):
    source = bundled_smollm2_gguf()
    out = convert_gguf(source, tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (
        30,
        3,
        49152,
    )
    assert config["tie_word_embeddings"] is True

    student = StudentTokenizer.load(out / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    texts = [path.read_text(encoding="utf-8")[:20000] for path in stdlib_files(3)]
    for text in texts:
        no_digits = "".join(c for c in text if not c.isdigit())
        assert student.encode(no_digits) == hf_tok.encode(no_digits, add_special_tokens=False)
    # tokenizer.ggml.pre is "smollm": llama.cpp splits digits off first, then applies the GPT-2 regex to each
    # piece, as SmolLM2's own tokenizer.json does (Digits, then ByteLevel). transformers' GGUF loader has no
    # "smollm" entry and splits "x,  1" as GPT-2 would; with SmolLM2's pre-tokenizer it agrees with ours.
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in texts:
        assert student.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert hf_tok.convert_ids_to_tokens([student.eos_id, student.bos_id]) == ["<|im_end|>", "<|im_start|>"]
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    for prompt in (False, True):
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert student.render_chat(messages, add_generation_prompt=prompt) == expected

    ids = torch.tensor([student.encode("def square(x):\n    return x * x  # 42\n")])
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        mine = ours(ids).logits
        del ours
        theirs = transformers_gguf_model(source)(ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert mine[0, -1].argmax() != mine[0, -1].argmin(), "real, non-degenerate logits"


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf: GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFImportError, match=r"junk\.gguf: not a readable GGUF file"):
        convert_gguf(junk, tmp_path / "out")
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFImportError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'; only 'llama'"):
        convert_gguf(other, tmp_path / "out")
    assert main([str(other), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
