"""Token buckets: a burst up to the capacity passes at once, then requests are spaced at the rate.

Only lower bounds on elapsed time are asserted (a sleep never ends early), so the test cannot flake."""

from __future__ import annotations

import asyncio
import time

import pytest

from teacher.ratelimit import RateLimiter, TokenBucket


def elapsed(coro_factory) -> float:
    async def main() -> float:
        started = time.monotonic()
        await coro_factory()
        return time.monotonic() - started

    return asyncio.run(main())


def test_bucket_spaces_requests_beyond_its_capacity() -> None:
    bucket = TokenBucket(rate_per_s=50.0, capacity=2.0)

    async def take(n: int) -> None:
        await asyncio.gather(*(bucket.acquire(1) for _ in range(n)))

    # 2 pass from the full bucket, the other 8 wait 1/50 s each: at least 0.16 s in all.
    assert elapsed(lambda: take(10)) >= 8 / 50 - 1e-3


def test_oversized_request_passes_then_its_debt_delays_the_next() -> None:
    bucket = TokenBucket(rate_per_s=100.0, capacity=5.0)

    async def run() -> None:
        await bucket.acquire(25)  # larger than the bucket: let through once full, leaves a debt of 20
        await bucket.acquire(1)

    assert elapsed(run) >= 21 / 100 - 1e-3


def test_limiter_settles_estimates_with_actual_usage() -> None:
    limiter = RateLimiter(requests_per_minute=60_000, tokens_per_minute=60)  # 1 token/s, capacity 1 token

    async def run() -> None:
        await limiter.acquire(40)  # an estimate above capacity: passes, leaves a debt of about 39 tokens
        assert limiter.tokens.available() < -30
        limiter.settle(estimated_tokens=40, actual_tokens=5)  # the request used 5: 35 given back
        assert limiter.tokens.available() > -10

    asyncio.run(run())


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
