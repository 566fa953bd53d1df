"""torchrun worker: one training step of a tiny student at a given TP x DP grid, for the equivalence tests.

``torchrun --nproc-per-node=TP*DP worker_model_equivalence.py --out OUT.pt --tp TP --dp DP --micro B
[--accum A] [--save CKPT] [--load CKPT]``

Every grid sees the same global batch (``TokenBatches`` gives DP rank r its rows of global micro-batch g): four
packed rows of two or more documents, soft targets with top-k mass W < 1, a varying k and positions without a
teacher. Rank 0 writes, with logits gathered over TP and DP into the full ``[4, S, V]``: ``logits_before``
(fresh model), ``packing_error`` (two documents packed in one row vs each alone), the step's ``loss`` / ``grad_norm`` / metrics from ``student.train.train_step``, and
``logits_after`` (the same rows after the AdamW step). ``--save`` then writes a checkpoint of the stepped
model; ``--load`` builds a model from a checkpoint (written at any TP) and records its ``logits_loaded``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from student.batches import TokenBatches, TokenCorpus
from student.checkpoint import load_checkpoint, save_checkpoint
from student.distributed import dp_group, init_distributed, seed_everything, teardown
from student.model import build_model, forward_logits
from student.optim import make_train_optimizer
from student.settings import LossSettings, ModelSettings, TrainSettings
from student.train import train_step

SEED = 4321
VOCAB = 500  # padded to 512 at TP=1 (multiple of 128) and at TP=2 (multiple of 256)
SEQ = 32
GLOBAL_ROWS = 4
K = 4
MODEL = ModelSettings(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    seq_length=SEQ,
)  # grouped-query attention: 2 key/value heads, one per TP rank at TP=2
LOSS = LossSettings(kind="soft", tail="tail_bucket", alpha=0.7, no_teacher="hard")


def synthetic_corpus() -> TokenCorpus:
    """Random documents with random soft targets; identical on every rank (fixed NumPy seed)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, size=40)
    corpus = TokenCorpus.from_documents([rng.integers(1, VOCAB, size=n).tolist() for n in lengths])
    n = len(corpus.tokens)
    ids = np.argsort(rng.random((n, VOCAB)), axis=1)[:, :K].astype(np.int32)
    bins = rng.normal(size=(n, K + 1)) * 2
    logp = bins - np.log(np.exp(bins).sum(axis=1, keepdims=True))  # k+1 bins: the top-k mass W < 1
    order = np.argsort(-logp[:, :K], axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    logp = np.take_along_axis(logp[:, :K], order, axis=1).astype(np.float32)
    shorter = rng.random(n) < 0.3  # a varying k
    ids[shorter, K - 1], logp[shorter, K - 1] = -1, -np.inf
    absent = rng.random(n) < 0.15  # positions without a teacher
    ids[absent], logp[absent] = -1, -np.inf
    ids[corpus.doc_starts[:-1]], logp[corpus.doc_starts[:-1]] = -1, -np.inf  # no prediction of a first token
    corpus.topk_ids, corpus.topk_logprobs = ids, logp
    return corpus


def full_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: torch.Tensor, dp: int
) -> torch.Tensor:
    """Logits of the global batch in global row order: gathered over TP vocabulary shards and DP ranks."""
    with torch.no_grad():
        logits = forward_logits(model, batch["tokens"], batch["position_ids"], batch["doc_ids"])
        logits = gather_from_tensor_model_parallel_region(logits)
    parts = [torch.empty_like(logits) for _ in range(dp)]
    dist.all_gather(parts, logits.contiguous(), group=dp_group())
    row_parts = [torch.empty_like(rows) for _ in range(dp)]
    dist.all_gather(row_parts, rows, group=dp_group())
    return torch.cat(parts)[torch.cat(row_parts).argsort()]


def global_rows(env_dp_rank: int, dp: int, micro: int, accum: int) -> torch.Tensor:
    """Global row index of each row this rank holds (``TokenBatches``: micro-batch g, rank r, row b)."""
    return torch.tensor([(g * dp + env_dp_rank) * micro + b for g in range(accum) for b in range(micro)])


def packing_error(model: torch.nn.Module) -> float:
    """Largest logit difference between two documents packed in one row (then padding) and each alone."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, VOCAB, (10,), generator=g), torch.randint(1, VOCAB, (12,), generator=g)

    def logits(parts: list[torch.Tensor]) -> torch.Tensor:
        tokens = torch.zeros(1, SEQ, dtype=torch.long)
        doc_ids = torch.full((1, SEQ), -1)
        positions = torch.zeros(1, SEQ, dtype=torch.long)
        start = 0
        for doc, part in enumerate(parts):
            tokens[0, start : start + len(part)] = part
            doc_ids[0, start : start + len(part)] = doc
            positions[0, start : start + len(part)] = torch.arange(len(part))
            start += len(part)
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(
                forward_logits(model, tokens, positions, doc_ids)
            )[0]

    packed, alone_a, alone_b = logits([a, b]), logits([a]), logits([b])
    return max(
        (packed[:10] - alone_a[:10]).abs().max().item(), (packed[10:22] - alone_b[:12]).abs().max().item()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--dp", type=int, required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save")
    parser.add_argument("--load")
    args = parser.parse_args()
    assert args.micro * args.accum * args.dp == GLOBAL_ROWS
    torch.set_num_threads(1)
    env = init_distributed(args.tp, args.dp)
    try:
        settings = TrainSettings(
            tensor_parallel=args.tp,
            data_parallel=args.dp,
            micro_batch_size=args.micro,
            grad_accum_steps=args.accum,
            lr=1e-3,
            warmup_steps=0,
            steps=10,
            grad_clip=0.5,
            seed=SEED,
        )
        seed_everything(SEED)
        model = build_model(MODEL, VOCAB)
        batches = TokenBatches(synthetic_corpus(), SEQ, args.micro, SEED, env.dp_rank, env.dp)
        micro = [batches.micro_batch(i) for i in range(args.accum)]
        batch = {k: torch.cat([mb[k] for mb in micro]) for k in micro[0]}
        rows = global_rows(env.dp_rank, env.dp, args.micro, args.accum)
        result: dict[str, object] = {"logits_before": full_logits(model, batch, rows, env.dp)}
        result["packing_error"] = packing_error(model)
        optimizer = make_train_optimizer(model, settings, env)
        result["step"] = train_step(model, optimizer, micro, settings, LOSS, env)
        result["logits_after"] = full_logits(model, batch, rows, env.dp)
        if args.save:
            save_checkpoint(args.save, model, MODEL, step=1)
        if args.load:
            loaded, meta = load_checkpoint(args.load)
            result["logits_loaded"] = full_logits(loaded, batch, rows, env.dp)
            result["loaded_meta"] = meta
        if env.rank == 0:
            torch.save(result, args.out)
    finally:
        teardown()


if __name__ == "__main__":
    main()
