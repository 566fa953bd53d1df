"""Worker for the inference tests (run as a script, under torchrun or plain python).

Builds the model (a seeded random init, optionally saved as a checkpoint, or a checkpoint loaded at this
process's TP size), then on rank 0 writes a JSON with the full logits of the given prompts, the logits of each
prompt run alone (to check right-padding), and the completions of each prompt under each sampling setting.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from student.checkpoint import save_checkpoint
from student.distributed import init_distributed, teardown
from student.generation import SamplingParams
from student.inference import InferenceModel
from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--model-json", default="{}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, help="load this checkpoint instead of a random init")
    p.add_argument("--save-checkpoint", type=Path, help="save the random init here")
    p.add_argument("--prompts-json", required=True, help="list of prompt strings")
    p.add_argument("--params-json", default="[]", help="list of SamplingParams dicts")
    args = p.parse_args()
    torch.set_num_threads(1)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    env = init_distributed(tp=tp)
    try:
        tokenizer = StudentTokenizer.load(args.tokenizer)
        if args.checkpoint is not None:
            model = InferenceModel.from_checkpoint(args.checkpoint)
        else:
            settings = ModelSettings.model_validate_json(args.model_json)
            model = InferenceModel.random_init(settings, tokenizer, args.seed)
            if args.save_checkpoint is not None:
                save_checkpoint(args.save_checkpoint, model.model, settings, step=0, tokenizer=args.tokenizer)
        prompts = [tokenizer.encode(t) for t in json.loads(args.prompts_json)]
        batched = model.logits(prompts)
        alone = [model.logits([p])[0] for p in prompts]
        params = [
            SamplingParams(**{**d, "stop": tuple(d.get("stop", ()))}) for d in json.loads(args.params_json)
        ]
        completions = [model.generate(prompts, [sp] * len(prompts)) for sp in params]
        # KV-cached decoding against a full recomputation: at every generated position of the greedy
        # completions (params[0] when it is greedy), the chosen token's logit is the row's maximum
        greedy_gap = 0.0
        if params and params[0].temperature == 0:
            for prompt, c in zip(prompts, completions[0], strict=True):
                full = model.logits([prompt + c.tokens])[0][len(prompt) - 1 : -1]
                chosen = full.gather(1, torch.as_tensor(c.tokens)[:, None])[:, 0]
                greedy_gap = max(greedy_gap, float((full.max(dim=1).values - chosen).max()))
        if env.is_main:
            result = {
                "greedy_gap_vs_recompute": greedy_gap,
                "tp": tp,
                "prompts": prompts,
                "logits": [t.tolist() for t in batched],
                "padding_max_abs_diff": max(
                    float((b - a).abs().max()) for b, a in zip(batched, alone, strict=True)
                ),
                "completions": [
                    [
                        {"tokens": c.tokens, "text": c.text, "finish_reason": c.finish_reason}
                        for c in per_params
                    ]
                    for per_params in completions
                ],
            }
            args.out.write_text(json.dumps(result), encoding="utf-8")
    finally:
        teardown()


if __name__ == "__main__":
    main()
