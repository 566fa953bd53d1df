"""Collection throughput: the async collector against a sequential loop, and server batching vs one at a time.

1. Client concurrency. The local teacher injects a fixed latency L per request (an asynchronous sleep, so the
   server is not the bottleneck). The collector at concurrency C should reach C / L requests per second; a plain
   sequential loop (the official synchronous ``openai`` client, one request after another) reaches 1 / L. Prints
   both, the fraction of the ideal and the speedup.
2. Server batching. Without injected latency, generation requests (compute bound) sent C at a time are batched
   by the server into shared forward passes; the same requests sent one at a time are not. Prints both
   throughputs and the ratio.
3. Collector CPU cost. A canned OpenAI-compatible responder (its own process on loopback) answers every request
   at once with a pre-built realistic body: top-20 at each of 1,000 positions, in the vLLM ``prompt_logprobs``
   shape, the completions ``echo`` + ``logprobs`` shape (score mode) and the chat ``logprobs.content`` shape
   (generate mode). The collector (HTTP, parse, encode, shard write) runs in a child process whose CPU time
   gives ``collector_tokens_per_cpu_s``; the same child runs the baseline's code (``BASELINE_REV``, exported
   with ``git archive``) side by side, and the ratio is printed.

    .venv/bin/python benchmarks/collect.py [--quick] [--only client|cpu]

Writes ``benchmarks/results/collect.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --code-root: the tree whose teacher/storage code a CPU-cost child runs (the baseline's exported copy).
CODE_ROOT = Path(sys.argv[sys.argv.index("--code-root") + 1]) if "--code-root" in sys.argv else ROOT
sys.path.insert(0, str(CODE_ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The collector's code before its parse/encode fast path: the baseline of the CPU-cost measurement.
BASELINE_REV = "8e02803"

import numpy as np  # noqa: E402
from openai import OpenAI  # noqa: E402

from storage.catalog import Catalog  # noqa: E402
from storage.settings import StorageSettings  # noqa: E402
from storage.shards import ShardWriter, read_records, shard_dir  # noqa: E402
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


# ---- 3. the collector's CPU cost per token, against an instant canned responder ------------------------------

CANNED_SHAPES = ("prompt_logprobs", "echo", "chat")
CPU_TARGET = 200_000  # tokens per CPU-second of the collector (issue 15)


def canned_corpus(prompts: int, tokens: int, vocab_size: int = 32_000, seed: int = 0):
    """A synthetic teacher: ``vocab_size`` distinct tokens (words, some with accents, CJK or emoji) and
    ``prompts`` texts of ``tokens`` tokens each (Zipf-distributed ids). Both processes build it from the seed."""
    rng = np.random.default_rng(seed)
    letters = [*"etaoinshrdlcumwfgypbvkjxqz", "é", "ü", "ñ", "☕", "日", "本", "語", "🙂"]
    weights = np.array([1.0] * 26 + [0.05] * 8)
    seen: set[bytes] = set()
    vocab: list[bytes] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(letters, size=int(rng.integers(1, 8)), p=weights / weights.sum()))
        data = ((" " if rng.random() < 0.6 else "") + word).encode("utf-8")
        if data not in seen:
            seen.add(data)
            vocab.append(data)
    texts = [((rng.zipf(1.2, size=tokens) - 1) % vocab_size).tolist() for _ in range(prompts)]
    return vocab, texts


def _canned_topk(rng: np.random.Generator, actual: int, vocab_size: int, k: int):
    """A position's top-k (Zipf-distributed ids, logprobs descending) and the actual token's logprob and rank
    (1-based)."""
    probs = rng.dirichlet(np.full(k + 1, 0.3))  # k bins and the tail
    top = np.sort(probs[:k])[::-1]
    logprobs = [float(v) for v in np.log(np.maximum(top, 1e-30)).astype(np.float32)]
    drawn = dict.fromkeys(((rng.zipf(1.1, size=4 * k) - 1) % vocab_size).tolist())  # frequent ids, distinct
    ids = [*drawn, *(int(i) for i in rng.choice(vocab_size, size=k, replace=False) if i not in drawn)][:k]
    if actual in ids:
        ids.remove(actual)
        ids.append(int((actual + 1) % vocab_size))
    rank = int(rng.integers(1, k + 1)) if rng.random() < 0.7 else int(rng.integers(k + 1, 100))
    if rank <= k:
        ids[rank - 1] = actual
        return ids, logprobs, logprobs[rank - 1], rank
    return ids, logprobs, float(np.float32(logprobs[-1] - rng.exponential(1.0))), rank


def _json(body: dict) -> bytes:
    """A body as vLLM sends it: compact JSON (Starlette's ``JSONResponse``), numbers as Python writes them."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def canned_bodies(prompts: int, tokens: int, k: int) -> dict[str, dict[str, bytes]]:
    """Per shape, request prompt -> the response body an instant teacher sends (JSON bytes)."""
    vocab, texts = canned_corpus(prompts, tokens)
    rng = np.random.default_rng(1)
    out: dict[str, dict[str, bytes]] = {shape: {} for shape in CANNED_SHAPES}
    for n, ids in enumerate(texts):
        text = b"".join(vocab[i] for i in ids).decode("utf-8")
        names = [f"token_id:{i}" for i in ids]
        offsets, chars = [], 0
        for i in ids:
            offsets.append(chars)
            chars += len(vocab[i].decode("utf-8"))
        positions = [_canned_topk(rng, i, len(vocab), k) for i in ids]
        extra = int(rng.integers(len(vocab)))  # the one completion token echo adds
        usage = {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1}
        head = {"id": f"cmpl-{n}", "object": "text_completion", "created": 0, "model": "canned"}
        vllm = [None] + [
            {
                str(i): {"logprob": lp, "rank": rank, "decoded_token": f"token_id:{i}"},
                **{
                    str(t): {"logprob": v, "rank": r, "decoded_token": f"token_id:{t}"}
                    for r, (t, v) in enumerate(zip(top, values, strict=True), start=1)
                    if t != i
                },
            }
            for i, (top, values, lp, rank) in zip(ids[1:], positions[1:], strict=True)
        ]
        echo0 = {
            "tokens": [*names, f"token_id:{extra}"],
            "token_logprobs": [None] + [p[2] for p in positions[1:]] + [-1.5],
            "top_logprobs": [None] + [{} for _ in positions[1:]] + [{}],
            "text_offset": [*offsets, chars],
        }
        full_text = text + vocab[extra].decode("utf-8")
        choice = {"index": 0, "text": full_text, "logprobs": echo0, "finish_reason": "length"}
        out["prompt_logprobs"][text] = _json(
            {**head, "choices": [{**choice, "prompt_logprobs": vllm}], "usage": usage}
        )
        echo = {
            **echo0,
            "top_logprobs": [None]
            + [
                {f"token_id:{t}": v for t, v in zip(top, values, strict=True)}
                for top, values, _, _ in positions[1:]
            ]
            + [{f"token_id:{extra}": -1.5}],
        }
        out["echo"][text] = _json({**head, "choices": [{**choice, "logprobs": echo}], "usage": usage})
        content = [
            {
                "token": f"token_id:{i}",
                "logprob": lp,
                "bytes": list(vocab[i]),
                "top_logprobs": [
                    {"token": f"token_id:{t}", "logprob": v, "bytes": list(vocab[t])}
                    for t, v in zip(top, values, strict=True)
                ],
            }
            for i, (top, values, lp, _) in zip(ids, positions, strict=True)
        ]
        chat = {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": "canned",
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": {"content": content}, "finish_reason": "length",
            }],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8},
        }  # fmt: skip
        out["chat"][f"canned chat prompt {n}"] = _json(chat)
    return out


