"""The local teacher server against plain transformers, on the embedded default's real teacher (SmolLM2-135M).

1. Throughput: the same batches of standard-library text (8 x 256 tokens of SmolLM2's tokenizer, several
   rounds) scored
   - by a plain ``transformers`` ``LlamaForCausalLM`` forward (float32, the Hugging Face directory converted from
     the GGUF; logits only, no top-k, no HTTP: the lower bound of any server's cost), and
   - by the local teacher server over HTTP at concurrency 8, in score mode with ``prompt_logprobs = 20`` (what
     ``distill collect`` asks), through the real ``openai`` client,
   both with the same number of torch threads, in alternating rounds (a change of machine load hits both
   alike). Prints tokens/s of each and the ratio (target >= 0.9).
2. Agreement: for the same texts, the server's top-20 ids equal those of ``transformers`` loading the GGUF file
   itself (``from_pretrained(..., gguf_file=...)``, transformers' own dequantization: an independent reference),
   and the logprobs agree within 1e-3.

    .venv/bin/python benchmarks/teacher.py [--quick] [--output FILE]

Writes ``benchmarks/results/teacher.json`` (``server_over_transformers_tokens_per_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import torch  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from student.gguf_import import bundled_smollm2_gguf  # noqa: E402
from student.tokenizer import StudentTokenizer  # noqa: E402
from teacher.server import cached_gguf_conversion, local_teacher_server  # noqa: E402
from teacher.settings import LocalTeacherSettings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "teacher.json"
TOP_K = 20
CONCURRENCY = 8


def stdlib_texts(tokenizer: StudentTokenizer, count: int, tokens: int) -> list[list[int]]:
    """``count`` windows of ``tokens`` token ids cut from standard-library modules (deterministic)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in ("json/decoder.py", "json/encoder.py", "argparse.py", "textwrap.py", "functools.py"):
        ids += tokenizer.encode((lib / name).read_text(encoding="utf-8"))
        if len(ids) >= count * tokens:
            break
    return [ids[i * tokens : (i + 1) * tokens] for i in range(count)]


def transformers_seconds(model, batch: list[list[int]]) -> float:
    with torch.no_grad():
        started = time.perf_counter()
        model(torch.tensor(batch)).logits.float()
        return time.perf_counter() - started


async def _score_all(base_url: str, rows: list[list[int]], concurrency: int) -> list[list[dict | None]]:
    client = AsyncOpenAI(base_url=base_url, api_key="no-key", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(row: list[int]) -> list[dict | None]:
        async with gate:
            response = await client.completions.create(
                model="local-teacher", prompt=row, max_tokens=1, temperature=0.0,
                extra_body={"prompt_logprobs": TOP_K, "return_tokens_as_token_ids": True},
            )  # fmt: skip
            return response.model_dump()["choices"][0]["prompt_logprobs"]

    try:
        return await asyncio.gather(*(one(row) for row in rows))
    finally:
        await client.close()


def server_seconds(base_url: str, batch: list[list[int]]) -> tuple[float, list]:
    started = time.perf_counter()
    scored = asyncio.run(_score_all(base_url, batch, CONCURRENCY))
    return time.perf_counter() - started, scored


def agreement(gguf: Path, rows: list[list[int]], scored: list[list[dict | None]]) -> dict:
    """Server top-20 vs transformers' own GGUF load, position by position (the first position has no score)."""
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    same_ids = same_order = positions = 0
    max_diff = 0.0
    with torch.no_grad():
        for row, served in zip(rows, scored, strict=True):
            logp = torch.log_softmax(reference.eval()(torch.tensor([row])).logits[0].double(), dim=-1)
            for pos in range(1, len(row)):
                entries = {int(k): v for k, v in served[pos].items()}
                top = logp[pos - 1].topk(TOP_K)
                ours = sorted(((v["rank"], k) for k, v in entries.items() if v["rank"] <= TOP_K))
                positions += 1
                same_ids += {k for _, k in ours} == set(top.indices.tolist())
                same_order += [k for _, k in ours] == top.indices.tolist()
                for k, v in entries.items():
                    max_diff = max(max_diff, abs(v["logprob"] - float(logp[pos - 1, k])))
    return {
        "positions": positions,
        "same_top20_ids_rate": same_ids / positions,
        "same_top20_order_rate": same_order / positions,
        "max_logprob_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small round (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rounds, rows, tokens = (1, 2, 64) if args.quick else (3, 8, 256)

    gguf = bundled_smollm2_gguf()
    started = time.perf_counter()
    model_dir = cached_gguf_conversion(gguf)
    convert_s = time.perf_counter() - started
    tokenizer = StudentTokenizer.load(model_dir / "tokenizer.json")
    windows = stdlib_texts(tokenizer, rounds * rows, tokens)
    batches = [windows[r * rows : (r + 1) * rows] for r in range(rounds)]

    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    settings = LocalTeacherSettings(model=str(gguf), max_batch_size=rows, threads=THREADS, batch_wait_ms=20)
    with local_teacher_server(settings, checkpoint=model_dir) as server:
        transformers_seconds(reference, batches[0][:2])  # warm-up, both sides
        server_seconds(server.base_url, batches[0][:2])
        plain_s = served_s = 0.0
        scored: list = []
        for batch in batches:  # alternating rounds: a change of machine load hits both sides alike
            plain_s += transformers_seconds(reference, batch)
            seconds, answers = server_seconds(server.base_url, batch)
            served_s += seconds
            scored += answers
    tokens_total = sum(len(row) for batch in batches for row in batch)
    baseline, ours = tokens_total / plain_s, tokens_total / served_s
    check = agreement(gguf, windows[: 2 if args.quick else 4], scored[: 2 if args.quick else 4])
    ratio = ours / baseline
    print(f"teacher: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), {THREADS} threads")
    print(
        f"  transformers forward      {baseline:10.0f} tokens/s  ({rounds} x {rows} x {tokens} tokens, alternating)"
    )
    print(
        f"  local server, top-{TOP_K}, c={CONCURRENCY} {ours:10.0f} tokens/s  ratio {ratio:.2f} (target >= 0.9)"
    )
    print(
        f"  top-{TOP_K} ids equal to transformers' GGUF load at {check['same_top20_ids_rate']:.4f} of "
        f"{check['positions']} positions; max |logprob diff| {check['max_logprob_diff']:.2e}"
    )
    result = {
        "machine": f"{os.cpu_count()} cores, no GPU",
        "load_average_1min": os.getloadavg()[0],
        "threads": THREADS,
        "quick": args.quick,
        "batches": {"rounds": rounds, "rows": rows, "tokens": tokens},
        "gguf_conversion_s": convert_s,
        "transformers_tokens_per_s": baseline,
        "server_tokens_per_s": ours,
        "server_over_transformers_tokens_per_s": ratio,
        "agreement": check,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(args.output)


if __name__ == "__main__":
    main()
