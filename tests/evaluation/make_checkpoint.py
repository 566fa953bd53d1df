"""Worker (run under torchrun): a small random student with non-trivial norms, saved as a checkpoint at the
launch's TP size (TP = world size), plus its logits on fixed random token lists (``reference.npz``).

Usage: torchrun --nproc-per-node=TP tests/evaluation/make_checkpoint.py OUT_DIR [--vocab N] [--seed S]
    [--other-seed S2] [--heldout DOCS]
Writes OUT_DIR/tokenizer.json, OUT_DIR/checkpoint/ and OUT_DIR/reference.npz (tokens, lengths, logits).
``--other-seed``: also OUT_DIR/other/, a second model from another seed. ``--heldout``: also
OUT_DIR/heldout.npz, a token corpus of DOCS documents of exactly seq_length tokens (so each packed row is one
whole document) whose teacher top-k (k=5) is this model's, and OUT_DIR/heldout_expected.npz with this model's
per-label CE, top-1 probability and top-1 == label, computed here from full-vocabulary logits.
"""

import argparse
import inspect
import json.decoder
import os
from pathlib import Path

import numpy as np
import torch

from student.batches import TokenCorpus
from student.checkpoint import save_checkpoint
from student.distributed import distributed, seed_everything
from student.inference import InferenceModel
from student.model import build_model
from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer

SETTINGS = ModelSettings(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, seq_length=64
)
LENGTHS = (17, 9)
TOP_K = 5


def save_heldout(out: Path, model: InferenceModel, tokenizer: StudentTokenizer, docs: int) -> None:
    """Documents of exactly seq_length tokens; row i of the top-k predicts token i from tokens[:i]."""
    stream = tokenizer.encode(inspect.getsource(json.decoder) * 4)
    n = SETTINGS.seq_length
    documents = [stream[i * n : (i + 1) * n] for i in range(docs)]
    assert all(len(d) == n for d in documents), "held-out text too short"
    logprobs = torch.cat([torch.log_softmax(x.double(), -1) for x in model.logits(documents)]).view(
        docs, n, -1
    )
    top = logprobs.topk(TOP_K, dim=-1)
    ids = np.full((docs, n, TOP_K), -1, dtype=np.int32)
    lps = np.full((docs, n, TOP_K), -np.inf, dtype=np.float32)
    ids[:, 1:] = top.indices[:, :-1].numpy()
    lps[:, 1:] = top.values[:, :-1].numpy()
    corpus = TokenCorpus.from_documents(documents)
    corpus.topk_ids, corpus.topk_logprobs = ids.reshape(docs * n, TOP_K), lps.reshape(docs * n, TOP_K)
    corpus.save(out / "heldout.npz")
    labels = torch.as_tensor(documents)[:, 1:]
    predicted = logprobs[:, :-1]
    np.savez(
        out / "heldout_expected.npz",
        ce=(-predicted.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).numpy(),
        confidence=predicted.max(-1).values.exp().numpy(),
        correct=(predicted.argmax(-1) == labels).numpy(),
    )


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1, which would hide a swapped norm in the export; give each its own values
    (the same on every TP rank: they are replicated)."""
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "layernorm" in name:
                generator = torch.Generator().manual_seed(seed * 1000 + index)
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--other-seed", type=int, default=None)
    parser.add_argument("--heldout", type=int, default=0)
    args = parser.parse_args()
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    with distributed(tp=tp, seed=args.seed) as env:
        tokenizer_path = args.out / "tokenizer.json"
        if env.is_main:
            texts = [inspect.getsource(m) for m in (argparse, inspect)]
            StudentTokenizer.train(texts, vocab_size=args.vocab).save(tokenizer_path)
        torch.distributed.barrier()
        tokenizer = StudentTokenizer.load(tokenizer_path)
        model = build_model(SETTINGS, tokenizer.vocab_size)
        randomize_norms(model, args.seed)
        model.eval()
        save_checkpoint(args.out / "checkpoint", model, SETTINGS, step=3, tokenizer=tokenizer_path)
        generator = torch.Generator().manual_seed(args.seed)
        token_lists = [
            torch.randint(0, tokenizer.vocab_size, (n,), generator=generator).tolist() for n in LENGTHS
        ]
        runner = InferenceModel(model, SETTINGS, tokenizer)
        logits = runner.logits(token_lists)
        if args.heldout:
            assert tp == 1, "--heldout computes logits on one rank: run it at TP=1"
            save_heldout(args.out, runner, tokenizer, args.heldout)
        if env.is_main:
            padded = np.zeros((len(LENGTHS), max(LENGTHS)), dtype=np.int64)
            for row, toks in enumerate(token_lists):
                padded[row, : len(toks)] = toks
            np.savez(
                args.out / "reference.npz",
                tokens=padded,
                lengths=np.array(LENGTHS),
                logits=np.concatenate([x.numpy() for x in logits]),
            )
        if args.other_seed is not None:
            seed_everything(args.other_seed)
            other = build_model(SETTINGS, tokenizer.vocab_size)
            randomize_norms(other, args.other_seed)
            save_checkpoint(args.out / "other", other, SETTINGS, step=5, tokenizer=tokenizer_path)


if __name__ == "__main__":
    main()
