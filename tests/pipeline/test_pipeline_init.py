"""A real-model pipeline end to end at toy size: the local teacher is a GGUF file (a random Llama written with
the ``gguf`` package's own writer, quantized like llama.cpp does), the student shares its tokenizer
(``tokenizer.source = "teacher"``) and starts from the same GGUF (``[model] init``).

What it shows: the GGUF is converted once per use in cached stages (``teacher_model``, ``student_init``), the
server serves the converted directory, alignment is the identity, the student trains at TP=2 from the imported
weights, and, since it starts as the teacher itself, its validation KL to the teacher's stored top-k at step 0
is at the storage floor (every link of the chain would show there: a wrong q/k permutation, a shifted vocab, a
different tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.pipeline.test_pipeline_run import distill
from tests.pipeline.tiny_project import make_tiny_project
from tests.student.test_gguf_import import byte_level_meta, write_gguf
from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def small_llama_gguf(folder: Path) -> Path:
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "pipeline").glob("*.py"))]
    meta = byte_level_meta(texts, folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(meta["tokens"]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    path = folder / "small-llama.gguf"
    write_gguf(path, model, meta, chat_template=None)
    return path


def test_gguf_teacher_and_gguf_initialised_student(tmp_path: Path) -> None:
    gguf = small_llama_gguf(tmp_path)
    project = make_tiny_project(tmp_path / "project", n_prompts=25)
    config = project.config(
        local_teacher={"model": str(gguf)},
        tokenizer={"source": "teacher"},
        model={"init": str(gguf), "seq_length": 64},
        train={"steps": 2, "eval_every": 1, "log_every": 1, "lr": 1e-9, "warmup_steps": 0},
    )
    out = distill("run", str(config), timeout=840)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    (summary_path,) = (tmp_path / "project" / "runs").glob("*/summary.json")
    stages = json.loads(summary_path.read_text())["stages"]
    assert {"teacher_model", "student_init", "tokenizer", "collect"} <= set(stages)
    assert "bootstrap_teacher" not in stages

    converted = Path(stages["student_init"]["path"]) / "model"
    spec = json.loads((Path(stages["train_soft"]["path"]) / "train_spec.json").read_text())
    assert spec["model"]["init"] == str(converted)
    meta = json.loads((Path(stages["train_soft"]["path"]) / "final" / "meta.json").read_text())
    assert meta["model"]["hidden_size"] == 64 and meta["model"]["tie_embeddings"] is True

    teacher_vocab = json.loads((Path(stages["teacher_model"]["path"]) / "model" / "config.json").read_text())
    assert teacher_vocab["vocab_size"] == meta["vocab_size"]
    log = (Path(stages["train_soft"]["path"]) / "metrics.jsonl").read_text().splitlines()
    first_val = next(entry for entry in map(json.loads, log) if entry["split"] == "val")
    assert first_val["step"] == 0 and first_val["kl"] < 1e-3, first_val

    metrics = json.loads((summary_path.parent / "metrics.json").read_text())
    assert metrics["full_vocab"]["available"], metrics["full_vocab"]
    assert metrics["teacher"]["full_kl_teacher_student"]["value"] == pytest.approx(0.0, abs=1e-9)
