"""Several teacher endpoints (replicas) behind one collection: free capacity, rate limits and a circuit breaker.

Each endpoint has its own client, its own concurrency and rate limits. A request goes to the endpoint with the
most free slots. An endpoint whose requests fail ``breaker_failures`` times in a row (each after the client's own
retries) is set aside for ``breaker_cooldown_s``: it gets no new requests, the others carry on; once the
cool-down is over it gets one probe request at a time until one succeeds. With a single endpoint there is
nowhere else to go, so nothing is ever set aside (failures are reported as they were).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import openai

from teacher.client import TeacherClient
from teacher.parsing import Resolve, ResponseShapeError
from teacher.ratelimit import RateLimiter
from teacher.settings import EndpointSettings, TeacherSettings

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")
# What a request may fail with and still leave the run going (anything else is a bug and propagates).
REQUEST_ERRORS = (openai.OpenAIError, ResponseShapeError, ValueError)
_END: object = object()  # no job left


def endpoint_failure(exc: BaseException) -> bool:
    """Whether a failed request says the endpoint is unwell (unreachable, timing out, overloaded, 5xx), so
    another endpoint may answer it; a refusal of the request itself (4xx) or a bad answer is the item's."""
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code >= 500 or exc.status_code in (408, 429)
    )


@dataclass
class EndpointStats:
    """Per-endpoint counts of one collection, reported in the run's stats."""

    requests: int = 0  # requests sent (a request the client retried counts once)
    tokens: int = 0  # prompt + completion tokens the endpoint reported for its answers
    failures: int = 0  # requests that failed for good at this endpoint (after the client's retries)
    set_aside: int = 0  # times the circuit breaker set the endpoint aside


@dataclass
class Endpoint:
    """One endpoint's client, limits and breaker state."""

    index: int
    settings: EndpointSettings
    client: TeacherClient
    limiter: RateLimiter
    in_flight: int = 0
    consecutive_failures: int = 0
    aside_until: float = 0.0  # time.monotonic() until which no request is sent
    probing: bool = False  # back from a cool-down: one request at a time until one succeeds
    stats: EndpointStats = field(default_factory=EndpointStats)

    @property
    def url(self) -> str:
        return self.settings.base_url

    def free(self, now: float) -> int:
        """Requests this endpoint may take now."""
        if now < self.aside_until:
            return 0
        capacity = 1 if self.probing else int(self.settings.concurrency or 1)
        return capacity - self.in_flight


