"""Asking an OpenAI-compatible teacher for top-k logprobs, on the official ``openai`` client (async).

Retries are the ``openai`` client's own (``max_retries``: exponential backoff with jitter, ``Retry-After``
honoured, 408/409/429/5xx, timeouts and dropped connections). What it lacks is added at the HTTP transport:
``ValidatingTransport`` turns a 200 whose body is not JSON, or lacks the logprobs that were asked for, into a
retryable 502 (a gateway's answer to a bad upstream response), so that one retry loop, one budget and one
backoff cover every fault.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson
from openai import AsyncOpenAI
from openai._vendor.httpx_aiohttp import AiohttpTransport
from openai._vendor.httpx_aiohttp.transport import map_aiohttp_exceptions

from teacher.dense import RawArray, decode_body
from teacher.inputs import WorkItem
from teacher.parsing import (
    Parsed,
    Resolve,
    chat_samples,
    completion_samples,
    parse_chat,
    parse_completion,
    parse_prompt_logprobs,
    prompt_samples,
    with_samples,
)
from teacher.settings import TeacherSettings

BAD_BODY_STATUS = 502
DECODED = "teacher_decoded_body"  # response extension: the body as ValidatingTransport decoded it


def response_body(response: httpx2.Response) -> Any:
    """The decoded JSON of a response (decoded once, by ``ValidatingTransport``)."""
    decoded = response.extensions.get(DECODED)
    return decoded if decoded is not None else decode_body(response.content)


def body_problem(request_body: bytes, response_body: bytes) -> str | None:
    """Why a 200 response cannot be used for the request that asked for it, or None when it can."""
    return decoded_problem(request_body, response_body)[1]


def decoded_problem(request_body: bytes, response_body: bytes) -> tuple[Any, str | None]:
    """The decoded body (``teacher.dense.decode_body``: its bulky array left raw) and ``body_problem``'s answer."""
    try:
        asked = orjson.loads(request_body) if request_body else {}
    except ValueError:
        asked = {}
    asked = asked if isinstance(asked, dict) else {}
    try:
        body = decode_body(response_body, _bulky_shape(asked))
    except ValueError:  # orjson's JSONDecodeError, bad UTF-8 included
        return None, "a body that is not valid JSON"
    return body, _problem(asked, body)


def _bulky_shape(asked: dict) -> str | None:
    """Which bulky array (``teacher.dense.BULKY``) the answer to this request carries, if any."""
    if "messages" in asked:
        return "content" if asked.get("logprobs") else None
    if asked.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    return "top_logprobs" if asked.get("logprobs") not in (None, False) else None


def _problem(asked: dict, body: Any) -> str | None:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "no choices"
    choice = choices[0]
    if asked.get("prompt_logprobs") is not None and not isinstance(
        choice.get("prompt_logprobs"), list | RawArray
    ):
        return "no prompt_logprobs although they were asked for"
    if asked.get("logprobs") not in (None, False) and not isinstance(choice.get("logprobs"), dict):
        return "no logprobs although they were asked for"
    return None


