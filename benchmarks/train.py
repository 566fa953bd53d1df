"""Training throughput with soft CE vs hard CE: tokens/s of a full training step of the same student.

One process (a world of one; under ``torchrun`` the launched grid, ``--tp`` and DP = world / TP). Two copies of the same
model (same seed) train side by side on the same packed batches (top-k = 20 synthetic teacher targets with
mass < 1), their steps interleaved so that machine load affects both alike: ``student.train.train_step``
(forward, ``distillation_loss``, backward, DP all-reduce, clipping, AdamW) with ``kind="soft"`` (tail bucket)
and ``kind="hard"`` (megatron-core's vocab-parallel CE). Reported: median step time and tokens/s of each, and
``soft_over_hard_tokens_per_s`` (1.0 = soft distillation costs nothing extra). CUDA: bf16 autocast, and the
peak memory of each. Both use the default ``train.fused_output_loss`` (recorded in the JSON).

Then, at vocabularies 49152 and 128k (``fused_vs_unfused``), the soft student with ``fused_output_loss`` on and
off the same way (4 timed steps): tokens/s and the peak memory of a step of each, and
``fused_over_unfused_tokens_per_s`` / ``fused_over_unfused_peak_memory``.

    .venv/bin/python benchmarks/train.py            # 4 layers, width 256, vocab 32k, 4 x 256 tokens per step
    .venv/bin/python benchmarks/train.py --quick    # tiny smoke run (writes train_quick.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loss import PeakMemory  # noqa: E402
from student.batches import TokenBatches, TokenCorpus  # noqa: E402
from student.distributed import init_distributed, seed_everything, teardown  # noqa: E402
from student.model import build_model  # noqa: E402
from student.optim import make_train_optimizer  # noqa: E402
from student.settings import LossSettings, ModelSettings, TrainSettings  # noqa: E402
from student.train import train_step  # noqa: E402

FULL = {
    "layers": 4,
    "hidden": 256,
    "heads": 8,
    "ffn": 688,
    "vocab": 32000,
    "seq": 256,
    "micro": 4,
    "steps": 12,
    "fused_steps": 4,
}
QUICK = {
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "ffn": 128,
    "vocab": 2000,
    "seq": 64,
    "micro": 2,
    "steps": 4,
    "fused_steps": 2,
}
FUSED_VOCABS = (49152, 131072)
"""Vocabularies of the fused vs unfused output-layer + loss comparison (SmolLM2's 49152, and 128k)."""
QUICK_FUSED_VOCABS = (4096,)
K = 20
LOSSES = {"soft": LossSettings(kind="soft", tail="tail_bucket"), "hard": LossSettings(kind="hard")}


def synthetic_corpus(vocab: int, tokens: int, seed: int = 0) -> TokenCorpus:
    """Random documents with a peaked random top-k teacher (mass about 0.9) at every predicted position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, 512, size=tokens // 200 + 1)
    corpus = TokenCorpus.from_documents([rng.integers(1, vocab, size=n).tolist() for n in lengths])
    n = len(corpus.tokens)
    base = rng.integers(0, vocab, size=(n, 1))
    corpus.topk_ids = ((base + np.arange(K) * (vocab // K)) % vocab).astype(np.int32)
    weights = np.sort(rng.dirichlet(np.full(K, 0.3), size=n), axis=1)[:, ::-1] * 0.9
    corpus.topk_logprobs = np.log(np.maximum(weights, 1e-30)).astype(np.float32)
    return corpus


def run(size: dict, threads: int, tp: int, fused_vocabs: tuple[int, ...]) -> dict:
    torch.set_num_threads(threads)
    env = init_distributed(tp)
    try:
        report = _measure(size, env)
        report["fused_vs_unfused"] = {
            f"v{vocab}": _fused_vs_unfused(size, vocab, env) for vocab in fused_vocabs
        }
        return report
    finally:
        teardown()


def _interleaved(
    size: dict, vocab: int, env, variants: dict[str, tuple[TrainSettings, LossSettings]], steps: int
) -> dict[str, dict]:
    """Train one model per variant (same seed, same batches), steps interleaved; per variant the step times
    after two warm-up steps, the peak memory of a step and the last loss.

    Peak memory of a step: CUDA ``max_memory_allocated`` (everything allocated, the model included); CPU the
    step's RSS high-water mark above the RSS before it (``PeakMemory`` of benchmarks/loss.py: what the step
    allocates on top of the model, optimizer state and batches).
    """
    model_settings = ModelSettings(
        num_layers=size["layers"],
        hidden_size=size["hidden"],
        num_attention_heads=size["heads"],
        ffn_hidden_size=size["ffn"],
        seq_length=size["seq"],
    )
    batches = TokenBatches(
        synthetic_corpus(vocab, size["seq"] * size["micro"] * env.dp * (steps + 3)),
        size["seq"],
        size["micro"],
        seed=0,
        dp_rank=env.dp_rank,
        dp_size=env.dp,
    )
    trainers = {}
    for name, (settings, _) in variants.items():
        seed_everything(1234)
        model = build_model(model_settings, vocab)
        trainers[name] = (model, make_train_optimizer(model, settings, env))
    cuda = env.device.type == "cuda"
    memory = PeakMemory("cuda" if cuda else "cpu")
    figures = {name: {"times": [], "peak_bytes": 0} for name in variants}
    warmup = 2
    for step in range(warmup + steps):
        micro = [batches.micro_batch(step)]
        for name, (settings, loss_settings) in variants.items():
            model, optimizer = trainers[name]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                memory.start()
            start = time.perf_counter()
            result = train_step(model, optimizer, micro, settings, loss_settings, env)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                figures[name]["times"].append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() if cuda else memory.peak()
                figures[name]["peak_bytes"] = max(figures[name]["peak_bytes"], peak)
            figures[name]["loss"] = result["loss"]
    return figures


def _train_settings(size: dict, env, **overrides) -> TrainSettings:
    return TrainSettings(
        tensor_parallel=env.tp,
        data_parallel=env.dp,
        micro_batch_size=size["micro"],
        steps=1000,
        warmup_steps=0,
        **overrides,
    )


def _measure(size: dict, env) -> dict:
    settings = _train_settings(size, env)
    figures = _interleaved(
        size, size["vocab"], env, {name: (settings, loss) for name, loss in LOSSES.items()}, size["steps"]
    )
    cuda = env.device.type == "cuda"
    tokens = size["seq"] * size["micro"] * env.dp
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "tensor_parallel": env.tp,
        "data_parallel": env.dp,
        "size": size,
        "top_k": K,
        "tokens_per_step": tokens,
        "fused_output_loss": settings.fused_output_loss,
        "load_average_1m": os.getloadavg()[0],  # other work on the machine slows both sides alike
    }
    for name in LOSSES:
        median = statistics.median(figures[name]["times"])
        report[f"{name}_step_ms"] = 1000 * median
        report[f"{name}_tokens_per_s"] = tokens / median
        report[f"{name}_final_loss"] = figures[name]["loss"]
        if cuda:
            report[f"{name}_peak_mib"] = figures[name]["peak_bytes"] / 2**20
    report["soft_over_hard_tokens_per_s"] = report["soft_tokens_per_s"] / report["hard_tokens_per_s"]
    return report


def _fused_vs_unfused(size: dict, vocab: int, env) -> dict:
    """The soft-CE student at ``vocab`` with ``fused_output_loss`` on and off: tokens/s and peak step memory."""
    variants = {
        name: (_train_settings(size, env, fused_output_loss=fused), LOSSES["soft"])
        for name, fused in (("fused", True), ("unfused", False))
    }
    figures = _interleaved(size, vocab, env, variants, size["fused_steps"])
    tokens = size["seq"] * size["micro"] * env.dp
    entry: dict = {"vocab": vocab, "load_average_1m": os.getloadavg()[0]}
    for name in variants:
        median = statistics.median(figures[name]["times"])
        entry[f"{name}_step_ms"] = 1000 * median
        entry[f"{name}_tokens_per_s"] = tokens / median
        entry[f"{name}_peak_mib"] = figures[name]["peak_bytes"] / 2**20
        entry[f"{name}_final_loss"] = figures[name]["loss"]
    entry["fused_over_unfused_tokens_per_s"] = entry["fused_tokens_per_s"] / entry["unfused_tokens_per_s"]
    entry["fused_over_unfused_peak_memory"] = entry["fused_peak_mib"] / entry["unfused_peak_mib"]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size (under torchrun; DP = world / TP)"
    )
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/train[_quick].json)"
    )
    args = parser.parse_args()
    size, vocabs = (QUICK, QUICK_FUSED_VOCABS) if args.quick else (FULL, FUSED_VOCABS)
    report = run(size, args.threads, args.tp, vocabs) | {"quick": args.quick}
    out = args.out or ROOT / "benchmarks" / "results" / ("train_quick.json" if args.quick else "train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']}, {report['tokens_per_step']} tokens/step, top-k {K}")
    for name in LOSSES:
        print(
            f"  {name:4s}: {report[f'{name}_step_ms']:8.1f} ms/step  {report[f'{name}_tokens_per_s']:10.0f} tokens/s"
        )
    print(f"soft_over_hard_tokens_per_s = {report['soft_over_hard_tokens_per_s']:.3f}  -> {out}")
    for name, entry in report["fused_vs_unfused"].items():
        print(
            f"  {name} soft, output layer + loss fused vs unfused: "
            f"{entry['fused_tokens_per_s']:.0f} vs {entry['unfused_tokens_per_s']:.0f} tokens/s, peak "
            f"{entry['fused_peak_mib']:.0f} vs {entry['unfused_peak_mib']:.0f} MiB: "
            f"fused_over_unfused_tokens_per_s {entry['fused_over_unfused_tokens_per_s']:.3f}, "
            f"fused_over_unfused_peak_memory {entry['fused_over_unfused_peak_memory']:.3f}"
        )


if __name__ == "__main__":
    main()
