"""Collection throughput: the async collector against a sequential loop, and server batching vs one at a time.

1. Client concurrency. The local teacher injects a fixed latency L per request (an asynchronous sleep, so the
   server is not the bottleneck). The collector at concurrency C should reach C / L requests per second; a plain
   sequential loop (the official synchronous ``openai`` client, one request after another) reaches 1 / L. Prints
   both, the fraction of the ideal and the speedup.
2. Server batching. Without injected latency, generation requests (compute bound) sent C at a time are batched
   by the server into shared forward passes; the same requests sent one at a time are not. Prints both
   throughputs and the ratio.

    .venv/bin/python benchmarks/collect.py [--quick]

Writes ``benchmarks/results/collect.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from openai import OpenAI  # noqa: E402

from student.settings import ModelSettings  # noqa: E402
from student.tokenizer import StudentTokenizer  # noqa: E402
from teacher.collect import collect  # noqa: E402
from teacher.inputs import WorkItem  # noqa: E402
from teacher.server import local_teacher_server  # noqa: E402
from teacher.settings import LocalTeacherSettings, TeacherSettings  # noqa: E402

CORPUS = [
    "def collect(items):\n    return [item for item in items if item]\n",
    "café ☕ naïve résumé 日本語",
] * 40


def texts(n: int) -> list[str]:
    return [f"sample {i}: def f{i}(x):\n    return x * {i}\n" for i in range(n)]


def client_concurrency(
    base_url: str, resolve, concurrency: int, latency_s: float, requests: int, sequential_requests: int
) -> dict:
    """Cheap requests (one generated token, top-1) so the injected latency dominates, as with a remote API."""
    settings = TeacherSettings(
        model="local-teacher", mode="generate", api="completions", top_k=1, max_tokens=1, temperature=0.0,
        concurrency=concurrency, timeout_s=60,
    )  # fmt: skip

    def timed_collect(prompts: list[str]) -> float:
        started = time.perf_counter()
        result = collect(
            [WorkItem(prompt=t) for t in prompts], settings, base_url, None, set(), lambda *_: None,
            progress=False, resolve=resolve,
        )  # fmt: skip
        assert result.collected == len(prompts) and not result.failures, result.failures[:3]
        return time.perf_counter() - started

    timed_collect([f"warm-up {i}" for i in range(concurrency)])  # connections, server first forwards
    achieved = requests / timed_collect(texts(requests))

    client = OpenAI(base_url=base_url, api_key="no-key", max_retries=0)
    started = time.perf_counter()
    for text in texts(sequential_requests):
        client.completions.create(
            model="local-teacher", prompt=text, logprobs=1, max_tokens=1, temperature=0.0,
            extra_body={"return_tokens_as_token_ids": True},
        )  # fmt: skip
    sequential = sequential_requests / (time.perf_counter() - started)
    client.close()
    ideal = concurrency / latency_s
    print(f"client: concurrency {concurrency}, latency {latency_s * 1000:.0f} ms, {requests} requests")
    print(
        f"  collector   {achieved:8.2f} req/s   ideal C/L {ideal:8.2f} req/s   fraction {achieved / ideal:.3f}"
    )
    print(f"  sequential  {sequential:8.2f} req/s   speedup {achieved / sequential:.2f}x")
    # A request costs L plus the server's own time (seen in the sequential loop): the best a client can reach.
    overhead_ms = (1 / sequential - latency_s) * 1000
    print(
        f"  per-request server time beyond L: {overhead_ms:.0f} ms (caps the fraction at {latency_s * sequential:.3f})"
    )
    return {
        "achieved_rps": achieved,
        "ideal_rps": ideal,
        "sequential_rps": sequential,
        "sequential_overhead_ms": overhead_ms,
        "fraction_cap_from_sequential": latency_s * sequential,
        "rate_fraction_of_ideal": achieved / ideal,
        "speedup_vs_sequential": achieved / sequential,
    }


def server_batching(base_url: str, resolve, concurrency: int, requests: int, max_tokens: int) -> dict:
    def run(c: int) -> float:
        settings = TeacherSettings(
            model="local-teacher", mode="generate", api="completions", top_k=5, max_tokens=max_tokens,
            temperature=0.0, concurrency=c, timeout_s=300,
        )  # fmt: skip
        items = [WorkItem(prompt=t) for t in texts(requests)]
        started = time.perf_counter()
        result = collect(
            items, settings, base_url, None, set(), lambda *_: None, progress=False, resolve=resolve
        )
        assert result.collected == requests and not result.failures, result.failures[:3]
        return requests / (time.perf_counter() - started)

    run(2)  # warm-up
    one = run(1)
    batched = run(concurrency)
    print(f"server: {requests} generations of {max_tokens} tokens")
    print(f"  one at a time {one:8.2f} req/s   {concurrency} at a time {batched:8.2f} req/s   "
          f"batching speedup {batched / one:.2f}x")  # fmt: skip
    return {"one_at_a_time_rps": one, "batched_rps": batched, "server_batching_speedup": batched / one}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests (a smoke run).")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--latency-ms", type=float, default=3000.0, help="Injected per-request latency (a remote teacher's)."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "collect.json")
    args = parser.parse_args()
    requests = args.concurrency * (8 if args.quick else 24)
    latency_s = args.latency_ms / 1000

    folder = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    tokenizer = StudentTokenizer.train(CORPUS, vocab_size=512)
    tokenizer_path = tokenizer.save(folder / "tokenizer.json")
    model = ModelSettings(
        num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=344, seq_length=256
    )
    common = {"random_init": model, "tokenizer": tokenizer_path, "seed": 0}

    server = LocalTeacherSettings(
        max_batch_size=args.concurrency, batch_wait_ms=2, inject_latency_ms=args.latency_ms
    )
    with local_teacher_server(server, **common) as running:
        client = client_concurrency(
            running.base_url,
            tokenizer.token_bytes,
            args.concurrency,
            latency_s,
            requests,
            4 if args.quick else 8,
        )
    batching_settings = LocalTeacherSettings(max_batch_size=args.concurrency, batch_wait_ms=2)
    with local_teacher_server(batching_settings, **common) as running:
        batching = server_batching(
            running.base_url,
            tokenizer.token_bytes,
            args.concurrency,
            args.concurrency * (2 if args.quick else 4),
            max_tokens=8 if args.quick else 24,
        )
        batching["server_metrics"] = running.metrics()

    result = {
        "quick": args.quick,
        "concurrency": args.concurrency,
        "latency_ms": args.latency_ms,
        "requests": requests,
        "model": model.model_dump(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        **client,
        **batching,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    ok = result["rate_fraction_of_ideal"] >= 0.9
    print(f"rate fraction of ideal {result['rate_fraction_of_ideal']:.3f} {'>=' if ok else '<'} 0.9")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
