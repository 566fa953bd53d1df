"""Collection: ask the teacher for every work item not yet stored, and hand records to a sink as they arrive.

The collector never writes files. The caller passes the sample ids already stored (skipped: a re-run asks only
for what is missing) and a sink ``(records, vocab) -> None`` wired to the storage shard writer. A request that
still fails after the client's retries is returned as a ``Failure`` with its reason (API key redacted), never
dropped. Concurrency is a fixed pool of workers pulling from one shared queue, under the request/token rate limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import openai
from tqdm import tqdm

from storage.records import TeacherVocab, TopKRecord, sample_id
from teacher.client import TeacherClient, estimated_tokens, request_params
from teacher.inputs import WorkItem
from teacher.parsing import Parsed, Resolve, ResponseShapeError, Token
from teacher.ratelimit import RateLimiter
from teacher.secrets import redact
from teacher.settings import TeacherSettings

log = logging.getLogger(__name__)

Sink = Callable[[list[TopKRecord], TeacherVocab], None]
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class Failure:
    sample_id: str
    prompt: str
    reason: str


@dataclass
class CollectResult:
    """What one run did: counts, failures with reasons, and the usage the teacher reported."""

    requested: int = 0
    collected: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def _token_id(token: Token, vocab: TeacherVocab) -> int:
    """The teacher-vocab id of a token: the server's id when it gave one, else assigned from its bytes."""
    if token.data is None:
        raise ResponseShapeError(
            f"a token (id {token.id}) came without its bytes (token ids or a lossy token string): "
            "give the teacher's tokenizer (teacher.tokenizer_path) to resolve them"
        )
    return vocab.add(token.id, token.data) if token.id is not None else vocab.id_of(token.data)


def build_record(
    parsed: Parsed, prompt: str, split: str, teacher: str, mode: str, params: dict, vocab: TeacherVocab
) -> TopKRecord:
    """A ``TopKRecord`` in teacher-vocab ids from a parsed answer (a varying k padded with -1 / -inf).

    The sample id hashes the prompt (the text, in score mode), the teacher and the request parameters.
    """
    n = len(parsed.tokens)
    width = max((len(c) for c in parsed.candidates), default=0) or 1
    ids = np.full((n, width), -1, dtype=np.int32)
    logprobs = np.full((n, width), -np.inf, dtype=np.float32)
    has_logits = any(c.logit is not None for row in parsed.candidates for c in row)
    logits = np.full((n, width), -np.inf, dtype=np.float32) if has_logits else None
    for i, candidates in enumerate(parsed.candidates):
        for j, cand in enumerate(candidates):
            ids[i, j] = _token_id(cand, vocab)
            logprobs[i, j] = cand.logprob
            if logits is not None and cand.logit is not None:
                logits[i, j] = cand.logit
    # After the candidates: a bytes-only token (the first prompt token) then reuses a server-given id.
    tokens = np.array([_token_id(t, vocab) for t in parsed.tokens], dtype=np.int32)
    return TopKRecord(
        sample_id=sample_id(prompt, teacher, params),
        split=split,
        teacher=teacher,
        mode=mode,
        prompt=prompt if mode == "generate" else "",
        text=parsed.text,
        tokens=tokens,
        topk_ids=ids,
        topk_logprobs=logprobs,
        params=params,
        created_at=time.time(),
        prompt_tokens=parsed.prompt_tokens,
        completion_tokens=parsed.completion_tokens,
        finish_reason=parsed.finish_reason,
        topk_logits=logits,
    )


def _reason(exc: BaseException, api_key: str | None) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return redact(text, api_key)[:MAX_REASON_CHARS]


def pending_items(
    items: Iterable[WorkItem], settings: TeacherSettings, stored_ids: set[str], result: CollectResult
) -> Iterator[tuple[str, WorkItem]]:
    """Items whose sample id is neither stored nor already seen in this run (duplicates in the input)."""
    params = request_params(settings)
    seen: set[str] = set()
    for item in items:
        sid = sample_id(item.prompt_text(), settings.model, params)
        if sid in stored_ids or sid in seen:
            result.skipped += 1
            continue
        seen.add(sid)
        yield sid, item


async def collect_async(
    items: Iterable[WorkItem],
    settings: TeacherSettings,
    base_url: str,
    api_key: str | None,
    stored_ids: set[str],
    sink: Sink,
    vocab: TeacherVocab | None = None,
    progress: bool = True,
    resolve: Resolve | None = None,
) -> CollectResult:
    """Ask for every item not in ``stored_ids``; records go to ``sink`` one by one as answers arrive.

    ``resolve`` (teacher id -> bytes, the teacher's tokenizer) recovers tokens reported by id or lossily.
    """
    result = CollectResult()
    vocab = vocab if vocab is not None else TeacherVocab()
    params = request_params(settings)
    todo = list(pending_items(items, settings, stored_ids, result))
    limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
    bar = tqdm(total=len(todo), unit="req", desc=f"teacher {settings.model}", disable=not progress)
    started = time.monotonic()
    queue = iter(todo)

    async def worker(client: TeacherClient) -> None:
        for sid, item in queue:  # one shared iterator: each item goes to exactly one worker
            estimate = estimated_tokens(item, settings)
            await limiter.acquire(estimate)
            result.requested += 1
            try:
                parsed = await client.ask(item)
                record = build_record(
                    parsed, item.prompt_text(), item.split, settings.model, settings.mode, params, vocab
                )
            except (openai.OpenAIError, ResponseShapeError, ValueError) as exc:
                failure = Failure(sid, item.prompt_text()[:200], _reason(exc, api_key))
                result.failures.append(failure)
                log.warning("sample %s failed: %s", sid, failure.reason)
            else:
                limiter.settle(estimate, parsed.prompt_tokens + parsed.completion_tokens)
                result.prompt_tokens += parsed.prompt_tokens
                result.completion_tokens += parsed.completion_tokens
                sink([record], vocab)
                result.collected += 1
            bar.update(1)
            bar.set_postfix(
                failed=len(result.failures),
                tokens=result.prompt_tokens + result.completion_tokens,
                refresh=False,
            )

    try:
        if todo:  # nothing to ask: no client, no connection
            async with TeacherClient(settings, base_url, api_key, resolve) as client:
                await asyncio.gather(*(worker(client) for _ in range(min(settings.concurrency, len(todo)))))
    finally:
        bar.close()
    result.seconds = time.monotonic() - started
    log.info(
        "collected %d, skipped %d (already stored), failed %d; tokens prompt %d completion %d in %.1fs",
        result.collected, result.skipped, len(result.failures), result.prompt_tokens, result.completion_tokens,
        result.seconds,
    )  # fmt: skip
    return result


def collect(
    items: Iterable[WorkItem],
    settings: TeacherSettings,
    base_url: str,
    api_key: str | None,
    stored_ids: set[str],
    sink: Sink,
    vocab: TeacherVocab | None = None,
    progress: bool = True,
    resolve: Resolve | None = None,
) -> CollectResult:
    """Synchronous entry point (runs its own event loop); see ``collect_async``."""
    return asyncio.run(
        collect_async(items, settings, base_url, api_key, stored_ids, sink, vocab, progress, resolve)
    )
