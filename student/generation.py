"""Decoding, independent of how logits are computed: sampling, stop strings, top-k reports, and the step loop.

A ``Decoder`` advances many ``Sequence``s together: each ``step`` asks a ``forward`` callable for the logits of
only the positions it needs (every prompt position on a sequence's first step when prompt scoring was asked
for, otherwise the last position) and samples one token per unfinished sequence. Sequences may join between
steps, which is how the local teacher server batches concurrent requests (continuous batching).

There is no KV cache: every step recomputes the whole sequence. That is quadratic in length and only meant
for the small models this project trains and serves; logits are exactly those of one full forward.

Determinism: every sequence samples from its own ``torch.Generator`` seeded by its request (a random seed when
none is given), in float64, so the same request with the same seed gives the same tokens whatever else shares
its batch. Reported logprobs are those of the raw model distribution (temperature 1, no top-p), as vLLM's
default and OpenAI's ``logprobs`` report them; temperature and top-p only shape the sampling.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 4

# forward(token lists, positions wanted per row) -> one float32 tensor [len(positions[i]), V] per row
ForwardFn = Callable[[list[list[int]], list[list[int]]], list[torch.Tensor]]


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding parameters. ``temperature == 0`` is greedy (argmax, lowest id on ties)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top entries reported per generated token (None: no report)
    prompt_logprobs: int | None = None  # top entries reported per prompt position (None: no report)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class PositionReport:
    """The model's distribution at one position: the actual token and the top entries (decreasing logprob)."""

    token: int
    logprob: float
    logit: float
    rank: int  # 1 + number of tokens with a strictly higher logprob
    top_ids: list[int]
    top_logprobs: list[float]
    top_logits: list[float]


@dataclass
class Completion:
    """The result of one sequence. ``tokens`` are the generated tokens kept in the answer.

    With a stop string, ``text`` is everything before it (OpenAI's rule) and ``tokens`` are the generated
    tokens that overlap ``text`` (so ``text`` is the decoded tokens exactly when the stop begins at a token
    boundary; otherwise the last token also holds the start of the stop string). ``generated`` counts every
    sampled token (usage).
    """

    prompt: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "length" or "stop"
    generated: int
    reports: list[PositionReport] | None  # one per kept token, when logprobs were asked for
    prompt_reports: list[PositionReport | None] | None  # one per prompt token, first None


def position_reports(logits: torch.Tensor, actual: Sequence[int], k: int) -> list[PositionReport]:
    """Reports for rows of full-vocabulary logits ``[N, V]`` and the token actually at each row."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    actual_t = torch.as_tensor(list(actual), dtype=torch.long).view(-1, 1)
    actual_lp = logprobs.gather(1, actual_t)
    ranks = (logprobs > actual_lp).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    top_logits = logits.gather(1, top_ids)
    actual_logit = logits.gather(1, actual_t)
    return [
        PositionReport(
            token=int(actual_t[i, 0]),
            logprob=float(actual_lp[i, 0]),
            logit=float(actual_logit[i, 0]),
            rank=int(ranks[i]),
            top_ids=top_ids[i].tolist(),
            top_logprobs=top_lp[i].tolist(),
            top_logits=top_logits[i].tolist(),
        )
        for i in range(logits.shape[0])
    ]


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from full-vocabulary logits ``[V]``: greedy, or temperature + nucleus (top-p) sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one), renormalised."""
    sorted_p, order = probs.sort(descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum()


def chars_before(data: bytes) -> int:
    """Characters that ``data`` decodes to, not counting an unfinished multi-byte character at its end."""
    return len(codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False))


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


@dataclass
class DecodeState:
    """A sequence being decoded (internal state of ``Decoder``)."""

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    reports: list[PositionReport] = field(default_factory=list)
    prompt_reports: list[PositionReport | None] | None = None
    data: bytearray = field(default_factory=bytearray)
    stop_at: int | None = None  # character index where a stop string begins
    started: bool = False

    @property
    def done(self) -> bool:
        return self.stop_at is not None or len(self.generated) >= self.params.max_tokens


class Decoder:
    """Steps a changing set of sequences together through one ``forward`` per step."""

    def __init__(self, forward: ForwardFn, token_bytes: Callable[[int], bytes]) -> None:
        self._forward = forward
        self._token_bytes = token_bytes

    def start(self, prompt: list[int], params: SamplingParams) -> DecodeState:
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return DecodeState(list(prompt), params, torch.Generator().manual_seed(seed))

    def step(self, seqs: list[DecodeState]) -> None:
        """One forward over ``seqs``: prompt reports on the first step, then one new token per sequence."""
        rows, positions = [], []
        for seq in seqs:
            tokens = seq.prompt + seq.generated
            wanted = []
            if not seq.started and seq.params.prompt_logprobs is not None:
                wanted = list(range(len(seq.prompt) - 1))
            if not seq.done:
                wanted.append(len(tokens) - 1)
            rows.append(tokens)
            positions.append(wanted)
        logits = self._forward(rows, positions) if any(positions) else [None] * len(seqs)
        for seq, row_logits in zip(seqs, logits, strict=True):
            if not seq.started and seq.params.prompt_logprobs is not None:
                n = len(seq.prompt) - 1
                reports = position_reports(row_logits[:n], seq.prompt[1:], seq.params.prompt_logprobs)
                seq.prompt_reports = [None, *reports]
                row_logits = row_logits[n:]
            seq.started = True
            if not seq.done:
                self._append(seq, row_logits[-1])

    def _append(self, seq: DecodeState, logits: torch.Tensor) -> None:
        token = sample_token(logits, seq.params, seq.generator)
        if seq.params.logprobs is not None:
            seq.reports.extend(position_reports(logits.unsqueeze(0), [token], seq.params.logprobs))
        seq.generated.append(token)
        seq.data += self._token_bytes(token)
        if seq.params.stop:
            text = decode(bytes(seq.data))
            hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
            if hits:
                seq.stop_at = min(hits)

    def finish(self, seq: DecodeState) -> Completion:
        """The completion of a finished sequence, cut at its stop string."""
        text = decode(bytes(seq.data))
        kept = len(seq.generated)
        if seq.stop_at is not None:
            text = text[: seq.stop_at]
            offset, kept = 0, 0
            for token in seq.generated:
                if chars_before(bytes(seq.data[:offset])) >= len(text):
                    break
                offset += len(self._token_bytes(token))
                kept += 1
        return Completion(
            prompt=seq.prompt,
            tokens=seq.generated[:kept],
            text=text,
            finish_reason="stop" if seq.stop_at is not None else "length",
            generated=len(seq.generated),
            reports=seq.reports[:kept] if seq.params.logprobs is not None else None,
            prompt_reports=seq.prompt_reports,
        )

    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Decode all prompts together until each one is done (offline generation)."""
        seqs = [self.start(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while True:
            active = [s for s in seqs if not s.started or not s.done]
            if not active:
                return [self.finish(s) for s in seqs]
            self.step(active)
