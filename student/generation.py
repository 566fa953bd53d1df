"""Decoding, independent of how logits are computed: sampling, stop strings, top-k reports, and the step loop.

A ``Decoder`` decodes a batch ("wave") of sequences together through a ``Session``: one ``prefill`` forward
over the (padded) prompts, then one ``extend`` forward per generated token, each feeding one token per row.
``student.inference`` implements the session with megatron-core's KV cache (``StaticInferenceContext``), so a
step costs one token per row; the tests implement it with an exact bigram table. A sequence that finishes
early is reported at once (``on_done``) and rides along in the wave until the longest one ends; requests that
arrive meanwhile wait for the next wave (static batching).

Determinism: every sequence samples from its own ``torch.Generator`` seeded by its request (a random seed when
none is given), in float64, so the same request with the same seed gives the same tokens whatever else shares
its batch. Reported logprobs are those of the raw model distribution (temperature 1, no top-p), as vLLM's
default and OpenAI's ``logprobs`` report them; temperature and top-p only shape the sampling.

Tail samples (``SamplingParams.samples = S``): each report also draws S tokens with replacement from that same
reported distribution restricted to outside its top-k, from a generator of their own (``sample_seed``), so
asking for them changes neither the generated tokens nor the reported logprobs. The top-k probabilities plus
``r · count / S`` on the distinct draws (``r`` = the mass outside the top-k) estimate the full distribution
without bias. They are drawn at temperature 1 whatever the request's temperature, because the head they
complete is reported at temperature 1 (and score requests ask for temperature 0 only to cut decoding short).
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

MAX_STOP_STRINGS = 4


class Session(Protocol):
    """One batch of sequences decoded together; row ``i`` stays row ``i`` for the session's lifetime."""

    def prefill(self, prompts: list[list[int]], every_position: list[bool]) -> list[torch.Tensor]:
        """Full-vocabulary logits after the prompts: ``[len(prompt), V]`` for rows with ``every_position``
        (row j predicts token j+1), else ``[1, V]`` (the last position only)."""
        ...

    def extend(self, tokens: list[int]) -> torch.Tensor:
        """Append one token to every row; returns the ``[rows, V]`` logits of the next position."""
        ...


# open_session(max_new_tokens) -> a session with room for that many tokens after the longest prompt
SessionFactory = Callable[[int], Session]


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
    samples: int = 0  # tail tokens drawn per reported position (outside its top-k)
    sample_seed: int | None = None  # seed of those draws (None: random)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
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
    sample_ids: list[int] = field(default_factory=list)  # distinct tail draws (outside top_ids), ascending
    sample_counts: list[int] = field(default_factory=list)  # how often each was drawn


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


def tail_samples(
    logprobs: torch.Tensor, top_ids: torch.Tensor, samples: int, generator: torch.Generator | None
) -> list[tuple[list[int], list[int]]]:
    """Per row of ``logprobs [N, V]``: ``samples`` draws with replacement from the distribution restricted to
    outside the row's ``top_ids``, as (distinct ids ascending, counts); nothing where that mass is 0."""
    probs = logprobs.double().exp().scatter(1, top_ids, 0.0)
    has_tail = probs.sum(dim=1) > 0
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in range(probs.shape[0])]
    if samples == 0 or not bool(has_tail.any()):
        return out
    rows = torch.nonzero(has_tail).flatten()
    draws = torch.multinomial(probs[rows], samples, replacement=True, generator=generator)
    for row, drawn in zip(rows.tolist(), draws, strict=True):
        ids, counts = torch.unique(drawn, return_counts=True)
        out[row] = (ids.tolist(), counts.tolist())
    return out


