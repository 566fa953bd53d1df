"""Soft CE (ours, fused vocab-parallel) vs megatron-core's hard CE vs a naive PyTorch soft CE: time and memory.

Forward + backward of the per-token loss over ``[tokens, vocab]`` logits with a teacher top-k of ``k`` ids
(top-k mass 0.9), variants interleaved round by round so that machine noise hits them alike; time = the best
round (median kept too). Peak memory of one iteration (the logits it creates, the loss's working memory and the
gradient), measured per iteration:

- CPU: the kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
  RSS before the iteration; glibc's mmap threshold is pinned so freed buffers go back to the OS. float32 logits,
  one thread.
- CUDA: ``torch.cuda.max_memory_allocated`` (reset per iteration) minus the memory allocated before; bf16 logits.

Variants: ``ours`` = ``soft_cross_entropy(tail="tail_bucket")`` (the default loss), ``ours_none`` = the same
with ``tail="none"`` (the naive variant's exact math), ``hard`` = megatron-core ``vocab_parallel_cross_entropy``,
``naive`` = ``log_softmax`` + ``gather`` + weighted sum + autograd. Ratios use ``ours``.

Output layer + loss (hidden states ``[tokens, 1024]`` to the loss, forward and backward, the weight gradient
included; interleaved the same way, in their own rounds): ``head_hard`` = megatron-core's ``ColumnParallelLinear``
+ ``vocab_parallel_cross_entropy``, ``head_ours`` = the same layer + our soft CE (tail bucket), ``head_fused`` =
``fused_topk_cross_entropy`` (student/losses/fused.py: the same soft CE, the logits never held) on the same
weight. Ratios ``fused_*_ratio_vs_hard_head`` and ``fused_*_ratio_vs_ours_head``.

    .venv/bin/python benchmarks/loss.py            # 8192 tokens, vocab 32k and 128k, k=20, hidden 1024
    .venv/bin/python benchmarks/loss.py --quick    # 256 tokens, hidden 256: a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from student.losses import hard_cross_entropy, soft_cross_entropy  # noqa: E402
from student.losses.fused import fused_topk_cross_entropy  # noqa: E402
from student.losses.targets import masked_logprobs, tempered_targets, valid_entries  # noqa: E402
from tests.support import free_port  # noqa: E402

VOCABS = {"v32k": 32768, "v128k": 131072}
VARIANTS = ("ours", "ours_none", "hard", "naive")
GIB = 1 << 30
TARGETS = {"time_ratio_vs_hard": 1.3, "mem_ratio_vs_hard": 1.1, "mem_ratio_vs_naive": 0.5}
HEAD_VARIANTS = ("head_fused", "head_ours", "head_hard")
HEAD_TARGETS = {"fused_mem_ratio_vs_hard_head": 0.25, "fused_time_ratio_vs_hard_head": 1.35}
M_MMAP_THRESHOLD = -3


def naive_soft_ce(logits, ids, logprobs):
    logq = F.log_softmax(logits.float(), dim=-1)
    return -(logprobs.exp() * logq.gather(-1, ids)).sum(-1)


LOSSES = {
    "ours": lambda z, ids, lp, y: soft_cross_entropy(z, ids, lp, tail="tail_bucket"),
    "ours_none": lambda z, ids, lp, y: soft_cross_entropy(z, ids, lp, tail="none"),
    "hard": lambda z, ids, lp, y: hard_cross_entropy(z, y),
    "naive": lambda z, ids, lp, y: naive_soft_ce(z, ids, lp),
}


class PeakMemory:
    """Peak bytes above the starting point, for one measured region, on CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cpu":
            if not Path("/proc/self/clear_refs").exists():
                raise SystemExit("benchmarks/loss.py: CPU peak memory needs Linux (/proc/self/clear_refs)")
            # a fixed threshold: every large buffer is its own mapping, returned to the OS when freed
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.before = psutil.Process().memory_info().rss

    def peak(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.before
        hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
        return hwm_kib * 1024 - self.before


def _init_parallel(device: str) -> None:
    if parallel_state.model_parallel_is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def measure(tokens: int, vocab: int, k: int, device: str, repeats: int) -> dict[str, dict]:
    """Best (and median) time and the largest per-iteration peak of every variant; round 0 only warms up.

    The best of the interleaved rounds is the least disturbed by other load on the machine; ratios use it.
    """
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    master = torch.randn(tokens, vocab, generator=g, device=device, dtype=dtype)
    base = torch.randint(0, vocab, (tokens, 1), generator=g, device=device)
    ids = (base + torch.arange(k, device=device) * (vocab // k)) % vocab  # unique per row
    logprobs = torch.log_softmax(torch.randn(tokens, k, generator=g, device=device), -1) + torch.log(
        torch.tensor(0.9, device=device)
    )
    labels = ids[:, 0].clone()
    memory = PeakMemory(device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    for round_ in range(repeats + 1):
        for variant in VARIANTS:
            memory.start()
            logits = master.clone().requires_grad_()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            LOSSES[variant](logits, ids, logprobs, labels).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times[variant].append(time.perf_counter() - start)
            if round_ > 0:
                peaks[variant] = max(peaks[variant], memory.peak())
            del logits
    return {
        v: {
            "time_s": min(times[v][1:]),
            "median_time_s": statistics.median(times[v][1:]),
            "times_s": times[v][1:],
            "peak_bytes": peaks[v],
        }
        for v in VARIANTS
    }


# ------------------------------------------------------------------ output layer + loss ------------------------
def _output_layer(hidden: int, vocab: int, device: str, dtype: torch.dtype):
    """megatron-core's column-parallel output layer (TP=1, no bias), as the student's ``GPTModel`` builds it."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=1,
        use_cpu_initialization=True,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )
    layer = ColumnParallelLinear(
        hidden,
        vocab,
        config=config,
        init_method=lambda w: torch.nn.init.normal_(w, std=0.02),
        bias=False,
        gather_output=False,
    )
    return layer.to(device)


def _head_losses(layer, vocab: int, ids: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor) -> dict:
    """variant -> f(hidden [N, h]) -> summed loss, all from the same output weight."""
    rows = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    no_labels = torch.full_like(labels, -1)

    def logits(hidden):
        return layer(hidden.unsqueeze(1))[0].squeeze(1)

    def fused(hidden):
        valid = valid_entries(ids, logprobs)
        soft_w, tail_w = tempered_targets(
            masked_logprobs(logprobs, valid, torch.float32), valid, "tail_bucket", 1.0
        )
        total, _ = fused_topk_cross_entropy(
            hidden,
            layer.weight,
            vocab,
            rows,
            topk_ids=ids,
            topk_logprobs=logprobs,
            soft_w=soft_w,
            tail_w=tail_w,
            labels=no_labels,
        )
        return total

    return {
        "head_fused": fused,
        "head_ours": lambda hidden: soft_cross_entropy(
            logits(hidden), ids, logprobs, tail="tail_bucket"
        ).sum(),
        "head_hard": lambda hidden: hard_cross_entropy(logits(hidden), labels).sum(),
    }


def measure_head(tokens: int, vocab: int, hidden: int, k: int, device: str, repeats: int) -> dict[str, dict]:
    """Best (and median) time and the largest per-iteration peak of output layer + loss, forward and backward.

    A warm-up round on 256 tokens, then ``repeats`` interleaved rounds (a round at 128k is minutes on one CPU
    thread: three matmuls of 2.2 TFLOP). Also the process CPU time (``cpu_time_s``, best round): on a shared
    machine it is disturbed less than the wall time by other processes' load. The peak covers what the iteration creates: the hidden-state copy, the
    logits (unfused), the loss's working memory and both gradients (the weight's is set to None before).
    """
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(1)
    master = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype)
    base = torch.randint(0, vocab, (tokens, 1), generator=g, device=device)
    ids = (base + torch.arange(k, device=device) * (vocab // k)) % vocab
    logprobs = torch.log_softmax(torch.randn(tokens, k, generator=g, device=device), -1) + torch.log(
        torch.tensor(0.9, device=device)
    )
    labels = ids[:, 0].clone()
    layer = _output_layer(hidden, vocab, device, dtype)
    memory = PeakMemory(device)
    times: dict[str, list[float]] = {v: [] for v in HEAD_VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in HEAD_VARIANTS}
    peaks: dict[str, int] = dict.fromkeys(HEAD_VARIANTS, 0)
    for round_ in range(repeats + 1):
        rows = slice(0, 256) if round_ == 0 else slice(0, tokens)
        losses = _head_losses(layer, vocab, ids[rows], logprobs[rows], labels[rows])
        for variant in HEAD_VARIANTS:
            layer.weight.grad = None
            memory.start()
            x = master[rows].clone().requires_grad_()
            if device == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            losses[variant](x).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[variant].append(time.perf_counter() - start)
                cpu_times[variant].append(time.process_time() - cpu_start)
                peaks[variant] = max(peaks[variant], memory.peak())
            del x
    layer.weight.grad = None
    return {
        v: {
            "time_s": min(times[v]),
            "median_time_s": statistics.median(times[v]),
            "times_s": times[v],
            "cpu_time_s": min(cpu_times[v]),
            "peak_bytes": peaks[v],
        }
        for v in HEAD_VARIANTS
    }


def head_entry(figures: dict[str, dict], hidden: int) -> dict:
    fused, ours, hard = (figures[v] for v in HEAD_VARIANTS)
    entry = {
        "hidden": hidden,
        "fused_time_ratio_vs_hard_head": fused["time_s"] / hard["time_s"],
        "fused_mem_ratio_vs_hard_head": fused["peak_bytes"] / hard["peak_bytes"],
        "fused_time_ratio_vs_ours_head": fused["time_s"] / ours["time_s"],
        "fused_mem_ratio_vs_ours_head": fused["peak_bytes"] / ours["peak_bytes"],
        "fused_cpu_time_ratio_vs_hard_head": fused["cpu_time_s"] / hard["cpu_time_s"],
        "head_variants": figures,
    }
    entry["head_targets_met"] = all(entry[key] <= limit for key, limit in HEAD_TARGETS.items())
    return entry


# ------------------------------------------------------------------ driver ---------------------------------------
def tokens_that_fit(
    tokens: int, vocab: int, device: str, reserve: float = 4 * GIB, head: bool = False
) -> int:
    """``tokens``, halved until the hungriest variant fits in the free memory less ``reserve``.

    ``head``: the output layer + loss variants, whose hungriest (unfused) holds the logits, their gradient in the
    same buffer (CUDA: a float32 buffer next to the bf16 logits), and 10 % slack.

    The naive variant peaks at about four ``[tokens, vocab]`` float32 buffers (logits, log-softmax, the gradient
    of the gather, the input gradient), plus the master copy of the logits: five (as measured), and 2 % slack. The machine is
    shared, so the benchmark shrinks rather than push others out of memory; the JSON records the token count.
    """
    if head:
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available
        per_token = vocab * (2 + 4 if device == "cuda" else 4) * 1.1
    elif device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        per_token = vocab * (2 + 2 + 4 + 4 + 4 + 2) * 1.1
    else:
        free = psutil.virtual_memory().available
        per_token = vocab * 5 * 4 * 1.02
    while tokens > 256 and tokens * per_token > free - reserve:
        tokens //= 2
    if tokens * per_token > free - reserve:
        raise SystemExit(f"benchmarks/loss.py: not enough free memory on {device} for vocab {vocab}")
    return tokens


def _summary(name: str, device: str, entry: dict) -> str:
    v = entry["variants"]
    times = " ".join(f"{variant} {v[variant]['time_s']:.3f}s" for variant in VARIANTS)
    peaks = " ".join(f"{variant} {v[variant]['peak_bytes'] / GIB:.3f}" for variant in VARIANTS)
    h, head_tokens = entry["head_variants"], entry["head_tokens"]
    head = " ".join(
        f"{variant} {h[variant]['time_s']:.3f}s {h[variant]['peak_bytes'] / GIB:.3f}GiB"
        for variant in HEAD_VARIANTS
    )
    return (
        f"{name} {device} ({entry['tokens']} tokens, {entry['dtype']}): time {times}; peak GiB {peaks}\n"
        f"    ours/hard time {entry['time_ratio_vs_hard']:.2f} (target <= 1.3), ours/hard memory "
        f"{entry['mem_ratio_vs_hard']:.2f} (<= 1.1), ours/naive memory {entry['mem_ratio_vs_naive']:.2f} (<= 0.5)\n"
        f"    output layer + loss ({head_tokens} tokens, hidden {entry['hidden']}): {head}\n"
        f"    fused/hard head time {entry['fused_time_ratio_vs_hard_head']:.2f} (target <= 1.35), memory "
        f"{entry['fused_mem_ratio_vs_hard_head']:.3f} (<= 0.25); fused/ours head time "
        f"{entry['fused_time_ratio_vs_ours_head']:.2f}, memory {entry['fused_mem_ratio_vs_ours_head']:.3f}"
    )


def run(
    tokens: int,
    out: Path,
    repeats: int,
    quick: bool,
    reserve: float = 4 * GIB,
    hidden: int = 1024,
    head_repeats: int = 2,
    devices: list[str] | None = None,
) -> dict:
    torch.set_num_threads(1)
    k = 20
    only = devices
    devices = only or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict = {
        "tokens_requested": tokens,
        "k": k,
        "quick": quick,
        "threads": 1,
        "memory": "per iteration: CPU VmHWM minus RSS before, CUDA max_memory_allocated minus allocated "
        "before; covers the logits the iteration creates, the loss's working memory and the gradient",
    }
    for name, vocab in VOCABS.items():
        results[name] = {}
        for device in devices:
            fitted = tokens_that_fit(tokens, vocab, device, reserve)
            _init_parallel(device)
            figures = measure(fitted, vocab, k, device, repeats)
            ours, hard, naive = figures["ours"], figures["hard"], figures["naive"]
            entry = {
                "tokens": fitted,
                "dtype": "bfloat16" if device == "cuda" else "float32",
                "time_ratio_vs_hard": ours["time_s"] / hard["time_s"],
                "mem_ratio_vs_hard": ours["peak_bytes"] / hard["peak_bytes"],
                "mem_ratio_vs_naive": ours["peak_bytes"] / naive["peak_bytes"],
                "tail_none_time_ratio_vs_hard": figures["ours_none"]["time_s"] / hard["time_s"],
                "logits_bytes": fitted * vocab * (2 if device == "cuda" else 4),
                "variants": figures,
            }
            entry["targets_met"] = all(entry[key] <= limit for key, limit in TARGETS.items())
            head_tokens = tokens_that_fit(tokens, vocab, device, reserve, head=True)
            figures = measure_head(head_tokens, vocab, hidden, k, device, head_repeats)
            entry.update({"head_tokens": head_tokens, **head_entry(figures, hidden)})
            results[name][device] = entry
            print(_summary(name, device, entry), flush=True)
    if only and out.is_file():  # a run on some devices keeps the other devices' entries of the file
        previous = json.loads(out.read_text())
        for name in VOCABS:
            results[name] = {**previous.get(name, {}), **results[name]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 tokens, hidden 256, 2 rounds (smoke run)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens (rows); halved while out of memory")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (best is used)")
    parser.add_argument(
        "--reserve-gib", type=float, default=4.0, help="memory left free for other processes (GiB)"
    )
    parser.add_argument("--hidden", type=int, default=None, help="hidden size of the output layer (1024)")
    parser.add_argument(
        "--head-repeats", type=int, default=2, help="timed rounds of the output layer + loss variants"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        action="append",
        help="measure only this device (repeatable; CUDA runs in bf16); the file keeps the other devices' "
        "entries. Default: cpu, and cuda when present",
    )
    args = parser.parse_args()
    tokens = 256 if args.quick else args.tokens
    run(
        tokens,
        args.out,
        args.repeats or (2 if args.quick else 4),
        args.quick,
        args.reserve_gib * GIB,
        args.hidden or (256 if args.quick else 1024),
        args.head_repeats,
        args.device,
    )


if __name__ == "__main__":
    main()
