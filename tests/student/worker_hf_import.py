"""Worker: import a Hugging Face Llama directory at the launch's TP size and record its logits.

``torchrun --nproc-per-node=TP worker_hf_import.py --hf DIR --tokens TOKENS.npy --out OUT.pt [--save CKPT]``
(or plain ``python`` for a world of one). ``InferenceModel.from_hf`` loads DIR (tokenizer from DIR); rank 0
writes ``padded`` (``forward_logits`` of the rows of TOKENS gathered over TP: ``[B, S, V_padded]``, padding
columns included), ``logits`` (``InferenceModel.logits``: ``[B, S, V]``) and ``settings``. ``--save`` then writes
a ``student.checkpoint`` of the imported model (with DIR's tokenizer) for the export round trip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from student.checkpoint import save_checkpoint
from student.distributed import init_distributed, teardown
from student.inference import InferenceModel
from student.model import forward_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_distributed(args.tp, 1)
    try:
        runner = InferenceModel.from_hf(args.hf)
        tokens = torch.from_numpy(np.load(args.tokens)).long()
        rows, seq = tokens.shape
        positions = torch.arange(seq).expand(rows, seq)
        with torch.no_grad():
            local = forward_logits(runner.model, tokens, positions, torch.zeros_like(tokens))
            padded = gather_from_tensor_model_parallel_region(local)
        result = {
            "padded": padded,
            "logits": torch.stack(runner.logits(tokens.tolist())),
            "settings": runner.settings.model_dump(),
        }
        if args.save:
            save_checkpoint(
                args.save, runner.model, runner.settings, step=0, tokenizer=args.hf / "tokenizer.json"
            )
        if env.rank == 0:
            torch.save(result, args.out)
    finally:
        teardown()


if __name__ == "__main__":
    main()