def position_reports(
    logits: torch.Tensor,
    actual: Sequence[int],
    k: int,
    samples: int = 0,
    generator: torch.Generator | None = None,
) -> list[PositionReport]:
    """Reports for rows of full-vocabulary logits ``[N, V]`` and the token actually at each row, with
    ``samples`` tail draws each (``tail_samples``)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    actual_t = torch.as_tensor(list(actual), dtype=torch.long).view(-1, 1)
    actual_lp = logprobs.gather(1, actual_t)
    ranks = (logprobs > actual_lp).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    top_logits = logits.gather(1, top_ids)
    actual_logit = logits.gather(1, actual_t)
    drawn = tail_samples(logprobs, top_ids, samples, generator)
    return [
        PositionReport(
            token=int(actual_t[i, 0]),
            logprob=float(actual_lp[i, 0]),
            logit=float(actual_logit[i, 0]),
            rank=int(ranks[i]),
            top_ids=top_ids[i].tolist(),
            top_logprobs=top_lp[i].tolist(),
            top_logits=top_logits[i].tolist(),
            sample_ids=drawn[i][0],
            sample_counts=drawn[i][1],
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
    sample_generator: torch.Generator | None = None  # the tail draws' own (SamplingParams.samples)
    generated: list[int] = field(default_factory=list)
    reports: list[PositionReport] = field(default_factory=list)
    prompt_reports: list[PositionReport | None] | None = None
    data: bytearray = field(default_factory=bytearray)
    stop_at: int | None = None  # character index where a stop string begins

    @property
    def done(self) -> bool:
        return self.stop_at is not None or len(self.generated) >= self.params.max_tokens


class Decoder:
    """Decodes waves of sequences through sessions from ``open_session``."""

    def __init__(self, open_session: SessionFactory, token_bytes: Callable[[int], bytes]) -> None:
        self._open_session = open_session
        self._token_bytes = token_bytes

    def start(self, prompt: list[int], params: SamplingParams) -> DecodeState:
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        sample_generator = None
        if params.samples:
            sample_seed = params.sample_seed if params.sample_seed is not None else secrets.randbits(63)
            sample_generator = torch.Generator().manual_seed(sample_seed)
        return DecodeState(list(prompt), params, torch.Generator().manual_seed(seed), sample_generator)

    def run_wave(
        self,
        seqs: list[DecodeState],
        on_done: Callable[[DecodeState], None] = lambda seq: None,
        on_forward: Callable[[int], None] = lambda rows: None,
    ) -> None:
        """Decode ``seqs`` together until every one is done; ``on_done`` fires as each one finishes and
        ``on_forward(rows)`` after each forward pass."""
        need_forward = []
        for seq in seqs:
            if seq.params.prompt_logprobs is not None or not seq.done:
                need_forward.append(seq)
            else:
                on_done(seq)
        if not need_forward:
            return
        session = self._open_session(max(s.params.max_tokens for s in need_forward))
        wants_all = [s.params.prompt_logprobs is not None for s in need_forward]
        logits = session.prefill([s.prompt for s in need_forward], wants_all)
        on_forward(len(need_forward))
        for seq, row_logits, every in zip(need_forward, logits, wants_all, strict=True):
            if every:
                reports = position_reports(
                    row_logits[:-1],
                    seq.prompt[1:],
                    seq.params.prompt_logprobs,
                    seq.params.samples,
                    seq.sample_generator,
                )
                seq.prompt_reports = [None, *reports]
            self._advance(seq, row_logits[-1], on_done)
        while not all(s.done for s in need_forward):
            step = session.extend([(s.generated or s.prompt)[-1] for s in need_forward])
            on_forward(len(need_forward))
            for seq, row_logits in zip(need_forward, step, strict=True):
                if not seq.done:
                    self._advance(seq, row_logits, on_done)

    def _advance(
        self, seq: DecodeState, logits: torch.Tensor, on_done: Callable[[DecodeState], None]
    ) -> None:
        if not seq.done:
            self._append(seq, logits)
        if seq.done:
            on_done(seq)

    def _append(self, seq: DecodeState, logits: torch.Tensor) -> None:
        token = sample_token(logits, seq.params, seq.generator)
        if seq.params.logprobs is not None:
            seq.reports.extend(
                position_reports(
                    logits.unsqueeze(0),
                    [token],
                    seq.params.logprobs,
                    seq.params.samples,
                    seq.sample_generator,
                )
            )
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
        """Decode all prompts as one wave (offline generation)."""
        seqs = [self.start(p, sp) for p, sp in zip(prompts, params, strict=True)]
        self.run_wave(seqs)
        return [self.finish(s) for s in seqs]