class ValidatingTransport(httpx2.AsyncBaseTransport):
    """Wraps the real transport; a 200 with an unusable body becomes a retryable 502 with the reason."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        if response.status_code != 200 or request.method != "POST":
            return response
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        body, problem = decoded_problem(request.content, content)
        if problem is None:
            response.extensions = {**response.extensions, DECODED: body}  # decoded once, read by the client
            return response
        kind = response.headers.get("content-type", "no content type")
        message = f"{request.url}: the teacher answered 200 with {problem} ({kind})"
        return httpx2.Response(
            BAD_BODY_STATUS,
            headers={"x-should-retry": "true"},
            json={"error": {"message": message, "type": "invalid_teacher_response"}},
            request=request,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _WholeBody(httpx2.AsyncByteStream):
    """An aiohttp response's body as one chunk, read by aiohttp at once (still raw: httpx decodes any
    ``content-encoding``). The SDK's stream yields 16 KiB chunks, each copied and passed up through four async
    generators: about 100 hops for a 1.6 MB ``prompt_logprobs`` answer, 0.4 ms of CPU."""

    def __init__(self, stream: httpx2.AsyncByteStream) -> None:
        self.stream = stream  # the SDK's ``AiohttpResponseStream``

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_aiohttp_exceptions():
            yield await self.stream._aiohttp_response.read()

    async def aclose(self) -> None:
        await self.stream.aclose()


class WholeBodyAiohttpTransport(AiohttpTransport):
    """The transport behind the SDK's public ``openai.DefaultAioHttpClient``, each body read whole."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        response.stream = _WholeBody(response.stream)
        return response


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The default TLS context, built once per process: loading the CA bundle costs 5-16 ms of CPU, paid otherwise
    by every client (each collect run, each endpoint, each Dask partition)."""
    return httpx2.create_ssl_context()


def make_openai_client(
    settings: TeacherSettings, base_url: str, api_key: str | None, concurrency: int | None = None
) -> AsyncOpenAI:
    """The ``openai`` client of one endpoint: at most ``concurrency`` (default ``settings.concurrency``)
    connections over ``settings.http_transport``, every 200 checked by ``ValidatingTransport``."""
    connections = concurrency or settings.concurrency
    timeout = httpx2.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 10.0))
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    if settings.http_transport == "aiohttp":
        inner: httpx2.AsyncBaseTransport = WholeBodyAiohttpTransport(verify=_ssl_context(), limits=limits)
    else:
        inner = httpx2.AsyncHTTPTransport(verify=_ssl_context(), limits=limits)
    transport = ValidatingTransport(inner)
    return AsyncOpenAI(
        base_url=base_url,
        api_key=api_key or "no-key",  # the local teacher without auth accepts any bearer
        max_retries=settings.max_retries,
        timeout=timeout,
        http_client=httpx2.AsyncClient(transport=transport, timeout=timeout),
    )


def request_params(settings: TeacherSettings) -> dict[str, Any]:
    """The parameters that decide the teacher's answer: hashed into the sample id and stored with records."""
    params: dict[str, Any] = {"mode": settings.mode, "top_k": settings.top_k, "token_ids": settings.token_ids}
    if settings.samples:  # (absent when off, so the sample ids of data collected without samples stay)
        params["samples"] = settings.samples
    if settings.mode == "generate":
        params.update(api=settings.api, temperature=settings.temperature, max_tokens=settings.max_tokens)
    else:
        params.update(score_api=settings.score_api)
    return params


def estimated_tokens(item: WorkItem, settings: TeacherSettings) -> int:
    """Tokens a request will cost, guessed before sending it (about 4 characters a token)."""
    prompt = len(item.prompt_text()) // 4 + 1
    return prompt + (settings.max_tokens if settings.mode == "generate" else 1)


