"""The local teacher's OpenAI-compatible HTTP API (FastAPI): request validation, response shapes, errors.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, and ``GET /metrics``
(batching counters, JSON). Every response carries ``usage``; errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with 400 (bad request, including unknown fields), 401 (bad
or missing bearer key when the server has one), 404 (unknown model or route). Each completion response
carries the header ``x-batch-size``: the size of the batch (wave) its sequences were decoded in.

Token strings are the token's bytes decoded as UTF-8 with replacement (a token holding part of a multi-byte
character shows U+FFFD), and ``bytes`` (chat) lists the raw bytes, so joining the bytes of the tokens gives
the exact text. ``text_offset`` counts the characters of the returned text before each token's first byte.
Reported logprobs are the raw model distribution (temperature 1, no top-p), whatever the sampling settings.
The legacy ``top_logprobs`` dicts are keyed by token string, so distinct tokens with the same string (byte
fragments that all show U+FFFD) merge into one key, as with OpenAI; ``return_tokens_as_token_ids`` keeps them
apart, and chat's lists and ``prompt_logprobs`` (keyed by id) never merge.

Completions (``/v1/completions``): ``prompt`` (string, list of strings, token ids, or lists of token ids; one
choice per prompt), ``max_tokens`` (default 16, 0 allowed), ``temperature``, ``top_p``, ``seed``, ``stop``,
``n`` = 1, ``logprobs`` (int, top entries per position, up to ``max_logprobs``) in the legacy shape
``{tokens, token_logprobs, top_logprobs, text_offset}``, ``echo`` (the prompt's tokens come first and the
first prompt position is null), and these extensions:

- ``prompt_logprobs`` (int, vLLM): ``choices[i].prompt_logprobs`` is a list over prompt tokens, the first
  null, each a dict keyed by token id (as a string) of ``{"logprob", "rank", "decoded_token"}`` holding the
  actual prompt token (with its rank, 1 = most likely) and the top entries;
- ``return_tokens_as_token_ids`` (bool, vLLM): every token string is rendered ``"token_id:N"``;
- ``return_logits`` (bool, this server): raw top-k logits for the logit-MSE loss. Completions add
  ``logprobs.top_logits`` (per position a dict token -> logit, the same keys as ``top_logprobs``); chat adds
  to each ``content`` entry ``"logit"`` and ``"top_logits": [{"token", "logit", "bytes"}]`` in the order of
  ``top_logprobs``; ``prompt_logprobs`` entries gain ``"logit"``.
- ``return_samples`` (int S, this server; optional ``sample_seed`` makes them reproducible): at every reported
  position, S tokens drawn with replacement from the reported distribution (temperature 1) restricted to
  outside that position's top-k (the ``logprobs`` / ``prompt_logprobs`` k), given as
  ``{"ids": [teacher ids, ascending], "counts": [draws of each]}`` (empty lists where the top-k holds all the
  mass; see ``student.generation``). Legacy completions add ``logprobs.samples`` (a list aligned with
  ``tokens``, null where ``top_logprobs`` is), ``prompt_logprobs`` adds ``prompt_samples`` beside it (aligned,
  first null), chat adds ``"samples"`` to each ``content`` entry. ``top_logprobs + r · count / S`` on the
  samples (``r`` = 1 − the top-k mass) is an unbiased estimate of the full distribution.

Chat (``/v1/chat/completions``): ``messages`` rendered with the chat template below, ``max_tokens`` /
``max_completion_tokens`` (default: the rest of the context), ``logprobs`` (bool) and ``top_logprobs``
(0..20), content entries ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`` as OpenAI
returns them; ``prompt_logprobs`` (vLLM) appears at the top level of the response.

Chat template: the served model's own (its tokenizer's ``chat_template``, a Jinja template rendered as
``transformers`` does, e.g. SmolLM2's ``<|im_start|>ROLE\nCONTENT<|im_end|>``); a model without one uses
this plain-text template (no special tokens): each message becomes ``"<|ROLE|>\\nCONTENT\\n"`` (ROLE is
``system``, ``developer``, ``user`` or ``assistant``; content is a string or a list of ``{"type": "text"}``
parts), followed by ``"<|assistant|>\\n"`` where the reply begins. Generation stops only at ``stop`` or
``max_tokens``; pass ``stop=["<|"]`` to end at the next role marker.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from student.generation import Completion, PositionReport, SamplingParams, chars_before, decode
from teacher.server_batching import BatchingEngine

log = logging.getLogger(__name__)
MAX_SAMPLES = 1024  # return_samples per position


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per prompt.")
    stream: Literal[False] = False
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    presence_penalty: float = Field(0.0, ge=0, le=0)
    prompt_logprobs: int | None = Field(None, ge=0)
    return_tokens_as_token_ids: bool = False
    return_logits: bool = False
    return_samples: int = Field(0, ge=0, le=MAX_SAMPLES)
    sample_seed: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int = Field(1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` with text content (a list of text parts joined); other parts are a 400."""
    plain = []
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            content = message.content
        else:
            texts = []
            for part in message.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, "only text content parts are supported", f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        plain.append({"role": message.role, "content": content})
    return plain


