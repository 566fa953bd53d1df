"""Token buckets for the request and token rate limits of a teacher API (requests/min, tokens/min)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Holds up to ``capacity`` units, refilled at ``rate`` units per second; ``acquire`` waits for enough.

    A request larger than the capacity is let through once the bucket is full (it could never fit otherwise);
    the debt then delays the next requests, so the long-run rate still holds.
    """

    def __init__(self, rate_per_s: float, capacity: float) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("rate and capacity of a token bucket must be positive")
        self.rate = rate_per_s
        self.capacity = capacity
        self._level = capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float) -> None:
        async with self._lock:  # first come, first served: waiters queue on the lock
            self._refill()
            need = min(amount, self.capacity)
            if self._level < need:
                await asyncio.sleep((need - self._level) / self.rate)
                self._refill()
            self._level -= amount

    def available(self) -> float:
        """Units in the bucket now (negative: a debt still being paid off)."""
        self._refill()
        return self._level

    def refund(self, amount: float) -> None:
        """Give back units (negative: take more) once the real cost of a request is known."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)


class RateLimiter:
    """Requests/min and tokens/min limits together. Token costs are estimated before a request and settled
    with the usage the server reports after it."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float) -> None:
        # A bucket of one second's worth (at least one request) keeps bursts short without serializing.
        self.requests = TokenBucket(requests_per_minute / 60.0, max(1.0, requests_per_minute / 60.0))
        self.tokens = TokenBucket(tokens_per_minute / 60.0, max(1.0, tokens_per_minute / 60.0))

    async def acquire(self, estimated_tokens: int) -> None:
        await self.requests.acquire(1)
        await self.tokens.acquire(estimated_tokens)

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        self.tokens.refund(estimated_tokens - actual_tokens)
