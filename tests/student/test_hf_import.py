"""Hugging Face Llama checkpoints in: at TP=1 and TP=2 the student computes transformers' logits, re-exports
every tensor bit for bit, and trains from them.

The checkpoints are small random ``LlamaForCausalLM`` models built here from a ``LlamaConfig`` with everything
the import has to get right: grouped-query attention (4 heads, 2 key/value heads), an odd vocabulary (301, so
the student pads it), ``rope_theta`` 50000, ``rms_norm_eps`` 1e-6, tied and untied embeddings, random norm
weights (a swapped norm would show), saved as one file and sharded. The import runs in real torchrun jobs
(``worker_hf_import.py``); the reference is transformers' own forward pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.corpus import stdlib_files
from student.batches import TokenCorpus
from student.hf_import import HFImportError, hf_model_settings, load_hf_state_dict
from student.tokenizer import StudentTokenizer
from tests.support import PYTHON, run_bounded, torchrun

pytestmark = pytest.mark.timeout(900)  # module fixtures run several torchrun jobs on a shared machine

WORKER = str(Path(__file__).with_name("worker_hf_import.py"))
VOCAB = 301
SEQ = 64
RUNS = {"tied": 1, "sharded": 2, "untied": 2}  # directory -> TP size of its import


def _llama(tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    """HF directories ``tied`` (one file), ``sharded`` (the same model in shards), ``untied``; and ``tokens``."""
    root = tmp_path_factory.mktemp("hf")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(4)]
    tokenizer = StudentTokenizer.train(texts, VOCAB)
    assert tokenizer.vocab_size == VOCAB
    tied, untied = _llama(True, 0), _llama(False, 1)
    dirs = {"tied": root / "tied", "sharded": root / "sharded", "untied": root / "untied"}
    tied.save_pretrained(dirs["tied"])
    tied.save_pretrained(dirs["sharded"], max_shard_size="60KB")
    untied.save_pretrained(dirs["untied"])
    for directory in dirs.values():
        tokenizer.save(directory / "tokenizer.json")
    assert not (dirs["sharded"] / "model.safetensors").exists()
    assert len(list(dirs["sharded"].glob("model-*.safetensors"))) > 2
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(3, 40))
    np.save(root / "tokens.npy", tokens)
    return {**dirs, "tokens": root / "tokens.npy", "root": root}


def _reference_logits(directory: Path, tokens: np.ndarray) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits


@pytest.fixture(scope="module")
def runs(hf) -> dict[str, dict]:
    results = {}
    for name, tp in RUNS.items():
        out = hf["root"] / f"{name}.pt"
        args = ["--hf", str(hf[name]), "--tokens", str(hf["tokens"]), "--out", str(out), "--tp", str(tp)]
        proc = torchrun(tp, [WORKER, *args, "--save", str(hf["root"] / f"ckpt_{name}")], timeout=240)
        assert proc.returncode == 0, proc.stdout[-4000:]
        results[name] = torch.load(out, weights_only=False)
    return results


@pytest.mark.parametrize("name", list(RUNS))
def test_imported_logits_equal_transformers(name, hf, runs):
    theirs = _reference_logits(hf[name], np.load(hf["tokens"]))
    ours = runs[name]["logits"]
    assert ours.shape == theirs.shape == (3, 40, VOCAB)
    assert theirs.std() > 0.5, "a real comparison, not two near-constant arrays"
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4, f"{name} at TP={RUNS[name]}: max abs difference {err:.3g}"


@pytest.mark.parametrize("name", list(RUNS))
def test_padded_vocabulary_columns_never_win(name, runs):
    padded = runs[name]["padded"]
    tp = RUNS[name]
    assert padded.shape[-1] == 128 * tp * -(-VOCAB // (128 * tp)) > VOCAB  # 384 at TP=1, 512 at TP=2
    torch.testing.assert_close(padded[..., :VOCAB], runs[name]["logits"], rtol=0, atol=0)
    assert padded[..., VOCAB:].max() < padded[..., :VOCAB].min()
    assert (padded.topk(VOCAB, dim=-1).indices < VOCAB).all()
    probs = padded.softmax(-1)
    assert (probs[..., VOCAB:] == 0).all() and torch.isfinite(padded.log_softmax(-1)).all()


def test_imported_settings(runs):
    s = runs["sharded"]["settings"]
    assert (s["num_attention_heads"], s["num_query_groups"], s["hidden_size"], s["ffn_hidden_size"]) == (
        4,
        2,
        64,
        96,
    )
    assert (s["rotary_base"], s["norm_epsilon"], s["tie_embeddings"], s["seq_length"]) == (
        50000.0,
        1e-6,
        True,
        SEQ,
    )
    assert runs["untied"]["settings"]["tie_embeddings"] is False


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_import_then_export_reproduces_every_tensor(name, hf, runs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "export"
    proc = run_bounded(
        [PYTHON, "-m", "student.export", str(hf["root"] / f"ckpt_{name}"), str(out)], timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    original, exported = load_hf_state_dict(hf[name]), load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert ("lm_head.weight" in exported) == (name == "untied")
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == (name == "tied")
    torch.testing.assert_close(_reference_logits(out, np.load(hf["tokens"])), runs[name]["logits"])


def test_student_initialised_from_hf_trains_from_its_loss(hf, tmp_path):
    """``model.init`` in a training spec at TP=2: the first step's loss is transformers' CE on the same batch.

    The corpus is one document of 2 x 32 + 1 tokens, so ``TokenBatches`` cuts exactly two windows of 32 inputs
    (positions restarting at 0) and a micro-batch of 2 holds both: the batch is known without the sampler.
    """
    seq = 32
    doc = np.random.default_rng(5).integers(0, VOCAB, size=2 * seq + 1)
    corpus = TokenCorpus.from_documents([doc.tolist()]).save(tmp_path / "train.npz")
    spec = {
        "model": {"init": str(hf["tied"]), "seq_length": seq},
        "train": {
            "tensor_parallel": 2,
            "micro_batch_size": 2,
            "steps": 1,
            "log_every": 1,
            "eval_every": 100,
            "checkpoint_every": 100,
            "warmup_steps": 0,
        },
        "loss": {"kind": "hard"},
        "tokenizer": str(hf["tied"] / "tokenizer.json"),
        "train_data": str(corpus),
        "out_dir": str(tmp_path / "out"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "student.train", str(tmp_path / "spec.json")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]

    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["split"], first["step"], first["step_tokens"]) == ("train", 1, 2 * seq)
    windows = np.stack([doc[: seq + 1], doc[seq:]])
    logits = _reference_logits(hf["tied"], windows[:, :-1])
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.as_tensor(windows[:, 1:]).reshape(-1)
    )
    assert first["loss"] == pytest.approx(ce.item(), abs=1e-4)

    meta = json.loads((tmp_path / "out" / "final" / "meta.json").read_text())
    assert meta["model"]["hidden_size"] == 64 and meta["model"]["tie_embeddings"] is True
    assert (meta["model"]["rotary_base"], meta["model"]["seq_length"], meta["vocab_size"]) == (
        50000.0,
        seq,
        VOCAB,
    )


def _with_config(source: Path, target: Path, **changes) -> Path:
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}},
            "rope_parameters",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"architectures": ["MistralForCausalLM"]}, "architectures"),
        ({"head_dim": 32}, "head_dim"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_unsupported_config_is_a_clear_error(changes, key, hf, tmp_path):
    directory = _with_config(hf["tied"], tmp_path / "bad", **changes)
    with pytest.raises(HFImportError) as err:
        hf_model_settings(directory)
    assert str(directory / "config.json") in str(err.value) and f"'{key}'" in str(err.value)


def test_missing_shard_is_a_clear_error(hf, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(hf["sharded"], directory)
    lost = sorted(directory.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(HFImportError, match=f"shard files missing in .*{lost.name}"):
        load_hf_state_dict(directory)


def test_missing_weight_is_a_clear_error(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "incomplete"
    shutil.copytree(hf["untied"], directory)
    state = load_file(str(directory / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    args = ["--hf", str(directory), "--tokens", str(hf["tokens"]), "--out", str(tmp_path / "never.pt")]
    proc = run_bounded([PYTHON, WORKER, *args], timeout=180)
    assert proc.returncode != 0
    assert (
        f"{directory}: Hugging Face checkpoint has no weight 'model.layers.1.mlp.up_proj.weight'"
        in proc.stdout
    )
    assert not (tmp_path / "never.pt").exists()