def render_chat(messages: list[dict[str, str]]) -> str:
    """The plain chat template of the module docstring."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def samples_list(reports: list[PositionReport | None]) -> list[dict | None]:
    """The ``return_samples`` extension's per-position objects (see the module docstring)."""
    return [None if r is None else {"ids": r.sample_ids, "counts": r.sample_counts} for r in reports]


class TeacherAPI:
    """Turns requests into decoding jobs and completions into OpenAI response bodies."""

    def __init__(
        self,
        engine: BatchingEngine,
        encode: Callable[[str], list[int]],
        token_bytes: Callable[[int], bytes],
        vocab_size: int,
        model_name: str,
        max_model_len: int,
        max_logprobs: int = 20,
        inject_latency_ms: float = 0.0,
        chat_template: Callable[[list[dict[str, str]]], str] | None = None,
        shifted_echo: bool = False,
    ) -> None:
        self.engine, self.encode, self.token_bytes = engine, encode, token_bytes
        self.shifted_echo = shifted_echo  # simulate servers whose echo scores are one position late (tests)
        self.chat_template = chat_template
        self.vocab_size, self.model_name = vocab_size, model_name
        self.max_model_len, self.max_logprobs = max_model_len, max_logprobs
        self.inject_latency_s = inject_latency_ms / 1000
        self.created = int(time.time())

    # ---- request side -------------------------------------------------------------------------------
    def render(self, messages: list[ChatMessage]) -> str:
        """The model's own chat template when its tokenizer has one, else the plain template."""
        return (self.chat_template or render_chat)(plain_messages(messages))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def check_k(self, value: int | None, param: str) -> None:
        if value is not None and value > self.max_logprobs:
            raise APIError(400, f"{param} must be at most {self.max_logprobs}, got {value}", param)

    def prompt_ids(self, prompt: str | list[int], index: int) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"prompt {index} is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400, f"prompt {index}: token ids {bad[:5]} outside [0, {self.vocab_size})", "prompt"
            )
        return ids

    def sampling(
        self, body: _Body, prompt_len: int, max_tokens: int, logprobs: int | None, prompt_k: int | None
    ):
        if prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion).",
                "max_tokens",
                "context_length_exceeded",
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=stop,
                logprobs=logprobs,
                prompt_logprobs=prompt_k,
                samples=body.return_samples,
                sample_seed=body.sample_seed,
            )
        except ValueError as err:
            raise APIError(400, str(err)) from None

    async def run(self, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[list[Completion], int]:
        if self.inject_latency_s:
            await asyncio.sleep(self.inject_latency_s)
        results = await asyncio.gather(*(self.engine.submit(p, sp) for p, sp in jobs))
        return [c for c, _ in results], max(b for _, b in results)

    # ---- response side ------------------------------------------------------------------------------
    def token_str(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else decode(self.token_bytes(token))

    def top_dict(self, report: PositionReport, k: int, as_ids: bool, values: list[float]) -> dict:
        return {self.token_str(t, as_ids): v for t, v in zip(report.top_ids[:k], values[:k], strict=True)}

    def vllm_prompt_logprobs(self, reports: list[PositionReport | None], k: int, as_ids: bool, logits: bool):
        out: list[dict | None] = []
        for report in reports:
            if report is None:
                out.append(None)
                continue
            entry = {str(report.token): self._vllm_entry(report.token, report.logprob, report.rank, as_ids)}
            if logits:
                entry[str(report.token)]["logit"] = report.logit
            for rank, (t, lp, lg) in enumerate(
                zip(report.top_ids[:k], report.top_logprobs[:k], report.top_logits[:k], strict=True), start=1
            ):
                if str(t) not in entry:
                    entry[str(t)] = self._vllm_entry(t, lp, rank, as_ids)
                    if logits:
                        entry[str(t)]["logit"] = lg
            out.append(entry)
        return out

    def _vllm_entry(self, token: int, logprob: float, rank: int, as_ids: bool) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.token_str(token, as_ids)}

    def legacy_logprobs(
        self, tokens: list[int], reports: list[PositionReport | None], k: int, as_ids: bool, logits: bool
    ) -> dict:
        data = b""
        offsets = []
        for token in tokens:
            offsets.append(chars_before(data))
            data += self.token_bytes(token)
        body = {
            "tokens": [self.token_str(t, as_ids) for t in tokens],
            "token_logprobs": [None if r is None else r.logprob for r in reports],
            "top_logprobs": [
                None if r is None else self.top_dict(r, k, as_ids, r.top_logprobs) for r in reports
            ],
            "text_offset": offsets,
        }
        if logits:
            body["top_logits"] = [
                None if r is None else self.top_dict(r, k, as_ids, r.top_logits) for r in reports
            ]
        return body

    def completion_choice(self, index: int, body: CompletionBody, prompt_text: str, c: Completion) -> dict:
        as_ids, k = body.return_tokens_as_token_ids, body.logprobs
        text = prompt_text + c.text if body.echo else c.text
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        if k is not None:
            tokens, reports = list(c.tokens), list(c.reports or [])
            if body.echo:
                tokens = c.prompt + tokens
                reports = list(c.prompt_reports or []) + reports
                if self.shifted_echo:  # one token more than usage counts, every score one position late
                    tokens, reports = tokens + tokens[-1:], [None, *reports]
            choice["logprobs"] = self.legacy_logprobs(tokens, reports, k, as_ids, body.return_logits)
            if body.return_samples:
                choice["logprobs"]["samples"] = samples_list(reports)
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(
                c.prompt_reports or [], body.prompt_logprobs, as_ids, body.return_logits
            )
            if body.return_samples:
                choice["prompt_samples"] = samples_list(c.prompt_reports or [])
        return choice

    def chat_entry(self, token: int, report: PositionReport, k: int, as_ids: bool, logits: bool) -> dict:
        def item(t: int, value: float, key: str) -> dict:
            return {"token": self.token_str(t, as_ids), key: value, "bytes": list(self.token_bytes(t))}

        entry = item(token, report.logprob, "logprob")
        entry["top_logprobs"] = [
            item(t, v, "logprob") for t, v in zip(report.top_ids[:k], report.top_logprobs[:k], strict=True)
        ]
        if logits:
            entry["logit"] = report.logit
            entry["top_logits"] = [
                item(t, v, "logit") for t, v in zip(report.top_ids[:k], report.top_logits[:k], strict=True)
            ]
        return entry

    def usage(self, completions: list[Completion]) -> dict:
        prompt = sum(len(c.prompt) for c in completions)
        done = sum(c.generated for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    # ---- endpoints ----------------------------------------------------------------------------------
    async def completions(self, body: CompletionBody) -> tuple[dict, int]:
        self.check_model(body.model)
        self.check_k(body.logprobs, "logprobs")
        self.check_k(body.prompt_logprobs, "prompt_logprobs")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        wanted = [x for x in (body.prompt_logprobs, body.logprobs if body.echo else None) if x is not None]
        prompt_k = max(wanted) if wanted else None
        jobs, texts = [], []
        for i, prompt in enumerate(prompts):
            ids = self.prompt_ids(prompt, i)
            texts.append(prompt if isinstance(prompt, str) else decode(b"".join(map(self.token_bytes, ids))))
            jobs.append((ids, self.sampling(body, len(ids), max_tokens, body.logprobs, prompt_k)))
        completions, batch = await self.run(jobs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                self.completion_choice(i, body, t, c)
                for i, (t, c) in enumerate(zip(texts, completions, strict=True))
            ],
            "usage": self.usage(completions),
        }, batch

    async def chat(self, body: ChatBody) -> tuple[dict, int]:
        self.check_model(body.model)
        self.check_k(body.top_logprobs, "top_logprobs")
        self.check_k(body.prompt_logprobs, "prompt_logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        ids = self.prompt_ids(self.render(body.messages), 0)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self.max_model_len - len(ids) if limit is None else limit
        k = (body.top_logprobs or 0) if body.logprobs else None
        (c,), batch = await self.run(
            [(ids, self.sampling(body, len(ids), max(max_tokens, 0), k, body.prompt_logprobs))]
        )
        as_ids = body.return_tokens_as_token_ids
        logprobs = None
        if k is not None:
            logprobs = {
                "content": [
                    self.chat_entry(t, r, k, as_ids, body.return_logits)
                    | ({"samples": samples_list([r])[0]} if body.return_samples else {})
                    for t, r in zip(c.tokens, c.reports or [], strict=True)
                ],
                "refusal": None,
            }
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            ],
            "usage": self.usage([c]),
        }
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = self.vllm_prompt_logprobs(
                c.prompt_reports or [], body.prompt_logprobs, as_ids, body.return_logits
            )
            if body.return_samples:
                response["prompt_samples"] = samples_list(c.prompt_reports or [])
        return response, batch

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "local"}
            ],
        }


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One readable message per offending field (a union's alternatives collapse into one line)."""
    by_field: dict[str, list[dict]] = {}
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        by_field.setdefault(loc[0] if loc else "body", []).append(e)
    if any(e.get("type") == "extra_forbidden" for errors in by_field.values() for e in errors):
        extra = [
            f for f, errors in by_field.items() if any(e.get("type") == "extra_forbidden" for e in errors)
        ]
        return f"Unrecognized request argument supplied: {', '.join(extra)}", extra[0]
    problems = []
    for name, errors in by_field.items():
        if len(errors) == 1:
            problems.append(f"{name}: {errors[0].get('msg')}")
        else:
            problems.append(
                f"{name}: value of type {type(errors[0].get('input')).__name__} matches no accepted form"
            )
    return "Invalid request: " + "; ".join(problems), next(iter(by_field), None)


def create_app(api: TeacherAPI, api_key: str | None) -> FastAPI:
    """The FastAPI application; ``api_key`` (never logged) enables bearer authentication."""
    app = FastAPI(title="local teacher", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
                body = error_body(
                    401,
                    "Incorrect or missing API key (send 'Authorization: Bearer KEY').",
                    code="invalid_api_key",
                )
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = (
            f"Unknown route {request.method} {request.url.path}"
            if err.status_code == 404
            else str(err.detail)
        )
        return JSONResponse(error_body(err.status_code, message), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict:
        return api.models()

    @app.get("/metrics")
    async def metrics() -> dict:
        return api.engine.stats()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> JSONResponse:
        response, batch = await api.completions(body)
        return JSONResponse(response, headers={"x-batch-size": str(batch)})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> JSONResponse:
        response, batch = await api.chat(body)
        return JSONResponse(response, headers={"x-batch-size": str(batch)})

    return app
