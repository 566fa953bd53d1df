"""``distill export``: the Hugging Face model gives our logits (from TP=1 and TP=2 checkpoints) and generates."""

import json

import numpy as np
import pytest
import torch

from pipeline.cli import main as distill
from student.export import split_fc1, split_qkv
from tests.support import PYTHON, run_bounded


def _export(source, out):
    result = run_bounded([PYTHON, "-m", "student.export", str(source), str(out)], timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source", ["checkpoint_tp1", "checkpoint_tp2"])
def test_exported_model_matches_our_logits_and_generates(source, request, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made = request.getfixturevalue(source)
    out = _export(made / "checkpoint", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 300  # padding stripped

    reference = np.load(made / "reference.npz")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, theirs = [], []
    with torch.no_grad():
        for row, n in enumerate(reference["lengths"]):
            theirs.append(model(torch.as_tensor(reference["tokens"][row : row + 1, :n])).logits[0].numpy())
    ours = reference["logits"]
    theirs = np.concatenate(theirs)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 1e-4
    assert ours.std() > 0.1  # a real comparison, not two near-constant arrays

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main(", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)
    # greedy decoding of the exported model = argmax of our logits, step by step
    with torch.no_grad():
        step_logits = model(generated[:, :-1]).logits[0, prompt["input_ids"].shape[1] - 1 :]
    assert step_logits.argmax(-1).tolist() == generated[0, prompt["input_ids"].shape[1] :].tolist()


def test_qkv_and_fc1_split_layout():
    """Rows of megatron's fused QKV (2 groups of 2 query heads, head dim 3) land in HF's q/k/v head order."""
    heads, groups, hn, hidden = 4, 2, 3, 5
    labels = []
    for g in range(groups):
        labels += [("q", g * 2 + j) for j in range(2)] + [("k", g), ("v", g)]
    fused = torch.cat([torch.full((hn, hidden), float(i)) for i in range(len(labels))])
    q, k, v = split_qkv(fused, heads, groups)
    ids = {name: [labels.index((name, h)) for h in range(n)] for name, n in (("q", 4), ("k", 2), ("v", 2))}
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert tensor[::hn, 0].tolist() == [float(i) for i in ids[name]]
    gate, up = split_fc1(torch.cat([torch.zeros(4, hidden), torch.ones(4, hidden)]))
    assert gate.abs().sum() == 0 and (up == 1).all()


def test_export_of_an_incomplete_checkpoint_is_a_clear_error(tmp_path, capsys):
    """Through the CLI's entry function (the check runs before any process group exists)."""
    (tmp_path / "incomplete").mkdir()
    assert distill(["export", str(tmp_path / "incomplete"), str(tmp_path / "out")]) == 2
    assert "incomplete: not a complete checkpoint (no meta.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
