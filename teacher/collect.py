"""Collection: ask the teacher for every work item not yet stored, and hand records to a sink as they arrive.

The collector never writes files. The caller passes the sample ids already stored (skipped: a re-run asks only
for what is missing) and a sink ``(records, vocab) -> None`` wired to the storage shard writer. A request that
still fails after the client's retries is returned as a ``Failure`` with its reason (API key redacted), never
dropped. Requests go to one or more endpoints (``teacher.endpoints``), each under its own concurrency and
request/token rate limits. A score-mode document longer than the teacher's context is scored in overlapping
windows merged back into one record (``teacher.windows``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import openai
from tqdm import tqdm

from storage.records import TeacherVocab, TopKRecord, sample_id
from teacher.check import describe_error
from teacher.client import estimated_tokens, request_params
from teacher.endpoints import Endpoint, EndpointPool, EndpointStats, dispatch
from teacher.fragments import FragmentStats, repair, spells
from teacher.heap import keep_freed_heap
from teacher.inputs import WorkItem
from teacher.parsing import (
    SENTINEL_LOGPROB,
    DenseTokens,
    DenseTopK,
    Parsed,
    Resolve,
    ResponseShapeError,
    Token,
)
from teacher.secrets import redact
from teacher.settings import TeacherSettings
from teacher.windows import ask_scored

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
    fragments: FragmentStats = field(default_factory=FragmentStats)  # split characters recovered / marked
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)  # per teacher endpoint, by base URL


def _token_id(token: Token, vocab: TeacherVocab, server_ids: dict[bytes, int] | None) -> int:
    """The teacher-vocab id of a token: the server's id when it gave one, else assigned from its bytes.

    In an answer whose tokens carry the server's ids (``server_ids``: bytes -> id, from the answer itself), a
    token without one takes its id from that evidence; an id is never invented beside the server's ids."""
    if token.data is None:
        raise ResponseShapeError(
            f"a token (id {token.id}) came without its bytes (token ids or a lossy token string): "
            "give the teacher's tokenizer (teacher.tokenizer_path) to resolve them"
        )
    if token.id is not None:
        return vocab.add(token.id, token.data)
    if server_ids is None:
        return vocab.id_of(token.data)
    if token.data in server_ids:
        return vocab.add(server_ids[token.data], token.data)
    raise ResponseShapeError(
        f"token {token.data!r} has no id while the server numbers the others: its id is not in the answer "
        "(ask with echo + return_tokens_as_token_ids, or give prompt_token_ids); an id is never invented"
    )


def _server_ids(parsed: Parsed) -> dict[bytes, int] | None:
    """bytes -> id of every token the server numbered, or None when it numbered none."""
    pairs = {t.data: t.id for t in parsed.tokens if t.id is not None and t.data}
    pairs.update((c.data, c.id) for row in parsed.candidates for c in row if c.id is not None and c.data)
    return pairs or None


def _record_extras(parsed: Parsed, vocab: TeacherVocab, server_ids: dict[bytes, int] | None) -> dict:
    """The record's ``token_logprobs`` (the actual token's logprob where its position has a prediction, else
    NaN) and, when the answer has them, its tail samples (``sample_ids`` / ``sample_counts``)."""
    n = len(parsed.tokens)
    rows = parsed.candidates
    has_top = rows.ids[:, 0] >= 0 if isinstance(rows, DenseTopK) else np.array([bool(c) for c in rows], bool)
    tokens = parsed.tokens
    values = tokens.logprobs if isinstance(tokens, DenseTokens) else np.array([t.logprob for t in tokens])
    known = has_top & (values > SENTINEL_LOGPROB + 0.5)
    extras: dict = {"token_logprobs": np.where(known, values, np.nan).astype(np.float32)}
    if parsed.samples is not None:
        width = max((len(s[0]) for s in parsed.samples if s is not None), default=0) or 1
        ids, counts = np.full((n, width), -1, np.int32), np.zeros((n, width), np.int32)
        for i, position in enumerate(parsed.samples):
            for j, (token, count) in enumerate(zip(*position, strict=True) if position else ()):
                ids[i, j], counts[i, j] = _token_id(token, vocab, server_ids), count
        extras.update(sample_ids=ids, sample_counts=counts)
    return extras


