"""Micro-batching in front of the model: concurrent requests share one forward pass.

One worker thread owns the model. Requests hand their decoded images to ``MicroBatcher.predict`` and await
the probabilities. The worker takes the oldest waiting request, then adds the requests queued behind it
while the batch holds at most ``max_batch`` images, and waits for more at most ``max_wait_s`` after the
oldest arrived -- and only while other admitted requests are still on their way (being received or
decoded, ``Traffic.on_the_way``), so a lone request never waits. Then one forward pass
(``predict_logits``, the evaluation path) classifies the whole batch and each request gets its rows.

A request with more images than ``max_batch`` runs alone (the bound is on what is merged, never a split of
one request). ``enabled=False`` runs each request alone, in arrival order: the service before batching.

Each image's probabilities do not depend on what it is batched with (the model is in eval mode: no
batch statistics); only float rounding may differ with the batch size (tests/unit/test_batching.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cifar10_pipeline.serving.guards import Ticket, Traffic


@dataclass
class _Job:
    images: np.ndarray
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the worker did, for /health and the benchmark."""

    batches: int = 0
    requests: int = 0
    images: int = 0
    largest_batch: int = 0
    # Longest time the worker held a batch open waiting for more requests (at most max_wait_s), and the
    # longest a request waited in the queue before its forward pass started (that also includes waiting
    # for the forward pass of an earlier batch to finish).
    max_hold_s: float = 0.0
    max_queue_wait_s: float = 0.0


def _resolve(
    future: asyncio.Future[np.ndarray], result: np.ndarray | None, error: BaseException | None
) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class MicroBatcher:
    """A bounded queue and one worker thread that runs ``infer`` (uint8 (N, 32, 32, 3) -> (N, C)) on batches.

    ``infer`` must not depend on how images are grouped (true of ``predict_logits`` in eval mode).
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        traffic: Traffic,
        max_batch: int,
        max_wait_s: float,
        enabled: bool = True,
    ):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.infer = infer
        self.traffic = traffic
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self.stats = BatchStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="cifar10-model", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------- request side

    async def predict(self, images: np.ndarray, ticket: Ticket | None = None) -> np.ndarray:
        """The model's output rows for ``images``, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        job = _Job(images=images, loop=loop, future=loop.create_future())
        with self.traffic.changed:
            if self._closed:
                raise RuntimeError("the model worker has stopped (the server is shutting down)")
            self._queue.append(job)
            if ticket is not None:
                ticket.mark_queued()
            self.traffic.changed.notify_all()
        return await job.future

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the batches already queued (new requests are refused)."""
        with self.traffic.changed:
            self._closed = True
            self.traffic.changed.notify_all()
        self._thread.join(timeout)

    # ----------------------------------------------------------------------------------- worker side

    def _gather(self) -> list[_Job] | None:
        """Wait for a request, then form a batch behind it within the bounds; None once closed and drained."""
        cond = self.traffic.changed
        with cond:
            while not self._queue:
                if self._closed:
                    return None
                cond.wait()
            first = self._queue.popleft()
            popped = time.monotonic()
            batch, size = [first], len(first.images)
            if not self.enabled:
                return batch
            deadline = first.queued_at + self.max_wait_s
            while size < self.max_batch:
                if self._queue:
                    if size + len(self._queue[0].images) > self.max_batch:
                        break  # it starts the next batch
                    job = self._queue.popleft()
                    batch.append(job)
                    size += len(job.images)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.traffic.on_the_way <= 0 or self._closed:
                    break  # the bound is reached, or nothing else is coming
                cond.wait(remaining)
            self.stats.max_hold_s = max(self.stats.max_hold_s, time.monotonic() - popped)
            return batch

    def _work(self) -> None:
        while (batch := self._gather()) is not None:
            started = time.monotonic()
            stats = self.stats
            stats.max_queue_wait_s = max(stats.max_queue_wait_s, started - batch[0].queued_at)
            sizes = [len(job.images) for job in batch]
            try:
                rows = self.infer(np.concatenate([job.images for job in batch]))
                parts = np.split(rows, np.cumsum(sizes)[:-1])
                outcomes = [(part, None) for part in parts]
            except Exception as exc:  # a model failure fails its batch's requests, not the worker
                outcomes = [(None, exc)] * len(batch)
            stats.batches += 1
            stats.requests += len(batch)
            stats.images += sum(sizes)
            stats.largest_batch = max(stats.largest_batch, sum(sizes))
            for job, (part, error) in zip(batch, outcomes, strict=True):
                # RuntimeError: the event loop is closed, nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    job.loop.call_soon_threadsafe(_resolve, job.future, part, error)