async def serve_canned(prompts: int, tokens: int, k: int) -> None:
    """The instant responder: every POST answered at once with the pre-built body for its prompt."""
    from teacher.fault_proxy import read_request, write_response

    bodies = canned_bodies(prompts, tokens, k)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_request(reader)) is not None:
                asked = json.loads(request.body)
                if "messages" in asked:
                    body = bodies["chat"][asked["messages"][-1]["content"]]
                else:
                    shape = "prompt_logprobs" if asked.get("prompt_logprobs") is not None else "echo"
                    body = bodies[shape][asked["prompt"]]
                write_response(writer, 200, {"content-type": "application/json"}, body, request.keep_alive)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"canned responder listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def canned_responder(prompts: int, tokens: int, k: int) -> Iterator[str]:
    """The responder as its own process (its CPU is not the collector's); yields its base URL."""
    cmd = [
        sys.executable,
        __file__,
        "--canned-responder",
        f"--prompts={prompts}",
        f"--tokens={tokens}",
        f"--k={k}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            raise RuntimeError(f"canned responder did not start (exit code {proc.poll()}): {line!r}")
        yield match.group(1) + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def collector_cpu(
    base_url: str, shape: str, prompts: int, tokens: int, k: int, profile: bool = False
) -> dict:
    """CPU seconds of this process (the collector: HTTP, parse, encode, shard write) per stored token; with
    ``profile``, also the shares of its parts (``cpu_shares``)."""
    vocab, texts = canned_corpus(prompts, tokens)
    if shape == "chat":
        items = [WorkItem(prompt=f"canned chat prompt {n}") for n in range(prompts)]
        settings = TeacherSettings(model="canned", mode="generate", api="chat", max_tokens=tokens)
    else:
        items = [WorkItem(prompt=b"".join(vocab[i] for i in ids).decode("utf-8")) for ids in texts]
        settings = TeacherSettings(model="canned", mode="score", score_api=shape)
    settings = settings.model_copy(update={"top_k": k, "concurrency": 4, "timeout_s": 300, "max_retries": 0})
    warm_dir = Path(tempfile.mkdtemp(prefix=f"bench-cpu-warm-{shape}-"))
    with (
        Catalog(warm_dir) as catalog,
        ShardWriter(warm_dir, StorageSettings(data_dir=warm_dir), catalog) as writer,
    ):
        collect(items, settings, base_url, None, set(), writer, progress=False, resolve=vocab.__getitem__)
    # imports, compiled loops, connections and the C heap's working size (the first shard's tens of MB of arrays
    # come page fault by page fault) warmed up by a first run: a long collection pays them once, not per token
    shutil.rmtree(warm_dir)

    def run(profiler: cProfile.Profile | None = None) -> tuple[int, float, float]:
        data_dir = Path(tempfile.mkdtemp(prefix=f"bench-cpu-{shape}-"))
        with Catalog(data_dir) as catalog:
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            with ShardWriter(data_dir, StorageSettings(data_dir=data_dir), catalog) as writer:
                result = collect(
                    items, settings, base_url, None, set(), writer, progress=False, resolve=vocab.__getitem__
                )
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert result.collected == prompts and not result.failures, result.failures[:3]
        stored = sum(
            len(r.tokens) for shard in shard_dir(data_dir).glob("*.parquet") for r in read_records(shard)
        )
        shutil.rmtree(data_dir)
        return stored, cpu, wall

    stored, cpu, wall = run()
    out = {"tokens": stored, "cpu_s": cpu, "wall_s": wall, "tokens_per_cpu_s": stored / cpu}
    if profile:  # a second run under cProfile (CPU clock): where the collector's CPU goes
        profiler = cProfile.Profile(time.process_time)
        run(profiler)
        out["cpu_shares"] = cpu_shares(pstats.Stats(profiler))
    return out


# Where the collector's CPU goes: (file suffix, function) whose cumulative time makes each part.
PARTS = {
    "http_and_decode": [("teacher/client.py", "handle_async_request")],
    "decode_and_scan": [("teacher/client.py", "decoded_problem")],
    "parse": [("teacher/parsing.py", f) for f in ("parse_prompt_logprobs", "parse_completion", "parse_chat")],
    "build_record": [("teacher/collect.py", "build_record")],
    "shard_write": [("storage/shards.py", "flush")],
}


def cpu_shares(stats: pstats.Stats) -> dict[str, float]:
    """Shares of the profiled CPU time: HTTP (the transport less the body decode), the decode with the bulky
    array's scan, parsing, building records, writing shards, and the rest (event loop, the openai client)."""
    table = stats.stats  # type: ignore[attr-defined]  # (file, line, function) -> (cc, nc, tt, ct, callers)
    total = sum(tt for _, _, tt, _, _ in table.values())
    cumulative = {
        part: sum(
            ct for (file, _, function), (_, _, _, ct, _) in table.items() for suffix, name in functions
            if file.endswith(suffix) and function == name
        )
        for part, functions in PARTS.items()
    }  # fmt: skip
    shares = {
        "http": cumulative["http_and_decode"] - cumulative["decode_and_scan"],
        "decode_and_scan": cumulative["decode_and_scan"],
        "parse": cumulative["parse"],
        "build_record": cumulative["build_record"],
        "shard_write": cumulative["shard_write"],
    }
    shares["other"] = total - sum(shares.values())
    return {part: value / total for part, value in shares.items()}


@contextlib.contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """The repository at ``rev`` (``git archive``), in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cpu_child(
    code_root: Path, base_url: str, shape: str, prompts: int, tokens: int, k: int, profile: bool = False
) -> dict:
    """``collector_cpu`` in a fresh process running the code under ``code_root``."""
    cmd = [
        sys.executable, __file__, "--cpu-child", shape, "--base-url", base_url, f"--prompts={prompts}",
        f"--tokens={tokens}", f"--k={k}", "--code-root", str(code_root), *(["--profile"] if profile else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"CPU-cost child ({shape}, {code_root}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_cost(prompts: int, tokens: int, k: int, repeats: int) -> dict:
    """Tokens per CPU-second of the collector, ours and the baseline's, per response shape (best of repeats)."""
    out: dict = {"prompts": prompts, "tokens_per_prompt": tokens, "top_k": k, "baseline_rev": BASELINE_REV}
    print(f"collector CPU cost: {prompts} prompts x {tokens} tokens, top-{k}, instant canned responder")
    with baseline_tree(BASELINE_REV) as baseline, canned_responder(prompts, tokens, k) as url:
        for shape in CANNED_SHAPES:
            runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
            for _ in range(repeats):
                runs["ours"].append(cpu_child(ROOT, url, shape, prompts, tokens, k))
                runs["baseline"].append(cpu_child(baseline, url, shape, prompts, tokens, k))
            best = {name: max(r, key=lambda x: x["tokens_per_cpu_s"]) for name, r in runs.items()}
            ratio = best["ours"]["tokens_per_cpu_s"] / best["baseline"]["tokens_per_cpu_s"]
            shares = cpu_child(ROOT, url, shape, prompts, tokens, k, profile=True)["cpu_shares"]
            out[shape] = {**best, "ratio": ratio, "ours_cpu_shares": shares}
            print(
                f"  {shape:16s} ours {best['ours']['tokens_per_cpu_s']:10,.0f} tok/CPU-s   baseline "
                f"{best['baseline']['tokens_per_cpu_s']:10,.0f} tok/CPU-s   ratio {ratio:.2f}x"
            )
            print(
                "    ours, CPU shares: " + "  ".join(f"{part} {value:.0%}" for part, value in shares.items())
            )
    out["min_tokens_per_cpu_s"] = min(out[shape]["ours"]["tokens_per_cpu_s"] for shape in CANNED_SHAPES)
    return out


def client_and_batching(args: argparse.Namespace) -> dict:
    """Parts 1 and 2, against the local teacher server."""
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
    return {
        "quick": args.quick,
        "concurrency": args.concurrency,
        "latency_ms": args.latency_ms,
        "requests": requests,
        "model": model.model_dump(),
        **client,
        **batching,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests (a smoke run).")
    parser.add_argument("--only", choices=("all", "client", "cpu"), default="all", help="Which parts to run.")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--latency-ms", type=float, default=3000.0, help="Injected per-request latency (a remote teacher's)."
    )
    parser.add_argument("--prompts", type=int, default=None, help="CPU cost: prompts per shape.")
    parser.add_argument("--tokens", type=int, default=1000, help="CPU cost: tokens per prompt.")
    parser.add_argument("--k", type=int, default=20, help="CPU cost: top-k per position.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "collect.json")
    parser.add_argument("--canned-responder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-child", choices=CANNED_SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts = args.prompts or (8 if args.quick else 32)
    if args.canned_responder:
        asyncio.run(serve_canned(prompts, args.tokens, args.k))
        return 0
    if args.cpu_child:
        print(
            json.dumps(
                collector_cpu(args.base_url, args.cpu_child, prompts, args.tokens, args.k, args.profile)
            )
        )
        return 0

    # Parts run alone update their keys of an existing result file.
    result = (
        json.loads(args.out.read_text(encoding="utf-8")) if args.only != "all" and args.out.is_file() else {}
    )
    if args.only in ("all", "client"):
        result.update(client_and_batching(args))
    if args.only in ("all", "cpu"):
        cpu = cpu_cost(prompts, args.tokens, args.k, repeats=1 if args.quick else 2)
        result["collector_cpu"] = cpu
        result["collector_tokens_per_cpu_s"] = {
            shape: cpu[shape]["ours"]["tokens_per_cpu_s"] for shape in CANNED_SHAPES
        }
        result["collector_tokens_per_cpu_s_baseline"] = {
            shape: cpu[shape]["baseline"]["tokens_per_cpu_s"] for shape in CANNED_SHAPES
        }
    result.update(cpus=os.cpu_count(), load_average=os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    ok = True
    if "rate_fraction_of_ideal" in result and args.only != "cpu":
        fraction = result["rate_fraction_of_ideal"]
        ok &= fraction >= 0.9
        print(f"rate fraction of ideal {fraction:.3f} {'>=' if fraction >= 0.9 else '<'} 0.9")
    if args.only != "client":
        lowest = result["collector_cpu"]["min_tokens_per_cpu_s"]
        ok &= lowest >= CPU_TARGET
        print(
            f"collector tokens per CPU-second (lowest shape) {lowest:,.0f} {'>=' if lowest >= CPU_TARGET else '<'} {CPU_TARGET:,}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