class PinnedIds:
    """Teacher ids already pinned in one vocabulary with their resolved bytes: a dense answer's ~20,000 top-k ids
    then cost one array lookup, and the ids new to the vocabulary one ``TeacherVocab.add_many``."""

    def __init__(self) -> None:
        self.pinned = np.zeros(0, np.bool_)

    def pin(self, ids: np.ndarray, vocab: TeacherVocab, resolve: Resolve) -> None:
        ids = ids[ids >= 0]
        if not len(ids):
            return
        top = int(ids.max())
        if top >= len(self.pinned):
            self.pinned = np.concatenate(
                [self.pinned, np.zeros(max(top + 1, 2 * len(self.pinned)), np.bool_)]
            )
        new = np.unique(ids[~self.pinned[ids]])
        vocab.add_many(new, list(map(resolve, new.tolist())))
        self.pinned[new] = True


def _dense_arrays(parsed: Parsed, vocab: TeacherVocab, pinned: PinnedIds) -> tuple[np.ndarray, ...] | None:
    """(tokens, top-k ids, top-k logprobs) of a ``DenseTopK`` answer whose tokens all carry ids and bytes (what
    ``repair`` would leave as it is), without a Python object per entry; None for any other answer. The dense
    parsers take every token's bytes from the same ``resolve`` as the top-k's, so ids are pinned by id."""
    dense, listed = parsed.candidates, parsed.tokens
    if not isinstance(dense, DenseTopK) or parsed.samples is not None:
        return None
    if isinstance(listed, DenseTokens):
        tokens = listed.ids.astype(np.int32)
    elif all(t.id is not None and t.data for t in listed):
        tokens = np.array([t.id for t in listed], np.int32)
    else:
        return None
    pinned.pin(np.concatenate([tokens, dense.ids.ravel()]), vocab, dense.resolve)
    if not spells(vocab.table(tokens)[1], parsed.text):
        raise ResponseShapeError("the tokens do not spell the text")
    return tokens, dense.ids.astype(np.int32), dense.logprobs.astype(np.float32)


def build_record(
    parsed: Parsed,
    prompt: str,
    split: str,
    teacher: str,
    mode: str,
    params: dict,
    vocab: TeacherVocab,
    stats: FragmentStats | None = None,
    pinned: PinnedIds | None = None,
) -> TopKRecord:
    """A ``TopKRecord`` in teacher-vocab ids from a parsed answer (a varying k padded with -1 / -inf).

    Tokens the server sent without bytes are recovered from the text or marked (``teacher.fragments``); a
    record whose tokens do not spell its text raises ``ResponseShapeError`` and is never built. The sample id
    hashes the prompt (the text, in score mode), the teacher and the request parameters. ``pinned`` (one per
    vocabulary) spares re-checking the ids of earlier records.
    """
    dense = _dense_arrays(parsed, vocab, pinned if pinned is not None else PinnedIds())
    if dense is not None:
        tokens, ids, logprobs = dense
        logits, server_ids = None, None
    else:
        tokens, ids, logprobs, logits, server_ids, parsed = _listed_arrays(parsed, vocab, stats)
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
        **_record_extras(parsed, vocab, server_ids),
    )


def _listed_arrays(parsed: Parsed, vocab: TeacherVocab, stats: FragmentStats | None) -> tuple:
    """``build_record``'s arrays from lists of tokens, after ``repair``: (tokens, ids, logprobs, logits, the
    server's ids by bytes, the repaired answer)."""
    parsed = repair(parsed, stats)
    server_ids = _server_ids(parsed)
    n = len(parsed.tokens)
    width = max((len(c) for c in parsed.candidates), default=0) or 1
    ids = np.full((n, width), -1, dtype=np.int32)
    logprobs = np.full((n, width), -np.inf, dtype=np.float32)
    has_logits = any(c.logit is not None for row in parsed.candidates for c in row)
    logits = np.full((n, width), -np.inf, dtype=np.float32) if has_logits else None
    for i, candidates in enumerate(parsed.candidates):
        for j, cand in enumerate(candidates):
            ids[i, j] = _token_id(cand, vocab, server_ids)
            logprobs[i, j] = cand.logprob
            if logits is not None and cand.logit is not None:
                logits[i, j] = cand.logit
    # After the candidates: a bytes-only token (the first prompt token) then reuses a server-given id.
    tokens = np.array([_token_id(t, vocab, server_ids) for t in parsed.tokens], dtype=np.int32)
    if not spells(vocab.table(tokens)[1], parsed.text):
        raise ResponseShapeError("the tokens do not spell the text")
    return tokens, ids, logprobs, logits, server_ids, parsed


