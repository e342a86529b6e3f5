"""The micro-batching queue in front of the model: same answers as one request at a time, bounded batches,
bounded waiting, and a failing batch that fails only its own requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from cifar10_pipeline.serving.batching import MicroBatcher
from cifar10_pipeline.serving.guards import Ticket, Traffic
from cifar10_pipeline.serving.serve import probabilities_of

from ..support.helpers import tiny_convnet

# Scheduling slack on a shared 2-core machine: a wait may overrun its bound by this much, never more.
SLACK_S = 0.25


@pytest.fixture(scope="module")
def infer() -> Callable[[np.ndarray], np.ndarray]:
    return probabilities_of(tiny_convnet(tta_level=2, seed=3))


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


async def _predict_all(
    batcher: MicroBatcher, traffic: Traffic, requests: list[np.ndarray]
) -> list[np.ndarray]:
    """Admit every request first (as UploadGuard does when they arrive together), then queue them."""
    tickets = [traffic.admit() for _ in requests]
    assert all(ticket is not None for ticket in tickets)

    async def one(ticket: Ticket, batch: np.ndarray) -> np.ndarray:
        try:
            return await batcher.predict(batch, ticket)
        finally:
            ticket.leave()

    return await asyncio.gather(*(one(t, r) for t, r in zip(tickets, requests, strict=True)))


def test_batched_and_unbatched_predictions_are_equal(infer: Callable[[np.ndarray], np.ndarray]) -> None:
    requests = [images(1, seed=i) for i in range(20)] + [images(3, seed=99)]
    results = {}
    for enabled in (True, False):
        traffic = Traffic(max_in_flight=100)
        batcher = MicroBatcher(infer, traffic, max_batch=8, max_wait_s=1.0, enabled=enabled)
        try:
            results[enabled] = asyncio.run(_predict_all(batcher, traffic, requests))
        finally:
            batcher.close()
        stats = batcher.stats
        assert stats.requests == len(requests) and stats.images == 23
        if enabled:
            assert stats.batches < len(requests) and 1 < stats.largest_batch <= 8
        else:
            assert stats.batches == len(requests) and stats.largest_batch == 3
    alone = [infer(request) for request in requests]
    for batched, unbatched, reference in zip(results[True], results[False], alone, strict=True):
        assert batched.shape == reference.shape
        np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-6)
        np.testing.assert_allclose(unbatched, reference, rtol=0, atol=1e-6)


def test_a_request_larger_than_the_batch_bound_runs_alone(infer: Callable[[np.ndarray], np.ndarray]) -> None:
    traffic = Traffic(max_in_flight=10)
    batcher = MicroBatcher(infer, traffic, max_batch=4, max_wait_s=0.5)
    try:
        big, small = images(6, seed=1), images(1, seed=2)
        got_big, got_small = asyncio.run(_predict_all(batcher, traffic, [big, small]))
    finally:
        batcher.close()
    assert batcher.stats.batches == 2 and batcher.stats.largest_batch == 6
    np.testing.assert_allclose(got_big, infer(big), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_small, infer(small), rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_wait_s", [0.05, 0.3])
def test_the_queue_never_waits_longer_than_its_bound(
    infer: Callable[[np.ndarray], np.ndarray], max_wait_s: float
) -> None:
    """Other requests are admitted but never arrive: the batch still starts once the bound has passed."""
    traffic = Traffic(max_in_flight=10)
    batcher = MicroBatcher(infer, traffic, max_batch=32, max_wait_s=max_wait_s)
    stragglers = [traffic.admit() for _ in range(5)]  # on their way, never queued
    ticket = traffic.admit()
    infer(images(1))  # warm: time only the wait, not first-call setup
    try:
        started = time.monotonic()
        result = asyncio.run(batcher.predict(images(1), ticket))
        elapsed = time.monotonic() - started
    finally:
        for straggler in stragglers:
            straggler.leave()
        batcher.close()
    assert result.shape == (1, 10)
    # The bound counts from the oldest request's arrival (its queue wait); the hold, from when the model's
    # thread took it, is shorter when that thread was late (a loaded machine), never longer.
    assert max_wait_s - 0.01 <= batcher.stats.max_queue_wait_s <= max_wait_s + SLACK_S
    assert batcher.stats.max_hold_s <= batcher.stats.max_queue_wait_s + 0.001
    assert elapsed <= max_wait_s + SLACK_S + 1.0  # the bound, plus one forward pass of one image


def test_a_lone_request_does_not_wait(infer: Callable[[np.ndarray], np.ndarray]) -> None:
    """Nothing else is on its way, so a long bound costs nothing."""
    traffic = Traffic(max_in_flight=10)
    batcher = MicroBatcher(infer, traffic, max_batch=32, max_wait_s=5.0)
    infer(images(1))
    try:
        for seed in range(3):
            ticket = traffic.admit()
            started = time.monotonic()
            asyncio.run(batcher.predict(images(1, seed), ticket))
            assert time.monotonic() - started < 1.0
            ticket.leave()
    finally:
        batcher.close()
    assert batcher.stats.max_hold_s < 0.05


def test_the_wait_ends_as_soon_as_the_others_give_up(infer: Callable[[np.ndarray], np.ndarray]) -> None:
    """A request that leaves before queueing (e.g. refused with a 4xx) stops holding the batch back."""
    traffic = Traffic(max_in_flight=10)
    batcher = MicroBatcher(infer, traffic, max_batch=32, max_wait_s=5.0)
    infer(images(1))
    straggler, ticket = traffic.admit(), traffic.admit()

    async def run() -> float:
        task = asyncio.ensure_future(batcher.predict(images(1), ticket))
        await asyncio.sleep(0.2)
        straggler.leave()
        started = time.monotonic()
        await task
        return time.monotonic() - started

    try:
        after_leave = asyncio.run(run())
    finally:
        ticket.leave()
        batcher.close()
    assert after_leave < 1.0
    assert 0.15 <= batcher.stats.max_hold_s < 2.0


@pytest.mark.reliability(
    "the model fails on one batch (images of the wrong shape reach it)",
    "that batch's requests get the error; the next request is answered",
)
def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(
    infer: Callable[[np.ndarray], np.ndarray],
) -> None:
    from cifar10_pipeline.core.images import ImageInputError

    traffic = Traffic(max_in_flight=10)
    batcher = MicroBatcher(infer, traffic, max_batch=8, max_wait_s=0.0)
    try:
        with pytest.raises(ImageInputError):
            asyncio.run(batcher.predict(np.zeros((1, 16, 16, 3), np.uint8)))
        assert asyncio.run(batcher.predict(images(2))).shape == (2, 10)
    finally:
        batcher.close()


def test_closing_stops_the_worker_and_refuses_new_work(infer: Callable[[np.ndarray], np.ndarray]) -> None:
    traffic = Traffic(max_in_flight=10)
    batcher = MicroBatcher(infer, traffic, max_batch=8, max_wait_s=0.0)
    batcher.close()
    assert not batcher._thread.is_alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        asyncio.run(batcher.predict(images(1)))


def test_bounds_are_checked(infer: Callable[[np.ndarray], np.ndarray]) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(infer, Traffic(1), max_batch=0, max_wait_s=0.0)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_test_time_views_stacked_into_one_pass_give_the_same_logits(level: int) -> None:
    """A small batch's views go through the network as one batch; a large one's one view at a time."""
    import torch

    from cifar10_pipeline.modeling.inference import STACK_VIEWS_UP_TO, normalize, tta_logits

    model = tiny_convnet(seed=4)
    count = STACK_VIEWS_UP_TO + 1  # above the cap even at one view: one pass per view
    x = normalize(torch.from_numpy(images(count, seed=5)), model.config.image_mean, model.config.image_std)
    with torch.no_grad():
        one_pass_per_view = tta_logits(model, x, level)
        stacked = torch.cat([tta_logits(model, x[i : i + 1], level) for i in range(8)])
    torch.testing.assert_close(stacked, one_pass_per_view[:8], rtol=0, atol=1e-5)