class TeacherClient:
    """One request per work item, answered as ``Parsed`` top-k (see ``teacher.parsing``).

    ``resolve`` (teacher id -> bytes) recovers the bytes of tokens a server reports by id or lossily;
    ``concurrency`` caps the connections to ``base_url`` (default ``settings.concurrency``).
    """

    def __init__(
        self,
        settings: TeacherSettings,
        base_url: str,
        api_key: str | None,
        resolve: Resolve | None = None,
        concurrency: int | None = None,
    ) -> None:
        if settings.mode == "score" and settings.score_api == "prompt_logprobs" and not settings.token_ids:
            raise ValueError(
                "teacher.score_api = 'prompt_logprobs' needs teacher.token_ids = true: prompt_logprobs name the "
                "first prompt token by nothing but its id (or use score_api = 'echo')"
            )
        if settings.token_ids and resolve is None:
            raise ValueError(
                "teacher.token_ids = true needs the teacher's tokenizer (teacher.tokenizer_path); "
                "for OpenAI, which reports bytes, set teacher.token_ids = false"
            )
        if settings.samples and resolve is None:
            raise ValueError(
                "teacher.samples > 0 needs the teacher's tokenizer (teacher.tokenizer_path): samples come as ids"
            )
        self.settings = settings
        self.resolve = resolve
        self.base_url = base_url
        self.openai = make_openai_client(settings, base_url, api_key, concurrency)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.openai.close()

    def _id_body(self) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"return_tokens_as_token_ids": True} if s.token_ids else {}
        return {**body, "return_logits": True} if s.logits else body

    def _sample_body(self, item: WorkItem) -> dict[str, Any]:
        """The local teacher's ``return_samples`` with a seed from the prompt (a re-run draws the same)."""
        if not self.settings.samples:
            return {}
        seed = int(hashlib.sha256(item.prompt_text().encode("utf-8")).hexdigest()[:15], 16)
        return {"return_samples": self.settings.samples, "sample_seed": seed}

    async def _post(self, path: str, **body: Any) -> Any:
        """POST ``body`` to ``path`` through the ``openai`` client's generic ``post`` (its retries, backoff, errors
        and auth, as ``completions.create`` has), and return the body ``ValidatingTransport`` decoded. The typed
        methods' parameter transform and response wrapper cost ~0.1 ms a request for nothing here: the request
        carries server extensions (``prompt_logprobs``, ``return_tokens_as_token_ids``) either way, and the
        answer is read raw."""
        return response_body(await self.openai.post(path, cast_to=httpx2.Response, body=body))

    async def ask(self, item: WorkItem) -> Parsed:
        s = self.settings
        if s.mode == "generate":
            return await (self._chat(item) if s.api == "chat" else self._complete(item))
        if item.messages is not None:
            raise ValueError("score mode reads text: give 'prompt'/'text' inputs, not 'messages'")
        return await (self._prompt_logprobs(item) if s.score_api == "prompt_logprobs" else self._echo(item))

    async def _chat(self, item: WorkItem) -> Parsed:
        s = self.settings
        messages = list(item.messages) if item.messages else [{"role": "user", "content": item.prompt or ""}]
        body = await self._post(
            "/chat/completions",
            model=s.model,
            messages=messages,
            logprobs=True,
            top_logprobs=s.top_k,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            **self._id_body(),
            **self._sample_body(item),
        )
        return with_samples(
            parse_chat(body, s.top_k, self.resolve), chat_samples(body, s.samples, self.resolve)
        )

    async def _complete(self, item: WorkItem) -> Parsed:
        s = self.settings
        body = await self._post(
            "/completions",
            model=s.model,
            prompt=item.prompt_text(),
            logprobs=s.top_k,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            **self._id_body(),
            **self._sample_body(item),
        )
        parsed = parse_completion(body, s.top_k, resolve=self.resolve)
        return with_samples(parsed, completion_samples(body, s.samples, self.resolve))

    async def _echo(self, item: WorkItem) -> Parsed:
        s = self.settings
        text = item.prompt_text()
        body = await self._post(
            "/completions",
            model=s.model,
            prompt=text,
            echo=True,
            logprobs=s.top_k,
            max_tokens=1,
            temperature=0.0,
            **self._id_body(),
            **self._sample_body(item),
        )
        parsed = parse_completion(body, s.top_k, text, self.resolve)
        return with_samples(parsed, completion_samples(body, s.samples, self.resolve))

    async def _prompt_logprobs(self, item: WorkItem) -> Parsed:
        s = self.settings
        text = item.prompt_text()
        extra: dict[str, Any] = {"prompt_logprobs": s.top_k, **self._id_body(), **self._sample_body(item)}
        # echo + logprobs 0 names the prompt's token ids: prompt_logprobs alone does not name the first token.
        body = await self._post(
            "/completions",
            model=s.model,
            prompt=text,
            echo=True,
            logprobs=0,
            max_tokens=1,
            temperature=0.0,
            **extra,
        )
        parsed = parse_prompt_logprobs(body, s.top_k, text, self.resolve)
        return with_samples(parsed, prompt_samples(body, s.samples, self.resolve))