def _reason(exc: BaseException, api_key: str | None) -> str:
    """Why a request failed, naming the URL and the innermost cause for connection and HTTP errors."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (openai.APIConnectionError, openai.APIStatusError)):
        text = describe_error(exc)
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
    base_url: str | list[str],
    api_key: str | None,
    stored_ids: set[str],
    sink: Sink,
    vocab: TeacherVocab | None = None,
    progress: bool = True,
    resolve: Resolve | None = None,
) -> CollectResult:
    """Ask for every item not in ``stored_ids``; records go to ``sink`` one by one as answers arrive.

    ``resolve`` (teacher id -> bytes, the teacher's tokenizer) recovers tokens reported by id or lossily.
    ``base_url`` may list several endpoints (replicas): see ``teacher.endpoints``.
    """
    result = CollectResult()
    vocab = vocab if vocab is not None else TeacherVocab()
    params = request_params(settings)
    todo = list(pending_items(items, settings, stored_ids, result))
    bar = tqdm(total=len(todo), unit="req", desc=f"teacher {settings.model}", disable=not progress)
    started = time.monotonic()
    pinned = PinnedIds()

    async def attempt(endpoint: Endpoint, job: tuple[str, WorkItem]) -> tuple[Parsed, TopKRecord]:
        _, item = job
        estimate = estimated_tokens(item, settings)
        await endpoint.limiter.acquire(estimate)
        client = endpoint.client
        if settings.mode == "score":  # a document longer than the context: scored in windows
            parsed = await ask_scored(
                client, item, settings.context_tokens, settings.window_overlap, result.fragments
            )
        else:
            parsed = await client.ask(item)
        record = build_record(
            parsed, item.prompt_text(), item.split, settings.model, settings.mode, params, vocab,
            result.fragments, pinned,
        )  # fmt: skip
        endpoint.limiter.settle(estimate, parsed.prompt_tokens + parsed.completion_tokens)
        return parsed, record

    def progressed() -> None:
        bar.update(1)
        bar.set_postfix(
            failed=len(result.failures), tokens=result.prompt_tokens + result.completion_tokens, refresh=False
        )

    def on_success(endpoint: Endpoint, job: tuple[str, WorkItem], outcome: tuple[Parsed, TopKRecord]) -> int:
        parsed, record = outcome
        result.requested += 1
        result.prompt_tokens += parsed.prompt_tokens
        result.completion_tokens += parsed.completion_tokens
        sink([record], vocab)
        result.collected += 1
        progressed()
        return parsed.prompt_tokens + parsed.completion_tokens

    def on_failure(job: tuple[str, WorkItem], exc: BaseException) -> None:
        sid, item = job
        result.requested += 1
        failure = Failure(sid, item.prompt_text()[:200], _reason(exc, api_key))
        result.failures.append(failure)
        log.warning("sample %s failed: %s", sid, failure.reason)
        progressed()

    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    try:
        if todo:  # nothing to ask: no client, no connection
            pool = EndpointPool(settings, urls, api_key, resolve)
            try:
                await dispatch(pool, todo, attempt, on_success, on_failure)
            finally:
                await pool.close()
                result.endpoints = {e.url: e.stats for e in pool.endpoints}
    finally:
        bar.close()
    result.seconds = time.monotonic() - started
    log.info(
        "collected %d, skipped %d (already stored), failed %d; tokens prompt %d completion %d in %.1fs",
        result.collected, result.skipped, len(result.failures), result.prompt_tokens, result.completion_tokens,
        result.seconds,
    )  # fmt: skip
    if len(result.endpoints) > 1:
        for url, stats in result.endpoints.items():
            log.info("endpoint %s: %s", url, stats)
    return result


def collect(
    items: Iterable[WorkItem],
    settings: TeacherSettings,
    base_url: str | list[str],
    api_key: str | None,
    stored_ids: set[str],
    sink: Sink,
    vocab: TeacherVocab | None = None,
    progress: bool = True,
    resolve: Resolve | None = None,
) -> CollectResult:
    """Synchronous entry point (runs its own event loop); see ``collect_async``.

    The objects that exist before collection starts (modules, settings: hundreds of thousands in a process that
    imported numba, pyarrow and the openai client) are left out of the cyclic garbage collector's passes until it
    ends (``gc.freeze``): the answers' many short-lived objects set off full passes, which cost ~3 ms of CPU per
    1,000-token answer over those objects (``benchmarks/collect.py --only cpu``, BENCHMARKS.md). The C heap
    keeps freed memory for the next answer from then on (``teacher.heap``)."""
    keep_freed_heap()
    gc.freeze()
    try:
        return asyncio.run(
            collect_async(items, settings, base_url, api_key, stored_ids, sink, vocab, progress, resolve)
        )
    finally:
        gc.unfreeze()
