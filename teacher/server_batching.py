"""Server-side batching of the local teacher: concurrent requests share padded forward passes.

One engine thread owns the model. Requests enter a queue; when the engine is idle it takes the first one and
waits up to ``batch_wait_ms`` for more (up to ``max_batch_size``), then decodes them as one wave through
``student.generation.Decoder``: one prefill forward over the padded prompts, then one KV-cached forward per
generated token for the whole wave. Each request is answered as soon as its own sequence is done; requests
that arrive during a wave wait for the next one. Torch releases the GIL during the forward, so the HTTP event
loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from student.generation import Completion, Decoder, DecodeState, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    state: DecodeState | None = None
    max_batch: int = 0

    def resolve(self, result: Completion | None = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result((result, self.max_batch))

        self.loop.call_soon_threadsafe(_set)


@dataclass
class BatchStats:
    """Counters the server reports at ``/metrics``."""

    requests: int = 0
    forward_passes: int = 0
    sequences_stepped: int = 0
    max_batch_size: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    generated_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "forward_passes": self.forward_passes,
            "max_batch_size": self.max_batch_size,
            "mean_batch_size": self.sequences_stepped / self.forward_passes if self.forward_passes else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "generated_tokens": self.generated_tokens,
        }


class BatchingEngine:
    """Runs decoding on one thread, batching whatever requests are waiting; ``submit`` is awaited per request."""

    def __init__(self, decoder: Decoder, max_batch_size: int, batch_wait_ms: float) -> None:
        self._decoder = decoder
        self._max_batch = max_batch_size
        self._wait_s = batch_wait_ms / 1000
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stats = BatchStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="teacher-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.as_dict()

    async def submit(self, prompt: list[int], params: SamplingParams) -> tuple[Completion, int]:
        """Decode one prompt; returns the completion and the size of the wave it was decoded in."""
        loop = asyncio.get_running_loop()
        job = _Job(prompt, params, loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    def _admit(self, job: _Job, wave: list[_Job]) -> None:
        if job.future.done():  # the client went away before its turn
            return
        try:
            job.state = self._decoder.start(job.prompt, job.params)
        except ValueError as err:
            job.resolve(error=err)
            return
        wave.append(job)

    def _fill(self) -> list[_Job] | None:
        """The next wave: the first waiting job, plus whatever arrives within the wait; None: stop."""
        wave: list[_Job] = []
        deadline = None
        while len(wave) < self._max_batch:
            try:
                if deadline is None:
                    job = self._queue.get()
                elif (left := deadline - time.monotonic()) > 0:
                    job = self._queue.get(timeout=left)
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                for waiting in wave:
                    waiting.resolve(error=RuntimeError("the server is shutting down"))
                return None
            self._admit(job, wave)
            if wave and deadline is None:
                deadline = time.monotonic() + self._wait_s
        return wave

    def _run(self) -> None:
        while (wave := self._fill()) is not None:
            jobs = {id(job.state): job for job in wave}
            for job in wave:
                job.max_batch = len(wave)
            try:
                states = [job.state for job in wave]
                self._decoder.run_wave(states, on_done=partial(self._finish, jobs), on_forward=self._record)
            except Exception as err:
                log.exception("decoding failed for a wave of %d requests", len(wave))
                for job in wave:
                    job.resolve(error=err)

    def _finish(self, jobs: dict[int, _Job], state: DecodeState) -> None:
        with self._lock:
            self._stats.requests += 1
            self._stats.generated_tokens += len(state.generated)
        jobs[id(state)].resolve(self._decoder.finish(state))

    def _record(self, rows: int) -> None:
        with self._lock:
            stats = self._stats
            stats.forward_passes += 1
            stats.sequences_stepped += rows
            stats.batch_sizes[rows] += 1
            stats.max_batch_size = max(stats.max_batch_size, rows)