class EndpointPool:
    """The endpoints of one collection, with the breaker's policy (see the module docstring)."""

    def __init__(
        self, settings: TeacherSettings, urls: list[str], api_key: str | None, resolve: Resolve | None
    ) -> None:
        self.breaker_failures = settings.breaker_failures
        self.cooldown_s = settings.breaker_cooldown_s
        self.endpoints = [
            Endpoint(
                i,
                spec,
                TeacherClient(settings, spec.base_url, api_key, resolve, spec.concurrency),
                RateLimiter(spec.requests_per_minute or 1.0, spec.tokens_per_minute or 1.0),
            )
            for i, spec in enumerate(settings.endpoint_settings(urls))
        ]

    def __len__(self) -> int:
        return len(self.endpoints)

    async def close(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.client.__aexit__(None, None, None)

    def choose(self, avoid: frozenset[int]) -> Endpoint | None:
        """The endpoint with the most free slots among those not in ``avoid`` (None: none has a slot now)."""
        now = time.monotonic()
        free = [(e.free(now), -e.index, e) for e in self.endpoints if e.index not in avoid]
        best = max(free, default=None, key=lambda entry: entry[:2])
        return best[2] if best is not None and best[0] > 0 else None

    def seconds_to_next_return(self) -> float | None:
        """Until the first set-aside endpoint may take requests again (None: none is set aside)."""
        now = time.monotonic()
        waits = [e.aside_until - now for e in self.endpoints if e.aside_until > now]
        return min(waits, default=None)

    def succeeded(self, endpoint: Endpoint, tokens: int) -> None:
        endpoint.stats.tokens += tokens
        endpoint.consecutive_failures = 0
        endpoint.probing = False

    def failed(self, endpoint: Endpoint, exc: BaseException) -> None:
        """Count a failure; an unwell endpoint (``endpoint_failure``) is set aside after ``breaker_failures`` in
        a row, or at once when its probe after a cool-down fails."""
        endpoint.stats.failures += 1
        if not endpoint_failure(exc):
            return
        endpoint.consecutive_failures += 1
        if len(self) == 1:
            return
        if endpoint.probing or endpoint.consecutive_failures >= self.breaker_failures:
            if time.monotonic() < endpoint.aside_until:
                return  # already aside: a request sent before that failed too
            endpoint.aside_until = time.monotonic() + self.cooldown_s
            endpoint.probing = True
            endpoint.consecutive_failures = 0
            endpoint.stats.set_aside += 1
            log.warning(
                "teacher endpoint %s set aside for %.0fs after %d failure(s) in a row; last: %s",
                endpoint.url, self.cooldown_s, self.breaker_failures, f"{type(exc).__name__}: {exc}"[:300],
            )  # fmt: skip


async def dispatch(
    pool: EndpointPool,
    jobs: Iterable[Job],
    attempt: Callable[[Endpoint, Job], Awaitable[Outcome]],
    on_success: Callable[[Endpoint, Job, Outcome], int],
    on_failure: Callable[[Job, BaseException], None],
) -> None:
    """Run ``attempt(endpoint, job)`` once per job, each on the endpoint with the most free slots.

    ``on_success`` takes the outcome and returns the tokens it cost (for the endpoint's stats). A job whose
    endpoint failed it as unwell goes back to the queue for an endpoint that has not failed it yet (waiting for
    a set-aside one's cool-down if needed); it fails for good (``on_failure``) once every endpoint failed it, or
    at once for a failure of its own (a 4xx, a bad answer).
    """
    fresh = iter(jobs)
    upcoming = next(fresh, _END)
    retry: deque[tuple[Job, frozenset[int]]] = deque()
    changed = asyncio.Event()
    running: set[asyncio.Task] = set()

    async def run(endpoint: Endpoint, job: Job, tried: frozenset[int]) -> None:
        try:
            outcome = await attempt(endpoint, job)
        except REQUEST_ERRORS as exc:
            pool.failed(endpoint, exc)
            tried = tried | {endpoint.index}
            if endpoint_failure(exc) and len(tried) < len(pool):
                log.info("teacher endpoint %s failed a request; it goes to another endpoint", endpoint.url)
                retry.append((job, tried))
            else:
                on_failure(job, exc)
        else:
            pool.succeeded(endpoint, on_success(endpoint, job, outcome))
        finally:
            endpoint.in_flight -= 1
            changed.set()

    def start(endpoint: Endpoint, job: Job, tried: frozenset[int]) -> None:
        endpoint.in_flight += 1
        endpoint.stats.requests += 1
        running.add(asyncio.create_task(run(endpoint, job, tried)))

    def start_one() -> bool:
        """Start the first job some endpoint can take now (retries first); False when none can."""
        nonlocal upcoming
        for n, (job, tried) in enumerate(retry):
            endpoint = pool.choose(tried)
            if endpoint is not None:
                del retry[n]
                start(endpoint, job, tried)
                return True
        if upcoming is not _END:
            endpoint = pool.choose(frozenset())
            if endpoint is not None:
                start(endpoint, upcoming, frozenset())
                upcoming = next(fresh, _END)
                return True
        return False

    try:
        while upcoming is not _END or retry or running:
            while start_one():
                pass
            changed.clear()
            with contextlib.suppress(TimeoutError):  # the timeout: a set-aside endpoint is back
                await asyncio.wait_for(changed.wait(), pool.seconds_to_next_return())
            for task in [t for t in running if t.done()]:
                running.discard(task)
                task.result()  # an unexpected error ends the run
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
